"""benchmarks/bench.py runs everywhere: a contender that crashes or cannot run costs
its row, not the run; --naive-records 0 works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def test_a_crashing_child_is_an_error_row(tmp_path: Path) -> None:
    import bench

    from cdr_local.engine import ScoreRequest

    req = [ScoreRequest(context=((1, 2),), continuations=((3,),))]
    missing = bench.run_child("naive", tmp_path / "missing.gguf", req, 1, 64)
    assert missing["error"].startswith("naive failed (exit 1)")
    # a contender killed by a signal (as llama_cpp.Llama is by SIGSEGV on AMX CPUs)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nkill -SEGV $$\n")
    fake.chmod(0o755)
    crashed = bench.run_child("naive", tmp_path / "x.gguf", req, 1, 64, python=str(fake))
    assert crashed == {"error": "naive failed (signal 11)"}


def test_naive_records_zero_runs(tiny_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--models", str(tiny_registry), "--pair", "tiny",
                        "--workloads", "single", "--n-records", "2", "--naive-records", "0", "--repeats", "1", "--threads", "1",
                        "--n-ctx", "512", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())["single"]
    assert set(res["tok_per_s"]) == {"cdr", "ceiling", "prefill"} and res["contender_errors"] == {}
    assert res["ratios"]["cdr/ceiling"] > 0


@pytest.mark.parametrize("naive", [1])
def test_naive_runs_in_a_child(naive: int, tiny_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--models", str(tiny_registry), "--pair", "tiny",
                        "--workloads", "single", "--n-records", "2", "--naive-records", str(naive), "--repeats", "1",
                        "--threads", "1", "--n-ctx", "512", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())["single"]
    assert "naive" in res["tok_per_s"] or "naive" in res["contender_errors"]


def test_make_shapes_writes_loadable_models(tmp_path: Path) -> None:
    """The shape builder on its small test shape: F16 and Q4_K_M files llama.cpp
    loads and scores with, with the shape's vocabulary and layers, and a registry."""
    import make_shapes

    from cdr_local.engine import EngineSettings
    from cdr_local.engine.llama import LlamaModel

    make_shapes.main(["--shape", "test-small", "--type", "f16", "--type", "q4_k_m", "--out", str(tmp_path), "--threads", "1"])
    s = make_shapes.SHAPES["test-small"]
    for ty in ("f16", "q4_k_m"):
        with LlamaModel(tmp_path / f"test-small-{ty}.gguf", EngineSettings(n_ctx=256, n_threads=1)) as m:
            assert m.n_vocab == s.n_vocab and m.n_ctx_train == s.n_ctx_train
            toks = m.tokenize("Hello world", add_special=False, parse_special=False)
            assert toks
    assert (tmp_path / "test-small-q4_k_m.gguf").stat().st_size < (tmp_path / "test-small-f16.gguf").stat().st_size
    assert 'strong = "test-small-q4_k_m"' in (tmp_path / "models.toml").read_text()
    # a second run adds up: its registry names this run's file and the earlier run's still there
    make_shapes.main(["--shape", "test-small", "--type", "q8_0", "--out", str(tmp_path), "--threads", "1"])
    assert not (tmp_path / "test-small-f16.gguf").exists()  # not asked for, not kept
    from cdr_local.models import load_registry

    reg = load_registry(tmp_path / "models.toml")
    assert sorted(reg.pairs) == ["test-small-q4_k_m", "test-small-q8_0"]


def test_multiseq_alone_on_the_pairs_strong_model(tiny_registry: Path, tmp_path: Path) -> None:
    """--multiseq: the multi-sequence ceiling only, 1, 4 and 16 sequences per decode."""
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--models", str(tiny_registry), "--pair", "tiny",
                        "--workloads", "none", "--multiseq", "--repeats", "1", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [r["sequences_per_decode"] for r in res["sequences_per_decode"]] == [1, 4, 16]
    assert all(r["tok_per_s"] > 0 for r in res["sequences_per_decode"])
    assert "prompt_sharing" not in res  # the rest of --scaling did not run
