"""``cdr winrate``: raw and length-controlled win rates of models over a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..atomic import write_bytes_atomic
from .annotate import ForceOpt, PlainOpt, QuietOpt, run_scoring
from .options import (
    GpuOpt,
    ModelsOpt,
    NBatchOpt,
    NCtxOpt,
    NoPullOpt,
    NUbatchOpt,
    PairOpt,
    ProfileOpt,
    RouterOpt,
    ThreadsOpt,
)


def winrate(
    model: Annotated[list[Path], typer.Option("--model", "-m", help="Model outputs: AlpacaEval model_outputs.json or JSONL of {instruction, output}. Repeat for a leaderboard.")],
    baseline: Annotated[Path, typer.Option("--baseline", "-b", help="Baseline outputs, same formats; matched by instruction.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for scored outputs (resumable) and winrate.json.")],
    pair: PairOpt = None,
    models: ModelsOpt = None,
    profile: ProfileOpt = "none",
    router: RouterOpt = None,
    instructions: Annotated[int | None, typer.Option("--instructions", help="Score a seeded random subset of this many instructions (default: all).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the instruction subset.")] = 0,
    tau: Annotated[float, typer.Option("--tau", help="Temperature: P(model wins) = sigmoid(margin / tau). Fit one with `cdr eval --calibrate`.")] = 1.0,
    force: ForceOpt = False,
    report_only: Annotated[bool, typer.Option("--report-only", help="Do not score: report on what is already scored (a partial run's models are reported with their n).")] = False,
    reference: Annotated[Path | None, typer.Option("--reference", help="JSON {model name: published LC win rate} for a Spearman check.")] = None,
    quiet: QuietOpt = False,
    plain: PlainOpt = False,
    threads: ThreadsOpt = None,
    n_ctx: NCtxOpt = None,
    n_batch: NBatchOpt = None,
    n_ubatch: NUbatchOpt = None,
    n_gpu_layers: GpuOpt = None,
    no_pull: NoPullOpt = False,
) -> None:
    """Win rate of each model over the baseline: raw, and length-controlled (AlpacaEval-LC's GLM).

    Each output is scored alone, so the baseline is scored once for all models.
    The annotator's preference is sigmoid((reward_model - reward_baseline) / tau).
    Reruns resume where they stopped.
    """
    import orjson
    from rich.console import Console
    from rich.table import Table

    from ..errors import CdrError
    from ..winrate import load_outputs, model_result, select_instructions, spearman, write_records
    from .options import engine_overrides

    if tau <= 0:
        raise CdrError("--tau must be positive")
    output.mkdir(parents=True, exist_ok=True)
    base = load_outputs(baseline)
    chosen = select_instructions(base, instructions, seed)
    overrides = engine_overrides(threads, n_ctx, n_batch, n_ubatch, n_gpu_layers, False)
    runs = [("baseline", baseline, base)] + [(m.stem, m, load_outputs(m)) for m in model]
    names = [r[0] for r in runs]
    if len(set(names)) != len(names):
        raise CdrError("model files must have distinct names")
    scored: dict[str, Path] = {}
    for name, _src, outs in runs:
        out = output / f"{name}.scores.jsonl"
        if report_only:
            if out.exists():
                scored[name] = out
            continue
        rec = output / f"{name}.input.jsonl"
        write_records(rec, chosen, outs)
        summary = run_scoring(
            "winrate", str(rec), str(out), pair, models, profile, router, out.exists(), False, force, None, None,
            quiet, plain, overrides, no_pull,
        )
        if summary.interrupted:
            raise typer.Exit(130)
        scored[name] = out
    if "baseline" not in scored:
        raise CdrError(f"no baseline scores in {output}")
    results = [
        model_result(name, scored[name], scored["baseline"], chosen, outs, base, tau)
        for name, _src, outs in runs[1:]
        if name in scored
    ]
    results.sort(key=lambda r: -r.lc_win_rate)
    report: dict[str, object] = {
        "baseline": str(baseline), "tau": tau, "instructions": len(chosen), "seed": seed,
        "models": [r.__dict__ for r in results],
    }
    t = Table(title=f"win rate over {baseline.stem} ({len(chosen)} instructions, tau={tau:g})", title_justify="left")
    for c in ("model", "n", "win rate", "LC win rate", "LC s.e.", "phi (length)", "avg len"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for r in results:
        t.add_row(r.name, str(r.n), f"{r.win_rate:.2f}", f"{r.lc_win_rate:.2f}", f"{r.lc_standard_error:.2f}", f"{r.phi:+.3f}", f"{r.avg_len:.0f}")
    console = Console(highlight=False)
    console.print(t)
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
    write_bytes_atomic(output / "winrate.json", orjson.dumps(report, option=orjson.OPT_INDENT_2))
    console.print(f"report: {output / 'winrate.json'}")
