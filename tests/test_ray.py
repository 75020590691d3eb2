"""``--ray``: the same output as a local run, on a local two-node Ray cluster.

The cluster (``ray.cluster_utils.Cluster``: a head and one more node, one CPU
each, on loopback) is started once for the module.  Checked: a ``--ray`` run's
output, rejects and metadata equal a local run's (annotate, eval, pairs); an actor
SIGKILLed mid-run, or a node lost mid-run, loses or duplicates nothing; each
node pulls registry models into its own cache; a driver
SIGKILLed mid-run is resumed with ``--resume``, which scores only the
partitions that were not finished; a local run's partial output is finished
on Ray.  Skipped when ray is not installed (``pip install 'cdr-local[ray]'``).
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_cli import (
    CDR,
    WORDS,
    _annotate_args,
    _env,
    _lines,
    _wait_for,
    assert_clean_stderr,
    assert_user_error,
    cdr,
    jsonl,
)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
N = 120  # records: enough that a run lasts a few seconds, so kills land mid-run
BAD = {5: b'{"id": "bad-json", ', 50: b'{"id": "no-rejected", "prompt": "p", "chosen": "c"}', 51: b'{"id": "r003", "prompt": "dup", "chosen": "a", "rejected": "b"}'}


# Ray on Linux dials "127.0.0.1" at the machine's network address; the first variable
# keeps it on loopback.  The second keeps it from reporting usage statistics.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


ray_only = pytest.mark.skipif(not _ray_available(), reason="ray is not installed (pip install 'cdr-local[ray]')")


@pytest.fixture(scope="module")
def ray_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = random.Random(99)

    def words(a: int, b: int) -> str:
        return " ".join(r.choice(WORDS) for _ in range(r.randint(a, b)))

    lines: list[bytes] = []
    for i in range(N):
        while len(lines) + 1 in BAD:
            lines.append(BAD[len(lines) + 1])
        lines.append(orjson.dumps({"id": f"r{i:03d}", "prompt": words(8, 25) + "?", "chosen": words(20, 40) + ".",
                                   "rejected": words(20, 40) + ".", "subset": "s", "section": "Chat"}))
    p = tmp_path_factory.mktemp("ray-input") / "in.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


@pytest.fixture(scope="module")
def reference(ray_input: Path, tiny_registry: Path) -> dict[str, Any]:
    """A local run: output, rejects and metadata."""
    out = ray_input.parent / "local.jsonl"
    p = cdr(*_annotate_args(ray_input, out, tiny_registry), home=ray_input.parent / "home")
    assert p.returncode == 0, p.stderr
    data = out.read_bytes()
    assert len(jsonl(data)) == N
    return {"out": data, "rejects": (ray_input.parent / "local.rejects.jsonl").read_bytes(),
            "meta": orjson.loads(Path(str(out) + ".meta.json").read_bytes())}


PULLED_SPEC = """
[models.pulled]
sha256 = "{sha}"
[models.pulled.pypi]
packages = ["cdr-test-tinymodel==1.0.0"]
files = ["cdr_test_tinymodel/tiny.gguf"]

