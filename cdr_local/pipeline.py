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

One driver loop (:func:`drive`) serves local and Ray runs alike: it reads and
classifies the input (blank lines, bad lines, repeated ids, ids a resumed run
already wrote), counts ``--limit``, records rejects and writes results in input
order; an :class:`Executor` only processes records (:class:`InProcess` here,
``distributed.RayExecutor`` on Ray actors).

The pipeline never imports rich: it reports through an :class:`Events` object.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import IO, Any, Protocol

import orjson

from .atomic import write_bytes_atomic
from .card import card_path
from .card import ours as card_is_ours
from .card import render as render_card
from .errors import CdrError
from .files import check_distinct, check_writable_target, is_regular, kind
from .locks import try_lock
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
    # other files the command will write (reports): (role, path), checked
    # against the input and the output before anything is opened
    also_writes: Sequence[tuple[str, str]] = ()
    # a record the annotator is not confident enough about: returns why (the
    # record then goes to OUT.abstained.jsonl, not the output), or None to keep it
    abstain: Callable[[dict[str, Any]], str | None] | None = None


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
    abstained: int = 0  # records held back by --min-confidence / --keep-top in this run
    abstained_path: str | None = None

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


def abstained_path(output: str) -> Path:
    """``OUT.abstained.jsonl``: whole output lines the annotator was not confident enough to keep."""
    p = Path(output)
    return p.with_name(p.name[: -len(".jsonl")] + ".abstained.jsonl") if p.name.endswith(".jsonl") else Path(output + ".abstained.jsonl")


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


def id_key(rid: str) -> int:
    """A record id as the 64-bit key of :class:`IdSet` (never 0, the empty slot)."""
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


def _has_a_line(path: Path) -> bool:
    """Whether the file holds at least one whole line (a newline)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if b"\n" in chunk:
                return True
    return False


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


class InputReader:
    """Reads the input line by line, hashing what it has read.

    ``checkpoint()`` says how much of the input has been read and what it
    hashed to; the sidecar records it (``input_prefix``) so that ``--resume``
    can refuse an input that is not the one the output came from.  A sample
    (``select``) is taken after one pass over the whole input, so its
    checkpoint is the whole input from the first record on.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.hasher = hashlib.sha256()
        self.bytes = 0
        self.lines = 0

    def checkpoint(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "lines": self.lines, "sha256": self.hasher.copy().hexdigest()}

    def read(self) -> Iterator[tuple[int, bytes]]:
        f: IO[bytes]
        if self.source == "-":
            f = sys.stdin.buffer
            close = False
        else:
            try:
                f = open(self.source, "rb")
            except OSError as e:
                raise CdrError(f"cannot read input {self.source}: {e.strerror}") from None
            close = True
        try:
            for i, line in enumerate(f, 1):
                self.hasher.update(line)
                self.bytes += len(line)
                self.lines = i
                yield i, line
        finally:
            if close:
                f.close()

    def selected(self, select: Sequence[int] | None) -> Iterator[tuple[int, bytes]]:
        """All input lines in file order, or only ``select``'s in its order.

        A sample is small, so its lines are held in memory (the rest of the input
        is streamed past, and still hashed for the metadata).
        """
        if select is None:
            yield from self.read()
            return
        wanted = set(select)
        picked = {i: line for i, line in self.read() if i in wanted}
        for i in dict.fromkeys(select):  # once each, first position wins
            if i in picked:
                yield i, picked[i]


