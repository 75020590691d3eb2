"""Length control: AlpacaEval's length-controlled GLM (arXiv 2404.04475).  Pure numpy.

For one model against a baseline, instruction x:

    P(model beats baseline | x) = sigmoid(theta + phi * tanh(dlen_x / std(dlen)) [+ psi * difficulty_x])

with dlen = len(baseline) - len(model) in characters and std with ddof=1 and
no centring.  The length-controlled win rate is the prediction at dlen = 0:

    LC = 100 * mean_x sigmoid(theta [+ psi * difficulty_x])

The annotator's preference is a probability p (soft label); the GLM is fitted
to soft labels by duplicating each row: y=1 with weight p, y=0 with weight 1-p.
The fit is logistic regression by Newton's method (IRLS) with optional L2 and
L1 penalties (L1 through a smooth approximation |b| ~ sqrt(b^2 + eps)); the
intercept is never penalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_writer


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


@dataclass(frozen=True)
class LogisticFit:
    coef: np.ndarray  # [intercept, features...]
    iterations: int
    converged: bool

    def predict(self, X: np.ndarray) -> np.ndarray:
        return sigmoid(self.coef[0] + np.asarray(X, dtype=np.float64) @ self.coef[1:])


def _objective(A: np.ndarray, y: np.ndarray, w: np.ndarray, beta: np.ndarray, l2: float, l1: float, pen: np.ndarray) -> float:
    z = A @ beta
    # -sum w [y log p + (1-y) log(1-p)], stably: log(1 + e^z) - y z
    nll = float(np.sum(w * (np.logaddexp(0.0, z) - y * z)))
    return nll + 0.5 * l2 * float(np.sum(pen * beta**2)) + l1 * float(np.sum(pen * np.sqrt(beta**2 + 1e-8)))


def fit_logistic(
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray | None = None,
    *,
    l2: float = 0.0,
    l1: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> LogisticFit:
    """Weighted logistic regression with an intercept, by damped Newton-Raphson (IRLS).

    Minimises  -sum_i w_i [y_i log p_i + (1-y_i) log(1-p_i)] + l2/2 ||b||^2 + l1 ||b||_1
    over b (the intercept is not penalised).  y may be soft (in [0, 1]).

    Each Newton step is halved until the objective does not increase, so the fit
    cannot run away (with separable or saturated soft labels the plain Newton step
    overshoots: one reproduction gave a length coefficient of -268).  ``converged``
    is False when the steps did not settle within ``max_iter`` or the coefficients
    grow without bound (separable data): callers report it.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    n, k = X.shape
    y = np.asarray(y, dtype=np.float64)
    w = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
    A = np.hstack([np.ones((n, 1)), X])
    beta = np.zeros(k + 1)
    pen = np.r_[0.0, np.ones(k)]
    eps = 1e-8
    converged = False
    it = 0
    obj = _objective(A, y, w, beta, l2, l1, pen)
    while it < max_iter:
        it += 1
        p = sigmoid(A @ beta)
        grad = A.T @ (w * (p - y)) + l2 * pen * beta
        hdiag = w * p * (1 - p)
        H = (A * hdiag[:, None]).T @ A + l2 * np.diag(pen)
        if l1 > 0:
            s = np.sqrt(beta**2 + eps)
            grad += l1 * pen * beta / s
            H += np.diag(l1 * pen * eps / s**3)
        H += 1e-9 * np.eye(k + 1)
        step = np.linalg.solve(H, grad)
        t = 1.0
        while True:
            cand = beta - t * step
            new = _objective(A, y, w, cand, l2, l1, pen)
            if new <= obj + 1e-12 * abs(obj) or t < 1e-10:
                break
            t *= 0.5
        beta, moved, obj = cand, t * float(np.max(np.abs(step))), new
        if moved < tol:
            converged = True
            break
    if np.max(np.abs(beta)) > 50:  # |logit| > 50: the data separate, the MLE is at infinity
        converged = False
    return LogisticFit(coef=beta, iterations=it, converged=converged)


