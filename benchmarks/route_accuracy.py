"""Routing accuracy of the model and keyword routers on labelled dev prompts.

Sections map to domains: Chat and Chat-Hard -> chat, Safety -> safety,
Reasoning -> reasoning.  Usage:

    python benchmarks/route_accuracy.py --pair smollm2-sys --per-section 15 [--calibrate]
"""

from __future__ import annotations

import argparse
import collections
import json
import random

from cdr_local.models import load_registry
from cdr_local.pair import LoadedPair, settings_from
from cdr_local.profiles import load_profile
from cdr_local.records import parse_object
from cdr_local.router import KeywordRouter, ModelRouter

WANT = {"Chat": "chat", "Chat-Hard": "chat", "Safety": "safety", "Reasoning": "reasoning"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/dev.jsonl")
    ap.add_argument("--pair", default=None)
    ap.add_argument("--profile", default="cdr")
    ap.add_argument("--per-section", type=int, default=15)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--calibrate", action="store_true")
    a = ap.parse_args()
    reg = load_registry()
    pair = LoadedPair(reg, a.pair, settings_from(reg))
    prof = load_profile(a.profile)
    rows = [json.loads(line) for line in open(a.data)]
    random.Random(a.seed).shuffle(rows)
    per: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        if len(per[r["section"]]) < a.per_section:
            per[r["section"]].append(r)
    routers = {"model": ModelRouter(prof, pair.router_side(), calibrate=a.calibrate), "keywords": KeywordRouter(prof)}
    for name, router in routers.items():
        right = collections.Counter()
        for sec, rs in per.items():
            for r in rs:
                right[sec] += router.route(parse_object(r, 1).messages) == WANT[sec]
        total = sum(right.values())
        n = sum(len(v) for v in per.values())
        detail = ", ".join(f"{s} {right[s]}/{len(per[s])}" for s in sorted(per))
        print(f"{name:9s} ({pair.spec.name}, calibrate={a.calibrate}): {total}/{n} right  [{detail}]")
    pair.close()


if __name__ == "__main__":
    main()
