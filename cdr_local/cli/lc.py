"""``cdr lc``: length-debiased labels for an annotate output."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..atomic import write_bytes_atomic


def lc(
    input: Annotated[Path, typer.Argument(help="An annotate (or eval) output JSONL with two responses per record: a regular file, not '-' (it is read twice).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the records with lc_margin / lc_label (and lc_prob) added ('-' for stdout).")],
    tau: Annotated[float | None, typer.Option("--tau", help="Temperature of P = sigmoid(margin / tau) for prob / lc_prob (default: none written).")] = None,
) -> None:
    """What would each preference be at equal length?

    The density ratio is a sum over tokens, so its length bias is linear in the
    token difference.  Fits margin(first - second) = slope * (tokens(first) -
    tokens(second)) over the file itself by least squares (no labels needed; the
    margin is the rule the output was labelled with, tokens are the strong
    model's), and removes it from each margin: lc_margin = margin - slope *
    dtokens, lc_label its winner.  With --tau also prob and lc_prob.  The fit
    goes to OUT.lc.json (with -o -: only to the summary line, on stderr).
    """
    import orjson

    from ..errors import CdrError
    from ..files import check_distinct, check_writable_target, is_regular
    from ..locks import exclusive

    if tau is not None and tau <= 0:
        raise CdrError("--tau must be positive")
    if str(input) == "-":
        raise CdrError("cdr lc reads its input twice (fit, then rewrite): give it a file, not '-' (stdin)")
    if not input.exists():
        raise CdrError(f"input not found: {input}")
    if not is_regular(input):
        raise CdrError(f"cdr lc reads its input twice (fit, then rewrite): {input} must be a regular file")
    if str(output) == "-":
        fit, n, changed = _to_stdout(input, tau)
        typer.echo(_summary(fit, n, changed, "stdout"), err=True)
        return
    fit_path = Path(str(output) + ".lc.json")
    check_distinct([("input", input), ("output", output), ("fit report", fit_path)])
    for role, p in (("output", output), ("fit report", fit_path)):
        check_writable_target(role, p)
    with exclusive(output, "lc"):
        fit, n, changed = _length_control(input, output, tau)
        meta = {"slope_nats_per_token": fit.slope, "r2_length": fit.r2, "tau": tau, "records": n, "labels_changed": changed,
                "model": "margin(first - second) = slope * (strong tokens(first) - strong tokens(second)) + rest; lc_margin = rest"}
        write_bytes_atomic(fit_path, orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    typer.echo(_summary(fit, n, changed, str(output)))


def _length_control(input: Path, output: Path, tau: float | None) -> tuple[Any, int, int]:
    from ..errors import CdrError
    from ..lc import length_control_file

    try:
        return length_control_file(str(input), str(output), tau=tau)
    except ValueError as e:
        raise CdrError(str(e)) from None


def _to_stdout(input: Path, tau: float | None) -> tuple[Any, int, int]:
    """``-o -``: the records are written once, after the fit, so they can go to stdout.
    length_control_file writes a path (atomically): a private temporary file, copied out."""
    import shutil
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cdr-lc-") as d:
        tmp = Path(d) / "out.jsonl"
        res = _length_control(input, tmp, tau)
        with open(tmp, "rb") as f:
            shutil.copyfileobj(f, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    return res


def _summary(fit: Any, n: int, changed: int, where: str) -> str:
    return (f"length control: slope {fit.slope:+.4f} nats per token (length explains {100 * fit.r2:.0f}% of the margins' spread); "
            f"{changed} of {n} labels changed -> {where}")
