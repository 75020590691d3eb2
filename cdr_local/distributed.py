"""Scale-out on Ray: the pipeline's driver loop, with the scoring spread over Ray actors.

The driver (the ``cdr`` process) runs :func:`pipeline.drive`, the loop a local
run runs: the same reader and parser (rejects and duplicate ids are found
there, with line numbers), the same :class:`pipeline.Output` (lock, resume
index, torn-tail repair, rejects file, metadata sidecar), the same ``--limit``,
the same lines in the same order.  Only ``task.process`` runs elsewhere, through
:class:`RayExecutor`:

* Records are partitioned by **line ranges**: partition ``k`` holds input
  lines ``k*P+1 .. (k+1)*P`` (``P`` = ``--ray-partition-size``), or, for a
  sample (``eval --per-section``), positions ``k*P .. (k+1)*P-1`` of the
  sample's own order, so the partitioning depends on the input alone.
* Each partition's lines go to a Ray actor.  An actor builds the task once
  (loads the pair: the registry travels already parsed, and each node
  resolves the models in its own cache, pulling and checking sha256 on first
  use) and returns one result row per record: the output object and its
  stats, or the reason the task rejected it.
* The driver writes each partition's rows to ``OUT.parts/part-K.jsonl``
  atomically (temporary file, fsync, rename), then merges partitions in input
  order into ``OUT`` through the pipeline's writer, and deletes a part once
  merged.  Because a record's scores depend only on the record and the engine
  settings (the engine's numerics contract), the merged output is byte for
  byte a local run's.

Faults: when an actor dies (killed, or its node lost), the driver sends its
partitions to the live actors and starts a replacement, which joins when Ray
finds room for it (on any node).  A killed driver leaves ``OUT`` (a
prefix of the result, perhaps with a torn last line) and the part files of
finished partitions; ``--resume`` repairs the tail, skips the ids already in
``OUT``, reuses the part files and scores only what neither holds.

``ray`` is imported lazily: it is an optional extra (``cdr-local[ray]``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from .atomic import write_bytes_atomic
from .errors import CdrError
from .pipeline import (
    Batch,
    Events,
    NullEvents,
    RunConfig,
    RunSummary,
    Task,
    drive,
    input_total,
    process_records,
    write_json_atomic,
)
from .records import Record, Reject

DEFAULT_PARTITION_SIZE = 64
RAY_EXTRA_HINT = "pip install 'cdr-local[ray]'"


@dataclass
class BuiltTask:
    """A task ready to run, with what travels into the output's metadata."""

    task: Task
    meta: dict[str, Any]  # merged into OUT.meta.json (models, engine, profile, ...)
    numerics: dict[str, Any]  # the settings that change scores (resume guard)
    close: Callable[[], None] = lambda: None


class TaskFactory(Protocol):
    """Builds the task; picklable, because each Ray actor calls it on its own node."""

    def __call__(self) -> BuiltTask: ...


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: ray.init()'s own choice (RAY_ADDRESS, a cluster on this machine, or a new one)
    actors: int | None = None  # None: one per node (one per GPU when num_gpus > 0)
    partition_size: int = DEFAULT_PARTITION_SIZE
    num_cpus: float = 1.0  # Ray resources each actor reserves
    num_gpus: float = 0.0
    replacements: int = 3  # per actor: a dead actor is replaced by a new one this often at most
    max_attempts: int = 4  # a partition is sent to this many actors at most
    per_actor: int = 2  # partitions queued on one actor at once (keeps it busy between results)

    def for_settings(self, settings: Any) -> RayOptions:
        """The resources each actor reserves, from the engine settings: the threads
        it runs (1 when the engine takes all cores of its node: actors are spread
        one per node), and one GPU when layers are offloaded."""
        from dataclasses import replace

        n = int(settings.n_threads)
        return replace(self, num_cpus=float(n if n > 0 else 1), num_gpus=1.0 if settings.n_gpu_layers != 0 else 0.0)


def import_ray() -> Any:
    """``ray``, or a one-line user error naming the extra."""
    try:
        import ray  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise CdrError(f"--ray needs the ray extra: {RAY_EXTRA_HINT}") from None
    return ray


# ---------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------


