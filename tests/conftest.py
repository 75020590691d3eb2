from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))


# ---------------------------------------------------------------------------
# Tiny random GGUF models (tests/tinygguf.py), built once per session.
# Real llama.cpp loads them in milliseconds; see tests/test_tinygguf.py.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def tiny_bos_model(tiny_gguf_dir: Path) -> Path:
    """Tiny llama model whose tokenizer prepends BOS (`<s>`), ChatML template."""
    from tinygguf import build_tiny_llama

    return build_tiny_llama(tiny_gguf_dir / "tiny-bos.gguf", seed=0, add_bos=True)


@pytest.fixture(scope="session")
def tiny_nobos_model(tiny_gguf_dir: Path) -> Path:
    """Tiny Qwen-style model: no BOS prepended, ChatML template."""
    from tinygguf import build_tiny_llama

    return build_tiny_llama(tiny_gguf_dir / "tiny-nobos.gguf", seed=1, add_bos=False)


# ---------------------------------------------------------------------------
# Hermetic user state and a tiny registry.
# ---------------------------------------------------------------------------

# The real-model cache is looked up *before* tests relocate CDR_HOME: the README's
# quick-start commands fill it (command 2 pulls smollm2-135m; .ci/run runs them with a
# CDR_HOME under a path with spaces, unlike a developer's).
_REAL_HOME = os.environ.get("CDR_HOME")


# the user's cdr settings besides CDR_HOME: caches, registries, pip arguments, llama.cpp's log
_USER_SETTINGS = ("CDR_CACHE_DIR", "CDR_MODELS", "CDR_CONFIG", "CDR_PIP_ARGS", "CDR_LLAMA_LOG")


@pytest.fixture(scope="session", autouse=True)
def _hermetic_session_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Session and module fixtures are set up before any test's own CDR_HOME: they get
    one of their own too, never the user's (its models, profiles, caches, settings)."""
    home = tmp_path_factory.mktemp("session-cdr-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDR_HOME", str(home))
        for var in _USER_SETTINGS:
            mp.delenv(var, raising=False)
        yield home


@pytest.fixture(autouse=True)
def _hermetic_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own CDR_HOME so nothing touches the user's cache, and none
    sees the rest of the user's cdr settings."""
    home = tmp_path / "cdr-home"
    monkeypatch.setenv("CDR_HOME", str(home))
    for var in _USER_SETTINGS:
        monkeypatch.delenv(var, raising=False)
    return home


TINY_REGISTRY = """
default_pair = "tiny"

[engine]
n_ctx = 512
n_batch = 64
n_ubatch = 64
n_threads = 1  # tiny models: one thread is fastest, and immune to a busy machine

[models.tiny-bos]
path = "{bos}"

[models.tiny-nobos]
path = "{nobos}"

[pairs.tiny]
description = "two tiny random models, different tokenizer settings"
strong = {{ model = "tiny-bos", system = "Be helpful." }}
weak = {{ model = "tiny-nobos" }}

[pairs.tiny-self]
strong = {{ model = "tiny-bos", system = "Be helpful." }}
weak = "tiny-bos"
"""


@pytest.fixture(scope="session")
def tiny_registry(tiny_gguf_dir: Path, tiny_bos_model: Path, tiny_nobos_model: Path) -> Path:
    """A models.toml naming the tiny models, with pairs 'tiny' (default) and 'tiny-self'."""
    p = tiny_gguf_dir / "models.toml"
    p.write_text(TINY_REGISTRY.format(bos=tiny_bos_model, nobos=tiny_nobos_model))
    return p


def real_model_path(name: str) -> Path:
    """Path of a real registry model pulled by the README's quick start; skip if absent.

    With CDR_REQUIRE_REAL=1 (set by .ci/run) a missing model fails instead of skipping.
    """
    from cdr_local.models import is_present, load_registry, model_path

    saved = os.environ.get("CDR_HOME")
    try:
        if _REAL_HOME is None:
            os.environ.pop("CDR_HOME", None)
        else:
            os.environ["CDR_HOME"] = _REAL_HOME
        spec = load_registry().model(name)
        if is_present(spec):
            return model_path(spec)
    finally:
        if saved is None:
            os.environ.pop("CDR_HOME", None)
        else:
            os.environ["CDR_HOME"] = saved
    if os.environ.get("CDR_REQUIRE_REAL") == "1":
        pytest.fail(f"real model {name!r} is not in the cache {_REAL_HOME or '(default CDR_HOME)'}: cdr models pull {name}")
    pytest.skip(f"real model {name!r} not pulled (cdr models pull {name})")
