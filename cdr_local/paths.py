"""Where cdr-local keeps user state.

One environment variable, ``CDR_HOME``, relocates everything (model cache,
embedding cache, profiles, the user registry); tests point it at a temporary
directory to stay hermetic.  ``CDR_CACHE_DIR`` relocates only the model cache,
``CDR_CONFIG`` only the user registry.
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


def user_registry_path() -> Path:
    """The user's own models.toml, merged over the shipped registry (it need not exist).

    ``$CDR_CONFIG`` (the file itself) if set; else ``$CDR_HOME/models.toml`` if
    CDR_HOME is set (it relocates all user state); else
    ``$XDG_CONFIG_HOME/cdr-local/models.toml``, by default
    ``~/.config/cdr-local/models.toml``: a registry is configuration, not cache.
    """
    env = os.environ.get("CDR_CONFIG")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("CDR_HOME")
    if home:
        return Path(home).expanduser() / "models.toml"
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "cdr-local" / "models.toml"
