"""Re-verify a `cdr synth` output with other annotators: agreement per label and aspect.

`cdr synth --verify PAIR` reports how often PAIR agrees with the intended
labels. To ask the same of another pair without generating again, score the
kept pairs with `cdr eval` (a synth output has ``prompt, chosen, rejected``),
then give this script the synth output and one or more eval outputs:

    cdr eval synth.jsonl --pair qwen-over-gemma-base -o verify-default.jsonl
    python benchmarks/synth_agreement.py synth.jsonl verify-default.jsonl [more.jsonl ...]

A pair agrees when the annotator's reward for ``chosen`` (the response the
label says is better) is strictly higher, as in `cdr eval`.  "prefers
response 2" is the share of pairs where the annotator ranks the second,
label-conditioned response above the first, whatever the label: a verifier
that only liked second responses would agree with "better" and disagree with
"worse".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def agreement(synth: list[dict[str, Any]], scored: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """group -> (agree, n) over the pairs both files hold, matched by id."""
    by_id = {r["id"]: r for r in synth}
    out: dict[str, list[int]] = {}
    second = [0, 0]
    for r in scored:
        s = by_id.get(r["id"])
        if s is None:
            continue
        reward = {x["response"]: float(x["reward"]) for x in r["scores"]}
        ok = int(reward["chosen"] > reward["rejected"])
        for g in ("overall", f"label: {s['label']}", *(f"aspect: {a}" for a in s.get("aspects", []))):
            c = out.setdefault(g, [0, 0])
            c[0] += ok
            c[1] += 1
        # response 2 is `chosen` for label "better" and `rejected` for "worse"
        r2, r1 = ("chosen", "rejected") if s["label"] == "better" else ("rejected", "chosen")
        second[0] += int(reward[r2] > reward[r1])
        second[1] += 1
    res = {g: (c[0], c[1]) for g, c in out.items()}
    res["prefers response 2"] = (second[0], second[1])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("synth", type=Path, help="a cdr synth output (labels, aspects)")
    ap.add_argument("scored", type=Path, nargs="+", help="cdr eval outputs of it, one per annotator")
    args = ap.parse_args()
    synth = load(args.synth)
    cols = [(p.stem, agreement(synth, load(p))) for p in args.scored]
    groups = sorted({g for _, a in cols for g in a}, key=lambda g: (g != "overall", g.startswith("prefers"), g))
    print("| group | " + " | ".join(name for name, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for g in groups:
        cells = []
        for _, a in cols:
            k, n = a.get(g, (0, 0))
            cells.append(f"{k} / {n} ({100 * k / n:.1f}%)" if n else "-")
        print(f"| {g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
