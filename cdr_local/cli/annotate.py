"""``cdr annotate``: label pairs / rank N responses with a CDR pair, streaming and resumable."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..assembly import PairChoice
from .groups import PAIR, RAY, engine_options, uses
from .options import (
    CalibrationOpt,
    ForceOpt,
    InputArg,
    KeepTopOpt,
    LimitOpt,
    MethodOpt,
    MinConfidenceOpt,
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


@uses(PAIR, engine_options(opt_in=True), RAY)
def annotate(
    input: InputArg,
    output: Annotated[str, typer.Option("--output", "-o", help="Output JSONL ('-' for stdout). Sidecars: OUT.meta.json, OUT.rejects.jsonl.")],
    pair: PairChoice,
    method: MethodOpt = None,
    rule: RuleOpt = None,
    calibration: CalibrationOpt = None,
    min_confidence: MinConfidenceOpt = None,
    keep_top: KeepTopOpt = None,
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
    no_pull: NoPullOpt = False,
    *,
    engine: dict[str, Any],
    ray: Any,  # RayOptions, or None without --ray
) -> None:
    """Score every record's responses with the pair's density ratio.

    Each output line holds the record's id and prompt, TRL-ready chosen /
    rejected (best and worst response by reward) and margin, the label (which
    input response won, or tie), the profile domain, and per response: reward
    (sum), reward_mean, each model's log-prob and token count, and a
    truncation flag.  Each finished record is flushed at once; kill the run at
    any moment and continue it with --resume.  --ray spreads the scoring over a
    Ray cluster and writes the same output.  --strong SRC --weak SRC scores
    with any two models instead of a registry pair.
    """
    from ..runs import ScoringOptions, run_scoring

    summary = run_scoring("annotate", input, output, ScoringOptions(
        pair=pair, models=models, profile=profile, router=router, rule=rule, method=method, calibration=calibration,
        min_confidence=min_confidence, keep_top=keep_top, resume=resume, overwrite=overwrite, force=force,
        rejects=rejects, limit=limit, quiet=quiet, plain=plain, engine=engine, pull=not no_pull, ray=ray))
    if summary.interrupted:
        raise typer.Exit(130)
    from .common import require_scored
    require_scored(summary, resume=resume, limit=limit)  # exit 1: every line rejected, or none
