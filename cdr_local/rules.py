"""Scoring rules: from one scoring pass to a preference.  Pure numpy, no models.

One scoring pass measures, for each response, each model's summed log-prob
of it and how many tokens that sum covers (and the response's length in
characters).  A *rule* turns those numbers into a value per response; the
response with the highest value is preferred.  Every rule reads the same
numbers, so one pass scores every rule, and ``cdr eval --report-only``
compares them all on an existing output.

Why more than one rule: with small models the summed density ratio grows
with length (an instruct model assigns a positive log-ratio to almost every
assistant-style token), the per-token mean swings the other way, and the
strong model's own sum prefers short answers.  The rules below remove the
length term in different ways; ``cdr eval`` measures which works, on
length-balanced accuracy (see :mod:`evaluate`).

Some rules have parameters.  ``beta`` is a number the user picks.  The
*offsets* (the typical per-token log-prob of each model) and the *length
slope* are estimated from a run without labels (:func:`estimate`), and are
stored in a calibration (:mod:`calibration`) so that a streaming ``annotate``
knows them before its first record.

Each rule also says how its margin scales with length, so that a margin can
be read as a z-like statistic (:func:`Rule.z`): a difference of two sums over
``n_a`` and ``n_b`` noisy per-token terms has a spread that grows like
``sqrt(n_a + n_b)``; a difference of two means shrinks like
``sqrt(1/n_a + 1/n_b)``.  The confidence model (:mod:`calibration`) reads
this statistic, not the raw margin, whose size mostly measures length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import CdrError


@dataclass(frozen=True)
class Response:
    """What the scoring pass measured for one response (a ``scores`` entry of an output)."""

    strong_logprob: float
    strong_tokens: int
    weak_logprob: float
    weak_tokens: int
    chars: int

    @classmethod
    def from_score(cls, d: Mapping[str, Any]) -> Response:
        return cls(float(d["strong_logprob"]), int(d["strong_tokens"]), float(d["weak_logprob"]), int(d["weak_tokens"]), int(d["chars"]))

    @property
    def ratio(self) -> float:
        return self.strong_logprob - self.weak_logprob


Params = Mapping[str, float]


@dataclass(frozen=True)
class Rule:
    """A named rule: ``value(response, params)``; higher is preferred."""

    name: str
    summary: str
    value: Callable[[Response, Params], float]
    scale: str = "sum"  # how the margin's spread grows with length: "sum", "mean" or "none"
    params: tuple[str, ...] = ()  # parameters it reads (see DEFAULTS and estimate())
    density_ratio: bool = False  # a CDR rule (uses the weak model with a positive weight)

    def values(self, responses: Sequence[Response], params: Params) -> list[float]:
        return [self.value(r, params) for r in responses]

    def z(self, margin: float, a: Response, b: Response) -> float:
        """The margin between ``a`` and ``b`` divided by how its noise grows with their lengths."""
        na, nb = max(1, a.strong_tokens), max(1, b.strong_tokens)
        if self.scale == "sum":
            return margin / math.sqrt(na + nb)
        if self.scale == "mean":
            return margin / math.sqrt(1.0 / na + 1.0 / nb)
        return margin


def _need(params: Params, key: str, rule: str) -> float:
    try:
        return float(params[key])
    except KeyError:
        raise CdrError(
            f"rule {rule} needs {key}: it comes from a calibration (cdr eval --calibrate), "
            f"or give it: --rule {rule}:{key}=VALUE"
        ) from None


#: Parameters with a fixed default (the user may override them: ``--rule cdr-beta:beta=0.5``).
DEFAULTS: dict[str, float] = {"beta": 0.5}


def _offset(r: Response, p: Params) -> float:
    return (r.strong_logprob - _need(p, "strong_offset", "cdr-offset") * r.strong_tokens) - (
        r.weak_logprob - _need(p, "weak_offset", "cdr-offset") * r.weak_tokens
    )


def _lc(r: Response, p: Params) -> float:
    return r.ratio - _need(p, "length_slope", "cdr-lc") * r.strong_tokens


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("cdr-sum", "log p_strong(y|x) - log p_weak(y|x), summed over the response's tokens (CDR as published)",
             lambda r, p: r.ratio, "sum", density_ratio=True),
        Rule("cdr-mean", "the density ratio per token: each model's sum divided by its own token count",
             lambda r, p: r.strong_logprob / max(1, r.strong_tokens) - r.weak_logprob / max(1, r.weak_tokens), "mean",
             density_ratio=True),
        Rule("cdr-offset", "the summed ratio with each model's typical per-token log-prob removed "
             "(offsets estimated from the run, without labels)", _offset, "sum", ("strong_offset", "weak_offset"),
             density_ratio=True),
        Rule("cdr-lc", "the summed ratio minus the part the length predicts: slope of margin on token difference, "
             "fitted over the run's pairs without labels", _lc, "sum", ("length_slope",), density_ratio=True),
        Rule("cdr-beta", "log p_strong - beta * log p_weak, summed (0 < beta < 1 weighs the weak model down)",
             lambda r, p: r.strong_logprob - _need(p, "beta", "cdr-beta") * r.weak_logprob, "sum", ("beta",),
             density_ratio=True),
        Rule("cdr-beta-mean", "log p_strong - beta * log p_weak, each per token (the mean form of cdr-beta)",
             lambda r, p: r.strong_logprob / max(1, r.strong_tokens) - _need(p, "beta", "cdr-beta-mean") * r.weak_logprob / max(1, r.weak_tokens),
             "mean", ("beta",), density_ratio=True),
        Rule("strong-sum", "the strong model's log-likelihood alone, summed", lambda r, p: r.strong_logprob, "sum"),
        Rule("strong-mean", "the strong model's log-likelihood alone, per token",
             lambda r, p: r.strong_logprob / max(1, r.strong_tokens), "mean"),
        Rule("weak-sum", "the weak model's log-likelihood alone, summed", lambda r, p: r.weak_logprob, "sum"),
        Rule("weak-mean", "the weak model's log-likelihood alone, per token",
             lambda r, p: r.weak_logprob / max(1, r.weak_tokens), "mean"),
        Rule("longer", "baseline: the longer response (characters) wins", lambda r, p: float(r.chars), "none"),
        Rule("shorter", "baseline: the shorter response (characters) wins", lambda r, p: -float(r.chars), "none"),
    )
}

#: The rule used when none is given and no calibration names one: CDR as published.
DEFAULT_RULE = "cdr-sum"


@dataclass(frozen=True)
class RuleSpec:
    """A rule with its parameters: what ``--rule NAME[:key=value,...]`` names."""

    rule: Rule
    params: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.rule.name

    def label(self) -> str:
        """The rule as written on the command line, with the parameters a user picks
        (``cdr-beta:beta=0.5``); estimated parameters (offsets, slope) are not part of it."""
        own = {k: v for k, v in self.params.items() if k in self.rule.params and k in DEFAULTS}
        return self.rule.name + (":" + ",".join(f"{k}={v:g}" for k, v in sorted(own.items())) if own else "")

    def values(self, responses: Sequence[Response]) -> list[float]:
        return self.rule.values(responses, self.params)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.rule.name, "params": {k: self.params[k] for k in self.rule.params if k in self.params}}


def parse_rule(text: str, params: Params | None = None) -> RuleSpec:
    """``NAME`` or ``NAME:key=value,key=value``; ``params`` (e.g. from a calibration)
    fill what the text does not give, then DEFAULTS."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in RULES:
        raise CdrError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")
    rule = RULES[name]
    given: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or k not in rule.params:
            raise CdrError(f"rule {name}: bad parameter {item!r}" + (f" (it takes {', '.join(rule.params)})" if rule.params else " (it takes none)"))
        try:
            x = float(v)
        except ValueError:
            raise CdrError(f"rule {name}: {k} must be a number, got {v!r}") from None
        if not math.isfinite(x):
            raise CdrError(f"rule {name}: {k} must be finite")
        given[k] = x
    merged = {**{k: DEFAULTS[k] for k in rule.params if k in DEFAULTS}, **dict(params or {}), **given}
    if "beta" in rule.params and not 0 < merged.get("beta", 1.0) <= 1:
        raise CdrError(f"rule {name}: beta must be in (0, 1] (beta = 0 is the strong model alone: rule strong-sum)")
    return RuleSpec(rule, {k: float(v) for k, v in merged.items()})


