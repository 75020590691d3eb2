"""The CDR reward and per-record judgement.  Pure functions, no models.

reward(x, y)      = log p_strong(y | x) - log p_weak(y | x)              (sum over tokens)
reward_mean(x, y) = log p_strong(y | x) / n_strong - log p_weak(y | x) / n_weak

Each model counts tokens with its own tokenizer, so the mean variant divides
each side by its own count.  The record's winner is the response with the
highest (sum) reward; a tie (equal rewards, e.g. identical responses) has no
winner and margin 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .rules import Response
from .scoring import SideScore


@dataclass(frozen=True)
class ResponseScore:
    strong: SideScore
    weak: SideScore

    @property
    def reward(self) -> float:
        return self.strong.logprob - self.weak.logprob

    @property
    def reward_mean(self) -> float:
        return self.strong.logprob / self.strong.n_tokens - self.weak.logprob / self.weak.n_tokens

    @property
    def truncated(self) -> bool:
        return self.strong.truncated or self.weak.truncated

    def response(self, chars: int) -> Response:
        """The numbers a rule reads (:class:`rules.Response`)."""
        return Response(self.strong.logprob, self.strong.n_tokens, self.weak.logprob, self.weak.n_tokens, chars)


@dataclass(frozen=True)
class Judgement:
    best: int  # index of the chosen response (first one on a tie)
    worst: int  # index of the rejected response
    tie: bool
    margin: float  # reward[best] - reward[worst] >= 0
    margin_mean: float  # reward_mean[best] - reward_mean[worst] (same two responses)


def pick(values: Sequence[float]) -> tuple[int, int, bool]:
    """(best, worst, tie) by ``values``; ties keep input order (a tie of two or more
    responses is best 0, worst 1)."""
    if not values:
        raise ValueError("no scores")
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    worst = min(range(len(values)), key=lambda i: (values[i], i))
    tie = values[best] == values[worst]
    if tie and len(values) > 1:
        best, worst = 0, 1
    return best, worst, tie


def judge(scores: Sequence[ResponseScore], values: Sequence[float] | None = None) -> Judgement:
    """Best vs worst by ``values`` (a rule's, see :mod:`rules`; default the summed
    reward); ties keep input order.  ``margin`` is in the values' units."""
    if not scores:
        raise ValueError("no scores")
    rewards = list(values) if values is not None else [s.reward for s in scores]
    best, worst, tie = pick(rewards)
    return Judgement(
        best=best,
        worst=worst,
        tie=tie,
        margin=rewards[best] - rewards[worst],
        margin_mean=scores[best].reward_mean - scores[worst].reward_mean,
    )
