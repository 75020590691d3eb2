"""Input lines to one internal record type, with reasons for what is rejected.

Accepted shapes (one JSON object per line):

* ``{prompt, chosen, rejected}`` -- a labelled (or to-be-relabelled) pair;
* ``{prompt, response_a, response_b}``;
* ``{prompt, responses: [...]}`` -- N responses to one prompt;
* TRL's conversational form: ``prompt`` a list of ``{role, content}``
  messages, each response a list holding the assistant message(s); and TRL's
  implicit-prompt form (no ``prompt``; ``chosen``/``rejected`` are whole
  conversations that share everything but the last assistant turn).

A string prompt written as an HH-RLHF transcript (``\\n\\nHuman: ...
\\n\\nAssistant:``) is split into user/assistant turns, so that chat models
see a real conversation.

``id`` is optional; without one, a stable hash of the content is used, so a
resumed run recognises the same record.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from .chat import ROLES, Message

RESPONSE_FIELDS = {
    "chosen_rejected": ("chosen", "rejected"),
    "ab": ("response_a", "response_b"),
}

MAX_LINE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Record:
    """One unit of work: a conversation context and the responses to score."""

    id: str
    line: int  # 1-based line number in the input
    messages: tuple[Message, ...]  # context; the responses answer the last user turn
    responses: tuple[str, ...]
    fmt: str  # "chosen_rejected" | "ab" | "responses"
    conversational: bool  # input used message lists (output mirrors it)
    prompt_raw: Any  # the prompt exactly as given (echoed in the output)
    extra: dict[str, Any] = field(default_factory=dict)  # other input fields, passed through

    def as_response(self, text: str) -> Any:
        """A response in TRL's form: the string, or [{role: assistant, content}] when the input was conversational."""
        return [{"role": "assistant", "content": text}] if self.conversational else text

    def response_name(self, i: int) -> str:
        if self.fmt in RESPONSE_FIELDS:
            return RESPONSE_FIELDS[self.fmt][i]
        return f"responses[{i}]"


@dataclass(frozen=True)
class Reject:
    """An input line that could not become a record, and why."""

    line: int
    reason: str
    id: str | None = None
    text: str | None = None  # the start of the offending line, for the rejects file
    detail: dict[str, Any] | None = None  # what the task knew (e.g. a filtered-out verdict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"line": self.line, "reason": self.reason}
        if self.id is not None:
            d["id"] = self.id
        if self.text is not None:
            d["text"] = self.text
        if self.detail is not None:
            d["detail"] = self.detail
        return d


class InvalidRecord(ValueError):
    """Raised inside parsing; becomes a :class:`Reject`."""


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def split_hh_transcript(prompt: str) -> list[Message] | None:
    """``"\\n\\nHuman: hi\\n\\nAssistant: yo\\n\\nHuman: q\\n\\nAssistant:"`` -> turns.

    Returns None when the text is not such a transcript.
    """
    stripped = prompt.rstrip()
    if not stripped.endswith("Assistant:") or not re.match(r"\s*Human:", prompt):
        return None
    parts = _HH_TURN.split(prompt.lstrip())
    # parts: ["", "Human", text, "Assistant", text, ..., "Assistant", ""]
    if len(parts) < 5 or parts[0].strip():
        return None
    msgs: list[Message] = []
    for speaker, text in zip(parts[1::2], parts[2::2], strict=False):
        role = "user" if speaker == "Human" else "assistant"
        msgs.append(Message(role, text.strip()))
    if msgs[-1].role != "assistant" or msgs[-1].content:
        return None
    msgs.pop()
    if not msgs or msgs[-1].role != "user":
        return None
    return msgs


