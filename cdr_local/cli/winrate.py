"""``cdr winrate``: raw and length-controlled win rates of models over a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from ..calibration import Calibration
    from ..runs import ScoringOptions

from ..assembly import PairChoice
from ..atomic import write_bytes_atomic
from .groups import PAIR, engine_options, uses
from .options import (
    CalibrationOpt,
    ForceOpt,
    ModelsOpt,
    NoPullOpt,
    PlainOpt,
    ProfileOpt,
    QuietOpt,
    RouterOpt,
    RuleOpt,
)


@uses(PAIR, engine_options())
def winrate(
    model: Annotated[list[Path], typer.Option("--model", "-m", help="Model outputs: AlpacaEval model_outputs.json or JSONL of {instruction, output}. Repeat for a leaderboard.")],
    baseline: Annotated[Path, typer.Option("--baseline", "-b", help="Baseline outputs, same formats; matched by instruction.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for scored outputs (resumable) and winrate.json.")],
    pair: PairChoice,
    models: ModelsOpt = None,
    profile: ProfileOpt = "none",
    router: RouterOpt = None,
    instructions: Annotated[int | None, typer.Option("--instructions", help="Score a seeded random subset of this many instructions (default: all).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the instruction subset.")] = 0,
    tau: Annotated[float | None, typer.Option("--tau", help="Temperature: P(model wins) = sigmoid(margin / tau). Default: the pair's calibration (cdr eval --calibrate), else the margins' spread.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="cdr (default: the density ratio, each output scored "
                      "alone, the baseline once) or judge (the strong model reads each model output beside the baseline's, "
                      "both orders; P(model wins) = sigmoid(margin / 2), the judge's own log-odds, unless --tau).")] = None,
    rule: RuleOpt = None,
    calibration: CalibrationOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Also print the report as one JSON object on stdout (tables go to stderr).")] = False,
    force: ForceOpt = False,
    report_only: Annotated[bool, typer.Option("--report-only", help="Do not score: report on what is already scored (a partial run's models are reported with their n).")] = False,
    reference: Annotated[Path | None, typer.Option("--reference", help="JSON {model name: published LC win rate} for a Spearman check.")] = None,
    quiet: QuietOpt = False,
    plain: PlainOpt = False,
    no_pull: NoPullOpt = False,
    *,
    engine: dict[str, Any],
) -> None:
    """Win rate of each model over the baseline: raw, and length-controlled (AlpacaEval-LC's GLM).

    Each output is scored alone, so the baseline is scored once for all models.
    The annotator's preference is sigmoid((reward_model - reward_baseline) / tau).
    With --method judge, each (model, baseline) pair of outputs is judged side by
    side instead.  Reruns resume where they stopped.
    """
    from ..errors import CdrError
    from ..files import kind
    from ..locks import exclusive

    pair.check()
    if tau is not None and tau <= 0:
        raise CdrError("--tau must be positive")
    from ..methods import DENSITY, parse_methods

    methods = parse_methods(method)
    if len(methods) > 1:
        raise CdrError("winrate takes one --method (it reports one win rate per model)")
    if methods[0] not in DENSITY and (rule is not None or calibration is not None):
        raise CdrError(f"--rule and --calibration go with --method cdr (the {methods[0]} has no rule)")
    if kind(output) not in ("missing", "directory"):
        raise CdrError(f"--output {output} is a {kind(output)}: winrate writes a folder")
    if not report_only:  # the registry and the pair (--strong/--weak too): before any folder or model
        from ..assembly import registry_and_pair

        registry_and_pair(models, pair)
    output.mkdir(parents=True, exist_ok=True)
    with exclusive(output / "winrate.json", "winrate"):  # one winrate per folder at a time
        from ..runs import ScoringOptions

        opts = ScoringOptions(pair=pair, models=models, profile=profile, router=router, rule=rule, method=method,
                              calibration=calibration, force=force, quiet=quiet, plain=plain, engine=engine,
                              pull=not no_pull)
        # a method of its own (the judge) reads each model output beside the baseline's
        pairwise = methods[0] if methods[0] not in DENSITY else None
        _winrate(model, baseline, output, opts, pairwise, instructions, seed, tau, report_only, reference, json_out)


def _winrate(model: list[Path], baseline: Path, output: Path, opts: ScoringOptions, pairwise: str | None,
             instructions: int | None, seed: int, tau: float | None, report_only: bool, reference: Path | None,
             json_out: bool) -> None:
    import orjson
    from rich.console import Console
    from rich.table import Table

    from ..errors import CdrError
    from ..methods import MEASURED
    from ..winrate import (
        annotation_rows,
        default_tau,
        difficulties,
        judged_margins,
        leaderboard_csv,
        load_outputs,
        margins_of,
        model_result,
        paired_responses,
        select_instructions,
        spearman,
        write_judge_records,
        write_records,
    )

    base = load_outputs(baseline)
    chosen = select_instructions(base, instructions, seed)
    runs = [("baseline", baseline, base)] + [(m.stem, m, load_outputs(m)) for m in model]
    names = [r[0] for r in runs]
    if len(set(names)) != len(names):
        raise CdrError("model files must have distinct names")
    judging = pairwise is not None
    scored: dict[str, Path] = {}
    rejected: dict[str, str] = {}  # name -> "N rejected: see PATH", for a run that rejected records
    for name, _src, outs in runs:
        if judging and name == "baseline":
            continue  # judged beside each model's outputs
        out = output / (f"{name}.{pairwise}.jsonl" if judging else f"{name}.scores.jsonl")
        if report_only:
            if out.exists():
                scored[name] = out
            continue
        rec = output / (f"{name}.{pairwise}-input.jsonl" if judging else f"{name}.input.jsonl")
        if judging:
            write_judge_records(rec, chosen, outs, base)
        else:
            write_records(rec, chosen, outs)
        rejected[name] = _score(name, rec, out, opts)
        scored[name] = out
    outputs = {name: outs for name, _src, outs in runs[1:] if name in scored}
    if pairwise is not None:
        all_margins = {name: judged_margins(scored[name], chosen, pairwise) for name in outputs}
        for name, ms in all_margins.items():
            if len(ms) < 3 and rejected.get(name):  # model_result's "fewer than 3" would not say why
                raise CdrError(f"{name}: {len(ms)} pairs judged, {rejected[name]}")
        rule_label = pairwise
        annotator_pair = _pair_name(next(iter(scored.values()))) if scored else "?"
        # the method's z is its log-odds and linear in the margin: P = sigmoid(margin / tau), tau = margin / z
        own_tau = 1.0 / MEASURED[pairwise](1.0)
        tau_from = "--tau" if tau is not None else f"the {pairwise}'s log-odds (P = sigmoid(margin / {own_tau:g}))"
        tau = tau if tau is not None else own_tau
    else:
        if "baseline" not in scored:
            raise CdrError(f"no baseline scores in {output}")
        from ..rules import DEFAULT_RULE, estimate, parse_rule

        responses = {name: paired_responses(scored[name], scored["baseline"], chosen, outs) for name, outs in outputs.items()}
        cal = _calibration(scored["baseline"], Path(opts.calibration) if opts.calibration is not None else None)
        # the rule: --rule, else the one the scores were labelled with; its label-free parameters
        # from the calibration, else from these (model, baseline) pairs
        rule_text = opts.rule or _rule_label(scored["baseline"]) or (cal.rule if cal else DEFAULT_RULE)
        pairs_all = [pr for rs in responses.values() for pr in rs.values()]
        params = cal.params if cal is not None else (estimate(pairs_all) if pairs_all else {})
        spec = parse_rule(rule_text, params)
        rule_label = spec.label()
        annotator_pair = _pair_name(scored["baseline"])
        all_margins = {name: margins_of(rs, spec) for name, rs in responses.items()}
        tau_from = "--tau"
        if tau is None:
            if cal is not None and cal.tau.get(rule_label):
                tau, tau_from = float(cal.tau[rule_label] or 1.0), f"calibration {cal.path}"
            else:
                tau = default_tau([m for ms in all_margins.values() for m in ms.values()])
                tau_from = "the margins' spread (no calibration for this pair and rule)"
    if not outputs:
        raise CdrError(f"no model scores in {output}")
    diffs = difficulties(all_margins, tau)
    results = [model_result(name, all_margins[name], chosen, outputs[name], base, tau, diffs[name] or None)
               for name in outputs]
    results.sort(key=lambda r: -r.lc_win_rate)
    report: dict[str, object] = {
        "baseline": str(baseline), "tau": tau, "tau_from": tau_from, "rule": rule_label, "instructions": len(chosen), "seed": seed,
        "glm": "P(model wins) = sigmoid(theta + phi * tanh(dlen / std) [+ psi * difficulty]); L1 by 5-fold CV; "
               "difficulty = the other models' mean logit on the instruction (with 3+ models)",
        "models": [r.__dict__ for r in results],
    }
    t = Table(title=f"win rate over {baseline.stem} ({len(chosen)} instructions, rule {rule_label}, tau={tau:.3g} from {tau_from})", title_justify="left")
    for c in ("model", "n", "win rate", "s.e.", "LC win rate", "LC s.e.", "phi (length)", "avg len"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for r in results:
        t.add_row(r.name, str(r.n), f"{r.win_rate:.2f}", f"{r.standard_error:.2f}", f"{r.lc_win_rate:.2f}", f"{r.lc_standard_error:.2f}",
                  f"{r.phi:+.3f}", f"{r.avg_len:.0f}")
    console = Console(highlight=False, stderr=json_out)
    console.print(t)
    for r in results:
        for w in r.warnings:
            console.print(f"warning: {r.name}: {w}", soft_wrap=True)
    if reference is not None:
        ref = orjson.loads(reference.read_bytes())
        common = [r for r in results if r.name in ref]
        if len(common) >= 3:
            pub = [float(ref[r.name]) for r in common]
            report["spearman_raw_vs_reference"] = spearman([r.win_rate for r in common], pub)
            report["spearman_lc_vs_reference"] = spearman([r.lc_win_rate for r in common], pub)
            console.print(
                f"Spearman vs reference ({len(common)} models): raw {report['spearman_raw_vs_reference']:+.3f}, "
                f"LC {report['spearman_lc_vs_reference']:+.3f}"
            )
    write_bytes_atomic(output / "winrate.json", orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    write_bytes_atomic(output / "leaderboard.csv", leaderboard_csv(results))
    annotator = f"cdr-local:{annotator_pair}/{rule_label}"
    rows = [a for name in outputs for a in annotation_rows(name, all_margins[name], outputs[name], base, tau, annotator)]
    write_bytes_atomic(output / "annotations.json", orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    if json_out:
        typer.echo(orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY).decode())
    console.print(f"report: {output / 'winrate.json'} (alpaca_eval formats: leaderboard.csv, annotations.json)")


def _score(name: str, records: Path, out: Path, opts: ScoringOptions) -> str:
    """Score one run's records into ``out``, resuming; outputs changed since are scored again.
    Returns "N rejected: see PATH" when the run rejected records, else ""."""
    from dataclasses import replace

    from rich.console import Console

    from ..pipeline import InputChanged
    from ..runs import run_scoring

    try:
        summary = run_scoring("winrate", str(records), str(out), replace(opts, resume=out.exists()))
    except InputChanged:  # new outputs (or another instruction subset) since they were scored
        Console(stderr=True, highlight=False).print(f"{name}: its outputs changed since they were scored: scoring them again")
        summary = run_scoring("winrate", str(records), str(out), replace(opts, overwrite=True))
    if summary.interrupted:
        raise typer.Exit(130)
    return f"{summary.rejected} rejected: see {summary.rejects_path}" if summary.rejected else ""


def _sidecar(scores: Path) -> dict[str, object]:
    import orjson

    p = Path(str(scores) + ".meta.json")
    try:
        d = orjson.loads(p.read_bytes())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _rule_label(scores: Path) -> str | None:
    r = _sidecar(scores).get("rule")
    return str(r.get("label")) if isinstance(r, dict) and r.get("label") else None


def _pair_name(scores: Path) -> str:
    return str(_sidecar(scores).get("pair") or "?")


def _calibration(scores: Path, path: Path | None) -> Calibration | None:
    """The calibration the scores were labelled with (their sidecar names it), or ``path``."""
    from .. import calibration as C

    if path is not None:
        return C.load(path)
    conf = _sidecar(scores).get("confidence")
    p = conf.get("calibration") if isinstance(conf, dict) else None
    if isinstance(p, str) and p.startswith("cdr_local/calibrations/"):
        return C.shipped(_pair_name(scores))
    return C.load(p) if isinstance(p, str) and Path(p).exists() else None
