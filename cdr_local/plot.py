"""``python -m cdr_local.plot REPORT.json OUT.png [MAIN] < margins.json``: the eval plot.

Run by ``cdr eval`` in a child process (see ``evaluate.plot``), so it imports
nothing of llama.cpp.  Three panels: length-balanced accuracy per section for
the density-ratio rules and the main baselines; accuracy against coverage
(the most confident share of the pairs, by each method's confidence); and
histograms of the main method's margins on right and wrong pairs.  The
margins (value(chosen) - value(rejected), one per pair) come as a JSON list
on stdin.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import orjson

from .evaluate import MAIN

#: methods drawn in the bar and curve panels (those in the report, in this order)
SHOWN = ("cdr-sum", "cdr-mean", "cdr-offset", "cdr-lc", "cdr-beta", "cdr-beta-mean", "strong-sum", "strong-mean", "longer")


def draw(rep: dict[str, Any], margins: np.ndarray, path: str, main: str = MAIN) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = rep["methods"]
    shown = [m for m in methods if m.split(":")[0] in SHOWN or m == main]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(18, 4.8))
    secs = list(rep["sections"])
    width = 0.8 / max(1, len(shown))
    for i, m in enumerate(shown):
        lb = methods[m].get("length", {}).get("sections", {})
        accs = [100 * (lb.get(s, {}).get("balanced", {}).get("acc") or np.nan) for s in secs]
        a1.bar(np.arange(len(secs)) + i * width, accs, width, label=m)
    a1.set_xticks(np.arange(len(secs)) + 0.4 - width / 2, secs)
    a1.axhline(50, color="grey", lw=0.8, ls="--")
    a1.set_ylabel("length-balanced accuracy (%)")
    a1.legend(fontsize=7, ncol=2)
    for m in shown:
        sel = methods[m].get("selective", [])
        if sel:
            a2.plot([100 * x["coverage"] for x in sel], [100 * x["acc"] for x in sel], marker="o",
                    lw=2.5 if m == main else 1.2, label=m)
    a2.axhline(50, color="grey", lw=0.8, ls="--")
    a2.set_xlabel("coverage: most confident share of pairs (%)")
    a2.set_ylabel("accuracy (%)")
    a2.invert_xaxis()
    a2.legend(fontsize=7)
    a3.hist(margins[margins > 0], bins=40, alpha=0.6, label="right (chosen > rejected)")
    a3.hist(margins[margins <= 0], bins=40, alpha=0.6, label="wrong")
    a3.set_xlabel("value(chosen) - value(rejected), " + main)
    a3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m cdr_local.plot REPORT.json OUT.png [MAIN] < margins.json", file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        rep = orjson.loads(f.read())
    margins = np.asarray(orjson.loads(sys.stdin.buffer.read()), dtype=np.float64)
    draw(rep, margins, argv[1], argv[2] if len(argv) == 3 else MAIN)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
