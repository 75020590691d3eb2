"""``cdr score``: score one prompt and one or more responses, printed as a table or JSON."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..assembly import PairChoice
from .groups import PAIR, engine_options, uses
from .options import (
    ModelsOpt,
    NoPullOpt,
)


@uses(PAIR, engine_options())
def score(
    prompt: Annotated[str, typer.Option("--prompt", help="The user prompt.")],
    response: Annotated[list[str], typer.Option("--response", "-r", help="A response (repeat for several).")],
    pair: PairChoice,
    system: Annotated[str | None, typer.Option("--system", help="A system message that is part of the record (both sides see it).")] = None,
    models: ModelsOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the output record as JSON.")] = False,
    no_pull: NoPullOpt = False,
    *,
    engine: dict[str, Any],
) -> None:
    """Score one example: each response's reward, log-probs and token counts (--pair, or --strong SRC --weak SRC).

    The record is the one `cdr annotate` writes for {prompt, responses}, labelled with
    the pair's rule and calibration (as annotate does); the Python API's
    cdr_local.score() returns the same."""
    import orjson

    from ..api import Annotator
    from ..errors import CdrError

    pair.check()
    if not prompt.strip():
        raise CdrError("empty prompt")
    if any(not r.strip() for r in response):
        raise CdrError("empty response")
    with Annotator(pair, models=models, pull=not no_pull, **engine) as a:
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
