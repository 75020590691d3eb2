"""Markdown table of several ``cdr eval`` reports side by side (for the README).

Each argument is ``LABEL=OUT.report.json``; the table shows, per configuration,
the number of pairs, overall accuracy of the density ratio (sum and mean) with its
95% bootstrap interval, the per-section accuracies, the best single-model
baseline, and the routed domains.  The numbers are copied from the reports,
nothing is recomputed, so the table is exactly what ``cdr eval`` printed.

The last column compares each configuration with the first one on the pairs both
scored (the common prefix of two runs on the same ``--per-section`` sample):
the difference of their overall accuracy (density ratio, sum) with a *paired*
bootstrap interval (``cdr_local.evaluate.paired_difference``), read from the
scored outputs next to the reports (``OUT.jsonl`` for ``OUT[.firstK].report.json``).

    python benchmarks/eval_table.py "smollm2-sys, none=.cache/evals/smollm2-sys-none-100.report.json" ...
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from cdr_local.evaluate import EvalPair, paired_difference, pairs_from_output

SECTIONS = ("Chat", "Chat-Hard", "Safety", "Reasoning")


def pct(x: dict[str, object]) -> str:
    acc = float(x["acc"])  # type: ignore[arg-type]
    lo, hi = x["ci"]  # type: ignore[misc]
    return f"{100 * acc:.1f} ({100 * lo:.0f}-{100 * hi:.0f})"


def scored_pairs(report_path: str, n_pairs: int) -> list[EvalPair]:
    """The labelled pairs a report was made from: its output's first ``n_pairs``."""
    out = re.sub(r"(\.first\d+)?\.report\.json$", ".jsonl", report_path)
    return list(pairs_from_output(out))[:n_pairs]


def main(argv: list[str]) -> None:
    head = ["configuration", "pairs", "cdr (sum)", "cdr (mean)", *[f"{s} (sum)" for s in SECTIONS],
            "strong (mean)", "longer wins", "domains", "vs row 1 (paired)"]
    ref: list[EvalPair] | None = None
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for arg in argv:
        label, _, path = arg.partition("=")
        rep = json.loads(Path(path).read_text())
        m = rep["methods"]
        pairs = scored_pairs(path, rep["n_pairs"])
        if ref is None:
            ref, vs = pairs, "-"
        else:
            n = min(len(ref), len(pairs))
            d = paired_difference(pairs[:n], ref[:n])
            vs = f"{100 * d['diff']:+.1f} ({100 * d['ci'][0]:+.0f} to {100 * d['ci'][1]:+.0f}), n={n}"
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
            vs,
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
