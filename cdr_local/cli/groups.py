"""Option groups: options that several commands share, declared once and added to a
command by a decorator, which hands the command one value built from them.

    @uses(PAIR, engine_options(), RAY)
    def annotate(input: ..., pair: PairChoice, engine: dict[str, Any], ray: RayOptions | None, ...): ...

The command names a parameter after each group (``pair``, ``engine``, ``ray``);
the decorator puts the group's options in its place in the signature typer reads
(so ``--help`` lists them there, under the group's panel) and, when the command
runs, takes them out of the call and passes the group's value instead.  The
engine group is generated from :class:`~cdr_local.engine.EngineSettings`' fields
(flag, help, type), so a new engine setting is one field there.  As inspect_ai's
``_cli/common.py``, but for typer: no import here is heavy.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from .options import (
    PairOpt,
    RayActorsOpt,
    RayOpt,
    RayPartitionOpt,
    StrongOpt,
    StrongSystemOpt,
    WeakOpt,
    WeakSystemOpt,
)

F = TypeVar("F", bound=Callable[..., Any])
_KW = inspect.Parameter.KEYWORD_ONLY


@dataclass(frozen=True)
class OptionGroup:
    """Options declared once (``options``: parameters as typer reads them) and how the
    command's parameter ``name`` is built from their values (``build``, called with
    them as keyword arguments)."""

    name: str
    options: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, _KW, default=default, annotation=annotation)


def _pair_choice(**kw: Any) -> Any:
    from ..assembly import PairChoice

    return PairChoice(**kw)


#: ``--pair``, or ``--strong SRC --weak SRC`` (with their system prompts): a :class:`~cdr_local.assembly.PairChoice`
PAIR = OptionGroup("pair", (
    _option("pair", PairOpt, None),
    _option("strong", StrongOpt, None),
    _option("weak", WeakOpt, None),
    _option("strong_system", StrongSystemOpt, None),
    _option("weak_system", WeakSystemOpt, None),
), _pair_choice)


def _ray_options(ray: str | None, ray_actors: int | None, ray_partition_size: int) -> Any:
    from ..assembly import ray_options

    return ray_options(ray, ray_actors, ray_partition_size)


#: ``--ray [ADDRESS]``, ``--ray-actors``, ``--ray-partition-size``: ``RayOptions``, or None without --ray
RAY = OptionGroup("ray", (
    _option("ray", RayOpt, None),
    _option("ray_actors", RayActorsOpt, None),
    _option("ray_partition_size", RayPartitionOpt, 64),
), _ray_options)


def engine_options(*, opt_in: bool = False) -> OptionGroup:
    """The engine settings a command line may override, one option per
    :class:`~cdr_local.engine.EngineSettings` field that declares flags; the
    command gets ``engine``: ``{setting: value or None}`` (None: keep models.toml's).
    ``opt_in``: include the settings only some commands offer (``--parallel-responses``:
    only annotate decodes responses side by side)."""
    from dataclasses import fields
    from typing import get_type_hints

    from ..engine import EngineSettings

    hints = get_type_hints(EngineSettings)
    options = []
    for f in fields(EngineSettings):
        flags = f.metadata.get("flags")
        if not flags or (f.metadata["opt_in"] and not opt_in):
            continue
        kind = hints[f.name]
        info = typer.Option(*flags, help=f.metadata["help"], rich_help_panel="Engine")
        if kind is bool:
            options.append(_option(f.name, Annotated[bool, info], False))
        else:
            options.append(_option(f.name, Annotated[kind | None, info], None))

    def build(**kw: Any) -> dict[str, Any]:
        # a flag left off is None, not False: the registry's value stays
        return {k: (v if v is not False else None) for k, v in kw.items()}

    return OptionGroup("engine", tuple(options), build)


def uses(*groups: OptionGroup) -> Callable[[F], F]:
    """Give a command the options of ``groups``: each replaces the command's
    parameter of the group's name, whose value the group builds from them."""

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        by_name = {g.name: g for g in groups}
        missing = sorted(set(by_name) - set(sig.parameters))
        if missing:
            raise TypeError(f"{func.__name__} has no parameter for option group(s) {', '.join(missing)}")
        params: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            g = by_name.get(p.name)
            params.extend(g.options if g else (p,))
        # typer calls a command with keywords only: all keyword-only keeps the order (and --help's) as written
        new = sig.replace(parameters=[p.replace(kind=_KW) for p in params])

        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            for g in groups:
                kwargs[g.name] = g.build(**{o.name: kwargs.pop(o.name) for o in g.options})
            return func(*args, **kwargs)

        command.__signature__ = new  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in new.parameters.values()}
        if "return" in func.__annotations__:
            command.__annotations__["return"] = sig.return_annotation
        return command  # type: ignore[return-value]

    return decorate
