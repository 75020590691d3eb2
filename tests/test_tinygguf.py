"""The tiny GGUF builder (tests/tinygguf.py) against real llama.cpp, no mocks."""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from tinygguf import CHATML, build_corrupt_variants, build_tiny_llama  # noqa: E402

TEXT = "Hello world, the end."

# ggml_log_level in the llama.cpp bundled with llama-cpp-python 0.3.36:
# NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5 (continues the previous line).
# (llama_cpp/_logger.py's comment still lists the older INFO=1..ERROR=3 numbering.)
_GGML_LOG_ERROR = 4
_GGML_LOG_CONT = 5
_last_level = 0


def _drop_below_error(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    if level != _GGML_LOG_CONT:
        _last_level = level
    if _last_level >= _GGML_LOG_ERROR:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


# Module-level reference: the C side keeps only the raw pointer.
_LOG_CB = llama_cpp.llama_log_callback(_drop_below_error)


@pytest.fixture(scope="module", autouse=True)
def _quiet_llama() -> None:
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


# --------------------------------------------------------------------------- helpers


def _load(path: Path):
    p = llama_cpp.llama_model_default_params()
    p.use_extra_bufts = False  # the AMX extra buffer type segfaults on decode here
    return llama_cpp.llama_model_load_from_file(str(path).encode(), p)


@pytest.fixture
def load_model() -> Iterator:
    models = []

    def _open(path: Path):
        m = _load(path)
        assert m, f"llama.cpp failed to load {path}"
        models.append(m)
        return m

    yield _open
    for m in models:
        llama_cpp.llama_model_free(m)


def _tokenize(vocab, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
    data = text.encode("utf-8")
    cap = len(data) + 8
    buf = (llama_cpp.llama_token * cap)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
    assert n >= 0, f"llama_tokenize failed ({n})"
    return list(buf[:n])


def _piece(vocab, tok: int, *, special: bool = False) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, tok, buf, len(buf), 0, special)
    assert n >= 0
    return buf.raw[:n]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    return z - np.log(np.exp(z).sum())


def _decode_all_logits(model, tokens: list[int]) -> np.ndarray:
    """One llama_decode of `tokens` (seq 0, pos 0..n-1), logits on every position."""
    n = len(tokens)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = 128
    cp.n_batch = 32
    cp.n_ubatch = 32
    ctx = llama_cpp.llama_init_from_model(model, cp)
    assert ctx, "llama_init_from_model failed"
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"
        out = np.empty((n, n_vocab), dtype=np.float32)
        for i in range(n):
            ptr = llama_cpp.llama_get_logits_ith(ctx, i)
            assert ptr, f"no logits for position {i}"
            out[i] = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
        return out
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("add_bos", [True, False], ids=["bos", "nobos"])
def test_tiny_model_tokenizer_and_decode(tmp_path: Path, load_model, add_bos: bool) -> None:
    t0 = time.perf_counter()
    path = build_tiny_llama(tmp_path / "tiny.gguf", add_bos=add_bos)
    assert time.perf_counter() - t0 < 1.0
    assert path.is_file() and 0 < path.stat().st_size < 2_000_000

    model = load_model(path)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    assert 300 <= n_vocab <= 600
    assert llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_BPE
    assert llama_cpp.llama_vocab_get_add_bos(vocab) is add_bos
    assert llama_cpp.llama_vocab_get_add_eos(vocab) is False

    # tokenize / detokenize round trip
    toks = _tokenize(vocab, TEXT, add_special=True, parse_special=False)
    bos = llama_cpp.llama_vocab_bos(vocab)
    if add_bos:
        assert toks[0] == bos
        assert _piece(vocab, bos, special=True) == b"<s>"
        body = toks[1:]
    else:
        assert bos not in toks
        body = toks
    assert body == _tokenize(vocab, TEXT, add_special=False, parse_special=False)
    assert len(body) < len(TEXT.encode())  # the BPE merges are applied
    assert b"".join(_piece(vocab, t) for t in toks) == TEXT.encode()
    assert len(_tokenize(vocab, " the", add_special=False, parse_special=False)) == 1
    weird = "naïve 東京 🙂\n\ttabs  and  spaces <|im_end|>"
    wt = _tokenize(vocab, weird, add_special=False, parse_special=False)
    assert b"".join(_piece(vocab, t) for t in wt) == weird.encode()

    # <|im_end|>: a single CONTROL token, EOS and end-of-generation
    im_end = _tokenize(vocab, "<|im_end|>", add_special=False, parse_special=True)
    assert len(im_end) == 1
    assert im_end[0] == llama_cpp.llama_vocab_eos(vocab)
    assert llama_cpp.llama_vocab_is_eog(vocab, im_end[0])
    assert llama_cpp.llama_vocab_is_control(vocab, im_end[0])
    assert len(_tokenize(vocab, "<|im_end|>", add_special=False, parse_special=False)) > 1
    im_start = _tokenize(vocab, "<|im_start|>", add_special=False, parse_special=True)
    assert len(im_start) == 1 and not llama_cpp.llama_vocab_is_eog(vocab, im_start[0])
    assert not any(llama_cpp.llama_vocab_is_eog(vocab, t) for t in toks)

    # chat template round trip
    tmpl = llama_cpp.llama_model_chat_template(model, None)
    assert tmpl is not None and tmpl.decode() == CHATML

    # one decode of a 10-token batch, logits on all positions
    seq = _tokenize(
        vocab, TEXT + " Hello again, world of the end.", add_special=True, parse_special=False
    )[:10]
    assert len(seq) == 10
    logits = _decode_all_logits(model, seq)
    assert logits.shape == (10, n_vocab)
    assert np.isfinite(logits).all()
    for row in logits:
        lp = _log_softmax(row)
        assert lp.std() > 0.5  # not nearly uniform
        assert np.exp(lp.max()) < 0.99  # not one-hot
        assert lp.max() - np.median(lp) > 1.0  # distinct tokens clearly differ
    # the context matters: positions give different distributions
    assert np.abs(logits[0] - logits[-1]).max() > 0.1


def test_build_is_deterministic_and_options(tmp_path: Path, load_model) -> None:
    a = build_tiny_llama(tmp_path / "a.gguf", seed=3)
    b = build_tiny_llama(tmp_path / "b.gguf", seed=3)
    c = build_tiny_llama(tmp_path / "c.gguf", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()

    t0 = time.perf_counter()
    f16 = build_tiny_llama(tmp_path / "f16.gguf", dtype="f16", chat_template=None, n_layer=1)
    assert time.perf_counter() - t0 < 1.0
    model = load_model(f16)
    assert llama_cpp.llama_model_chat_template(model, None) is None
    assert llama_cpp.llama_model_n_layer(model) == 1
    vocab = llama_cpp.llama_model_get_vocab(model)
    seq = _tokenize(
        vocab, "the world and the end of it all", add_special=True, parse_special=False
    )[:10]
    logits = _decode_all_logits(model, seq)
    assert np.isfinite(logits).all()
    assert _log_softmax(logits[-1]).std() > 0.5


def test_session_fixtures(tiny_bos_model: Path, tiny_nobos_model: Path, load_model) -> None:
    for path, add_bos in ((tiny_bos_model, True), (tiny_nobos_model, False)):
        model = load_model(path)
        vocab = llama_cpp.llama_model_get_vocab(model)
        assert llama_cpp.llama_vocab_get_add_bos(vocab) is add_bos
        assert llama_cpp.llama_model_n_ctx_train(model) == 2048


def test_corrupt_variants_fail_to_load(tmp_path: Path, tiny_bos_model: Path) -> None:
    variants = build_corrupt_variants(tmp_path / "bad", tiny_bos_model)
    assert set(variants) == {"truncated", "random", "empty"}
    size = tiny_bos_model.stat().st_size
    assert variants["truncated"].stat().st_size == size // 2
    assert variants["random"].stat().st_size == size
    assert variants["empty"].stat().st_size == 0
    for name, path in variants.items():
        model = _load(path)
        if model:  # pragma: no cover - failure path
            llama_cpp.llama_model_free(model)
            pytest.fail(f"llama.cpp loaded the {name} GGUF")
    # the process is still healthy: a good model still loads afterwards
    model = _load(tiny_bos_model)
    assert model
    llama_cpp.llama_model_free(model)
