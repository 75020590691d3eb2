"""Crash and resume, one writer per output, and determinism, through the real ``cdr``.

Every long-running command (annotate, eval, pairs, synth) runs as a subprocess
on tiny GGUF models and is killed with SIGKILL again and again at moments
drawn with a fixed seed: during start-up (import, model load, the torn-tail
repair and the id scan of a resume, the metadata write) and after a random
number of output lines plus a random fraction of a record (mid-record,
mid-write).  Each kill is followed by ``--resume``, which is itself killed
next.  When the chain ends, the output, the rejects and the reports must be
byte-identical to an uninterrupted run's.

The soak variants are marked ``soak``.  ``CDR_SOAK=N`` multiplies the number of
kill points and the size of the inputs (CI runs N=1: 20 kill points over the four
commands, about 30 s).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_cli import CDR, _env, _lines, assert_user_error, cdr, jsonl

SOAK = max(1, int(os.environ.get("CDR_SOAK", "1")))
KILLS = {"annotate": 8, "eval": 4, "pairs": 4, "synth": 4}  # x SOAK

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up"
).split()


def _words(r: random.Random, a: int, b: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(r.randint(a, b)))


def _inputs(command: str) -> tuple[list[bytes], int]:
    """(input lines, number of output lines an uninterrupted run writes)."""
    r = random.Random(command)
    recs: list[dict[str, Any]] = []
    n = {"annotate": 40, "eval": 24, "pairs": 16, "synth": 16}[command] * SOAK
    for i in range(n):
        if command == "synth":
            rec: dict[str, Any] = {"id": f"s{i}", "prompt": _words(r, 4, 10).capitalize() + "?"}
        elif command == "pairs":
            resp = [_words(r, 10, 30) for _ in range(3)]
            rec = {"id": f"p{i}", "prompt": _words(r, 5, 12) + "?", "responses": resp}
        else:
            rec = {"id": f"{command[0]}{i}", "prompt": _words(r, 6, 20) + "?",
                   "chosen": _words(r, 20, 50), "rejected": _words(r, 20, 50)}  # fmt: skip
            if command == "eval":
                rec.update(section=["Chat", "Safety"][i % 2], subset=f"{i % 2}-{i % 3}")
            if command == "annotate" and i % 10 == 3:  # the other shapes too
                rec = {"id": rec["id"], "prompt": [{"role": "user", "content": rec["prompt"]}],
                       "responses": [rec["chosen"], rec["rejected"], rec["chosen"][:20]]}  # fmt: skip
        recs.append(rec)
    lines = [orjson.dumps(rec) for rec in recs]
    # bad lines in the middle: each must end in the rejects file exactly once
    lines.insert(n // 4, b'{"id": "torn", "prompt": ')
    lines.insert(n // 2, b"\xff\xfe not utf-8")
    lines.insert(3 * n // 4, orjson.dumps({**recs[1], "prompt": "another prompt, the same id"}))
    return lines, n


def _args(command: str, inp: Path, out: Path, reg: Path) -> list[Any]:
    extra: list[Any] = {
        "annotate": [],
        "eval": ["--bootstrap", 200],
        "pairs": ["--strategy", "real-easy", "--pair", "tiny"],
        "synth": ["--max-tokens", 24, "--verify", "tiny", "--template", "rewrite"],
    }[command]
    return [command, inp, "-o", out, "--models", reg, "--threads", 1, "-q", *extra]


def _artifacts(out: Path) -> dict[str, bytes]:
    """Everything a finished run leaves, but the metadata's timings."""
    stem = str(out)[: -len(".jsonl")]
    found = {}
    for name in (str(out), stem + ".rejects.jsonl", stem + ".report.json", str(out) + ".synth-report.json"):
        if os.path.exists(name):
            found[name[len(stem) :]] = Path(name).read_bytes()
    return found


@dataclass
class Reference:
    command: str
    input: Path
    n: int  # output lines
    artifacts: dict[str, bytes]
    t_first: float  # seconds from start to the first output line
    t_record: float  # seconds per record after that
    kills: list[str] = field(default_factory=list)


