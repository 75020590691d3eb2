"""Give each labelled pair a ``domain`` from its ``section`` (an oracle router).

The CDR authors route with Llama-3.1-70B; a 135M strong model routes poorly
(it answered CHAT for every dev prompt tried), so the customization itself is
measured with the domain taken from the benchmark's section: Chat and
Chat-Hard -> CHAT, Safety -> SAFETY, Reasoning -> REASONING (``--lower`` for
the cdr / cdr-fewshot profiles' names).  Ids, order and every other field are
kept, so ``cdr eval --per-section N --seed S`` draws the same pairs as on the
original file.

    python benchmarks/section_domains.py ../shared/data/dev.jsonl -o dev-domains.jsonl
    cdr eval dev-domains.jsonl --per-section 150 --seed 0 --limit 200 --profile cdr-paper -o eval-paper.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DOMAINS = {"Chat": "CHAT", "Chat-Hard": "CHAT", "Safety": "SAFETY", "Reasoning": "REASONING"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--lower", action="store_true", help="lower-case domain names (cdr, cdr-fewshot)")
    args = ap.parse_args()
    with open(args.input) as f, open(args.output, "w") as out:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            d = DOMAINS[r["section"]]
            r["domain"] = d.lower() if args.lower else d
            out.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
