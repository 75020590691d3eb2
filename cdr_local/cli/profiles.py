"""``cdr profiles list | show``: the customization profiles and the exact messages they produce."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="List profiles, and show the exact messages a profile gives both models.", no_args_is_help=True)


@app.command("list")
def list_(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (the profiles) instead of the table.")] = False,
) -> None:
    """Shipped profiles and yours ($CDR_HOME/profiles/*.toml)."""
    from ..paths import home_dir
    from ..profiles import load_profile, shipped_profiles

    user_dir = home_dir() / "profiles"
    names = shipped_profiles() + (sorted(str(p) for p in user_dir.glob("*.toml")) if user_dir.exists() else [])
    profiles = [load_profile(n) for n in names]
    if json_out:
        import orjson

        doc = {"profiles": [{"name": p.name, "domains": list(p.domains),
                             "exemplars": sum(len(d.exemplars) for d in p.domains.values()),
                             "description": p.description, "file": p.path} for p in profiles]}
        typer.echo(orjson.dumps(doc).decode())
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="profiles")
    for c in ("name", "domains", "exemplars", "description", "file"):
        t.add_column(c)
    for p in profiles:
        t.add_row(p.name, ", ".join(p.domains), str(sum(len(d.exemplars) for d in p.domains.values())), p.description, p.path)
    Console().print(t)


@app.command("show", epilog="Files: NAME is a profile name or a .toml path, not '-' (a profile may extend others, found by name).")
def show(
    name: Annotated[str, typer.Argument(help="Profile name or path.")],
    prompt: Annotated[str, typer.Option("--prompt", help="A user prompt to render.")] = "<the user's prompt>",
    domain: Annotated[str | None, typer.Option("--domain", help="Domain (default: the profile's default).")] = None,
    record_id: Annotated[str, typer.Option("--id", help="The example record's id: it seeds the exemplar drawn for "
                                                        "profiles that put one exemplar in the user turn (cdr-paper).")] = "example",
    system: Annotated[str | None, typer.Option("--system", help="A system message of the example record's own "
                                                                "(shows whether the profile keeps or replaces it).")] = None,
    router: Annotated[str | None, typer.Option("--router", help="Instead: the messages that router reads to pick the domain "
                                                                "(model or answer).")] = None,
) -> None:
    """Print, as JSON, the messages both models read for a prompt in a domain
    (with --router, the messages the router reads instead)."""
    import orjson

    from ..chat import Message
    from ..errors import CdrError
    from ..profiles import load_profile, profile_messages

    p = load_profile(name)
    if domain is not None and domain not in p.domains:
        raise CdrError(f"profile {p.name!r} has no domain {domain!r} ({', '.join(p.domains)})")
    record = ([Message("system", system)] if system is not None else []) + [Message("user", prompt)]
    if router is not None:
        from ..router import answer_messages, classification_messages

        if router not in ("model", "answer"):
            raise CdrError("--router shows the prompt of the model or the answer router (the others read no prompt)")
        msgs = (answer_messages if router == "answer" else classification_messages)(p, record)
    else:
        msgs = profile_messages(p, domain, record, record_id)
    typer.echo(orjson.dumps([m.to_dict() for m in msgs], option=orjson.OPT_INDENT_2).decode())