def _messages(value: Any, what: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise InvalidRecord(f"field {what!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InvalidRecord(f"{what}[{i}] is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidRecord(f"{what}[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidRecord(f"{what}[{i}].content must be a string")
        out.append(Message(role, content))
    return out


def _prompt_messages(prompt: Any) -> tuple[list[Message], bool]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidRecord("empty prompt")
        hh = split_hh_transcript(prompt)
        if hh is not None and not any(m.content.strip() for m in hh):
            raise InvalidRecord("empty prompt")
        return (hh if hh is not None else [Message("user", prompt)]), False
    if isinstance(prompt, list):
        msgs = _messages(prompt, "prompt")
        if msgs[-1].role != "user":
            raise InvalidRecord("the last prompt message must be from the user")
        if not any(m.content.strip() for m in msgs):
            raise InvalidRecord("empty prompt")
        return msgs, True
    raise InvalidRecord("field 'prompt' must be a string or a list of messages")


def _response_text(value: Any, what: str) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):
        msgs = _messages(value, what)
        if len(msgs) != 1 or msgs[0].role != "assistant":
            raise InvalidRecord(f"{what} must hold exactly one assistant message")
        text = msgs[0].content
    else:
        raise InvalidRecord(f"field {what!r} must be a string or a list with one assistant message")
    if not text.strip():
        raise InvalidRecord(f"empty response in {what!r}")
    return text


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[list[Message], str, str]:
    """TRL implicit-prompt form: both are whole conversations."""
    c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if c[-1].role != "assistant" or r[-1].role != "assistant":
        raise InvalidRecord("without 'prompt', chosen and rejected must end with an assistant message")
    if c[:-1] != r[:-1] or not c[:-1]:
        raise InvalidRecord("without 'prompt', chosen and rejected must share the same conversation before the last turn")
    ctx = c[:-1]
    if ctx[-1].role != "user":
        raise InvalidRecord("the turn before the answer must be from the user")
    for what, m in (("chosen", c[-1]), ("rejected", r[-1])):
        if not m.content.strip():
            raise InvalidRecord(f"empty response in {what!r}")
    return ctx, c[-1].content, r[-1].content


def content_id(messages: list[Message] | tuple[Message, ...], responses: tuple[str, ...]) -> str:
    """A stable id from the content: same record, same id, on every run."""
    payload = orjson.dumps([[m.role, m.content] for m in messages] + [list(responses)])
    return hashlib.sha256(payload).hexdigest()[:16]


def parse_object(obj: Any, line: int) -> Record:
    """One decoded JSON value to a :class:`Record` (raises InvalidRecord)."""
    if not isinstance(obj, dict):
        raise InvalidRecord("line is not a JSON object")
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise InvalidRecord("field 'id' must be a string or an integer")
    extra = {k: v for k, v in obj.items() if k not in {"id", "prompt", "chosen", "rejected", "response_a", "response_b", "responses"}}

    conversational = False
    if "responses" in obj:
        fmt = "responses"
        msgs, conversational = _prompt_messages(_require(obj, "prompt"))
        resp = obj["responses"]
        if not isinstance(resp, list) or not resp:
            raise InvalidRecord("field 'responses' must be a non-empty list")
        responses = tuple(_response_text(v, f"responses[{i}]") for i, v in enumerate(resp))
        conversational = conversational or any(isinstance(v, list) for v in resp)
    elif "chosen" in obj or "rejected" in obj:
        fmt = "chosen_rejected"
        if "prompt" not in obj:
            if not (isinstance(obj.get("chosen"), list) and isinstance(obj.get("rejected"), list)):
                # Only TRL's implicit-prompt form (two message lists) may omit it.
                raise InvalidRecord("missing field 'prompt'")
            msgs, a, b = _implicit_prompt(_require(obj, "chosen"), _require(obj, "rejected"))
            responses, conversational = (a, b), True
        else:
            msgs, conversational = _prompt_messages(obj["prompt"])
            responses = (
                _response_text(_require(obj, "chosen"), "chosen"),
                _response_text(_require(obj, "rejected"), "rejected"),
            )
            conversational = conversational or any(isinstance(obj[k], list) for k in ("chosen", "rejected"))
    elif "response_a" in obj or "response_b" in obj:
        fmt = "ab"
        msgs, conversational = _prompt_messages(_require(obj, "prompt"))
        responses = (
            _response_text(_require(obj, "response_a"), "response_a"),
            _response_text(_require(obj, "response_b"), "response_b"),
        )
        conversational = conversational or any(isinstance(obj[k], list) for k in ("response_a", "response_b"))
    else:
        if "prompt" not in obj:
            raise InvalidRecord("missing field 'prompt'")
        raise InvalidRecord("no responses: expected chosen/rejected, response_a/response_b, or responses")

    mt = tuple(msgs)
    return Record(
        id=str(rid) if rid is not None else content_id(mt, responses),
        line=line,
        messages=mt,
        responses=responses,
        fmt=fmt,
        conversational=conversational,
        prompt_raw=obj.get("prompt", [m.to_dict() for m in mt]),
        extra=extra,
    )


def _require(obj: dict[str, Any], key: str) -> Any:
    if key not in obj:
        raise InvalidRecord(f"missing field {key!r}")
    return obj[key]


def parse_line(raw: bytes, line: int) -> Record | Reject | None:
    """One raw input line to a Record or a Reject; None for a blank line."""
    if not raw.strip():
        return None
    snippet = raw[:200].decode("utf-8", "replace")
    if len(raw) > MAX_LINE_BYTES:
        return Reject(line, f"line longer than {MAX_LINE_BYTES} bytes", text=snippet)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Reject(line, f"invalid UTF-8 at byte {e.start}", text=snippet)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return Reject(line, f"invalid JSON: {e}", text=snippet)
    try:
        return parse_object(obj, line)
    except InvalidRecord as e:
        rid = obj.get("id") if isinstance(obj, dict) else None
        ok_id = isinstance(rid, (str, int)) and not isinstance(rid, bool)
        return Reject(line, str(e), id=str(rid) if ok_id else None, text=snippet)


def parse_prompt_line(raw: bytes, line: int) -> Record | Reject | None:
    """A line that needs only a prompt (``cdr synth``): ``{prompt, id?}``; other fields pass through."""
    if not raw.strip():
        return None
    snippet = raw[:200].decode("utf-8", "replace")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return Reject(line, f"invalid JSON: {e}", text=snippet)
    if not isinstance(obj, dict):
        return Reject(line, "line is not a JSON object", text=snippet)
    rid = obj.get("id")
    if rid is not None and (not isinstance(rid, (str, int)) or isinstance(rid, bool)):
        return Reject(line, "field 'id' must be a string or an integer", text=snippet)
    try:
        msgs, conv = _prompt_messages(_require(obj, "prompt"))
    except InvalidRecord as e:
        return Reject(line, str(e), id=str(rid) if rid is not None else None, text=snippet)
    mt = tuple(msgs)
    extra = {k: v for k, v in obj.items() if k not in {"id", "prompt"}}
    return Record(
        id=str(rid) if rid is not None else content_id(mt, ()),
        line=line, messages=mt, responses=(), fmt="prompt", conversational=conv,
        prompt_raw=obj["prompt"], extra=extra,
    )
