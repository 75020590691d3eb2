"""CLI conventions: --version, -h, shell completion, --json listings, a closed stdout
(exit 141, silently), "nothing scored" (exit 1), and where '-' (stdin / stdout) works.

Exit codes: 0 done, 1 nothing scored, 2 user error, 130 interrupted, 141 stdout closed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_cli import CDR, EXAMPLES, _env, assert_user_error, cdr, jsonl

import cdr_local
from cdr_local.cli import app
from cdr_local.cli.common import NothingScored, require_scored
from cdr_local.pipeline import RunSummary

# every command and group, as typed after `cdr`
COMMANDS = [
    [], ["annotate"], ["eval"], ["winrate"], ["lc"], ["pairs"], ["synth"], ["score"],
    ["models"], ["models", "list"], ["models", "check"], ["models", "pull"],
    ["profiles"], ["profiles", "list"], ["profiles", "show"],
]
# the commands that read or write files, and so say in --help which of them may be '-'
FILE_COMMANDS = [
    ["annotate"], ["eval"], ["winrate"], ["lc"], ["pairs"], ["synth"], ["score"],
    ["models", "list"], ["models", "check"], ["models", "pull"], ["profiles", "show"],
]


def _help(args: list[str]) -> str:
    """``cdr ARGS`` in-process, through click's test runner (help needs no subprocess)."""
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, args, prog_name="cdr")
    assert r.exit_code == 0, r.output
    return r.output


