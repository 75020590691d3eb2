"""The real ``cdr`` console script, run as a subprocess on tiny GGUF models.

Startup time, exit codes, one-line user errors, quiet llama.cpp, stdout mode,
and SIGKILL / SIGINT at several points followed by ``--resume``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "pairs.jsonl"

_script = Path(sys.executable).parent / "cdr"
CDR: list[str] = (
    [str(_script)]
    if _script.exists()
    else [sys.executable, "-c", "from cdr_local.cli import main; main()"]
)

CHATTER = (
    "llama_",
    "load_tensors",
    "print_info",
    "llm_load",
    "ggml_",
    "gguf_",
    "load:",
    "init_tokenizer",
)


def _env(home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("CDR_MODELS", "CDR_CACHE_DIR", "CDR_LLAMA_LOG"):
        env.pop(k, None)
    if home is not None:
        env["CDR_HOME"] = str(home)
    return env


def cdr(
    *args: Any, home: Path | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CDR, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(home),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def popen(*args: Any) -> subprocess.Popen[bytes]:
    # SIGINT must reach Python's default handler even if the test runner was
    # started with SIGINT ignored (a background job in a non-interactive shell)
    return subprocess.Popen(
        [*CDR, *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def assert_clean_stderr(err: str) -> None:
    assert "Traceback" not in err, err
    bad = [ln for ln in err.splitlines() if ln.lstrip().startswith(CHATTER)]
    assert not bad, f"llama.cpp chatter on stderr: {bad[:5]}"


def assert_user_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdr: error:"), p.stderr
    return lines[0]


def jsonl(data: bytes) -> list[dict[str, Any]]:
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return [orjson.loads(x) for x in data.splitlines()]


# ---------------------------------------------------------------------------
# basics
# ---------------------------------------------------------------------------


def test_help_is_fast() -> None:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        p = cdr("--help")
        best = min(best, time.perf_counter() - t0)
        assert p.returncode == 0, p.stderr
        assert "annotate" in p.stdout and "score" in p.stdout
    # 0.13-0.16 s on an idle 2-core machine; the bound leaves room for a loaded one
    assert best < 1.0, f"cdr --help took {best:.3f} s (best of 3)"


def test_cli_start_imports_nothing_heavy() -> None:
    """What keeps `cdr --help` fast: the engine, numpy and the optional extras load lazily."""
    code = "import sys, cdr_local.cli; print(' '.join(m for m in ('numpy', 'llama_cpp', 'ray', 'torch', 'jinja2') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ""


@pytest.fixture(scope="module")
def examples_run(
    tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], Path]:
    d = tmp_path_factory.mktemp("examples")
    out = d / "out.jsonl"
    p = cdr(
        "annotate",
        EXAMPLES,
        "-o",
        out,
        "--models",
        tiny_registry,
        "--pair",
        "tiny",
        "--plain",
        home=d / "home",
    )
    return p, out


def test_annotate_examples(examples_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    p, out = examples_run
    assert p.returncode == 0, p.stderr
    assert_clean_stderr(p.stderr)
    rows = jsonl(out.read_bytes())
    assert len(rows) == 16
    src = [orjson.loads(x) for x in EXAMPLES.read_bytes().splitlines() if x.strip()]
    assert [r["id"] for r in rows] == [s["id"] for s in src]
    for r, s in zip(rows, src, strict=True):
        assert {r["chosen"], r["rejected"]} == {s["chosen"], s["rejected"]} and r["margin"] >= 0
    assert p.stdout == ""  # everything human-readable goes to stderr
    assert "cdr summary" in p.stderr
    meta = orjson.loads(Path(str(out) + ".meta.json").read_bytes())
    assert meta["status"] == "complete" and meta["pair"] == "tiny"


def test_annotate_to_stdout(
    tiny_registry: Path, tmp_path: Path, examples_run: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    p = cdr(
        "annotate", EXAMPLES, "-o", "-", "--models", tiny_registry, "--pair", "tiny", cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr
    assert_clean_stderr(p.stderr)
    assert p.stdout.encode() == examples_run[1].read_bytes()  # the same JSONL, on stdout only
    assert "cdr summary" in p.stderr and "records scored" in p.stderr
    assert '{"id"' not in p.stderr
    assert not [f for f in tmp_path.iterdir() if f.suffix in (".json", ".jsonl")]  # no sidecars


def test_score_json(tiny_registry: Path) -> None:
    p = cdr(
        "score",
        "--prompt",
        "What is two plus two?",
        "-r",
        "Four.",
        "-r",
        "Five, probably.",
        "--models",
        tiny_registry,
        "--json",
    )
    assert p.returncode == 0, p.stderr
    assert_clean_stderr(p.stderr)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    obj = orjson.loads(lines[0])
    assert isinstance(obj, dict) and len(obj["scores"]) == 2
    assert {obj["chosen"], obj["rejected"]} == {"Four.", "Five, probably."}


def test_models_list_and_check(tiny_registry: Path) -> None:
    p = cdr("models", "list", "--models", tiny_registry)
    assert p.returncode == 0, p.stderr
    assert "tiny-bos" in p.stdout and "tiny-nobos" in p.stdout
    p = cdr("models", "check", "--models", tiny_registry, "--pair", "tiny")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [ln.split()[:2] for ln in p.stdout.splitlines()] == [
        ["ok", "tiny-bos:"],
        ["ok", "tiny-nobos:"],
    ]


# ---------------------------------------------------------------------------
# user errors: one line, exit code 2, no traceback
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_registries(
    tiny_registry: Path, tiny_bos_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    from tinygguf import build_corrupt_variants

    d = tmp_path_factory.mktemp("bad")
    text = tiny_registry.read_text()
    assert str(tiny_bos_model) in text
    variants = {
        **build_corrupt_variants(d / "gguf", tiny_bos_model),
        "missing": d / "gguf" / "missing.gguf",
    }
    regs = {}
    for name, path in variants.items():
        regs[name] = d / f"{name}.toml"
        regs[name].write_text(text.replace(str(tiny_bos_model), str(path)))
    regs["malformed"] = d / "malformed.toml"
    regs["malformed"].write_text('default_pair = "tiny\n[models.x\npath = 3\n')
    regs["unknown_model"] = d / "unknown_model.toml"
    regs["unknown_model"].write_text(
        text + '\n[pairs.broken]\nstrong = "tiny-bos"\nweak = "no-such-model"\n'
    )
    return regs


@pytest.mark.parametrize(
    "variant", ["truncated", "random", "empty", "missing", "malformed", "unknown_model"]
)
def test_bad_registry_is_a_user_error(
    variant: str, bad_registries: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    line = assert_user_error(
        cdr("annotate", EXAMPLES, "-o", out, "--models", bad_registries[variant])
    )
    assert {"truncated": "tiny-bos", "random": "GGUF", "empty": "GGUF", "missing": "not found"}.get(
        variant, ""
    ) in line
    assert not out.exists()


@pytest.mark.parametrize("variant", ["random", "empty", "missing"])
def test_models_check_fails_on_bad_model(variant: str, bad_registries: dict[str, Path]) -> None:
    p = cdr("models", "check", "--models", bad_registries[variant], "--pair", "tiny")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "BAD tiny-bos" in p.stdout and "Traceback" not in p.stderr


def test_unknown_pair(tiny_registry: Path, tmp_path: Path) -> None:
    line = assert_user_error(
        cdr(
            "annotate",
            EXAMPLES,
            "-o",
            tmp_path / "o.jsonl",
            "--models",
            tiny_registry,
            "--pair",
            "nope",
        )
    )
    assert "nope" in line
    assert_user_error(
        cdr("score", "--prompt", "x", "-r", "y", "--models", tiny_registry, "--pair", "nope")
    )


def test_missing_input(tiny_registry: Path, tmp_path: Path) -> None:
    line = assert_user_error(
        cdr(
            "annotate",
            tmp_path / "absent.jsonl",
            "-o",
            tmp_path / "o.jsonl",
            "--models",
            tiny_registry,
        )
    )
    assert "absent.jsonl" in line
    assert_user_error(
        cdr("annotate", tmp_path, "-o", tmp_path / "o.jsonl", "--models", tiny_registry)
    )  # a directory
    assert not (tmp_path / "o.jsonl").exists()


def test_output_exists_without_resume(tiny_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "x"}\n')
    line = assert_user_error(cdr("annotate", EXAMPLES, "-o", out, "--models", tiny_registry))
    assert "--resume" in line
    assert out.read_text() == '{"id": "x"}\n'


# ---------------------------------------------------------------------------
# kills and resume
# ---------------------------------------------------------------------------

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word but not "
    "what all were we when your can said there use an each which she do how their if will up other about out many then "
    "them these so some her would make like him into time has look two more write go see number no way could people my "
    "than first water been call who oil its now find long down day did get come made may part"
).split()
N_RECORDS = 40
BAD_LINES = {6: b'{"id": "bad-json", ', 23: b'{"id": "no-rejected", "prompt": "p", "chosen": "c"}'}


@pytest.fixture(scope="module")
def kill_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = random.Random(1234)

    def words(a: int, b: int) -> str:
        return " ".join(r.choice(WORDS) for _ in range(r.randint(a, b)))

    lines: list[bytes] = []
    for i in range(N_RECORDS):
        while len(lines) + 1 in BAD_LINES:
            lines.append(BAD_LINES[len(lines) + 1])
        rec = {
            "id": f"r{i:02d}",
            "prompt": words(8, 25).capitalize() + "?",
            "chosen": words(30, 60) + ".",
            "rejected": words(30, 60) + ".",
        }
        lines.append(orjson.dumps(rec))
    p = tmp_path_factory.mktemp("kill") / "in.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def _annotate_args(inp: Path, out: Path, reg: Path, *extra: str) -> list[Any]:
    return ["annotate", inp, "-o", out, "--models", reg, "--threads", "1", "-q", *extra]


@pytest.fixture(scope="module")
def kill_reference(kill_input: Path, tiny_registry: Path) -> tuple[bytes, bytes]:
    out = kill_input.parent / "ref.jsonl"
    p = cdr(*_annotate_args(kill_input, out, tiny_registry), home=kill_input.parent / "home")
    assert p.returncode == 0, p.stderr
    ref = out.read_bytes()
    assert len(jsonl(ref)) == N_RECORDS
    return ref, (kill_input.parent / "ref.rejects.jsonl").read_bytes()


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return -1


def _wait_for(proc: subprocess.Popen[bytes], cond: Any, timeout: float = 60) -> None:
    t_end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(
                f"cdr finished before the kill point (rc {proc.returncode}): {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        if time.monotonic() > t_end:
            proc.kill()
            pytest.fail("timed out waiting for the kill point")
        time.sleep(0.001)


def _check_resumed(out: Path, ref: tuple[bytes, bytes], tiny_registry: Path, inp: Path) -> None:
    p = cdr(*_annotate_args(inp, out, tiny_registry, "--resume"))
    assert p.returncode == 0, p.stderr
    assert_clean_stderr(p.stderr)
    final = out.read_bytes()
    rows = jsonl(final)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == N_RECORDS
    assert final == ref[0]  # byte-identical, in input order
    rej = jsonl(Path(str(out)[: -len(".jsonl")] + ".rejects.jsonl").read_bytes())
    assert sorted(r["line"] for r in rej) == sorted(BAD_LINES)  # each reject once
    assert orjson.loads(Path(str(out) + ".meta.json").read_bytes())["status"] == "complete"


@pytest.mark.parametrize("kill_at", ["start", 0, 3, 11, 25])
def test_sigkill_then_resume(
    kill_at: str | int,
    kill_input: Path,
    kill_reference: tuple[bytes, bytes],
    tiny_registry: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.jsonl"
    proc = popen(*_annotate_args(kill_input, out, tiny_registry))
    if kill_at != "start":
        _wait_for(proc, lambda: _lines(out) >= int(kill_at))
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    if out.exists():
        partial = out.read_bytes()
        complete = partial[: partial.rfind(b"\n") + 1]
        assert kill_reference[0].startswith(complete)
        if kill_at != "start":
            assert complete.count(b"\n") >= int(kill_at)
        assert complete.count(b"\n") < N_RECORDS, "the run finished before it was killed"
    _check_resumed(out, kill_reference, tiny_registry, kill_input)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_then_resume(
    sig: int, kill_input: Path, kill_reference: tuple[bytes, bytes], tiny_registry: Path, tmp_path: Path
) -> None:
    """Ctrl-C, and SIGTERM from a scheduler or ``timeout``: a clean stop, then resume."""
    out = tmp_path / "out.jsonl"
    proc = popen(*_annotate_args(kill_input, out, tiny_registry))
    _wait_for(proc, lambda: _lines(out) >= 5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()
    assert "Traceback" not in err.decode()
    partial = out.read_bytes()
    n = len(jsonl(partial))  # no torn line after a clean stop
    assert 5 <= n < N_RECORDS
    assert kill_reference[0].startswith(partial)
    assert orjson.loads(Path(str(out) + ".meta.json").read_bytes())["status"] == "interrupted"
    _check_resumed(out, kill_reference, tiny_registry, kill_input)
