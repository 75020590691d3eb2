"""Calibration: a confidence that means something, and the parameters rules need.

A calibration belongs to a pair (its models, by sha256) and holds:

* ``params``: the label-free rule parameters of :func:`rules.estimate`
  (per-token offsets, length slope) measured on the calibration sample, so a
  streaming ``annotate`` knows them before its first record;
* ``rule``: the rule the pair labels with by default;
* ``confidence``: per rule, ``P(label right) = sigmoid(a + b * |z|)``, where
  ``z`` is the rule's margin divided by how its noise grows with length
  (``Rule.z``).  Why not the raw margin: with small models the summed margin
  is mostly length, so its size ranks the *worst* labels first.  ``b >= 0``
  (a confidence never falls as the evidence grows; if the fit wants ``b < 0``
  the confidence is the constant accuracy).  The fit weighs the two length
  strata (chosen longer, chosen shorter) equally, so the probabilities do
  not inherit the calibration sample's length mix;
* ``z_quantiles``: per rule, the |z| percentiles of the calibration sample,
  so ``--keep-top Q`` is a threshold fixed before the run (streaming, and
  the same on resume);
* ``tau``: per rule, the temperature of ``P(A preferred) = sigmoid(margin / tau)``
  for win rates.

``cdr eval --calibrate`` fits one on labelled pairs and writes
``OUT.calibration.json``; shipped pairs carry one fitted on the dev pairs
(``cdr_local/calibrations/PAIR.json``).  Without one, confidence is the
documented default ``sigmoid(|z|)`` and outputs say it is uncalibrated.
Pure numpy, no models.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .errors import CdrError

FORMAT = "cdr-local calibration 1"
#: without a calibration: P(right) = sigmoid(DEFAULT_A + DEFAULT_B * |z|)
DEFAULT_A, DEFAULT_B = 0.0, 1.0


@dataclass(frozen=True)
class Confidence:
    """``P(label right) = sigmoid(a + b * |z|)``."""

    a: float = DEFAULT_A
    b: float = DEFAULT_B
    calibrated: bool = False

    def __call__(self, z: float) -> float:
        return float(1.0 / (1.0 + math.exp(-(self.a + self.b * abs(z)))))


@dataclass
class Calibration:
    pair: str
    models: dict[str, Any]
    rule: str
    params: dict[str, float]
    confidence: dict[str, dict[str, float]] = field(default_factory=dict)
    z_quantiles: dict[str, list[float]] = field(default_factory=dict)
    tau: dict[str, float | None] = field(default_factory=dict)
    fitted_on: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def confidence_for(self, rule: str) -> Confidence:
        c = self.confidence.get(rule)
        return Confidence(float(c["a"]), float(c["b"]), True) if c else Confidence()

    def z_threshold(self, rule: str, keep_top: float) -> float:
        """The |z| above which the top ``keep_top`` share of the calibration sample lies."""
        q = self.z_quantiles.get(rule)
        if not q:
            raise CdrError(f"--keep-top needs a calibration with rule {rule} ({self.path or 'none'} has none)")
        return float(np.interp(100 * (1 - keep_top), np.linspace(0, 100, len(q)), q))

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "path"}
        return {"format": FORMAT, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any], path: str | None = None) -> Calibration:
        if d.get("format") != FORMAT:
            raise CdrError(f"{path or 'calibration'}: not a cdr-local calibration (format {d.get('format')!r})")
        try:
            return cls(**{k: v for k, v in d.items() if k != "format"}, path=path)
        except TypeError as e:
            raise CdrError(f"{path or 'calibration'}: malformed calibration ({e})") from None


def load(path: str | Path) -> Calibration:
    p = Path(path)
    try:
        d = orjson.loads(p.read_bytes())
    except OSError as e:
        raise CdrError(f"cannot read calibration {p}: {e.strerror or e}") from None
    except orjson.JSONDecodeError as e:
        raise CdrError(f"{p}: calibration is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CdrError(f"{p}: calibration is not a JSON object")
    return Calibration.from_json(d, str(p))


def shipped(pair: str) -> Calibration | None:
    """The calibration shipped for a pair of the shipped registry, if any."""
    try:
        res = importlib.resources.files("cdr_local").joinpath("calibrations", f"{pair}.json")
        if res.is_file():
            return Calibration.from_json(orjson.loads(res.read_bytes()), f"cdr_local/calibrations/{pair}.json")
    except (ModuleNotFoundError, OSError):  # pragma: no cover
        pass
    return None


def model_identity(spec: Any) -> dict[str, Any]:
    """What a calibration is tied to for one side: the model's name, registry sha256 and conversion."""
    return {"model": spec.name, "sha256": spec.sha256, "convert": spec.convert}


