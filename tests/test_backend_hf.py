"""The transformers backend (``backend = "transformers"``), against its own
brute-force reference and against llama.cpp.

- Brute force (tests/reference.py::brute_logprobs_hf): the model loaded
  directly, each sequence alone in one forward pass, no padding, float64
  log-softmax.  The backend batches a request's continuations with right
  padding and a multi-segment context: it must agree to 1e-5 per token.
  Measured: up to 7e-7 on the tiny F32 models (float32 matrix products of
  another shape: a response's log-probs move that little with its siblings),
  bitwise on SmolLM2.
- llama.cpp on the same GGUF and the same token ids: transformers dequantizes
  the weights its own way and computes in float32 with other kernels.
  Measured on SmolLM2-135M F16 (the prompts and responses below): at most
  0.043 nats per token and 0.045 per response; the tolerances are about twice that.
- The tokens around the text (BOS, EOT, end-of-generation set) are llama.cpp's;
  the text's ids agree on the shipped models.
- The CLI: a registry model with ``backend = "transformers"`` annotates end to
  end, the metadata says which backend, and --resume refuses to mix backends.

Skipped without the extra (``pip install 'cdr-local[transformers]'``); CI
installs it and sets CDR_REQUIRE_HF=1, which turns the skip into a failure.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import orjson
import pytest
from conftest import real_model_path
from reference import brute_logprobs_hf
from test_cli import cdr

from cdr_local.chat import Message
from cdr_local.engine import EngineSettings, ScoreRequest, load_model
from cdr_local.engine.backends import BACKENDS, Backend
from cdr_local.errors import ModelError
from cdr_local.scoring import ChatSide

HAVE_HF = all(importlib.util.find_spec(m) is not None for m in BACKENDS["transformers"].needs)
if not HAVE_HF and os.environ.get("CDR_REQUIRE_HF") == "1":
    raise RuntimeError("CDR_REQUIRE_HF=1 but the transformers extra is not installed")
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers extra not installed (pip install 'cdr-local[transformers]')")

#: per token and per response, against llama.cpp on SmolLM2-135M F16 (measured 0.043 and 0.045)
TOK_TOL, SUM_TOL = 0.08, 0.1

PROMPTS = [
    [Message("user", "What is the capital of France? Answer briefly.")],
    [Message("system", "You are terse."), Message("user", "hi"), Message("assistant", "Hello!"), Message("user", "and then?")],
]
RESPONSES = [
    "Paris.",
    "x",
    "The capital of France is Paris, the city on the Seine, in the north of the country. " * 2,
    "Text with <|im_end|> inside, which must not become a control token.",
    "Ünïcödé ✓ 中文 🙂 tabs\tand\nnewlines",
]
SETTINGS = EngineSettings(n_ctx=512, n_threads=1)


def _requests(m: object) -> list[tuple[ScoreRequest, object]]:
    side = ChatSide(m, system="Be helpful.", fallback_template=None)  # type: ignore[arg-type]
    out = []
    for msgs in PROMPTS:
        tok = side.tokenize(msgs, RESPONSES)
        ctx = tok.context
        # a context in two segments (as a cached system prompt is), several padded continuations
        out.append((ScoreRequest((ctx[:3], ctx[3:]), tok.continuations), tok))
    return out


@needs_hf
@pytest.mark.parametrize("which", ["bos", "nobos"])
def test_every_logprob_matches_brute_force(which: str, tiny_bos_model: Path, tiny_nobos_model: Path) -> None:
    path = tiny_bos_model if which == "bos" else tiny_nobos_model
    m = load_model(path, SETTINGS, backend="transformers")
    try:
        for req, _ in _requests(m):
            got = m.loglikelihood([req])[0]
            ctx = [t for seg in req.context for t in seg]
            for g, cont in zip(got, req.continuations, strict=True):
                ref = brute_logprobs_hf(str(path), ctx, list(cont))
                assert g.dtype == np.float64 and g.shape == ref.shape
                np.testing.assert_allclose(g, ref, atol=1e-5, rtol=0)
    finally:
        m.close()


def _agree(path: Path) -> tuple[float, float]:
    """Both backends on the same token ids: the largest per-token and per-response gaps."""
    a = load_model(path, SETTINGS, backend="llama.cpp")
    b = load_model(path, SETTINGS, backend="transformers")
    try:
        for attr in ("add_bos", "bos_id", "eos_id", "eot_id", "n_vocab"):
            assert getattr(a, attr) == getattr(b, attr), attr
        assert [t for t in range(a.n_vocab) if a.is_eog(t)] == [t for t in range(b.n_vocab) if b.is_eog(t)]
        assert a.chat_template() == b.chat_template()
        tok_gap = sum_gap = 0.0
        for (req, tok_a), (_, tok_b) in zip(_requests(a), _requests(b), strict=True):
            assert tok_a == tok_b  # the same ids from both tokenizers
            for x, y in zip(a.loglikelihood([req])[0], b.loglikelihood([req])[0], strict=True):
                tok_gap = max(tok_gap, float(np.abs(x - y).max()))
                sum_gap = max(sum_gap, abs(float(x.sum() - y.sum())))
        return tok_gap, sum_gap
    finally:
        a.close()
        b.close()


@needs_hf
def test_agrees_with_llama_cpp_tiny(tiny_bos_model: Path) -> None:
    tok_gap, sum_gap = _agree(tiny_bos_model)
    # F32 weights, but llama.cpp keeps its KV cache in f16: measured 5e-4 per token, 2.9e-3 per response
    assert tok_gap < 2e-3 and sum_gap < 1e-2, (tok_gap, sum_gap)


@needs_hf
@pytest.mark.real
def test_agrees_with_llama_cpp_real() -> None:
    path = real_model_path("smollm2-135m")
    tok_gap, sum_gap = _agree(path)
    assert tok_gap < TOK_TOL and sum_gap < SUM_TOL, (tok_gap, sum_gap)


@needs_hf
def test_embeddings_and_generation(tiny_bos_model: Path) -> None:
    """hidden_states: llama.cpp's (final norm applied) to float32 precision; greedy
    generation: each token the argmax of the brute-force next-token distribution."""
    a = load_model(tiny_bos_model, SETTINGS, backend="llama.cpp", embeddings=True)
    b = load_model(tiny_bos_model, SETTINGS, backend="transformers", embeddings=True)
    try:
        toks = b.tokenize("The capital of France is Paris.", add_special=True, parse_special=False)
        np.testing.assert_allclose(b.hidden_states(toks), a.hidden_states(toks), atol=1e-3, rtol=0)
        ctx = tuple(toks)
        out = b.generate(ctx, max_tokens=6, temperature=0.0)
        seq = list(ctx)
        for t in out:
            lp = [float(brute_logprobs_hf(str(tiny_bos_model), seq, [c])[0]) for c in range(b.n_vocab)]
            assert t == int(np.argmax(lp))
            seq.append(t)
    finally:
        a.close()
        b.close()


def _hf_registry(tmp_path: Path, bos: Path, nobos: Path) -> Path:
    reg = tmp_path / "hf.toml"
    reg.write_text(f"""