class PartitionScorer:
    """A Ray actor: builds the task once (loads the pair), then scores partitions."""

    def __init__(self, factory: TaskFactory, parse: Callable[[bytes, int], Record | Reject | None]) -> None:
        self.parse = parse
        self.error: Exception | None = None
        self.digest = ""
        try:
            self.built = factory()
            self.digest = numerics_digest(self.built.numerics)
        except Exception as e:  # kept for describe(): Ray would only report "the actor died"
            self.error = e

    def describe(self) -> dict[str, Any]:
        import socket

        if self.error is not None:
            raise self.error
        return {"meta": self.built.meta, "numerics": self.built.numerics, "host": socket.gethostname(), "pid": os.getpid()}

    def score(self, k: int, lines: list[tuple[int, bytes]]) -> tuple[str, list[dict[str, Any]]]:
        """Result rows of one partition (``pipeline.process_records``'), and the digest of
        the settings they were scored with, checked by the driver on every partition."""
        records: list[tuple[int, Record]] = []
        for lineno, raw in lines:
            rec = self.parse(raw, lineno)
            if not isinstance(rec, Record):  # the driver sends only lines that parse
                raise RuntimeError(f"line {lineno} did not parse on the worker as on the driver")
            records.append((lineno, rec))
        return self.digest, process_records(self.built.task, records)


def numerics_digest(numerics: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(numerics, option=orjson.OPT_SORT_KEYS)).hexdigest()


# ---------------------------------------------------------------------------
# Partitions and part files
# ---------------------------------------------------------------------------


class _Parts:
    """``OUT.parts/``: one file per scored partition, written atomically, removed once merged."""

    def __init__(self, output: str, numerics: dict[str, Any], resume: bool) -> None:
        self.temporary = output == "-"
        self.dir = Path(tempfile.mkdtemp(prefix="cdr-parts-")) if self.temporary else Path(output + ".parts")
        manifest = self.dir / "numerics.json"
        if self.dir.exists() and not self.temporary:
            keep = resume and manifest.exists() and orjson.loads(manifest.read_bytes()) == numerics
            if not keep:  # a fresh run, or parts scored under other settings
                shutil.rmtree(self.dir)
        self.dir.mkdir(exist_ok=True)
        for tmp in self.dir.glob(".*.tmp"):  # left by a kill mid-write
            tmp.unlink()
        write_json_atomic(manifest, numerics)

    def path(self, k: int) -> Path:
        return self.dir / f"part-{k:08d}.jsonl"

    def load(self, k: int) -> dict[int, dict[str, Any]]:
        p = self.path(k)
        if not p.exists():
            return {}
        rows = [orjson.loads(line) for line in p.read_bytes().splitlines() if line.strip()]
        return {int(r["line"]): r for r in rows}

    def write(self, k: int, rows: dict[int, dict[str, Any]]) -> None:
        final = self.path(k)
        data = b"".join(orjson.dumps(rows[line]) + b"\n" for line in sorted(rows))
        write_bytes_atomic(final, data, tmp=self.dir / f".{final.name}.tmp")

    def remove(self, k: int) -> None:
        self.path(k).unlink(missing_ok=True)

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# The actor pool
# ---------------------------------------------------------------------------


@dataclass
class _Actor:
    handle: Any
    ready: bool = False
    inflight: int = 0
    host: str = ""


