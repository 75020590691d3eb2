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
    """Weighted logistic regression with an intercept, by Newton-Raphson (IRLS).

    Minimises  -sum_i w_i [y_i log p_i + (1-y_i) log(1-p_i)] + l2/2 ||b||^2 + l1 ||b||_1
    over b (the intercept is not penalised).  y may be soft (in [0, 1]).
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
        H += 1e-12 * np.eye(k + 1)
        step = np.linalg.solve(H, grad)
        beta = beta - step
        if np.max(np.abs(step)) < tol:
            converged = True
            break
    return LogisticFit(coef=beta, iterations=it, converged=converged)


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


def lc_win_rate(
    p: np.ndarray,
    dlen: np.ndarray,
    difficulty: np.ndarray | None = None,
    *,
    l2: float = 0.0,
    n_boot: int = 200,
    seed: int = 0,
) -> LCResult:
    """Raw and length-controlled win rate of a model over a baseline.

    ``p``: P(model beats baseline) per instruction; ``dlen``: len(baseline) - len(model).
    """
    p = np.asarray(p, dtype=np.float64)
    dlen = np.asarray(dlen, dtype=np.float64)

    def fit(ix: np.ndarray) -> tuple[float, np.ndarray]:
        f, _ = length_feature(dlen[ix], sd)
        cols = [f] if difficulty is None else [f, np.asarray(difficulty, dtype=np.float64)[ix]]
        X = np.column_stack(cols)
        res = fit_logistic(*soft_rows(p[ix], X), l2=l2)
        base = res.coef[0] + (0.0 if difficulty is None else res.coef[2] * np.asarray(difficulty)[ix])
        return float(100 * np.mean(sigmoid(base))), res.coef

    _, sd = length_feature(dlen)
    all_ix = np.arange(len(p))
    lc, coef = fit(all_ix)
    rng = np.random.default_rng(seed)
    boots = [fit(rng.integers(0, len(p), len(p)))[0] for _ in range(n_boot)] if n_boot else []
    return LCResult(
        win_rate=float(100 * p.mean()),
        lc_win_rate=lc,
        lc_standard_error=float(np.std(boots, ddof=1)) if len(boots) > 1 else float("nan"),
        theta=float(coef[0]),
        phi=float(coef[1]),
        psi=None if difficulty is None else float(coef[2]),
        n=len(p),
        std_dlen=sd,
    )


@dataclass(frozen=True)
class LengthControl:
    """Length-debiased labels: what would the preference be at equal length?

    For pairs (a, b) with annotator logit z = margin_ab / tau, fit
    P(a preferred) = sigmoid(theta + phi * tanh(dlen / std(dlen))), dlen = len(b) - len(a),
    and remove the length term: lc_margin = margin_ab - tau * phi * tanh(dlen / std).
    """

    theta: float
    phi: float
    std_dlen: float
    tau: float

    def adjust(self, margin_ab: float, dlen: float) -> float:
        f = float(np.tanh(dlen / self.std_dlen)) if self.std_dlen else 0.0
        return margin_ab - self.tau * self.phi * f


def fit_length_control(margin_ab: np.ndarray, dlen: np.ndarray, tau: float = 1.0, l2: float = 0.0) -> LengthControl:
    m = np.asarray(margin_ab, dtype=np.float64)
    f, sd = length_feature(dlen)
    res = fit_logistic(*soft_rows(sigmoid(m / tau), f[:, None]), l2=l2)
    return LengthControl(theta=float(res.coef[0]), phi=float(res.coef[1]), std_dlen=sd, tau=tau)


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
    """(margin_ab, dlen) for a 2-response record: a = first response, b = second."""
    sc = obj.get("scores") if isinstance(obj, dict) else None
    if not isinstance(sc, list) or len(sc) != 2:
        return None
    try:
        a, b = sc
        return float(a["reward"]) - float(b["reward"]), float(b["chars"]) - float(a["chars"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"line {line}: scores need reward and chars (is this an annotate output of this version?)") from None


def length_control_file(src: str, dst: str, tau: float = 1.0) -> tuple[LengthControl, int]:
    """Fit the run's margins against tanh(dlen / std(dlen)) and write each record with
    ``lc_margin`` (first minus second response, length term removed), ``lc_prob``
    (P(first preferred) at equal length), ``lc_label`` next to ``prob`` (raw)."""
    import orjson

    margins, dlens = [], []
    with open(src, "rb") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                v = _pair_view(orjson.loads(line), i)
                if v is not None:
                    margins.append(v[0])
                    dlens.append(v[1])
    if len(margins) < 3:
        raise ValueError("length control needs at least 3 records with exactly two responses")
    lc = fit_length_control(np.array(margins), np.array(dlens), tau=tau)
    n = 0
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
                obj["prob"] = float(sigmoid(m_ab / tau))
                obj["lc_margin"] = lm
                obj["lc_prob"] = float(sigmoid(lm / tau))
                obj["lc_label"] = "tie" if lm == 0 else (names[0] if lm > 0 else names[1])
                n += 1
            g.write(orjson.dumps(obj) + b"\n")
    return lc, n
