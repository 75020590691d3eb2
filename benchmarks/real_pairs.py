"""REAL's comparison on a best-of-N sample: what each pair strategy selects.

REAL (arXiv 2409.17169) compares pairs chosen as the least similar (easy), the
most similar (hard) and at random.  This script builds a best-of-N input from
AlpacaEval's outputs (the same instruction answered by six models, with
published win rates that rank the models) and reports, per ``cdr pairs``
output: the number of pairs, the mean margin, the mean cosine similarity, the
mean length difference (characters, chosen minus rejected), how often the
chosen response is the longer one, and how often it comes from the model that
AlpacaEval ranks higher (a label-free check of the pair's direction), each
with a 95% bootstrap interval (seeded).

    python benchmarks/real_pairs.py build ../shared/data/alpacaeval --instructions 30 --seed 0 -o bon.jsonl
    cdr annotate bon.jsonl -o bon.scored.jsonl
    for s in random real-easy real-hard real-centroid best-random; do
        cdr pairs bon.scored.jsonl -o pairs-$s.jsonl --strategy $s
    done
    python benchmarks/real_pairs.py stats bon.jsonl random=pairs-random.jsonl easy=pairs-real-easy.jsonl ...
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

#: AlpacaEval 2.0 length-controlled win rates against gpt4_1106_preview (the
#: baseline, 50 by definition), from ../shared/data/alpacaeval/README.md.
PUBLISHED_LC = {"gpt4_1106_preview": 50.0, "Mixtral-8x7B-Instruct-v0.1": 23.69, "tulu-2-dpo-70b": 21.24,
                "zephyr-7b-beta": 13.20, "vicuna-7b": 6.28, "falcon-7b-instruct": 4.04}


def build(folder: Path, k: int, seed: int, out: Path) -> None:
    """One record per sampled instruction: its six outputs as ``responses``, and who wrote each."""
    outputs = {}
    for name in PUBLISHED_LC:
        rows = json.loads((folder / f"{name}.json").read_text())
        outputs[name] = rows
    n = len(outputs["gpt4_1106_preview"])
    picks = sorted(random.Random(seed).sample(range(n), k))
    with open(out, "w") as f:
        for i in picks:
            inst = outputs["gpt4_1106_preview"][i]["instruction"]
            assert all(outputs[m][i]["instruction"] == inst for m in PUBLISHED_LC)
            rec = {"id": f"alpacaeval-{i}", "prompt": inst, "responses": [outputs[m][i]["output"] for m in PUBLISHED_LC],
                   "generators": list(PUBLISHED_LC)}
            f.write(json.dumps(rec) + "\n")
    print(f"{out}: {k} instructions x {len(PUBLISHED_LC)} responses (seed {seed})")


def _boot(x: list[float], rng: np.random.Generator, b: int = 2000) -> tuple[float, float, float] | None:
    """Mean and 95% bootstrap interval (percentile) of ``x``."""
    if not x:
        return None
    a = np.asarray(x, dtype=np.float64)
    lo, hi = np.percentile(a[rng.integers(0, len(a), (b, len(a)))].mean(1), [2.5, 97.5])
    return float(a.mean()), float(lo), float(hi)


def mean_ci(x: list[float], rng: np.random.Generator) -> str:
    m = _boot(x, rng)
    return "-" if m is None else f"{m[0]:.3g} ({m[1]:.3g} to {m[2]:.3g})"


def share_ci(x: list[bool], rng: np.random.Generator) -> str:
    m = _boot([float(v) for v in x], rng)
    return "-" if m is None else f"{100 * m[0]:.0f}% ({100 * m[1]:.0f}-{100 * m[2]:.0f})"


def stats(bon: Path, outputs: list[tuple[str, Path]], seed: int) -> None:
    gens = {}
    for line in bon.read_text().splitlines():
        r = json.loads(line)
        gens[r["id"]] = (r["generators"], r["responses"])
    print(f"best-of-N sample: {bon} ({len(gens)} prompts); intervals: 95% bootstrap, seed {seed}\n")
    print("| strategy | pairs | margin | similarity | length diff (chars) | chosen longer | chosen from the higher-ranked model |")
    print("|---|---|---|---|---|---|---|")
    for label, path in outputs:
        rng = np.random.default_rng(seed)
        rows: list[dict[str, Any]] = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        margin, sim, dlen, longer, higher = [], [], [], [], []
        for r in rows:
            g, texts = gens[r["id"]]
            c, j = r["chosen_index"], r["rejected_index"]
            margin.append(float(r["margin_value"]))
            if r.get("similarity") is not None:
                sim.append(float(r["similarity"]))
            d = len(texts[c]) - len(texts[j])
            dlen.append(float(d))
            if d != 0:
                longer.append(d > 0)
            higher.append(PUBLISHED_LC[g[c]] > PUBLISHED_LC[g[j]])
        print(f"| {label} | {len(rows)} | {mean_ci(margin, rng)} | {mean_ci(sim, rng)} | {mean_ci(dlen, rng)} | "
              f"{share_ci(longer, rng)} | {share_ci(higher, rng)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="a best-of-N input from AlpacaEval outputs")
    b.add_argument("folder", type=Path)
    b.add_argument("--instructions", type=int, default=30)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("-o", "--output", type=Path, required=True)
    s = sub.add_parser("stats", help="per-strategy statistics of cdr pairs outputs")
    s.add_argument("bon", type=Path, help="the best-of-N input (build's output)")
    s.add_argument("outputs", nargs="+", help="LABEL=PAIRS.jsonl")
    s.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.folder, args.instructions, args.seed, args.output)
    else:
        stats(args.bon, [(o.split("=", 1)[0], Path(o.split("=", 1)[1])) for o in args.outputs], args.seed)


if __name__ == "__main__":
    main()
