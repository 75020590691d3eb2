"""``cdr synth``: RMBoost synthetic preference pairs from a local model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..atomic import write_bytes_atomic
from .annotate import ForceOpt, LimitOpt, OverwriteOpt, PlainOpt, QuietOpt, RejectsOpt, ResumeOpt
from .options import GpuOpt, ModelsOpt, NBatchOpt, NCtxOpt, NoPullOpt, NUbatchOpt, ThreadsOpt


def synth(
    input: Annotated[str, typer.Argument(help="Prompts JSONL ('-' for stdin): {prompt, id?}; a prompt may be a message list. Other fields pass through.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Pairs JSONL in TRL's preference format, with provenance.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Registry model that generates (default: the default pair's strong model).")] = None,
    verify: Annotated[str | None, typer.Option("--verify", help="A CDR pair that scores both responses and records whether it agrees with the intended label.")] = None,
    keep: Annotated[str, typer.Option("--keep", help="all: keep every pair; agree: only pairs the --verify pair agrees with.")] = "all",
    templates: Annotated[Path | None, typer.Option("--templates", help="Prompt templates TOML (default: the shipped cdr_local/synth.toml).")] = None,
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
    threads: ThreadsOpt = None,
    n_ctx: NCtxOpt = None,
    n_batch: NBatchOpt = None,
    n_ubatch: NUbatchOpt = None,
    n_gpu_layers: GpuOpt = None,
    no_pull: NoPullOpt = False,
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

    from ..engine.llama import LlamaModel
    from ..errors import CdrError
    from ..models import load_registry, resolve
    from ..pair import LoadedPair, model_sha256
    from ..pipeline import RunConfig, preflight, run
    from ..records import parse_prompt_line
    from ..scoring import ChatSide
    from ..synth import SynthTask, agreement_report, load_templates
    from ..ui import RunDisplay, say
    from .options import engine_overrides, engine_settings

    if keep not in ("all", "agree"):
        raise CdrError("--keep is 'all' or 'agree'")
    if keep == "agree" and verify is None:
        raise CdrError("--keep agree needs --verify PAIR")
    if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise CdrError("need --max-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    if limit is not None and limit < 0:
        raise CdrError("--limit must be 0 or more")
    report_path = output + ".synth-report.json" if verify is not None and output != "-" else None
    pre = RunConfig(input=input, output=output, resume=resume, overwrite=overwrite, force=force, rejects=rejects,
                    limit=limit, also_writes=(("report", report_path),) if report_path else ())
    if per_section is not None:
        from ..files import is_regular

        if input == "-" or not is_regular(input):
            raise CdrError("--per-section needs the input as a regular file (it is read twice)")
    preflight(pre)
    t = load_templates(templates)
    reg = load_registry(models)
    overrides = engine_overrides(threads, n_ctx, n_batch, n_ubatch, n_gpu_layers, False)
    settings = engine_settings(reg, overrides)
    name = model or reg.pair(None).strong.model
    spec = reg.model(name)
    path = resolve(spec, pull=not no_pull, progress=say)
    gen = LlamaModel(path, settings, name=name)
    verifier: LoadedPair | None = None
    try:
        side = ChatSide(gen, system=None, fallback_template=spec.chat_template)
        if verify is not None:
            verifier = LoadedPair(reg, verify, settings, pull=not no_pull, say=say)
        task = SynthTask(side, t, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, verifier=verifier, keep=keep)
        from ..engine.llama import library_version

        gen_meta: dict[str, Any] = {**task.generation_settings(), "model_sha256": model_sha256(spec, path)}
        meta: dict[str, Any] = {"command": "synth", "input": input, "generation": gen_meta, "keep": keep,
                                "engine": settings.to_json(), "llama_cpp_python": library_version()}
        numerics: dict[str, Any] = {**{f"generation.{k}": v for k, v in gen_meta.items()},
                                    "templates_sha256": _sha(t.path), **{f"engine.{k}": v for k, v in settings.to_json().items()},
                                    "llama_cpp_python": library_version()}
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
