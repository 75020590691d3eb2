"""Backends by name.

A backend is a module with a class implementing ``engine.LanguageModel``; it is
registered here by name with the modules it needs and how to install them,
and imported only when a model of that backend loads (the CLI starts without
torch or llama.cpp).  A missing dependency is a one-line error saying what to
install.  To add one: write ``engine/NAME.py`` with the class, add a
:class:`Backend` line below, and give models ``backend = "NAME"`` in
models.toml.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:
    from . import EngineSettings, LanguageModel


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # the module holding the class
    cls: str
    needs: tuple[str, ...]  # importable modules it needs
    install: str  # what to run when one is missing
    description: str = ""

    def missing(self) -> list[str]:
        return [m for m in self.needs if importlib.util.find_spec(m) is None]

    def load(self, path: str | Path, settings: EngineSettings, *, name: str | None = None,
             embeddings: bool = False) -> LanguageModel:
        gone = self.missing()
        if gone:
            raise ModelError(f"backend {self.name!r} needs {', '.join(gone)}: {self.install}")
        cls = getattr(importlib.import_module(self.module), self.cls)
        model: LanguageModel = cls(path, settings, name=name, embeddings=embeddings)
        return model


DEFAULT_BACKEND = "llama.cpp"

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("llama.cpp", "cdr_local.engine.llama", "LlamaModel", ("llama_cpp",),
                "pip install llama-cpp-python==0.3.36", "llama.cpp through llama-cpp-python's low-level API (CPU or CUDA)"),
        Backend("transformers", "cdr_local.engine.hf", "HFModel", ("torch", "transformers", "accelerate", "gguf"),
                "pip install 'cdr-local[transformers]' (with torch for your device)",
                "Hugging Face transformers on torch, reading the same GGUF (dequantized by transformers)"),
    )
}


def get_backend(name: str | None) -> Backend:
    name = name or DEFAULT_BACKEND
    try:
        return BACKENDS[name]
    except KeyError:
        raise ModelError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