def _reference(command: str, reg: Path, d: Path) -> Reference:
    lines, n = _inputs(command)
    inp = d / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    out = d / "ref.jsonl"
    env = _env(d / "ref-home")
    t0 = time.monotonic()
    proc = subprocess.Popen([*CDR, *map(str, _args(command, inp, out, reg))], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    t_first = None
    while proc.poll() is None:
        if t_first is None and _lines(out) > 0:
            t_first = time.monotonic() - t0
        time.sleep(0.002)
    t_total = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    arts = _artifacts(out)
    assert len(jsonl(arts[".jsonl"])) == n
    assert len(jsonl(arts[".rejects.jsonl"])) == 3
    t_first = t_first or t_total
    return Reference(command, inp, n, arts, t_first, max(1e-3, (t_total - t_first) / n))


def _check_partial(ref: Reference, out: Path) -> bool:
    """What a killed run left: complete lines of the reference, then at most a torn
    piece of the next one (returned: whether there is one)."""
    torn = False
    for suffix in (".jsonl", ".rejects.jsonl"):
        path = Path(str(out)[: -len(".jsonl")] + suffix)
        if path.exists():
            data = path.read_bytes()
            done = data[: data.rfind(b"\n") + 1]
            assert ref.artifacts[suffix].startswith(done), suffix
            assert ref.artifacts[suffix][len(done) :].startswith(data[len(done) :]), f"{suffix}: torn tail is not a prefix"
            torn = torn or len(done) < len(data)
    meta = Path(str(out) + ".meta.json")
    if meta.exists():
        assert orjson.loads(meta.read_bytes())["status"] in ("running", "complete")  # atomic: never torn
    return torn


def _tear(out: Path, ref: bytes, rng: random.Random) -> bool:
    """Leave what a kill in the middle of write() leaves: a piece of the next line.
    (A real kill rarely lands there: the tiny models write fast.)"""
    data = out.read_bytes() if out.exists() else b""
    nxt = ref[len(data) : ref.find(b"\n", len(data)) + 1]
    if not nxt:
        return False
    with open(out, "ab") as f:
        f.write(nxt[: rng.randint(1, len(nxt) - 1)])
    return True


def _kill_chain(ref: Reference, reg: Path, d: Path, n_kills: int) -> Reference:
    """Kill, resume, kill the resume, ... n_kills times; then let a resume finish."""
    rng = random.Random(f"{ref.command}-{n_kills}")
    out = d / "out.jsonl"
    args = [*map(str, _args(ref.command, ref.input, out, reg))]
    env = _env(d / "home")
    started = False
    while len(ref.kills) < n_kills:
        done = max(0, _lines(out))
        proc = subprocess.Popen([*CDR, *args, *(["--resume"] if started else [])], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        started = True
        if rng.random() < 0.4 or done >= ref.n - 3:
            # during start-up: before the first new line is due
            delay = rng.uniform(0, 0.9 * ref.t_first)
            moment = f"t={delay:.3f}s"
            time.sleep(delay)
        else:
            # spread the kill points over the run
            step = max(1, 2 * (ref.n - 3 - done) // (n_kills - len(ref.kills) + 1))
            target = rng.randint(done + 1, min(ref.n - 3, done + step))
            extra = rng.uniform(0, ref.t_record)
            moment = f"line {target}+{extra * 1000:.0f}ms"
            t_end = time.monotonic() + 120
            while _lines(out) < target and proc.poll() is None and time.monotonic() < t_end:
                time.sleep(0.0005)
            time.sleep(extra)
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            assert proc.returncode == 0, err
            ref.kills.append(f"{moment} (finished first)")
            continue
        proc.kill()
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        if _check_partial(ref, out):
            moment += " torn"
        elif rng.random() < 0.5 and _tear(out, ref.artifacts[".jsonl"], rng):
            moment += " +torn"
        ref.kills.append(moment)
    p = cdr(*args, "--resume", home=d / "home", timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    final = _artifacts(out)
    ids = [r["id"] for r in jsonl(final[".jsonl"])]
    assert len(ids) == len(set(ids)) == ref.n  # no duplicates, nothing lost
    assert final == ref.artifacts, ref.kills  # byte-identical: output, rejects, reports
    assert orjson.loads(Path(str(out) + ".meta.json").read_bytes())["status"] == "complete"
    return ref


@pytest.mark.soak
@pytest.mark.parametrize("command", sorted(KILLS))
def test_random_sigkills_then_resume(command: str, tiny_registry: Path, tmp_path: Path) -> None:
    ref = _reference(command, tiny_registry, tmp_path)
    ref = _kill_chain(ref, tiny_registry, tmp_path, KILLS[command] * SOAK)
    finished = [k for k in ref.kills if "finished" in k]
    print(f"{command}: {len(ref.kills) - len(finished)} SIGKILLs at {ref.kills}")
    assert len(finished) <= len(ref.kills) // 4, ref.kills  # nearly every kill point was a kill


# ---------------------------------------------------------------------------
# One writer per output
# ---------------------------------------------------------------------------


def test_second_writer_is_refused(tiny_registry: Path, tmp_path: Path) -> None:
    """While one `cdr annotate` writes an output, a second one (resume or overwrite)
    is refused with one line, and the first one's files are untouched."""
    r = random.Random(4)
    ids = [f"u{i}" for i in range(400)]  # long enough to outlive the second process
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"".join(
        orjson.dumps({"id": i, "prompt": _words(r, 5, 10), "chosen": _words(r, 20, 40), "rejected": _words(r, 20, 40)}) + b"\n"
        for i in ids
    ) + b"not json\n")  # fmt: skip
    out = tmp_path / "out.jsonl"
    args = [*map(str, _args("annotate", inp, out, tiny_registry))]
    first = subprocess.Popen([*CDR, *args], env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        t_end = time.monotonic() + 60
        while _lines(out) < 2:
            assert first.poll() is None and time.monotonic() < t_end
            time.sleep(0.002)
        def sidecar() -> dict[str, object]:  # the writer checkpoints its input about once a second
            return {k: v for k, v in orjson.loads(Path(str(out) + ".meta.json").read_bytes()).items() if k != "input_prefix"}

        meta = sidecar()
        for flag in ("--resume", "--overwrite"):
            line = assert_user_error(cdr(*args, flag))
            assert line == f"cdr: error: {out} is being written by another cdr process (locked)"
            assert first.poll() is None, "the first process must still be writing"
        assert sidecar() == meta
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err.decode()
    rows = jsonl(out.read_bytes())
    assert 2 <= len(rows) < len(ids)
    assert [r["id"] for r in rows] == ids[: len(rows)]  # in order, no gap, nothing written twice
    assert orjson.loads(Path(str(out) + ".meta.json").read_bytes())["status"] == "interrupted"


# ---------------------------------------------------------------------------
# Determinism and the settings guard
# ---------------------------------------------------------------------------


def test_two_runs_are_byte_identical(tiny_registry: Path, tmp_path: Path) -> None:
    lines, n = _inputs("annotate")
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}.jsonl"
        p = cdr(*_args("annotate", inp, out, tiny_registry), home=tmp_path / f"home{i}")
        assert p.returncode == 0, p.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and len(jsonl(outs[0])) == n
    meta = orjson.loads(Path(str(out) + ".meta.json").read_bytes())
    import llama_cpp

    numerics = meta["numerics"]
    assert numerics["llama_cpp_python"] == llama_cpp.__version__
    for k in ("n_batch", "n_ubatch", "n_gpu_layers", "n_ctx", "flash_attn", "parallel_responses"):
        assert f"engine.{k}" in numerics, k
        assert meta["engine"][k] == numerics[f"engine.{k}"]
    assert "engine.n_threads" not in numerics and meta["engine"]["n_threads"] == 1  # recorded, not guarded


def test_resume_on_other_threads_gives_the_same_bytes(tiny_registry: Path, tmp_path: Path) -> None:
    """Thread count changes no score, so it is not in the resume guard: a run on 1
    thread resumed on 2 (and 3) gives the bytes of an uninterrupted 1-thread run."""
    lines, _ = _inputs("annotate")
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    assert cdr(*_args("annotate", inp, ref, tiny_registry)).returncode == 0
    assert cdr(*_args("annotate", inp, out, tiny_registry), "--limit", "3").returncode == 0
    assert cdr(*_args("annotate", inp, out, tiny_registry), "--limit", "3", "--resume", "--threads", "2").returncode == 0
    assert cdr(*_args("annotate", inp, out, tiny_registry), "--resume", "--threads", "3").returncode == 0
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize(
    "flag, value, key",
    [
        ("--n-batch", "32", "engine.n_batch: 64 -> 32"),
        ("--n-ubatch", "32", "engine.n_ubatch: 64 -> 32"),
        ("--n-gpu-layers", "1", "engine.n_gpu_layers: 0 -> 1"),
        ("--n-ctx", "1024", "engine.n_ctx: 512 -> 1024"),
        ("library", "0.0.1", "llama_cpp_python: '0.0.1' -> "),
    ],
)
def test_resume_with_other_numerics_is_refused(
    flag: str, value: str, key: str, tiny_registry: Path, tmp_path: Path
) -> None:
    lines, _ = _inputs("annotate")
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    args = [*_args("annotate", inp, out, tiny_registry), "--limit", "3"]
    assert cdr(*args).returncode == 0
    before = out.read_bytes()
    if flag == "library":  # as if the first run had used another llama-cpp-python
        meta = Path(str(out) + ".meta.json")
        m = orjson.loads(meta.read_bytes())
        m["numerics"]["llama_cpp_python"] = value
        meta.write_bytes(orjson.dumps(m))
        extra: list[str] = []
    else:
        extra = [flag, value]
    line = assert_user_error(cdr(*args, "--resume", *extra))
    assert "settings that change scores differ" in line and key in line and "--force" in line, line
    assert out.read_bytes() == before
    p = cdr(*args, "--resume", "--force", *extra)
    assert p.returncode == 0, p.stderr
    assert len(jsonl(out.read_bytes())) == 6
