"""``cdr models list | check | pull``: the registry and the local model cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from .options import ModelsOpt

if TYPE_CHECKING:
    from ..models import ModelSpec, PairSide, Registry

app = typer.Typer(help="List, check and fetch the models of the registry (models.toml).", no_args_is_help=True)

NamesArg = Annotated[list[str] | None, typer.Argument(help="Model names (default: the default pair's models).")]
PairNamesOpt = Annotated[str | None, typer.Option("--pair", "-p", help="The models of this pair.")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every model in the registry.")]


def _select(reg: Registry, names: list[str] | None, pair: str | None, all_: bool) -> list[ModelSpec]:
    if all_:
        return list(reg.models.values())
    if names:
        return [reg.model(n) for n in names]
    p = reg.pair(pair)
    out = [reg.model(p.strong.model)]
    if p.weak.model != p.strong.model:
        out.append(reg.model(p.weak.model))
    return out


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object (registry, models, pairs) instead of the tables.")]
MODELS_FILE = "Files: --models names a file, not '-' (a registry's relative paths resolve from its own folder)."


@app.command("list", epilog=MODELS_FILE)
def list_(models: ModelsOpt = None, json_out: JsonOpt = False) -> None:
    """Models and pairs in the registry, and whether each model is present."""
    from ..models import is_present, load_registry, model_path

    reg = load_registry(models)
    if json_out:
        import orjson

        doc = {
            "registry": str(reg.path),
            "default_pair": reg.default_pair,
            "models": [{"name": m.name, "source": m.source_kind, "present": is_present(m), "path": str(model_path(m)),
                        "description": m.description} for m in reg.models.values()],
            "pairs": [{"name": pr.name, "default": pr.name == reg.default_pair,
                       "strong": {"model": pr.strong.model, "system": pr.strong.system},
                       "weak": {"model": pr.weak.model, "system": pr.weak.system},
                       "description": pr.description} for pr in reg.pairs.values()],
        }
        typer.echo(orjson.dumps(doc).decode())
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"models ({reg.path})")
    for c in ("name", "source", "present", "path", "description"):
        t.add_column(c)
    for m in reg.models.values():
        t.add_row(m.name, m.source_kind, "yes" if is_present(m) else "no", str(model_path(m)), m.description)
    p = Table(title="pairs")
    for c in ("name", "strong", "weak", "description"):
        p.add_column(c)
    for pr in reg.pairs.values():
        name = pr.name + (" (default)" if pr.name == reg.default_pair else "")
        p.add_row(name, _side(pr.strong), _side(pr.weak), pr.description)
    console = Console()
    console.print(t)
    console.print(p)


def _side(s: PairSide) -> str:
    return s.model + (" + system prompt" if s.system else "")


@app.command("check", epilog=MODELS_FILE)
def check(names: NamesArg = None, pair: PairNamesOpt = None, all_: AllOpt = False, models: ModelsOpt = None) -> None:
    """Verify present models (sha256 and GGUF header). Exit 2 if any is missing or bad."""
    from ..models import load_registry, verify

    reg = load_registry(models)
    bad = 0
    for spec in _select(reg, names, pair, all_):
        r = verify(spec)
        typer.echo(f"{'ok ' if r.ok else 'BAD'} {spec.name}: {r.message}")
        bad += not r.ok
    if bad:
        raise typer.Exit(2)


@app.command("pull", epilog=MODELS_FILE)
def pull(
    names: NamesArg = None,
    pair: PairNamesOpt = None,
    all_: AllOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Download again even if present.")] = False,
    models: ModelsOpt = None,
) -> None:
    """Fetch models into the cache (CDR_CACHE_DIR or CDR_HOME/models), verifying sha256."""
    from ..models import load_registry
    from ..models import pull as do_pull
    from ..ui import say

    reg = load_registry(models)
    for spec in _select(reg, names, pair, all_):
        path = do_pull(spec, progress=say, force=force)
        typer.echo(f"{spec.name}: {path}")