def pair_identity(registry: Any, pair: str | None) -> dict[str, Any]:
    """Both sides' :func:`model_identity`, from the registry alone (no model is loaded)."""
    strong, weak = registry.pair_models(pair)
    return {"strong": model_identity(strong), "weak": model_identity(weak)}


def resolve(registry: Any, pair: str | None, path: str | Path | None) -> Calibration | None:
    """The calibration a run uses: ``path`` (refused if fitted on other models), else
    the one shipped for this pair if it was fitted on these very models, else None.
    Needs only the registry, so a wrong file fails before any model loads."""
    ident = pair_identity(registry, pair)
    name = registry.pair(pair).name
    if path is not None:
        cal = load(path)
        why = matches(cal, ident)
        if why:
            raise CdrError(f"calibration {path} does not fit pair {name}: {why}")
        return cal
    found = shipped(name)
    if found is not None and matches(found, ident) is None:
        return found
    return None


def abstain_rule(cal: Calibration | None, rule: str, min_confidence: float | None, keep_top: float | None) -> dict[str, float] | None:
    """The thresholds of ``--min-confidence P`` and ``--keep-top Q`` (None: keep everything).

    ``--keep-top Q`` keeps records whose |margin_z| is at or above the calibration
    sample's (1 - Q) quantile: a threshold fixed before the run, so it streams and
    resumes; on data like the calibration sample about a share Q is kept."""
    if min_confidence is None and keep_top is None:
        return None
    out: dict[str, float] = {}
    if min_confidence is not None:
        if not 0 <= min_confidence < 1:
            raise CdrError("--min-confidence is a probability in [0, 1)")
        out["min_confidence"] = float(min_confidence)
    if keep_top is not None:
        if not 0 < keep_top <= 1:
            raise CdrError("--keep-top is a share in (0, 1]")
        if cal is None:
            raise CdrError("--keep-top needs a calibration (its sample fixes the threshold): cdr eval --calibrate, then --calibration FILE")
        out["min_abs_z"] = cal.z_threshold(rule, keep_top)
        out["keep_top"] = float(keep_top)
    return out


def abstainer(rule: dict[str, float] | None) -> Callable[[dict[str, Any]], str | None] | None:
    """The pipeline's abstain hook for :func:`abstain_rule`'s thresholds."""
    if not rule:
        return None
    min_c = rule.get("min_confidence")
    min_z = rule.get("min_abs_z")

    def why(obj: dict[str, Any]) -> str | None:
        if "confidence" not in obj:  # a single response: nothing to be unsure about
            return None
        if min_c is not None and float(obj["confidence"]) < min_c:
            return f"confidence {float(obj['confidence']):.3f} below --min-confidence {min_c:g}"
        if min_z is not None and abs(float(obj.get("margin_z", 0.0))) < min_z:
            return f"|margin_z| {abs(float(obj.get('margin_z', 0.0))):.3f} below the --keep-top {rule['keep_top']:g} threshold {min_z:.3f}"
        return None

    return why


def matches(cal: Calibration, models: dict[str, Any]) -> str | None:
    """None if ``cal`` was fitted on these models, else why not (one line)."""
    for role in ("strong", "weak"):
        want, got = cal.models.get(role) or {}, models.get(role) or {}
        if want.get("sha256") and got.get("sha256") and want.get("sha256") != got.get("sha256"):
            return f"its {role} model {want.get('model')} has another sha256"
        if want.get("model") != got.get("model") and not (want.get("sha256") and want.get("sha256") == got.get("sha256")):
            return f"it was fitted with {role} model {want.get('model')}, not {got.get('model')}"
        if want.get("convert") != got.get("convert"):
            return f"its {role} model ran as {want.get('convert') or 'as pulled'}, not {got.get('convert') or 'as pulled'}"
    return None


