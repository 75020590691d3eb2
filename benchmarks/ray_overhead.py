"""Records/s of one local process against ``--ray`` on a local Ray instance, side by side.

Runs the same input through ``pipeline.run`` (local) and ``distributed.run_on_ray``
(Ray actors on this machine, on loopback) and prints, for each: wall time from
start to finished output (Ray's start and the actors' model loading included),
the time of the scoring loop alone, records/s, and the per-record overhead of
Ray against the local run with the same threads per scorer.  It also checks
that every Ray output equals the local one byte for byte.

    python benchmarks/ray_overhead.py                       # tiny random models (tests/tinygguf.py)
    python benchmarks/ray_overhead.py --real -n 48          # SmolLM2-135M (smollm2-sys) from $CDR_HOME

Needs the ray extra (pip install 'cdr-local[ray]').
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback only (read when ray is imported)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more").split()


def make_input(path: Path, n: int, seed: int = 0) -> None:
    import orjson

    r = random.Random(seed)

    def words(a: int, b: int) -> str:
        return " ".join(r.choice(WORDS) for _ in range(r.randint(a, b)))

    with open(path, "wb") as f:
        for i in range(n):
            f.write(orjson.dumps({"id": f"b{i:05d}", "prompt": words(10, 30).capitalize() + "?",
                                  "chosen": words(40, 80) + ".", "rejected": words(40, 80) + "."}) + b"\n")


def tiny_registry(d: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_REGISTRY  # type: ignore[import-not-found]
    from tinygguf import build_tiny_llama  # type: ignore[import-not-found]

    bos = build_tiny_llama(d / "tiny-bos.gguf", seed=0, add_bos=True)
    nobos = build_tiny_llama(d / "tiny-nobos.gguf", seed=1, add_bos=False)
    reg = d / "models.toml"
    reg.write_text(TINY_REGISTRY.format(bos=bos, nobos=nobos))
    return reg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--records", type=int, default=400)
    ap.add_argument("--real", action="store_true", help="score with the shipped default pair (SmolLM2-135M, must be pulled)")
    ap.add_argument("--threads", type=int, default=1, help="threads per scorer (local process and each actor)")
    ap.add_argument("--partition-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each configuration (interleaved); the best is shown")
    a = ap.parse_args()

    from cdr_local.distributed import RayOptions, import_ray, run_on_ray
    from cdr_local.models import load_registry
    from cdr_local.pair import settings_from
    from cdr_local.pipeline import RunConfig, run
    from cdr_local.profiles import load_profile
    from cdr_local.records import parse_line
    from cdr_local.runs import ScoringSpec

    ray = import_ray()
    work = Path(tempfile.mkdtemp(prefix="cdr-ray-bench-"))
    reg_path = None if a.real else tiny_registry(work)
    reg = load_registry(reg_path)
    inp = work / "in.jsonl"
    make_input(inp, a.records)
    spec = ScoringSpec(reg, None, settings_from(reg, n_threads=a.threads), load_profile("none"), None, False)

    def cfg(name: str) -> RunConfig:
        return RunConfig(input=str(inp), output=str(work / f"{name}.jsonl"), overwrite=True,
                         meta={"command": "annotate", "input": str(inp)})

    def local_run() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        built = spec()
        try:
            s = run(cfg("local"), parse_line, built.task)
        finally:
            built.close()
        return time.perf_counter() - t0, s.seconds, s.done

    def ray_run(actors: int) -> tuple[float, float, int]:
        name = f"ray{actors}"
        t0 = time.perf_counter()
        s = run_on_ray(cfg(name), parse_line, spec,
                       RayOptions(address="local", actors=actors, partition_size=a.partition_size, num_cpus=float(a.threads)))
        wall = time.perf_counter() - t0
        if (work / f"{name}.jsonl").read_bytes() != (work / "local.jsonl").read_bytes():
            sys.exit(f"{name}: output differs from the local run")
        return wall, s.seconds, s.done

    labels = [f"local, 1 process x {a.threads} thread(s)", f"--ray, 1 actor x {a.threads} thread(s)",
              f"--ray, 2 actors x {a.threads} thread(s)"]
    runs: list[list[tuple[float, float, int]]] = [[], [], []]
    for _ in range(a.repeat):  # interleaved, best of each: the machine may be busy
        for i, f in enumerate((local_run, lambda: ray_run(1), lambda: ray_run(2))):
            runs[i].append(f())
    rows = [(label, min(r[0] for r in rs), min(r[1] for r in rs), rs[0][2]) for label, rs in zip(labels, runs, strict=True)]
    pair = reg.pair(None).name
    print(f"{a.records} records, pair {pair}, ray {ray.__version__}, {os.cpu_count()} cores, "
          f"partition size {a.partition_size}, best of {a.repeat}; load average {os.getloadavg()[0]:.2f} at the end")
    print("wall: start to finished output (Ray start, actors, model load included); loop: the scoring loop alone")
    print(f"{'run':<34} {'wall s':>8} {'loop s':>8} {'rec/s wall':>11} {'rec/s loop':>11}")
    for label, wall, loop, n in rows:
        print(f"{label:<34} {wall:8.2f} {loop:8.2f} {n / wall:11.1f} {n / loop:11.1f}")
    lw, ll = rows[0][1], rows[0][2]
    rw, rl = rows[1][1], rows[1][2]
    n = a.records
    print(f"Ray's cost with 1 actor against the local process: {1000 * (rl - ll) / n:+.2f} ms per record in the loop, "
          f"{rw - rl - (lw - ll):+.1f} s more to start (ray.init, actor start, model load)")
    print("all Ray outputs are byte-identical to the local one")


if __name__ == "__main__":
    main()