def length_slope(margins: Any, dtokens: Any) -> float:
    """Least squares through the origin of margins on token differences: the margin
    that length alone predicts, per token (0 if no pair differs in length)."""
    import numpy as np

    m = np.asarray(margins, dtype=np.float64)
    d = np.asarray(dtokens, dtype=np.float64)
    sxx = float(np.dot(d, d))
    return float(np.dot(d, m)) / sxx if sxx else 0.0


def estimate(records: Iterable[Sequence[Response]]) -> dict[str, float]:
    """The label-free parameters of a run: each model's per-token log-prob over all
    its responses (pooled: total log-prob over total tokens), and the length slope
    (least squares, through the origin, of each pair's ratio margin on its
    strong-token difference: the margin length alone predicts)."""
    s_lp = s_n = w_lp = w_n = 0.0
    ms: list[float] = []
    ds: list[float] = []
    for rs in records:
        for r in rs:
            s_lp += r.strong_logprob
            s_n += r.strong_tokens
            w_lp += r.weak_logprob
            w_n += r.weak_tokens
        for i in range(len(rs)):
            for j in range(i + 1, len(rs)):
                ds.append(rs[i].strong_tokens - rs[j].strong_tokens)
                ms.append(rs[i].ratio - rs[j].ratio)
    if s_n == 0 or w_n == 0:
        raise CdrError("no scored responses to estimate the rule parameters from")
    return {"strong_offset": s_lp / s_n, "weak_offset": w_lp / w_n, "length_slope": length_slope(ms, ds)}