# ---------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------


def _balanced_weights(longer: np.ndarray) -> np.ndarray:
    """Weights giving the chosen-longer and chosen-shorter pairs equal total weight
    (same-length pairs weigh 1), normalised to mean 1."""
    w = np.ones(len(longer))
    nl, ns = int(longer.sum()), int((~longer).sum())
    if nl and ns:
        w[longer] = len(longer) / (2 * nl)
        w[~longer] = len(longer) / (2 * ns)
    return w / w.mean()


def fit_confidence(z: np.ndarray, right: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """(a, b) of ``P(right) = sigmoid(a + b |z|)`` by weighted maximum likelihood, b >= 0."""
    from .lc import fit_logistic

    x = np.abs(np.asarray(z, dtype=np.float64))
    y = np.asarray(right, dtype=np.float64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    fit = fit_logistic(x[:, None], y, w, l2=1e-6)
    a, b = float(fit.coef[0]), float(fit.coef[1])
    if not (np.isfinite(a) and np.isfinite(b)) or b < 0:
        p = float(np.clip(np.average(y, weights=w), 1e-6, 1 - 1e-6))
        a, b = math.log(p / (1 - p)), 0.0
    return a, b


def reliability(prob: np.ndarray, right: np.ndarray, bins: int = 5) -> dict[str, Any]:
    """Predicted against observed accuracy in equal-count bins, and the expected calibration error."""
    order = np.argsort(prob, kind="stable")
    rows = []
    ece = 0.0
    for chunk in np.array_split(order, bins):
        if len(chunk) == 0:
            continue
        pr, ob = float(prob[chunk].mean()), float(right[chunk].mean())
        rows.append({"n": len(chunk), "predicted": pr, "observed": ob})
        ece += len(chunk) / len(prob) * abs(pr - ob)
    return {"bins": rows, "ece": ece}


def cross_fitted(z: np.ndarray, right: np.ndarray, longer: np.ndarray, folds: int = 5) -> np.ndarray:
    """Each pair's confidence from a fit on the other folds (pairs assigned by position):
    an honest calibration curve on the sample the calibration is fitted on."""
    n = len(z)
    fold = np.arange(n) % folds
    out = np.empty(n)
    for k in range(folds):
        tr, te = fold != k, fold == k
        a, b = fit_confidence(z[tr], right[tr], _balanced_weights(longer[tr]))
        out[te] = 1.0 / (1.0 + np.exp(-(a + b * np.abs(z[te]))))
    return out


def fit(pairs: list[Any], params: dict[str, float], *, pair: str, models: dict[str, Any], rule: str,
        fitted_on: dict[str, Any]) -> Calibration:
    """A calibration from labelled :class:`evaluate.EvalPair` s (their ``confidence`` holds each rule's |z|)."""
    from .lc import fit_tau

    if len(pairs) < 10:
        raise CdrError(f"a calibration needs at least 10 labelled pairs, got {len(pairs)}")
    longer = np.array([p.chars[0] > p.chars[1] for p in pairs])
    w = _balanced_weights(longer)
    cal = Calibration(pair=pair, models=models, rule=rule, params=params, fitted_on=fitted_on)
    for m in pairs[0].values:
        vals = np.array([p.values[m] for p in pairs], dtype=np.float64)
        right = (vals[:, 0] > vals[:, 1]).astype(np.float64)
        z = np.array([p.confidence[m] for p in pairs])
        a, b = fit_confidence(z, right, w)
        cal.confidence[m] = {"a": a, "b": b}
        cal.z_quantiles[m] = [float(x) for x in np.percentile(np.abs(z), np.linspace(0, 100, 101))]
        try:
            cal.tau[m] = float(fit_tau(vals[:, 0] - vals[:, 1]))
        except ValueError:
            cal.tau[m] = None
        cf = cross_fitted(z, right, longer)
        cal.quality[m] = {"cross_fitted": reliability(cf, right), "accuracy": float(right.mean())}
    return cal
