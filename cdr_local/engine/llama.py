"""llama.cpp scoring engine on the low-level API.  The only module that touches llama_cpp.

Why the low-level API: ``Llama.create_completion(echo=True)`` is 10-30x slower
and shifts log-probs by one token on models without BOS; ``logits_all=True``
allocates n_ctx x n_vocab floats.  Here we ask llama.cpp for logits only at the
positions that predict a scored token, and do the log-softmax in numpy: one
row at a time in a reused buffer, the rows split across ``n_threads`` threads
(numpy releases the GIL).  On an H100 the log-softmax, not the model, was half
of the time; this made ``cdr eval`` 2.1x faster there, bit for bit the same.

Numerics: why a token's log-prob does not depend on batching.  Measured on
SmolLM2 (Q4_1), Qwen2.5-0.5B and Gemma-3-270M (Q4_K_M): with flash attention
off, ggml's CPU kernels give *bitwise* the same logits for a token whether it
is decoded in a batch of 8 rows or of 512; batches under 8 rows (and flash
attention above 64 rows) take other kernel paths that move log-probs by
0.2-1.1 nats per token.  So the engine keeps flash attention off, never sends
llama.cpp a decode of fewer than ``MIN_ROWS`` tokens or asking for fewer than
``MIN_ROWS`` logits rows (it re-decodes a few cached context tokens instead,
which rewrites bitwise-identical KV), and decodes at most one ubatch per call.
The result equals decoding context + response in one batch with all logits --
which is exactly what the brute-force reference test does (to ~1e-8).

GPU (``n_gpu_layers != 0``): CUDA kernels are *not* batch-shape invariant
(measured on an H100: chunking moved SmolLM2 log-probs by up to 2 nats per
token, reusing a cached prompt by 0.3).  So on a GPU every request is decoded
from an empty cache, never reusing the previous request's prompt: its numbers
then depend on the request and the settings alone.  On the CPU, llama.cpp's
"op offload" (big CPU batches shipped to a GPU, when the build has one) is
switched off, so a CPU run keeps CPU numerics on a CUDA build.

Decode scheme per request:

1. The context is decoded into sequence 0, cells ``[0, P)``, in chunks.  The
   context's leading segments that are still in the cache from the previous
   request are kept (same cells, same bits).  Logits are taken at the last
   context rows: the last one predicts every continuation's first token.
2. Each continuation is decoded after the context and the cache is rewound
   (``llama_memory_seq_rm``), so a prompt shared by N responses is decoded
   once.  Opt-in ``parallel_responses`` instead copies the context to
   sequences ``1..N-1`` (``llama_memory_seq_cp``, free in a unified KV cache)
   and decodes the N continuations side by side, several sequences per
   decode; their cells then depend on the sibling responses, which moves
   numbers (0.1 nats seen), so it is off by default.
3. The continuation's last token is never decoded: its log-prob comes from
   the logits of the token before it.

AMX: a default (``-march=native``) build of llama-cpp-python on CPUs with AMX
segfaults in ``ggml_backend_amx_mul_mat``; the AMX/repack paths live in the
"extra buffer types", which we switch off (``use_extra_bufts = False``).
Measured no slower on these machines.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from . import EngineSettings, ScoreRequest
from .sampling import sample

_LOG_LOCK = threading.Lock()
_LOG_TAIL: deque[str] = deque(maxlen=20)
_LOG_CB: Any = None
_BACKEND_READY = False

GGML_LOG_LEVEL_ERROR = 4  # this build: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
GGML_LOG_LEVEL_CONT = 5

# Every llama_decode gets at least this many tokens and asks for at least this
# many logits rows.  Measured (FA off): ggml's CPU kernels give bitwise the
# same numbers for any batch of >= 8 rows, but smaller batches take another
# kernel path that differs by up to 0.2-1.1 nats per token on Q4 models.  So
# with this floor, a token's log-prob does not depend on how the sequence was
# chunked: it equals a decode of the whole sequence in one batch.
MIN_ROWS = 8

# the log-softmax hands a pool thread at least this many logits rows: below
# that, handing off costs more than it saves
_LSE_MIN_ROWS_PER_THREAD = 4


def _llama() -> Any:
    """Import llama_cpp (lazily: it loads a shared library) and set it up once."""
    global _BACKEND_READY, _LOG_CB
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - dependency missing
        raise ModelError(f"llama-cpp-python is not importable: {e}") from None
    if not _BACKEND_READY:
        passthrough = os.environ.get("CDR_LLAMA_LOG") == "1"
        last_level = [0]

        @llama_cpp.llama_log_callback
        def _cb(level: int, text: bytes, _user: Any) -> None:
            # llama.cpp chatters on stderr even with verbose=False; keep only
            # errors, and keep them to ourselves: they become part of a one-line
            # ModelError when a load fails.
            lvl = last_level[0] if level == GGML_LOG_LEVEL_CONT else level
            last_level[0] = lvl
            msg = text.decode("utf-8", "replace") if text else ""
            if passthrough:
                sys.stderr.write(msg)
            elif lvl == GGML_LOG_LEVEL_ERROR and msg.strip():
                with _LOG_LOCK:
                    _LOG_TAIL.append(msg.strip())

        _LOG_CB = _cb  # keep a reference: llama.cpp holds only the C pointer
        llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True
    return llama_cpp


def library_version() -> str:
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "unknown"))


def system_info() -> str:
    return _llama().llama_print_system_info().decode("utf-8", "replace").strip()


def _last_error() -> str:
    with _LOG_LOCK:
        msgs = [m for m in _LOG_TAIL if m]
        _LOG_TAIL.clear()
    return msgs[-1] if msgs else ""


def check_gguf_header(path: Path) -> None:
    """Fail fast, with one clear line, before llama.cpp sees a bad file."""
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise ModelError(f"not a GGUF file (bad magic): {path}")


#: llama_ftype values for ``convert_gguf`` (llama.h: LLAMA_FTYPE_ALL_F32,
#: LLAMA_FTYPE_MOSTLY_F16, LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_BF16).
_FTYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


def convert_gguf(src: Path, dst: Path, kind: str, n_threads: int = 0) -> None:
    """Rewrite the GGUF ``src`` with weights of type ``kind`` into ``dst``.

    llama.cpp's own quantizer, with requantizing allowed: from a Q4 file an
    F16 file holds exactly the dequantized Q4 weights (rounded to f16), so
    the model is the same, only stored in a type whose CPU kernels are faster
    for small models.  Deterministic: the same input gives the same bytes.
    """
    if kind not in _FTYPES:
        raise ValueError(f"unknown weight type {kind!r}; known: {', '.join(_FTYPES)}")
    check_gguf_header(src)
    ll = _llama()
    params = ll.llama_model_quantize_default_params()
    params.ftype = _FTYPES[kind]
    params.allow_requantize = True
    params.nthread = n_threads if n_threads > 0 else max(1, os.cpu_count() or 1)
    rc = ll.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        why = _last_error()
        raise ModelError(f"cannot convert {src} to {kind}: {why or f'llama_model_quantize returned {rc}'}")


def vocab_specials(path: Path) -> dict[str, Any]:
    """The special tokens llama.cpp takes for a GGUF (vocabulary only, no weights
    loaded): BOS/EOS/EOT ids, whether BOS is added, and every end-of-generation
    token.  Where a GGUF names no EOT, llama.cpp picks one by name in a hash-map
    order no other library reproduces: another backend asks here, so the tokens
    around the text are the same whichever library scores."""
    check_gguf_header(path)
    ll = _llama()
    mp = ll.llama_model_default_params()
    mp.vocab_only = True
    mp.use_extra_bufts = False
    model = ll.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise ModelError(f"cannot read the vocabulary of {path}: {_last_error() or 'llama.cpp rejected the file'}")
    try:
        v = ll.llama_model_get_vocab(model)
        n = int(ll.llama_vocab_n_tokens(v))
        return {
            "add_bos": bool(ll.llama_vocab_get_add_bos(v)),
            "bos": int(ll.llama_vocab_bos(v)),
            "eos": int(ll.llama_vocab_eos(v)),
            "eot": int(ll.llama_vocab_eot(v)),
            "eog": [t for t in range(n) if ll.llama_vocab_is_eog(v, t)],
        }
    finally:
        ll.llama_model_free(model)


class _Weights:
    """A loaded llama_model, shared by every context that uses it (refcounted)."""

    def __init__(self, path: Path, name: str, n_gpu_layers: int) -> None:
        check_gguf_header(path)
        ll = _llama()
        self._ll = ll
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        mp.use_extra_bufts = False  # AMX segfault on default builds; see module docstring
        mp.use_mmap = True
        model = ll.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            why = _last_error()
            from ..gguf_check import gguf_problem

            try:  # llama.cpp often says only "failed to load model": say what is wrong
                why = gguf_problem(path) or why
            except OSError:
                pass
            raise ModelError(
                f"cannot load model {name!r} from {path}: {why or 'llama.cpp rejected the file (corrupt or unsupported GGUF)'}"
            )
        self.ptr: Any = model
        self.refs = 0

    def release(self) -> None:
        self.refs -= 1
        if self.refs <= 0 and self.ptr is not None:
            self._ll.llama_model_free(self.ptr)
            self.ptr = None


class LlamaModel:
    """One GGUF model with one llama.cpp context, scoring token sequences.

    ``LlamaModel.sibling()`` opens another context on the same weights: the
    two sides of a one-model pair (and the router) each keep their own KV
    cache, so each keeps its own cached prompt prefix, at no extra weight memory.
    """

    def __init__(
        self,
        path: str | Path,
        settings: EngineSettings,
        name: str | None = None,
        *,
        embeddings: bool = False,
        _weights: _Weights | None = None,
    ) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        self.settings = settings
        ll = _llama()
        self._ll = ll
        self._model = None
        self._ctx = None
        self._batch = None
        self._pool: _RowPool | None = None
        self._weights = _weights or _Weights(self.path, self.name, settings.n_gpu_layers)
        self._weights.refs += 1
        model = self._weights.ptr
        self._model = model
        self._vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train = int(ll.llama_model_n_ctx_train(model))

        self.n_seq_max = max(1, settings.n_seq_max if settings.parallel_responses else 1)
        self._check_n_ctx(settings.n_ctx)
        cp = ll.llama_context_default_params()
        cp.n_ctx = settings.n_ctx
        cp.n_batch = settings.n_batch
        cp.n_ubatch = min(settings.n_ubatch, settings.n_batch)
        cp.n_seq_max = self.n_seq_max
        cp.kv_unified = True  # sequences share the context cells: seq_cp costs nothing
        cp.n_threads = settings.threads()
        cp.n_threads_batch = settings.threads()
        cp.no_perf = True
        # embeddings: per-token final hidden states (after the output norm), no pooling
        cp.embeddings = embeddings
        cp.pooling_type = 0  # LLAMA_POOLING_TYPE_NONE
        self.embeddings = embeddings
        self.n_embd = int(ll.llama_model_n_embd(model))
        # Flash attention changes numerics with the batch size (a different
        # kernel above 64 rows); the plain path is batch-size independent.
        cp.flash_attn_type = 1 if settings.flash_attn else 0
        # GPU kernels are not batch-shape invariant (see module docstring), so
        # on a GPU every request is decoded from an empty cache; and a CPU run
        # on a GPU build must not have its big batches shipped to the GPU.
        self.gpu = settings.n_gpu_layers != 0
        cp.op_offload = self.gpu
        ctx = ll.llama_init_from_model(model, cp)
        if not ctx:
            why = _last_error()
            self.close()
            raise ModelError(f"cannot create a llama.cpp context for {self.name!r} (n_ctx={settings.n_ctx}): {why}")
        self._ctx = ctx
        self.n_ctx = int(ll.llama_n_ctx(ctx))
        self.n_batch = int(ll.llama_n_batch(ctx))
        # decode at most one ubatch per call, so llama.cpp never splits a batch
        # into pieces smaller than MIN_ROWS behind our back
        self.n_chunk = min(self.n_batch, int(ll.llama_n_ubatch(ctx)))
        self._mem = ll.llama_get_memory(ctx)
        self._batch = ll.llama_batch_init(self.n_batch, 0, self.n_seq_max)
        n = self.n_batch
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(n,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(n,))
        self._b_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(n,))
        self._b_seq = [np.ctypeslib.as_array(self._batch.seq_id[i], shape=(self.n_seq_max,)) for i in range(n)]
        self._b_nseq[:] = 1
        for i in range(n):
            self._b_seq[i][0] = 0
        self._seq_dirty = False
        # benchmarks/bench.py sets a list here to record every llama.cpp call
        # (decodes and KV-cache edits) and replay them bare: the "ceiling"
        self.trace: list[tuple[Any, ...]] | None = None

        # KV-cache state of sequence 0 (see _decode_context)
        self._cached_segments: list[tuple[int, ...]] = []
        self._cached_last_row: np.ndarray | None = None
        self._ctx_tokens = np.zeros(0, dtype=np.int32)

        self.add_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))
        self.bos_id = int(ll.llama_vocab_bos(self._vocab))
        self.eos_id = int(ll.llama_vocab_eos(self._vocab))
        self.eot_id = int(ll.llama_vocab_eot(self._vocab))

    # ------------------------------------------------------------------ info
    def _check_n_ctx(self, n_ctx: int) -> None:
        """Refuse a context the model was not trained for, or whose KV cache
        (f16 keys and values, every layer) would not fit in the free memory:
        llama.cpp would allocate it without a check and be killed."""
        ll = self._ll
        if self.n_ctx_train > 0 and n_ctx > self.n_ctx_train:
            self.close()
            raise ModelError(f"n_ctx {n_ctx} exceeds the trained context of model {self.name} ({self.n_ctx_train} tokens): pass --n-ctx {self.n_ctx_train} or less")
        n_head = max(1, int(ll.llama_model_n_head(self._model)))
        kv = n_ctx * int(ll.llama_model_n_layer(self._model)) * 2 * int(ll.llama_model_n_head_kv(self._model)) * (
            int(ll.llama_model_n_embd(self._model)) // n_head) * 2
        free = _available_memory()
        if free is not None and kv > free:
            self.close()
            raise ModelError(
                f"n_ctx {n_ctx} needs a {kv / 2**30:.1f} GiB KV cache for {self.name!r}, more than the {free / 2**30:.1f} GiB of memory available"
            )

    def chat_template(self) -> str | None:
        raw = self._ll.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", "replace") if raw else None

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = self._ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (a UTF-8 character may span several tokens)."""
        if token < 0:
            return b""
        buf = ctypes.create_string_buffer(256)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)]

    def token_text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._ll.llama_vocab_is_eog(self._vocab, token))

    def end_token(self) -> int:
        """The token that ends an assistant turn when the template writes none."""
        for t in (self.eot_id, self.eos_id):
            if t >= 0:
                return t
        raise ModelError(f"model {self.name!r} has neither an EOT nor an EOS token")

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (ctypes.c_int32 * cap)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (ctypes.c_int32 * cap)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise ModelError(f"tokenization failed for model {self.name!r}")
        return list(buf[:n])

    def detokenize(self, tokens: list[int]) -> str:
        """Join the tokens' bytes, then decode once (so split characters survive)."""
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", "replace")

    # ---------------------------------------------------------------- decode
    def _decode(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, want: np.ndarray) -> np.ndarray | None:
        """One llama_decode; returns a view of the logits rows requested (in batch order)."""
        batch = self._batch
        assert batch is not None, "model is closed"
        n = len(tokens)
        self._b_token[:n] = tokens
        self._b_pos[:n] = pos
        self._b_logits[:n] = want
        if self._seq_dirty or seq.any():  # sequential scoring only ever uses seq 0
            for i in range(n):
                self._b_seq[i][0] = seq[i]
            self._seq_dirty = bool(seq.any())
        batch.n_tokens = n
        if self.trace is not None:
            self.trace.append(("decode", tokens.copy(), pos.copy(), seq.copy(), want.copy()))
        rc = self._ll.llama_decode(self._ctx, batch)
        if rc != 0:
            why = _last_error()
            raise ModelError(f"llama_decode failed for {self.name!r} (code {rc}){': ' + why if why else ''}")
        n_out = int(want.sum())
        if n_out == 0:
            return None
        ptr = self._ll.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

    def _seq_rm(self, seq: int, start: int) -> None:
        """Drop ``seq``'s cells from position ``start`` on (seq -1: every sequence)."""
        if self.trace is not None:
            self.trace.append(("rm", seq, start))
        self._ll.llama_memory_seq_rm(self._mem, seq, start, -1)

    def _seq_cp(self, src: int, dst: int, end: int) -> None:
        if self.trace is not None:
            self.trace.append(("cp", src, dst, end))
        self._ll.llama_memory_seq_cp(self._mem, src, dst, 0, end)

    def _decode_context(self, segments: tuple[tuple[int, ...], ...]) -> np.ndarray:
        """Decode the context into seq 0 at cells [0, P); return the last logits row (a copy)."""
        if self.gpu:  # no reuse (keep = 0 below clears the cache): the numbers may depend only on this request
            self._cached_segments = []
            self._cached_last_row = None
        keep = 0
        while (
            keep < len(segments)
            and keep < len(self._cached_segments)
            and segments[keep] == self._cached_segments[keep]
        ):
            keep += 1
        if keep == len(segments) == len(self._cached_segments) and self._cached_last_row is not None:
            return self._cached_last_row
        flat = np.fromiter((t for seg in segments for t in seg), dtype=np.int32)
        P = len(flat)
        start = sum(len(s) for s in segments[:keep])
        # never decode fewer than MIN_ROWS tokens at once (see module docstring):
        # back up and recompute a few cached tokens -- bitwise the same KV.
        start = min(start, max(0, P - MIN_ROWS))
        self._seq_rm(-1, start)
        self._cached_segments = []
        self._cached_last_row = None
        spans = _spans(P - start, self.n_chunk)
        last_row: np.ndarray | None = None
        for a, b in spans:
            n = b - a
            want = np.zeros(n, dtype=np.int8)
            if b == P - start:
                want[-min(MIN_ROWS, n) :] = 1
            rows = self._decode(flat[start + a : start + b], np.arange(start + a, start + b, dtype=np.int32), np.zeros(n, dtype=np.int32), want)
            if rows is not None:
                last_row = np.array(rows[-1], dtype=np.float32)
        assert last_row is not None
        self._cached_segments = list(segments)
        self._cached_last_row = last_row
        self._ctx_tokens = flat
        return last_row

    def loglikelihood(self, requests: list[ScoreRequest]) -> list[list[np.ndarray]]:
        return [self._score_one(r) for r in requests]

    def _score_one(self, req: ScoreRequest) -> list[np.ndarray]:
        P = req.context_len
        if P == 0:
            raise ValueError("empty context: a continuation needs at least one context token (BOS or prompt)")
        conts = [np.asarray(c, dtype=np.int32) for c in req.continuations]
        if any(len(c) == 0 for c in conts):
            raise ValueError("empty continuation")
        longest = max(len(c) for c in conts)
        if P + longest > self.n_ctx:
            raise ValueError(f"context {P} + continuation {longest} tokens exceed n_ctx {self.n_ctx}")
        first_row = self._decode_context(req.context)
        first_lse = float(_lse_rows(first_row[None, :])[0])  # shared by every continuation
        out: list[np.ndarray] = [np.empty(len(c), dtype=np.float64) for c in conts]
        for j, c in enumerate(conts):
            out[j][0] = float(first_row[c[0]]) - first_lse
        todo = [j for j, c in enumerate(conts) if len(c) > 1]
        if not todo:
            return out
        groups: list[list[int]]
        total = P + sum(len(conts[j]) - 1 for j in todo)
        if self.settings.parallel_responses and len(todo) > 1 and total <= self.n_ctx:
            groups = [todo[i : i + self.n_seq_max] for i in range(0, len(todo), self.n_seq_max)]
        else:
            groups = [[j] for j in todo]
        for group in groups:
            self._decode_continuations(P, [conts[j] for j in group], [out[j] for j in group])
        return out

    def _decode_continuations(self, P: int, conts: list[np.ndarray], outs: list[np.ndarray]) -> None:
        """Decode continuations (each as its own sequence) after the cached context; fill ``outs[j][1:]``."""
        n_dec = sum(len(c) - 1 for c in conts)
        # recompute a few context tokens if the batch would be smaller than MIN_ROWS
        back = min(P, max(0, MIN_ROWS - n_dec))
        ctx = self._ctx_tokens
        toks = [ctx[P - back : P]]
        pos = [np.arange(P - back, P, dtype=np.int32)]
        seq = [np.zeros(back, dtype=np.int32)]
        tgt = [np.full(back, -1, dtype=np.int32)]
        slot = [np.zeros(back, dtype=np.int64)]
        which = [np.zeros(back, dtype=np.int64)]
        if back:
            self._seq_rm(0, P - back)
        for s in range(1, len(conts)):
            self._seq_cp(0, s, P)
        for s, c in enumerate(conts):
            k = len(c) - 1
            toks.append(c[:-1])
            pos.append(np.arange(P, P + k, dtype=np.int32))
            seq.append(np.full(k, s, dtype=np.int32))
            tgt.append(c[1:])
            slot.append(np.arange(1, k + 1, dtype=np.int64))
            which.append(np.full(k, s, dtype=np.int64))
        T, Pp, S, G = (np.concatenate(x) for x in (toks, pos, seq, tgt))
        K, W = np.concatenate(slot), np.concatenate(which)
        want = np.ones(len(T), dtype=np.int8)
        for a, b in _spans(len(T), self.n_chunk):
            rows = self._decode(T[a:b], Pp[a:b], S[a:b], want[a:b])
            assert rows is not None
            sel = np.nonzero(G[a:b] >= 0)[0]
            if len(sel) == 0:
                continue
            # fancy indexing copies the rows (a 152k-vocab row is 0.6 MB): only when needed
            lp = _logprobs_rows(rows if len(sel) == len(rows) else rows[sel], G[a:b][sel], self._row_pool())
            for w, k, v in zip(W[a:b][sel], K[a:b][sel], lp, strict=True):
                outs[w][k] = v
        # rewind: drop the continuations, keep the context in seq 0
        for s in range(1, len(conts)):
            self._seq_rm(s, -1)
        self._seq_rm(0, P)

    def _row_pool(self) -> _RowPool | None:
        """The log-softmax's threads: as many as llama.cpp's, made on first use."""
        if self._pool is None and self.settings.threads() > 1:
            self._pool = _RowPool(self.settings.threads())
        return self._pool

    # --------------------------------------------------------------- cleanup
    def describe(self) -> dict[str, Any]:
        """The backend and what changes its numbers (see ``engine.LanguageModel``)."""
        v = library_version()
        return {"backend": "llama.cpp", "library": "llama-cpp-python", "version": v, "numerics": {"llama_cpp_python": v}}

    def sibling(self, *, embeddings: bool = False) -> LlamaModel:
        """Another context on the same weights (see class docstring)."""
        return LlamaModel(self.path, self.settings, self.name, embeddings=embeddings, _weights=self._weights)

    def generate(
        self,
        context: tuple[int, ...],
        *,
        max_tokens: int,
        temperature: float = 0.7,
        top_p: float = 0.95,
        seed: int = 0,
        on_token: Any = None,
    ) -> list[int]:
        """Sample a continuation of ``context`` (ends at an end-of-generation token,
        which is included, or after ``max_tokens``).

        Sampling is done in numpy from llama.cpp's logits with a generator seeded
        by ``seed``: temperature, then nucleus (top-p); temperature 0 is greedy.
        The same context, settings and seed give the same tokens.
        """
        row = self._decode_context((tuple(context),))
        P = len(context)
        rng = np.random.default_rng(seed)
        out: list[int] = []
        pos = P
        try:
            for _ in range(max_tokens):
                t = sample(row, rng, temperature, top_p)
                out.append(t)
                if on_token is not None:
                    on_token()
                if self.is_eog(t) or pos + 1 >= self.n_ctx:
                    break
                rows = self._decode(
                    np.array([t], dtype=np.int32), np.array([pos], dtype=np.int32), np.zeros(1, dtype=np.int32), np.ones(1, dtype=np.int8)
                )
                assert rows is not None
                row = np.array(rows[0], dtype=np.float32)
                pos += 1
        finally:
            # back to "context only" in the cache, as the scoring paths expect
            self._seq_rm(0, P)
        return out

    def hidden_states(self, tokens: list[int]) -> np.ndarray:
        """Final-layer hidden states (after the output norm) of ``tokens`` decoded
        alone from position 0: shape (len(tokens), n_embd), float32.

        Needs a context made with ``embeddings=True``.  Chunked like scoring,
        so the numbers depend on the tokens alone.
        """
        if not self.embeddings:
            raise ValueError("this context was not created with embeddings=True")
        ll = self._ll
        toks = np.asarray(tokens[: self.n_ctx], dtype=np.int32)
        ll.llama_memory_clear(self._mem, True)
        self._cached_segments = []
        self._cached_last_row = None
        out = np.empty((len(toks), self.n_embd), dtype=np.float32)
        for a, b in _spans(len(toks), self.n_chunk):
            n = b - a
            self._decode(toks[a:b], np.arange(a, b, dtype=np.int32), np.zeros(n, dtype=np.int32), np.ones(n, dtype=np.int8))
            ptr = ll.llama_get_embeddings(self._ctx)
            out[a:b] = np.ctypeslib.as_array(ptr, shape=(n, self.n_embd))
        ll.llama_memory_clear(self._mem, True)
        return out

    def close(self) -> None:
        ll = self._ll
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            self._model = None
            self._weights.release()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spans(n: int, n_batch: int) -> list[tuple[int, int]]:
    """Split [0, n) into decode chunks of at most n_batch tokens, none shorter
    than MIN_ROWS (unless n itself is): a short tail takes tokens from the
    chunk before it.  Which chunking is used does not change any number as
    long as every chunk has >= MIN_ROWS rows."""
    bounds = [*range(0, n, n_batch), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_ROWS:
        bounds[-2] = n - MIN_ROWS
    return list(zip(bounds[:-1], bounds[1:], strict=False))


def _lse_row(row: np.ndarray, buf: np.ndarray) -> float:
    """log(sum(exp(row))) in float64, max-shifted; ``buf`` is scratch of the row's size.

    One row at a time, in place: measured 2.2x faster than 16-row blocks with
    fresh temporaries (a 152k-vocab row is 0.6 MB and stays in cache).  The sum
    accumulates in float64.  Every row is computed the same way whichever
    thread or call it lands in, so the bits do not depend on the pool.
    """
    m = row.max()
    np.subtract(row, m, out=buf)
    np.exp(buf, out=buf)
    return float(np.float64(m) + np.log(buf.sum(dtype=np.float64)))


_SCRATCH = threading.local()


def _scratch(n_vocab: int, dtype: np.dtype[Any]) -> np.ndarray:
    """This thread's reusable one-row buffer (no allocation per row)."""
    buf: np.ndarray | None = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.shape[0] != n_vocab or buf.dtype != dtype:
        buf = np.empty(n_vocab, dtype=dtype)
        _SCRATCH.buf = buf
    return buf


def _lse_span(rows: np.ndarray, out: np.ndarray, a: int, b: int) -> None:
    buf = _scratch(rows.shape[1], rows.dtype)
    for i in range(a, b):
        out[i] = _lse_row(rows[i], buf)


class _RowPool:
    """Threads for the log-softmax; numpy releases the GIL inside its loops."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.executor = ThreadPoolExecutor(n, thread_name_prefix="cdr-logsoftmax")

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


def _lse_rows(rows: np.ndarray, pool: _RowPool | None = None) -> np.ndarray:
    """log(sum(exp(row))) per row, float64.

    With a ``pool`` the rows are split across its threads (numpy releases the
    GIL inside its loops): on a GPU the log-softmax, not the model, was half
    of the time.  The result is bitwise the same with or without a pool.
    """
    n = rows.shape[0]
    out = np.empty(n, dtype=np.float64)
    if pool is None or pool.n < 2 or n < 2 * _LSE_MIN_ROWS_PER_THREAD:
        _lse_span(rows, out, 0, n)
        return out
    k = min(pool.n, n // _LSE_MIN_ROWS_PER_THREAD)
    bounds = [n * t // k for t in range(k + 1)]
    futs = [pool.executor.submit(_lse_span, rows, out, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    for f in futs:
        f.result()
    return out


def _logprobs_rows(rows: np.ndarray, targets: np.ndarray, pool: _RowPool | None = None) -> np.ndarray:
    """log softmax(rows)[i, targets[i]] for each row, float64."""
    picked = rows[np.arange(rows.shape[0]), targets].astype(np.float64)
    return picked - _lse_rows(rows, pool)


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
