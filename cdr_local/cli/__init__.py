"""The ``cdr`` command line: a thin layer over the core, one module per command.

Heavy imports (llama_cpp, numpy, rich tables) happen inside the commands, so
``cdr --help`` stays fast.  User errors (:class:`CdrError`) print one line and
exit with code 2; no tracebacks.
"""

from __future__ import annotations

import signal
import sys

import typer

from ..errors import CdrError

app = typer.Typer(
    name="cdr",
    help="Offline preference annotation with a customized density ratio: "
    "reward(x, y) = log p_strong(y|x) - log p_weak(y|x), on local GGUF models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _register() -> None:
    from . import annotate, eval, lc, models, pairs, profiles, score, synth, winrate

    app.command("annotate")(annotate.annotate)
    app.command("eval")(eval.eval_)
    app.command("winrate")(winrate.winrate)
    app.command("lc")(lc.lc)
    app.command("pairs")(pairs.pairs)
    app.command("synth")(synth.synth)
    app.command("score")(score.score)
    app.add_typer(models.app, name="models")
    app.add_typer(profiles.app, name="profiles")


_register()


def _bare_ray(argv: list[str]) -> list[str]:
    """``--ray`` takes an optional ADDRESS: alone (last, or before another option) it becomes ``--ray=``."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--":
            break
        if a == "--ray" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = "--ray="
    return out


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (a job scheduler, ``timeout``, ``kill``) stops a run like Ctrl-C does."""
    raise KeyboardInterrupt


def main() -> None:
    sys.argv[1:] = _bare_ray(sys.argv[1:])
    # a clean stop: the output ends on a whole line and its sidecar says "interrupted"
    signal.signal(signal.SIGTERM, _terminate)
    try:
        # in non-standalone mode click *returns* the code of a typer.Exit
        # (and of Ctrl-C, as 130) instead of exiting with it
        rv = app(standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            sys.exit(rv)
    except CdrError as e:
        sys.stderr.write(f"cdr: error: {e.message}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("cdr: interrupted\n")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.stderr.write("cdr: aborted\n")
        sys.exit(130)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        from typer._click.exceptions import ClickException

        if isinstance(e, ClickException):
            # one line, like every other error: "cdr: error: ... (cdr annotate --help)"
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            msg = " ".join(e.format_message().split())
            sys.stderr.write(f"cdr: error: {msg}{hint}\n")
            sys.exit(e.exit_code)
        raise
