"""``cdr lc``: length-debiased labels for an annotate output."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..atomic import write_bytes_atomic


def lc(
    input: Annotated[Path, typer.Argument(help="An annotate (or eval) output JSONL.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the records with lc_margin / lc_prob / lc_label added.")],
    tau: Annotated[float, typer.Option("--tau", help="Temperature of P = sigmoid(margin / tau).")] = 1.0,
) -> None:
    """What would each preference be at equal length?

    Fits AlpacaEval-LC's GLM to the run itself -- P(first response preferred) =
    sigmoid(theta + phi * tanh(dlen / std(dlen))), dlen = chars(second) - chars(first),
    soft labels sigmoid(margin / tau) -- and removes the length term from each
    margin: lc_margin = margin - tau * phi * tanh(dlen / std).  Writes prob, lc_margin,
    lc_prob, lc_label per two-response record; the fit goes to OUT.lc.json.
    """
    import orjson

    from ..errors import CdrError
    from ..lc import length_control_file

    if tau <= 0:
        raise CdrError("--tau must be positive")
    if not input.exists():
        raise CdrError(f"input not found: {input}")
    if input.resolve() == output.resolve():
        raise CdrError("write to a new file (-o), not over the input")
    try:
        fit, n = length_control_file(str(input), str(output), tau=tau)
    except ValueError as e:
        raise CdrError(str(e)) from None
    meta = {"theta": fit.theta, "phi": fit.phi, "std_dlen": fit.std_dlen, "tau": tau, "records": n,
            "model": "P(first preferred) = sigmoid(theta + phi * tanh((chars(second) - chars(first)) / std))"}
    write_bytes_atomic(Path(str(output) + ".lc.json"), orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    typer.echo(f"length control: phi = {fit.phi:+.4f} (theta {fit.theta:+.4f}, std(dlen) {fit.std_dlen:.0f} chars), {n} records -> {output}")
