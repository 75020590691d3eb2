"""Markdown table of several ``cdr eval`` reports side by side (for the README).

Each argument is ``LABEL=OUT.report.json``; the table shows, per configuration,
the number of pairs, overall accuracy of the density ratio (sum and mean) with its
95% bootstrap interval, the per-section accuracies, the best single-model
baseline, and the routed domains.  The numbers are copied from the reports,
nothing is recomputed, so the table is exactly what ``cdr eval`` printed.

    python benchmarks/eval_table.py "smollm2-sys, none=.cache/evals/smollm2-sys-none-100.report.json" ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SECTIONS = ("Chat", "Chat-Hard", "Safety", "Reasoning")


def pct(x: dict[str, object]) -> str:
    acc = float(x["acc"])  # type: ignore[arg-type]
    lo, hi = x["ci"]  # type: ignore[misc]
    return f"{100 * acc:.1f} ({100 * lo:.0f}-{100 * hi:.0f})"


def main(argv: list[str]) -> None:
    head = ["configuration", "pairs", "cdr (sum)", "cdr (mean)", *[f"{s} (sum)" for s in SECTIONS],
            "strong (mean)", "longer wins", "domains"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for arg in argv:
        label, _, path = arg.partition("=")
        rep = json.loads(Path(path).read_text())
        m = rep["methods"]
        secs = m["cdr (sum)"]["sections"]
        cells = [
            label,
            str(rep["n_pairs"]),
            "**" + pct(m["cdr (sum)"]["overall"]) + "**",
            pct(m["cdr (mean)"]["overall"]),
            *[f"{100 * secs[s]['acc']:.0f} (n={secs[s]['n']})" if s in secs else "-" for s in SECTIONS],
            pct(m["strong (mean)"]["overall"]),
            pct(m["longer wins"]["overall"]),
            ", ".join(f"{k} {v}" for k, v in sorted(rep.get("domains", {}).items())),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
