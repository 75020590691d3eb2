"""The density-ratio methods (``cdr``, ``strong``): one pass of both models over each response.

Each model scores each response under its own template and system prompt
(:meth:`pair.LoadedPair.score`); a scoring rule (:mod:`cdr_local.rules`) turns the
sums into values.  ``cdr`` labels with a density-ratio rule (``--rule``, else
the calibration's, else ``cdr-sum``: CDR as published), ``strong`` with the
strong model alone (``strong-sum``, or ``--rule strong-mean``).  The pass
measures both models either way, so ``cdr eval`` reports every rule from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CdrError
from . import Scored

if TYPE_CHECKING:
    from ..calibration import Calibration
    from ..chat import Message
    from ..pair import LoadedPair
    from ..records import Record
    from ..reward import ResponseScore

STRONG_RULES = ("strong-sum", "strong-mean")


def rule_for(method: str, rule: str | None, calibration: Calibration | None) -> Any:
    """The rule a density method labels with (a :class:`rules.RuleSpec`)."""
    from ..rules import DEFAULT_RULE, parse_rule

    params = calibration.params if calibration else None
    if method == "strong":
        if rule is not None and rule.partition(":")[0] not in STRONG_RULES:
            raise CdrError(f"--method strong labels with {' or '.join(STRONG_RULES)}, not --rule {rule} (use --method cdr)")
        return parse_rule(rule or STRONG_RULES[0], params)
    return parse_rule(rule or (calibration.rule if calibration else DEFAULT_RULE), params)


def response_fields(s: ResponseScore) -> dict[str, Any]:
    """The numbers of one response's pass, as an output's ``scores`` entry holds them."""
    return {
        "reward": s.reward,
        "reward_mean": s.reward_mean,
        "strong_logprob": s.strong.logprob,
        "strong_tokens": s.strong.n_tokens,
        "weak_logprob": s.weak.logprob,
        "weak_tokens": s.weak.n_tokens,
    }


def scored(method: str, rule: Any, scores: Sequence[ResponseScore], chars: Sequence[int], *,
           token_logprobs: bool = False) -> Scored:
    """A :class:`Scored` from the pass's per-response scores, labelled by ``rule``."""
    resp = [s.response(c) for s, c in zip(scores, chars, strict=True)]
    return Scored(
        method=method,
        values=rule.values(resp),
        fields=[response_fields(s) for s in scores],
        truncated=[s.truncated for s in scores],
        tokens=float(sum(s.strong.n_tokens + s.weak.n_tokens for s in scores)),
        z=lambda margin, b, w: rule.rule.z(margin, resp[b], resp[w]),
        pair_fields=lambda b, w: {"margin_mean": scores[b].reward_mean - scores[w].reward_mean},
        bulk=[{"strong_token_logprobs": list(s.strong.token_logprobs), "weak_token_logprobs": list(s.weak.token_logprobs)}
              for s in scores] if token_logprobs else [],
    )


class DensityMethod:
    """``cdr`` or ``strong`` on a loaded pair."""

    def __init__(self, pair: LoadedPair, name: str, *, rule: str | None, calibration: Calibration | None,
                 token_logprobs: bool = False) -> None:
        self.pair = pair
        self.name = name
        self.rule = rule_for(name, rule, calibration)
        self.label = self.rule.label()
        self.token_logprobs = token_logprobs

    def score(self, record: Record, messages: Sequence[Message], domain: str | None = None) -> Scored:
        scores = self.pair.score(messages, record.responses)
        return scored(self.name, self.rule, scores, [len(r) for r in record.responses], token_logprobs=self.token_logprobs)

    def metadata(self) -> dict[str, Any]:
        return {"rule": {"label": self.rule.label(), **self.rule.to_json(), "summary": self.rule.rule.summary}}

    def numerics(self) -> dict[str, Any]:
        return {"rule": self.rule.label(), "rule.params": self.rule.to_json()["params"]}
