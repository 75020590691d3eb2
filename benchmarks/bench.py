"""Scoring throughput of cdr-local, measured side by side with its ceiling and the alternatives.

One run, same records, same token ids, same threads; the contenders are
interleaved (round-robin over ``--repeats``) so that a busy machine slows them
all alike, and each is reported by its best repeat.  Prints tables of tokens/s
and ratios, and writes everything to ``--json``.

Contenders, for each workload (a single model, and the pair):

* ``cdr``       -- ``AnnotateTask.process`` on each record: chat templates,
                   tokenization, decode, log-softmax, reward -- everything.
* ``ceiling``   -- bare ``llama_decode`` replaying exactly the batches and KV-cache
                   edits the engine made (recorded with ``LlamaModel.trace``), logits
                   requested at the same rows but never read.  cdr/ceiling is the
                   cost of everything we add.
* ``prefill``   -- the same batches with one logit row per decode: what the
                   output head costs.
* ``naive``     -- ``Llama(logits_all=True).create_completion(echo=True, logprobs=1,
                   max_tokens=1)`` per (prompt, response), on the first ``--naive-records``.
* ``hf``        -- Hugging Face transformers + torch, loading the same GGUF
                   (``gguf_file=``) in float32, one forward per (prompt, response),
                   log_softmax + gather (only with ``--hf``; needs torch, transformers;
                   on ``--hf-device``, CPU by default).

``--n-gpu-layers N`` offloads layers to the GPU for every llama.cpp contender
(needs a CUDA build of llama-cpp-python); pair it with ``--hf-device cuda``.

tok/s counts the same work for every contender: per side and record, the
prompt tokens once plus every response's tokens (end-of-turn included).

``--scaling`` adds: N responses per prompt with and without prompt sharing;
sequences per llama_decode; prompt/response length.  ``--logsoftmax`` times
the log-softmax alone, one thread against the engine's pool.  ``--memory`` runs
``cdr annotate`` on generated short records with a tiny model and reports peak
RSS at each size.

    python benchmarks/bench.py --hf --scaling --json bench.json
    python benchmarks/bench.py --workloads none --memory --json bench-memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdr_local.annotate import AnnotateTask  # noqa: E402
from cdr_local.engine import EngineSettings, ScoreRequest  # noqa: E402
from cdr_local.engine import llama as E  # noqa: E402
from cdr_local.models import load_registry, resolve  # noqa: E402
from cdr_local.pair import LoadedPair  # noqa: E402
from cdr_local.records import Record, parse_line  # noqa: E402
from cdr_local.reward import ResponseScore  # noqa: E402
from cdr_local.scoring import ChatSide  # noqa: E402


# --------------------------------------------------------------------------- data
@dataclass
class SideWork:
    """One side's requests for the workload, as the engine saw them."""

    name: str
    path: Path
    requests: list[ScoreRequest] = field(default_factory=list)
    trace: list[tuple[Any, ...]] = field(default_factory=list)
    sums: list[float] = field(default_factory=list)  # per response, from cdr

    @property
    def tokens(self) -> int:
        return sum(r.context_len + sum(len(c) for c in r.continuations) for r in self.requests)


def load_records(path: Path, n: int) -> list[Record]:
    out: list[Record] = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            item = parse_line(line, i)
            if isinstance(item, Record):
                out.append(item)
            if len(out) >= n:
                break
    return out


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import llama_cpp

    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "numpy": np.__version__,
        "llama_system_info": E.system_info(),
    }
    try:
        import torch
        import transformers

        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------ contenders
def run_cdr(task: AnnotateTask, records: list[Record]) -> float:
    t = time.perf_counter()
    for r in records:
        task.process(r)
    return time.perf_counter() - t


