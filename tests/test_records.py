"""Input lines -> Record / Reject (cdr_local.records).  Pure parsing, no models."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdr_local import records
from cdr_local.chat import Message
from cdr_local.records import (
    InvalidRecord,
    Record,
    Reject,
    content_id,
    parse_line,
    parse_object,
    split_hh_transcript,
)


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def ok(obj: Any, n: int = 1) -> Record:
    r = parse_line(line(obj), n)
    assert isinstance(r, Record), r
    return r


def rej(raw: bytes | Any, n: int = 1) -> Reject:
    r = parse_line(raw if isinstance(raw, bytes) else line(raw), n)
    assert isinstance(r, Reject), r
    assert r.line == n
    assert r.reason and "\n" not in r.reason
    return r


def U(c: str) -> dict[str, str]:
    return {"role": "user", "content": c}


def A(c: str) -> dict[str, str]:
    return {"role": "assistant", "content": c}


def S(c: str) -> dict[str, str]:
    return {"role": "system", "content": c}


# ---------------------------------------------------------------------------
# Accepted shapes
# ---------------------------------------------------------------------------


def test_chosen_rejected_string_prompt() -> None:
    r = ok(
        {"id": "r1", "prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "subset": "math"}, 7
    )
    assert r.id == "r1"
    assert r.line == 7
    assert r.messages == (Message("user", "What is 2+2?"),)
    assert r.responses == ("4", "5")
    assert r.fmt == "chosen_rejected"
    assert r.conversational is False
    assert r.prompt_raw == "What is 2+2?"
    assert r.extra == {"subset": "math"}
    assert (r.response_name(0), r.response_name(1)) == ("chosen", "rejected")


def test_response_a_b() -> None:
    r = ok(
        {
            "prompt": "Hi",
            "response_a": "Hello!",
            "response_b": "Go away.",
            "section": 3,
            "meta": {"k": [1]},
        }
    )
    assert r.fmt == "ab"
    assert r.messages == (Message("user", "Hi"),)
    assert r.responses == ("Hello!", "Go away.")
    assert r.conversational is False
    assert r.prompt_raw == "Hi"
    assert r.extra == {"section": 3, "meta": {"k": [1]}}
    assert (r.response_name(0), r.response_name(1)) == ("response_a", "response_b")


@pytest.mark.parametrize("n", [1, 2, 5])
def test_responses_list(n: int) -> None:
    resp = [f"answer number {i}" for i in range(n)]
    r = ok({"id": 12, "prompt": "Q?", "responses": resp, "subset": "s"})
    assert r.fmt == "responses"
    assert r.id == "12"
    assert r.responses == tuple(resp)
    assert r.messages == (Message("user", "Q?"),)
    assert r.conversational is False
    assert r.extra == {"subset": "s"}
    assert [r.response_name(i) for i in range(n)] == [f"responses[{i}]" for i in range(n)]


def test_responses_as_message_lists_are_conversational() -> None:
    r = ok({"prompt": "Q?", "responses": [[A("one")], "two", [A("three")]]})
    assert r.responses == ("one", "two", "three")
    assert r.conversational is True


def test_response_text_is_kept_verbatim() -> None:
    # Surrounding whitespace in responses and prompts is not normalised away.
    r = ok({"prompt": "  spaced prompt \n", "chosen": " leading", "rejected": "trailing \n"})
    assert r.messages == (Message("user", "  spaced prompt \n"),)
    assert r.responses == (" leading", "trailing \n")


def test_trl_conversational() -> None:
    prompt = [S("Be brief."), U("Hi"), A("Hello, how can I help?"), U("Capital of France?")]
    r = ok(
        {
            "id": "t",
            "prompt": prompt,
            "chosen": [A("Paris.")],
            "rejected": [A("Lyon.")],
            "source": "x",
        }
    )
    assert r.fmt == "chosen_rejected"
    assert r.conversational is True
    assert r.messages == (
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello, how can I help?"),
        Message("user", "Capital of France?"),
    )
    assert r.responses == ("Paris.", "Lyon.")
    assert r.prompt_raw == prompt
    assert r.extra == {"source": "x"}


def test_string_prompt_with_message_list_response_is_conversational() -> None:
    r = ok({"prompt": "Q", "chosen": "plain", "rejected": [A("listed")]})
    assert r.responses == ("plain", "listed")
    assert r.conversational is True


def test_ab_with_message_lists_is_conversational() -> None:
    r = ok({"prompt": [U("Q")], "response_a": [A("a")], "response_b": [A("b")]})
    assert r.fmt == "ab"
    assert r.conversational is True
    assert r.responses == ("a", "b")


def test_trl_implicit_prompt() -> None:
    shared = [S("sys"), U("Hi"), A("Hey"), U("Tell me a joke")]
    obj = {
        "chosen": [*shared, A("A funny joke.")],
        "rejected": [*shared, A("No.")],
        "subset": "jokes",
    }
    r = ok(obj)
    assert r.fmt == "chosen_rejected"
    assert r.conversational is True
    assert r.messages == tuple(Message(m["role"], m["content"]) for m in shared)
    assert r.responses == ("A funny joke.", "No.")
    # With no prompt field, the shared context is echoed as the prompt.
    assert r.prompt_raw == shared
    assert r.extra == {"subset": "jokes"}
    assert (r.response_name(0), r.response_name(1)) == ("chosen", "rejected")


@pytest.mark.parametrize(
    "obj, fragment",
    [
        ({"chosen": [U("a"), A("x")], "rejected": [U("b"), A("y")]}, "share"),
        ({"chosen": [A("x")], "rejected": [A("y")]}, "share"),
        ({"chosen": [U("a"), A("x")], "rejected": [U("a"), U("y")]}, "assistant"),
        ({"chosen": [U("a"), A("x"), A("x2")], "rejected": [U("a"), A("x"), A("y")]}, "user"),
        ({"chosen": [U("a"), A("  ")], "rejected": [U("a"), A("y")]}, "chosen"),
        ({"chosen": [U("a"), A("x")], "rejected": [U("a"), A("")]}, "rejected"),
        ({"chosen": [U("a"), A("x")]}, "prompt"),
        ({"chosen": "x", "rejected": "y"}, "prompt"),
    ],
)
def test_trl_implicit_prompt_rejects(obj: dict[str, Any], fragment: str) -> None:
    assert fragment in rej(obj).reason


def test_parse_object_directly() -> None:
    r = parse_object({"prompt": "p", "responses": ["r"]}, 3)
    assert isinstance(r, Record) and r.line == 3 and r.responses == ("r",)
    with pytest.raises(InvalidRecord, match="prompt"):
        parse_object({"responses": ["r"]}, 1)
    with pytest.raises(InvalidRecord, match="JSON object"):
        parse_object([1, 2], 1)


# ---------------------------------------------------------------------------
# HH-RLHF transcripts
# ---------------------------------------------------------------------------

HH = "Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
HH_TURNS = [Message("user", "a"), Message("assistant", "b"), Message("user", "c")]


@pytest.mark.parametrize("text", [HH, "\n\n" + HH, "\n\n" + HH + " ", HH + "\n"])
def test_hh_transcript_split(text: str) -> None:
    assert split_hh_transcript(text) == HH_TURNS
    r = ok({"prompt": text, "chosen": "d", "rejected": "e"})
    assert r.messages == tuple(HH_TURNS)
    assert r.prompt_raw == text  # echoed exactly as given
    assert r.conversational is False


def test_hh_single_turn_and_multiline_content() -> None:
    assert split_hh_transcript("\n\nHuman: line 1\nline 2\n\npara 2\n\nAssistant:") == [
        Message("user", "line 1\nline 2\n\npara 2")
    ]


@pytest.mark.parametrize(
    "text",
    [
        "What does the label Human: mean in a transcript?\n\nAssistant:",
        "Explain the format 'Human: ...' and 'Assistant: ...' used by HH-RLHF.",
        "Human: hi",  # no trailing assistant cue
        "Human: a\n\nAssistant: b",  # ends with an assistant answer, not a cue
        "Context first.\n\nHuman: a\n\nAssistant:",  # text before the first turn
        "Human: a Assistant:",  # no turn separators
    ],
)
def test_not_an_hh_transcript(text: str) -> None:
    assert split_hh_transcript(text) is None
    r = ok({"prompt": text, "chosen": "x", "rejected": "y"})
    assert r.messages == (Message("user", text),)


def test_hh_word_mid_text_inside_a_turn_is_not_split() -> None:
    text = "Human: what does 'Human: hello' mean?\n\nAssistant:"
    assert split_hh_transcript(text) == [Message("user", "what does 'Human: hello' mean?")]


def test_hh_transcript_with_only_empty_turns_is_rejected() -> None:
    assert (
        "empty prompt"
        in rej({"prompt": "Human: \n\nAssistant:", "chosen": "x", "rejected": "y"}).reason
    )


# ---------------------------------------------------------------------------
# Ids
# ---------------------------------------------------------------------------


def test_explicit_ids() -> None:
    assert ok({"id": "abc", "prompt": "p", "responses": ["r"]}).id == "abc"
    assert ok({"id": 42, "prompt": "p", "responses": ["r"]}).id == "42"
    assert ok({"id": 0, "prompt": "p", "responses": ["r"]}).id == "0"
    assert ok({"id": -3, "prompt": "p", "responses": ["r"]}).id == "-3"


def test_content_hash_id() -> None:
    base = {"prompt": "p", "chosen": "c", "rejected": "r"}
    a, b = ok(base), ok(dict(base))
    assert re.fullmatch(r"[0-9a-f]{16}", a.id)
    assert a.id == b.id
    assert a.id == content_id(a.messages, a.responses)
    # Extra fields and the line number do not change it; content does.
    assert ok({**base, "subset": "z"}, 99).id == a.id
    assert ok({**base, "prompt": "p2"}).id != a.id
    assert ok({**base, "chosen": "c2"}).id != a.id
    assert ok({**base, "chosen": "r", "rejected": "c"}).id != a.id
    assert ok({"prompt": "p", "responses": ["c", "r"]}).id == a.id  # same content, same id
    assert content_id([Message("user", "p")], ("c",)) != content_id(
        [Message("system", "p")], ("c",)
    )


def test_content_hash_is_stable_across_processes() -> None:
    # A fixed value: a resumed run (another process) must recognise the record.
    import hashlib

    expect = hashlib.sha256(b'[["user","p"],["c","r"]]').hexdigest()[:16]
    assert content_id((Message("user", "p"),), ("c", "r")) == expect


@pytest.mark.parametrize("bad", [True, False, 1.5, [1], {"a": 1}])
def test_bad_id_types_rejected(bad: Any) -> None:
    r = rej({"id": bad, "prompt": "p", "chosen": "c", "rejected": "r"})
    assert "id" in r.reason
    assert r.id is None


# ---------------------------------------------------------------------------
# Rejects
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b'{"prompt": "p", "chosen": ', "invalid JSON"),
        (b"{'prompt': 'p'}", "invalid JSON"),
        (b"not json at all", "invalid JSON"),
        (b'[{"prompt": "p", "chosen": "c", "rejected": "r"}]', "JSON object"),
        (b"42", "JSON object"),
        (b'"a string"', "JSON object"),
        (b"null", "JSON object"),
        (b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "r"}', "UTF-8"),
    ],
)
def test_reject_malformed_lines(raw: bytes, fragment: str) -> None:
    r = rej(raw, 5)
    assert fragment in r.reason
    assert r.id is None
    assert r.text is not None and r.text.startswith(raw[:5].decode("utf-8", "replace"))
    d = r.to_json()
    assert d["line"] == 5 and d["reason"] == r.reason and "id" not in d


def test_reject_reports_byte_offset_of_bad_utf8() -> None:
    assert "byte 3" in rej(b'{"p\xc3' + b'"}').reason


@pytest.mark.parametrize(
    "obj, fragment",
    [
        ({"chosen": "c", "rejected": "r"}, "'prompt'"),
        ({"responses": ["a"]}, "'prompt'"),
        ({"response_a": "a", "response_b": "b"}, "'prompt'"),
        ({"foo": 1}, "'prompt'"),
        ({"prompt": "p"}, "responses"),
        ({"prompt": "p", "chosen": "c"}, "'rejected'"),
        ({"prompt": "p", "rejected": "r"}, "'chosen'"),
        ({"prompt": "p", "response_a": "a"}, "'response_b'"),
        ({"prompt": "p", "response_b": "b"}, "'response_a'"),
        ({"prompt": "", "chosen": "c", "rejected": "r"}, "empty prompt"),
        ({"prompt": " \n\t ", "chosen": "c", "rejected": "r"}, "empty prompt"),
        ({"prompt": [U("  "), A(""), U("")], "chosen": "c", "rejected": "r"}, "empty prompt"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "'chosen'"),
        ({"prompt": "p", "chosen": "c", "rejected": " \n "}, "'rejected'"),
        ({"prompt": "p", "response_a": "a", "response_b": "\t"}, "'response_b'"),
        ({"prompt": "p", "responses": ["a", " "]}, "responses[1]"),
        ({"prompt": "p", "chosen": [A("   ")], "rejected": "r"}, "'chosen'"),
        ({"prompt": 5, "chosen": "c", "rejected": "r"}, "'prompt'"),
        ({"prompt": None, "chosen": "c", "rejected": "r"}, "'prompt'"),
        ({"prompt": {"role": "user"}, "chosen": "c", "rejected": "r"}, "'prompt'"),
        (
            {"prompt": "p", "chosen": {"role": "assistant", "content": "c"}, "rejected": "r"},
            "'chosen'",
        ),
        ({"prompt": "p", "chosen": "c", "rejected": 3}, "'rejected'"),
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "'chosen'"),
        ({"prompt": "p", "responses": "abc"}, "'responses'"),
        ({"prompt": "p", "responses": {"a": "b"}}, "'responses'"),
        ({"prompt": "p", "responses": []}, "'responses'"),
        ({"prompt": "p", "responses": ["a", 3]}, "responses[1]"),
        ({"prompt": [], "chosen": "c", "rejected": "r"}, "'prompt'"),
        (
            {"prompt": [{"role": "robot", "content": "x"}], "chosen": "c", "rejected": "r"},
            "prompt[0].role",
        ),
        ({"prompt": [{"content": "x"}], "chosen": "c", "rejected": "r"}, "prompt[0].role"),
        (
            {"prompt": [U("ok"), {"role": "user", "content": 5}], "chosen": "c", "rejected": "r"},
            "prompt[1].content",
        ),
        ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "prompt[0].content"),
        ({"prompt": ["hello"], "chosen": "c", "rejected": "r"}, "prompt[0]"),
        ({"prompt": [U("q"), A("a")], "chosen": "c", "rejected": "r"}, "last prompt message"),
        ({"prompt": [S("s")], "chosen": "c", "rejected": "r"}, "last prompt message"),
        ({"prompt": "p", "chosen": [U("c")], "rejected": "r"}, "assistant"),
        ({"prompt": "p", "chosen": [A("c"), A("d")], "rejected": "r"}, "assistant"),
        ({"prompt": "p", "chosen": [], "rejected": "r"}, "'chosen'"),
        (
            {"prompt": "p", "responses": [[{"role": "assistant", "content": ["x"]}]]},
            "responses[0][0].content",
        ),
    ],
)
def test_reject_invalid_records(obj: dict[str, Any], fragment: str) -> None:
    r = rej(obj, 11)
    assert fragment in r.reason, r.reason
    assert r.id is None


def test_reject_carries_id_and_text() -> None:
    r = rej({"id": "bad-1", "prompt": "", "chosen": "c", "rejected": "r"}, 4)
    assert (r.line, r.id) == (4, "bad-1")
    assert r.to_json() == {"line": 4, "reason": r.reason, "id": "bad-1", "text": r.text}
    assert r.text is not None and '"bad-1"' in r.text
    assert rej({"id": 77, "prompt": "p"}).id == "77"


def test_reject_text_is_truncated() -> None:
    r = rej({"prompt": "x" * 10_000}, 2)
    assert r.text is not None and len(r.text) <= 200


@pytest.mark.parametrize("raw", [b"", b"\n", b"   \t \r\n", b"\r\n"])
def test_blank_lines_are_skipped(raw: bytes) -> None:
    assert parse_line(raw, 1) is None


def test_trailing_newline_and_crlf_are_fine() -> None:
    for end in (b"\n", b"\r\n"):
        r = parse_line(line({"prompt": "p", "chosen": "c", "rejected": "r"}) + end, 1)
        assert isinstance(r, Record)
        assert r.responses == ("c", "r")


def test_huge_line_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 64)
    small = line({"prompt": "p", "chosen": "c", "rejected": "r"})
    assert len(small) <= 64 and isinstance(parse_line(small, 1), Record)
    big = line({"id": "big", "prompt": "p" * 100, "chosen": "c", "rejected": "r"})
    r = rej(big, 9)
    assert "longer than 64 bytes" in r.reason
    assert r.text is not None and len(r.text) <= 200


def test_non_ascii_content_round_trips() -> None:
    r = ok({"prompt": "Qu'est-ce que c'est ? 日本語 🙂", "chosen": "ça", "rejected": "нет"})
    assert r.messages == (Message("user", "Qu'est-ce que c'est ? 日本語 🙂"),)
    assert r.responses == ("ça", "нет")


# ---------------------------------------------------------------------------
# Property: parse_line is total
# ---------------------------------------------------------------------------

KEYS = [
    "id",
    "prompt",
    "chosen",
    "rejected",
    "response_a",
    "response_b",
    "responses",
    "role",
    "content",
]
ROLE_TEXT = st.sampled_from(["user", "assistant", "system", "robot", "", " "])
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | ROLE_TEXT
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=20,
)
# Records that are close to valid, so the accepting paths are exercised too.
words = st.text(st.sampled_from("ab \n\t:H"), max_size=8) | st.sampled_from(["hi", "Q?", "x y"])
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system"]) | ROLE_TEXT,
        "content": words | scalars,
    }
)
user_msg = st.builds(lambda c: {"role": "user", "content": c}, words)
asst_msg = st.builds(lambda c: {"role": "assistant", "content": c}, words)
hh_text = st.lists(st.tuples(st.sampled_from(["Human", "Assistant"]), words), max_size=4).map(
    lambda turns: "".join(f"\n\n{who}: {what}" for who, what in turns) + "\n\nAssistant:"
)
prompt_value = (
    words
    | hh_text
    | st.lists(message, max_size=3).flatmap(
        lambda ms: st.just(ms) | user_msg.map(lambda u: [*ms, u])
    )
)
response_value = words | st.lists(asst_msg, min_size=1, max_size=1) | st.lists(message, max_size=2)
extras = {"id": st.text(max_size=4) | st.integers() | scalars, "subset": json_values}
near_valid = st.one_of(
    st.fixed_dictionaries(
        {"prompt": prompt_value, "chosen": response_value, "rejected": response_value},
        optional=extras,
    ),
    st.fixed_dictionaries(
        {"prompt": prompt_value, "response_a": response_value, "response_b": response_value},
        optional=extras,
    ),
    st.fixed_dictionaries(
        {"prompt": prompt_value, "responses": st.lists(response_value, max_size=5)}, optional=extras
    ),
    st.tuples(st.lists(message, max_size=3), user_msg, asst_msg, asst_msg).map(
        lambda t: {"chosen": [*t[0], t[1], t[2]], "rejected": [*t[0], t[1], t[3]]}
    ),
)


def check_total(raw: bytes, n: int = 1) -> None:
    r = parse_line(raw, n)
    assert r is None or isinstance(r, (Record, Reject))
    if r is None:
        assert not raw.strip()
    elif isinstance(r, Reject):
        assert r.line == n
        assert isinstance(r.reason, str) and r.reason.strip()
        assert r.id is None or isinstance(r.id, str)
        r.to_json()
    else:
        assert r.line == n
        assert len(r.responses) >= 1
        assert all(isinstance(t, str) and t.strip() for t in r.responses)
        assert r.messages and r.messages[-1].role == "user"
        assert all(m.role in ("system", "user", "assistant") for m in r.messages)
        assert isinstance(r.id, str)
        assert r.fmt in ("chosen_rejected", "ab", "responses")
        for i in range(len(r.responses)):
            assert r.response_name(i)


_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(st.binary(max_size=300))
def test_property_arbitrary_bytes(raw: bytes) -> None:
    check_total(raw, 3)


@_SETTINGS
@given(json_values)
def test_property_arbitrary_json(value: Any) -> None:
    check_total(json.dumps(value).encode(), 2)


@_SETTINGS
@given(near_valid)
def test_property_near_valid_records(value: dict[str, Any]) -> None:
    raw = json.dumps(value, ensure_ascii=False).encode()
    check_total(raw, 1)
    r = parse_line(raw, 1)
    if isinstance(r, Record):
        fields = {"id", "prompt", "chosen", "rejected", "response_a", "response_b", "responses"}
        assert r.extra == {k: v for k, v in value.items() if k not in fields}
        if "prompt" in value:
            assert r.prompt_raw == value["prompt"]
        if isinstance(value.get("id"), str):
            assert r.id == value["id"]
        elif value.get("id") is None:
            assert re.fullmatch(r"[0-9a-f]{16}", r.id)
        assert parse_line(raw, 1) == r  # deterministic, including the content id
