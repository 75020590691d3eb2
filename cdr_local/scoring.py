"""From conversations to token requests, and from log-probs to per-response scores.

Each side of a pair formats the conversation with its own chat template and
tokenizer (strong and weak need not share a vocabulary), prepends its own
system prompt if the pair gives one, and scores the response tokens plus the
end-of-turn token the template closes the answer with.

Token boundaries (the lm-eval concern): the context, the response and the
template's suffix are tokenized separately, so the response's tokens are
exactly the tokens of the response text (special-token text inside a
response is *not* parsed as a control token), and the context is identical
for every response of a record, which lets the engine decode it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .chat import Message, TemplateError, resolve_template, split_template
from .engine import ScoreRequest

if TYPE_CHECKING:
    from .engine import LanguageModel


@dataclass(frozen=True)
class SideScore:
    """One model's log-likelihood of one response."""

    logprob: float  # sum over scored tokens (response + end-of-turn)
    n_tokens: int
    truncated: bool
    # the per-token log-probs whose sum is ``logprob`` (written out only on request:
    # ``cdr eval --token-logprobs``, for rules that need more than the sums)
    token_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Tokenized:
    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    truncated: tuple[bool, ...]
    # context split into segments; the first is the system prompt (profile
    # criteria, exemplars) when there is one, so the engine keeps it cached
    # across records.  Only a split of ``context``: numbers do not depend on it.
    segments: tuple[tuple[int, ...], ...] = ()


def with_system(messages: Sequence[Message], system: str | None) -> list[Message]:
    """Prepend a side's system prompt; merge with a system message the record already has."""
    msgs = list(messages)
    if not system:
        return msgs
    if msgs and msgs[0].role == "system":
        return [Message("system", system + "\n\n" + msgs[0].content), *msgs[1:]]
    return [Message("system", system), *msgs]


class ChatSide:
    """A loaded model as one side of a pair: template, system prompt, truncation."""

    def __init__(self, model: LanguageModel, *, system: str | None, fallback_template: str | None, template: str | None = None) -> None:
        self.model = model
        self.system = system
        # a side's own template (models.toml: side.template) wins over the GGUF's
        self.template_from = "pair" if template else "gguf" if model.chat_template() else "models.toml"
        self.template = resolve_template(model.chat_template(), fallback_template, model.name, override=template)
        self.bos_text = model.token_text(model.bos_id) if model.bos_id >= 0 else ""
        self.eos_text = model.token_text(model.eos_id) if model.eos_id >= 0 else ""
        try:  # a template that cannot render one question fails here, once, not on every record
            split_template(self.template, with_system([Message("user", "Hi")], system), bos_token=self.bos_text, eos_token=self.eos_text)
        except TemplateError as e:
            raise TemplateError(f"model {model.name!r}: {e}") from None

    def tokenize(self, messages: Sequence[Message], responses: Sequence[str]) -> Tokenized:
        m = self.model
        msgs = with_system(messages, self.system)
        split = split_template(self.template, msgs, bos_token=self.bos_text, eos_token=self.eos_text)
        ctx = self._tokenize_prefix(split.prefix)
        if not ctx:
            ctx = [m.end_token()] if m.bos_id < 0 else [m.bos_id]
        suffix = m.tokenize(split.suffix, add_special=False, parse_special=True)
        tail: list[int] = []
        for t in suffix:
            tail.append(t)
            if m.is_eog(t):
                break
        else:
            tail = [m.end_token()]
        conts = [m.tokenize(r, add_special=False, parse_special=False) + tail for r in responses]
        tok = _truncate(ctx, conts, m.n_ctx, keep_first=1 if m.add_bos else 0)
        segments: tuple[tuple[int, ...], ...] = (tok.context,)
        if msgs and msgs[0].role == "system" and len(msgs) > 1 and tok.context == tuple(ctx):
            k = self._system_prefix_len(msgs, ctx)
            if 0 < k < len(ctx):
                segments = (tok.context[:k], tok.context[k:])
        return Tokenized(tok.context, tok.continuations, tok.truncated, segments)

    def context_tokens(self, messages: Sequence[Message]) -> list[int]:
        """The tokens the model reads before its answer (for generation)."""
        split = split_template(self.template, with_system(messages, self.system), bos_token=self.bos_text, eos_token=self.eos_text)
        return self._tokenize_prefix(split.prefix)

    def _tokenize_prefix(self, prefix: str) -> list[int]:
        m = self.model
        if m.add_bos and self.bos_text and prefix.startswith(self.bos_text):
            prefix = prefix[len(self.bos_text) :]  # llama.cpp adds BOS itself
        return m.tokenize(prefix, add_special=True, parse_special=True)

    def _system_prefix_len(self, msgs: list[Message], ctx: list[int]) -> int:
        """Tokens of ``ctx`` that belong to the system message's rendering (a cacheable prefix)."""
        try:
            sys_only = split_template(
                self.template, [msgs[0], Message("user", "\u2063")], bos_token=self.bos_text, eos_token=self.eos_text
            ).prefix
        except Exception:
            return 0
        cut = sys_only.find("\u2063")
        if cut <= 0:
            return 0
        head = self._tokenize_prefix(sys_only[:cut])
        k = 0
        while k < len(head) and k < len(ctx) and head[k] == ctx[k]:
            k += 1
        # a BPE merge across the boundary may change the last shared token
        return k if k == len(head) else max(0, k - 1)

    def score(self, messages: Sequence[Message], responses: Sequence[str]) -> list[SideScore]:
        tok = self.tokenize(messages, responses)
        req = ScoreRequest(context=tok.segments or (tok.context,), continuations=tok.continuations)
        lps = self.model.loglikelihood([req])[0]
        return [
            SideScore(logprob=float(lp.sum()), n_tokens=len(lp), truncated=tr, token_logprobs=tuple(lp.tolist()))
            for lp, tr in zip(lps, tok.truncated, strict=True)
        ]


def _truncate(ctx: list[int], conts: list[list[int]], n_ctx: int, keep_first: int) -> Tokenized:
    """Fit context + each continuation into n_ctx.

    As in the CDR authors' code: keep the *end* of the prompt and the *start*
    of the response.  The prompt keeps at least half the window (or all of
    itself, if shorter) so a long response cannot squeeze the question out;
    the kept prompt is the same for every response, so it stays shareable.
    A leading BOS is always kept.  Truncated responses are flagged, never
    silent.
    """
    longest = max(len(c) for c in conts)
    if len(ctx) + longest <= n_ctx:
        return Tokenized(tuple(ctx), tuple(tuple(c) for c in conts), tuple(False for _ in conts))
    keep_prompt = max(n_ctx - longest, min(len(ctx), n_ctx // 2))
    keep_prompt = max(keep_prompt, keep_first + 1)
    new_ctx = ctx if len(ctx) <= keep_prompt else ctx[:keep_first] + ctx[len(ctx) - (keep_prompt - keep_first) :]
    room = n_ctx - len(new_ctx)
    ctx_cut = len(new_ctx) < len(ctx)
    out_conts, flags = [], []
    for c in conts:
        cut = len(c) > room
        out_conts.append(tuple(c[:room]))
        flags.append(cut or ctx_cut)
    return Tokenized(tuple(new_ctx), tuple(out_conts), tuple(flags))
