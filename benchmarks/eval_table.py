"""Markdown tables of several ``cdr eval`` outputs side by side (for the README).

Each configuration is ``LABEL=OUT.jsonl`` (a ``cdr eval`` output).  All are cut
to the pairs every one of them scored (the common prefix of runs on the same
``--per-section`` sample, or ``--limit K``), and every rule is recomputed from
the scores with ``cdr_local.evaluate`` -- the code ``cdr eval`` reports with --
so the numbers are exactly what ``cdr eval --report-only --limit K`` prints.

Tables:

1. rules x configurations: length-balanced accuracy (95% CI), accuracy when
   the chosen response is longer / shorter, overall accuracy, the most
   confident 30% minus all pairs, and the paired difference in length-balanced
   accuracy against ``--ref CONFIG:RULE`` (default: the first configuration's
   first rule);
2. length-balanced accuracy per section, for ``--sections-of CONFIG``;
3. accuracy against coverage (10/20/30/50/100%) for ``--coverage CONFIG:RULE,...``.

    python benchmarks/eval_table.py --rules cdr-sum,cdr-lc,strong-mean \\
        "default=.cache/evals/eval-qwen-over-gemma-base.jsonl" "smollm2=.cache/evals/eval-smollm2-sys.jsonl"
"""

from __future__ import annotations

import argparse
from typing import Any

from cdr_local.evaluate import EvalPair, paired_difference, pairs_from_output, report

DEFAULT_RULES = ("cdr-sum", "cdr-mean", "cdr-offset", "cdr-lc", "cdr-beta:beta=0.5", "cdr-beta-mean:beta=0.5",
                 "cdr-beta-mean:beta=0.25", "strong-sum", "strong-mean", "weak-mean", "longer", "shorter")


def pct(d: dict[str, Any] | None, ci: bool = True) -> str:
    if not d or d.get("acc") is None:
        return "-"
    if not ci:
        return f"{100 * d['acc']:.1f}"
    return f"{100 * d['acc']:.1f} ({100 * d['ci'][0]:.0f}-{100 * d['ci'][1]:.0f})"


def signed(d: dict[str, Any]) -> str:
    return f"{100 * d['diff']:+.1f} ({100 * d['ci'][0]:+.0f} to {100 * d['ci'][1]:+.0f})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="LABEL=OUT.jsonl")
    ap.add_argument("--rules", default=",".join(DEFAULT_RULES), help="comma list of rule specs")
    ap.add_argument("--limit", type=int, default=None, help="report on the first K pairs (default: the common prefix)")
    ap.add_argument("--ref", default=None, help="CONFIG:RULE for the paired column (default: first config, first rule)")
    ap.add_argument("--sections-of", default=None, help="CONFIG for the per-section table (default: the first)")
    ap.add_argument("--coverage", default=None, help="CONFIG:RULE,... for the coverage table (default: the ref)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    extra = [r for r in rules if ":" in r]
    paths = dict(c.partition("=")[::2] for c in args.configs)
    sizes = {label: len(pairs_from_output(path)) for label, path in paths.items()}
    n = args.limit or min(sizes.values())
    short = [f"{label} holds {k}" for label, k in sizes.items() if k < n]
    if short:
        raise SystemExit(f"fewer than {n} pairs: {', '.join(short)}")
    # rule parameters are estimated (without labels) from the pairs reported on: the common prefix
    configs: dict[str, list[EvalPair]] = {label: pairs_from_output(path, limit=n, extra=extra) for label, path in paths.items()}
    reps = {label: report(p, n_boot=args.bootstrap) for label, p in configs.items()}
    first = next(iter(configs))
    ref_cfg, _, ref_rule = (args.ref or f"{first}:{rules[0]}").partition(":")
    ref_rule = ref_rule or rules[0]
    ref_pairs = configs[ref_cfg]
    lm = reps[first]["length"]
    print(f"{n} pairs (sections: {', '.join(f'{k} {v}' for k, v in reps[first]['sections'].items())}); length strata by the "
          f"{lm['strata_by']}: chosen longer {lm['pairs']['longer']}, shorter {lm['pairs']['shorter']}, same {lm['pairs']['same']}.\n")
    head = ["configuration", "rule", "length-balanced", "chosen longer", "chosen shorter", "overall", "top 30% - all",
            f"vs {ref_cfg} {ref_rule} (balanced, paired)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, rep in reps.items():
        for r in rules:
            m = rep["methods"][r]
            sel = {x["coverage"]: x for x in m["selective"]}[0.3]
            top = f"{100 * sel['minus_all']:+.1f} ({100 * sel['minus_all_ci'][0]:+.0f} to {100 * sel['minus_all_ci'][1]:+.0f})"
            if (label, r) == (ref_cfg, ref_rule):
                vs = "-"
            else:
                vs = signed(paired_difference(configs[label], ref_pairs, r, method_b=ref_rule, metric="balanced", n_boot=args.bootstrap))
            ln = m["length"]
            print(f"| {label} | {r} | **{pct(ln['balanced'])}** | {pct(ln['longer'], False)} | {pct(ln['shorter'], False)} | "
                  f"{pct(m['overall'])} | {top} | {vs} |")
    sec_cfg = args.sections_of or first
    rep = reps[sec_cfg]
    secs = list(rep["sections"])
    print(f"\nLength-balanced accuracy per section, {sec_cfg} (in brackets: chosen longer / chosen shorter):\n")
    print("| rule | " + " | ".join(f"{s} (n={rep['sections'][s]})" for s in secs) + " |")
    print("|" + "---|" * (len(secs) + 1))
    for r in rules:
        cells = []
        for s in secs:
            d = rep["methods"][r]["length"]["sections"][s]
            cells.append(f"{pct(d['balanced'], False)} ({pct(d['longer'], False)} / {pct(d['shorter'], False)})")
        print(f"| {r} | " + " | ".join(cells) + " |")
    cov = [x.partition(":")[::2] for x in (args.coverage or f"{ref_cfg}:{ref_rule}").split(",")]
    print("\nAccuracy of the most confident share of pairs (ranked by the rule's |margin_z|; in brackets: by |margin|):\n")
    print("| configuration | rule | 10% | 20% | 30% | 50% | 100% |")
    print("|---|---|---|---|---|---|---|")
    for cfg, r in cov:
        m = reps[cfg]["methods"][r]
        cells = [f"{100 * a['acc']:.1f} ({100 * b['acc']:.1f})" for a, b in zip(m["selective"], m["selective_by_margin"], strict=True)]
        print(f"| {cfg} | {r} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
