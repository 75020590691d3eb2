"""benchmarks/ab.py: two revisions, alternating runs, outputs compared, worktrees cleaned up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout")


def _ab(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab.py"), "--a", "HEAD", "--b", "HEAD", "--rounds", "1", "--", *cmd],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )


def _worktrees() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True, check=True).stdout


def test_same_revision_writes_identical_outputs(tiny_registry: Path) -> None:
    before = _worktrees()
    p = _ab("annotate", str(ROOT / "examples" / "pairs.jsonl"), "--models", str(tiny_registry), "--plain")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(" exit 0 ") == 2
    assert "outputs: byte-identical on every run" in p.stdout
    assert "A / B (medians):" in p.stdout
    assert _worktrees() == before  # both temporary worktrees removed


def test_a_failing_command_fails_the_comparison(tiny_registry: Path, tmp_path: Path) -> None:
    p = _ab("annotate", str(tmp_path / "missing.jsonl"), "--models", str(tiny_registry), "--plain")
    assert p.returncode == 1
    assert p.stdout.count("failed run ") == 2


def test_output_flag_is_refused() -> None:
    p = _ab("annotate", "x.jsonl", "-o", "y.jsonl")
    assert p.returncode == 2 and "leave -o out" in p.stderr
