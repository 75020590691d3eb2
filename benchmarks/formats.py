"""Weight formats of one model side by side: which runs fastest on this CPU.

Loads the same model in several GGUF formats (the registry's file, and copies
converted with llama.cpp's quantizer: F16, Q8_0, ...), scores the same records with
each through cdr's own scoring path (chat template, tokenizer, decode, log-softmax),
in interleaved rounds so that a busy machine slows them all alike, and prints tokens/s
(best and median round), the ratio to the first format, and how far each format's
log-probs are from the first's (the numerics a format change moves).

    python benchmarks/formats.py --model qwen2.5-coder-0.5b --formats source,f16,q8_0 --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdr_local.engine import EngineSettings  # noqa: E402
from cdr_local.engine import llama as E  # noqa: E402
from cdr_local.models import load_registry, model_cache_dir, source_path  # noqa: E402
from cdr_local.scoring import ChatSide  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import load_records  # noqa: E402  (one reader of bench records)


def variant(src: Path, name: str, fmt: str) -> Path:
    """``src`` itself for "source", else its conversion to ``fmt`` in the model cache (made once)."""
    if fmt == "source":
        return src
    dst = model_cache_dir() / f"{name}-bench.{fmt}.gguf"
    if not dst.exists():
        print(f"converting {src.name} to {fmt} ...", flush=True)
        E.convert_gguf(src, dst, fmt)
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="registry model")
    ap.add_argument("--models", default=None, help="registry file (default: the shipped one)")
    ap.add_argument("--formats", default="source,f16,q8_0", help="comma list: source (the pulled file), f16, q8_0, bf16, f32")
    ap.add_argument("--records", default=str(ROOT / "examples" / "pairs.jsonl"))
    ap.add_argument("--n-records", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    E._llama()
    reg = load_registry(args.models)
    spec = reg.model(args.model)
    src = source_path(spec)
    if not src.is_file():
        raise SystemExit(f"{src} is not pulled: cdr models pull {args.model}")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    records = load_records(Path(args.records), args.n_records)
    settings = EngineSettings(n_ctx=4096, n_threads=args.threads)
    sides = {}
    for fmt in formats:
        m = E.LlamaModel(variant(src, spec.name, fmt), settings, name=f"{spec.name}:{fmt}")
        sides[fmt] = ChatSide(m, system=None, fallback_template=spec.chat_template)
    times: dict[str, list[float]] = {f: [] for f in formats}
    logps: dict[str, list[np.ndarray]] = {}
    tokens = 0
    for r in range(args.rounds):
        for fmt in formats if r % 2 == 0 else formats[::-1]:  # alternate the order between rounds
            side = sides[fmt]
            t = time.perf_counter()
            out = []
            n = 0
            for rec in records:
                tok = side.tokenize(rec.messages, rec.responses)
                from cdr_local.engine import ScoreRequest

                res = side.model.loglikelihood([ScoreRequest(tok.segments or (tok.context,), tok.continuations)])[0]
                out.extend(res)
                n += len(tok.context) + sum(len(c) for c in tok.continuations)
            times[fmt].append(time.perf_counter() - t)
            logps[fmt] = out
            tokens = n
    ref = formats[0]
    print(f"{spec.name}: {len(records)} records, {tokens} tokens per round, {args.threads} thread(s), {args.rounds} rounds; {E.system_info()[:80]}")
    print(f"| format | file MiB | tok/s (best) | tok/s (median) | vs {ref} | max abs diff of token log-probs vs {ref} |")
    print("|---|---|---|---|---|---|")
    best0 = tokens / min(times[ref])
    for fmt in formats:
        best, med = tokens / min(times[fmt]), tokens / statistics.median(times[fmt])
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(logps[fmt], logps[ref], strict=True))
        size = sides[fmt].model.path.stat().st_size / 2**20
        print(f"| {fmt} | {size:,.0f} | {best:,.0f} | {med:,.0f} | {best / best0:.2f}x | {diff:.4f} |")
    for s in sides.values():
        s.model.close()


if __name__ == "__main__":
    main()
