"""Profiles: how the density ratio is customized per domain.

A profile is a TOML file that defines, per domain, a system prompt with the
criteria of a good answer and zero or more exemplars (user / good answer / bad
answer / why).  The router picks a domain per prompt; :func:`profile_messages`
turns the record's conversation into the messages that *both* models of the
pair read -- the same messages, so the ratio measures what the strong model
knows about the criteria beyond the weak one.

Shipped profiles live next to this file (``none``, ``cdr``, ``cdr-fewshot``);
users add their own as ``$CDR_HOME/profiles/NAME.toml`` or pass a path.
A profile may ``extends = "other"``: it inherits the other's domains and adds
its own keys and exemplars.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import orjson

from ..chat import Message
from ..errors import ConfigError
from ..paths import home_dir

SHIPPED_DIR = Path(__file__).resolve().parent
DOMAIN_KEYS = {"description", "keywords", "system", "exemplars"}
EXEMPLAR_KEYS = {"user", "good", "bad", "why"}


@dataclass(frozen=True)
class Exemplar:
    user: str
    good: str
    bad: str
    why: str = ""


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    system: str
    keywords: tuple[str, ...] = ()
    exemplars: tuple[Exemplar, ...] = ()

    def system_text(self) -> str:
        """Criteria, then the exemplars, as one system prompt (empty if neither)."""
        parts = [self.system.strip()] if self.system.strip() else []
        if self.exemplars:
            parts.append("Examples of a good and a bad answer:")
            for i, e in enumerate(self.exemplars, 1):
                block = f"Example {i}\nUser: {e.user}\nGood answer: {e.good}\nBad answer: {e.bad}"
                if e.why:
                    block += f"\nWhy: {e.why}"
                parts.append(block)
        return "\n\n".join(parts)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    default_domain: str
    domains: dict[str, Domain] = field(default_factory=dict)
    path: str = ""

    @property
    def sha256(self) -> str:
        """Hash of what the models read: changes whenever any criteria or exemplar does."""
        payload = orjson.dumps(
            [[d.name, d.system_text(), list(d.keywords), d.description] for d in self.domains.values()]
            + [self.default_domain]
        )
        return hashlib.sha256(payload).hexdigest()

    def domain(self, name: str | None) -> Domain:
        return self.domains[name if name in self.domains else self.default_domain]


def profile_messages(profile: Profile, domain: str | None, messages: Sequence[Message]) -> list[Message]:
    """The messages both models read: the domain's criteria and exemplars as a
    system message, then the record's conversation.  A record that has its own
    system message keeps it, after the profile's text."""
    text = profile.domain(domain).system_text()
    msgs = list(messages)
    if not text:
        return msgs
    if msgs and msgs[0].role == "system":
        return [Message("system", text + "\n\n" + msgs[0].content), *msgs[1:]]
    return [Message("system", text), *msgs]


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))


def _find(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.suffix == ".toml" and p.exists():
        return p
    for cand in (home_dir() / "profiles" / f"{name_or_path}.toml", SHIPPED_DIR / f"{name_or_path}.toml"):
        if cand.exists():
            return cand
    user = sorted(q.stem for q in (home_dir() / "profiles").glob("*.toml")) if (home_dir() / "profiles").exists() else []
    raise ConfigError(f"unknown profile {name_or_path!r}; shipped: {', '.join(shipped_profiles())}" + (f"; yours: {', '.join(user)}" if user else ""))


def _raw(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read profile {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"profile {path}: invalid TOML: {e}") from None


def load_profile(name_or_path: str = "none", _seen: tuple[str, ...] = ()) -> Profile:
    path = _find(name_or_path)
    data = _raw(path)
    where = str(path)
    unknown = set(data) - {"name", "description", "default_domain", "domains", "extends"}
    if unknown:
        raise ConfigError(f"profile {where}: unknown keys {', '.join(sorted(unknown))}")
    base: dict[str, Domain] = {}
    parent_default: str | None = None
    if "extends" in data:
        parent = str(data["extends"])
        if parent in _seen:
            raise ConfigError(f"profile {where}: 'extends' loops through {parent!r}")
        parent_profile = load_profile(parent, (*_seen, name_or_path))
        base = dict(parent_profile.domains)
        parent_default = parent_profile.default_domain
    raw_domains = data.get("domains", {})
    if not isinstance(raw_domains, dict):
        raise ConfigError(f"profile {where}: 'domains' must be a table")
    domains = dict(base)
    for dname, d in raw_domains.items():
        if not isinstance(d, dict):
            raise ConfigError(f"profile {where}: domains.{dname} must be a table")
        bad = set(d) - DOMAIN_KEYS
        if bad:
            raise ConfigError(f"profile {where}: domains.{dname}: unknown keys {', '.join(sorted(bad))}")
        prev = base.get(dname)
        exemplars = list(prev.exemplars) if prev else []
        for i, e in enumerate(d.get("exemplars", [])):
            if not isinstance(e, dict) or set(e) - EXEMPLAR_KEYS or not all(isinstance(e.get(k), str) for k in ("user", "good", "bad")):
                raise ConfigError(f"profile {where}: domains.{dname}.exemplars[{i}] needs strings user, good, bad (and optional why)")
            exemplars.append(Exemplar(e["user"], e["good"], e["bad"], str(e.get("why", ""))))
        system = d.get("system", prev.system if prev else "")
        desc = d.get("description", prev.description if prev else dname)
        kws = d.get("keywords", list(prev.keywords) if prev else [])
        if not isinstance(system, str) or not isinstance(desc, str) or not isinstance(kws, list):
            raise ConfigError(f"profile {where}: domains.{dname}: system/description must be strings, keywords a list")
        domains[dname] = Domain(dname, desc, system, tuple(str(k).lower() for k in kws), tuple(exemplars))
    if not domains:
        raise ConfigError(f"profile {where}: defines no domains")
    default = str(data.get("default_domain", parent_default or next(iter(domains))))
    if default not in domains:
        raise ConfigError(f"profile {where}: default_domain {default!r} is not one of its domains")
    return Profile(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        default_domain=default,
        domains=domains,
        path=where,
    )
