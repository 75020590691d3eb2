"""Hostile input through the whole pipeline (property-based, hypothesis).

Random JSON and non-JSON lines, invalid UTF-8 (raw and inside JSON strings),
control characters, huge strings, wrong types, empty and whitespace prompts,
identical responses, one-response records, duplicate ids, nesting too deep to
write back, blank lines, no final newline.  Whatever the input:

* the run does not crash;
* count conservation: every non-blank line ends either in the output or in
  the rejects file (with its line number and a reason), never both, never
  twice; blank (whitespace-only) lines in neither;
* a run stopped after k records (and left with a torn last line) and then
  resumed writes exactly the bytes of one uninterrupted run.

The fast property runs a stub task (the pipeline and the two readers are what
is fuzzed); the other runs the real annotate task on the tiny models.
``CDR_SOAK=N`` runs N times more examples.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from test_records import json_values, near_valid

from cdr_local.annotate import AnnotateTask
from cdr_local.models import load_registry
from cdr_local.pair import LoadedPair, settings_from
from cdr_local.pipeline import RecordError, RunConfig, meta_path, rejects_path, run
from cdr_local.records import Record, parse_line, parse_prompt_line

SOAK = max(1, int(os.environ.get("CDR_SOAK", "1")))

# ---------------------------------------------------------------------------
# Lines
# ---------------------------------------------------------------------------

BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"caf\xe9"]
HOSTILE_TEXT = st.text(
    st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Lu", "Nd", "So"]) | st.sampled_from("\x00\r\t\u2028\ufeff<|im_end|>"),
    max_size=30,
)
BLANK = st.sampled_from(["", " ", "\t\n", "\u3000", "\r\n\x0b"])


def weighted(*choices: tuple[int, Any]) -> Any:
    """One of the strategies, drawn in proportion to the weights (st.one_of neither
    weighs nor keeps repeated branches)."""
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


# mostly texts a record can be scored with (control characters and all), sometimes not
TEXT = weighted((4, HOSTILE_TEXT.map(lambda t: "w " + t)), (1, HOSTILE_TEXT), (1, BLANK), (1, st.text(max_size=20)))


def _huge(n: int) -> str:
    return ("word " * n)[: 5 * n]


def _record(draw: Any) -> dict[str, Any]:
    """A record with hostile parts: most are valid enough to be scored."""
    shape = draw(st.sampled_from(["cr", "ab", "n", "n1", "same", "conv"]))
    prompt: Any = draw(TEXT | st.sampled_from(["What?", "Hi", "Human: hi\n\nAssistant:"]))
    r1, r2 = draw(TEXT | st.just("ok")), draw(TEXT | st.just("no"))
    if draw(st.sampled_from([False] * 7 + [True])):  # a huge string somewhere
        big = _huge(draw(st.sampled_from([2_000, 8_000])))  # 10k or 40k characters
        prompt, r1 = (big, r1) if draw(st.booleans()) else (prompt, big)
    rec: dict[str, Any]
    if shape == "cr":
        rec = {"prompt": prompt, "chosen": r1, "rejected": r2}
    elif shape == "ab":
        rec = {"prompt": prompt, "response_a": r1, "response_b": r2}
    elif shape == "n":
        rec = {"prompt": prompt, "responses": [r1, r2, draw(TEXT)]}
    elif shape == "n1":
        rec = {"prompt": prompt, "responses": [r1]}
    elif shape == "same":
        rec = {"prompt": prompt, "responses": [r1, r1, r1]}
    else:
        rec = {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": r1}],
               "rejected": [{"role": "assistant", "content": r2}]}  # fmt: skip
    if draw(st.sampled_from([True, True, False])):
        rec["id"] = draw(st.sampled_from(["a", "b", 1, "1", "a", "b", 1, "1", "c", True, 2.5, None, [], ""]))  # duplicates, wrong types
    if draw(st.sampled_from([False] * 7 + [True])):
        rec[draw(st.sampled_from(["prompt", "chosen", "responses", "x"]))] = draw(json_values)  # wrong types
    return rec


@st.composite
def records(draw: Any) -> bytes:
    rec = _record(draw)
    data = json.dumps(rec, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    return data


def _deep(k: int) -> bytes:
    return b'{"prompt": "p", "chosen": "a", "rejected": "b", "x": ' + b"[" * k + b"]" * k + b"}"


@st.composite
def utf8_in_json(draw: Any) -> bytes:
    bad = draw(st.sampled_from(BAD_UTF8))
    return b'{"prompt": "' + bad + b'", "chosen": "a", "rejected": "' + bad + b'"}'


LINE = weighted(
    (8, records()),
    (1, near_valid.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass"))),
    (1, json_values.map(lambda v: json.dumps(v).encode())),
    (1, st.binary(max_size=120).map(lambda b: b.replace(b"\n", b""))),
    (1, st.sampled_from(BAD_UTF8)),
    (1, utf8_in_json()),
    (1, st.sampled_from([b"", b" ", b"\t", b"\r", b"\x0b\x0c", b"   \r"])),
    (1, st.sampled_from([_deep(254), _deep(255), _deep(600), _deep(1100)])),
    (1, st.sampled_from([b"null", b"[]", b"{}", b"1e400", b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}'])),
)
INPUT = st.tuples(st.lists(LINE, min_size=1, max_size=14), st.booleans())


def _write_input(d: Path, lines: list[bytes], final_newline: bool) -> Path:
    inp = d / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + (b"\n" if final_newline else b""))
    return inp


def _bytes(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def _jsonl(path: Path) -> list[dict[str, Any]]:
    data = _bytes(path)
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return [orjson.loads(x) for x in data.split(b"\n")[:-1]]


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


class EchoTask:
    """A stub task: the pipeline and the parser are under test, not the models.
    Echoes what it got (extra fields too: some cannot be written back) and
    fails on request."""

    def process(self, record: Record) -> tuple[dict[str, Any], dict[str, float]]:
        if any("\x07" in r for r in record.responses):  # BEL: this record fails in the task
            raise RecordError("task failed on purpose")
        obj = {"id": record.id, "line": record.line, "n": len(record.responses), "extra": record.extra}
        return obj, {"tokens": float(len(record.responses))}


def check_conservation(lines: list[bytes], out: Path, with_lines: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows, rej = _jsonl(out), _jsonl(rejects_path(str(out)))
    nonblank = {i for i, x in enumerate(lines, 1) if x.strip()}
    rejected = [r["line"] for r in rej]
    assert len(rejected) == len(set(rejected)), "a line rejected twice"
    assert len(rows) + len(rej) == len(nonblank), "count conservation"
    assert set(rejected) <= nonblank
    for r in rej:
        assert isinstance(r["reason"], str) and r["reason"].strip() and "\n" not in r["reason"]
    if with_lines:
        written = [o["line"] for o in rows]
        assert written == sorted(nonblank - set(rejected)), "output in input order, each line once"
    ids = [o["id"] for o in rows]
    assert len(ids) == len(set(ids)), "an id written twice"
    for i, x in enumerate(lines, 1):
        try:
            x.decode("utf-8")
        except UnicodeDecodeError:
            if x.strip():
                (r,) = [r for r in rej if r["line"] == i]
                assert "UTF-8" in r["reason"], r
    return rows, rej


_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]  # no slow "explain" phase
FAST = settings(max_examples=100 * SOAK, deadline=None, suppress_health_check=_HEALTH, phases=_PHASES)


@pytest.mark.soak
@pytest.mark.parametrize("parse", [parse_line, parse_prompt_line], ids=["records", "prompts"])
@FAST
@given(INPUT, st.integers(0, 6), st.integers(1, 1000))
def test_hostile_input_is_conserved_and_resumable(
    parse: Any, data: tuple[list[bytes], bool], k: int, cut: int
) -> None:
    """For both readers: records (annotate, eval, pairs) and prompts (synth)."""
    lines, final_newline = data
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        inp = _write_input(d, lines, final_newline)
        ref = d / "ref.jsonl"
        s = run(RunConfig(input=str(inp), output=str(ref)), parse, EchoTask())
        rows, rej = check_conservation(lines, ref, with_lines=True)
        event(f"lines written: {min(len(rows), 4)}{'+' if len(rows) >= 4 else ''}")
        event(f"lines rejected: {min(len(rej), 4)}{'+' if len(rej) >= 4 else ''}")
        assert (s.done, s.rejected) == (len(rows), len(rej))
        meta = orjson.loads(meta_path(str(ref)).read_bytes())
        assert meta["status"] == "complete"
        assert meta["counts"]["written_this_run"] == len(rows)
        # stop after k records, tear the next line, resume: the same bytes, nothing lost
        out = d / "out.jsonl"
        run(RunConfig(input=str(inp), output=str(out), limit=k), parse, EchoTask())
        done = out.read_bytes()
        ref_bytes = ref.read_bytes()
        assert ref_bytes.startswith(done)
        nxt = ref_bytes[len(done) :].split(b"\n", 1)[0]
        with open(out, "ab") as f:
            f.write(nxt[: cut % max(1, len(nxt))])
        run(RunConfig(input=str(inp), output=str(out), resume=True), parse, EchoTask())
        assert out.read_bytes() == ref_bytes
        assert _bytes(rejects_path(str(out))) == _bytes(rejects_path(str(ref)))


@pytest.fixture(scope="module")
def tiny_pair(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDR_HOME", str(tmp_path_factory.mktemp("home")))
        reg = load_registry(tiny_registry)
        pair = LoadedPair(reg, "tiny", settings_from(reg))
    yield pair
    pair.close()


@pytest.mark.soak
@settings(max_examples=60 * SOAK, deadline=None, suppress_health_check=_HEALTH, phases=_PHASES)
@given(st.lists(LINE, min_size=2, max_size=10))
def test_hostile_input_real_models(tiny_pair: Any, lines: list[bytes]) -> None:
    """The real annotate task: huge texts are truncated (and flagged), identical
    responses tie, one response is scored alone; every line is accounted for."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        inp = _write_input(d, lines, True)
        out = d / "out.jsonl"
        run(RunConfig(input=str(inp), output=str(out)), parse_line, AnnotateTask(tiny_pair))
        rows, rej = check_conservation(lines, out, with_lines=False)
        event(f"records scored: {min(len(rows), 4)}{'+' if len(rows) >= 4 else ''}")
        for o in rows:
            texts = o.get("responses")
            if texts is not None and len(texts) > 1 and all(t == texts[0] for t in texts):
                event("identical responses")
                assert o["tie"] and o["margin"] == 0
            if len(o["scores"]) == 1:
                event("one response")
                assert "chosen" not in o and "margin" not in o
            n_ctx = tiny_pair.settings.n_ctx
            for s in o["scores"]:
                if not s["truncated"]:
                    assert s["strong_tokens"] < n_ctx and s["weak_tokens"] < n_ctx
            big = len(orjson.dumps(o["prompt"])) > 5_000 or any(s["chars"] > 5_000 for s in o["scores"])
            if big:
                event("huge text, truncated")
                assert o["truncated"]