[pairs.pulled]
strong = {{ model = "pulled", system = "Be helpful." }}
weak = "tiny-nobos"
"""


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory, tiny_bos_model: Path) -> Path:
    """A local wheel index holding the tiny model, for registry models pulled by each node."""
    from test_models import make_wheel

    d = tmp_path_factory.mktemp("ray-wheels")
    make_wheel(d, "cdr-test-tinymodel", "1.0.0", {"cdr_test_tinymodel/tiny.gguf": tiny_bos_model.read_bytes()})
    return d


@pytest.fixture(scope="module")
def node_homes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return [tmp_path_factory.mktemp("ray-node-home") for _ in range(2)]


@contextlib.contextmanager
def _node_env(home: Path, wheels: Path) -> Iterator[None]:
    """The environment a Ray node started now inherits (and so its actors): its own
    CDR_HOME (model cache), as a separate machine would have; pip pointed at a local
    wheel index; the tests folder importable (tests/ray_helpers.py); loopback only."""
    saved = dict(os.environ)
    os.environ.update(LOOPBACK)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), str(REPO), saved.get("PYTHONPATH", "")) if p)
    os.environ["CDR_PIP_ARGS"] = f"--no-index --find-links {shlex.quote(str(wheels))}"
    os.environ["CDR_HOME"] = str(home)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def ray_cluster(node_homes: list[Path], wheels: Path) -> Iterator[Any]:
    """A head and a second node (one CPU each) on this machine: ``ray.cluster_utils.Cluster``."""
    if not _ray_available():
        pytest.skip("ray is not installed (pip install 'cdr-local[ray]')")
    # Ray reads LOOPBACK when it is first imported: the drivers, in-process or not, see it too
    saved = dict(os.environ)
    os.environ.update(LOOPBACK)
    from ray.cluster_utils import Cluster  # type: ignore[import-not-found,unused-ignore]

    c = None
    try:
        with _node_env(node_homes[0], wheels):
            c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
        with _node_env(node_homes[1], wheels):
            c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        c.wait_for_nodes()
        assert c.address.startswith("127.0.0.1:"), c.address
        yield c
    finally:
        if c is not None:
            c.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def cluster(ray_cluster: Any) -> str:
    """The address of the two-node cluster."""
    return str(ray_cluster.address)


def _same_as_local(out: Path, ref: dict[str, Any], command: str = "annotate", resumed: bool = False) -> dict[str, Any]:
    assert out.read_bytes() == ref["out"]  # same ids, same scores, same order, same bytes
    assert Path(str(out)[: -len(".jsonl")] + ".rejects.jsonl").read_bytes() == ref["rejects"]
    meta = orjson.loads(Path(str(out) + ".meta.json").read_bytes())
    assert meta["status"] == "complete"
    assert not Path(str(out) + ".parts").exists()  # merged and cleaned up
    ray_info = meta.pop("ray")
    a, b = dict(meta), dict(ref["meta"])
    for m in (a, b):
        # a resumed run counts only what it did itself
        m["counts"] = {} if resumed else {k: v for k, v in m["counts"].items() if k != "seconds_this_run"}
        m.pop("command")
    assert a == b
    assert meta["command"] == command
    return ray_info


@ray_only
@pytest.mark.ray
def test_nobody_at_the_address_is_a_quick_user_error(ray_input: Path, tiny_registry: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    p = _cdr_env(LOOPBACK, *_annotate_args(ray_input, tmp_path / "o.jsonl", tiny_registry, "--ray", "127.0.0.1:1"))
    assert "nothing answers at 127.0.0.1:1" in assert_user_error(p)
    assert time.monotonic() - t0 < 30


@ray_only
@pytest.mark.ray
def test_a_model_missing_on_the_nodes_is_a_one_line_error(cluster: str, ray_input: Path, tiny_registry: Path, tmp_path: Path) -> None:
    reg = tmp_path / "models.toml"
    reg.write_text(tiny_registry.read_text() + '\n[models.gone]\npath = "/nonexistent/gone.gguf"\n\n[pairs.gone]\nstrong = "gone"\nweak = "gone"\n')
    p = cdr(*_annotate_args(ray_input, tmp_path / "o.jsonl", reg, "--pair", "gone", "--ray", cluster), timeout=300)
    assert "model 'gone': file not found: /nonexistent/gone.gguf" in assert_user_error(p)


def test_missing_extra_is_a_one_line_error(ray_input: Path, tiny_registry: Path, tmp_path: Path) -> None:
    code = "import sys; sys.modules['ray'] = None; from cdr_local.cli import main; main()"
    p = subprocess.run([sys.executable, "-c", code, *map(str, _annotate_args(ray_input, tmp_path / "o.jsonl", tiny_registry, "--ray"))],
                       capture_output=True, text=True, env=_env(), timeout=60)
    line = assert_user_error(p)
    assert "cdr-local[ray]" in line


@ray_only
@pytest.mark.ray
def test_ray_run_equals_local(cluster: str, ray_input: Path, reference: dict[str, Any], tiny_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    p = cdr(*_annotate_args(ray_input, out, tiny_registry, "--ray", cluster, "--ray-partition-size", "7"), timeout=300)
    assert p.returncode == 0, p.stderr
    assert_clean_stderr(p.stderr)
    info = _same_as_local(out, ref=reference)
    assert info["nodes"] == 2 and info["actors"] == 2  # one actor per node by default
    assert info["this_run"]["partitions"] == info["this_run"]["scored"] == -(-(N + len(BAD)) // 7)


@ray_only
@pytest.mark.ray
def test_ray_eval_equals_local(cluster: str, ray_input: Path, reference: dict[str, Any], tiny_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.jsonl"
    p = cdr("eval", ray_input, "-o", out, "--models", tiny_registry, "--threads", "1", "-q", "--bootstrap", "50",
            "--ray", cluster, "--ray-partition-size", "16", timeout=300)
    assert p.returncode == 0, p.stderr
    _same_as_local(out, reference, command="eval")
    assert (tmp_path / "eval.report.json").exists()


@ray_only
@pytest.mark.ray
@pytest.mark.parametrize("fault", ["actor", "node"])
def test_fault_mid_run(
    fault: str, ray_cluster: Any, node_homes: list[Path], ray_input: Path, reference: dict[str, Any], tiny_registry: Path,
    wheels: Path, tmp_path: Path,
) -> None:
    """SIGKILL one actor process while it scores, or lose a whole node: its partitions
    go to the live actors, and the output is whole, duplicate-free and the same."""
    from ray_helpers import SlowFactory

    from cdr_local.distributed import RayOptions, run_on_ray
    from cdr_local.models import load_registry
    from cdr_local.pair import settings_from
    from cdr_local.pipeline import RunConfig
    from cdr_local.profiles import load_profile
    from cdr_local.records import parse_line
    from cdr_local.runs import ScoringSpec

    reg = load_registry(tiny_registry)
    factory = SlowFactory(ScoringSpec(reg, None, settings_from(reg, n_threads=1), load_profile("none"), None, True), 0.03)
    out = tmp_path / "out.jsonl"
    cfg = RunConfig(input=str(ray_input), output=str(out), meta={"command": "annotate", "input": str(ray_input)})
    extra = None
    if fault == "node":  # a third node, lost mid-run (its processes killed, as in a crash)
        with _node_env(tmp_path / "node3-home", wheels):
            extra = ray_cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray_cluster.wait_for_nodes()
    done: list[str] = []

    def inject() -> None:
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and not done:
            if _lines(out) >= 10:
                if extra is not None:
                    ray_cluster.remove_node(extra, allow_graceful=False)
                    done.append("node removed")
                else:
                    for pid in _actor_pids(node_homes)[:1]:
                        os.kill(pid, signal.SIGKILL)
                        done.append(f"actor {pid} killed")
            time.sleep(0.01)

    t = threading.Thread(target=inject, daemon=True)
    t.start()
    try:
        summary = run_on_ray(cfg, parse_line, factory, RayOptions(address=ray_cluster.address, partition_size=5))
    finally:
        t.join(timeout=30)
        if extra is not None and not done:
            ray_cluster.remove_node(extra)
    assert done, "the fault came too late"
    assert summary.done == N
    rows = jsonl(out.read_bytes())
    assert len({r["id"] for r in rows}) == len(rows) == N
    assert out.read_bytes() == reference["out"]
    info = orjson.loads(Path(str(out) + ".meta.json").read_bytes())["ray"]
    assert info["actors"] == (3 if fault == "node" else 2)  # one per node
    if fault == "actor":
        assert info["actors_lost"] >= 1


def _actor_pids(homes: list[Path]) -> list[int]:
    """Scoring actors of this test's cluster: named so by Ray, and started on one of its
    nodes (whose CDR_HOME they inherit), never those of another run on the machine."""
    marks = {b"CDR_HOME=" + os.fsencode(h) for h in homes}
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
                if not cmd.startswith(b"ray::PartitionScorer.score"):
                    continue
                env = set((d / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if env & marks:
                pids.append(int(d.name))
    return pids


def _start_and_wait(args: list[Any], out: Path, lines: int) -> subprocess.Popen[bytes]:
    # SIGINT must reach Python's handler even if pytest runs with SIGINT ignored
    proc = subprocess.Popen([*CDR, *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(proc, lambda: _lines(out) >= lines, timeout=240)
    return proc


@ray_only
@pytest.mark.ray
def test_ctrl_c_then_resume(cluster: str, ray_input: Path, reference: dict[str, Any], tiny_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    args = _annotate_args(ray_input, out, tiny_registry, "--ray", cluster, "--ray-partition-size", "4")
    proc = _start_and_wait(args, out, 20)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert "Traceback" not in err.decode()
    partial = out.read_bytes()
    assert partial.endswith(b"\n") and reference["out"].startswith(partial) and partial.count(b"\n") < N
    assert orjson.loads(Path(str(out) + ".meta.json").read_bytes())["status"] == "interrupted"
    p = cdr(*args, "--resume", timeout=300)
    assert p.returncode == 0, p.stderr
    _same_as_local(out, reference, resumed=True)


@ray_only
@pytest.mark.ray
def test_driver_sigkill_then_resume(cluster: str, ray_input: Path, reference: dict[str, Any], tiny_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    args = _annotate_args(ray_input, out, tiny_registry, "--ray", cluster, "--ray-partition-size", "4")
    parts = Path(str(out) + ".parts")
    proc = _start_and_wait(args, out, 30)
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    partial = out.read_bytes()
    assert reference["out"].startswith(partial[: partial.rfind(b"\n") + 1])
    assert partial.count(b"\n") < N, "the run finished before it was killed"
    assert parts.is_dir()
    p = cdr(*args, "--resume", timeout=300)
    assert p.returncode == 0, p.stderr
    assert_clean_stderr(p.stderr)
    info = _same_as_local(out, reference, resumed=True)
    run = info["this_run"]
    total = -(-(N + len(BAD)) // 4)
    assert run["partitions"] == total
    # only unfinished partitions are scored again: not those already merged into
    # the output, nor those whose part file was written before the kill
    assert run["scored"] <= total - 30 // 4


@ray_only
@pytest.mark.ray
def test_ray_finishes_a_local_run(cluster: str, ray_input: Path, reference: dict[str, Any], tiny_registry: Path, tmp_path: Path) -> None:
    """A local run's partial output, resumed on Ray (and the numerics guard agrees: same settings)."""
    out = tmp_path / "out.jsonl"
    p = cdr(*_annotate_args(ray_input, out, tiny_registry, "--limit", "50"))
    assert p.returncode == 0, p.stderr
    p = cdr(*_annotate_args(ray_input, out, tiny_registry, "--resume", "--ray", cluster), timeout=300)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == reference["out"]
    meta = orjson.loads(Path(str(out) + ".meta.json").read_bytes())
    assert meta["counts"]["already_done"] == 50 and meta["counts"]["written_this_run"] == N - 50