class _Pool:
    """Actors, their describe() and score() calls, and what to do when one dies."""

    def __init__(self, ray: Any, factory: TaskFactory, parse: Any, opts: RayOptions, n: int) -> None:
        self.ray = ray
        self.opts = opts
        self.cls = ray.remote(PartitionScorer).options(
            num_cpus=opts.num_cpus,
            num_gpus=opts.num_gpus,
            # no restarts by Ray: a restarted actor that finds no free node would hold its
            # queued partitions forever; the driver moves them to live actors instead
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        )
        self.factory = factory
        self.parse = parse
        self.actors: list[_Actor] = []
        self.describing: dict[Any, _Actor] = {}
        self.inflight: dict[Any, tuple[Batch, _Actor]] = {}
        self.spawns_left = n * (1 + opts.replacements)
        self.reference: dict[str, Any] | None = None
        self.lost = 0  # actors that died
        self.resubmit: list[Batch] = []  # partitions whose actor was lost
        for _ in range(n):
            self._spawn()

    def _spawn(self) -> None:
        if self.spawns_left <= 0:
            raise CdrError("ray: too many actors died; see the worker logs (ray logs) for why")
        self.spawns_left -= 1
        a = _Actor(self.cls.remote(self.factory, self.parse))
        self.actors.append(a)
        self.describing[a.handle.describe.remote()] = a

    def close(self) -> None:
        """Stop the actors now (an interrupted run leaves calls in flight)."""
        for a in self.actors:
            try:
                self.ray.kill(a.handle, no_restart=True)
            except Exception:
                pass
        self.actors = []

    def start(self) -> dict[str, Any]:
        """Wait until one actor has loaded the task; return its description."""
        while self.reference is None:
            self.wait_one()
        return self.reference

    def free_slots(self) -> int:
        return sum(self.opts.per_actor - a.inflight for a in self.actors if a.ready)

    def busy(self) -> bool:
        return bool(self.inflight or self.describing)

    def submit(self, p: Batch) -> None:
        live = [a for a in self.actors if a.ready and a.inflight < self.opts.per_actor]
        if not live:
            raise AssertionError("submit without a free actor")
        a = min(live, key=lambda x: x.inflight)
        a.inflight += 1
        p.attempts += 1
        self.inflight[a.handle.score.remote(p.k, [(line, raw) for line, raw, _ in p.todo])] = (p, a)

    def _drop(self, a: _Actor) -> None:
        """This actor died: start a new one (a bounded number of times); it joins when it is ready."""
        if a in self.actors:
            self.actors.remove(a)
            self.lost += 1
            self._spawn()

    def wait_one(self) -> list[tuple[Batch, list[dict[str, Any]]]]:
        """Wait (at most a second, so Ctrl-C is seen) for one call; return finished partitions."""
        ray = self.ray
        refs = list(self.describing) + list(self.inflight)
        if not refs:
            raise AssertionError("nothing to wait for")
        done, _ = ray.wait(refs, num_returns=1, timeout=1.0)
        out: list[tuple[Batch, list[dict[str, Any]]]] = []
        for ref in done:
            if ref in self.describing:
                a = self.describing.pop(ref)
                try:
                    desc = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the task could not be built (missing model...)
                    raise _cause(e) or e from None
                except ray.exceptions.RayActorError:
                    self._drop(a)
                    continue
                self._check(desc)
                a.ready = True
                a.host = str(desc.get("host", ""))
            else:
                p, a = self.inflight.pop(ref)
                a.inflight -= 1
                try:
                    digest, rows = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise _cause(e) or e from None
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                    # the actor died (killed, out of memory, its node lost): send the
                    # partition to another one
                    self._drop(a)
                    if p.attempts >= self.opts.max_attempts:
                        raise CdrError(f"ray: partition {p.k} failed on {p.attempts} actors; see the worker logs (ray logs)") from None
                    self.resubmit.append(p)
                    continue
                assert self.reference is not None
                if digest != numerics_digest(self.reference["numerics"]):
                    raise CdrError(
                        f"ray: partition {p.k} came back from an actor (restarted on another node?) whose settings that "
                        "change scores differ from the first actor's; install the same versions and models on every node"
                    )
                out.append((p, rows))
        return out

    def _check(self, desc: dict[str, Any]) -> None:
        if self.reference is None:
            self.reference = desc
            return
        a, b = self.reference["numerics"], desc["numerics"]
        if a != b:
            diffs = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            raise CdrError(
                f"ray: the actor on {desc.get('host')} would score with other settings than the one on "
                f"{self.reference.get('host')} ({'; '.join(diffs)}); install the same versions and models on every node"
            )


def _cause(e: BaseException) -> BaseException | None:
    """The user's exception inside a Ray error (a CdrError keeps its one-line message)."""
    c = getattr(e, "cause", None)
    for _ in range(4):
        if c is None or not hasattr(c, "cause") or isinstance(c, CdrError):
            break
        c = getattr(c, "cause", None)
    if isinstance(c, BaseException) and not type(c).__module__.startswith("ray."):
        return c
    return None


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


