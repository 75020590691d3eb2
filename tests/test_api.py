"""The Python API (``cdr_local.api``): each function gives exactly what the CLI
command writes, on the tiny models; errors are the CLI's one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from test_cli import cdr

import cdr_local
from cdr_local.errors import CdrError

ROWS = [
    {"id": "a", "prompt": "What is 2+2?", "chosen": "4.", "rejected": "5, probably, or something else."},
    {"id": "b", "prompt": "Say hi.", "responses": ["Hi there!", "No.", "Hello, how can I help?"]},
    {"id": "c", "prompt": [{"role": "user", "content": "Name a colour."}], "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "A colour is a property of light."}]},
]
ENGINE = {"n_threads": 1}


@pytest.fixture
def inp(tmp_path: Path) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in ROWS))
    return p


def _lines(p: Path) -> list[dict]:
    return [orjson.loads(x) for x in p.read_bytes().splitlines()]


def test_annotator_gives_annotates_records(inp: Path, tiny_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    p = cdr("annotate", inp, "-o", out, "--models", tiny_registry, "--threads", "1", "-q", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    with cdr_local.Annotator(models=tiny_registry, **ENGINE) as a:
        got = list(a.score_records(ROWS))
        assert a.metadata()["pair"] == "tiny"
        one = a.score("What is 2+2?", ["4.", "5."], id="x")
    assert got == _lines(out)
    assert one["id"] == "x" and len(one["scores"]) == 2 and 0 < one["confidence"] < 1


def test_score_is_cdr_score(tiny_registry: Path, tmp_path: Path) -> None:
    p = cdr("score", "--prompt", "Why?", "--system", "Be brief.", "-r", "Because.", "-r", "No reason.", "--models", tiny_registry,
            "--pair", "tiny-self", "--threads", "1", "--json", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    got = cdr_local.score("Why?", ["Because.", "No reason."], system="Be brief.", id="cli", models=tiny_registry, pair="tiny-self",
                           **ENGINE)
    assert got == orjson.loads(p.stdout)


def test_annotate_writes_what_the_cli_writes(inp: Path, tiny_registry: Path, tmp_path: Path) -> None:
    cli, api = tmp_path / "cli.jsonl", tmp_path / "api.jsonl"
    assert cdr("annotate", inp, "-o", cli, "--models", tiny_registry, "--threads", "1", "-q", home=tmp_path / "home").returncode == 0
    s = cdr_local.annotate_file(inp, api, models=tiny_registry, **ENGINE)
    assert api.read_bytes() == cli.read_bytes() and s.done == 3
    again = cdr_local.annotate_file(inp, api, models=tiny_registry, resume=True, **ENGINE)
    assert again.done == 0 and again.resumed == 3
    with pytest.raises(CdrError, match="exists"):
        cdr_local.annotate_file(inp, api, models=tiny_registry, **ENGINE)


def test_evaluate_returns_the_report(tiny_registry: Path, tmp_path: Path) -> None:
    dev = Path(__file__).resolve().parent.parent / "examples" / "pairs.jsonl"
    cli, api = tmp_path / "cli.jsonl", tmp_path / "api.jsonl"
    p = cdr("eval", dev, "-o", cli, "--models", tiny_registry, "--threads", "1", "--bootstrap", "50", "-q", "--json",
            home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    rep = cdr_local.evaluate_file(dev, api, models=tiny_registry, bootstrap=50, **ENGINE)
    assert api.read_bytes() == cli.read_bytes()
    assert rep == orjson.loads((tmp_path / "cli.report.json").read_bytes())
    assert orjson.loads((tmp_path / "api.report.json").read_bytes()) == rep
    assert 0 <= rep["methods"][rep["main"]]["length"]["balanced"]["acc"] <= 1  # the README's example
    assert rep["main"] and rep["length"]["pairs"]["longer"] + rep["length"]["pairs"]["shorter"] + rep["length"]["pairs"]["same"] == rep["n_pairs"] == 16


def test_errors_are_the_clis(tiny_registry: Path) -> None:
    with pytest.raises(CdrError, match="unknown pair 'nope'|pair 'nope'"):
        cdr_local.Annotator("nope", models=tiny_registry, **ENGINE)
    with pytest.raises(CdrError, match="--strong needs --weak"):
        cdr_local.score("q", ["a"], strong="x.gguf")
    with pytest.raises(TypeError, match="unknown option.*threads"):
        cdr_local.score("q", ["a"], models=tiny_registry, threads=1)
    with cdr_local.Annotator(models=tiny_registry, **ENGINE) as a, pytest.raises(CdrError):
        a.score_record({"id": "x", "prompt": "p"})  # no responses: the pipeline's reject reason


def test_import_is_light() -> None:
    """``import cdr_local`` (and the CLI's start) loads neither numpy nor llama.cpp."""
    code = "import sys, cdr_local; print(sorted(m for m in ('numpy', 'llama_cpp', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(cdr_local.annotate_file) and cdr_local.__version__