def count_lines(source: str) -> int | None:
    """Lines of a regular file; ``None`` for stdin, a pipe or a FIFO (counting
    would consume it, or block)."""
    if source == "-" or not is_regular(source):
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
    if cfg.input != "-":
        k = kind(cfg.input)
        if k in ("missing", "unreadable"):
            raise CdrError(f"cannot read input {cfg.input}: {'no such file' if k == 'missing' else 'permission denied'}")
        if k in ("directory", "block device", "socket"):
            raise CdrError(f"cannot read input {cfg.input}: it is a {k}, not a file or a pipe")
    if cfg.select is not None:
        if cfg.input == "-" or not is_regular(cfg.input):
            raise CdrError("a sample (--per-section) needs the input as a regular file: it is read twice")
        total = len(set(cfg.select))
        cfg.meta["selected_lines"] = total
        return total
    try:
        return count_lines(cfg.input)
    except OSError as e:
        raise CdrError(f"cannot read input {cfg.input}: {e.strerror}") from None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``path`` whole or not at all; a failure (full disk, read-only folder) is a CdrError."""
    try:
        write_bytes_atomic(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    except OSError as e:
        raise CdrError(f"cannot write {path}: {e.strerror or e}") from None


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _check_same_input(cfg: RunConfig, old: dict[str, Any]) -> None:
    """Refuse to resume from an input that is not the one the output came from.

    The sidecar's ``input_prefix`` holds the size and sha256 of the part of the
    input the output covers (checkpointed with every fsync, about once a
    second).  The new input must start with exactly those bytes: lines may be
    appended at the end, nothing before them may change.  A sample
    (``--per-section``) depends on the whole input, so there the input must be
    byte-identical.  A pipe cannot be read twice, so it cannot be checked.
    """
    prefix = old.get("input_prefix")
    if not isinstance(prefix, dict):
        whole = old.get("input_sha256")
        if old.get("status") == "complete" and isinstance(whole, str):
            prefix = {"sha256": whole, "bytes": None, "whole": True}
        else:
            raise InputChanged(
                f"cannot resume {cfg.output}: its sidecar records no input checkpoint (written by an older cdr-local?), "
                "so the input cannot be checked; use --force to resume anyway"
            )
    nbytes = prefix.get("bytes")
    if nbytes == 0:
        return
    if cfg.input == "-" or not is_regular(cfg.input):
        raise InputChanged(
            f"cannot resume {cfg.output} from a pipe: it cannot be checked against the input the output came from "
            "(resume from the file itself, or use --force)"
        )
    whole = bool(prefix.get("whole")) or cfg.select is not None
    size = os.path.getsize(cfg.input)
    h = hashlib.sha256()
    want = size if nbytes is None or (whole and size != nbytes) else int(nbytes)
    if whole and nbytes is not None and size != nbytes:
        same = False
    elif size < want:
        same = False
    else:
        with open(cfg.input, "rb") as f:
            left = want
            while left > 0:
                chunk = f.read(min(1 << 20, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
        same = left == 0 and h.hexdigest() == prefix.get("sha256")
    if not same:
        what = "the input must be the same file" if whole else (
            f"its first {prefix.get('lines', '?')} lines ({nbytes} bytes) must be unchanged; only appended lines are accepted"
        )
        raise InputChanged(
            f"cannot resume {cfg.output}: {cfg.input} is not the input this output came from ({what}); "
            "use --overwrite to start again, or --force to resume anyway"
        )


def preflight(cfg: RunConfig) -> None:
    """Every check that needs no model: which files are which, whether the
    output may be written, whether a resume can be checked.  Commands call it
    before loading models (a mistake then costs no load or download), and
    :meth:`Output.open` calls it again."""
    out_path = None if cfg.output == "-" else cfg.output
    rej = _rejects_path(cfg)
    meta = None if out_path is None else str(meta_path(cfg.output))
    abst = None if out_path is None else str(abstained_path(cfg.output))
    card = None if out_path is None else str(card_path(cfg.output))
    check_distinct([("input", cfg.input), ("output", out_path), ("rejects file", rej), ("metadata sidecar", meta),
                    ("abstained file", abst), ("dataset card", card), *cfg.also_writes])
    if out_path is None:
        if cfg.resume:
            raise CdrError("--resume needs an output file, not stdout")
        if cfg.abstain is not None:
            raise CdrError("--min-confidence / --keep-top need an output file (abstained records go to OUT.abstained.jsonl)")
        return
    if cfg.resume and cfg.overwrite:
        raise CdrError("--resume and --overwrite exclude each other: continue the output, or start it again")
    for role, p in (("output", out_path), ("rejects file", rej), ("metadata sidecar", meta), ("abstained file", abst),
                    ("dataset card", card), *cfg.also_writes):
        if p is not None:
            check_writable_target(role, p)
    if card is not None and not card_is_ours(Path(card)):
        raise CdrError(f"{card} exists and was not written by cdr-local (its dataset card goes there): move it, or name the output otherwise")
    out = Path(out_path)
    if out.exists() and out.stat().st_size > 0 and not cfg.resume and not cfg.overwrite:
        raise CdrError(f"{out} exists: use --resume to continue it or --overwrite to start again")


def _rejects_path(cfg: RunConfig) -> str | None:
    if cfg.rejects == "-" or (cfg.rejects is None and cfg.output == "-"):
        return None
    return cfg.rejects if cfg.rejects else str(rejects_path(cfg.output))


class InputChanged(CdrError):
    """``--resume`` was given an input that is not the one the output came from."""


class Output:
    """The output file (or stdout), its rejects file and its metadata sidecar."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.to_stdout = cfg.output == "-"
        self.done_ids = IdSet()
        self.rejected_lines: set[int] = set()
        self._out: IO[bytes] | None = None
        self._rej: IO[bytes] | None = None
        self._abs: IO[bytes] | None = None
        self.abstained_path: Path | None = None if self.to_stdout else abstained_path(cfg.output)
        self._synced = time.monotonic()
        rej = _rejects_path(cfg)
        self.rejects_path: Path | None = Path(rej) if rej is not None else None
        # how much of the input the records written so far cover (set by the
        # driver); recorded in the sidecar at every fsync and at the end
        self.progress: Callable[[], dict[str, Any]] | None = None

    def open(self) -> int:
        """Open for appending, take the lock, load the resume state; return records already done."""
        cfg = self.cfg
        preflight(cfg)
        if self.to_stdout:
            self._out = sys.stdout.buffer
            return 0
        out = Path(cfg.output)
        exists = out.exists() and out.stat().st_size > 0
        try:
            f = open(out, "ab")
        except OSError as e:
            raise CdrError(f"cannot write {out}: {e.strerror}") from None
        if not try_lock(f.fileno()):
            f.close()
            raise CdrError(f"{out} is being written by another cdr process (locked)")
        self._out = f
        try:
            if not cfg.resume:
                # a fresh start (or --overwrite): a rejects file left by an
                # earlier run of this output would otherwise be appended to
                if exists:
                    f.truncate(0)
                for old in (self.rejects_path, self.abstained_path):
                    if old is not None and old.exists():
                        old.unlink()
            elif exists and not _has_a_line(out):
                repair_torn_tail(out)  # a torn piece of a first line: nothing to resume, nothing to check
            elif exists:
                self._check_meta()
                repair_torn_tail(out)
                for rid in _scan_ids(out, "id"):
                    self.done_ids.add(id_key(rid))
                if self.abstained_path is not None and self.abstained_path.exists():
                    repair_torn_tail(self.abstained_path)
                    for rid in _scan_ids(self.abstained_path, "id"):
                        self.done_ids.add(id_key(rid))
            if self.rejects_path is not None:
                if cfg.resume and self.rejects_path.exists():
                    repair_torn_tail(self.rejects_path)
                    for ln in _scan_ids(self.rejects_path, "line"):
                        self.rejected_lines.add(int(ln))
            self._previous_prefix = self._prefix_to_keep(exists)
            self._write_meta("running")
        except BaseException as e:  # e.g. settings differ: release the lock, do not leak the file
            self._out = None
            f.close()
            if isinstance(e, OSError):  # e.g. a read-only folder: the torn-tail repair cannot write
                raise CdrError(f"cannot write {e.filename or out}: {e.strerror or e}") from None
            raise
        return len(self.done_ids)

    _previous_prefix: dict[str, Any] | None = None
    _old_meta: dict[str, Any] | None = None

    def _prefix_to_keep(self, exists: bool) -> dict[str, Any] | None:
        """On resume, the previous run's input checkpoint stands until this run
        has read past it (a sidecar written before the first tick must not claim less)."""
        if not (self.cfg.resume and exists and self._old_meta):
            return None
        p = self._old_meta.get("input_prefix")
        return p if isinstance(p, dict) else None

    def _write_meta(self, status: str, extra: dict[str, Any] | None = None, *, card_records: int | None = None) -> dict[str, Any]:
        """Write the sidecar (and, with ``card_records``, the dataset card first: a card
        that cannot be written then leaves the sidecar as it was, never "complete")."""
        prefix = self.progress() if self.progress is not None else None
        prev = self._previous_prefix
        if prev is not None and (prefix is None or int(prefix.get("bytes", 0)) < int(prev.get("bytes", 0))):
            prefix = prev
        body: dict[str, Any] = {**self.cfg.meta, "numerics": self.cfg.numerics, "status": status}
        if prefix is not None:
            body["input_prefix"] = prefix
        body.update(extra or {})
        if card_records is not None:
            card = card_path(self.cfg.output)
            try:
                write_bytes_atomic(card, render_card(body, self.cfg.output, card_records).encode())
            except OSError as e:
                raise CdrError(f"cannot write {card}: {e.strerror or e}") from None
        write_json_atomic(meta_path(self.cfg.output), body)
        return body

    def _check_meta(self) -> None:
        """Resume only what can be checked: the settings that change scores, and
        that the input is the one the output came from (its checkpointed prefix)."""
        cfg = self.cfg
        mp = meta_path(cfg.output)
        why = None
        old: Any = None
        if not mp.exists():
            why = f"its sidecar {mp} is missing"
        else:
            try:
                old = orjson.loads(mp.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                why = f"its sidecar {mp} is unreadable (torn or edited)"
            else:
                if not isinstance(old, dict):
                    why, old = f"its sidecar {mp} is not a metadata object", None
        if why is not None:
            if cfg.force:
                return
            raise CdrError(
                f"cannot resume {cfg.output}: {why}, so neither the settings nor the input can be checked; use --force to resume anyway"
            )
        self._old_meta = old
        prev = old.get("numerics") or {}
        diffs = _diff(prev, cfg.numerics)
        if diffs and not cfg.force:
            raise CdrError(
                f"cannot resume {cfg.output}: settings that change scores differ from the first run ({'; '.join(diffs)}); use --force to resume anyway"
            )
        if not cfg.force:
            _check_same_input(cfg, old)

    def write(self, obj: dict[str, Any]) -> None:
        """Append one line.  orjson.JSONEncodeError (nothing written): the record
        cannot be serialized.  OSError: the line may be torn; resume repairs it."""
        assert self._out is not None
        self._out.write(orjson.dumps(obj) + b"\n")
        self._out.flush()
        if not self.to_stdout and time.monotonic() - self._synced >= FSYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        """fsync what is written, then checkpoint the input in the sidecar (in that
        order: the sidecar never claims more than the output holds)."""
        for f in (self._out, self._rej, self._abs):
            if f is not None:
                os.fsync(f.fileno())
        if not self.to_stdout:
            self._write_meta("running")
        self._synced = time.monotonic()

    def abstain(self, obj: dict[str, Any], why: str) -> None:
        """Append a whole output line, with why it was held back, to OUT.abstained.jsonl."""
        assert self.abstained_path is not None
        if self._abs is None:
            try:
                self._abs = open(self.abstained_path, "ab")
            except OSError as e:
                raise CdrError(f"cannot write {self.abstained_path}: {e.strerror}") from None
        self._abs.write(orjson.dumps({**obj, "abstained": why}) + b"\n")
        self._abs.flush()

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
        for f in (self._out, self._rej, self._abs):
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
            self._write_meta(
                "failed" if failed else "interrupted" if summary.interrupted else "complete",
                {
                    "input_sha256": summary.input_sha256,
                    "counts": {
                        "written_this_run": summary.done,
                        "already_done": summary.resumed,
                        "rejected_this_run": summary.rejected,
                        "abstained_this_run": summary.abstained,
                        "truncated_this_run": summary.truncated,
                        "seconds_this_run": round(summary.seconds, 3),
                    },
                },
                card_records=None if failed else summary.done + summary.resumed,
            )
        except CdrError:
            if not failed:
                raise


@dataclass
class Batch:
    """Consecutive input lines (in the run's order), classified: the unit an
    :class:`Executor` runs.  Batch ``k`` holds lines ``k*size .. (k+1)*size-1``
    of the run's order, so the batching depends on the input alone."""

    k: int
    items: list[tuple[int, Reject | str]] = field(default_factory=list)  # in line order: a reject, or a record id to write
    todo: list[tuple[int, bytes, Record]] = field(default_factory=list)  # records still to process
    records: int = 0  # records among ``items`` (what --limit counts, if none is rejected)
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # line -> result row (see process_records)
    ready: bool = False
    attempts: int = 0
    end: dict[str, Any] = field(default_factory=dict)  # the input checkpoint after its last line


def process_records(task: Task, records: Sequence[tuple[int, Record]]) -> list[dict[str, Any]]:
    """One result row per record: ``{line, id, obj, stats}``, or ``{line, id, reject, detail}``
    when the task rejects it.  What every executor (in process, or a Ray actor) returns."""
    rows: list[dict[str, Any]] = []
    for lineno, rec in records:
        try:
            obj, stats = task.process(rec)
        except RecordError as e:
            rows.append({"line": lineno, "id": rec.id, "reject": str(e), "detail": e.detail})
            continue
        rows.append({"line": lineno, "id": rec.id, "obj": obj, "stats": stats})
    return rows


class Executor(Protocol):
    """Where records are processed: in this process (:class:`InProcess`) or on Ray
    actors (``distributed.RayExecutor``).  :func:`drive` owns everything else."""

    batch_size: int

    def results(self, batches: Iterator[Batch], room: Callable[[], int | None]) -> Iterator[Batch]:
        """Every batch of ``batches``, in order, with ``rows`` filled in for its ``todo``.

        ``room()``: how many more records may be written (``--limit``), None for no limit;
        an executor that reads ahead reads no more batches than that while they are in
        flight.  The generator resumes only after the driver has written a batch."""
        ...

    def finish(self) -> None:
        """The run stops (done, interrupted or failed): before the sidecar is written."""
        ...

    def cleanup(self, complete: bool) -> None:
        """After the sidecar is written; ``complete``: neither interrupted nor failed."""
        ...


class InProcess:
    """Records processed here, one at a time, each written before the next is read."""

    batch_size = 1

    def __init__(self, task: Task) -> None:
        self.task = task

    def results(self, batches: Iterator[Batch], room: Callable[[], int | None]) -> Iterator[Batch]:
        for b in batches:
            b.rows = {r["line"]: r for r in process_records(self.task, [(line, rec) for line, _, rec in b.todo])}
            yield b

    def finish(self) -> None:
        pass

    def cleanup(self, complete: bool) -> None:
        pass


def run(
    cfg: RunConfig,
    parse: Callable[[bytes, int], Record | Reject | None],
    task: Task,
    events: Events | None = None,
) -> RunSummary:
    """Stream ``cfg.input`` through ``task`` into ``cfg.output``, in this process."""
    return drive(cfg, parse, InProcess(task), events)


def drive(
    cfg: RunConfig,
    parse: Callable[[bytes, int], Record | Reject | None],
    executor: Executor,
    events: Events | None = None,
    *,
    total: int | None | EllipsisType = ...,
) -> RunSummary:
    """The one driver loop of local and Ray runs: read and classify the input
    (:func:`batches`), let ``executor`` process the records, and write results,
    rejects and abstentions in input order through one :class:`Output`, with
    ``--limit`` and resume handled here.  ``total``: :func:`input_total`, when the
    caller has counted it already (``...``: count it here)."""
    events = events or NullEvents()
    out = Output(cfg)
    summary = RunSummary(output=cfg.output, rejects_path=str(out.rejects_path) if out.rejects_path else None,
                         abstained_path=str(out.abstained_path) if out.abstained_path and cfg.abstain else None)
    if total is ...:
        total = input_total(cfg)  # before the output is created: an unreadable input is a user error
    reader = InputReader(cfg.input)
    # the input checkpoint of what is written: where --limit stopped the work, or the
    # last batch written (the sidecar records it; --resume checks the input against it)
    merged_to = reader.checkpoint()
    out.progress = lambda: merged_to
    summary.resumed = out.open()
    rng = random.Random(0)
    events.start(total, summary.resumed)
    t0 = time.perf_counter()
    failed = False

    def reject(rej: Reject) -> None:
        if out.reject(rej):  # False: recorded by the run this one resumes
            summary.rejected += 1
        events.reject(rej)

    def room() -> int | None:
        return None if cfg.limit is None else cfg.limit - summary.done

    def limit_reached() -> bool:
        left = room()
        return left is not None and left <= 0

    def write(b: Batch) -> None:
        frozen = limit_reached()
        for lineno, it in b.items:
            if limit_reached():
                break  # nothing is recorded after the --limit-th record, not even rejects:
                # the resumed run records them, in input order, as one whole run would
            if isinstance(it, Reject):
                reject(it)
                continue
            row = b.rows[lineno]
            if "reject" in row:
                reject(Reject(lineno, row["reject"], id=row["id"], detail=row.get("detail")))
                continue
            keep(cfg, out, row["obj"], row["stats"], lineno, row["id"], reject, summary, rng, events)
        if not frozen:
            merged_to.clear()
            merged_to.update(b.end)

    try:
        for b in executor.results(batches(cfg, parse, executor.batch_size, IdSet.for_items(total), out.done_ids,
                                          reader, limit_reached), room):
            write(b)
        summary.input_sha256 = reader.hasher.hexdigest()
    except KeyboardInterrupt:
        summary.interrupted = True
    except BaseException:
        failed = True  # the sidecar must not claim "complete"
        raise
    finally:
        summary.seconds = time.perf_counter() - t0
        executor.finish()
        out.close(summary, failed)
        executor.cleanup(not (failed or summary.interrupted))
    events.finish(summary)
    return summary


def batches(
    cfg: RunConfig, parse: Callable[[bytes, int], Record | Reject | None], size: int, seen: IdSet, done: IdSet,
    reader: InputReader, limit_reached: Callable[[], bool],
) -> Iterator[Batch]:
    """Input lines in batches of ``size`` (file order, or a sample's own order), each
    line classified by :func:`classify`.  Once ``limit_reached()``, batches are still
    read (the input's sha256 covers the whole file) but hold nothing."""
    cur: Batch | None = None
    for i, (lineno, raw) in enumerate(reader.selected(cfg.select)):
        k = i // size
        if cur is None or cur.k != k:
            if cur is not None:
                yield cur
            cur = Batch(k)
        cur.end = reader.checkpoint()
        if limit_reached():
            continue
        item = classify(parse, lineno, raw, seen, done)
        if item is None:
            continue
        if isinstance(item, Reject):
            cur.items.append((lineno, item))
            continue
        cur.records += 1
        cur.items.append((lineno, item.id))
        cur.todo.append((lineno, raw, item))
    if cur is not None:
        yield cur


def classify(parse: Callable[[bytes, int], Record | Reject | None], lineno: int, raw: bytes, seen: IdSet,
             done: IdSet) -> Record | Reject | None:
    """One input line as the driver sees it: ``None`` for a blank
    line or a record the resumed run already wrote, a :class:`Reject` for a bad line
    or a repeated id, else the record to process (its id is then marked seen)."""
    item = parse(raw, lineno)
    if item is None or isinstance(item, Reject):
        return item
    key = id_key(item.id)
    if key in seen:
        return Reject(lineno, f"duplicate id {item.id!r}", id=item.id)
    seen.add(key)
    return None if key in done else item


def keep(cfg: RunConfig, out: Output, obj: dict[str, Any], stats: dict[str, float], lineno: int, rid: str,
         reject: Callable[[Reject], None], summary: RunSummary, rng: random.Random, events: Events) -> None:
    """Write one finished record: to the output, or, if the annotator abstains on it,
    to the abstained file."""
    why = cfg.abstain(obj) if cfg.abstain is not None else None
    try:
        if why is not None:
            out.abstain(obj, why)
            summary.abstained += 1
            stats = {**stats, "abstained": 1.0}
        else:
            out.write(obj)
    except orjson.JSONEncodeError as e:  # e.g. a pass-through field nested too deep
        reject(Reject(lineno, f"output cannot be written as JSON: {e}", id=rid))
        return
    except OSError as e:
        if out.to_stdout and isinstance(e, BrokenPipeError):
            raise  # stdout's reader is gone (`| head`): nothing to resume; the CLI exits quietly with 141
        raise CdrError(f"cannot write {cfg.output}: {e.strerror or e}; everything before line {lineno} is saved, rerun with --resume") from None
    if why is None:
        summary.add_record(stats, rng)
    events.record(stats)
