"""``cdr synth``: RMBoost synthetic preference pairs from a local model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..atomic import write_bytes_atomic
from .groups import engine_options, uses
from .options import (
    ForceOpt,
    LimitOpt,
    ModelsOpt,
    NoPullOpt,
    OverwriteOpt,
    PlainOpt,
    QuietOpt,
    RejectsOpt,
    ResumeOpt,
    StrongSystemOpt,
    WeakSystemOpt,
)

_STRONG = Annotated[str | None, typer.Option("--strong", metavar="SRC", help="The model that generates, like --model; with --weak "
                                              "also the strong side of the pair that verifies (instead of --verify PAIR).")]
_WEAK = Annotated[str | None, typer.Option("--weak", metavar="SRC", help="With --strong: the weak side of the pair that verifies "
                                            "(same forms as --model).")]


@uses(engine_options())
def synth(
    input: Annotated[str, typer.Argument(help="Prompts JSONL ('-' for stdin): {prompt, id?}; a prompt may be a message list. Other fields pass through.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Pairs JSONL in TRL's preference format, with provenance.")],
    model: Annotated[str | None, typer.Option("--model", "-m", metavar="SRC", help="The model that generates: a registry name, a GGUF path, or a Hugging Face file "
                                              "(org/repo:QUANT or org/repo/file.gguf; hub extra). Default: --strong, else the default pair's strong model.")] = None,
    verify: Annotated[str | None, typer.Option("--verify", help="A CDR pair that scores both responses and records whether it agrees with the intended label.")] = None,
    strong: _STRONG = None,
    weak: _WEAK = None,
    strong_system: StrongSystemOpt = None,
    weak_system: WeakSystemOpt = None,
    keep: Annotated[str, typer.Option("--keep", help="all: keep every pair; agree: only pairs the --verify pair agrees with.")] = "all",
    template: Annotated[str | None, typer.Option("--template", help="A shipped prompt template: rmboost (the default: the paper's "
                                                 "guideline + edit + <response> tags) or rewrite (the earlier variant); or a TOML file.")] = None,
    templates: Annotated[Path | None, typer.Option("--templates", help="A prompt templates TOML file (copy one from cdr_local/synth_templates/).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Longest response, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature (0 = greedy).")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 0.95,
    seed: Annotated[int, typer.Option("--seed", help="Global seed; each record's seeds derive from it and the record id.")] = 0,
    per_section: Annotated[int | None, typer.Option("--per-section", help="Use a seeded stratified sample of this many prompts per section (like cdr eval).")] = None,
    models: ModelsOpt = None,
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
) -> None:
    """Generate response 1, draw the label and aspects, then generate response 2
    conditioned on response 1, the label and the aspects (RMBoost).

    Seeded per record, streaming and resumable like annotate.  With --verify,
    reports how often the density ratio agrees with the intended labels,
    overall and per aspect (also in OUT.synth-report.json).
    """
    import dataclasses

    import orjson
    from rich.console import Console
    from rich.table import Table

    from ..assembly import PairChoice, engine_settings, load_registry
    from ..engine import LanguageModel, library_keys, load_model
    from ..errors import CdrError
    from ..models import resolve, with_model
    from ..pair import LoadedPair, model_sha256
    from ..pipeline import RunConfig, preflight, run
    from ..records import parse_prompt_line
    from ..scoring import ChatSide
    from ..synth import SynthTask, agreement_report, load_templates
    from ..ui import RunDisplay, say

    if model is not None and strong is not None:
        raise CdrError("--model and --strong both name the model that generates: give one")
    if weak is not None and strong is None:
        raise CdrError("--weak needs --strong: together they are the pair that verifies")
    if weak is not None and verify is not None:
        raise CdrError("--verify PAIR and --strong/--weak exclude each other: name one pair that verifies")
    if (strong_system is not None or weak_system is not None) and weak is None:
        raise CdrError("--strong-system / --weak-system are the system prompts of the --strong/--weak pair that verifies: they need --weak")
    verifying = verify is not None or weak is not None
    if keep not in ("all", "agree"):
        raise CdrError("--keep is 'all' or 'agree'")
    if keep == "agree" and not verifying:
        raise CdrError("--keep agree needs --verify PAIR (or --strong SRC --weak SRC)")
    if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise CdrError("need --max-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    if limit is not None and limit < 0:
        raise CdrError("--limit must be 0 or more")
    if template is not None and templates is not None:
        raise CdrError("--template and --templates both name the prompt template: give one")
    report_path = output + ".synth-report.json" if verifying and output != "-" else None
    pre = RunConfig(input=input, output=output, resume=resume, overwrite=overwrite, force=force, rejects=rejects,
                    limit=limit, also_writes=(("report", report_path),) if report_path else ())
    if per_section is not None:
        from ..files import is_regular

        if input == "-" or not is_regular(input):
            raise CdrError("--per-section needs the input as a regular file (it is read twice)")
    preflight(pre)
    t = load_templates(templates if templates is not None else template)
    # the registry, the pair that verifies and the generator, all before any model loads
    reg = load_registry(models)
    if weak is not None:
        reg, verify = PairChoice(None, strong, weak, strong_system, weak_system).resolve(reg)
        assert verify is not None
        spec = reg.model(reg.pair(verify).strong.model)
    elif model is not None or strong is not None:
        src = model if model is not None else strong
        assert src is not None
        reg, spec = with_model(reg, src, flag="--model" if model is not None else "--strong")
    else:
        spec = reg.model(reg.pair(None).strong.model)
    if verify is not None:
        reg.pair(verify)
    name = spec.name
    settings = engine_settings(reg, engine)
    path = resolve(spec, pull=not no_pull, progress=say)
    gen_sha = model_sha256(spec, path, say)
    verifier: LoadedPair | None = None
    gen: LanguageModel | None = None
    try:
        if verify is not None:  # its files are resolved (and both its models loaded) before the generator loads
            verifier = LoadedPair(reg, verify, settings, pull=not no_pull, say=say)
        gen = load_model(path, settings, name=name, backend=spec.backend)
        side = ChatSide(gen, system=None, fallback_template=spec.chat_template)
        task = SynthTask(side, t, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, verifier=verifier, keep=keep)
        gen_meta: dict[str, Any] = {**task.generation_settings(), "model_sha256": gen_sha}
        meta: dict[str, Any] = {"command": "synth", "input": input, "generation": gen_meta, "keep": keep,
                                "engine": settings.to_json(), **library_keys(gen, "generator")}
        numerics: dict[str, Any] = {**{f"generation.{k}": v for k, v in gen_meta.items()},
                                    "templates_sha256": _sha(t.path), **{f"engine.{k}": v for k, v in settings.to_json().items()},
                                    **library_keys(gen, "generator")}
        if verifier is not None:
            meta.update({"verify": verifier.metadata()})
            numerics.update({f"verify.{k}": v for k, v in verifier.numerics().items()})
        cfg = dataclasses.replace(pre, meta=meta, numerics=numerics)
        if per_section is not None:
            from ..evaluate import sample_lines

            cfg.select = sample_lines(input, per_section, seed)
        display = RunDisplay(f"synth [{name}]", quiet=quiet, plain=True if plain else None)
        summary = run(cfg, parse_prompt_line, task, display)
    finally:
        if verifier is not None:
            verifier.close()
        if gen is not None:
            gen.close()
    if verify is not None and output != "-":
        rep = agreement_report(output, summary.rejects_path)
        assert report_path is not None
        write_bytes_atomic(Path(report_path), orjson.dumps(rep, option=orjson.OPT_INDENT_2))
        if not quiet:
            tab = Table(title=f"agreement of {verify} with the intended labels", title_justify="left")
            for c in ("group", "agree", "n", "rate"):
                tab.add_column(c, justify="left" if c == "group" else "right")
            rows = [("overall", rep["overall"])] + [(f"aspect: {k}", v) for k, v in rep["per_aspect"].items()] + [
                (f"label: {k}", v) for k, v in rep["per_label"].items()]
            for g, v in rows:
                tab.add_row(g, str(v["agree"]), str(v["n"]), "-" if v["rate"] is None else f"{100 * v['rate']:.1f}%")
            Console(stderr=True, highlight=False).print(tab)
    if summary.interrupted:
        raise typer.Exit(130)
    from .common import require_scored
    require_scored(summary, resume=resume, limit=limit)  # exit 1: every line rejected, or none


def _sha(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
