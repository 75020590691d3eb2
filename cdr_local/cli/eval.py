"""``cdr eval``: accuracy of a pair (and baselines) on labelled pairs, RewardBench-style."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..atomic import write_bytes_atomic
from .annotate import (
    ForceOpt,
    InputArg,
    LimitOpt,
    OverwriteOpt,
    PlainOpt,
    QuietOpt,
    RejectsOpt,
    ResumeOpt,
    run_scoring,
)
from .options import (
    GpuOpt,
    ModelsOpt,
    NBatchOpt,
    NCtxOpt,
    NoPullOpt,
    NUbatchOpt,
    PairOpt,
    ProfileOpt,
    RayActorsOpt,
    RayOpt,
    RayPartitionOpt,
    RouterOpt,
    ThreadsOpt,
)


def eval_(
    input: InputArg,
    output: Annotated[str, typer.Option("--output", "-o", help="Scored pairs (JSONL, as annotate writes). Report: OUT.report.json (+ OUT.report.png with the plot extra).")],
    pair: PairOpt = None,
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
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Fit the temperature tau of P = sigmoid(margin / tau) on these pairs (for winrate --tau).")] = False,
    report_only: Annotated[bool, typer.Option("--report-only", help="Do not score: report on an existing output (with --limit K: on its first K pairs, into OUT.firstK.report.json).")] = False,
    threads: ThreadsOpt = None,
    n_ctx: NCtxOpt = None,
    n_batch: NBatchOpt = None,
    n_ubatch: NUbatchOpt = None,
    n_gpu_layers: GpuOpt = None,
    no_pull: NoPullOpt = False,
    ray: RayOpt = None,
    ray_actors: RayActorsOpt = None,
    ray_partition_size: RayPartitionOpt = 64,
) -> None:
    """Score labelled pairs (prompt, chosen, rejected; optional subset, section) and report accuracy.

    A pair is right only if chosen scores strictly higher (ties are wrong);
    a section's accuracy weights its subsets by size; overall is the mean of
    the sections.  The same table shows the baselines on the same pairs:
    longer response wins, strong / weak log-likelihood alone (sum and mean),
    and the density ratio with sum and with mean.  Scoring is annotate's
    pipeline: streaming, --resume, rejects.
    """
    import numpy as np
    import orjson
    from rich.console import Console

    from ..errors import CdrError
    from ..evaluate import (
        MAIN,
        pairs_from_output,
        plot,
        report,
        report_table,
        sample_lines,
        subset_table,
        with_length_control,
    )
    from ..lc import fit_tau
    from .options import engine_overrides, ray_options

    if output == "-":
        raise CdrError("eval needs an output file (its report is written next to it)")
    if not report_only:
        select = None
        if per_section is not None:
            if input == "-" or not Path(input).exists():
                raise CdrError("--per-section needs an input file")
            select = sample_lines(input, per_section, seed)
        summary = run_scoring(
            "eval", input, output, pair, models, profile, router, resume, overwrite, force, rejects, limit, quiet, plain,
            engine_overrides(threads, n_ctx, n_batch, n_ubatch, n_gpu_layers, False), no_pull, select,
            ray_options(ray, ray_actors, ray_partition_size),
        )
        if summary.interrupted:
            raise typer.Exit(130)
    if not Path(output).exists():
        raise CdrError(f"no output to report on: {output}")
    pairs = list(pairs_from_output(output))
    first = limit if report_only else None
    if first is not None:  # the first K pairs: with --per-section, a balanced sample, comparable across runs
        if first < 1:
            raise CdrError("--limit must be at least 1")
        if len(pairs) < first:
            raise CdrError(f"{output} holds {len(pairs)} labelled pairs, fewer than --limit {first}")
        pairs = pairs[:first]
    length: dict[str, float] = {}
    try:
        if len(pairs) >= 3:
            pairs, length = with_length_control(pairs)
        rep = report(pairs, n_boot=bootstrap)
    except ValueError as e:
        raise CdrError(str(e)) from None
    if length:
        length["longer_wins_rate"] = float(np.mean([p.values["longer wins"][0] > p.values["longer wins"][1] for p in pairs]))
        rep["length_control"] = length
    if calibrate:
        try:
            rep["tau"] = fit_tau(np.array([p.values[MAIN][0] - p.values[MAIN][1] for p in pairs]))
        except ValueError as e:
            rep["tau"] = None
            rep["tau_error"] = str(e)
    meta_path = Path(output + ".meta.json")
    if meta_path.exists():
        meta = orjson.loads(meta_path.read_bytes())
        rep["pair"] = meta.get("pair")
        rep["profile"] = (meta.get("profile") or {}).get("name")
        rep["router"] = meta.get("router")
    if first is not None:
        rep["first"] = first
    rep_path = Path(output).with_suffix("").as_posix() + (f".first{first}" if first is not None else "") + ".report.json"
    write_bytes_atomic(Path(rep_path), orjson.dumps(rep, option=orjson.OPT_INDENT_2))
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, 150))
    console.print(report_table(rep))
    if not quiet:
        console.print(subset_table(rep))
    if length:
        console.print(
            f"length: the annotator's length coefficient phi = {length['phi']:+.3f} "
            f"(negative = prefers the longer response); the longer response is chosen in {100 * length['longer_wins_rate']:.1f}% of these pairs"
        )
    if rep.get("tau"):
        console.print(f"calibrated tau = {rep['tau']:.3f}  (use: cdr winrate --tau {rep['tau']:.3f})")
    elif "tau_error" in rep:
        console.print(f"no temperature fitted: {rep['tau_error']}")
    png = rep_path[: -len(".json")] + ".png"
    why = plot(rep_path, pairs, png)
    if why is None:
        note = f"  plot: {png}"
    elif why == "missing":
        note = "  (plot: pip install 'cdr-local[plot]')"
    else:  # the child failed: say so, but the report is written and the run succeeded
        note = f"  ({why}; the report is complete)"
    console.print(f"report: {rep_path}{note}", markup=False, soft_wrap=True)  # paths stay whole