@ray_only
@pytest.mark.ray
def test_each_node_pulls_the_models(
    cluster: str, node_homes: list[Path], wheels: Path, tiny_registry: Path, ray_input: Path, tmp_path: Path
) -> None:
    """A registry model missing on a node is pulled (and sha256-checked) by that node into its own cache."""
    import hashlib

    from cdr_local.models import load_registry

    tiny = load_registry(tiny_registry).model("tiny-bos")
    assert tiny.source.path.exists()  # type: ignore[union-attr]
    sha = hashlib.sha256(tiny.source.path.read_bytes()).hexdigest()  # type: ignore[union-attr]
    reg = tmp_path / "models.toml"
    reg.write_text(tiny_registry.read_text() + PULLED_SPEC.format(sha=sha))
    for h in node_homes:
        assert not list(h.glob("models/pulled-*.gguf"))
    env_pip = {"CDR_PIP_ARGS": f"--no-index --find-links {shlex.quote(str(wheels))}"}
    ref = tmp_path / "local.jsonl"
    p = _cdr_env(env_pip, *_annotate_args(ray_input, ref, reg, "--pair", "pulled", "--limit", "20"))
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out.jsonl"
    p = _cdr_env(env_pip, *_annotate_args(ray_input, out, reg, "--pair", "pulled", "--limit", "20", "--ray", cluster, "--ray-partition-size", "5"))
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == ref.read_bytes()
    # the actors pulled into their own node's cache (not the driver's); the run may end
    # before the second actor has finished loading, so at least one node has it
    pulled = [g for h in node_homes for g in h.glob("models/pulled-*.gguf")]
    assert 1 <= len(pulled) <= 2
    assert all(hashlib.sha256(g.read_bytes()).hexdigest() == sha for g in pulled)
    meta = orjson.loads(Path(str(out) + ".meta.json").read_bytes())
    assert meta["models"]["strong"]["sha256"] == sha and meta["models"]["strong"]["source"].startswith("pypi:")


