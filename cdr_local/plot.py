"""``python -m cdr_local.plot REPORT.json OUT.png < margins.json``: the eval plot.

Run by ``cdr eval`` in a child process (see ``evaluate.plot``), so it imports
nothing of llama.cpp: accuracy per section for every method, and histograms
of the main method's margins on right and wrong pairs.  The margins
(reward(chosen) - reward(rejected), one per pair) come as a JSON list on stdin.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import orjson

from .evaluate import MAIN, METHODS


def draw(rep: dict[str, Any], margins: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = rep["methods"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    secs = list(rep["sections"])
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        accs = [100 * methods[m]["sections"][s]["acc"] for s in secs]
        a1.bar(np.arange(len(secs)) + i * width, accs, width, label=m)
    a1.set_xticks(np.arange(len(secs)) + 0.4 - width / 2, secs)
    a1.axhline(50, color="grey", lw=0.8, ls="--")
    a1.set_ylabel("accuracy (%)")
    a1.legend(fontsize=7, ncol=2)
    a2.hist(margins[margins > 0], bins=40, alpha=0.6, label="right (chosen > rejected)")
    a2.hist(margins[margins <= 0], bins=40, alpha=0.6, label="wrong")
    a2.set_xlabel("reward(chosen) - reward(rejected), " + MAIN)
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m cdr_local.plot REPORT.json OUT.png < margins.json", file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        rep = orjson.loads(f.read())
    margins = np.asarray(orjson.loads(sys.stdin.buffer.read()), dtype=np.float64)
    draw(rep, margins, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