def _to_closed_pipe(*args: Any, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cdr ARGS`` with stdout a pipe whose reader has already gone (like ``| head``
    once head has exited, but without the race: the very first write fails)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([*CDR, *map(str, args)], stdout=w, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True, env=_env(), cwd=cwd, timeout=120)
    finally:
        os.close(w)


def assert_exit_1(p: subprocess.CompletedProcess[str], *want: str) -> str:
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdr: error: nothing scored: "), p.stderr
    for w in want:
        assert w in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------
# 1. --version and -h
# ---------------------------------------------------------------------------


def test_version() -> None:
    p = cdr("--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"cdr-local {cdr_local.__version__}\n" and p.stderr == ""


def test_h_is_help_in_a_subprocess() -> None:
    for args in ([], ["annotate"], ["models", "list"]):
        h, full = cdr(*args, "-h"), cdr(*args, "--help")
        assert h.returncode == full.returncode == 0, h.stderr
        assert h.stdout == full.stdout and h.stdout.startswith(f"Usage: cdr {' '.join(args)}".rstrip())
        assert "-h, --help" in h.stdout


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "cdr")
def test_h_is_help_everywhere(args: list[str]) -> None:
    h = _help([*args, "-h"])
    assert h == _help([*args, "--help"])
    assert h.startswith("Usage: cdr") and "-h, --help" in h


def test_no_arguments_print_the_whole_help() -> None:
    for args in ([], ["models"]):
        p = cdr(*args)
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert p.stderr.startswith(f"Usage: cdr {' '.join(args)}".rstrip()) and len(p.stderr.splitlines()) > 5, p.stderr


# ---------------------------------------------------------------------------
# 2. shell completion
# ---------------------------------------------------------------------------


def test_completion_options_and_script() -> None:
    h = cdr("--help")
    assert "--install-completion" in h.stdout and "--show-completion" in h.stdout
    p = cdr("--show-completion", "bash")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert "_CDR_COMPLETE=complete_bash" in p.stdout and "complete -o default" in p.stdout


def test_completion_completes() -> None:
    def complete(words: str, cword: int) -> list[str]:
        env = {**_env(), "_CDR_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        p = subprocess.run(CDR, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        return p.stdout.split()

    assert complete("cdr mod", 1) == ["models"]
    assert complete("cdr models li", 2) == ["list"]
    assert "--output" in complete("cdr annotate --ou", 2)


# ---------------------------------------------------------------------------
# 3. --json listings
# ---------------------------------------------------------------------------


def test_models_list_json(tiny_registry: Path) -> None:
    p = cdr("models", "list", "--models", tiny_registry, "--json")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 1
    doc = orjson.loads(p.stdout)
    assert doc["registry"] == str(tiny_registry) and doc["default_pair"] == "tiny"
    models = {m["name"]: m for m in doc["models"]}
    assert {"tiny-bos", "tiny-nobos"} <= set(models)  # merged over the shipped registry
    for name in ("tiny-bos", "tiny-nobos"):
        m = models[name]
        assert m["source"] == "path" and m["present"] is True and Path(m["path"]).is_file()
        assert set(m) == {"name", "source", "present", "path", "description", "registry"} and m["registry"] == str(tiny_registry)
    pairs = {pr["name"]: pr for pr in doc["pairs"]}
    assert pairs["tiny"]["default"] is True and pairs["tiny-self"]["default"] is False
    assert pairs["tiny"]["strong"] == {"model": "tiny-bos", "system": "Be helpful."}
    assert pairs["tiny"]["weak"] == {"model": "tiny-nobos", "system": None}
    assert pairs["tiny"]["description"].startswith("two tiny random models")
    table = cdr("models", "list", "--models", tiny_registry)  # the table stays the default
    assert table.returncode == 0 and "pairs" in table.stdout and not table.stdout.startswith("{")


def test_profiles_list_json(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "profiles").mkdir(parents=True)
    mine = home / "profiles" / "mine.toml"
    mine.write_text('name = "mine"\ndescription = "my own"\nextends = "cdr"\n')
    p = cdr("profiles", "list", "--json", home=home)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 1
    profs = {x["name"]: x for x in orjson.loads(p.stdout)["profiles"]}
    assert {"none", "cdr", "cdr-fewshot", "mine"} <= set(profs)
    assert profs["none"]["domains"] == ["chat"] and profs["none"]["exemplars"] == 0
    assert profs["cdr"]["domains"] == ["chat", "safety", "reasoning"]
    assert profs["cdr-fewshot"]["exemplars"] > 0
    assert profs["mine"]["description"] == "my own" and profs["mine"]["file"] == str(mine)
    assert all(set(x) == {"name", "domains", "exemplars", "description", "file"} for x in profs.values())
    table = cdr("profiles", "list", home=home)
    assert table.returncode == 0 and "mine" in table.stdout and not table.stdout.startswith("{")


# ---------------------------------------------------------------------------
# 4. a closed stdout: exit 141, nothing on stderr
# ---------------------------------------------------------------------------


def _assert_quiet_141(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == 141, (p.returncode, p.stderr)
    assert p.stderr == "", p.stderr  # no "cannot write", no traceback, no "Exception ignored"


def test_closed_stdout_annotate(tiny_registry: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    p = _to_closed_pipe("annotate", EXAMPLES, "-o", "-", "--models", tiny_registry, "-q", cwd=work)
    _assert_quiet_141(p)
    assert list(work.iterdir()) == []  # stdout mode: no sidecar, no rejects file


def test_closed_stdout_annotate_with_progress(tiny_registry: Path, tmp_path: Path) -> None:
    p = _to_closed_pipe("annotate", EXAMPLES, "-o", "-", "--models", tiny_registry, "--plain", cwd=tmp_path)
    assert p.returncode == 141, p.stderr
    assert "Traceback" not in p.stderr and "error" not in p.stderr and "Broken pipe" not in p.stderr, p.stderr
    assert "--resume" not in p.stderr and "Exception ignored" not in p.stderr


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["annotate", "-h"], ["models", "list"], ["models", "list", "--json"],
                                  ["profiles", "list"], ["profiles", "list", "--json"]], ids=" ".join)
def test_closed_stdout_elsewhere(args: list[str], tiny_registry: Path) -> None:
    if args[0] == "models" and "-h" not in args:
        args = [*args, "--models", str(tiny_registry)]
    _assert_quiet_141(_to_closed_pipe(*args))


def test_stdout_to_devnull_is_not_a_closed_pipe(tiny_registry: Path) -> None:
    p = subprocess.run([*CDR, "models", "list", "--models", str(tiny_registry)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, env=_env(), timeout=60)
    assert p.returncode == 0, p.stderr


def test_closed_file_output_is_still_a_resumable_error(tmp_path: Path) -> None:
    """Only stdout ends quietly: a write error on a file still says --resume (pipeline.keep)."""
    from cdr_local.pipeline import Output, RunConfig, keep

    class Broken:
        def write(self, b: bytes) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    for output, quiet in (("-", True), (str(tmp_path / "o.jsonl"), False)):
        out = Output(RunConfig(input="x", output=output))
        out._out = Broken()  # type: ignore[assignment]
        if quiet:
            with pytest.raises(BrokenPipeError):
                keep(out.cfg, out, {"id": "a"}, {}, 1, "a", lambda r: None, RunSummary(), None, None)  # type: ignore[arg-type]
        else:
            from cdr_local.errors import CdrError

            with pytest.raises(CdrError, match="rerun with --resume"):
                keep(out.cfg, out, {"id": "a"}, {}, 1, "a", lambda r: None, RunSummary(), None, None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# 5. nothing scored: exit 1, one line, after the rejects and the sidecar
# ---------------------------------------------------------------------------


@pytest.fixture()
def bad_input(tmp_path: Path) -> Path:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'not json\n{"prompt": "p"\n\n[1, 2]\n')
    return p


@pytest.mark.parametrize("command", ["annotate", "eval", "pairs", "synth"])
def test_all_rejected_exits_1(command: str, bad_input: Path, tiny_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    p = cdr(command, bad_input, "-o", out, "--models", tiny_registry, "-q")
    rejects = tmp_path / "out.rejects.jsonl"
    assert_exit_1(p, "all 3 input lines were rejected", f"see {rejects}")
    assert [r["line"] for r in jsonl(rejects.read_bytes())] == [1, 2, 4]  # written as usual
    meta = orjson.loads(Path(str(out) + ".meta.json").read_bytes())
    assert meta["status"] == "complete" and meta["counts"]["rejected_this_run"] == 3
    assert out.read_bytes() == b""
    if command == "annotate":  # a resume with nothing left to do is no error
        again = cdr(command, bad_input, "-o", out, "--models", tiny_registry, "-q", "--resume")
        assert again.returncode == 0 and again.stderr == "", again.stderr


def test_all_rejected_on_stdout(bad_input: Path, tiny_registry: Path, tmp_path: Path) -> None:
    p = subprocess.run([*CDR, "annotate", "-", "-o", "-", "--models", str(tiny_registry), "-q"], input=bad_input.read_text(),
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert p.returncode == 1 and p.stdout == "", p.stderr
    lines = p.stderr.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines[:3]] == ["rejected line 1", "rejected line 2", "rejected line 4"]
    assert lines[3] == "cdr: error: nothing scored: all 3 input lines were rejected (the reasons are above, on stderr)"
    assert len(lines) == 4


def test_one_line_rejected(tiny_registry: Path, tmp_path: Path) -> None:
    src = tmp_path / "one.jsonl"
    src.write_bytes(b"{oops\n")
    assert_exit_1(cdr("annotate", src, "-o", tmp_path / "o.jsonl", "--models", tiny_registry, "-q"),
                  "the only input line was rejected")


@pytest.mark.parametrize("content", [b"", b"\n  \n"], ids=["empty", "blank"])
def test_empty_input_exits_1(content: bytes, tiny_registry: Path, tmp_path: Path) -> None:
    src = tmp_path / "empty.jsonl"
    src.write_bytes(content)
    out = tmp_path / "o.jsonl"
    assert_exit_1(cdr("annotate", src, "-o", out, "--models", tiny_registry, "-q"), "the input is empty")
    assert orjson.loads(Path(str(out) + ".meta.json").read_bytes())["status"] == "complete"


def test_some_scored_and_resume_and_limit_0_exit_0(tiny_registry: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(EXAMPLES.read_bytes().splitlines(keepends=True)[:2]) + b"{bad\n")
    out = tmp_path / "o.jsonl"
    p = cdr("annotate", src, "-o", out, "--models", tiny_registry, "-q")
    assert p.returncode == 0 and p.stderr == "", p.stderr  # one reject among scored lines: fine
    assert len(jsonl(out.read_bytes())) == 2
    p = cdr("annotate", src, "-o", out, "--models", tiny_registry, "-q", "--resume")
    assert p.returncode == 0 and p.stderr == "", p.stderr  # nothing left to do
    p = cdr("annotate", src, "-o", tmp_path / "l.jsonl", "--models", tiny_registry, "-q", "--limit", "0")
    assert p.returncode == 0, p.stderr


def test_require_scored_cases() -> None:
    def verdict(**kw: Any) -> str | None:
        opts = {k: kw.pop(k) for k in ("resume", "limit") if k in kw}
        try:
            require_scored(RunSummary(**kw), **opts)
        except NothingScored as e:
            assert e.exit_code == 1
            return e.message
        return None

    assert verdict(done=1) is None
    assert verdict(resumed=5) is None
    assert verdict(abstained=2) is None  # scored, only held back by --min-confidence / --keep-top
    assert verdict(interrupted=True) is None  # exit 130 instead
    assert verdict(resume=True) is None
    assert verdict(limit=0) is None
    assert verdict() == "nothing scored: the input is empty"
    assert verdict(rejected=2, rejects_path="r.jsonl") == "nothing scored: all 2 input lines were rejected (see r.jsonl)"
    assert verdict(rejected=2, rejects_path="r.jsonl", resume=True) is not None  # this run rejected them all
    assert verdict(rejected=1) == "nothing scored: the only input line was rejected (the reasons are above, on stderr)"


# ---------------------------------------------------------------------------
# 6. '-' wherever a file is read or written, or the help says why not
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", FILE_COMMANDS, ids=" ".join)
def test_help_says_where_dash_works(args: list[str]) -> None:
    h = " ".join(_help([*args, "--help"]).split())
    assert "Files:" in h and "'-'" in h, h


@pytest.fixture()
def annotated(tiny_registry: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ann.jsonl"
    p = cdr("annotate", EXAMPLES, "-o", out, "--models", tiny_registry, "-q")
    assert p.returncode == 0, p.stderr
    return out


def test_lc_to_stdout(annotated: Path, tmp_path: Path) -> None:
    to_file = cdr("lc", annotated, "-o", tmp_path / "lc.jsonl", "--tau", "2")
    assert to_file.returncode == 0, to_file.stderr
    before = set(tmp_path.iterdir())
    p = cdr("lc", annotated, "-o", "-", "--tau", "2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.encode() == (tmp_path / "lc.jsonl").read_bytes()  # the same records
    assert p.stderr.startswith("length control: slope") and p.stderr.rstrip().endswith("-> stdout")
    assert set(tmp_path.iterdir()) == before  # no "-", no "-.lc.json", no temporary file left


def test_lc_to_closed_stdout(annotated: Path) -> None:
    _assert_quiet_141(_to_closed_pipe("lc", annotated, "-o", "-"))


def test_lc_refuses_stdin(tmp_path: Path) -> None:
    line = assert_user_error(cdr("lc", "-", "-o", tmp_path / "o.jsonl"))
    assert "reads its input twice" in line and "'-'" in line
    assert not (tmp_path / "o.jsonl").exists()
