"""``cdr score``: score one prompt and one or more responses, printed as a table or JSON."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import (
    GpuOpt,
    ModelsOpt,
    NBatchOpt,
    NCtxOpt,
    NoPullOpt,
    NUbatchOpt,
    PairChoice,
    PairOpt,
    StrongOpt,
    StrongSystemOpt,
    ThreadsOpt,
    WeakOpt,
    WeakSystemOpt,
)


def score(
    prompt: Annotated[str, typer.Option("--prompt", help="The user prompt.")],
    response: Annotated[list[str], typer.Option("--response", "-r", help="A response (repeat for several).")],
    system: Annotated[str | None, typer.Option("--system", help="A system message that is part of the record (both sides see it).")] = None,
    pair: PairOpt = None,
    strong: StrongOpt = None,
    weak: WeakOpt = None,
    strong_system: StrongSystemOpt = None,
    weak_system: WeakSystemOpt = None,
    models: ModelsOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the output record as JSON.")] = False,
    threads: ThreadsOpt = None,
    n_ctx: NCtxOpt = None,
    n_batch: NBatchOpt = None,
    n_ubatch: NUbatchOpt = None,
    n_gpu_layers: GpuOpt = None,
    no_pull: NoPullOpt = False,
) -> None:
    """Score one example: each response's reward, log-probs and token counts (--pair, or --strong SRC --weak SRC).

    The record is the one `cdr annotate` writes for {prompt, responses}, labelled with
    the pair's rule and calibration (as annotate does); the Python API's
    cdr_local.score() returns the same."""
    import orjson

    from ..api import Annotator
    from ..errors import CdrError
    from .options import engine_overrides

    choice = PairChoice(pair, strong, weak, strong_system, weak_system)
    choice.check()
    if not prompt.strip():
        raise CdrError("empty prompt")
    if any(not r.strip() for r in response):
        raise CdrError("empty response")
    engine = engine_overrides(threads, n_ctx, n_batch, n_ubatch, n_gpu_layers, False)
    with Annotator(pair, strong=strong, weak=weak, strong_system=strong_system, weak_system=weak_system, models=models,
                   pull=not no_pull, **engine) as a:
        out = a.score(prompt, response, id="cli", system=system)
        pair_name = a.pair.spec.name
    if json_out:
        typer.echo(orjson.dumps(out).decode())
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"pair {pair_name}: reward = log p_strong - log p_weak")
    for col in ("#", "reward", "reward_mean", "strong logp", "tok", "weak logp", "tok", "truncated", "response"):
        t.add_column(col, justify="right" if col not in ("response",) else "left")
    for i, s in enumerate(out["scores"]):
        text = response[i]
        t.add_row(
            str(i), f"{s['reward']:.3f}", f"{s['reward_mean']:.4f}", f"{s['strong_logprob']:.3f}", str(s["strong_tokens"]),
            f"{s['weak_logprob']:.3f}", str(s["weak_tokens"]), "yes" if s["truncated"] else "", text[:60] + ("..." if len(text) > 60 else ""),
        )
    Console().print(t)
    if len(response) >= 2:
        Console().print(f"label: {out['label']}  margin: {out['margin']:.3f}")
