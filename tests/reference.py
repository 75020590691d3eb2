"""Brute-force reference log-probs, independent of the engine's code.

A fresh llama.cpp context; the whole sequence (context + continuation) in ONE
llama_decode with logits at every position; a float64 log-softmax over the
full vocabulary.  No prompt sharing, no KV reuse, no selective logits, no
chunking.  (Flash attention off, as in the engine: see engine/llama.py for
why the two then agree bitwise whenever every engine decode has >= 8 rows.)
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


def brute_logprobs(
    path: str, context: list[int], continuation: list[int], n_threads: int = 2, n_gpu_layers: int = 0
) -> np.ndarray:
    import llama_cpp as ll

    seq = list(context) + list(continuation)
    n = len(seq)
    mp = ll.llama_model_default_params()
    mp.use_extra_bufts = False
    mp.n_gpu_layers = n_gpu_layers
    model = ll.llama_model_load_from_file(path.encode(), mp)
    assert model, path
    cp = ll.llama_context_default_params()
    size = max(64, n + 8)
    cp.n_ctx = size
    cp.n_batch = size
    cp.n_ubatch = size
    cp.n_seq_max = 1
    cp.n_threads = n_threads
    cp.n_threads_batch = n_threads
    cp.flash_attn_type = 0
    cp.op_offload = n_gpu_layers != 0  # a CPU reference stays on the CPU on a GPU build
    ctx = ll.llama_init_from_model(model, cp)
    assert ctx
    batch = ll.llama_batch_init(n, 0, 1)
    try:
        for i, t in enumerate(seq):
            batch.token[i] = t
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = n
        assert ll.llama_decode(ctx, batch) == 0
        vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
        ptr = ll.llama_get_logits(ctx)
        logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n, vocab)).astype(np.float64)
        mx = logits.max(axis=1, keepdims=True)
        logsm = logits - mx - np.log(np.exp(logits - mx).sum(axis=1, keepdims=True))
        P = len(context)
        return np.array([logsm[P - 1 + i, continuation[i]] for i in range(len(continuation))])
    finally:
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        ll.llama_model_free(model)


def brute_embedding(path: str, tokens: list[int], skip_first: bool, n_threads: int = 1) -> np.ndarray:
    """Mean of the final hidden states of ``tokens`` (BOS included by the caller
    where the model uses one), independent of the engine's code.

    A fresh context with per-token embeddings (no pooling); the whole sequence
    in ONE llama_decode with an output at every position; the rows read one by
    one with ``llama_get_embeddings_ith``; the mean over the positions (the
    first skipped if ``skip_first``: the BOS) in float64.
    """
    import llama_cpp as ll

    seq = list(tokens)
    n = len(seq)
    assert n > (1 if skip_first else 0)
    mp = ll.llama_model_default_params()
    mp.use_extra_bufts = False
    model = ll.llama_model_load_from_file(str(path).encode(), mp)
    assert model, path
    cp = ll.llama_context_default_params()
    size = max(64, n + 8)
    cp.n_ctx = size
    cp.n_batch = size
    cp.n_ubatch = size
    cp.n_seq_max = 1
    cp.n_threads = n_threads
    cp.n_threads_batch = n_threads
    cp.flash_attn_type = 0
    cp.embeddings = True
    cp.pooling_type = 0  # LLAMA_POOLING_TYPE_NONE: one vector per token
    cp.op_offload = False  # stay on the CPU on a GPU build
    ctx = ll.llama_init_from_model(model, cp)
    assert ctx
    batch = ll.llama_batch_init(n, 0, 1)
    try:
        for i, t in enumerate(seq):
            batch.token[i] = t
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = n
        assert ll.llama_decode(ctx, batch) == 0
        n_embd = ll.llama_model_n_embd(model)
        rows = []
        for i in range(1 if skip_first else 0, n):
            ptr = ll.llama_get_embeddings_ith(ctx, i)
            assert ptr, i
            row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_embd,))
            rows.append(row.astype(np.float64))
        return np.mean(rows, axis=0)
    finally:
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        ll.llama_model_free(model)


_HF_MODELS: dict[str, object] = {}


def brute_logprobs_hf(path: str, context: list[int], continuation: list[int]) -> np.ndarray:
    """The transformers backend's reference: its model (loaded here, not through
    the backend), the whole sequence in one forward pass without padding or
    mask, logits at every position, a float64 log-softmax over the vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM

    if path not in _HF_MODELS:
        p = Path(path)
        _HF_MODELS[path] = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    model = _HF_MODELS[path]
    seq = list(context) + list(continuation)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([seq])).logits[0].to(torch.float64)  # type: ignore[operator]
    lp = torch.log_softmax(logits, dim=-1)
    P = len(context)
    return np.array([float(lp[P - 1 + i, t]) for i, t in enumerate(continuation)], dtype=np.float64)