def record_work(pair: LoadedPair, task: AnnotateTask, records: list[Record], sides: list[str]) -> list[SideWork]:
    """Score once with tracing on: the requests, the llama.cpp calls, the sums."""
    works = []
    for role in sides:
        m = pair.sides[role].model
        works.append(SideWork(name=f"{role}:{m.name}", path=m.path))
    # capture the requests the engine receives
    for role, w in zip(sides, works, strict=True):
        m = pair.sides[role].model
        m.trace = w.trace
        orig = m.loglikelihood

        def spy(reqs: list[ScoreRequest], _orig: Any = orig, _w: SideWork = w) -> list[list[np.ndarray]]:
            _w.requests.extend(reqs)
            res = _orig(reqs)
            _w.sums.extend(float(x.sum()) for rr in res for x in rr)
            return res

        m.loglikelihood = spy  # type: ignore[method-assign]
    try:
        for r in records:
            task.process(r)
    finally:
        for role in sides:
            m = pair.sides[role].model
            m.trace = None
            del m.loglikelihood  # back to the class method
    return works


def replay(model: E.LlamaModel, trace: list[tuple[Any, ...]], prefill_only: bool) -> float:
    """Bare llama.cpp calls: the recorded decodes (logits requested, never read) and KV edits."""
    ll, ctx, mem, batch = model._ll, model._ctx, model._mem, model._batch
    ll.llama_memory_seq_rm(mem, -1, 0, -1)
    t = time.perf_counter()
    for op in trace:
        if op[0] == "decode":
            _, tok, pos, seq, want = op
            n = len(tok)
            model._b_token[:n] = tok
            model._b_pos[:n] = pos
            if prefill_only:
                model._b_logits[:n] = 0
                model._b_logits[n - 1] = 1
            else:
                model._b_logits[:n] = want
            for i in range(n):
                model._b_seq[i][0] = seq[i]
            batch.n_tokens = n
            if ll.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed in replay")
        elif op[0] == "rm":
            ll.llama_memory_seq_rm(mem, op[1], op[2], -1)
        else:
            ll.llama_memory_seq_cp(mem, op[1], op[2], 0, op[3])
    dt = time.perf_counter() - t
    ll.llama_memory_seq_rm(mem, -1, 0, -1)
    return dt


def run_naive(path: Path, reqs: list[ScoreRequest], threads: int, n_ctx: int, n_gpu_layers: int = 0) -> tuple[float, list[float]]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, n_gpu_layers=n_gpu_layers, verbose=False)
    sums = []
    t = time.perf_counter()
    for r in reqs:
        ctx = [t_ for seg in r.context for t_ in seg]
        for c in r.continuations:
            # echo needs a text prompt: the same tokens as text (specials included)
            text = llm.detokenize(ctx + list(c), special=True).decode("utf-8", "replace")
            out = llm.create_completion(prompt=text, echo=True, logprobs=1, max_tokens=1, temperature=0.0)
            lps = out["choices"][0]["logprobs"]["token_logprobs"]  # type: ignore[index]
            sums.append(float(sum(x for x in lps[len(ctx) : len(ctx) + len(c)] if x is not None)))
    dt = time.perf_counter() - t
    del llm
    gc.collect()
    return dt, sums


class HF:
    def __init__(self, path: Path, threads: int, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
        self.model.to(device)
        self.model.eval()

    def run(self, reqs: list[ScoreRequest]) -> tuple[float, list[float]]:
        torch = self.torch
        sums = []
        t = time.perf_counter()
        with torch.inference_mode():
            for r in reqs:
                ctx = [t_ for seg in r.context for t_ in seg]
                for c in r.continuations:
                    ids = torch.tensor([ctx + list(c)], device=self.device)
                    logits = self.model(ids).logits[0, len(ctx) - 1 : -1].float()
                    lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(list(c), device=self.device)[:, None])
                    sums.append(float(lp.sum()))  # float() waits for the GPU
        return time.perf_counter() - t, sums


# ------------------------------------------------------------ contenders in a child process
# The naive and hf contenders load other code (llama_cpp.Llama, torch): each runs in a
# child process of its own, so one that crashes (llama_cpp.Llama segfaults in the AMX
# kernels of a -march=native build; torch aborts beside a CUDA build of llama.cpp) or
# cannot run costs its row, not the benchmark.


