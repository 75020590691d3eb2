"""Routers: which profile domain a prompt belongs to.

* ``model`` (default when the profile has several domains): zero-shot with the
  strong model.  One classification prompt lists the domains with their
  descriptions; each domain's name is scored as the assistant's complete
  answer (its tokens plus end-of-turn) and the most likely one wins.  One
  short decode per prompt (the label continuations share it), no sampling.
  ``calibrate=True`` subtracts each label's score on a content-free request
  (contextual calibration, Zhao et al. 2021); measured on dev prompts with
  SmolLM2-135M it routed worse (19/60 vs 26/60), so it is off by default
  (benchmarks/route_accuracy.py).
* ``keywords``: counts the domain's keywords in the prompt (whole words,
  case-insensitive); most hits wins, ties go to the default domain.
* ``none``: always the default domain.

A record's own ``domain`` field overrides any router.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .chat import Message
from .profiles import Profile

if TYPE_CHECKING:
    from .scoring import ChatSide

ROUTERS = ("model", "keywords", "none")
MAX_ROUTER_CHARS = 2000  # the start of the prompt is enough to classify it


def prompt_text(messages: Sequence[Message]) -> str:
    """The user-visible request: the conversation's user turns, last one last."""
    return "\n\n".join(m.content for m in messages if m.role == "user")


class NoneRouter:
    name = "none"

    def __init__(self, profile: Profile) -> None:
        self.profile = profile

    def route(self, messages: Sequence[Message]) -> str:
        return self.profile.default_domain


class KeywordRouter:
    name = "keywords"

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._patterns = {
            d.name: [re.compile(r"(?<!\w)" + re.escape(k) + r"(?!\w)", re.IGNORECASE) for k in d.keywords]
            for d in profile.domains.values()
        }

    def route(self, messages: Sequence[Message]) -> str:
        text = prompt_text(messages)
        hits = {name: sum(len(p.findall(text)) for p in pats) for name, pats in self._patterns.items()}
        best = max(hits.values(), default=0)
        winners = [n for n, h in hits.items() if h == best]
        if best == 0 or len(winners) > 1:
            return self.profile.default_domain
        return winners[0]


def classification_messages(profile: Profile, messages: Sequence[Message]) -> list[Message]:
    """The router's prompt (documented; both its wording and its labels are fixed)."""
    lines = "\n".join(f"- {d.name}: {d.description}" for d in profile.domains.values())
    system = (
        "Classify the user's request into exactly one category.\n\n"
        f"Categories:\n{lines}\n\n"
        "Answer with the category name only."
    )
    text = prompt_text(messages)
    if len(text) > MAX_ROUTER_CHARS:
        text = text[:MAX_ROUTER_CHARS] + " ..."
    return [Message("system", system), Message("user", f"Request:\n{text}")]


class ModelRouter:
    name = "model"

    def __init__(self, profile: Profile, side: ChatSide, calibrate: bool = False) -> None:
        self.profile = profile
        self.side = side
        self.labels = list(profile.domains)
        self.prior = self._raw([Message("user", "N/A")]) if calibrate else dict.fromkeys(self.labels, 0.0)

    def _raw(self, messages: Sequence[Message]) -> dict[str, float]:
        s = self.side.score(classification_messages(self.profile, messages), self.labels)
        return {label: x.logprob for label, x in zip(self.labels, s, strict=True)}

    def scores(self, messages: Sequence[Message]) -> dict[str, float]:
        """Calibrated log-likelihood of each domain label as the whole answer."""
        raw = self._raw(messages)
        return {label: raw[label] - self.prior[label] for label in self.labels}

    def route(self, messages: Sequence[Message]) -> str:
        sc = self.scores(messages)
        return max(self.labels, key=lambda label: (sc[label], label == self.profile.default_domain))
