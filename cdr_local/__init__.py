"""cdr-local: offline preference annotation with a customized density ratio.

reward(x, y) = log p_strong(y | x) - log p_weak(y | x), computed on local GGUF
models through llama.cpp.  Nothing optional is imported here, so that the CLI
starts fast; the engine imports llama_cpp lazily.

The Python API (``cdr_local.api``, loaded on first use): ``Annotator``,
``score``, ``annotate_file``, ``evaluate_file``.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["Annotator", "annotate_file", "evaluate_file", "score", "__version__"]


def __getattr__(name: str) -> Any:
    """``cdr_local.score`` etc., imported when first used (PEP 562)."""
    if name in ("Annotator", "annotate_file", "evaluate_file", "score"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cdr_local' has no attribute {name!r}")
