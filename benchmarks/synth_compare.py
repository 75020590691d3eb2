"""Side by side: several ``cdr synth --verify`` runs (e.g. the rmboost and rewrite
templates on the same prompts): what was kept, why the rest was skipped, how
often the verifier agrees with the intended label (overall, per label, per
aspect), how often response 2 came out shorter than response 1 (per label: an
edit that is "worse" only by being shorter says little), and the retries used.

    cdr synth dev.jsonl --per-section 8 --seed 0 -o new.jsonl --model M --verify P
    cdr synth dev.jsonl --per-section 8 --seed 0 -o old.jsonl --model M --verify P --template rewrite
    python benchmarks/synth_compare.py rmboost=new.jsonl rewrite=old.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path
from typing import Any


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def summary(out: Path) -> dict[str, str]:
    rows = load(out)
    rej = load(out.with_name(out.name[: -len(".jsonl")] + ".rejects.jsonl"))
    cells: dict[str, str] = {"kept": str(len(rows))}
    reasons = collections.Counter(re.sub(r"\s*\(.*", "", r.get("reason", "")) for r in rej)
    for why, n in reasons.most_common():
        cells[f"skipped: {why.removeprefix('skipped: ')}"] = str(n)
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    shorter: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        ok = int(bool(r["verify"]["agree"]))
        for g in ("overall", f"label: {r['label']}", *(f"aspect: {a}" for a in r.get("aspects", []))):
            groups[g][0] += ok
            groups[g][1] += 1
        s = shorter[f"response 2 shorter, {r['label']}"]
        s[0] += int(len(r["response_2"]) < len(r["response_1"]))
        s[1] += 1
    for g, (k, n) in sorted(groups.items(), key=lambda x: (x[0] != "overall", x[0])):
        cells[f"agree, {g}"] = f"{k} / {n} ({100 * k / n:.0f}%)"
    for g, (k, n) in sorted(shorter.items()):
        cells[g] = f"{k} / {n} ({100 * k / n:.0f}%)"
    cells["records that needed a retry"] = str(sum(1 for r in rows if r.get("retries")))
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", help="LABEL=SYNTH.jsonl")
    args = ap.parse_args()
    cols = [(o.split("=", 1)[0], summary(Path(o.split("=", 1)[1]))) for o in args.outputs]
    keys: list[str] = []
    for _, c in cols:
        keys += [k for k in c if k not in keys]
    print("| | " + " | ".join(name for name, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for k in keys:
        print(f"| {k} | " + " | ".join(c.get(k, "-") for _, c in cols) + " |")


if __name__ == "__main__":
    main()
