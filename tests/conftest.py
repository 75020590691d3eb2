from __future__ import annotations

import sys
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