default_pair = "tiny-hf"
[engine]
n_ctx = 512
n_threads = 1
[models.tiny-bos]
path = "{bos}"
backend = "transformers"
[models.tiny-nobos]
path = "{nobos}"
backend = "transformers"
[pairs.tiny-hf]
strong = {{ model = "tiny-bos", system = "Be helpful." }}
weak = "tiny-nobos"
""")
    return reg


@needs_hf
def test_cli_annotate_on_transformers(tiny_registry: Path, tiny_bos_model: Path, tiny_nobos_model: Path, tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": p, "chosen": c, "rejected": r} for i, (p, c, r) in enumerate([
        ("What is 2+2?", "4.", "5, probably, or maybe something else entirely."),
        ("Say hi.", "Hi there!", "No."),
        ("Name a colour.", "Blue.", "A colour is a property of light as seen by the eye."),
    ])]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    hf_reg = _hf_registry(tmp_path, tiny_bos_model, tiny_nobos_model)
    outs = {}
    for name, reg, pair in (("llama", tiny_registry, "tiny"), ("hf", hf_reg, "tiny-hf")):
        out = tmp_path / f"{name}.jsonl"
        p = cdr("annotate", inp, "-o", out, "--models", reg, "--pair", pair, "--threads", "1", "-q", home=tmp_path / "home")
        assert p.returncode == 0, p.stderr
        outs[name] = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    for x, y in zip(outs["llama"], outs["hf"], strict=True):
        assert x["id"] == y["id"] and x["label"] == y["label"]
        assert abs(x["margin_value"] - y["margin_value"]) < 2e-2  # two responses' gaps (see above)
    meta = orjson.loads((tmp_path / "hf.jsonl.meta.json").read_bytes())
    for role in ("strong", "weak"):
        assert meta["models"][role]["backend"]["backend"] == "transformers"
        assert "numbers differ from llama.cpp" in meta["models"][role]["backend"]["note"]
        assert meta["numerics"][f"{role}.backend"]["backend"] == "transformers"
    assert "llama_cpp_python" not in meta["numerics"]
    # a llama.cpp output is not resumed on transformers (nor the other way round)
    p = cdr("annotate", inp, "-o", tmp_path / "llama.jsonl", "--models", hf_reg, "--pair", "tiny-hf", "--resume",
            "--threads", "1", "-q", home=tmp_path / "home")
    assert p.returncode != 0 and "backend" in p.stderr and "Traceback" not in p.stderr


def test_unknown_backend_is_a_registry_error(tmp_path: Path) -> None:
    from cdr_local.errors import ConfigError
    from cdr_local.models import load_registry

    reg = tmp_path / "r.toml"
    reg.write_text('[models.x]\npath = "x.gguf"\nbackend = "vllm"\n')
    with pytest.raises(ConfigError, match=r"models\.x\.backend.*must be one of llama\.cpp, transformers"):
        load_registry(reg)


def test_missing_dependency_says_what_to_install(tiny_bos_model: Path) -> None:
    b = Backend("fake", "cdr_local.engine.hf", "HFModel", ("no_such_module_for_cdr",), "pip install fake-extra")
    with pytest.raises(ModelError, match="backend 'fake' needs no_such_module_for_cdr: pip install fake-extra"):
        b.load(tiny_bos_model, SETTINGS)
    with pytest.raises(ModelError, match="unknown backend 'vllm'"):
        load_model(tiny_bos_model, SETTINGS, backend="vllm")