def fit_logistic_cv(
    X: np.ndarray, p: np.ndarray, *, folds: int = 5, grid: tuple[float, ...] = (0.0, 0.1, 0.3, 1, 3, 10, 30, 100, 1000)
) -> tuple[LogisticFit, float]:
    """L1-penalised logistic fit to soft labels ``p``, the penalty chosen by
    ``folds``-fold cross-validation on held-out soft-label log loss, as alpaca_eval's
    LC GLM does, with the one-standard-error rule (the largest penalty whose loss is
    within one standard error of the best): a feature whose help is within the
    noise of the folds is shrunk to 0 rather than kept by chance.  That matters when
    the length term is barely identified, e.g. every output longer than the
    baseline's, where a kept term means extrapolating to dlen = 0.  Returns the fit
    on all rows at the chosen penalty, and the penalty."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    n = len(p)
    fold = np.arange(n) % folds
    means, ses = [], []
    for lam in grid:
        losses = []
        for k in range(folds):
            tr, te = fold != k, fold == k
            if not te.any() or not tr.any():
                continue
            f = fit_logistic(*soft_rows(p[tr], X[tr]), l1=lam * tr.sum() / n)
            q = np.clip(f.predict(X[te]), 1e-12, 1 - 1e-12)
            losses.append(-float(np.mean(p[te] * np.log(q) + (1 - p[te]) * np.log(1 - q))))
        means.append(float(np.mean(losses)))
        ses.append(float(np.std(losses, ddof=1) / np.sqrt(len(losses))) if len(losses) > 1 else 0.0)
    i = int(np.argmin(means))
    best = max(lam for lam, m in zip(grid, means, strict=True) if m <= means[i] + ses[i])
    return fit_logistic(*soft_rows(p, X), l1=best), best


def extreme_change(raw: float, lc: float, abs_diff: float = 10, rel_diff: float = 4) -> bool:
    """alpaca_eval's warning rule: LC moved more than ``abs_diff`` points and more than
    a ``1/rel_diff`` share of the room on that side (e.g. raw 20: LC < 10 or > 40)."""
    too_small = lc < min(raw - raw / rel_diff, raw - abs_diff)
    too_large = lc > max(raw + (100 - raw) / rel_diff, raw + abs_diff)
    return bool(too_small or too_large)


def length_feature(dlen: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, float]:
    """tanh(dlen / std(dlen)), std with ddof=1, no centring; returns (feature, std)."""
    d = np.asarray(dlen, dtype=np.float64)
    sd = float(np.std(d, ddof=1)) if scale is None else scale
    if not np.isfinite(sd) or sd == 0:
        return np.zeros_like(d), sd
    return np.tanh(d / sd), sd


def soft_rows(p: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Duplicate each row: (x, y=1, weight p) and (x, y=0, weight 1-p)."""
    p = np.asarray(p, dtype=np.float64)
    X2 = np.vstack([X, X])
    y2 = np.r_[np.ones(len(p)), np.zeros(len(p))]
    w2 = np.r_[p, 1 - p]
    return X2, y2, w2


@dataclass(frozen=True)
class LCResult:
    win_rate: float  # raw, 100 * mean p
    lc_win_rate: float  # 100 * mean sigmoid(theta [+ psi * difficulty])
    lc_standard_error: float  # bootstrap over instructions
    theta: float
    phi: float  # the length effect
    psi: float | None
    n: int
    std_dlen: float
    l1: float = 0.0  # the penalty cross-validation chose
    converged: bool = True
    warnings: tuple[str, ...] = ()


def lc_win_rate(
    p: np.ndarray,
    dlen: np.ndarray,
    difficulty: np.ndarray | None = None,
    *,
    l2: float = 0.0,
    cv: bool = False,
    n_boot: int = 200,
    seed: int = 0,
) -> LCResult:
    """Raw and length-controlled win rate of a model over a baseline.

    ``p``: P(model beats baseline) per instruction; ``dlen``: len(baseline) - len(model).
    With ``cv`` the length (and difficulty) coefficients get an L1 penalty chosen
    by 5-fold cross-validation over instructions: a length term that does not
    predict held-out preferences is dropped instead of extrapolated.  Warnings:
    the fit did not converge; LC is an extrapolation (every length difference has
    the same sign, so no row is near dlen = 0); LC moved extremely (alpaca_eval's rule).
    """
    p = np.asarray(p, dtype=np.float64)
    dlen = np.asarray(dlen, dtype=np.float64)
    diff = None if difficulty is None else np.asarray(difficulty, dtype=np.float64)

    def design(ix: np.ndarray) -> np.ndarray:
        f, _ = length_feature(dlen[ix], sd)
        return np.column_stack([f] if diff is None else [f, diff[ix]])

    def lc_of(coef: np.ndarray, ix: np.ndarray) -> float:
        base = coef[0] + (0.0 if diff is None else coef[2] * diff[ix])
        return float(100 * np.mean(sigmoid(base)))

    _, sd = length_feature(dlen)
    all_ix = np.arange(len(p))
    lam = 0.0
    if cv:
        res, lam = fit_logistic_cv(design(all_ix), p)
    else:
        res = fit_logistic(*soft_rows(p, design(all_ix)), l2=l2)
    lc = lc_of(res.coef, all_ix)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        ix = rng.integers(0, len(p), len(p))
        boots.append(lc_of(fit_logistic(*soft_rows(p[ix], design(ix)), l2=l2, l1=lam).coef, ix))
    raw = float(100 * p.mean())
    warns = []
    if not res.converged:
        warns.append("the GLM fit did not converge (saturated or separable preferences): LC is unreliable")
    if len(dlen) and (np.all(dlen > 0) or np.all(dlen < 0)) and abs(res.coef[1]) > 1e-6:
        warns.append("every output is " + ("shorter" if np.all(dlen > 0) else "longer") + " than the baseline's: LC extrapolates to a length difference no instruction has")
    if extreme_change(raw, lc):
        warns.append(f"LC ({lc:.1f}) is very different from the raw win rate ({raw:.1f}): the GLM may have failed")
    return LCResult(
        win_rate=raw,
        lc_win_rate=lc,
        lc_standard_error=float(np.std(boots, ddof=1)) if len(boots) > 1 else float("nan"),
        theta=float(res.coef[0]),
        phi=float(res.coef[1]),
        psi=None if diff is None else float(res.coef[2]),
        n=len(p),
        std_dlen=sd,
        l1=lam,
        converged=res.converged,
        warnings=tuple(warns),
    )