def _cdr_env(extra: dict[str, str], *args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CDR, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**_env(), **extra}, stdin=subprocess.DEVNULL)


@ray_only
@pytest.mark.ray
def test_ray_pairs_equals_local(cluster: str, tiny_registry: Path, tmp_path: Path) -> None:
    """``cdr pairs`` through --ray: scored on the fly and embedded on the actors, same rows and rejects."""
    r = random.Random(5)
    inp = tmp_path / "n.jsonl"
    rows = [{"id": f"n{i}", "prompt": " ".join(r.choice(WORDS) for _ in range(12)),
             "responses": [" ".join(r.choice(WORDS) for _ in range(r.randint(5, 30))) for _ in range(3)]} for i in range(30)]
    rows[7]["responses"] = ["same", "same", "same"]  # all rewards tie: skipped, with the reason
    inp.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in rows))
    outs = {}
    for name, extra in (("local", []), ("ray", ["--ray", cluster, "--ray-partition-size", "4"])):
        out = tmp_path / f"{name}.jsonl"
        p = cdr("pairs", inp, "-o", out, "--strategy", "real-hard", "--models", tiny_registry, "--threads", "1", "-q", *extra, timeout=300)
        assert p.returncode == 0, p.stderr
        outs[name] = (out.read_bytes(), (tmp_path / f"{name}.rejects.jsonl").read_bytes())
    assert outs["ray"] == outs["local"]
    assert len(jsonl(outs["ray"][0])) == 29 and b'"line":8' in outs["ray"][1]


