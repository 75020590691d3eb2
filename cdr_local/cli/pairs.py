"""``cdr pairs``: best-of-N responses to TRL preference pairs (CDR recipe, REAL selection)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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


@uses(PAIR, engine_options(), RAY)
def pairs(
    input: InputArg,
    output: Annotated[str, typer.Option("--output", "-o", help="TRL preference pairs (JSONL): prompt, chosen, rejected, margin + provenance.")],
    pair: PairChoice,
    strategy: Annotated[str, typer.Option("--strategy", "-s", help="best-random (CDR), best-worst, random (REAL's baseline), real-easy, real-hard, real-centroid.")] = "best-random",
    min_margin: Annotated[float | None, typer.Option("--min-margin", help="Keep only pairs with margin >= this.")] = None,
    keep_dissimilar: Annotated[float | None, typer.Option("--keep-dissimilar", metavar="PERCENT", help="Selection over labelled pairs: keep this percentage of the least similar chosen/rejected pairs (REAL's easy subset).")] = None,
    keep_similar: Annotated[float | None, typer.Option("--keep-similar", metavar="PERCENT", help="Keep this percentage of the most similar pairs (REAL's hard subset).")] = None,
    keep_random: Annotated[float | None, typer.Option("--keep-random", metavar="PERCENT", help="Keep a random subset of this percentage, seeded by --seed and each id (REAL's random subset; similarity still recorded).")] = None,
    embed_model: Annotated[str | None, typer.Option("--embed-model", metavar="SRC", help="Model for embeddings: a registry name, a GGUF path or a Hub reference, as --strong (default: the pair's strong model).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of best-random, random and --keep-random (combined with each record id).")] = 0,
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
    """Turn records with N responses into training pairs.

    Records with rewards (an annotate output) are used as they are; others are
    scored on the fly with the pair.  Skipped records (all rewards tie,
    identical texts, margin below --min-margin) go to the rejects file with the
    reason.  Output rows load with datasets.load_dataset("json", ...) and feed
    TRL's DPO / reward trainers (margin is TRL's margin column).
    """
    from ..assembly import engine_settings, registry_and_pair
    from ..errors import CdrError
    from ..files import is_regular
    from ..pairs import EMBEDS, STRATEGIES
    from ..pipeline import RunConfig, preflight, run
    from ..profiles import load_profile
    from ..records import parse_line
    from ..ui import RunDisplay

    pair.check()
    if strategy not in STRATEGIES:
        raise CdrError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    keeps = [(k, v) for k, v in (("dissimilar", keep_dissimilar), ("similar", keep_similar), ("random", keep_random)) if v is not None]
    if len(keeps) > 1:
        raise CdrError("give one of --keep-dissimilar, --keep-similar, --keep-random")
    keep = keeps[0] if keeps else None
    if keep is not None and not 0 < keep[1] <= 100:
        raise CdrError(f"--keep-{keep[0]} is a percentage in (0, 100]")
    if limit is not None and limit < 0:
        raise CdrError("--limit must be 0 or more")
    cfg = RunConfig(input=input, output=output, resume=resume, overwrite=overwrite, force=force, rejects=rejects,
                    meta={"command": "pairs", "input": input}, limit=limit)
    preflight(cfg)
    if keep is not None and (input == "-" or not is_regular(input)):
        raise CdrError(f"--keep-{keep[0]} reads the input twice (a first pass for its threshold): give it a file, not stdin or a pipe")
    if ray is not None and keep is not None:
        raise CdrError(f"--keep-{keep[0]} does not run on --ray (its threshold needs a first pass over the whole input)")
    reg, pair_name = registry_and_pair(models, pair)
    if embed_model is not None and (strategy in EMBEDS or keep is not None):
        from ..models import with_model

        reg, emb = with_model(reg, embed_model, flag="--embed-model")  # checked now, not after the pair has loaded
        embed_model = emb.name
    from ..assembly import labelling

    cal = labelling(reg, pair_name, rule, calibration, min_confidence, keep_top, cfg, method=method)
    # score on the fly only if some record lacks rewards: decided per record, but the
    # pair is loaded up front unless the input is an annotate output (has "scores";
    # for --method judge, scores with the judge's values)
    from ..methods import MEASURED, parse_methods

    first = parse_methods(method)[0]
    score = keep is None and not _looks_scored(input, first if first in MEASURED else None)
    mode = f"keep-{keep[0]}" if keep is not None else strategy
    spec = PairsSpec(
        reg, pair_name, engine_settings(reg, engine), load_profile(profile) if score else None, router, not no_pull,
        strategy, embed_model, min_margin, seed, keep, input, rule, cal, method,
    )
    display = RunDisplay(f"pairs [{mode}]", quiet=quiet, plain=True if plain else None)
    if ray is not None:
        from ..distributed import run_on_ray

        summary = run_on_ray(cfg, parse_line, spec, ray.for_settings(spec.settings), display)
    else:
        built = spec()
        try:
            cfg.meta.update(built.meta)
            cfg.numerics.update(built.numerics)
            summary = run(cfg, parse_line, built.task, display)
        finally:
            built.close()
    if not quiet:
        _print_skips(summary.rejects_path)
    if summary.interrupted:
        raise typer.Exit(130)
    from .common import require_scored
    require_scored(summary, resume=resume, limit=limit)  # exit 1: every line rejected, or none


@dataclass(frozen=True)
class PairsSpec:
    """What builds the pairs task (scorer, embedder, selection); picklable, so a
    Ray actor builds the same task on its node (see ``runs.ScoringSpec``)."""

    registry: Any
    pair: str | None
    settings: Any
    profile: Any  # loaded Profile when records are scored on the fly, else None
    router: str | None
    pull: bool
    strategy: str
    embed_model: str | None  # default: the pair's strong model
    min_margin: float | None
    seed: int
    keep: tuple[str, float] | None  # (selection, percent): --keep-dissimilar/-similar/-random
    input: str
    rule: str | None = None
    calibration: Any = None  # the resolved Calibration, or None
    method: str | None = None  # scoring methods (cdr_local.methods), the labelling one first

    def __call__(self) -> Any:
        from ..annotate import AnnotateTask, make_router
        from ..distributed import BuiltTask
        from ..embed import Embedder
        from ..models import resolve
        from ..pair import LoadedPair
        from ..pairs import EMBEDS
        from ..pairs_task import PairsTask
        from ..ui import say

        mode = f"keep-{self.keep[0]}" if self.keep is not None else self.strategy
        meta: dict[str, Any] = {"strategy": mode, "min_margin": self.min_margin, "seed": self.seed}
        numerics: dict[str, Any] = {"strategy": mode, "seed": self.seed, "min_margin": self.min_margin}
        closers: list[Any] = []
        try:
            lp = None
            if self.profile is not None:
                lp = LoadedPair(self.registry, self.pair, self.settings, pull=self.pull, say=say)
                closers.append(lp)
            embedder = None
            if self.strategy in EMBEDS or self.keep is not None:
                from ..engine import library_keys, load_model
                from ..engine.backends import DEFAULT_BACKEND
                from ..pair import model_sha256

                name = self.embed_model or self.registry.pair(self.pair).strong.model
                spec = self.registry.model(name)
                path = resolve(spec, pull=self.pull, progress=say)
                em = load_model(path, self.settings, name=name, backend=spec.backend, embeddings=True)
                closers.append(em)
                sha = model_sha256(spec, path)
                embedder = Embedder(em, sha)
                closers.append(embedder)
                emb = {"embed_model": name, "embed_model_sha256": sha, "embedding": "mean of final hidden states of the response alone"}
                if spec.backend != DEFAULT_BACKEND:
                    emb.update(library_keys(em, "embed"))
                meta.update(emb)
                numerics.update(emb)
            scorer = None
            if lp is not None:
                scorer = AnnotateTask(lp, self.profile, make_router(self.router, self.profile, lp), rule=self.rule,
                                      calibration=self.calibration, method=self.method)
                meta.update({**lp.metadata(), **scorer.metadata()})
                numerics.update({**lp.numerics(), **scorer.numerics()})
            task: Any
            if self.keep is not None:
                assert embedder is not None
                kind, percent = self.keep
                task = _SelectTask(kind, embedder, _threshold(self.input, embedder, kind, percent, self.seed), self.seed)
                meta[f"keep_{kind}_percent"] = percent
                numerics[f"keep_{kind}_percent"] = percent
            else:
                from ..calibration import Confidence
                from ..methods import MEASURED, parse_methods
                from ..rules import DEFAULT_RULE, parse_rule

                cal = self.calibration
                spec = parse_rule(self.rule or (cal.rule if cal else DEFAULT_RULE), cal.params if cal else None)
                first = parse_methods(self.method)[0]
                conf = cal.confidence_for(first if first in MEASURED else spec.label()) if cal else Confidence()
                task = PairsTask(self.strategy, scorer=scorer, embedder=embedder, min_margin=self.min_margin, seed=self.seed,
                                 rule=spec, confidence=conf, method=self.method)
                if scorer is None:
                    meta["rule"] = {"label": spec.label(), **spec.to_json()}
                    numerics["rule"] = spec.label()
                    numerics["rule.params"] = spec.to_json()["params"]
        except BaseException:
            for c in reversed(closers):
                c.close()
            raise

        def close() -> None:
            for c in reversed(closers):
                c.close()

        return BuiltTask(task, meta, numerics, close)


def _looks_scored(input: str, key: str | None = None) -> bool:
    """True if the first record carries rewards (an annotate output; with ``key``,
    scores that hold it).  Stdin and pipes are never peeked at (that would consume a
    line): the pair is loaded."""
    from ..files import is_regular

    if input == "-" or not is_regular(input):
        return False
    import orjson

    with open(input, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    return False
                sc = obj.get("scores") if isinstance(obj, dict) else None
                return isinstance(sc, list) and (key is None or all(isinstance(s, dict) and key in s for s in sc))
    return False


def _threshold(input: str, embedder: Any, kind: str, percent: float, seed: int) -> float:
    """The selection key (see ``pairs.selection_key``) at the given percentile over the
    chosen/rejected pairs of the input (a first pass; embeddings are cached)."""
    from ..pairs import keep_threshold, selection_key
    from ..records import Record, parse_line

    keys = []
    with open(input, "rb") as f:
        for i, line in enumerate(f, 1):
            r = parse_line(line, i)
            if isinstance(r, Record) and len(r.responses) == 2:
                keys.append(selection_key(kind, r.id, _cos(embedder.embed(list(r.responses))), seed))
    if not keys:
        from ..errors import CdrError

        raise CdrError(f"--keep-{kind} needs records with exactly two responses (chosen/rejected)")
    return keep_threshold(keys, percent)


def _cos(e: Any) -> float:
    from ..pairs import cosine

    return cosine(e[0], e[1])


class _SelectTask:
    """REAL's selection over labelled pairs: keep the pairs whose selection key lies at
    or below the threshold (the least similar, the most similar, or a random share)."""

    WHY = {"dissimilar": "similarity {sim:.4f} above", "similar": "similarity {sim:.4f} below",
           "random": "random draw {key:.4f} above"}

    def __init__(self, kind: str, embedder: Any, threshold: float, seed: int) -> None:
        self.kind = kind
        self.embedder = embedder
        self.threshold = threshold
        self.seed = seed

    def process(self, record: Any) -> tuple[dict[str, Any], dict[str, float]]:
        from ..pairs import selection_key
        from ..pipeline import RecordError

        if len(record.responses) != 2:
            raise RecordError(f"skipped: --keep-{self.kind} needs exactly two responses")
        sim = _cos(self.embedder.embed(list(record.responses)))
        key = selection_key(self.kind, record.id, sim, self.seed)
        if key > self.threshold:
            bound = -self.threshold if self.kind == "similar" else self.threshold
            raise RecordError(f"skipped: {self.WHY[self.kind].format(sim=sim, key=key)} the kept share's threshold {bound:.4f}")

        obj = {"id": record.id, "prompt": record.prompt_raw, "chosen": record.as_response(record.responses[0]),
               "rejected": record.as_response(record.responses[1]), "similarity": sim, "strategy": f"keep-{self.kind}"}
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
