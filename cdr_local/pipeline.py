"""Reader -> work -> writer, shared by every long-running command.

What it guarantees (tested in tests/test_pipeline.py and tests/test_resume.py):

* Streaming: input is read line by line; memory does not grow with its size
  (ids are kept as 8-byte hashes; summaries use a fixed-size reservoir).
* Every finished record is appended to the output as one JSON line and
  flushed before the next one starts, so a kill loses at most the record in
  flight.
* ``resume``: ids already in the output are skipped; a torn last line (a kill
  mid-write) is cut off first, then recomputed; rejects already recorded are
  not recorded twice.  The settings that change numbers must match the
  previous run's sidecar, unless forced.
* One writer per output: an exclusive ``flock`` on the output; a second
  process gets a clear error.
* Bad lines and records that fail in the task go to ``OUT.rejects.jsonl``
  with line number and reason; the run goes on.
* Ctrl-C stops after the record in flight; everything written stays valid.

The pipeline never imports rich: it reports through an :class:`Events` object.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from .atomic import write_bytes_atomic
from .errors import CdrError
from .records import Record, Reject

RESERVOIR = 20_000
#: Finished lines are handed to the OS at once (a killed process loses none) and
#: fsynced at most this many seconds apart, so a power cut loses about this much work.
FSYNC_SECONDS = 1.0


class RecordError(Exception):
    """A task could not process one record (the record is rejected, the run goes on).

    ``detail`` (optional, JSON-able) is written into the reject line, e.g. what a
    filtered-out record would have been, so reports can count it.
    """

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class Task(Protocol):
    def process(self, record: Record) -> tuple[dict[str, Any], dict[str, float]]:
        """Return (output object, stats).  stats feed the progress display:
        ``tokens`` (tokens decoded), ``margin`` (optional), ``first_wins`` (optional 0/1)."""
        ...


class Events(Protocol):
    def start(self, total: int | None, resumed: int) -> None: ...
    def record(self, stats: dict[str, float]) -> None: ...
    def reject(self, reject: Reject) -> None: ...
    def finish(self, summary: RunSummary) -> None: ...


class NullEvents:
    def start(self, total: int | None, resumed: int) -> None:
        pass

    def record(self, stats: dict[str, float]) -> None:
        pass

    def reject(self, reject: Reject) -> None:
        pass

    def finish(self, summary: RunSummary) -> None:
        pass


@dataclass
class RunConfig:
    input: str  # path or "-"
    output: str  # path or "-"
    resume: bool = False
    overwrite: bool = False
    force: bool = False  # resume even if numerics settings differ
    rejects: str | None = None  # default: OUT.rejects.jsonl ("-" output: stderr)
    meta: dict[str, Any] = field(default_factory=dict)  # written to OUT.meta.json
    numerics: dict[str, Any] = field(default_factory=dict)  # must match on resume
    limit: int | None = None  # stop after this many new records
    # Only these input line numbers (a sample), processed in this order; default
    # all, in file order.  An interleaved order (see evaluate.sample_lines) makes
    # every prefix of a run, and so any --limit, a balanced sample too.
    select: Sequence[int] | None = None


@dataclass
class RunSummary:
    done: int = 0  # records processed in this run
    resumed: int = 0  # records already in the output
    rejected: int = 0  # rejects recorded in this run
    truncated: int = 0
    ties: int = 0
    tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    margin_sum: float = 0.0
    margin_n: int = 0
    first_wins: int = 0
    first_n: int = 0
    margins: list[float] = field(default_factory=list)  # reservoir sample
    input_sha256: str | None = None
    output: str = ""
    rejects_path: str | None = None

    def add_record(self, stats: dict[str, float], rng: random.Random) -> None:
        """Count one written record (its task stats)."""
        self.done += 1
        self.tokens += int(stats.get("tokens", 0))
        self.truncated += int(stats.get("truncated", 0))
        self.ties += int(stats.get("tie", 0))
        if "margin" in stats:
            self.add_margin(float(stats["margin"]), rng)
        if "first_wins" in stats:
            self.first_wins += int(stats["first_wins"])
            self.first_n += 1

    def add_margin(self, m: float, rng: random.Random) -> None:
        self.margin_sum += m
        self.margin_n += 1
        if len(self.margins) < RESERVOIR:
            self.margins.append(m)
        else:
            j = rng.randrange(self.margin_n)
            if j < RESERVOIR:
                self.margins[j] = m


def meta_path(output: str) -> Path:
    return Path(output + ".meta.json")


def rejects_path(output: str) -> Path:
    p = Path(output)
    return p.with_name(p.name[: -len(".jsonl")] + ".rejects.jsonl") if p.name.endswith(".jsonl") else Path(output + ".rejects.jsonl")


class IdSet:
    """A set of 64-bit id hashes in one numpy array (open addressing).

    A Python ``set`` of ints costs ~60 bytes an id; this costs 16 (8 bytes a
    slot at load <= 1/2), so resume/duplicate bookkeeping for a million
    records stays ~16 MB.  Key 0 marks an empty slot, so hashes are forced odd.
    """

    def __init__(self, capacity: int = 1 << 12) -> None:
        import numpy as np

        self._np = np
        self._slots = np.zeros(1 << max(12, (capacity - 1).bit_length()), dtype=np.uint64)
        self._n = 0

    @classmethod
    def for_items(cls, n: int | None) -> IdSet:
        """Sized for ``n`` ids up front (the input's line count), so it never
        grows while a run streams: growing holds old and new tables at once,
        and peak memory would then rise in steps with the input's size."""
        return cls(2 * (n or 0) + 1)

    def __len__(self) -> int:
        return self._n

    def _find(self, key: int) -> int:
        slots = self._slots
        mask = len(slots) - 1
        i = (key >> 7) & mask
        while True:
            v = int(slots[i])
            if v == key or v == 0:
                return i
            i = (i + 1) & mask

    def __contains__(self, key: int) -> bool:
        return int(self._slots[self._find(key)]) == key

    def add(self, key: int) -> None:
        i = self._find(key)
        if int(self._slots[i]) == key:
            return
        self._slots[i] = key
        self._n += 1
        if 2 * self._n > len(self._slots):
            old = self._slots[self._slots != 0]
            self._slots = self._np.zeros(2 * len(self._slots), dtype=self._np.uint64)
            self._n = 0
            for k in old:  # not .tolist(): a list of Python ints is 5x the array
                self.add(int(k))


def _id_key(rid: str) -> int:
    return int.from_bytes(hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") | 1


def repair_torn_tail(path: Path) -> int:
    """Cut a partial last line (no trailing newline) left by a kill; return bytes cut."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # walk back to the previous newline
        pos = size
        block = 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                cut_at = start + nl + 1
                break
            pos = start
        else:
            cut_at = 0
        f.truncate(cut_at)
        f.flush()
        os.fsync(f.fileno())
        return size - cut_at


def _scan_ids(path: Path, key: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise CdrError(f"{path}: cannot resume, a line is not valid JSON (was the file edited?)") from None
            if isinstance(obj, dict) and key in obj:
                yield str(obj[key])


def _read_lines(source: str, hasher: Any) -> Iterator[tuple[int, bytes]]:
    f: IO[bytes]
    if source == "-":
        f = sys.stdin.buffer
        close = False
    else:
        try:
            f = open(source, "rb")
        except OSError as e:
            raise CdrError(f"cannot read input {source}: {e.strerror}") from None
        close = True
    try:
        for i, line in enumerate(f, 1):
            hasher.update(line)
            yield i, line
    finally:
        if close:
            f.close()


def _selected_lines(cfg: RunConfig, hasher: Any) -> Iterator[tuple[int, bytes]]:
    """All input lines in file order, or only ``cfg.select``'s in its order.

    A sample is small, so its lines are held in memory (the rest of the input
    is streamed past, and still hashed for the metadata).
    """
    if cfg.select is None:
        yield from _read_lines(cfg.input, hasher)
        return
    wanted = set(cfg.select)
    picked = {i: line for i, line in _read_lines(cfg.input, hasher) if i in wanted}
    for i in dict.fromkeys(cfg.select):  # once each, first position wins
        if i in picked:
            yield i, picked[i]


def count_lines(source: str) -> int | None:
    if source == "-":
        return None
    n = 0
    last = b"\n"
    with open(source, "rb") as f:
        while True:
            buf = f.read(1 << 20)
            if not buf:
                break
            n += buf.count(b"\n")
            last = buf[-1:]
    return n + (0 if last == b"\n" else 1)


def input_total(cfg: RunConfig) -> int | None:
    """How many input lines the run will read (``None`` for stdin), for progress and
    the id set's size; a selection also goes into the metadata.  Called before the
    output is created, so an unreadable input is a user error that touches nothing."""
    if cfg.select is not None:
        total = len(set(cfg.select))
        cfg.meta["selected_lines"] = total
        return total
    try:
        return count_lines(cfg.input)
    except OSError as e:
        raise CdrError(f"cannot read input {cfg.input}: {e.strerror}") from None


def _atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``path`` whole or not at all; a failure (full disk, read-only folder) is a CdrError."""
    try:
        write_bytes_atomic(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    except OSError as e:
        raise CdrError(f"cannot write {path}: {e.strerror or e}") from None


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


class Output:
    """The output file (or stdout), its rejects file and its metadata sidecar."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.to_stdout = cfg.output == "-"
        self.done_ids = IdSet()
        self.rejected_lines: set[int] = set()
        self._out: IO[bytes] | None = None
        self._rej: IO[bytes] | None = None
        self._synced = time.monotonic()
        self.rejects_path: Path | None = None
        if cfg.rejects == "-" or (cfg.rejects is None and self.to_stdout):
            self.rejects_path = None
        else:
            self.rejects_path = Path(cfg.rejects) if cfg.rejects else rejects_path(cfg.output)

    def open(self) -> int:
        """Open for appending, take the lock, load the resume state; return records already done."""
        cfg = self.cfg
        if self.to_stdout:
            if cfg.resume:
                raise CdrError("--resume needs an output file, not stdout")
            self._out = sys.stdout.buffer
        else:
            out = Path(cfg.output)
            if out.parent and not out.parent.exists():
                raise CdrError(f"output folder does not exist: {out.parent}")
            exists = out.exists() and out.stat().st_size > 0
            if exists and not cfg.resume and not cfg.overwrite:
                raise CdrError(f"{out} exists: use --resume to continue it or --overwrite to start again")
            try:
                f = open(out, "ab")
            except OSError as e:
                raise CdrError(f"cannot write {out}: {e.strerror}") from None
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                raise CdrError(f"{out} is being written by another cdr process (locked)") from None
            self._out = f
            try:
                if not cfg.resume:
                    # a fresh start (or --overwrite): a rejects file left by an
                    # earlier run of this output would otherwise be appended to
                    if exists:
                        f.truncate(0)
                    if self.rejects_path and self.rejects_path.exists():
                        self.rejects_path.unlink()
                elif exists:
                    self._check_meta()
                    repair_torn_tail(out)
                    for rid in _scan_ids(out, "id"):
                        self.done_ids.add(_id_key(rid))
                if self.rejects_path is not None:
                    if cfg.resume and self.rejects_path.exists():
                        repair_torn_tail(self.rejects_path)
                        for ln in _scan_ids(self.rejects_path, "line"):
                            self.rejected_lines.add(int(ln))
                _atomic_write_json(meta_path(cfg.output), {**cfg.meta, "numerics": cfg.numerics, "status": "running"})
            except BaseException as e:  # e.g. settings differ: release the lock, do not leak the file
                self._out = None
                f.close()
                if isinstance(e, OSError):  # e.g. a read-only folder: the torn-tail repair cannot write
                    raise CdrError(f"cannot write {e.filename or out}: {e.strerror or e}") from None
                raise
        return len(self.done_ids)

    def _check_meta(self) -> None:
        mp = meta_path(self.cfg.output)
        if not mp.exists():
            return
        try:
            old = orjson.loads(mp.read_bytes())
        except orjson.JSONDecodeError:
            return
        prev = old.get("numerics") or {}
        diffs = _diff(prev, self.cfg.numerics)
        if diffs and not self.cfg.force:
            raise CdrError(
                f"cannot resume {self.cfg.output}: settings that change scores differ from the first run ({'; '.join(diffs)}); use --force to resume anyway"
            )

    def write(self, obj: dict[str, Any]) -> None:
        """Append one line.  orjson.JSONEncodeError (nothing written): the record
        cannot be serialized.  OSError: the line may be torn; resume repairs it."""
        assert self._out is not None
        self._out.write(orjson.dumps(obj) + b"\n")
        self._out.flush()
        if not self.to_stdout and time.monotonic() - self._synced >= FSYNC_SECONDS:
            for f in (self._out, self._rej):
                if f is not None:
                    os.fsync(f.fileno())
            self._synced = time.monotonic()

    def reject(self, rej: Reject) -> bool:
        """Record a reject once; return False if it was already recorded."""
        if rej.line in self.rejected_lines:
            return False
        self.rejected_lines.add(rej.line)
        line = orjson.dumps(rej.to_json()) + b"\n"
        if self._rej is None and self.rejects_path is not None:
            try:
                self._rej = open(self.rejects_path, "ab")  # opened on the first reject only
            except OSError as e:
                raise CdrError(f"cannot write {self.rejects_path}: {e.strerror}") from None
        if self._rej is not None:
            try:
                self._rej.write(line)
                self._rej.flush()
            except OSError as e:
                raise CdrError(
                    f"cannot write {self.rejects_path}: {e.strerror or e}; everything before line {rej.line} is saved, rerun with --resume"
                ) from None
        else:
            sys.stderr.write(f"rejected line {rej.line}: {rej.reason}\n")
        return True

    def close(self, summary: RunSummary, failed: bool = False) -> None:
        """Close the files and record the final status.  With ``failed`` (an error is
        on its way up) nothing here may replace that error: a full disk that broke a
        write also breaks the sidecar; the sidecar then keeps saying "running"."""
        for f in (self._out, self._rej):
            if f is not None and f is not sys.stdout.buffer:
                # after a failed write the buffer may still hold a piece of a line:
                # flushing it again fails again, and resume cuts what did get out
                with contextlib.suppress(OSError):
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(OSError):
                    f.close()
        if self.to_stdout:
            if self._out is not None:
                with contextlib.suppress(OSError) if failed else contextlib.nullcontext():
                    self._out.flush()
            return
        try:
            _atomic_write_json(
                meta_path(self.cfg.output),
                {
                    **self.cfg.meta,
                    "numerics": self.cfg.numerics,
                    "status": "failed" if failed else "interrupted" if summary.interrupted else "complete",
                    "input_sha256": summary.input_sha256,
                    "counts": {
                        "written_this_run": summary.done,
                        "already_done": summary.resumed,
                        "rejected_this_run": summary.rejected,
                        "truncated_this_run": summary.truncated,
                        "seconds_this_run": round(summary.seconds, 3),
                    },
                },
            )
        except CdrError:
            if not failed:
                raise


def run(
    cfg: RunConfig,
    parse: Callable[[bytes, int], Record | Reject | None],
    task: Task,
    events: Events | None = None,
) -> RunSummary:
    """Stream ``cfg.input`` through ``task`` into ``cfg.output``."""
    events = events or NullEvents()
    out = Output(cfg)
    summary = RunSummary(output=cfg.output, rejects_path=str(out.rejects_path) if out.rejects_path else None)
    total = input_total(cfg)  # before the output is created: an unreadable input is a user error
    summary.resumed = out.open()
    rng = random.Random(0)
    events.start(total, summary.resumed)
    seen = IdSet.for_items(total)
    hasher = hashlib.sha256()
    t0 = time.perf_counter()
    failed = False

    def reject(rej: Reject) -> None:
        if out.reject(rej):  # False: recorded by the run this one resumes
            summary.rejected += 1
        events.reject(rej)

    try:
        for lineno, raw in _selected_lines(cfg, hasher):
            if cfg.limit is not None and summary.done >= cfg.limit:
                # read on (the input's sha256) but record nothing more, not even rejects:
                # the resumed run records them, in input order, as one whole run would
                continue
            item = parse(raw, lineno)
            if item is None:
                continue
            if isinstance(item, Reject):
                reject(item)
                continue
            key = _id_key(item.id)
            if key in seen:
                reject(Reject(lineno, f"duplicate id {item.id!r}", id=item.id))
                continue
            seen.add(key)
            if key in out.done_ids:
                continue
            try:
                obj, stats = task.process(item)
            except RecordError as e:
                reject(Reject(lineno, str(e), id=item.id, detail=e.detail))
                continue
            try:
                out.write(obj)
            except orjson.JSONEncodeError as e:  # e.g. a pass-through field nested too deep
                reject(Reject(lineno, f"output cannot be written as JSON: {e}", id=item.id))
                continue
            except OSError as e:
                raise CdrError(f"cannot write {cfg.output}: {e.strerror or e}; everything before line {lineno} is saved, rerun with --resume") from None
            summary.add_record(stats, rng)
            events.record(stats)
        summary.input_sha256 = hasher.hexdigest()
    except KeyboardInterrupt:
        summary.interrupted = True
    except BaseException:
        failed = True  # the sidecar must not claim "complete"
        raise
    finally:
        summary.seconds = time.perf_counter() - t0
        out.close(summary, failed)
    events.finish(summary)
    return summary
