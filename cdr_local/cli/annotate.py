"""``cdr annotate``: label pairs / rank N responses with a CDR pair, streaming and resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import (
    GpuOpt,
    ModelsOpt,
    NBatchOpt,
    NCtxOpt,
    NoPullOpt,
    NUbatchOpt,
    PairOpt,
    ParallelOpt,
    ThreadsOpt,
)


def annotate(
    input: Annotated[str, typer.Argument(help="Input JSONL ('-' for stdin): {prompt, chosen, rejected}, {prompt, response_a, response_b}, {prompt, responses: [...]}, or TRL conversational records.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output JSONL ('-' for stdout). Sidecars: OUT.meta.json, OUT.rejects.jsonl.")],
    pair: PairOpt = None,
    models: ModelsOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run: skip ids already in the output.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again, replacing an existing output.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Resume even if settings that change scores differ from the first run.")] = False,
    rejects: Annotated[str | None, typer.Option("--rejects", help="Where rejected lines go (default OUT.rejects.jsonl; '-' = stderr).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Score at most this many new records.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or summary.")] = False,
    plain: Annotated[bool, typer.Option("--plain", help="Plain log lines instead of the progress bar.")] = False,
    threads: ThreadsOpt = None,
    n_ctx: NCtxOpt = None,
    n_batch: NBatchOpt = None,
    n_ubatch: NUbatchOpt = None,
    n_gpu_layers: GpuOpt = None,
    parallel_responses: ParallelOpt = False,
    no_pull: NoPullOpt = False,
) -> None:
    """Score every record's responses with the pair's density ratio.

    Each output line holds the record's id and prompt, TRL-ready chosen /
    rejected (best and worst response by reward) and margin, the label (which
    input response won, or tie), and per response: reward (sum), reward_mean,
    each model's log-prob and token count, and a truncation flag.  Each
    finished record is flushed at once; kill the run at any moment and
    continue it with --resume.
    """
    from ..annotate import AnnotateTask
    from ..pipeline import RunConfig, run
    from ..records import parse_line
    from ..ui import RunDisplay
    from .options import engine_overrides, load_pair

    if input != "-" and not Path(input).exists():
        from ..errors import CdrError

        raise CdrError(f"input not found: {input}")
    lp = load_pair(models, pair, engine_overrides(threads, n_ctx, n_batch, n_ubatch, n_gpu_layers, parallel_responses), no_pull)
    try:
        meta = {"command": "annotate", "input": input, **lp.metadata()}
        cfg = RunConfig(
            input=input, output=output, resume=resume, overwrite=overwrite, force=force,
            rejects=rejects, meta=meta, numerics=lp.numerics(), limit=limit,
        )
        display = RunDisplay(f"annotate [{lp.spec.name}]", quiet=quiet, plain=True if plain else None)
        summary = run(cfg, parse_line, AnnotateTask(lp), display)
    finally:
        lp.close()
    if summary.interrupted:
        raise typer.Exit(130)
