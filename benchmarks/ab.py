"""A/B two revisions of cdr-local on the same command: wall time and output bytes.

Each revision is checked out in its own temporary git worktree and run as
``python -c "from cdr_local.cli import main; main()" ARGS -o OUT``, from the
current directory (so relative paths in ARGS work) and with the same
environment.  The runs alternate A, B, A, B, ... so a machine that gets busier
or cooler slows both alike.  Every run starts from an empty output (no resume).

Prints each run's seconds, each side's best and median, the ratio A/B of the
medians, and whether the two sides wrote byte-identical outputs (the output
file; its metadata sidecar holds times and is not compared).  An engine change
that is meant to be a pure speed-up must keep the outputs identical.

    python benchmarks/ab.py --a HEAD~1 --b HEAD --rounds 2 -- \\
        eval ../shared/data/dev.jsonl --per-section 10 --seed 0 --pair smollm2-sys --plain

Exit status: 0 when every run succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Side:
    label: str
    rev: str
    tree: Path
    seconds: list[float] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def run_once(side: Side, cmd: list[str], out: Path) -> None:
    for p in (out, out.with_name(out.name + ".meta.json")):
        p.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(side.tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-c", "from cdr_local.cli import main; main()", *cmd, "-o", str(out)]
    t = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    side.seconds.append(dt)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        side.failures.append(f"exit {proc.returncode}: {tail[0]}")
    side.digests.append(hashlib.sha256(out.read_bytes()).hexdigest() if out.exists() else "missing")
    print(f"  {side.label} ({side.rev}): {dt:7.1f} s  exit {proc.returncode}  output {side.digests[-1][:12]}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="revision A (e.g. HEAD~1)")
    ap.add_argument("--b", default="HEAD", help="revision B (default HEAD)")
    ap.add_argument("--rounds", type=int, default=2, help="A then B, this many times")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the cdr arguments, without -o")
    args = ap.parse_args()
    # SIGTERM (e.g. from timeout) unwinds like an exception: the child is
    # killed and the temporary worktrees are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the cdr command after --, e.g. -- eval data.jsonl --limit 20")
    if "-o" in cmd or "--output" in cmd:
        ap.error("leave -o out: each side writes its own output")
    with tempfile.TemporaryDirectory(prefix="cdr-ab-") as tmp:
        sides = []
        for label, rev in (("A", args.a), ("B", args.b)):
            sha = git("rev-parse", "--short", rev)
            tree = Path(tmp) / label
            git("worktree", "add", "--detach", str(tree), sha)
            sides.append(Side(label, sha, tree))
        try:
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", flush=True)
                for s in sides:
                    run_once(s, cmd, Path(tmp) / f"out-{s.label}.jsonl")
        finally:
            for s in sides:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(s.tree)], capture_output=True)
    a, b = sides
    for s in sides:
        print(f"{s.label} {s.rev}: best {min(s.seconds):.1f} s, median {statistics.median(s.seconds):.1f} s")
    print(f"A / B (medians): {statistics.median(a.seconds) / statistics.median(b.seconds):.2f}x")
    digests = set(a.digests + b.digests)
    print("outputs: " + ("byte-identical on every run" if len(digests) == 1 else f"{len(digests)} different outputs"))
    bad = [f"{s.label}: {f}" for s in sides for f in s.failures]
    for line in bad:
        print("failed run " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