def run_child(kind: str, path: Path, reqs: list[ScoreRequest], threads: int, n_ctx: int, n_gpu_layers: int = 0,
              device: str = "cpu", repeats: int = 1, python: str = sys.executable) -> dict[str, Any]:
    """``{"seconds": [...], "sums": [...], "memory_mib": M}`` from a child, or ``{"error": why}``."""
    payload = {"kind": kind, "path": str(path), "threads": threads, "n_ctx": n_ctx, "n_gpu_layers": n_gpu_layers,
               "device": device, "repeats": repeats,
               "requests": [[[list(seg) for seg in r.context], [list(c) for c in r.continuations]] for r in reqs]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(payload, f)
        name = f.name
    try:
        p = subprocess.run([python, __file__, "--child", name], capture_output=True, text=True)
    finally:
        os.unlink(name)
    if p.returncode != 0:
        why = f"signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
        last = (p.stderr.strip().splitlines() or [""])[-1][:200]
        return {"error": f"{kind} failed ({why}){': ' + last if last else ''}"}
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def child_main(path: str) -> None:
    """The child's side of :func:`run_child`: run one contender, print one JSON line."""
    with open(path) as f:
        job = json.load(f)
    reqs = [ScoreRequest(context=tuple(tuple(s) for s in c), continuations=tuple(tuple(x) for x in k)) for c, k in job["requests"]]
    rss0 = current_rss_mib()
    seconds, sums = [], []
    if job["kind"] == "naive":
        for _ in range(job["repeats"]):
            dt, sums = run_naive(Path(job["path"]), reqs, job["threads"], job["n_ctx"], job["n_gpu_layers"])
            seconds.append(dt)
    else:
        hf = HF(Path(job["path"]), job["threads"], job["device"])
        hf.run(reqs[:1])  # warm up (and allocate)
        for _ in range(job["repeats"]):
            dt, sums = hf.run(reqs)
            seconds.append(dt)
    print(json.dumps({"seconds": seconds, "sums": sums, "memory_mib": current_rss_mib() - rss0}))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident memory now (VmRSS): loaded weights count once they are touched."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------- workloads
def bench_workload(label: str, args: argparse.Namespace, pair_name: str | None, sides: list[str], out: dict[str, Any]) -> None:
    reg = load_registry(args.models)
    settings = EngineSettings(n_ctx=args.n_ctx, n_batch=args.n_batch, n_ubatch=args.n_batch, n_threads=args.threads,
                              n_gpu_layers=args.n_gpu_layers)
    records = load_records(Path(args.records), args.n_records)
    gc.collect()
    rss0 = current_rss_mib()
    pair = LoadedPair(reg, pair_name, settings, pull=True, say=lambda m: None)
    if sides == ["strong"]:  # single-model workload: the strong model, no system prompt
        pair.sides["strong"] = ChatSide(pair.strong.model, system=None, fallback_template=pair.model_specs["strong"].chat_template)
        pair.score = lambda msgs, resps: [  # type: ignore[method-assign]
            _single(s) for s in pair.strong.score(msgs, resps)
        ]
    task = AnnotateTask(pair)
    works = record_work(pair, task, records, sides)
    mem = {"cdr": current_rss_mib() - rss0}  # after a full pass: weights paged in, buffers allocated
    tokens = sum(w.tokens for w in works)
    # bare contexts on the same weights; one untimed replay each warms them up
    bare = {w.name: pair.sides[role].model.sibling() for role, w in zip(sides, works, strict=True)}
    for w in works:
        replay(bare[w.name], w.trace, False)
    times: dict[str, list[float]] = {k: [] for k in ("cdr", "ceiling", "prefill")}
    for _rep in range(args.repeats):
        times["cdr"].append(run_cdr(task, records))
        times["ceiling"].append(sum(replay(bare[w.name], w.trace, False) for w in works))
        times["prefill"].append(sum(replay(bare[w.name], w.trace, True) for w in works))
    errors: dict[str, str] = {}
    hf_sums: list[float] = []
    if args.hf:  # in a child per side, after the in-process contenders (torch may not live beside llama.cpp)
        dts: list[float] = [0.0] * args.repeats
        mem["hf"] = 0.0
        for w in works:
            r = run_child("hf", w.path, w.requests, settings.threads(), args.n_ctx, device=args.hf_device, repeats=args.repeats)
            if "error" in r:
                errors["hf"] = r["error"]
                break
            dts = [a + b for a, b in zip(dts, r["seconds"], strict=True)]
            hf_sums += r["sums"]
            mem["hf"] += r["memory_mib"]
        if "hf" not in errors:
            times["hf"] = dts
        else:
            mem.pop("hf", None)
    # naive on a subset (it is slow): compare per-token rates on that subset
    sub = max(0, args.naive_records)
    naive_tok = sum(r.context_len + sum(len(c) for c in r.continuations) for w in works for r in w.requests[:sub])
    naive_dt, naive_sums = 0.0, []
    for w in works if sub > 0 else []:
        r = run_child("naive", w.path, w.requests[:sub], settings.threads(), args.n_ctx, args.n_gpu_layers)
        if "error" in r:
            errors["naive"] = r["error"]
            break
        naive_dt += r["seconds"][0]
        naive_sums += r["sums"]
    cdr_sums = [x for w in works for x in w.sums]
    n_sub = sum(len(r.continuations) for w in works for r in w.requests[:sub])
    cdr_sub = [x for w in works for x in w.sums[: sum(len(r.continuations) for r in w.requests[:sub])]]
    rates = {k: tokens / min(v) for k, v in times.items()}
    if naive_dt > 0 and "naive" not in errors:  # --naive-records 0, or a crash: no row
        rates["naive"] = naive_tok / naive_dt
    res: dict[str, Any] = {
        "records": len(records),
        "tokens": tokens,
        "sides": [w.name for w in works],
        "tok_per_s": rates,
        "seconds_best": {k: min(v) for k, v in times.items()} | ({"naive": naive_dt} if "naive" in rates else {}),
        "naive_records": sub,
        "memory_mib": mem,
        "ratios": {f"cdr/{k}": rates["cdr"] / v for k, v in rates.items() if k != "cdr"},
        "agreement_max_abs_nats_per_response": {
            "naive": float(np.max(np.abs(np.array(naive_sums) - np.array(cdr_sub)))) if n_sub and "naive" in rates else None,
            **({"hf": float(np.max(np.abs(np.array(hf_sums) - np.array(cdr_sums))))} if "hf" in rates else {}),
        },
        "contender_errors": errors,
    }
    out[label] = res
    for m in bare.values():
        m.close()
    pair.close()
    gc.collect()


def _single(s: Any) -> ResponseScore:
    return ResponseScore(strong=s, weak=s)


def bench_scaling(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Synthetic token ids on the single model: how cost grows."""
    reg = load_registry(args.models)
    pair = LoadedPair(reg, None, EngineSettings(n_ctx=8192, n_batch=args.n_batch, n_ubatch=args.n_batch, n_threads=args.threads), pull=True)
    m = pair.strong.model
    rng = np.random.default_rng(0)
    V = min(m.n_vocab, 32000)

    def toks(n: int) -> tuple[int, ...]:
        return tuple(int(x) for x in rng.integers(100, V, n))

    def timed(reqs: list[ScoreRequest]) -> float:
        best = 1e9
        for _ in range(args.repeats):
            m.loglikelihood([ScoreRequest((toks(3),), ((1, 2),))])  # evict the cached prefix
            t = time.perf_counter()
            m.loglikelihood(reqs)
            best = min(best, time.perf_counter() - t)
        return best

    share = []
    for n in (1, 2, 4, 8):
        prompt = toks(400)
        resp = [toks(128) for _ in range(n)]
        on = timed([ScoreRequest((prompt,), tuple(resp))])
        off = timed([ScoreRequest((toks(400),), (r,)) for r in resp])  # a fresh prompt decode per response
        work = 400 + 128 * n
        share.append({"n": n, "tok_per_s_shared": work / on, "tok_per_s_unshared": work / off, "speedup": off / on})
    out["prompt_sharing"] = share

    lengths = []
    for L in (128, 256, 512, 1024, 2048):
        dt = timed([ScoreRequest((toks(L),), (toks(L),))])
        lengths.append({"prompt": L, "response": L, "tok_per_s": 2 * L / dt})
    out["lengths"] = lengths

    bench_multiseq(args, out, m.path, toks)
    pair.close()


def bench_multiseq(args: argparse.Namespace, out: dict[str, Any], path: Path,
                   toks: Callable[[int], tuple[int, ...]] | None = None) -> None:
    """The multi-sequence ceiling: bare llama_decode of 16 sequences of 64 tokens, 1, 4
    or 16 sequences per decode (what packing several records into one decode would give)."""
    multi = E.LlamaModel(path, EngineSettings(n_ctx=2048, n_batch=1024, n_ubatch=1024, n_threads=args.threads,
                                              n_gpu_layers=args.n_gpu_layers, n_seq_max=16, parallel_responses=True))
    if toks is None:
        rng = np.random.default_rng(0)
        vocab = min(multi.n_vocab, 32000)

        def toks(n: int) -> tuple[int, ...]:
            return tuple(int(x) for x in rng.integers(min(100, vocab - 1), vocab, n))

    seqs = [toks(64) for _ in range(16)]
    per = []
    for k in (1, 4, 16):
        best = 1e9
        for _ in range(args.repeats):
            multi._ll.llama_memory_seq_rm(multi._mem, -1, 0, -1)
            t = time.perf_counter()
            for g in range(0, 16, k):
                group = seqs[g : g + k]
                T = np.concatenate([np.array(s, dtype=np.int32) for s in group])
                P = np.concatenate([np.arange(64, dtype=np.int32) for _ in group])
                S = np.concatenate([np.full(64, j, dtype=np.int32) for j in range(len(group))])
                multi._decode(T, P, S, np.ones(len(T), dtype=np.int8))
                multi._ll.llama_memory_seq_rm(multi._mem, -1, 0, -1)
            best = min(best, time.perf_counter() - t)
        per.append({"sequences_per_decode": k, "tok_per_s": 16 * 64 / best})
    out["sequences_per_decode"] = per
    multi.close()


def bench_logsoftmax(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """The engine's log-sum-exp over logits rows: one thread vs its pool of --threads.

    On a GPU this, not the model, bounded throughput; real vocabulary sizes
    (SmolLM2, Qwen2.5, Gemma-3), 128 rows of random logits, best of --repeats.
    """
    threads = EngineSettings(n_threads=args.threads).threads()
    pool = E._RowPool(threads) if threads > 1 else None
    rng = np.random.default_rng(0)
    res = []
    for V in (49152, 151936, 262144):
        rows = (rng.standard_normal((128, V)) * 4).astype(np.float32)
        t = {}
        for name, p in (("one thread", None), (f"{threads} threads", pool)):
            best = 1e9
            for _ in range(max(args.repeats, 3)):
                t0 = time.perf_counter()
                E._lse_rows(rows, p)
                best = min(best, time.perf_counter() - t0)
            t[name] = best / len(rows) * 1e3
        one, many = t.values()
        res.append({"n_vocab": V, "ms_per_row_one_thread": one, "ms_per_row_pool": many, "threads": threads, "speedup": one / many})
    if pool is not None:
        pool.shutdown()
    out["logsoftmax"] = res


def bench_memory(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Peak RSS of `cdr annotate` on N short records with a tiny model (must be flat in N)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tinygguf import build_tiny_llama

    tmp = Path(tempfile.mkdtemp(prefix="cdr-bench-"))
    model = build_tiny_llama(tmp / "tiny.gguf", seed=0, add_bos=True)
    reg = tmp / "models.toml"
    reg.write_text(
        f'default_pair = "t"\n[engine]\nn_ctx = 256\nn_batch = 64\nn_ubatch = 64\nn_threads = 1\n'
        f'[models.tiny]\npath = "{model}"\n[pairs.t]\nstrong = {{ model = "tiny", system = "Be good." }}\nweak = "tiny"\n'
    )
    res = []
    for n in args.memory_records:
        inp = tmp / f"in-{n}.jsonl"
        with open(inp, "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"r{i}", "prompt": f"question {i}?", "chosen": "yes it is", "rejected": "no"}) + "\n")
        outp = tmp / f"out-{n}.jsonl"
        env = dict(os.environ, CDR_HOME=str(tmp / "home"))
        t = time.perf_counter()
        # VmHWM of the cdr process itself, read as it exits (getrusage's maxrss
        # would include the pages this big benchmark process shares at fork)
        code = (
            "import sys, runpy\n"
            f"sys.argv = ['cdr', 'annotate', {str(inp)!r}, '-o', {str(outp)!r}, '--models', {str(reg)!r}, '-q']\n"
            "try:\n    runpy.run_module('cdr_local', run_name='__main__')\n"
            "finally:\n"
            "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
            "    print('VmHWM', hwm, file=sys.stderr)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t
        hwm = [ln for ln in proc.stderr.splitlines() if ln.startswith("VmHWM")]
        if proc.returncode != 0 or not hwm:
            raise RuntimeError(f"cdr annotate failed on {n} records: {proc.stderr[-500:]}")
        peak = int(hwm[-1].split()[1]) / 1024
        lines = sum(1 for _ in open(outp, "rb"))
        res.append({"records": n, "written": lines, "peak_rss_mib": peak, "seconds": dt})
        inp.unlink()
        outp.unlink()
    out["memory"] = res
    shutil.rmtree(tmp, ignore_errors=True)
    if len(res) > 1:
        out["memory_ratio_last_first"] = res[-1]["peak_rss_mib"] / res[0]["peak_rss_mib"]


# ------------------------------------------------------------------------- output
def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Any:
    """A right-aligned rich table."""
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*r)
    return t


def show(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    mi = out["machine"]
    con.print(f"[bold]machine[/]: {mi['cpu']}, {mi['cores']} cores, threads={out['threads']}; "
              f"llama-cpp-python {mi['llama_cpp_python']}" + (f", torch {mi['torch']}, transformers {mi['transformers']}" if "torch" in mi else "")
              + (f"; GPU {mi['gpu']}, n_gpu_layers={out['args']['n_gpu_layers']}, hf on {out['args']['hf_device']}" if "gpu" in mi else ""))
    for label in ("single", "pair"):
        if label not in out:
            continue
        w = out[label]
        t = Table(title=f"{label}: {', '.join(w['sides'])} -- {w['records']} records, {w['tokens']} tokens")
        for c in ("contender", "tok/s", "cdr ÷ it"):
            t.add_column(c, justify="right" if c != "contender" else "left")
        for k, v in w["tok_per_s"].items():
            ratio = "" if k == "cdr" else f"{w['tok_per_s']['cdr'] / v:.2f}x"
            name = k + (f" ({w['naive_records']} records)" if k == "naive" else "")
            t.add_row(name, f"{v:,.0f}", ratio)
        con.print(t)
        con.print(f"  agreement with cdr (max |Δ| nats per response): {w['agreement_max_abs_nats_per_response']}")
        for k, why in w.get("contender_errors", {}).items():
            con.print(f"  [yellow]{k}: no row[/]: {why}")
        con.print(f"  resident memory added by the models (MiB): {', '.join(f'{k} {v:,.0f}' for k, v in w['memory_mib'].items())}")
    if "prompt_sharing" in out:
        con.print(_table("prompt sharing: 400-token prompt, N responses of 128 tokens", ("N", "shared tok/s", "unshared tok/s", "speed-up"),
                         [(str(r["n"]), f"{r['tok_per_s_shared']:,.0f}", f"{r['tok_per_s_unshared']:,.0f}", f"{r['speedup']:.2f}x")
                          for r in out["prompt_sharing"]]))
        con.print(_table("length: prompt = response = L tokens", ("L", "tok/s"),
                         [(str(r["prompt"]), f"{r['tok_per_s']:,.0f}") for r in out["lengths"]]))
    if "sequences_per_decode" in out:  # --scaling, or --multiseq alone
        con.print(_table("sequences per llama_decode (bare decode, 16 sequences of 64 tokens)", ("per decode", "tok/s"),
                         [(str(r["sequences_per_decode"]), f"{r['tok_per_s']:,.1f}") for r in out["sequences_per_decode"]]))
    if "logsoftmax" in out:
        con.print(_table("log-softmax (log-sum-exp) per logits row", ("vocabulary", "1 thread ms/row", "pool ms/row", "threads", "speed-up"),
                         [(f"{r['n_vocab']:,}", f"{r['ms_per_row_one_thread']:.3f}", f"{r['ms_per_row_pool']:.3f}", str(r["threads"]), f"{r['speedup']:.2f}x")
                          for r in out["logsoftmax"]]))
    if "memory" in out:
        con.print(_table("peak RSS of cdr annotate (tiny model)", ("records", "written", "peak RSS MiB", "seconds"),
                         [(f"{r['records']:,}", f"{r['written']:,}", f"{r['peak_rss_mib']:.1f}", f"{r['seconds']:.0f}") for r in out["memory"]]))
        if "memory_ratio_last_first" in out:
            con.print(f"  RSS ratio largest/smallest: {out['memory_ratio_last_first']:.3f}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":  # see run_child
        child_main(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="registry (default: the shipped models.toml)")
    ap.add_argument("--pair", default=None, help="pair for the pair workload (default: the default pair)")
    ap.add_argument("--records", default=str(ROOT / "examples" / "pairs.jsonl"))
    ap.add_argument("--n-records", type=int, default=16)
    ap.add_argument("--naive-records", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hf", action="store_true", help="also run transformers + torch")
    ap.add_argument("--hf-device", default="cpu", help="torch device for --hf (cpu, cuda)")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="offload to the GPU (-1: all; CUDA build)")
    ap.add_argument("--workloads", default="single,pair", help="comma list of single, pair (or none)")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--multiseq", action="store_true", help="only the multi-sequence ceiling (part of --scaling), on --pair's strong model")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--logsoftmax", action="store_true", help="time the log-softmax alone: one thread vs the pool")
    ap.add_argument("--memory-records", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 100000])
    ap.add_argument("--json", default="bench.json")
    args = ap.parse_args()
    E._llama()  # silence llama.cpp's log before anything loads
    threads = EngineSettings(n_threads=args.threads).threads()
    out: dict[str, Any] = {"machine": machine(), "threads": threads, "args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    workloads = [w for w in args.workloads.split(",") if w and w != "none"]
    if "single" in workloads:
        bench_workload("single", args, args.pair, ["strong"], out)
    if "pair" in workloads:
        bench_workload("pair", args, args.pair, ["strong", "weak"], out)
    if args.scaling:
        bench_scaling(args, out)
    elif args.multiseq:
        reg = load_registry(args.models)
        bench_multiseq(args, out, resolve(reg.model(reg.pair(args.pair).strong.model), pull=True))
    if args.logsoftmax:
        bench_logsoftmax(args, out)
    if args.memory:
        bench_memory(args, out)
    out["peak_rss_mib_this_process"] = rss_mib()
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    show(out)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
