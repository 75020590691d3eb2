"""One run of a scoring command (annotate, eval, winrate): what the CLI and the
Python API (``cdr_local.api``) both call.

``ScoringOptions`` holds every option such a run takes, with the CLI's
defaults, in one place; ``run_scoring`` checks everything that needs no model
(files, flags, the resume checks, the registry and the pair), then loads the
pair once and streams the input through the pipeline (or Ray).
``eval_report`` turns an eval output into its report files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .assembly import PairChoice
    from .distributed import BuiltTask, RayOptions
    from .pipeline import RunSummary


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
    method: str | None = None  # methods.parse_methods: "cdr", "judge,cdr", ...

    def __call__(self) -> BuiltTask:
        from .annotate import AnnotateTask, make_router
        from .distributed import BuiltTask
        from .pair import LoadedPair
        from .ui import say

        lp = LoadedPair(self.registry, self.pair, self.settings, pull=self.pull, say=say)
        try:
            task = AnnotateTask(lp, self.profile, make_router(self.router, self.profile, lp), token_logprobs=self.token_logprobs,
                                rule=self.rule, calibration=self.calibration, method=self.method)
            return BuiltTask(task, {**lp.metadata(), **task.metadata()}, {**lp.numerics(), **task.numerics()}, lp.close)
        except BaseException:
            lp.close()
            raise


@dataclass
class ScoringOptions:
    """Everything a scoring run takes besides its input and output (CLI defaults)."""

    pair: str | PairChoice | None = None  # a registry pair name, or --strong/--weak
    models: Path | str | None = None  # a registry merged over the shipped and the user's
    profile: str = "none"
    router: str | None = None
    rule: str | None = None
    method: str | None = None  # scoring methods, the labelling one first (see cdr_local.methods)
    calibration: Path | str | None = None
    min_confidence: float | None = None
    keep_top: float | None = None
    resume: bool = False
    overwrite: bool = False
    force: bool = False
    rejects: str | None = None
    limit: int | None = None
    quiet: bool = False
    plain: bool = False
    engine: dict[str, Any] = field(default_factory=dict)  # n_threads, n_ctx, n_batch, n_ubatch, n_gpu_layers, parallel_responses
    pull: bool = True
    select: list[int] | None = None  # input lines to score, in this order (eval's --per-section)
    ray: RayOptions | None = None
    token_logprobs: bool = False
    also_writes: tuple[tuple[str, str], ...] = ()  # (what, path) of report files the run must not clobber


def run_scoring(command: str, input: str, output: str, opts: ScoringOptions) -> RunSummary:
    """Pair + profile + router through the pipeline (on Ray with ``opts.ray``).

    Everything that needs no model (files, flags, the resume checks that read
    only the sidecar and the input, the registry and the pair, --strong/--weak
    included) is checked before the pair is loaded.
    """
    from .assembly import engine_settings, labelling, pair_choice, registry_and_pair
    from .errors import CdrError
    from .pipeline import RunConfig, preflight, run
    from .profiles import load_profile
    from .records import parse_line
    from .ui import RunDisplay

    choice = pair_choice(opts.pair)
    choice.check()
    if opts.limit is not None and opts.limit < 0:
        raise CdrError("--limit must be 0 or more")
    cfg = RunConfig(input=input, output=output, resume=opts.resume, overwrite=opts.overwrite, force=opts.force,
                    rejects=opts.rejects, meta={"command": command, "input": input}, limit=opts.limit,
                    select=opts.select, also_writes=opts.also_writes)
    preflight(cfg)
    prof = load_profile(opts.profile)
    models = Path(opts.models) if opts.models is not None else None
    reg, pair = registry_and_pair(models, choice)
    calibration = Path(opts.calibration) if opts.calibration is not None else None
    cal = labelling(reg, pair, opts.rule, calibration, opts.min_confidence, opts.keep_top, cfg, method=opts.method)
    spec = ScoringSpec(reg, pair, engine_settings(reg, opts.engine), prof, opts.router, opts.pull, opts.token_logprobs,
                       opts.rule, cal, opts.method)
    display = RunDisplay(f"{command} [{reg.pair(pair).name}/{prof.name}]", quiet=opts.quiet, plain=True if opts.plain else None)
    if opts.ray is not None:
        from .distributed import run_on_ray

        return run_on_ray(cfg, parse_line, spec, opts.ray.for_settings(spec.settings), display)
    built = spec()
    try:
        cfg.meta.update(built.meta)
        cfg.numerics.update(built.numerics)
        return run(cfg, parse_line, built.task, display)
    finally:
        built.close()


def eval_sample(input: str, per_section: int | None, seed: int) -> list[int] | None:
    """The input lines ``--per-section N --seed S`` scores (None: all of them).  The
    sample needs a first pass, so the input must be a regular file."""
    if per_section is None:
        return None
    from .errors import CdrError
    from .evaluate import sample_lines
    from .files import is_regular

    if per_section < 1:
        raise CdrError("--per-section must be at least 1")
    if input == "-" or not is_regular(input):
        raise CdrError("--per-section needs the input as a regular file (it is read twice)")
    return sample_lines(input, per_section, seed)


def eval_paths(output: str, first: int | None, calibrate: bool) -> tuple[str, list[tuple[str, str]]]:
    """The report files of an eval output: its stem, and (what, path) of each."""
    stem = Path(output).with_suffix("").as_posix() + (f".first{first}" if first is not None else "")
    reports = [("report", stem + ".report.json"), ("plot", stem + ".report.png"), ("rewardbench results", stem + ".rewardbench.json")]
    if calibrate:
        reports.append(("calibration", stem + ".calibration.json"))
    return stem, reports


def eval_report(output: str, *, rule: str | None = None, method: str | None = None, rules: list[str] | None = None,
                bootstrap: int = 1000,
                first: int | None = None, calibrate: bool = False, models: Path | str | None = None,
                per_section: int | None = None, seed: int = 0) -> tuple[dict[str, Any], list[Any], str]:
    """The report of an eval output (every rule, length strata, selective accuracy),
    written to ``OUT.report.json`` and ``OUT.rewardbench.json`` (and, with
    ``calibrate``, the calibration ``OUT.calibration.json``).  ``first``: report on
    the output's first pairs only.  The report's main method: ``rule``, else the
    first of ``method`` (default: the methods the output was scored with), its
    rule for cdr.  Returns the report, the pairs and the file stem."""
    import orjson

    from .atomic import write_bytes_atomic
    from .errors import CdrError
    from .evaluate import MAIN, estimated_params, pairs_from_output, report

    stem, _ = eval_paths(output, first, calibrate)
    if not Path(output).exists():
        raise CdrError(f"no output to report on: {output}")
    meta_path = Path(output + ".meta.json")
    meta = orjson.loads(meta_path.read_bytes()) if meta_path.exists() else {}
    from .methods import DENSITY, METHODS, parse_methods

    extra_rules = list(rules or [])
    scored_with = (meta.get("method") or {}).get("names") or ["cdr"]
    labeller = parse_methods(method)[0] if method else scored_with[0]
    # the report's main entry: --rule; a density method's recorded rule (if it was scored
    # with it), else its default rule; any other method's own values
    recorded = (meta.get("rule") or {}).get("label")
    default_rule = METHODS[labeller].rule
    if rule:
        main = rule
    elif default_rule is None:
        main = labeller
    else:
        main = recorded if recorded and labeller in scored_with else default_rule
    try:
        if first is not None and first < 1:
            raise CdrError("--limit must be at least 1")
        pairs = pairs_from_output(output, limit=first, extra=[*extra_rules, *([main] if ":" in main else [])])
        if first is not None and len(pairs) < first:
            raise CdrError(f"{output} holds {len(pairs)} labelled pairs, fewer than --limit {first}")
        if pairs and main not in pairs[0].values:
            if labeller not in DENSITY and not rule:
                raise CdrError(f"{output} holds no {labeller} scores: score it with --method {labeller}")
            main = MAIN if MAIN in pairs[0].values else next(iter(pairs[0].values))
        rep = report(pairs, n_boot=bootstrap, seed=0)
    except ValueError as e:
        raise CdrError(str(e)) from None
    params = estimated_params(pairs)
    rep["main"] = main
    rep["rule_params"] = {"estimated_from": "these pairs, without their labels", **params}
    rep["pair"] = meta.get("pair")
    rep["models"] = {r: {"model": m.get("model"), "sha256": m.get("sha256")} for r, m in (meta.get("models") or {}).items()}
    rep["profile"] = (meta.get("profile") or {}).get("name")
    rep["router"] = meta.get("router")
    if first is not None:
        rep["first"] = first
    if calibrate:
        from . import calibration as C

        ident = meta.get("calibration_models")
        if not ident and meta.get("pair"):  # outputs of versions before calibrations: the registry knows the models
            from .models import load_registry

            try:
                ident = C.pair_identity(load_registry(Path(models) if models is not None else None), str(meta["pair"]))
            except CdrError:
                ident = {}
        cal = C.fit(pairs, params, pair=str(meta.get("pair")), models=ident or {},
                    rule=main, fitted_on={"output": output, "pairs": len(pairs), "sections": rep["sections"],
                                          "input": meta.get("input"), "input_sha256": meta.get("input_sha256"),
                                          "per_section": per_section, "seed": seed})
        write_bytes_atomic(Path(stem + ".calibration.json"), orjson.dumps(cal.to_json(), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        rep["calibration"] = {"path": stem + ".calibration.json", "rule": main, **cal.quality.get(main, {}),
                              "confidence": cal.confidence.get(main), "tau": cal.tau.get(main)}
    write_bytes_atomic(Path(stem + ".report.json"), orjson.dumps(rep, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    from .interop import rewardbench_results

    write_bytes_atomic(Path(stem + ".rewardbench.json"), orjson.dumps(rewardbench_results(rep, main), option=orjson.OPT_INDENT_2))
    return rep, pairs, stem
