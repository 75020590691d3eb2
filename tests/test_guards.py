"""Nothing lost, nothing run: each reproduction of a data-loss or resume-identity
report becomes a test here (the real ``cdr`` on tiny models).

Every case checks the exit code, a one-line error, and that the files the
command was *not* asked to write are byte for byte what they were.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from test_cli import CDR, _env, cdr

GOOD = [
    {"id": f"r{i}", "prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}."} for i in range(6)
]
NO_IDS = [{k: v for k, v in r.items() if k != "id"} for r in GOOD]


def _write(p: Path, rows: list[dict[str, object]], extra: bytes = b"") -> bytes:
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows) + extra
    p.write_bytes(data)
    return data


def _one_line_error(r: subprocess.CompletedProcess[str], *want: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cdr: error: "), r.stderr
    for w in want:
        assert w in lines[0], lines[0]


# --------------------------------------------------------------------------- same files


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "dotted"])
@pytest.mark.parametrize("command", ["annotate", "eval", "pairs"])
def test_output_over_the_input_is_refused(command: str, link: str, tiny_registry: Path, tmp_path: Path) -> None:
    inp = tmp_path / "a.jsonl"
    data = _write(inp, GOOD)
    out = {"same": inp, "dotted": tmp_path / "." / "a.jsonl", "symlink": tmp_path / "l.jsonl", "hardlink": tmp_path / "h.jsonl"}[link]
    if link == "symlink":
        out.symlink_to(inp)
    if link == "hardlink":
        os.link(inp, out)
    r = cdr(command, inp, "-o", out, "--models", tiny_registry, "--overwrite")
    _one_line_error(r, "the input and the output are the same file")
    assert inp.read_bytes() == data


def test_resume_into_the_input_is_refused(tiny_registry: Path, tmp_path: Path) -> None:
    inp = tmp_path / "b.jsonl"
    data = _write(inp, NO_IDS)
    _one_line_error(cdr("annotate", inp, "-o", inp, "--models", tiny_registry, "--resume"), "same file")
    assert inp.read_bytes() == data


def test_default_rejects_path_that_is_the_input(tiny_registry: Path, tmp_path: Path) -> None:
    """`cdr annotate fix.rejects.jsonl -o fix.jsonl`: OUT.rejects.jsonl *is* the input."""
    inp = tmp_path / "fix.rejects.jsonl"
    data = _write(inp, GOOD)
    r = cdr("annotate", inp, "-o", tmp_path / "fix.jsonl", "--models", tiny_registry)
    _one_line_error(r, "the input and the rejects file are the same file")
    assert inp.read_bytes() == data
    assert not (tmp_path / "fix.jsonl").exists()


def test_rejects_equal_to_the_output(tiny_registry: Path, tmp_path: Path) -> None:
    inp = tmp_path / "m.jsonl"
    _write(inp, GOOD, b"not json\n")
    out = tmp_path / "out.jsonl"
    r = cdr("annotate", inp, "-o", out, "--rejects", out, "--models", tiny_registry)
    _one_line_error(r, "the output and the rejects file are the same file")
    assert not out.exists()
    r = cdr("annotate", inp, "-o", out, "--rejects", str(out) + ".meta.json", "--models", tiny_registry)
    _one_line_error(r, "rejects file and the metadata sidecar are the same file")


def test_eval_report_is_not_the_input(tiny_registry: Path, tmp_path: Path) -> None:
    """The report is written next to the output: it must not be the input either."""
    inp = tmp_path / "e.report.json"
    data = _write(inp, GOOD)
    r = cdr("eval", inp, "-o", tmp_path / "e.jsonl", "--models", tiny_registry)
    _one_line_error(r, "the input and the report are the same file")
    assert inp.read_bytes() == data


def test_bad_rejects_folder_fails_before_scoring(tiny_registry: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    _write(inp, GOOD)
    out = tmp_path / "o.jsonl"
    r = cdr("annotate", inp, "-o", out, "--rejects", tmp_path / "nope" / "r.jsonl", "--models", tiny_registry)
    _one_line_error(r, "rejects file's folder does not exist")
    assert not out.exists()


def test_output_that_is_not_a_regular_file(tiny_registry: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    _write(inp, GOOD)
    _one_line_error(cdr("annotate", inp, "-o", "/dev/null", "--models", tiny_registry), "character device", "-o -")
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    r = cdr("annotate", inp, "-o", fifo, "--models", tiny_registry, timeout=30)  # would hang if it opened it
    _one_line_error(r, "FIFO")


def test_resume_and_overwrite_exclude_each_other(tiny_registry: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    _write(inp, GOOD)
    _one_line_error(cdr("annotate", inp, "-o", tmp_path / "o.jsonl", "--resume", "--overwrite", "--models", tiny_registry),
                    "--resume and --overwrite")


# --------------------------------------------------------------------------- pipes


def test_process_substitution_input_is_streamed(tiny_registry: Path, tmp_path: Path) -> None:
    """`cdr annotate <(cat v1.jsonl)`: the line count must not consume the pipe."""
    inp = tmp_path / "v1.jsonl"
    _write(inp, GOOD)
    out = tmp_path / "p.jsonl"
    r = subprocess.run(["bash", "-c", '"$0" annotate <(cat "$1") -o "$2" --models "$3" -q', *CDR[:1], inp, out, tiny_registry],
                       capture_output=True, text=True, env=_env(), timeout=120) if len(CDR) == 1 else None
    if r is None:
        pytest.skip("needs the cdr console script")
    assert r.returncode == 0, r.stderr
    assert len(out.read_bytes().splitlines()) == len(GOOD)
    meta = orjson.loads((tmp_path / "p.jsonl.meta.json").read_bytes())
    assert meta["status"] == "complete" and meta["counts"]["written_this_run"] == len(GOOD)


def test_named_fifo_input_is_streamed(tiny_registry: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "o.jsonl"
    proc = subprocess.Popen([*CDR, "annotate", str(fifo), "-o", str(out), "--models", str(tiny_registry), "-q"],
                            env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:  # a FIFO opens for writing once a reader has it open: cdr must open it once, to read
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "cdr never opened the FIFO"
            time.sleep(0.02)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as f:
        f.write(b"".join(orjson.dumps(r) + b"\n" for r in GOOD))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(out.read_bytes().splitlines()) == len(GOOD)


def test_resume_from_a_pipe_is_refused(tiny_registry: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    _write(inp, GOOD)
    out = tmp_path / "o.jsonl"
    assert cdr("annotate", inp, "-o", out, "--models", tiny_registry, "--limit", "2", "-q").returncode == 0
    before = out.read_bytes()
    r = subprocess.run([*CDR, "annotate", "-", "-o", str(out), "--models", str(tiny_registry), "--resume", "-q"],
                       input=inp.read_bytes(), capture_output=True, env=_env(), timeout=120)
    assert r.returncode == 2 and b"from a pipe" in r.stderr
    assert out.read_bytes() == before


def test_per_section_needs_a_regular_file(tiny_registry: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    _one_line_error(cdr("eval", fifo, "-o", tmp_path / "e.jsonl", "--per-section", "2", "--models", tiny_registry, timeout=30),
                    "regular file")


# --------------------------------------------------------------------------- resume identity


def _run(inp: Path, out: Path, reg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cdr("annotate", inp, "-o", out, "--models", reg, "-q", *extra)


def test_resume_with_another_input_is_refused(tiny_registry: Path, tmp_path: Path) -> None:
    """`--limit 4` on v1.jsonl, then `--resume` with other.jsonl: refused, nothing merged."""
    v1, other, out = tmp_path / "v1.jsonl", tmp_path / "other.jsonl", tmp_path / "p.jsonl"
    _write(v1, GOOD)
    _write(other, [{**r, "id": "o" + str(r["id"])} for r in GOOD])
    assert _run(v1, out, tiny_registry, "--limit", "4").returncode == 0
    before = out.read_bytes()
    _one_line_error(_run(other, out, tiny_registry, "--resume"), "not the input this output came from", "--overwrite")
    assert out.read_bytes() == before


@pytest.mark.parametrize("change", ["insert", "delete", "edit", "bad-line"])
def test_resume_after_the_input_changed_is_refused(change: str, tiny_registry: Path, tmp_path: Path) -> None:
    inp, out = tmp_path / "v.jsonl", tmp_path / "p.jsonl"
    _write(inp, GOOD)
    assert _run(inp, out, tiny_registry, "--limit", "4").returncode == 0
    before = out.read_bytes()
    rows: list[dict[str, object]] = [dict(r) for r in GOOD]
    extra = b""
    if change == "insert":
        rows.insert(1, {"id": "new", "prompt": "New?", "chosen": "Yes.", "rejected": "No."})
    elif change == "delete":
        del rows[2]
    elif change == "edit":
        rows[1]["chosen"] = "A different answer."
    _write(inp, rows[:1], b"{bad json\n" + b"".join(orjson.dumps(r) + b"\n" for r in rows[1:])) if change == "bad-line" else _write(inp, rows, extra)
    _one_line_error(_run(inp, out, tiny_registry, "--resume"), "not the input this output came from")
    assert out.read_bytes() == before
    # --force resumes anyway (the user's call), and says nothing more
    assert _run(inp, out, tiny_registry, "--resume", "--force").returncode == 0


def test_resume_accepts_appended_lines(tiny_registry: Path, tmp_path: Path) -> None:
    inp, out, ref = tmp_path / "v.jsonl", tmp_path / "p.jsonl", tmp_path / "ref.jsonl"
    _write(inp, GOOD[:3])
    assert _run(inp, out, tiny_registry).returncode == 0
    _write(inp, GOOD)  # the same three lines, then three more
    assert _run(inp, out, tiny_registry, "--resume").returncode == 0
    assert _run(inp, ref, tiny_registry).returncode == 0
    assert out.read_bytes() == ref.read_bytes()


def test_resume_checks_the_checkpoint_of_a_killed_run(tiny_registry: Path, tmp_path: Path) -> None:
    """A run killed with SIGKILL never closes its sidecar: the checkpoint written
    with each fsync must still guard the resume."""
    inp, out = tmp_path / "v.jsonl", tmp_path / "p.jsonl"
    rows = [{"id": f"k{i}", "prompt": f"Tell me about {i}." * 3, "chosen": "Sure. " * 40, "rejected": "No."} for i in range(400)]
    _write(inp, rows)
    proc = subprocess.Popen([*CDR, "annotate", str(inp), "-o", str(out), "--models", str(tiny_registry), "-q"], env=_env())
    deadline = time.monotonic() + 60
    meta = Path(str(out) + ".meta.json")
    while time.monotonic() < deadline:
        if meta.exists() and orjson.loads(meta.read_bytes()).get("input_prefix", {}).get("lines", 0) > 0:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    prefix = orjson.loads(meta.read_bytes())["input_prefix"]
    assert prefix["lines"] > 0
    rows[0]["chosen"] = "Changed."
    _write(inp, rows)
    _one_line_error(_run(inp, out, tiny_registry, "--resume"), "not the input this output came from")


@pytest.mark.parametrize("sidecar", ["missing", "torn"])
def test_resume_without_a_readable_sidecar_needs_force(sidecar: str, tiny_registry: Path, tmp_path: Path) -> None:
    inp, out = tmp_path / "v.jsonl", tmp_path / "p.jsonl"
    _write(inp, GOOD)
    assert _run(inp, out, tiny_registry, "--limit", "2").returncode == 0
    meta = Path(str(out) + ".meta.json")
    if sidecar == "missing":
        meta.unlink()
    else:
        meta.write_bytes(meta.read_bytes()[:40])
    # another --n-ctx and another pair: the settings guard must not be skipped
    _one_line_error(_run(inp, out, tiny_registry, "--resume", "--n-ctx", "256", "--pair", "tiny-self"), sidecar if sidecar == "missing" else "unreadable", "--force")
    assert _run(inp, out, tiny_registry, "--resume", "--force").returncode == 0
    assert len(out.read_bytes().splitlines()) == len(GOOD)


def test_sample_resume_needs_the_same_file(tiny_registry: Path, tmp_path: Path) -> None:
    """A --per-section sample depends on the whole input: appending changes it."""
    inp, out = tmp_path / "d.jsonl", tmp_path / "e.jsonl"
    rows = [{**r, "section": "A" if i % 2 else "B"} for i, r in enumerate(GOOD)]
    _write(inp, rows)
    assert cdr("eval", inp, "-o", out, "--per-section", "2", "--limit", "2", "--models", tiny_registry, "-q").returncode == 0
    _write(inp, [*rows, {"id": "x", "prompt": "p", "chosen": "c", "rejected": "r", "section": "A"}])
    r = cdr("eval", inp, "-o", out, "--per-section", "2", "--resume", "--models", tiny_registry, "-q")
    _one_line_error(r, "must be the same file")


# --------------------------------------------------------------------------- reports


def _scored(tmp_path: Path, n: int = 60) -> Path:
    src = tmp_path / "ann.jsonl"
    recs = [{"id": str(i), "scores": [{"response": "response_a", "value": float(i % 7), "strong_tokens": 10 + 7 * i},
                                       {"response": "response_b", "value": 0.5 * (i % 3), "strong_tokens": 300}]} for i in range(n)]
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return src


def test_lc_over_its_input_is_refused(tmp_path: Path) -> None:
    src = _scored(tmp_path)
    data = src.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    for out in (src, link):
        _one_line_error(cdr("lc", src, "-o", out), "the input and the output are the same file")
    assert src.read_bytes() == data


def test_two_lc_runs_to_one_output(tmp_path: Path) -> None:
    """Two `cdr lc` to one output at once: the second is refused in one line (no
    traceback), and the output is one whole run's, never a mix."""
    src = _scored(tmp_path, 200_000)
    dst = tmp_path / "out.jsonl"
    a = subprocess.Popen([*CDR, "lc", str(src), "-o", str(dst)], env=_env(), stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".out.jsonl.lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and a.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    b = cdr("lc", src, "-o", dst)
    _, err_a = a.communicate(timeout=300)
    assert a.returncode == 0, err_a
    if b.returncode != 0:  # the usual case: it ran while the first held the lock
        _one_line_error(b, "being written by another cdr lc")
    assert len(dst.read_bytes().splitlines()) == 200_000
    assert not list(tmp_path.glob(".*.tmp")) and not lock.exists()


def _alpaca(path: Path, answers: list[str]) -> None:
    path.write_text(orjson.dumps([{"instruction": f"Question {i}?", "output": a} for i, a in enumerate(answers)]).decode())


def test_winrate_rescores_changed_outputs(tiny_registry: Path, tmp_path: Path) -> None:
    """Rerun into the same folder after a model's outputs changed: its scores are
    computed again (a fresh folder gives the same report), not reused."""
    _alpaca(tmp_path / "base.json", [f"Base answer {i}." for i in range(8)])
    _alpaca(tmp_path / "m.json", [f"Model answer {i}, short." for i in range(8)])
    args = ["winrate", "-m", tmp_path / "m.json", "-b", tmp_path / "base.json", "--models", tiny_registry, "-q"]
    assert cdr(*args, "-o", tmp_path / "w").returncode == 0
    _alpaca(tmp_path / "m.json", [f"A much longer and different model answer number {i}." for i in range(8)])
    r = cdr(*args, "-o", tmp_path / "w")
    assert r.returncode == 0 and "scoring them again" in r.stderr
    assert cdr(*args, "-o", tmp_path / "fresh").returncode == 0
    got, fresh = (orjson.loads((tmp_path / d / "winrate.json").read_bytes())["models"] for d in ("w", "fresh"))
    assert got == fresh
    assert (tmp_path / "w" / "m.scores.jsonl").read_bytes() == (tmp_path / "fresh" / "m.scores.jsonl").read_bytes()


def test_second_winrate_into_one_folder_is_refused(tiny_registry: Path, tmp_path: Path) -> None:
    from cdr_local.locks import exclusive

    _alpaca(tmp_path / "base.json", ["b"] * 3)
    _alpaca(tmp_path / "m.json", ["m"] * 3)
    (tmp_path / "w").mkdir()
    with exclusive(tmp_path / "w" / "winrate.json", "winrate"):  # as a running winrate holds it
        r = cdr("winrate", "-m", tmp_path / "m.json", "-b", tmp_path / "base.json", "-o", tmp_path / "w", "--models", tiny_registry)
    _one_line_error(r, "being written by another cdr winrate")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == []


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("flags,why", [
    (["--threads", "99999"], "--threads must be between 0 and 512, got 99999"),
    (["--threads", "-5"], "--threads must be between 0 and 512, got -5"),
    (["--n-ctx", "99999999999"], "--n-ctx must be between 32 and 1048576"),
    (["--n-ctx", "4096"], "n_ctx 4096 exceeds the trained context of model tiny-bos (2048 tokens)"),
    (["--n-batch", "8"], "--n-batch must be between 16 and 65536, got 8"),
    (["--n-gpu-layers", "-7"], "--n-gpu-layers must be between -1 and 100000, got -7"),
    (["--limit", "-1"], "--limit must be 0 or more"),
])
def test_settings_out_of_range(flags: list[str], why: str, tiny_registry: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    _write(inp, GOOD)
    r = cdr("annotate", inp, "-o", tmp_path / "o.jsonl", "--models", tiny_registry, *flags)
    _one_line_error(r, why)
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").stat().st_size == 0


def test_engine_table_out_of_range(tiny_registry: Path, tmp_path: Path) -> None:
    reg = tmp_path / "models.toml"
    reg.write_text(tiny_registry.read_text().replace("n_threads = 1", "n_threads = 100000"))
    inp = tmp_path / "in.jsonl"
    _write(inp, GOOD)
    _one_line_error(cdr("annotate", inp, "-o", tmp_path / "o.jsonl", "--models", reg), "engine.n_threads: must be between 0 and 512")


def test_usage_errors_are_one_line() -> None:
    _one_line_error(cdr("annotate", "--bogus"), "No such option: --bogus", "cdr annotate --help")
    _one_line_error(cdr("evall"), "No such command 'evall'")


# --------------------------------------------------------------------------- dataset card


def test_dataset_card_names_models_licences_and_counts(tiny_registry: Path, tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    reg = tmp_path / "models.toml"
    # the tiny weak model under the Gemma licence, as the default pair's is
    reg.write_text(tiny_registry.read_text().replace('[models.tiny-nobos]\npath', '[models.tiny-nobos]\nlicense = "Gemma"\npath'))
    inp = tmp_path / "in.jsonl"
    _write(inp, GOOD, b"not json\n")
    out = tmp_path / "o.jsonl"
    assert cdr("annotate", inp, "-o", out, "--models", reg, "-q").returncode == 0
    text = (tmp_path / "o.card.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["license"] == "other" and front["license_name"] == "gemma"
    assert front["configs"] == [{"config_name": "default", "data_files": "o.jsonl"}]
    meta = orjson.loads(Path(str(out) + ".meta.json").read_bytes())
    for role in ("strong", "weak"):
        assert meta["models"][role]["sha256"] in text
    assert "Gemma Terms of Use" in text and "Model Derivatives" in text
    assert f"{len(GOOD)} records" in text and "rejected this run: 1" in text
    assert not (tmp_path / "README.md").exists()
    # a rerun rewrites its own card; a card the user wrote is never overwritten
    assert cdr("annotate", inp, "-o", out, "--models", reg, "-q", "--overwrite").returncode == 0
    (tmp_path / "mine.card.md").write_text("my own notes\n")
    r = cdr("annotate", inp, "-o", tmp_path / "mine.jsonl", "--models", reg)
    _one_line_error(r, "mine.card.md exists and was not written by cdr-local")
    assert (tmp_path / "mine.card.md").read_text() == "my own notes\n"