def _reachable(ray: Any, address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at HOST:PORT (Ray itself retries for long)."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local", or a form Ray will judge
    candidates = [(host.strip("[]"), int(port))]
    try:  # Ray dials a local-host address at this node's own IP instead
        node_ip = ray.util.get_node_ip_address()
        if host in ("localhost", "127.0.0.1", "::1", "[::1]") and node_ip:
            candidates.append((node_ip, int(port)))
    except Exception:
        pass
    err: OSError | None = None
    for c in candidates:
        try:
            socket.create_connection(c, timeout=5).close()
            return
        except OSError as e:
            err = e
    assert err is not None
    raise CdrError(f"ray: nothing answers at {address} ({err.strerror or err}); start the head with `ray start --head`")


def _connect(ray: Any, address: str | None) -> None:
    import logging

    # an offline tool: the Ray that cdr starts itself (and this driver) send no usage statistics
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        _reachable(ray, address)
    try:
        ray.init(address=address or None, logging_level=logging.ERROR, log_to_driver=True)
    except ConnectionError as e:
        raise CdrError(f"ray: cannot connect to {address or 'a cluster'}: {e}") from None


def _default_actors(ray: Any, opts: RayOptions) -> int:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if opts.num_gpus > 0:
        gpus = max((n.get("Resources", {}).get("GPU", 0.0) for n in nodes), default=0.0)
        if gpus < opts.num_gpus:
            raise CdrError("ray: --n-gpu-layers asks for a GPU per actor, but no node of the cluster has one")
        return max(1, int(sum(n.get("Resources", {}).get("GPU", 0.0) // opts.num_gpus for n in nodes)))
    cpus = max((n.get("Resources", {}).get("CPU", 0.0) for n in nodes), default=0.0)
    if cpus < opts.num_cpus:
        raise CdrError(f"ray: each actor asks for {opts.num_cpus:g} CPUs (--threads), but the largest node has {cpus:g}")
    return max(1, len(nodes))


def run_on_ray(
    cfg: RunConfig,
    parse: Callable[[bytes, int], Record | Reject | None],
    factory: TaskFactory,
    opts: RayOptions,
    events: Events | None = None,
) -> RunSummary:
    """:func:`pipeline.run`, with ``factory()``'s task run by Ray actors.

    ``cfg.meta`` and ``cfg.numerics`` are completed with what the first actor's
    task reports (as a local run takes them from its own task), plus a ``ray``
    entry in the metadata (not in the numerics: a local run can resume a Ray
    run's output and the other way round).
    """
    if opts.partition_size < 1:
        raise CdrError("--ray-partition-size must be at least 1")
    if opts.actors is not None and opts.actors < 1:
        raise CdrError("--ray-actors must be at least 1")
    ray = import_ray()
    events = events or NullEvents()
    total = input_total(cfg)  # an unreadable input fails here, before Ray starts
    _connect(ray, opts.address)
    pool: _Pool | None = None
    try:
        n = opts.actors or _default_actors(ray, opts)
        pool = _Pool(ray, factory, parse, opts, n)
        first = pool.start()
        cfg.meta.update(first["meta"])
        cfg.numerics.update(first["numerics"])
        info: dict[str, Any] = {
            "address": opts.address,
            "nodes": len([x for x in ray.nodes() if x.get("Alive")]),
            "actors": n,
            "num_cpus_per_actor": opts.num_cpus,
            "num_gpus_per_actor": opts.num_gpus,
            "partition_size": opts.partition_size,
        }
        cfg.meta["ray"] = info
        return drive(cfg, parse, RayExecutor(pool, opts, cfg, info), events, total=total)
    finally:
        if pool is not None:
            pool.close()
        ray.shutdown()


class RayExecutor:
    """``pipeline.drive``'s executor on Ray: batches (partitions of
    ``--ray-partition-size`` lines) go to the actors, read ahead within a window
    and within ``--limit``'s room; their rows are kept in part files until the
    driver has written them."""

    def __init__(self, pool: _Pool, opts: RayOptions, cfg: RunConfig, info: dict[str, Any]) -> None:
        self.pool = pool
        self.batch_size = opts.partition_size
        self.cfg = cfg
        self.info = info
        self.counts = {"partitions": 0, "scored": 0, "from_part_files": 0}
        info["this_run"] = self.counts
        self.parts: _Parts | None = None

    def results(self, batches: Iterator[Batch], room: Callable[[], int | None]) -> Iterator[Batch]:
        pool, counts = self.pool, self.counts
        parts = self.parts = _Parts(self.cfg.output, self.cfg.numerics, self.cfg.resume)
        pending: deque[Batch] = deque()
        window = max(4, 4 * len(pool.actors))
        reading = True
        while True:
            while pool.resubmit and pool.free_slots() > 0:
                pool.submit(pool.resubmit.pop(0))
            while reading and len(pending) < window and pool.free_slots() > 0:
                left = room()
                if left is not None and left > 0 and sum(p.records for p in pending) >= left:
                    break  # enough records are on their way; read on once merges show how many were rejected
                p = next(batches, None)
                if p is None:
                    reading = False
                    break
                counts["partitions"] += 1
                pending.append(p)
                if p.todo:
                    saved = parts.load(p.k)
                    ids = {line: rid for line, rid in p.items if isinstance(rid, str)}
                    p.rows = {line: r for line, r in saved.items() if ids.get(line) == r.get("id")}
                    p.todo = [t for t in p.todo if t[0] not in p.rows]
                    if p.rows:
                        counts["from_part_files"] += 1
                if p.todo:
                    counts["scored"] += 1
                    pool.submit(p)
                else:
                    p.ready = True
            merged = bool(pending and pending[0].ready)
            while pending and pending[0].ready:
                p = pending.popleft()
                yield p
                parts.remove(p.k)  # written by the driver
            if not reading and not pending:
                return
            if merged:
                continue  # room to read ahead again before waiting
            for p, rows in pool.wait_one():
                p.rows.update({int(r["line"]): r for r in rows})
                p.todo = []
                parts.write(p.k, p.rows)
                p.ready = True

    def finish(self) -> None:
        self.info["actors_lost"] = self.pool.lost
        self.info["hosts"] = sorted({a.host for a in self.pool.actors if a.host})

    def cleanup(self, complete: bool) -> None:
        if self.parts is not None and (self.parts.temporary or complete):
            self.parts.finish()
