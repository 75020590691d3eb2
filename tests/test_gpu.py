"""GPU offload (``n_gpu_layers``): runs only on a GPU build of llama-cpp-python.

GPU kernels pick different code paths for different batch shapes, so unlike
the CPU path (bitwise batch-invariant, tests/test_engine.py) GPU numbers are
only *close* to the one-batch reference.  What must still hold: a request's
numbers depend on that request alone (not on its neighbours, nor on what the
KV cache held before), so a resumed or reordered run gives the same bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import brute_logprobs
from test_engine import PROMPTS, RESPONSES

from cdr_local.engine import EngineSettings, ScoreRequest
from cdr_local.engine.llama import LlamaModel, _llama
from cdr_local.scoring import ChatSide

pytestmark = pytest.mark.skipif(not _llama().llama_supports_gpu_offload(), reason="llama-cpp-python built without GPU offload")


@pytest.mark.parametrize("which", ["bos", "nobos"])
def test_gpu_scores_depend_on_the_request_alone(which, tiny_bos_model, tiny_nobos_model):
    path = tiny_bos_model if which == "bos" else tiny_nobos_model
    with LlamaModel(path, EngineSettings(n_ctx=1024, n_batch=64, n_ubatch=64, n_gpu_layers=-1)) as m:
        side = ChatSide(m, system=None, fallback_template=None)
        for i, msgs in enumerate(PROMPTS):
            tok = side.tokenize(msgs, RESPONSES)
            req = ScoreRequest((tok.context,), tok.continuations)
            other = side.tokenize(PROMPTS[(i + 1) % len(PROMPTS)], RESPONSES[:2])
            a = m.loglikelihood([req])[0]
            b = m.loglikelihood([ScoreRequest((other.context,), other.continuations), req])[1]
            c = m.loglikelihood([req])[0]  # the same context again: no reuse on a GPU
            for x, y, z, cont in zip(a, b, c, tok.continuations, strict=True):
                assert np.array_equal(x, y) and np.array_equal(x, z)
                ref = brute_logprobs(str(path), list(tok.context), list(cont), n_gpu_layers=-1)
                np.testing.assert_allclose(x, ref, atol=0.05, rtol=0)  # measured <= 7e-3 on an H100


def test_cpu_run_on_a_gpu_build_stays_on_the_cpu(tiny_bos_model):
    """n_gpu_layers=0 turns llama.cpp's op offload off: CPU numbers, bitwise batch-invariant."""
    outs = []
    for n_batch in (16, 512):
        with LlamaModel(tiny_bos_model, EngineSettings(n_ctx=1024, n_batch=n_batch, n_ubatch=n_batch)) as m:
            side = ChatSide(m, system=None, fallback_template=None)
            tok = side.tokenize(PROMPTS[0], RESPONSES)
            outs.append(m.loglikelihood([ScoreRequest((tok.context,), tok.continuations)])[0])
    for x, y in zip(*outs, strict=True):
        assert np.array_equal(x, y)
