"""``cdr pairs``: best-of-N responses to TRL preference pairs (CDR recipe, REAL selection)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .annotate import (
    ForceOpt,
    InputArg,
    LimitOpt,
    OverwriteOpt,
    PlainOpt,
    QuietOpt,
    RejectsOpt,
    ResumeOpt,
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
    RouterOpt,
    ThreadsOpt,
)


def pairs(
    input: InputArg,
    output: Annotated[str, typer.Option("--output", "-o", help="TRL preference pairs (JSONL): prompt, chosen, rejected, margin + provenance.")],
    strategy: Annotated[str, typer.Option("--strategy", "-s", help="best-random (CDR), best-worst, real-easy, real-hard, real-centroid.")] = "best-random",
    min_margin: Annotated[float | None, typer.Option("--min-margin", help="Keep only pairs with margin >= this.")] = None,
    keep_dissimilar: Annotated[float | None, typer.Option("--keep-dissimilar", help="Selection over labelled pairs: keep this percentage of the least similar chosen/rejected pairs (REAL).")] = None,
    embed_model: Annotated[str | None, typer.Option("--embed-model", help="Registry model for embeddings (default: the pair's strong model).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of best-random (combined with each record id).")] = 0,
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
    threads: ThreadsOpt = None,
    n_ctx: NCtxOpt = None,
    n_batch: NBatchOpt = None,
    n_ubatch: NUbatchOpt = None,
    n_gpu_layers: GpuOpt = None,
    no_pull: NoPullOpt = False,
) -> None:
    """Turn records with N responses into training pairs.

    Records with rewards (an annotate output) are used as they are; others are
    scored on the fly with the pair.  Skipped records (all rewards tie,
    identical texts, margin below --min-margin) go to the rejects file with the
    reason.  Output rows load with datasets.load_dataset("json", ...) and feed
    TRL's DPO / reward trainers (margin is TRL's margin column).
    """
    from ..annotate import AnnotateTask, make_router
    from ..embed import Embedder
    from ..errors import CdrError
    from ..models import load_registry, resolve
    from ..pairs import NEEDS_EMBEDDINGS, STRATEGIES
    from ..pairs_task import PairsTask
    from ..pipeline import RunConfig, run
    from ..profiles import load_profile
    from ..records import parse_line
    from ..ui import RunDisplay, say
    from .options import engine_overrides, engine_settings, load_pair

    if strategy not in STRATEGIES:
        raise CdrError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if input != "-" and not Path(input).exists():
        raise CdrError(f"input not found: {input}")
    if keep_dissimilar is not None and not 0 < keep_dissimilar <= 100:
        raise CdrError("--keep-dissimilar is a percentage in (0, 100]")
    if keep_dissimilar is not None and input == "-":
        raise CdrError("--keep-dissimilar reads the input twice: give a file, not stdin")
    overrides = engine_overrides(threads, n_ctx, n_batch, n_ubatch, n_gpu_layers, False)
    reg = load_registry(models)
    needs_emb = strategy in NEEDS_EMBEDDINGS or keep_dissimilar is not None
    # score on the fly only if some record lacks rewards: decided per record, but the
    # pair is loaded up front unless the input is an annotate output (has "scores")
    lp = None
    if keep_dissimilar is None and not _looks_scored(input):
        lp = load_pair(models, pair, overrides, no_pull)
    closers: list[Any] = []
    try:
        embedder = None
        emb_meta: dict[str, Any] = {}
        if needs_emb:
            from ..engine.llama import LlamaModel
            from ..pair import model_sha256

            name = embed_model or reg.pair(pair).strong.model
            spec = reg.model(name)
            path = resolve(spec, pull=not no_pull, progress=say)
            em = LlamaModel(path, engine_settings(reg, overrides), name=name, embeddings=True)
            closers.append(em)
            sha = model_sha256(spec, path)
            embedder = Embedder(em, sha)
            closers.append(embedder)
            emb_meta = {"embed_model": name, "embed_model_sha256": sha, "embedding": "mean of final hidden states of the response alone"}
        scorer = None
        mode = "keep-dissimilar" if keep_dissimilar is not None else strategy
        meta: dict[str, Any] = {"command": "pairs", "input": input, "strategy": mode, "min_margin": min_margin, "seed": seed, **emb_meta}
        numerics: dict[str, Any] = {"strategy": mode, "seed": seed, "min_margin": min_margin, **emb_meta}
        if lp is not None:
            prof = load_profile(profile)
            scorer = AnnotateTask(lp, prof, make_router(router, prof, lp))
            meta.update({**lp.metadata(), **scorer.metadata()})
            numerics.update({**lp.numerics(), **scorer.numerics()})
        if keep_dissimilar is not None:
            assert embedder is not None
            task: Any = _DissimilarTask(embedder, _threshold(input, embedder, keep_dissimilar))
            meta["keep_dissimilar_percent"] = keep_dissimilar
            numerics["keep_dissimilar_percent"] = keep_dissimilar
        else:
            task = PairsTask(strategy, scorer=scorer, embedder=embedder, min_margin=min_margin, seed=seed)
        cfg = RunConfig(input=input, output=output, resume=resume, overwrite=overwrite, force=force, rejects=rejects,
                        meta=meta, numerics=numerics, limit=limit)
        display = RunDisplay(f"pairs [{mode}]", quiet=quiet, plain=True if plain else None)
        summary = run(cfg, parse_line, task, display)
    finally:
        for c in reversed(closers):
            c.close()
        if lp is not None:
            lp.close()
    if not quiet:
        _print_skips(summary.rejects_path)
    if summary.interrupted:
        raise typer.Exit(130)


def _looks_scored(input: str) -> bool:
    """True if the first record carries rewards (an annotate output)."""
    if input == "-":
        return False
    import orjson

    with open(input, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    return False
                return isinstance(obj, dict) and isinstance(obj.get("scores"), list)
    return False


def _threshold(input: str, embedder: Any, percent: float) -> float:
    """Similarity at the given percentile of chosen/rejected cosine (first pass; embeddings cached)."""
    import numpy as np

    from ..records import Record, parse_line

    sims = []
    with open(input, "rb") as f:
        for i, line in enumerate(f, 1):
            r = parse_line(line, i)
            if isinstance(r, Record) and len(r.responses) == 2:
                sims.append(_cos(embedder.embed(list(r.responses))))
    if not sims:
        from ..errors import CdrError

        raise CdrError("--keep-dissimilar needs records with exactly two responses (chosen/rejected)")
    return float(np.percentile(sims, percent, method="lower"))


def _cos(e: Any) -> float:
    from ..pairs import cosine

    return cosine(e[0], e[1])


class _DissimilarTask:
    """REAL's selection over labelled pairs: keep the pairs at or below the similarity threshold."""

    def __init__(self, embedder: Any, threshold: float) -> None:
        self.embedder = embedder
        self.threshold = threshold

    def process(self, record: Any) -> tuple[dict[str, Any], dict[str, float]]:
        from ..pipeline import RecordError

        if len(record.responses) != 2:
            raise RecordError("skipped: --keep-dissimilar needs exactly two responses")
        sim = _cos(self.embedder.embed(list(record.responses)))
        if sim > self.threshold:
            raise RecordError(f"skipped: similarity {sim:.4f} above the kept share's threshold {self.threshold:.4f}")

        obj = {"id": record.id, "prompt": record.prompt_raw, "chosen": record.as_response(record.responses[0]),
               "rejected": record.as_response(record.responses[1]), "similarity": sim, "strategy": "keep-dissimilar"}
        return obj, {"similarity": sim}


def _print_skips(rejects_path: str | None) -> None:
    if not rejects_path or not Path(rejects_path).exists():
        return
    import collections
    import re

    import orjson
    from rich.console import Console

    reasons: collections.Counter[str] = collections.Counter()
    for line in Path(rejects_path).read_bytes().splitlines():
        if line.strip():
            r = str(orjson.loads(line).get("reason", ""))
            reasons[re.sub(r"[-+]?\d+\.\d+", "N", r)] += 1
    if reasons:
        c = Console(stderr=True, highlight=False)
        c.print("skipped or rejected, by reason:")
        for r, n in reasons.most_common():
            c.print(f"  {n:6d}  {r}")
