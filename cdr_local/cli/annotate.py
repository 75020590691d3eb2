"""``cdr annotate``: label pairs / rank N responses with a CDR pair, streaming and resumable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .options import (
    CalibrationOpt,
    GpuOpt,
    KeepTopOpt,
    MinConfidenceOpt,
    ModelsOpt,
    NBatchOpt,
    NCtxOpt,
    NoPullOpt,
    NUbatchOpt,
    PairChoice,
    PairOpt,
    ParallelOpt,
    ProfileOpt,
    RayActorsOpt,
    RayOpt,
    RayPartitionOpt,
    RouterOpt,
    RuleOpt,
    StrongOpt,
    StrongSystemOpt,
    ThreadsOpt,
    WeakOpt,
    WeakSystemOpt,
)

if TYPE_CHECKING:
    from ..distributed import BuiltTask, RayOptions
    from ..pipeline import RunSummary

InputArg = Annotated[
    str,
    typer.Argument(
        help="Input JSONL ('-' for stdin): {prompt, chosen, rejected}, {prompt, response_a, response_b}, "
        "{prompt, responses: [...]}, or TRL conversational records."
    ),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run: skip ids already in the output.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Start again, replacing an existing output.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Resume even if settings that change scores differ from the first run.")]
RejectsOpt = Annotated[str | None, typer.Option("--rejects", help="Where rejected lines go (default OUT.rejects.jsonl; '-' = stderr).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Score at most this many new records.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or summary.")]
PlainOpt = Annotated[bool, typer.Option("--plain", help="Plain log lines instead of the progress bar.")]


@dataclass(frozen=True)
class ScoringSpec:
    """What builds the annotate task: pair, profile and router.

    Picklable, so a Ray actor builds the very same task on its node: the
    registry and the profile travel already parsed, and the models are
    resolved (pulled, sha256-checked) in the cache of the machine that calls it.
    """

    registry: Any
    pair: str | None
    settings: Any
    profile: Any
    router: str | None
    pull: bool
    token_logprobs: bool = False
    rule: str | None = None
    calibration: Any = None  # the resolved Calibration (None: none fits the pair)

    def __call__(self) -> BuiltTask:
        from ..annotate import AnnotateTask, make_router
        from ..distributed import BuiltTask
        from ..pair import LoadedPair
        from ..ui import say

        lp = LoadedPair(self.registry, self.pair, self.settings, pull=self.pull, say=say)
        try:
            task = AnnotateTask(lp, self.profile, make_router(self.router, self.profile, lp), token_logprobs=self.token_logprobs,
                                rule=self.rule, calibration=self.calibration)
            return BuiltTask(task, {**lp.metadata(), **task.metadata()}, {**lp.numerics(), **task.numerics()}, lp.close)
        except BaseException:
            lp.close()
            raise


def run_scoring(command: str, input: str, output: str, pair: str | PairChoice | None, models: Path | None, profile: str, router: str | None,
                resume: bool, overwrite: bool, force: bool, rejects: str | None, limit: int | None, quiet: bool, plain: bool,
                overrides: dict[str, Any], no_pull: bool, select: list[int] | None = None, ray: RayOptions | None = None,
                *, token_logprobs: bool = False, also_writes: tuple[tuple[str, str], ...] = (), rule: str | None = None,
                calibration: Path | None = None, min_confidence: float | None = None, keep_top: float | None = None) -> RunSummary:
    """The shared body of annotate and eval: pair + profile + router through the pipeline (on Ray with ``ray``).

    Everything that needs no model (files, flags, the resume checks that read
    only the sidecar and the input, the registry and the pair, --strong/--weak
    included) is checked before the pair is loaded.
    """
    from ..pipeline import RunConfig, preflight, run
    from ..profiles import load_profile
    from ..records import parse_line
    from ..ui import RunDisplay
    from .options import engine_settings, pair_choice, registry_and_pair

    choice = pair_choice(pair)
    choice.check()
    if limit is not None and limit < 0:
        from ..errors import CdrError

        raise CdrError("--limit must be 0 or more")
    cfg = RunConfig(input=input, output=output, resume=resume, overwrite=overwrite, force=force, rejects=rejects,
                    meta={"command": command, "input": input}, limit=limit, select=select, also_writes=also_writes)
    preflight(cfg)
    from ..calibration import labelling

    prof = load_profile(profile)
    reg, pair = registry_and_pair(models, choice)
    cal = labelling(reg, pair, rule, calibration, min_confidence, keep_top, cfg)
    spec = ScoringSpec(reg, pair, engine_settings(reg, overrides), prof, router, not no_pull, token_logprobs, rule, cal)
    display = RunDisplay(f"{command} [{reg.pair(pair).name}/{prof.name}]", quiet=quiet, plain=True if plain else None)
    if ray is not None:
        from ..distributed import run_on_ray

        return run_on_ray(cfg, parse_line, spec, ray.for_settings(spec.settings), display)
    built = spec()
    try:
        cfg.meta.update(built.meta)
        cfg.numerics.update(built.numerics)
        return run(cfg, parse_line, built.task, display)
    finally:
        built.close()


def annotate(
    input: InputArg,
    output: Annotated[str, typer.Option("--output", "-o", help="Output JSONL ('-' for stdout). Sidecars: OUT.meta.json, OUT.rejects.jsonl.")],
    pair: PairOpt = None,
    strong: StrongOpt = None,
    weak: WeakOpt = None,
    strong_system: StrongSystemOpt = None,
    weak_system: WeakSystemOpt = None,
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
    threads: ThreadsOpt = None,
    n_ctx: NCtxOpt = None,
    n_batch: NBatchOpt = None,
    n_ubatch: NUbatchOpt = None,
    n_gpu_layers: GpuOpt = None,
    parallel_responses: ParallelOpt = False,
    no_pull: NoPullOpt = False,
    ray: RayOpt = None,
    ray_actors: RayActorsOpt = None,
    ray_partition_size: RayPartitionOpt = 64,
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
    from .options import engine_overrides, ray_options

    summary = run_scoring(
        "annotate", input, output, PairChoice(pair, strong, weak, strong_system, weak_system), models, profile, router, resume, overwrite, force, rejects, limit, quiet, plain,
        engine_overrides(threads, n_ctx, n_batch, n_ubatch, n_gpu_layers, parallel_responses), no_pull,
        ray=ray_options(ray, ray_actors, ray_partition_size), rule=rule, calibration=calibration,
        min_confidence=min_confidence, keep_top=keep_top,
    )
    if summary.interrupted:
        raise typer.Exit(130)
    from .common import require_scored
    require_scored(summary, resume=resume, limit=limit)  # exit 1: every line rejected, or none
