"""Every log-prob the engine returns, checked against a brute-force reference.

The reference (tests/reference.py) shares no code with the engine: a fresh
context, the whole sequence in one llama_decode with logits at every position,
a float64 log-softmax over the full vocabulary.  The engine decodes in chunks,
shares the prompt between responses, rewinds the KV cache, keeps a cached
prefix across requests and asks for logits only where it scores -- and must
still agree to 1e-3 per token (in practice ~1e-7: see engine/llama.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_model_path
from reference import brute_logprobs

from cdr_local.chat import Message
from cdr_local.engine import EngineSettings, ScoreRequest
from cdr_local.engine.llama import LlamaModel
from cdr_local.errors import ModelError
from cdr_local.scoring import ChatSide

TOL = 1e-3

PROMPTS = [
    [Message("user", "What is the capital of France? Answer briefly.")],
    [Message("system", "You are terse."), Message("user", "Hello world, tell me the end of the story.")],
    [Message("user", "hi"), Message("assistant", "Hello!"), Message("user", "and then?")],
]
RESPONSES = [
    "Paris.",  # short: fewer than MIN_ROWS tokens to decode
    "x",  # a single token + end of turn
    "The capital of France is Paris, the city on the Seine, in the north of the country. " * 3,  # crosses n_batch chunks
    "Text with <|im_end|> inside, which must not become a control token.",
    "Ünïcödé ✓ 中文 🙂 tabs\tand\nnewlines",
]


def _check_side(path, side: ChatSide, model: LlamaModel, messages, responses) -> None:
    tok = side.tokenize(messages, responses)
    got = model.loglikelihood([ScoreRequest((tok.context,), tok.continuations)])[0]
    assert len(got) == len(responses)
    for g, cont in zip(got, tok.continuations, strict=True):
        ref = brute_logprobs(str(path), list(tok.context), list(cont))
        assert g.shape == ref.shape
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("which", ["bos", "nobos"])
def test_every_logprob_matches_brute_force_tiny(which, tiny_bos_model, tiny_nobos_model):
    path = tiny_bos_model if which == "bos" else tiny_nobos_model
    # n_batch 16 forces several chunks per context and per long response
    with LlamaModel(path, EngineSettings(n_ctx=512, n_batch=16, n_ubatch=16, n_threads=2)) as m:
        side = ChatSide(m, system=None, fallback_template=None)
        for msgs in PROMPTS:
            # a shared-prompt multi-response record, then each response alone
            _check_side(path, side, m, msgs, RESPONSES)
            for r in RESPONSES[:2]:
                _check_side(path, side, m, msgs, [r])


def test_bos_handling(tiny_bos_model, tiny_nobos_model):
    with LlamaModel(tiny_bos_model, EngineSettings(n_ctx=256)) as m:
        side = ChatSide(m, system=None, fallback_template=None)
        tok = side.tokenize(PROMPTS[0], ["a"])
        assert m.add_bos and tok.context[0] == m.bos_id
        assert tok.context.count(m.bos_id) == 1
    with LlamaModel(tiny_nobos_model, EngineSettings(n_ctx=256)) as m:
        side = ChatSide(m, system=None, fallback_template=None)
        tok = side.tokenize(PROMPTS[0], ["a"])
        assert not m.add_bos and tok.context[0] != m.bos_id


def test_response_tokens_and_end_of_turn(tiny_nobos_model):
    with LlamaModel(tiny_nobos_model, EngineSettings(n_ctx=256)) as m:
        side = ChatSide(m, system=None, fallback_template=None)
        r = "Text with <|im_end|> inside"
        tok = side.tokenize(PROMPTS[0], [r])
        cont = list(tok.continuations[0])
        # the end-of-turn token is scored, exactly once, at the end
        assert m.is_eog(cont[-1]) and sum(m.is_eog(t) for t in cont) == 1
        # the response's own text is plain text, never a control token
        assert m.detokenize(cont[:-1]) == r
        # context + response + end of turn spell the rendered conversation
        assert m.detokenize(list(tok.context)).endswith("<|im_start|>assistant\n")


def test_scores_do_not_depend_on_batch_or_cache_state(tiny_bos_model):
    """Same request, different neighbours, cache states and chunk sizes: bitwise-equal numbers."""
    req_msgs = PROMPTS[1]
    outs = []
    for n_batch in (16, 64, 512):
        with LlamaModel(tiny_bos_model, EngineSettings(n_ctx=512, n_batch=n_batch, n_ubatch=n_batch)) as m:
            side = ChatSide(m, system=None, fallback_template=None)
            tok = side.tokenize(req_msgs, RESPONSES)
            req = ScoreRequest((tok.context,), tok.continuations)
            other = side.tokenize(PROMPTS[0], RESPONSES[:2])
            a = m.loglikelihood([req])[0]
            b = m.loglikelihood([ScoreRequest((other.context,), other.continuations), req])[1]  # after another prompt
            c = m.loglikelihood([req])[0]  # context cached from the previous call
            for x, y, z in zip(a, b, c, strict=True):
                assert np.array_equal(x, y) and np.array_equal(x, z)
            outs.append(a)
    for x, y in zip(outs[0], outs[2], strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", ["tiny", "smollm2-135m"])
def test_scores_do_not_depend_on_thread_count(which, tiny_bos_model):
    """threads moves llama.cpp's split and the log-softmax's pool: neither may move a bit."""
    path = tiny_bos_model if which == "tiny" else real_model_path(which)
    outs = []
    for threads in (1, 2, 3):
        with LlamaModel(path, EngineSettings(n_ctx=512, n_batch=64, n_ubatch=64, n_threads=threads)) as m:
            side = ChatSide(m, system=None, fallback_template=None)
            tok = side.tokenize(PROMPTS[1], RESPONSES)
            outs.append(m.loglikelihood([ScoreRequest((tok.context,), tok.continuations)])[0])
    for other in outs[1:]:
        for x, y in zip(outs[0], other, strict=True):
            assert np.array_equal(x, y)


@pytest.mark.parametrize("n_vocab", [7, 49152, 151936])
def test_log_softmax_rows_pool_bitwise_and_exact(n_vocab):
    """The threaded log-sum-exp equals the single-thread one bit for bit and a
    float64 computation to float32 rounding, at real vocabulary sizes."""
    from cdr_local.engine.llama import _lse_rows, _RowPool

    rng = np.random.default_rng(n_vocab)
    rows = (rng.standard_normal((37, n_vocab)) * 8).astype(np.float32)
    rows[3] = -1e30  # one dominant logit: the max shift must keep it finite
    rows[3, 1] = 5.0
    x = rows.astype(np.float64)
    m = x.max(axis=1)
    ref = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    single = _lse_rows(rows)
    pool = _RowPool(4)
    try:
        pooled = _lse_rows(rows, pool)
        assert np.array_equal(single, pooled)
        assert np.array_equal(_lse_rows(rows[5:6], pool), single[5:6])
    finally:
        pool.shutdown()
    np.testing.assert_allclose(single, ref, rtol=0, atol=1e-5)
    assert single[3] == 5.0


def test_segmented_context_reuse(tiny_nobos_model):
    """A cached leading segment is kept; results equal a fresh decode."""
    with LlamaModel(tiny_nobos_model, EngineSettings(n_ctx=512, n_batch=16, n_ubatch=16)) as m:
        seg1 = tuple(m.tokenize("<|im_start|>system\nShared criteria and exemplars.<|im_end|>\n", add_special=True, parse_special=True))
        tails = [tuple(m.tokenize(f"<|im_start|>user\nquestion {i}<|im_end|>\n<|im_start|>assistant\n", add_special=False, parse_special=True)) for i in range(3)]
        cont = tuple(m.tokenize("an answer", add_special=False, parse_special=False)) + (m.eos_id,)
        for t in tails:
            got = m.loglikelihood([ScoreRequest((seg1, t), (cont,))])[0][0]
            ref = brute_logprobs(str(tiny_nobos_model), list(seg1 + t), list(cont))
            np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_parallel_responses_close_to_reference(tiny_bos_model):
    """Opt-in side-by-side decoding: several sequences per decode, still right to 1e-3 on this model."""
    with LlamaModel(tiny_bos_model, EngineSettings(n_ctx=1024, n_batch=64, n_ubatch=64, parallel_responses=True)) as m:
        side = ChatSide(m, system=None, fallback_template=None)
        _check_side(tiny_bos_model, side, m, PROMPTS[0], RESPONSES)


def test_truncation_keeps_prompt_end_and_response_start(tiny_bos_model):
    with LlamaModel(tiny_bos_model, EngineSettings(n_ctx=256, n_batch=32, n_ubatch=32)) as m:
        assert m.n_ctx == 256
        side = ChatSide(m, system=None, fallback_template=None)
        long_prompt = [Message("user", "start " + "word " * 300 + "THE END")]
        long_resp = "begin " + "more " * 300
        tok = side.tokenize(long_prompt, [long_resp, "short"])
        assert all(tok.truncated)
        assert len(tok.context) + max(len(c) for c in tok.continuations) <= m.n_ctx
        assert tok.context[0] == m.bos_id  # BOS kept
        assert m.detokenize(list(tok.context)).endswith("<|im_start|>assistant\n")  # prompt end kept
        assert m.detokenize(list(tok.continuations[0])).startswith("begin")  # response start kept
        scores = side.score(long_prompt, [long_resp, "short"])
        assert all(s.truncated for s in scores)
        _ = tok
        # untruncated case is flagged False
        assert not any(side.tokenize(PROMPTS[0], ["ok"]).truncated)


def test_missing_and_corrupt_models_raise_one_line(tmp_path, tiny_bos_model):
    from tinygguf import build_corrupt_variants

    bad = build_corrupt_variants(tmp_path, tiny_bos_model)
    bad["missing"] = tmp_path / "nope.gguf"
    for kind, p in bad.items():
        with pytest.raises(ModelError) as e:
            LlamaModel(p, EngineSettings(n_ctx=128))
        assert "\n" not in str(e.value), kind
        assert str(p) in str(e.value) or kind == "truncated" or "cannot load" in str(e.value)


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m"])
def test_every_logprob_matches_brute_force_real(name):
    """SmolLM2-135M-Instruct (Q4_1, no BOS, ChatML from its GGUF)."""
    path = real_model_path(name)
    with LlamaModel(path, EngineSettings(n_ctx=1024, n_batch=64, n_ubatch=64, n_threads=2)) as m:
        assert not m.add_bos
        side = ChatSide(m, system="Be helpful.", fallback_template=None)
        _check_side(path, side, m, PROMPTS[0], RESPONSES)
        _check_side(path, side, m, PROMPTS[2], RESPONSES[:2])
