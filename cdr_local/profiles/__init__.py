"""Profiles: how the density ratio is customized per domain.

A profile is a TOML file that defines, per domain, a system prompt with the
criteria of a good answer and zero or more exemplars (user / good answer / bad
answer / why).  The router picks a domain per prompt; :func:`profile_messages`
turns the record's conversation into the messages that *both* models of the
pair read -- the same messages, so the ratio measures what the strong model
knows about the criteria beyond the weak one.

Shipped profiles live next to this file (``none``, ``cdr``, ``cdr-fewshot``,
``cdr-paper``); users add their own as ``$CDR_HOME/profiles/NAME.toml`` or pass a
path.  A profile may ``extends = "other"``: it inherits the other's domains and
adds its own keys and exemplars.

Where the text goes is part of the profile:

* ``exemplar_placement = "system"`` (a domain's default): the criteria and *all*
  the exemplars form one system message (``none``, ``cdr``, ``cdr-fewshot``).
* ``exemplar_placement = "user"``: *one* exemplar, drawn from the domain's pool
  per record (seeded by the record id: reruns and resumes draw the same one), goes
  into the conversation's last user turn, laid out by the domain's ``user_turn``
  (default ``"{exemplar}\n{query}\nGood Assistant:"``: the exemplar, the query,
  then a cue), as the CDR authors' ``fs_domain_icl`` recipe does (``cdr-paper``).
* ``record_system = "keep"`` (a profile's default): a record's own system message
  is kept, after the domain's criteria.  ``"replace"``: the domain's ``system``
  text replaces it (an empty ``system`` gives an empty system message, as the
  authors' ``vanilla_domain`` recipe does); a domain with neither criteria nor
  exemplars leaves the record untouched either way (the authors' CHAT).
"""

from __future__ import annotations

import hashlib
import random
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
DOMAIN_KEYS = {"description", "keywords", "system", "exemplars", "exemplar_placement", "user_turn"}
EXEMPLAR_KEYS = {"user", "good", "bad", "why"}
PROFILE_KEYS = {"name", "description", "default_domain", "domains", "extends", "record_system", "router_prompt"}
PLACEMENTS = ("system", "user")
RECORD_SYSTEM = ("keep", "replace")
# the CDR authors' layout of the last user turn (scripts/run_bon_scoring.py, fs_* prompts)
DEFAULT_USER_TURN = "{exemplar}\n{query}\nGood Assistant:"


@dataclass(frozen=True)
class Exemplar:
    user: str
    good: str
    bad: str
    why: str = ""
    text: str = ""  # a verbatim block (instead of user / good / bad / why)

    def user_block(self) -> str:
        """The exemplar as it goes into a user turn: verbatim ``text``, else the
        authors' layout (``User:`` / ``Good Assistant:`` / ``Bad Assistant:`` /
        ``Explanation:`` blocks, then ``User:`` for the query that follows)."""
        if self.text:
            return self.text
        block = f"User:\n{self.user}\n\nGood Assistant:\n{self.good}\n\nBad Assistant:\n{self.bad}\n\n"
        if self.why:
            block += f"Explanation:\n{self.why}\n\n"
        return block + "User:"


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    system: str
    keywords: tuple[str, ...] = ()
    exemplars: tuple[Exemplar, ...] = ()
    exemplar_placement: str = "system"
    user_turn: str = DEFAULT_USER_TURN

    @property
    def customized(self) -> bool:
        """Whether the domain changes what the models read at all."""
        return bool(self.system.strip() or self.exemplars)

    def system_text(self) -> str:
        """Criteria, then (placement "system") the exemplars, as one system prompt (empty if neither)."""
        parts = [self.system.strip()] if self.system.strip() else []
        if self.exemplars and self.exemplar_placement == "system":
            parts.append("Examples of a good and a bad answer:")
            for i, e in enumerate(self.exemplars, 1):
                if e.text:
                    parts.append(f"Example {i}\n{e.text}")
                    continue
                block = f"Example {i}\nUser: {e.user}\nGood answer: {e.good}\nBad answer: {e.bad}"
                if e.why:
                    block += f"\nWhy: {e.why}"
                parts.append(block)
        return "\n\n".join(parts)

    def draw(self, record_id: str) -> int:
        """Index of the exemplar a record gets (placement "user"), seeded by the record id."""
        h = hashlib.sha256(f"exemplar:{self.name}:{record_id}".encode()).digest()
        return random.Random(int.from_bytes(h[:8], "little")).randrange(len(self.exemplars))

    def user_text(self, query: str, record_id: str) -> str:
        """The last user turn for placement "user": the drawn exemplar, the query, the cue."""
        return self.user_turn.format(exemplar=self.exemplars[self.draw(record_id)].user_block(), query=query)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    default_domain: str
    domains: dict[str, Domain] = field(default_factory=dict)
    path: str = ""
    record_system: str = "keep"
    router_prompt: str = ""  # the answer router's prompt ("" = built from the domains)

    @property
    def sha256(self) -> str:
        """Hash of what the models read: changes whenever any criteria or exemplar does.

        Profiles that use none of the placement keys hash exactly as before they existed."""
        rows: list[Any] = []
        for d in self.domains.values():
            row: list[Any] = [d.name, d.system_text(), list(d.keywords), d.description]
            if d.exemplar_placement != "system":
                row.append({"placement": d.exemplar_placement, "user_turn": d.user_turn,
                            "pool": [e.user_block() for e in d.exemplars]})
            rows.append(row)
        extra = {k: v for k, v in (("record_system", self.record_system), ("router_prompt", self.router_prompt))
                 if v and v != "keep"}
        payload = orjson.dumps(rows + [self.default_domain] + ([extra] if extra else []))
        return hashlib.sha256(payload).hexdigest()

    def domain(self, name: str | None) -> Domain:
        return self.domains[name if name in self.domains else self.default_domain]


