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
* ``answer``: the CDR authors' router (their ``scripts/domain_annotate.py``): the
  strong model *generates* an answer (greedy) to a fixed prompt -- the profile's
  ``router_prompt`` (``cdr-paper`` ships the authors' text), else one built from
  the domains in the same shape -- that asks for the category between ``[START]``
  and ``[END]``.  As there: the generation is cut at the first ``User`` or
  ``Assistant`` (the authors' stop strings), the text between the tags, stripped,
  must be exactly a domain name, and anything else (no tags, another word, a
  conversation too long for the context) falls back to the default domain.  The
  model reads the prompt as a system message, then the record's conversation
  without its own system message.
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

ROUTERS = ("model", "answer", "keywords", "none")
MAX_ROUTER_CHARS = 2000  # the start of the prompt is enough to classify it
ANSWER_START, ANSWER_END = "[START]", "[END]"
ANSWER_STOPS = ("User", "Assistant")  # the authors' vLLM stop strings
ANSWER_MAX_TOKENS = 32  # "[START] REASONING [END]" and some slack; greedy, so no more is needed


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


def answer_prompt(profile: Profile) -> str:
    """The answer router's system prompt: the profile's ``router_prompt``, else the
    authors' layout filled with the profile's domains and descriptions."""
    if profile.router_prompt:
        return profile.router_prompt
    names = list(profile.domains)
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", or " + names[-1]
    lines = "\n".join(f"    \u2022 {d.name}: {d.description}" for d in profile.domains.values())
    return (
        f"\nYour task is to classify the last user question into one of the following categories: {listed}.\n"
        f"Here are the definitions for each category:\n{lines}\n"
        f"Output one of {listed} categories. \n"
        f"Wrap your output in {ANSWER_START} and {ANSWER_END}.\n"
    )


def answer_messages(profile: Profile, messages: Sequence[Message]) -> list[Message]:
    """What the answer router reads: its prompt as the system message, then the
    record's conversation without its own system message."""
    return [Message("system", answer_prompt(profile)), *(m for m in messages if m.role != "system")]


def parse_answer(text: str, labels: Sequence[str], default: str) -> str:
    """The domain in a generated answer, as the authors parse it (``extract_domain_class``):
    the text between the first ``[START]`` and the next ``[END]``, stripped, if it is
    exactly one of ``labels``; otherwise ``default``.  The text is first cut at the
    first stop string, as vLLM's ``stop`` would have."""
    for stop in ANSWER_STOPS:
        text = text.split(stop, 1)[0]
    if ANSWER_START not in text or ANSWER_END not in text:
        return default
    label = text.split(ANSWER_START)[1].split(ANSWER_END)[0].strip()
    return label if label in labels else default


class AnswerRouter:
    name = "answer"

    def __init__(self, profile: Profile, side: ChatSide, max_tokens: int = ANSWER_MAX_TOKENS) -> None:
        self.profile = profile
        self.side = side
        self.max_tokens = max_tokens
        self.labels = list(profile.domains)

    def answer(self, messages: Sequence[Message]) -> str:
        """The model's greedy answer to the router prompt ("" when the conversation leaves no room)."""
        m = self.side.model
        ctx = self.side.context_tokens(answer_messages(self.profile, messages))
        room = m.n_ctx - len(ctx) - 1
        if room < 1:
            return ""
        toks = m.generate(tuple(ctx), max_tokens=min(self.max_tokens, room), temperature=0.0, seed=0)
        body = toks[:-1] if toks and m.is_eog(toks[-1]) else toks
        return m.detokenize(body)

    def route(self, messages: Sequence[Message]) -> str:
        return parse_answer(self.answer(messages), self.labels, self.profile.default_domain)


Router = AnswerRouter | KeywordRouter | ModelRouter | NoneRouter