@ray_only
@pytest.mark.ray
def test_limit_on_ray_equals_limit_locally(cluster: str, tiny_registry: Path, tmp_path: Path) -> None:
    """One driver semantics for --limit: N records written (task rejects do not count
    toward it), the rejects before the N-th record recorded and none after it, then
    --resume finishes the same file.  Local and --ray runs agree byte for byte."""
    r = random.Random(11)
    rows: list[bytes] = []
    for i in range(40):
        resp = [" ".join(r.choice(WORDS) for _ in range(r.randint(4, 12))) for _ in range(3)]
        if i in (1, 2, 3, 9, 14, 30):
            resp = ["same", "same", "same"]  # all rewards tie: a task reject, not a written record
        rows.append(orjson.dumps({"id": f"n{i}", "prompt": " ".join(r.choice(WORDS) for _ in range(8)), "responses": resp}))
    rows.insert(5, b'{"id": "broken", ')  # a parse reject
    rows.insert(8, orjson.dumps({"id": "n4", "prompt": "again", "responses": ["a b", "c d"]}))  # a duplicate id
    rows.insert(33, b'{"id": "late-bad", ')  # after the limit: recorded only by the resumed run
    inp = tmp_path / "n.jsonl"
    inp.write_bytes(b"".join(x + b"\n" for x in rows))
    got = {}
    for name, extra in (("local", []), ("ray", ["--ray", cluster, "--ray-partition-size", "3"])):
        out = tmp_path / f"{name}.jsonl"
        base = ["pairs", inp, "-o", out, "--models", tiny_registry, "--threads", "1", "-q"]
        p = cdr(*base, "--limit", "12", *extra, timeout=300)
        assert p.returncode == 0, p.stderr
        first = (out.read_bytes(), (tmp_path / f"{name}.rejects.jsonl").read_bytes())
        p = cdr(*base, "--resume", *extra, timeout=300)
        assert p.returncode == 0, p.stderr
        got[name] = (first, (out.read_bytes(), (tmp_path / f"{name}.rejects.jsonl").read_bytes()))
    assert got["ray"] == got["local"]
    (out1, rej1), (out2, rej2) = got["local"]
    assert len(jsonl(out1)) == 12 and len(jsonl(out2)) == 40 - 6
    lines = [x["line"] for x in jsonl(rej1)]
    assert 6 in lines and any("duplicate id" in x["reason"] for x in jsonl(rej1))  # broken JSON, repeated n4
    assert 34 not in lines and 34 in [x["line"] for x in jsonl(rej2)]  # the late bad line
    assert rej1.count(b"all rewards tie") == 5 and rej2.count(b"all rewards tie") == 6


def test_ray_address_is_optional() -> None:
    from cdr_local.cli import _bare_ray

    assert _bare_ray(["annotate", "in", "--ray", "-o", "out"]) == ["annotate", "in", "--ray=", "-o", "out"]
    assert _bare_ray(["annotate", "in", "-o", "out", "--ray"]) == ["annotate", "in", "-o", "out", "--ray="]
    assert _bare_ray(["annotate", "in", "--ray", "h:6379"]) == ["annotate", "in", "--ray", "h:6379"]
    p = cdr("annotate", "--help")
    assert "--ray" in p.stdout and "[ADDRESS]" in p.stdout and "--ray-partition-size" in p.stdout


@ray_only
@pytest.mark.ray
def test_ray_eval_sample_keeps_the_local_order(cluster: str, tiny_registry: Path, tmp_path: Path) -> None:
    """A --per-section sample is scored in its interleaved order; --ray merges in that order too."""
    inp = tmp_path / "sections.jsonl"
    rows = [{"prompt": f"{sec} question {i}", "chosen": "yes " * (i + 1), "rejected": "no", "section": sec}
            for sec in ("Chat", "Safety", "Reasoning") for i in range(5)]
    inp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    base = ("eval", inp, "--models", tiny_registry, "--threads", "1", "-q", "--bootstrap", "20", "--per-section", "3")
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert cdr(*base, "-o", local, timeout=300).returncode == 0
    p = cdr(*base, "-o", remote, "--ray", cluster, "--ray-partition-size", "2", timeout=300)
    assert p.returncode == 0, p.stderr
    assert remote.read_bytes() == local.read_bytes()
    assert [orjson.loads(x)["section"] for x in local.read_bytes().splitlines()][:3] == ["Chat", "Safety", "Reasoning"]