def profile_messages(profile: Profile, domain: str | None, messages: Sequence[Message],
                     record_id: str | None = None) -> list[Message]:
    """The messages both models read.

    Placement "system": the domain's criteria and exemplars as a system message,
    then the record's conversation.  Placement "user": the last user turn becomes
    the domain's ``user_turn`` with one exemplar drawn for ``record_id`` (without
    an id, the draw is seeded by the conversation itself).  ``record_system``
    "keep": a record's own system message is kept, after the profile's text;
    "replace": the domain's system text replaces it."""
    d = profile.domain(domain)
    msgs = list(messages)
    if d.exemplar_placement == "user" and d.exemplars:
        last = max((i for i, m in enumerate(msgs) if m.role == "user"), default=None)
        if last is not None:
            rid = record_id if record_id is not None else _conversation_key(msgs)
            msgs[last] = Message("user", d.user_text(msgs[last].content, rid))
    text = d.system_text()
    if profile.record_system == "replace":
        if not d.customized:
            return msgs
        rest = msgs[1:] if msgs and msgs[0].role == "system" else msgs
        return [Message("system", text), *rest]
    if not text:
        return msgs
    if msgs and msgs[0].role == "system":
        return [Message("system", text + "\n\n" + msgs[0].content), *msgs[1:]]
    return [Message("system", text), *msgs]


def _conversation_key(messages: Sequence[Message]) -> str:
    return hashlib.sha256(orjson.dumps([[m.role, m.content] for m in messages])).hexdigest()[:16]


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
    unknown = set(data) - PROFILE_KEYS
    if unknown:
        raise ConfigError(f"profile {where}: unknown keys {', '.join(sorted(unknown))}")
    base: dict[str, Domain] = {}
    parent_default: str | None = None
    parent_profile: Profile | None = None
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
        raw_exemplars = d.get("exemplars", [])
        if not isinstance(raw_exemplars, list):
            raise ConfigError(f"profile {where}: domains.{dname}.exemplars must be an array of tables")
        for i, e in enumerate(raw_exemplars):
            if isinstance(e, dict) and set(e) == {"text"} and isinstance(e["text"], str) and e["text"].strip():
                exemplars.append(Exemplar("", "", "", "", e["text"]))
                continue
            if not isinstance(e, dict) or set(e) - EXEMPLAR_KEYS or not all(isinstance(e.get(k), str) for k in ("user", "good", "bad")):
                raise ConfigError(f"profile {where}: domains.{dname}.exemplars[{i}] needs strings user, good, bad (and optional why), "
                                  "or one non-empty string text")
            exemplars.append(Exemplar(e["user"], e["good"], e["bad"], str(e.get("why", ""))))
        system = d.get("system", prev.system if prev else "")
        desc = d.get("description", prev.description if prev else dname)
        kws = d.get("keywords", list(prev.keywords) if prev else [])
        if not isinstance(system, str) or not isinstance(desc, str) or not isinstance(kws, list):
            raise ConfigError(f"profile {where}: domains.{dname}: system/description must be strings, keywords a list")
        placement = d.get("exemplar_placement", prev.exemplar_placement if prev else "system")
        if placement not in PLACEMENTS:
            raise ConfigError(f"profile {where}: domains.{dname}: exemplar_placement must be one of {', '.join(PLACEMENTS)}")
        user_turn = d.get("user_turn", prev.user_turn if prev else DEFAULT_USER_TURN)
        if not isinstance(user_turn, str):
            raise ConfigError(f"profile {where}: domains.{dname}: user_turn must be a string")
        _check_user_turn(user_turn, f"profile {where}: domains.{dname}: user_turn")
        domains[dname] = Domain(dname, desc, system, tuple(str(k).lower() for k in kws), tuple(exemplars), placement, user_turn)
    if not domains:
        raise ConfigError(f"profile {where}: defines no domains")
    default = str(data.get("default_domain", parent_default or next(iter(domains))))
    if default not in domains:
        raise ConfigError(f"profile {where}: default_domain {default!r} is not one of its domains")
    record_system = data.get("record_system", parent_profile.record_system if parent_profile else "keep")
    if record_system not in RECORD_SYSTEM:
        raise ConfigError(f"profile {where}: record_system must be one of {', '.join(RECORD_SYSTEM)}")
    router_prompt = data.get("router_prompt", parent_profile.router_prompt if parent_profile else "")
    if not isinstance(router_prompt, str):
        raise ConfigError(f"profile {where}: router_prompt must be a string")
    return Profile(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        default_domain=default,
        domains=domains,
        path=where,
        record_system=str(record_system),
        router_prompt=router_prompt,
    )


def _check_user_turn(template: str, where: str) -> None:
    """``user_turn`` must place {exemplar} and {query}, each once; a stray brace is an error now, not at the first record."""
    probe = {"exemplar": "\x00exemplar\x00", "query": "\x00query\x00"}
    try:
        filled = template.format(**probe)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ConfigError(f"{where}: bad placeholder or stray brace ({e!s}); the placeholders are {{exemplar}} and {{query}}; "
                          "write a literal brace as {{ or }}") from None
    for k, v in probe.items():
        if filled.count(v) != 1:
            raise ConfigError(f"{where} must contain {{{k}}} exactly once")
