"""``cdr models list | check | pull | add``: the registry and the local model cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from .options import ModelsOpt

if TYPE_CHECKING:
    from ..models import ModelSpec, PairSide, Registry

app = typer.Typer(help="List, check, fetch and add the models of the registry (the shipped models.toml, the user's, "
                  "--models FILE: merged in this order).", no_args_is_help=True)

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


def _origin(reg: Registry, key: str) -> str:
    """Where a registry entry comes from, shortly: shipped, user, or the file."""
    from ..models import default_registry_path
    from ..paths import user_registry_path

    p = reg.origins.get(key)
    if p is None:
        return ""
    if p == default_registry_path().absolute():
        return "shipped"
    if p == user_registry_path().expanduser().absolute():
        return "user"
    return str(p)


@app.command("list", epilog=MODELS_FILE)
def list_(models: ModelsOpt = None, json_out: JsonOpt = False) -> None:
    """Models and pairs in the registry, where each comes from (shipped, user or a --models file), and whether each model is present."""
    from ..assembly import load_registry
    from ..models import is_present, model_path

    reg = load_registry(models)
    if json_out:
        import orjson

        def origin(key: str) -> str | None:
            p = reg.origins.get(key)
            return None if p is None else str(p)

        doc = {
            "registry": str(reg.path),
            "registries": [str(p) for p in reg.layers],
            "default_pair": reg.default_pair,
            "models": [{"name": m.name, "source": m.source_kind, "present": is_present(m), "path": str(model_path(m)),
                        "description": m.description, "registry": origin(f"models.{m.name}")} for m in reg.models.values()],
            "pairs": [{"name": pr.name, "default": pr.name == reg.default_pair,
                       "strong": {"model": pr.strong.model, "system": pr.strong.system},
                       "weak": {"model": pr.weak.model, "system": pr.weak.system},
                       "description": pr.description, "registry": origin(f"pairs.{pr.name}")} for pr in reg.pairs.values()],
        }
        typer.echo(orjson.dumps(doc).decode())
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"models ({reg.where})")
    for c in ("name", "source", "registry", "present", "path", "description"):
        t.add_column(c)
    for m in reg.models.values():
        t.add_row(m.name, m.source_kind, _origin(reg, f"models.{m.name}"), "yes" if is_present(m) else "no",
                  str(model_path(m)), m.description)
    p = Table(title="pairs")
    for c in ("name", "registry", "strong", "weak", "description"):
        p.add_column(c)
    for pr in reg.pairs.values():
        name = pr.name + (" (default)" if pr.name == reg.default_pair else "")
        p.add_row(name, _origin(reg, f"pairs.{pr.name}"), _side(pr.strong), _side(pr.weak), pr.description)
    console = Console()
    console.print(t)
    console.print(p)


def _side(s: PairSide) -> str:
    return s.model + (" + system prompt" if s.system else "")


@app.command("check", epilog=MODELS_FILE)
def check(names: NamesArg = None, pair: PairNamesOpt = None, all_: AllOpt = False, models: ModelsOpt = None) -> None:
    """Verify present models (sha256 and GGUF header). Exit 2 if any is missing or bad."""
    from ..assembly import load_registry
    from ..models import verify
    from ..ui import say

    reg = load_registry(models)
    bad = 0
    for spec in _select(reg, names, pair, all_):
        r = verify(spec, progress=say)
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
    from ..assembly import load_registry
    from ..models import pull as do_pull
    from ..ui import say

    reg = load_registry(models)
    for spec in _select(reg, names, pair, all_):
        path = do_pull(spec, progress=say, force=force)
        typer.echo(f"{spec.name}: {path}")


@app.command("add", epilog="Files: SRC is a file, not '-'; the user registry is $CDR_CONFIG, else $CDR_HOME/models.toml, "
             "else $XDG_CONFIG_HOME/cdr-local/models.toml (default ~/.config/cdr-local/models.toml).")
def add(
    name: Annotated[str, typer.Argument(help="The model's name (letters, digits, '.', '_', '-').")],
    src: Annotated[str, typer.Argument(help="A GGUF path (used in place), or a Hugging Face file: org/repo/file.gguf, "
                                        "or org/repo:QUANT (looked up now; needs the hub extra).")],
    description: Annotated[str | None, typer.Option("--description", help="A line for `cdr models list`.")] = None,
    sha256: Annotated[str | None, typer.Option("--sha256", help="Expected sha256 of the GGUF (checked before every use of a local file, after a download).")] = None,
    chat_template: Annotated[str | None, typer.Option("--chat-template", help="Template for a GGUF that carries none: chatml, llama3, gemma, zephyr, plain, or Jinja.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a model of that name (the user registry's, or override a shipped one).")] = False,
) -> None:
    """Add a model to the user registry (created if need be; the rest of it is kept); then --strong NAME, or a [pairs.X] of your own, can use it."""
    from ..models import add_model
    from ..ui import say

    path, spec = add_model(name, src, description=description, sha256=sha256, chat_template=chat_template, force=force,
                           progress=say)
    typer.echo(f"added model {spec.name} ({spec.source_label}) to {path}")
