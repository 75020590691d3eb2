"""Where cdr-local keeps user state.

One environment variable, ``CDR_HOME``, relocates everything (model cache,
embedding cache); tests point it at a temporary directory to stay hermetic.
``CDR_CACHE_DIR`` relocates only the model cache.
"""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    env = os.environ.get("CDR_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cdr-local"


def model_cache_dir() -> Path:
    env = os.environ.get("CDR_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return home_dir() / "models"