@dataclass(frozen=True)
class LengthControl:
    """Length-debiased labels, on the margin's own scale: what would the preference
    be at equal length?

    The density ratio is a sum over tokens, so its length bias is linear in the
    token difference: fit ``margin_ab = slope * (tokens_a - tokens_b) + rest`` by
    least squares through the origin (the order of a and b is arbitrary, so no
    intercept), and remove the length term: ``lc_margin = margin_ab - slope * dtokens``.
    Why not AlpacaEval's GLM on soft labels ``sigmoid(margin / tau)``: with margins
    of tens of nats those are 0 or 1, the logistic fit has nothing to fit, and its
    length term moves no label (measured: LC changed no accuracy).  The fit needs
    no labels and no temperature.  ``r2``: the share of the margins' spread that
    length explains.
    """

    slope: float  # nats per token of difference
    r2: float

    def adjust(self, margin_ab: float, dtokens: float) -> float:
        return margin_ab - self.slope * dtokens


def fit_length_control(margin_ab: np.ndarray, dtokens: np.ndarray) -> LengthControl:
    from .rules import length_slope

    m = np.asarray(margin_ab, dtype=np.float64)
    d = np.asarray(dtokens, dtype=np.float64)
    slope = length_slope(m, d)
    ss = float(np.sum(m**2))
    return LengthControl(slope=slope, r2=1 - float(np.sum((m - slope * d) ** 2)) / ss if ss else 0.0)


def fit_tau(margin_chosen_minus_rejected: np.ndarray) -> float:
    """Temperature so that P(chosen) = sigmoid(margin / tau) fits labelled pairs (MLE, no intercept)."""
    m = np.asarray(margin_chosen_minus_rejected, dtype=np.float64)
    # logistic regression of y=1 on m through the origin: slope = 1/tau
    a = 0.0
    for _ in range(100):
        p = sigmoid(a * m)
        g = np.sum((p - 1.0) * m)
        h = np.sum(p * (1 - p) * m * m) + 1e-12
        step = g / h
        a -= step
        if abs(step) < 1e-12:
            break
    if a <= 0:
        raise ValueError("margins do not favour the chosen responses: no positive temperature fits")
    return 1.0 / a


# --------------------------------------------------------------------------
# Length-debiased labels for an annotate output (two streaming passes).
# --------------------------------------------------------------------------


def _pair_view(obj: Any, line: int) -> tuple[float, float] | None:
    """(margin_ab, dtokens) for a 2-response record: a = first response, b = second;
    the margin of the rule the output was labelled with (``value``; ``reward`` in
    outputs of older versions), tokens of the strong model."""
    sc = obj.get("scores") if isinstance(obj, dict) else None
    if not isinstance(sc, list) or len(sc) != 2:
        return None
    try:
        a, b = sc
        key = "value" if "value" in a and "value" in b else "reward"
        return float(a[key]) - float(b[key]), float(a["strong_tokens"]) - float(b["strong_tokens"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"line {line}: scores need value (or reward) and strong_tokens (is this an annotate output?)") from None


def length_control_file(src: str, dst: str, tau: float | None = None) -> tuple[LengthControl, int, int]:
    """Fit the run's margins against their token differences and write each record with
    ``lc_margin`` (first minus second response, length term removed), ``lc_label``,
    and, with a temperature, ``prob`` / ``lc_prob`` (P(first preferred), raw and at
    equal length).  Returns the fit, the records adjusted and how many labels changed."""
    import orjson

    margins, dtoks = [], []
    with open(src, "rb") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                v = _pair_view(orjson.loads(line), i)
                if v is not None:
                    margins.append(v[0])
                    dtoks.append(v[1])
    if len(margins) < 3:
        raise ValueError("length control needs at least 3 records with exactly two responses")
    lc = fit_length_control(np.array(margins), np.array(dtoks))
    n = changed = 0
    with open(src, "rb") as f, atomic_writer(Path(dst)) as g:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = orjson.loads(line)
            v = _pair_view(obj, i)
            if v is not None:
                m_ab, d = v
                lm = lc.adjust(m_ab, d)
                names = [s["response"] for s in obj["scores"]]
                if tau is not None:
                    obj["prob"] = float(sigmoid(m_ab / tau))
                    obj["lc_prob"] = float(sigmoid(lm / tau))
                obj["lc_margin"] = lm
                obj["lc_label"] = "tie" if lm == 0 else (names[0] if lm > 0 else names[1])
                changed += int((m_ab > 0) != (lm > 0) and m_ab != 0)
                n += 1
            g.write(orjson.dumps(obj) + b"\n")
    return lc, n, changed
