"""What a command assembles before anything runs: the merged registry, the pair
(a registry pair, or two models given as --strong/--weak), the engine settings
(models.toml's [engine] plus overrides, with errors naming the flag or the key)
and Ray options.  No typer here: the CLI (``cli/groups.py``) and the Python API
(``cdr_local.api``) both build on these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import Registry


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
        from .errors import ConfigError

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
        from .models import with_byo_pair

        assert self.strong is not None and self.weak is not None
        return with_byo_pair(reg, self.strong, self.weak, self.strong_system, self.weak_system)


def pair_choice(pair: str | PairChoice | None) -> PairChoice:
    return pair if isinstance(pair, PairChoice) else PairChoice(pair)


def load_registry(models: Path | None) -> Registry:
    """The registry a command uses: shipped, user's, then --models / CDR_MODELS, merged."""
    from .models import load_merged_registry

    return load_merged_registry(models)


def registry_and_pair(models: Path | None, pair: str | PairChoice | None) -> tuple[Registry, str | None]:
    """The merged registry with the chosen pair, and that pair's name, checked before any model loads."""
    choice = pair_choice(pair)
    choice.check()
    return choice.resolve(load_registry(models))


def engine_settings(reg: Any, overrides: dict[str, Any]) -> Any:
    """models.toml's [engine] table plus command-line overrides; bad values are a ConfigError."""
    from .engine import EngineSettings
    from .errors import ConfigError
    from .pair import settings_from

    try:
        return settings_from(reg, **overrides)
    except ValueError as e:
        msg = str(e)
        name = msg.split(" ", 1)[0]
        flag = EngineSettings.FLAGS.get(name)
        if flag and overrides.get(name) is not None:  # the value came from the command line
            msg = f"{flag} {msg.split(' ', 1)[1]}"
        elif flag:
            msg = f"{reg.origins.get('engine.' + name, reg.path)}: engine.{msg}"
        raise ConfigError(msg) from None


def ray_options(address: str | None, actors: int | None, partition_size: int) -> Any:
    """``RayOptions`` for ``--ray`` (None without it); the actors' resources are set from the engine settings later."""
    if address is None:
        return None
    from .distributed import RayOptions

    return RayOptions(address=address or None, actors=actors, partition_size=partition_size)


def labelling(registry: Any, pair: str | None, rule: str | None, path: str | Path | None, min_confidence: float | None,
              keep_top: float | None, cfg: Any, *, method: str | None = None) -> Any:
    """Everything about how a run labels, settled before any model loads: the
    calibration (``path`` or the pair's shipped one), the rule it implies, and the
    abstain thresholds, which go into the run's config (hook, metadata, and the
    settings a resume must match).  Returns the calibration for the task."""
    from .calibration import abstain_rule, abstainer, resolve
    from .methods import DENSITY, parse_methods
    from .methods.density import rule_for

    cal = resolve(registry, pair, path)
    names = parse_methods(method)
    specs = {n: rule_for(n, rule, cal) for n in names if n in DENSITY}  # a bad --rule fails here, before any load
    first = names[0]
    spec = specs[first] if first in specs else rule_for("cdr", rule, cal)
    cut = abstain_rule(cal, spec.label() if first in DENSITY else first, min_confidence, keep_top)
    cfg.abstain = abstainer(cut)
    if cut:
        cfg.meta["abstain"] = cut
        cfg.numerics["abstain"] = cut
    return cal
