"""Tiny random GGUF models for tests that run real llama.cpp (no mocks).

``build_tiny_llama`` writes a ``llama``-architecture model with random weights
(a few hundred KiB, built in a few milliseconds) and a real, working GPT-2 style
byte-level BPE tokenizer, so ``llama_tokenize`` / ``llama_token_to_piece`` work
on arbitrary UTF-8 text and ``llama_decode`` produces finite, non-degenerate
logits.

Vocabulary layout (ids are stable for a given ``add_bos``):

* ``0..255``: the 256 GPT-2 byte-to-unicode symbols (``Ġ`` = space, ``Ċ`` = newline),
  in GPT-2 order, so byte ``b`` is the token whose text is ``bytes_to_unicode()[b]``;
* then one token per entry of ``MERGES`` (``Ġt``, ``he``, ``Ġthe``, ...);
* then the CONTROL tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
  and ``<s>`` when ``add_bos`` is true.

``eos`` = ``eot`` = ``<|im_end|>`` (an end-of-generation token for llama.cpp).
``bos`` = ``<s>`` with ``add_bos_token = true`` (a Llama/SmolLM-style model), or
``<|endoftext|>`` with ``add_bos_token = false`` (a Qwen-style model that never
prepends BOS).

Only ``numpy`` and the ``gguf`` package (``pip install gguf``) are needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "CHATML",
    "MERGES",
    "SPECIAL_TOKENS",
    "build_corrupt_variants",
    "build_tiny_llama",
    "bytes_to_unicode",
    "minimal_gguf",
    "tiny_vocab",
]

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The standard ChatML Jinja chat template (as shipped by Qwen2 / SmolLM2)."""

# BPE merges, in rank order. Each entry "a b" adds the token "a"+"b"; both halves
# must be byte symbols or the result of an earlier merge. "Ġ" is the GPT-2 symbol
# for a space, "Ċ" for a newline.
# fmt: off
MERGES: tuple[str, ...] = (
    "Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ a", "o n", "r e", "Ġ s", "e n",
    "a t", "o r", "Ġ w", "Ġ o", "Ġ c", "i s", "e s", "Ġ b", "a n", "Ġ f",
    "e d", "i t", "Ġ p", "a r", "Ġ m", "l l", "o u", "Ġ h", "in g", "Ġ d",
    "n d", "Ġa nd", "Ġo f", "Ġt o", "Ġ i", "Ġi n", "Ġi s", "l d", "Ġw or",
    "Ġwor ld", "H e", "He ll", "Hell o", "Ġ e", "Ġe nd", "Ġ Ġ", "Ċ Ċ",
    "Ġ y", "Ġy ou", "Ġ T", "ĠT he", "a l", "i c", "Ġ l", "Ġ n", "Ġ g",
)
# fmt: on

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN = "<s>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode symbol map (256 entries)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def tiny_vocab(add_bos: bool = True) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """Return ``(tokens, token_types, merges, special_ids)`` of the tiny tokenizer."""
    import gguf

    byte_syms = list(bytes_to_unicode().values())
    tokens: list[str] = list(byte_syms)
    known = set(tokens)
    for m in MERGES:
        a, b = m.split(" ")
        if a not in known or b not in known:
            raise ValueError(f"merge {m!r} uses an unknown token")
        merged = a + b
        if merged in known:
            raise ValueError(f"merge {m!r} produces a duplicate token {merged!r}")
        tokens.append(merged)
        known.add(merged)
    token_types = [int(gguf.TokenType.NORMAL)] * len(tokens)

    specials = list(SPECIAL_TOKENS) + ([BOS_TOKEN] if add_bos else [])
    special_ids: dict[str, int] = {}
    for s in specials:
        special_ids[s] = len(tokens)
        tokens.append(s)
        token_types.append(int(gguf.TokenType.CONTROL))
    return tokens, token_types, list(MERGES), special_ids


def build_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 2048,
    add_bos: bool = True,
    chat_template: str | None = CHATML,
    tokenizer: str = "gpt2",
    dtype: str = "f32",
) -> Path:
    """Write a tiny random ``llama`` GGUF model to ``path`` and return ``path``."""
    import gguf

    if tokenizer != "gpt2":
        raise ValueError(
            f"only the 'gpt2' (byte-level BPE) tokenizer is supported, not {tokenizer!r}"
        )
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be divisible by n_head, and n_head by n_head_kv")
    head_dim = n_embd // n_head
    if head_dim % 2:
        raise ValueError("head dimension (n_embd / n_head) must be even for RoPE")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, token_types, merges, sid = tiny_vocab(add_bos)
    n_vocab = len(tokens)
    wdtype = np.float32 if dtype == "f32" else np.float16
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, std: float) -> np.ndarray:
        # numpy shape (rows, cols) == ggml ne (cols, rows): `cols` is the input dim.
        return (rng.standard_normal((rows, cols)) * std).astype(wdtype)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-llama-{'bos' if add_bos else 'nobos'}-s{seed}")
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(sid[BOS_TOKEN] if add_bos else sid["<|endoftext|>"])
    w.add_eos_token_id(sid["<|im_end|>"])
    w.add_eot_token_id(sid["<|im_end|>"])
    w.add_pad_token_id(sid["<|endoftext|>"])
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    # Scales: embeddings ~N(0, 1) per component after RMS norm, so the output
    # projection with std 2/sqrt(n_embd) gives logits with std ~2: clearly
    # different log-probs per token, but far from one-hot.
    s_in = 1.0 / np.sqrt(n_embd)
    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd, 1.0))
    w.add_tensor("output_norm.weight", norm(n_embd))
    w.add_tensor("output.weight", mat(n_vocab, n_embd, 2.0 * s_in))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(n_embd))
        w.add_tensor(p + "attn_q.weight", mat(n_head * head_dim, n_embd, s_in))
        w.add_tensor(p + "attn_k.weight", mat(n_head_kv * head_dim, n_embd, s_in))
        w.add_tensor(p + "attn_v.weight", mat(n_head_kv * head_dim, n_embd, s_in))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_head * head_dim, 0.5 * s_in))
        w.add_tensor(p + "ffn_norm.weight", norm(n_embd))
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd, s_in))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd, s_in))
        w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff, 0.5 / np.sqrt(n_ff)))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build_corrupt_variants(dir: Path, good: Path) -> dict[str, Path]:
    """Write broken copies of the GGUF file ``good`` into ``dir``.

    Returns ``{"truncated": ..., "random": ..., "empty": ...}``: the first half of
    ``good``; random bytes of the same size (fixed seed); a zero-byte file.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    data = Path(good).read_bytes()
    out = {
        "truncated": dir / "truncated.gguf",
        "random": dir / "random.gguf",
        "empty": dir / "empty.gguf",
    }
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["random"].write_bytes(np.random.default_rng(1234).bytes(len(data)))
    out["empty"].write_bytes(b"")
    return out


def minimal_gguf(data: bytes, *, name: str = "fake") -> bytes:
    """A structurally whole GGUF (v3) holding ``data`` as one I8 tensor, built with
    the stdlib only: not a model llama.cpp can run, but one that passes the
    header/size check of ``cdr_local.gguf_check`` (and whose any prefix fails it)."""
    import struct

    def string(s: str) -> bytes:
        b = s.encode()
        return struct.pack("<Q", len(b)) + b

    kv = string("general.name") + struct.pack("<I", 8) + string(name)
    info = string("data") + struct.pack("<I", 1) + struct.pack("<Q", len(data)) + struct.pack("<IQ", 24, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + kv + info
    head += b"\0" * (-len(head) % 32)
    return head + data
