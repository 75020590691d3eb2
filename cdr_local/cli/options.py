"""Options shared by several commands (engine settings, registry, pair)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

ModelsOpt = Annotated[
    Path | None,
    typer.Option("--models", envvar="CDR_MODELS", help="Model registry (TOML). Default: the shipped models.toml."),
]
PairOpt = Annotated[str | None, typer.Option("--pair", "-p", help="Pair name from the registry. Default: its default_pair.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads (default: [engine] n_threads; 0 = all cores).")]
NCtxOpt = Annotated[int | None, typer.Option("--n-ctx", help="Context window in tokens; longer records are truncated (and flagged).")]
NBatchOpt = Annotated[int | None, typer.Option("--n-batch", help="Tokens per llama_decode call.")]
NUbatchOpt = Annotated[int | None, typer.Option("--n-ubatch", help="Physical batch size.")]
GpuOpt = Annotated[int | None, typer.Option("--n-gpu-layers", help="Layers on the GPU (-1 = all; needs a CUDA build).")]
ParallelOpt = Annotated[
    bool,
    typer.Option(
        "--parallel-responses",
        help="Decode the responses of a record side by side (several sequences per decode). "
        "Faster on some machines, but a response's score then depends slightly on its sibling responses.",
    ),
]
NoPullOpt = Annotated[bool, typer.Option("--no-pull", help="Fail instead of fetching missing registry models.")]


def engine_overrides(threads: Any, n_ctx: Any, n_batch: Any, n_ubatch: Any, n_gpu_layers: Any, parallel: bool) -> dict[str, Any]:
    return {
        "n_threads": threads,
        "n_ctx": n_ctx,
        "n_batch": n_batch,
        "n_ubatch": n_ubatch,
        "n_gpu_layers": n_gpu_layers,
        "parallel_responses": parallel or None,
    }


def engine_settings(reg: Any, overrides: dict[str, Any]) -> Any:
    """models.toml's [engine] table plus command-line overrides; bad values are a ConfigError."""
    from ..errors import ConfigError
    from ..pair import settings_from

    try:
        return settings_from(reg, **overrides)
    except ValueError as e:
        msg = str(e)
        name = msg.split(" ", 1)[0]
        flag = _FLAGS.get(name)
        if flag and overrides.get(name) is not None:  # the value came from the command line
            msg = f"{flag} {msg.split(' ', 1)[1]}"
        elif flag:
            msg = f"{reg.path}: engine.{msg}"
        raise ConfigError(msg) from None


_FLAGS = {"n_ctx": "--n-ctx", "n_batch": "--n-batch", "n_ubatch": "--n-ubatch", "n_threads": "--threads",
          "n_gpu_layers": "--n-gpu-layers"}


def load_pair(models: Path | None, pair: str | None, overrides: dict[str, Any], no_pull: bool) -> Any:
    """Registry -> settings -> loaded pair, with user errors as CdrError."""
    from ..models import load_registry
    from ..pair import LoadedPair
    from ..ui import say

    reg = load_registry(models)
    return LoadedPair(reg, pair, engine_settings(reg, overrides), pull=not no_pull, say=say)

ProfileOpt = Annotated[
    str,
    typer.Option("--profile", help="Customization profile: a shipped name (none, cdr, cdr-fewshot), $CDR_HOME/profiles/NAME.toml, or a path."),
]
RouterOpt = Annotated[
    str | None,
    typer.Option("--router", help="Domain router: model (zero-shot with the strong model), keywords, or none. Default: model when the profile has several domains."),
]

RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="[ADDRESS]",
        help="Score on a Ray cluster (needs the ray extra): ADDRESS is the head's HOST:PORT, ray://HOST:PORT, "
        "'auto' (the cluster this machine has joined) or 'local' (a new private one); --ray alone: $RAY_ADDRESS, "
        "else a cluster started on this machine, else a new local one.  The output is the same as a local run's.",
    ),
]
RayActorsOpt = Annotated[
    int | None,
    typer.Option("--ray-actors", help="Ray actors (each loads the pair once). Default: one per node, or one per GPU with --n-gpu-layers."),
]
RayPartitionOpt = Annotated[
    int,
    typer.Option("--ray-partition-size", help="Input lines per Ray partition (the unit of work, of part files and of --resume)."),
]


def ray_options(address: str | None, actors: int | None, partition_size: int) -> Any:
    """``RayOptions`` for ``--ray`` (None without it); the actors' resources are set from the engine settings later."""
    if address is None:
        return None
    from ..distributed import RayOptions

    return RayOptions(address=address or None, actors=actors, partition_size=partition_size)

RuleOpt = Annotated[
    str | None,
    typer.Option(
        "--rule",
        help="Scoring rule that labels (NAME or NAME:key=value): cdr-sum, cdr-mean, cdr-offset, cdr-lc, cdr-beta, "
        "cdr-beta-mean, strong-sum, strong-mean, weak-sum, weak-mean, longer, shorter. Default: the pair's calibration's rule, else cdr-sum.",
    ),
]
CalibrationOpt = Annotated[
    Path | None,
    typer.Option("--calibration", help="Calibration JSON (from cdr eval --calibrate). Default: the one shipped for the pair, if any."),
]
MinConfidenceOpt = Annotated[
    float | None,
    typer.Option("--min-confidence", metavar="P", help="Keep only records whose confidence (P(label right)) is at least P; "
                 "the others go to OUT.abstained.jsonl (whole lines), counted in the summary."),
]
KeepTopOpt = Annotated[
    float | None,
    typer.Option("--keep-top", metavar="Q", help="Keep the most confident share Q of records (0 < Q <= 1): the threshold is the "
                 "calibration sample's, fixed before the run; the others go to OUT.abstained.jsonl."),
]
