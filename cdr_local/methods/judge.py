"""The pairwise judge (``--method judge``): the strong model reads both responses and gives a verdict.

For each pair of responses (i, j) the strong model reads the question and the
two responses, shown as assistant A and assistant B, and we read the log-prob
of its verdict: ``d = log P("A") - log P("B")`` right after the start of its
answer (no generation: the two letters are scored as continuations of the
same context, like any response).  Both orders are scored, and

    pref(i over j) = (d(i as A, j as B) - d(j as A, i as B)) / 2

cancels the judge's preference for a position (reported per record as
``judge.position_bias``, the mean of the two ``d``).  A response's value is
its mean ``pref`` over the others (for two responses: +pref and -pref).  The
margin's z-like statistic is half the margin, for two responses ``pref``
itself: the judge's own debiased log-odds, so the uncalibrated confidence
``sigmoid(|z|)`` is the judge's probability.  N responses cost N(N-1) reads.

The prompt is MT-Bench's pairwise judge prompt (FastChat ``pair-v2``,
Apache-2.0; Zheng et al. 2023), asking for the verdict letter alone.  A profile's
domain criteria, when the routed domain has them, are added to it.  The
judge runs in a context of its own, without the pair's system prompt.

Long responses are cut (their start kept, flagged ``truncated``) so that the
question and both responses fit the context window: the shorter keeps all of
itself if it fits in half the room.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..chat import Message
from . import MEASURED, Scored

if TYPE_CHECKING:
    from ..pair import LoadedPair
    from ..profiles import Profile
    from ..records import Record

JUDGE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below. You should choose the assistant that follows the user's instructions and answers "
    "the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, "
    "depth, creativity, and level of detail of their responses. Avoid any position biases and ensure that the order in "
    "which the responses were presented does not influence your decision. Do not allow the length of the responses to "
    "influence your evaluation. Do not favor certain names of the assistants. Be as objective as possible. Output only "
    'your final verdict: "A" if assistant A is better, "B" if assistant B is better.'
)
JUDGE_USER = (
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
)
CRITERIA = "\n\nJudge the answers by these criteria:\n{criteria}"
#: tokens kept free besides the prompt and the verdict (template boundaries)
SLACK = 8


def question_text(messages: Sequence[Message]) -> str:
    """The conversation the responses answer, as the judge reads it: the last user
    turn alone for a single question, else the turns labelled (and a system
    prompt the record carries, first)."""
    msgs = list(messages)
    system = [m.content for m in msgs if m.role == "system"]
    turns = [m for m in msgs if m.role != "system"]
    head = f"[System Prompt]\n{system[0]}\n\n" if system else ""
    if len(turns) == 1:
        return head + turns[0].content
    return head + "\n".join(f"{'User' if m.role == 'user' else 'Assistant'}: {m.content}" for m in turns)


def allot(lengths: list[int], total: int) -> list[int]:
    """Token counts for two responses that sum to at most ``total``: the shorter keeps
    all of itself if that is at most half, the longer the rest; else half each."""
    short = 0 if lengths[0] <= lengths[1] else 1
    if lengths[short] <= total // 2:
        out = [0, 0]
        out[short] = lengths[short]
        out[1 - short] = min(lengths[1 - short], total - lengths[short])
        return out
    return [min(lengths[0], total // 2), min(lengths[1], total - total // 2)]


class JudgeMethod:
    """The strong model of ``pair`` as a pairwise judge."""

    label = "judge"

    def __init__(self, pair: LoadedPair, *, profile: Profile) -> None:
        self.side = pair.router_side()
        self.profile = profile
        m = self.side.model
        self.letters = tuple(tuple(m.tokenize(x, add_special=False, parse_special=False)) for x in ("A", "B"))

    def _system(self, domain: str | None) -> str:
        criteria = self.profile.domain(domain).system.strip() if domain is not None else ""
        return JUDGE_SYSTEM + (CRITERIA.format(criteria=criteria) if criteria else "")

    def _fit(self, system: str, question: str, a: str, b: str, toks: tuple[Sequence[int], Sequence[int]]
             ) -> tuple[Any, list[int], list[bool]]:
        """The tokenized judge prompt for (a, b) (``toks``: their tokens, to cut them), each
        response cut at its start as needed to fit the window; returns it, the tokens each
        response kept, and whether each was cut."""
        m = self.side.model
        keep = [len(t) for t in toks]
        texts = [a, b]
        need = max(len(x) for x in self.letters) + SLACK
        for _ in range(6):
            msgs = [Message("system", system), Message("user", JUDGE_USER.format(question=question, a=texts[0], b=texts[1]))]
            over = len(self.side.context_tokens(msgs)) + need - m.n_ctx
            if over <= 0:
                return self.side.tokenize(msgs, ["A"]), keep, [k < len(t) for k, t in zip(keep, toks, strict=True)]
            if sum(keep) == 0:
                break
            keep = allot(keep, max(0, sum(keep) - over))
            texts = [m.detokenize(list(t[:k])) if k < len(t) else s for t, k, s in zip(toks, keep, (a, b), strict=True)]
        from ..pipeline import RecordError

        raise RecordError(f"the judge prompt does not fit n_ctx {m.n_ctx}, even with both responses cut")

    def score(self, record: Record, messages: Sequence[Message], domain: str | None = None) -> Scored:
        from ..engine import ScoreRequest
        from ..pipeline import RecordError

        responses = record.responses
        n = len(responses)
        if n < 2:
            raise RecordError("method judge compares responses: a record needs two or more")
        system = self._system(domain)
        question = question_text(record.messages)
        orders = [(i, j) for i in range(n) for j in range(n) if i != j]
        requests, kept = [], []
        cut = [False] * n
        toks = [self.side.model.tokenize(r, add_special=False, parse_special=False) for r in responses]  # once each
        read = [len(t) for t in toks]
        for i, j in orders:
            tok, keep, was_cut = self._fit(system, question, responses[i], responses[j], (toks[i], toks[j]))
            for k, c, idx in zip(keep, was_cut, (i, j), strict=True):
                read[idx] = min(read[idx], k)
                cut[idx] = cut[idx] or c
            requests.append(ScoreRequest(context=tok.segments or (tok.context,), continuations=self.letters))
            kept.append(len(tok.context))
        lps = self.side.model.loglikelihood(requests)
        d: dict[tuple[int, int], float] = {}
        mass = 0.0
        for (i, j), (la, lb) in zip(orders, lps, strict=True):
            a, b = float(la.sum()), float(lb.sum())
            d[(i, j)] = a - b
            mass += math.exp(a) + math.exp(b)
        pref = {(i, j): 0.5 * (d[(i, j)] - d[(j, i)]) for i, j in orders}
        values = [sum(pref[(i, j)] for j in range(n) if j != i) / (n - 1) for i in range(n)]
        pairs = [(i, j) for i, j in orders if i < j]
        bias = sum(0.5 * (d[(i, j)] + d[(j, i)]) for i, j in pairs) / len(pairs)
        return Scored(
            method="judge",
            values=values,
            fields=[{"judge": v, "judge_tokens": read[i]} for i, v in enumerate(values)],
            truncated=cut,
            tokens=float(sum(kept) + len(orders) * sum(len(x) for x in self.letters)),
            z=lambda margin, b, w: MEASURED["judge"](margin),
            record={"judge": {"position_bias": bias, "verdict_mass": mass / len(orders), "orders": len(orders)}},
        )

    def prompt_sha256(self) -> str:
        return hashlib.sha256((JUDGE_SYSTEM + "\0" + CRITERIA + "\0" + JUDGE_USER).encode()).hexdigest()

    def metadata(self) -> dict[str, Any]:
        return {"judge": {"model": "strong", "prompt": "MT-Bench pairwise (FastChat pair-v2), verdict letter only",
                          "prompt_sha256": self.prompt_sha256(), "verdicts": ["A", "B"], "orders": "both, averaged",
                          "value": "mean over the other responses of (d(as A) - d(as B)) / 2, d = log P(A) - log P(B)"}}

    def numerics(self) -> dict[str, Any]:
        return {"judge.prompt_sha256": self.prompt_sha256()}
