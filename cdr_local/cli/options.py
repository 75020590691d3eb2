"""Options shared by several commands (engine settings, registry, pair)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from ..models import Registry

ModelsOpt = Annotated[
    Path | None,
    typer.Option("--models", envvar="CDR_MODELS", help="A registry (TOML) merged over the shipped models.toml and the "
                 "user's (~/.config/cdr-local/models.toml, or $CDR_HOME/models.toml): its models and pairs add to "
                 "theirs or replace those of the same name."),
]
PairOpt = Annotated[str | None, typer.Option("--pair", "-p", help="Pair name from the registry. Default: its default_pair.")]
_SRC = ("a GGUF path, a registry model name, or a Hugging Face file: org/repo:QUANT (the repo's one .gguf with QUANT "
        "in its name, as llama.cpp's -hf) or org/repo/file.gguf (needs the hub extra; used in place in the Hugging Face cache)")
StrongOpt = Annotated[str | None, typer.Option("--strong", metavar="SRC", help=f"Strong model, with --weak instead of --pair: {_SRC}.")]
WeakOpt = Annotated[str | None, typer.Option("--weak", metavar="SRC", help="Weak model, with --strong (same forms).")]
StrongSystemOpt = Annotated[str | None, typer.Option("--strong-system", metavar="TEXT", help="System prompt of the --strong side.")]
WeakSystemOpt = Annotated[str | None, typer.Option("--weak-system", metavar="TEXT", help="System prompt of the --weak side.")]


@dataclass(frozen=True)
class PairChoice:
    """Which pair a command scores with: ``--pair NAME`` (or the default pair), or
    ``--strong SRC --weak SRC`` (two models given on the command line)."""

    pair: str | None = None
    strong: str | None = None
    weak: str | None = None
    strong_system: str | None = None
    weak_system: str | None = None

    @property
    def byo(self) -> bool:
        return self.strong is not None or self.weak is not None

    def check(self) -> None:
        """Flag conflicts, before anything else is done."""
        from ..errors import ConfigError

        if self.byo and self.pair is not None:
            raise ConfigError("--pair and --strong/--weak exclude each other: name a registry pair, or two models")
        if self.byo and (self.strong is None or self.weak is None):
            given, missing = ("--strong", "--weak") if self.weak is None else ("--weak", "--strong")
            raise ConfigError(f"{given} needs {missing} too: a pair is two models (one model under two "
                              "system prompts: the same SRC twice, with --strong-system / --weak-system)")
        for flag, v, side in (("--strong-system", self.strong_system, self.strong),
                              ("--weak-system", self.weak_system, self.weak)):
            if v is not None and side is None:
                raise ConfigError(f"{flag} goes with --strong and --weak (a registry pair has its own system prompts)")

    def resolve(self, reg: Registry) -> tuple[Registry, str | None]:
        """``reg`` (with the --strong/--weak pair added) and the pair's name; an
        unknown --pair fails here.  Nothing is loaded or downloaded."""
        self.check()
        if not self.byo:
            reg.pair(self.pair)
            return reg, self.pair
        from ..models import with_byo_pair

        assert self.strong is not None and self.weak is not None
        return with_byo_pair(reg, self.strong, self.weak, self.strong_system, self.weak_system)


def pair_choice(pair: str | PairChoice | None) -> PairChoice:
    return pair if isinstance(pair, PairChoice) else PairChoice(pair)


def load_registry(models: Path | None) -> Registry:
    """The registry a command uses: shipped, user's, then --models / CDR_MODELS, merged."""
    from ..models import load_merged_registry

    return load_merged_registry(models)


def registry_and_pair(models: Path | None, pair: str | PairChoice | None) -> tuple[Registry, str | None]:
    """The merged registry with the chosen pair, and that pair's name, checked before any model loads."""
    choice = pair_choice(pair)
    choice.check()
    return choice.resolve(load_registry(models))

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
            msg = f"{reg.origins.get('engine.' + name, reg.path)}: engine.{msg}"
        raise ConfigError(msg) from None


_FLAGS = {"n_ctx": "--n-ctx", "n_batch": "--n-batch", "n_ubatch": "--n-ubatch", "n_threads": "--threads",
          "n_gpu_layers": "--n-gpu-layers"}


def load_pair(models: Path | None, pair: str | PairChoice | None, overrides: dict[str, Any], no_pull: bool) -> Any:
    """Registry -> pair -> settings -> loaded pair, with user errors as CdrError (all but the load before it)."""
    from ..pair import LoadedPair
    from ..ui import say

    reg, name = registry_and_pair(models, pair)
    return LoadedPair(reg, name, engine_settings(reg, overrides), pull=not no_pull, say=say)

ProfileOpt = Annotated[
    str,
    typer.Option("--profile", help="Customization profile: a shipped name (none, cdr, cdr-fewshot, cdr-paper: see cdr profiles list), $CDR_HOME/profiles/NAME.toml, or a path."),
]
RouterOpt = Annotated[
    str | None,
    typer.Option("--router", help="Domain router: model (the strong model's likeliest domain name), answer (the strong model answers [START]DOMAIN[END] greedily, else the default domain: the CDR authors' router), keywords, or none. Default: answer for a profile with its own router prompt (cdr-paper), model when the profile has several domains."),
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
