"""The ``cdr`` command line: a thin layer over the core, one module per command.

Heavy imports (llama_cpp, numpy, rich tables) happen inside the commands, so
``cdr --help`` stays fast.  User errors (:class:`CdrError`) print one line and
exit with code 2; no tracebacks.  Exit codes: 0 done, 1 nothing scored
(:class:`~.common.NothingScored`), 2 user error, 130 interrupted, 141 stdout
closed (``| head``).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import CdrError


class _StdoutClosed(Exception):
    """The reader of stdout went away (``cdr ... -o - | head``); not an OSError, so
    typer's own EPIPE handling (exit 1) does not take it."""


def _file_id(f: int | str) -> tuple[int, int] | None:
    """Device and inode of a file descriptor or a path (None if there is none)."""
    try:
        st = os.stat(f)
    except OSError:
        return None
    return st.st_dev, st.st_ino


_STDOUT_AT_START = _file_id(1)


def _rich_saw_a_closed_pipe(e: SystemExit) -> bool:
    """rich answers EPIPE itself (Console.on_broken_pipe): stdout onto devnull, then exit 1."""
    if e.code != 1 or _STDOUT_AT_START is None:
        return False
    now = _file_id(1)
    return now != _STDOUT_AT_START and now == _file_id(os.devnull)


class _Group(TyperGroup):
    """The root group: a closed stdout anywhere below it (a command's output, a table,
    a --help) becomes :class:`_StdoutClosed`."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:  # the root's eager options print here: --help, --version, --show-completion
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            raise _StdoutClosed from None

    def invoke(self, ctx: Any) -> Any:
        try:  # every command, and its --help, at any depth
            return super().invoke(ctx)
        except BrokenPipeError:
            raise _StdoutClosed from None
        except SystemExit as e:
            if _rich_saw_a_closed_pipe(e):
                raise _StdoutClosed from None
            raise


app = typer.Typer(
    name="cdr",
    cls=_Group,
    help="Offline preference annotation with a customized density ratio: "
    "reward(x, y) = log p_strong(y|x) - log p_weak(y|x), on local GGUF models.",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cdr-local {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


# Where '-' (stdin / stdout) works, and why not where it does not: the end of each command's --help.
_SETTINGS = ("--models{more} name files, not '-' (stdin carries the records; a registry's relative paths "
             "resolve from its own folder).")
_FILES = {
    "annotate": "Files: INPUT may be '-' (stdin) and --output '-' (stdout: then no sidecars, rejects go to stderr, "
                "and no --resume, --min-confidence or --keep-top); --rejects '-' is stderr. "
                + _SETTINGS.format(more=", --calibration and a --profile path"),
    "eval": "Files: INPUT may be '-' (stdin), except with --per-section (it reads the input twice); --output must be "
            "a file, not '-' (the reports are written next to it); --rejects '-' is stderr. "
            + _SETTINGS.format(more=", --calibration and a --profile path"),
    "pairs": "Files: INPUT may be '-' (stdin), except with --keep-dissimilar (it reads the input twice); --output "
             "may be '-' (stdout: then no sidecars, rejects go to stderr); --rejects '-' is stderr. "
             + _SETTINGS.format(more=", --calibration and a --profile path"),
    "synth": "Files: INPUT may be '-' (stdin), except with --per-section (it reads the input twice); --output may "
             "be '-' (stdout: then no sidecars and no --verify report, rejects go to stderr); --rejects '-' is "
             "stderr. " + _SETTINGS.format(more=" and --templates"),
    "score": "Files: none but the registry; the record is given on the command line. " + _SETTINGS.format(more=""),
    "winrate": "Files: --model, --baseline and --reference are files, not '-' (a model is named by its file; "
               "several are read); --output is a folder. " + _SETTINGS.format(more=" and --calibration"),
    "lc": "Files: INPUT must be a regular file, not '-' (it is read twice: fit, then rewrite); --output may be "
          "'-' (stdout: then no OUT.lc.json, the fit summary goes to stderr).",
}


def _register() -> None:
    from . import annotate, eval, lc, models, pairs, profiles, score, synth, winrate

    app.command("annotate", epilog=_FILES["annotate"])(annotate.annotate)
    app.command("eval", epilog=_FILES["eval"])(eval.eval_)
    app.command("winrate", epilog=_FILES["winrate"])(winrate.winrate)
    app.command("lc", epilog=_FILES["lc"])(lc.lc)
    app.command("pairs", epilog=_FILES["pairs"])(pairs.pairs)
    app.command("synth", epilog=_FILES["synth"])(synth.synth)
    app.command("score", epilog=_FILES["score"])(score.score)
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


def _stdout_closed() -> NoReturn:
    """Exit like a Unix tool killed by SIGPIPE (128 + 13), silently.  As the Python docs
    advise (signal, "Note on SIGPIPE"), stdout now points at devnull: the interpreter's
    last flush of what is still buffered must not fail again ("Exception ignored ...")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no stdout at all: nothing to flush either
        pass
    sys.exit(141)


def main() -> None:
    sys.argv[1:] = _bare_ray(sys.argv[1:])
    # a clean stop: the output ends on a whole line and its sidecar says "interrupted"
    signal.signal(signal.SIGTERM, _terminate)
    try:
        # in non-standalone mode click *returns* the code of a typer.Exit
        # (and of Ctrl-C, as 130) instead of exiting with it
        rv = app(standalone_mode=False, prog_name="cdr")
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            sys.exit(rv)
    except _StdoutClosed:
        _stdout_closed()
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
        from typer._click.exceptions import ClickException, NoArgsIsHelpError

        if isinstance(e, NoArgsIsHelpError):  # `cdr`, `cdr models`: the help, whole, as click prints it
            sys.stderr.write(e.format_message() + "\n")
            sys.exit(e.exit_code)
        if isinstance(e, ClickException):
            # one line, like every other error: "cdr: error: ... (cdr annotate --help)"
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            msg = " ".join(e.format_message().split())
            sys.stderr.write(f"cdr: error: {msg}{hint}\n")
            sys.exit(e.exit_code)
        raise
