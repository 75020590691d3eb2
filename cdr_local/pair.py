"""A loaded pair: strong and weak sides, ready to score, and the metadata that travels with outputs."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from . import __version__
from .atomic import write_bytes_atomic
from .chat import Message
from .engine import EngineSettings
from .engine.backends import DEFAULT_BACKEND
from .errors import ModelError
from .models import ModelSpec, PairSpec, PathSource, Registry, hash_notice, resolve
from .paths import home_dir
from .reward import ResponseScore
from .scoring import ChatSide

#: engine settings recorded in the metadata but not in the resume guard: proven not to change scores
NOT_NUMERICS = ("n_threads",)


def settings_from(registry: Registry, **overrides: Any) -> EngineSettings:
    """Engine settings: models.toml's [engine] table, then command-line overrides (None = keep)."""
    import dataclasses

    return dataclasses.replace(registry.engine, **{k: v for k, v in overrides.items() if v is not None})


def file_sha256(path: Path, say: Callable[[str], None] | None = None) -> str:
    """sha256 of a model file, cached by (path, size, mtime) so big files are hashed once.

    ``say`` hears "hashing PATH (SIZE)..." first when the file is big (see
    :data:`~cdr_local.models.HASH_NOTICE_BYTES`): reading gigabytes takes a while."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache = home_dir() / "sha256-cache.json"
    data: dict[str, str] = {}
    if cache.exists():
        try:
            data = orjson.loads(cache.read_bytes())
        except orjson.JSONDecodeError:
            data = {}
    if key in data:
        return data[key]
    hash_notice(path, say, st.st_size)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    data[key] = digest
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cache, orjson.dumps(data), tmp=cache.with_name(cache.name + f".{os.getpid()}.tmp"))
    except OSError:
        pass  # the cache is an optimisation only
    return digest


def model_sha256(spec: ModelSpec, path: Path, say: Callable[[str], None] | None = None) -> str:
    """The sha256 that outputs record for a model file.

    A local file (path source) whose registry entry gives a sha256 is checked
    against it here, hashed once per (size, mtime): a wrong file is refused
    rather than recorded under the registry's digest.  Pulled files were
    checked when they were installed.  A converted model records the
    digest of the converted file, the one that runs.
    """
    if isinstance(spec.source, PathSource) and spec.sha256:
        src = spec.source.path
        actual = file_sha256(src, say)
        if actual != spec.sha256:
            raise ModelError(f"model {spec.name!r}: sha256 mismatch: expected {spec.sha256}, got {actual}: {src}")
        if spec.convert is None:
            return actual
    if spec.convert:  # what runs is the converted file: record its own digest
        return file_sha256(path, say)
    return spec.sha256 or file_sha256(path, say)


class LoadedPair:
    """Strong and weak :class:`ChatSide` objects; one llama.cpp model is shared
    when both sides use the same file (one model under two system prompts)."""

    def __init__(
        self,
        registry: Registry,
        pair_name: str | None,
        settings: EngineSettings,
        *,
        pull: bool = True,
        say: Callable[[str], None] | None = None,
    ) -> None:
        from .engine import LanguageModel, load_model

        self.spec: PairSpec = registry.pair(pair_name)
        self.settings = settings
        self.registry = registry
        specs = {"strong": registry.model(self.spec.strong.model), "weak": registry.model(self.spec.weak.model)}
        self.paths: dict[str, Path] = {}
        loaded: dict[tuple[Path, str], LanguageModel] = {}
        self._models: list[LanguageModel] = []
        self.sides: dict[str, ChatSide] = {}
        self.model_specs: dict[str, ModelSpec] = specs
        try:
            # both sides' files first (pulled, checked, hashed), then any load:
            # a problem with the weak model costs no load of the strong one
            for role in ("strong", "weak"):
                spec = specs[role]
                path = resolve(spec, pull=pull, progress=say)
                model_sha256(spec, path, say)  # a wrong local file fails here, before it is loaded
                self.paths[role] = path
            for role in ("strong", "weak"):
                spec = specs[role]
                path = self.paths[role]
                key = (path.resolve(), spec.backend)
                # one model file is loaded once (per backend); each side gets its own
                # context on those weights, so each keeps its own cached prompt prefix
                m = loaded[key].sibling() if key in loaded else load_model(path, settings, name=spec.name, backend=spec.backend)
                loaded.setdefault(key, m)
                self._models.append(m)
                side = getattr(self.spec, role)
                self.sides[role] = ChatSide(m, system=side.system, fallback_template=spec.chat_template, template=side.template)
        except BaseException:
            self.close()
            raise
        self._router_side: ChatSide | None = None

    @property
    def strong(self) -> ChatSide:
        return self.sides["strong"]

    @property
    def weak(self) -> ChatSide:
        return self.sides["weak"]

    def router_side(self) -> ChatSide:
        """The strong model, without the pair's system prompt, in a context of its own (for routing)."""
        if self._router_side is None:
            m = self.strong.model.sibling()
            self._models.append(m)
            self._router_side = ChatSide(m, system=None, fallback_template=self.model_specs["strong"].chat_template)
        return self._router_side

    def score(self, messages: Sequence[Message], responses: Sequence[str]) -> list[ResponseScore]:
        s = self.strong.score(messages, responses)
        w = self.weak.score(messages, responses)
        return [ResponseScore(strong=a, weak=b) for a, b in zip(s, w, strict=True)]

    def metadata(self) -> dict[str, Any]:
        models: dict[str, dict[str, Any]] = {}
        for role in ("strong", "weak"):
            spec = self.model_specs[role]
            side = self.sides[role]
            path = self.paths[role]
            models[role] = {
                "model": spec.name,
                "path": str(path),
                "sha256": model_sha256(spec, path),
                "source": spec.source_label,
                "license": spec.license,
                "system": side.system,
                "chat_template_sha256": hashlib.sha256(side.template.encode()).hexdigest(),
                "chat_template_from": side.template_from,
                "add_bos": side.model.add_bos,
                "n_vocab": side.model.n_vocab,
                "n_ctx_effective": side.model.n_ctx,  # llama.cpp may round n_ctx up
            }
            if spec.backend != DEFAULT_BACKEND:  # say so: its numbers are not llama.cpp's
                models[role]["backend"] = {k: v for k, v in side.model.describe().items() if k != "numerics"}
        return {
            "tool": "cdr-local",
            "version": __version__,
            **self._libraries(),
            "pair": self.spec.name,
            "registry": str(self.registry.path),
            "models": models,
            "engine": self.settings.to_json(),
            "reward": "sum log p_strong(y|x) - sum log p_weak(y|x) over response + end-of-turn tokens",
            "calibration_models": self.identity(),
        }

    def identity(self) -> dict[str, Any]:
        """What a calibration is tied to: each side's model name, registry sha256 and conversion."""
        from .calibration import pair_identity

        return pair_identity(self.registry, self.spec.name)

    def _libraries(self) -> dict[str, Any]:
        """What computes the numbers, per side (``engine.library_keys``)."""
        from .engine import library_keys

        out: dict[str, Any] = {}
        for role in ("strong", "weak"):
            out.update(library_keys(self.sides[role].model, role))
        return out

    def numerics(self) -> dict[str, Any]:
        """The settings that change scores: a resumed run must match them (and a
        side's backend: llama.cpp and transformers numbers never mix)."""
        meta = self.metadata()
        return {
            **self._libraries(),
            "cdr_local": __version__,
            **{f"{r}.sha256": meta["models"][r]["sha256"] for r in ("strong", "weak")},
            **{f"{r}.system": meta["models"][r]["system"] for r in ("strong", "weak")},
            **{f"{r}.chat_template_sha256": meta["models"][r]["chat_template_sha256"] for r in ("strong", "weak")},
            # n_threads changes no score (bitwise; tests/test_engine.py::test_scores_do_not_depend_on_thread_count,
            # and test_reliability's resume on another thread count), so a resume may use other threads
            **{f"engine.{k}": v for k, v in self.settings.to_json().items() if k not in NOT_NUMERICS},
        }

    def close(self) -> None:
        for m in self._models:
            m.close()
