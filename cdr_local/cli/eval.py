"""``cdr eval``: accuracy of a pair (and baselines) on labelled pairs, RewardBench-style."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..assembly import PairChoice
from .groups import PAIR, RAY, engine_options, uses
from .options import (
    CalibrationOpt,
    ForceOpt,
    InputArg,
    LimitOpt,
    MethodOpt,
    ModelsOpt,
    NoPullOpt,
    OverwriteOpt,
    PlainOpt,
    ProfileOpt,
    QuietOpt,
    RejectsOpt,
    ResumeOpt,
    RouterOpt,
    RuleOpt,
)


@uses(PAIR, engine_options(), RAY)
def eval_(
    input: InputArg,
    output: Annotated[str, typer.Option("--output", "-o", help="Scored pairs (JSONL, as annotate writes). Report: OUT.report.json (+ OUT.report.png with the plot extra).")],
    pair: PairChoice,
    method: MethodOpt = None,
    rule: RuleOpt = None,
    calibration: CalibrationOpt = None,
    models: ModelsOpt = None,
    profile: ProfileOpt = "none",
    router: RouterOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    force: ForceOpt = False,
    rejects: RejectsOpt = None,
    limit: LimitOpt = None,
    quiet: QuietOpt = False,
    plain: PlainOpt = False,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap replicates for the 95% intervals.")] = 1000,
    per_section: Annotated[int | None, typer.Option("--per-section", help="Score a stratified random sample of this many pairs per section (seeded).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --per-section sampling.")] = 0,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Fit the confidence model (and each rule's tau for win rates) on these pairs: OUT.calibration.json, for --calibration.")] = False,
    rules: Annotated[str | None, typer.Option("--rules", help="More rules to report, ';'-separated, e.g. 'cdr-beta:beta=0.75;cdr-beta:beta=0.9'.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object instead of tables.")] = False,
    token_logprobs: Annotated[bool, typer.Option("--token-logprobs", help="Also write each side's per-token log-probs (for rules beyond the sums; bigger output).")] = False,
    report_only: Annotated[bool, typer.Option("--report-only", help="Do not score: report on an existing output (with --limit K: on its first K pairs, into OUT.firstK.report.json).")] = False,
    no_pull: NoPullOpt = False,
    *,
    engine: dict[str, Any],
    ray: Any,  # RayOptions, or None without --ray
) -> None:
    """Score labelled pairs (prompt, chosen, rejected; optional subset, section) and report accuracy.

    A pair is right only if chosen scores strictly higher (ties are wrong);
    a section's accuracy weights its subsets by size; overall is the mean of
    the sections.  Every scoring rule (cdr rules --help... see `cdr eval
    --help` for --rule) is reported from the one scoring pass: the density
    ratio (sum, mean, offset, length-controlled, beta), the strong and weak
    model alone, and the longer/shorter baselines.  For each: accuracy when
    the chosen response is the longer one and when it is the shorter one (by
    characters), their mean (length-balanced accuracy),
    and selective accuracy (the most confident 10/20/30/50/100% of pairs).
    --method judge,cdr adds the pairwise judge to the same report (the strong
    model reading both responses), labelled by the first method named.
    --calibrate fits the confidence model on these pairs.  Scoring is
    annotate's pipeline: streaming, --resume, rejects.
    """
    import orjson
    from rich.console import Console

    from ..errors import CdrError
    from ..evaluate import plot, report_table, section_table, subset_table
    from ..rules import parse_rule
    from ..runs import ScoringOptions, eval_paths, eval_report, eval_sample, run_scoring

    pair.check()
    if output == "-":
        raise CdrError("eval needs an output file (its report is written next to it)")
    if bootstrap < 1:
        raise CdrError("--bootstrap must be at least 1")
    if per_section is not None and per_section < 1:
        raise CdrError("--per-section must be at least 1")
    extra_rules = [x.strip() for x in (rules or "").split(";") if x.strip()]
    for x in [*extra_rules, *([rule] if rule else [])]:
        parse_rule(x, {"strong_offset": 0.0, "weak_offset": 0.0, "length_slope": 0.0})  # names and syntax, before any work
    from ..methods import parse_methods

    parse_methods(method)
    first = limit if report_only else None
    stem, reports = eval_paths(output, first, calibrate)
    rep_path = stem + ".report.json"
    if not report_only:
        select = eval_sample(input, per_section, seed)
        summary = run_scoring("eval", input, output, ScoringOptions(
            pair=pair, models=models, profile=profile, router=router, rule=rule, method=method, calibration=calibration,
            resume=resume, overwrite=overwrite, force=force, rejects=rejects, limit=limit, quiet=quiet, plain=plain,
            engine=engine, pull=not no_pull,
            select=select, ray=ray, token_logprobs=token_logprobs,
            also_writes=tuple(reports)))
        if summary.interrupted:
            raise typer.Exit(130)
        from .common import require_scored
        require_scored(summary, resume=resume, limit=limit)  # exit 1: every line rejected, or none
    if not Path(output).exists():
        raise CdrError(f"no output to report on: {output}")
    from ..files import check_distinct

    check_distinct([("input", None if report_only else input), ("output", output), *reports])
    rep, pairs, _ = eval_report(output, rule=rule, method=method, rules=extra_rules, bootstrap=bootstrap, first=first, calibrate=calibrate,
                                models=models, per_section=per_section, seed=seed)
    main = rep["main"]
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, 160))
    if json_out:
        typer.echo(orjson.dumps(rep).decode())
    else:
        console.print(report_table(rep, main))
        console.print(section_table(rep, main))
        if not quiet:
            console.print(subset_table(rep, main))
        lm = rep["length"]
        share = lm.get("chosen_longer_share", {})
        tok = next((k for k in ("strong_tokens", "judge_tokens") if k in share), None)
        by_tokens = f" ({tok.replace('_', ' ')}) in {100 * share[tok]:.1f}% of these pairs" if tok else ""
        console.print(
            f"length: chosen is the longer response{by_tokens} ({100 * share.get('chars', float('nan')):.1f}% by characters); "
            f"strata: {lm['pairs']['longer']} longer, {lm['pairs']['shorter']} shorter, {lm['pairs']['same']} same length"
        )
        if calibrate:
            c = rep["calibration"]
            console.print(
                f"calibration: P(right) = sigmoid({c['confidence']['a']:+.3f} + {c['confidence']['b']:.3f} |z|) for {main}; "
                f"cross-fitted ECE {c['cross_fitted']['ece']:.3f}; written to {stem}.calibration.json", soft_wrap=True)
    png = stem + ".report.png"
    why = plot(rep_path, pairs, png, main)
    if json_out:
        return
    if why is None:
        note = f"  plot: {png}"
    elif why == "missing":
        note = "  (plot: pip install 'cdr-local[plot]')"
    else:  # the child failed: say so, but the report is written and the run succeeded
        note = f"  ({why}; the report is complete)"
    console.print(f"report: {rep_path}{note}", markup=False, soft_wrap=True)  # paths stay whole
