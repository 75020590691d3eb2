"""pipeline.run with the real annotate task on tiny GGUF models (real llama.cpp, no mocks).

Covers output shape and order, rejects, count conservation, the meta sidecar,
resume (after --limit, a torn line, an interruption, a failure), the output
lock and stdout mode.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from cdr_local.annotate import AnnotateTask
from cdr_local.errors import CdrError
from cdr_local.models import load_registry
from cdr_local.pair import LoadedPair, settings_from
from cdr_local.pipeline import (
    Output,
    RecordError,
    RunConfig,
    RunSummary,
    meta_path,
    rejects_path,
    run,
)
from cdr_local.records import Record, parse_line


def _j(obj: Any) -> bytes:
    return orjson.dumps(obj)


# line number -> content; blank lines are skipped (neither output nor reject)
LINES: list[bytes] = [
    _j(
        {
            "id": "a1",
            "prompt": "What is the capital of France?",
            "chosen": "Paris.",
            "rejected": "London, obviously.",
        }
    ),  # 1
    b'{"id": "b1", "prompt": "broken',  # 2 bad JSON
    _j(
        {
            "id": "a2",
            "prompt": "Say hello",
            "response_a": "Hello world",
            "response_b": "Goodbye, and the end.",
        }
    ),  # 3
    b"",  # 4 blank
    _j({"id": "m1", "prompt": "p", "chosen": "only one"}),  # 5 missing field
    _j(
        {"id": "a3", "prompt": "Count to three", "responses": ["one two three", "1 2 3", "three"]}
    ),  # 6
    _j({"id": "e1", "prompt": "p", "chosen": "   ", "rejected": "r"}),  # 7 empty response
    b'{"id": "u1", "prompt": "caf\xe9 \xff", "chosen": "a", "rejected": "b"}',  # 8 invalid UTF-8
    _j(
        {
            "id": "a4",
            "prompt": [{"role": "user", "content": "Hi there"}],
            "chosen": [{"role": "assistant", "content": "Hello! How can I help you?"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        }
    ),  # 9
    _j(
        {"id": "a1", "prompt": "another record, same id", "chosen": "x", "rejected": "y"}
    ),  # 10 duplicate id
    _j(
        {
            "prompt": "No id: a content hash is used",
            "chosen": "the end is near",
            "rejected": "you and the world",
        }
    ),  # 11
    _j(
        {
            "id": 7,
            "prompt": "Integer id",
            "chosen": "seven",
            "rejected": "eight",
            "source": "extra field",
        }
    ),  # 12
    _j(
        {
            "id": "a6",
            "prompt": "Why is the sky blue?",
            "chosen": "Rayleigh scattering.",
            "rejected": "Because it is.",
        }
    ),  # 13
    b"   ",  # 14 blank
    _j({"id": "a7", "prompt": "Name a colour", "responses": ["red", "green"]}),  # 15
]
BAD = {
    2: "invalid JSON",
    5: "missing field 'rejected'",
    7: "empty response",
    8: "invalid UTF-8",
    10: "duplicate id",
}
N_GOOD = 8


@dataclass
class Env:
    pair: LoadedPair
    meta: dict[str, Any]
    numerics: dict[str, Any]
    input: Path
    ref: bytes  # output of an uninterrupted run
    ref_rejects: bytes
    ref_meta: dict[str, Any]


@pytest.fixture(scope="module")
def env(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("pipeline")
    inp = d / "in.jsonl"
    inp.write_bytes(b"\n".join(LINES) + b"\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDR_HOME", str(d / "home"))  # the sha256 cache stays hermetic
        reg = load_registry(tiny_registry)
        pair = LoadedPair(reg, "tiny", settings_from(reg))
        meta = {"command": "annotate", "input": str(inp), **pair.metadata()}
        numerics = pair.numerics()
        out = d / "ref.jsonl"
        cfg = RunConfig(input=str(inp), output=str(out), meta=meta, numerics=numerics)
        run(cfg, parse_line, AnnotateTask(pair))
    e = Env(
        pair,
        meta,
        numerics,
        inp,
        out.read_bytes(),
        rejects_path(str(out)).read_bytes(),
        orjson.loads(meta_path(str(out)).read_bytes()),
    )
    yield e
    pair.close()


def cfg_for(env: Env, out: Path | str, **kw: Any) -> RunConfig:
    return RunConfig(
        input=str(env.input), output=str(out), meta=env.meta, numerics=env.numerics, **kw
    )


def lines_of(data: bytes) -> list[dict[str, Any]]:
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return [orjson.loads(x) for x in data.splitlines()]


class Wrap:
    """The real annotate task, with a fault injected at one record."""

    def __init__(
        self,
        inner: AnnotateTask,
        *,
        at: int | None = None,
        exc: BaseException | None = None,
        fail_id: str | None = None,
    ):
        self.inner, self.at, self.exc, self.fail_id = inner, at, exc, fail_id
        self.calls = 0

    def process(self, record: Record) -> tuple[dict[str, Any], dict[str, float]]:
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            assert self.exc is not None
            raise self.exc
        if record.id == self.fail_id:
            raise RecordError("template exploded")
        return self.inner.process(record)


# ---------------------------------------------------------------------------
# outputs and rejects
# ---------------------------------------------------------------------------


def test_outputs_in_order_with_trl_fields(env: Env) -> None:
    out = lines_of(env.ref)
    assert len(out) == N_GOOD
    ids = [o["id"] for o in out]
    assert ids[:4] == ["a1", "a2", "a3", "a4"]
    assert len(ids[4]) == 16 and all(c in "0123456789abcdef" for c in ids[4])  # content id
    assert ids[5:] == ["7", "a6", "a7"]
    srcs = {
        orjson.loads(raw).get("id", None): orjson.loads(raw)
        for raw in (LINES[0], LINES[2], LINES[5], LINES[8])
    }
    for o in out:
        assert set(o) >= {"id", "prompt", "chosen", "rejected", "margin", "scores", "label", "tie"}
        assert o["margin"] >= 0
        rewards = [s["reward"] for s in o["scores"]]
        assert o["margin_value"] == pytest.approx(max(rewards) - min(rewards))
        assert all(s["strong_tokens"] > 0 and s["weak_tokens"] > 0 for s in o["scores"])
    first = out[0]
    assert first["prompt"] == srcs["a1"]["prompt"]
    assert {first["chosen"], first["rejected"]} == {"Paris.", "London, obviously."}
    assert first["input_format"] == "chosen_rejected" and isinstance(first["agree"], bool)
    assert len(out[2]["scores"]) == 3 and out[2]["chosen"] in srcs["a3"]["responses"]
    # conversational input -> conversational (TRL) output
    assert out[3]["prompt"] == srcs["a4"]["prompt"]
    assert out[3]["chosen"][0]["role"] == "assistant" and isinstance(out[3]["chosen"], list)
    assert out[5]["source"] == "extra field"  # extra input fields pass through


def test_rejects_have_line_numbers_and_reasons(env: Env) -> None:
    rej = lines_of(env.ref_rejects)
    assert [r["line"] for r in rej] == sorted(BAD)
    for r in rej:
        assert BAD[r["line"]] in r["reason"], r
    dup = next(r for r in rej if r["line"] == 10)
    assert dup["id"] == "a1"


def test_count_conservation(env: Env) -> None:
    nonblank = [i for i, x in enumerate(LINES, 1) if x.strip()]
    out, rej = lines_of(env.ref), lines_of(env.ref_rejects)
    assert len(out) + len(rej) == len(nonblank)
    # every non-blank line lands in exactly one place
    rejected = {r["line"] for r in rej}
    assert len(rejected) == len(rej)
    assert rejected <= set(nonblank)
    assert len(set(nonblank) - rejected) == len(out)


def test_task_record_error_becomes_reject(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    s = run(cfg_for(env, out), parse_line, Wrap(AnnotateTask(env.pair), fail_id="a2"))
    assert s.done == N_GOOD - 1 and s.rejected == len(BAD) + 1
    assert [o["id"] for o in lines_of(out.read_bytes())] == [
        o["id"] for o in lines_of(env.ref) if o["id"] != "a2"
    ]
    rej = {r["line"]: r for r in lines_of(rejects_path(str(out)).read_bytes())}
    assert rej[3]["reason"] == "template exploded" and rej[3]["id"] == "a2"


# ---------------------------------------------------------------------------
# meta sidecar
# ---------------------------------------------------------------------------


def test_meta_sidecar(env: Env, tiny_bos_model: Path, tiny_nobos_model: Path) -> None:
    import llama_cpp

    m = env.ref_meta
    assert m["status"] == "complete"
    assert m["engine"] == env.pair.settings.to_json()
    assert m["engine"]["n_ctx"] == 512 and m["engine"]["n_threads"] == 1
    assert (
        m["models"]["strong"]["sha256"] == hashlib.sha256(tiny_bos_model.read_bytes()).hexdigest()
    )
    assert (
        m["models"]["weak"]["sha256"] == hashlib.sha256(tiny_nobos_model.read_bytes()).hexdigest()
    )
    assert m["llama_cpp_python"] == llama_cpp.__version__
    assert m["input_sha256"] == hashlib.sha256(env.input.read_bytes()).hexdigest()
    assert m["numerics"] == env.numerics
    seconds = m["counts"].pop("seconds_this_run")
    assert isinstance(seconds, float) and seconds > 0
    assert m["counts"] == {
        "written_this_run": N_GOOD,
        "already_done": 0,
        "rejected_this_run": len(BAD),
        "abstained_this_run": 0,
        "truncated_this_run": 0,
    }


# ---------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------


def test_resume_after_limit_is_byte_identical(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    s = run(cfg_for(env, out, limit=3), parse_line, AnnotateTask(env.pair))
    assert s.done == 3
    assert out.read_bytes() == b"".join(env.ref.splitlines(keepends=True)[:3])
    s = run(cfg_for(env, out, resume=True), parse_line, AnnotateTask(env.pair))
    # the limited run stopped at line 7: the resumed one records the rejects after it, once
    assert (s.resumed, s.done, s.rejected) == (3, N_GOOD - 3, len([n for n in BAD if n > 6]))
    assert out.read_bytes() == env.ref
    assert rejects_path(str(out)).read_bytes() == env.ref_rejects
    meta = orjson.loads(meta_path(str(out)).read_bytes())
    assert meta["status"] == "complete" and meta["counts"]["already_done"] == 3

    # resuming a finished run does nothing and duplicates nothing
    s = run(cfg_for(env, out, resume=True), parse_line, AnnotateTask(env.pair))
    assert (s.resumed, s.done, s.rejected) == (N_GOOD, 0, 0)
    assert out.read_bytes() == env.ref
    assert rejects_path(str(out)).read_bytes() == env.ref_rejects


def test_resume_repairs_torn_lines(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    run(cfg_for(env, out, limit=3), parse_line, AnnotateTask(env.pair))
    line4 = env.ref.splitlines(keepends=True)[3]
    with open(out, "ab") as f:  # a kill in the middle of writing record 4
        f.write(line4[: len(line4) // 2])
    rp = rejects_path(str(out))
    rej = rp.read_bytes()
    last = rej[:-1].rfind(b"\n") + 1
    rp.write_bytes(rej[: last + (len(rej) - last) // 2])  # ... and of the last reject
    s = run(cfg_for(env, out, resume=True), parse_line, AnnotateTask(env.pair))
    assert s.resumed == 3 and s.rejected == 1 + len([n for n in BAD if n > 6])  # the torn one again
    assert out.read_bytes() == env.ref
    assert rp.read_bytes() == env.ref_rejects


def test_resume_after_interrupt(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    s = run(
        cfg_for(env, out), parse_line, Wrap(AnnotateTask(env.pair), at=4, exc=KeyboardInterrupt())
    )
    assert s.interrupted and s.done == 3
    assert out.read_bytes() == b"".join(env.ref.splitlines(keepends=True)[:3])
    assert orjson.loads(meta_path(str(out)).read_bytes())["status"] == "interrupted"
    run(cfg_for(env, out, resume=True), parse_line, AnnotateTask(env.pair))
    assert out.read_bytes() == env.ref
    assert rejects_path(str(out)).read_bytes() == env.ref_rejects
    assert orjson.loads(meta_path(str(out)).read_bytes())["status"] == "complete"


def test_failure_is_not_marked_complete(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(
            cfg_for(env, out),
            parse_line,
            Wrap(AnnotateTask(env.pair), at=2, exc=RuntimeError("disk on fire")),
        )
    assert orjson.loads(meta_path(str(out)).read_bytes())["status"] == "failed"
    assert len(lines_of(out.read_bytes())) == 1
    run(cfg_for(env, out, resume=True), parse_line, AnnotateTask(env.pair))
    assert out.read_bytes() == env.ref


def test_existing_output_needs_resume_or_overwrite(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_bytes(b"junk that is not json\n")
    with pytest.raises(CdrError, match="--resume"):
        run(cfg_for(env, out), parse_line, AnnotateTask(env.pair))
    assert out.read_bytes() == b"junk that is not json\n"
    rp = rejects_path(str(out))
    rp.write_bytes(b'{"line":99,"reason":"stale"}\n')
    run(cfg_for(env, out, overwrite=True), parse_line, AnnotateTask(env.pair))
    assert out.read_bytes() == env.ref
    assert rp.read_bytes() == env.ref_rejects


def test_fresh_run_replaces_stale_rejects(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    rp = rejects_path(str(out))
    rp.write_bytes(env.ref_rejects)  # left by an earlier run whose output was removed
    run(cfg_for(env, out), parse_line, AnnotateTask(env.pair))
    assert rp.read_bytes() == env.ref_rejects


def test_resume_with_different_numerics_needs_force(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    run(cfg_for(env, out, limit=3), parse_line, AnnotateTask(env.pair))
    before = out.read_bytes()
    changed = replace(
        cfg_for(env, out, resume=True), numerics={**env.numerics, "engine.n_ctx": 1024}
    )
    with pytest.raises(CdrError, match="--force") as ei:
        run(changed, parse_line, AnnotateTask(env.pair))
    assert "engine.n_ctx: 512 -> 1024" in str(ei.value)
    assert out.read_bytes() == before
    run(replace(changed, force=True), parse_line, AnnotateTask(env.pair))
    assert out.read_bytes() == env.ref


def test_missing_input_is_a_user_error(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    for bad in (tmp_path / "nope.jsonl", tmp_path):
        cfg = replace(cfg_for(env, out), input=str(bad))
        with pytest.raises(CdrError, match="cannot read input"):
            run(cfg, parse_line, AnnotateTask(env.pair))
    assert not out.exists() and not meta_path(str(out)).exists()


# ---------------------------------------------------------------------------
# one writer per output
# ---------------------------------------------------------------------------


def test_lock_in_process(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    holder = Output(cfg_for(env, out))
    holder.open()
    try:
        with pytest.raises(CdrError, match="another cdr process"):
            Output(cfg_for(env, out, resume=True)).open()
        with pytest.raises(CdrError, match="another cdr process"):
            run(cfg_for(env, out, overwrite=True), parse_line, AnnotateTask(env.pair))
    finally:
        holder.close(RunSummary())
    run(cfg_for(env, out, resume=True), parse_line, AnnotateTask(env.pair))  # free again
    assert out.read_bytes() == env.ref


def test_lock_across_processes(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    code = (
        "import sys\n"
        "from cdr_local.pipeline import Output, RunConfig\n"
        f"o = Output(RunConfig(input={str(env.input)!r}, output={str(out)!r}))\n"
        "o.open(); print('locked', flush=True); sys.stdin.read()\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == b"locked\n"
        with pytest.raises(CdrError, match="another cdr process"):
            run(cfg_for(env, out, resume=True), parse_line, AnnotateTask(env.pair))
    finally:
        p.communicate(b"", timeout=30)
    run(cfg_for(env, out, resume=True), parse_line, AnnotateTask(env.pair))
    assert out.read_bytes() == env.ref


# ---------------------------------------------------------------------------
# stdout
# ---------------------------------------------------------------------------


def test_stdout_mode(
    env: Env,
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    s = run(cfg_for(env, "-"), parse_line, AnnotateTask(env.pair))
    cap = capsysbinary.readouterr()
    assert s.done == N_GOOD
    assert [o["id"] for o in lines_of(cap.out)] == [o["id"] for o in lines_of(env.ref)]
    assert cap.out == env.ref
    for line in BAD:
        assert f"rejected line {line}:".encode() in cap.err
    assert not [
        p for p in tmp_path.iterdir() if p.suffix in (".jsonl", ".json")
    ]  # no sidecars for stdout


def test_stdout_cannot_resume(env: Env) -> None:
    with pytest.raises(CdrError, match="stdout"):
        run(cfg_for(env, "-", resume=True), parse_line, AnnotateTask(env.pair))


def test_idset_matches_python_set():
    import random

    from cdr_local.pipeline import IdSet, id_key

    rng = random.Random(3)
    ids = [str(rng.randrange(10**6)) for _ in range(20_000)]
    s, ref = IdSet(capacity=8), set()
    for rid in ids:
        k = id_key(rid)
        assert (k in s) == (k in ref)
        s.add(k)
        ref.add(k)
    assert len(s) == len(ref)
    assert all(id_key(r) in s for r in ids)
    assert id_key("never-added-id") not in s


def test_idset_sized_up_front_never_grows() -> None:
    """A run sizes its id set from the line count: no resize, so peak memory does not step up."""
    from cdr_local.pipeline import IdSet

    s = IdSet.for_items(10_000)
    cap = len(s._slots)
    for k in range(1, 20_001, 2):
        s.add(k)
    assert len(s) == 10_000 and len(s._slots) == cap
    assert all(k in s for k in range(1, 20_001, 2)) and 2 not in s
