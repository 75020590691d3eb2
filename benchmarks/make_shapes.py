"""Random-weight GGUFs with the exact shapes of 7B-class models, for throughput work.

No 7B weights are reachable from these machines, but throughput does not depend on
the weights' values: a model with Llama-3-8B's (or Mistral-7B's, Qwen2.5-7B's)
tensor shapes, vocabulary size, attention layout and file type decodes at the same
speed as the real one.  This writes such a file with the ``gguf`` package (F16,
tensors streamed to disk one at a time, so memory stays at one tensor), then, for
``--type q4_k_m`` / ``q8_0``, quantizes it with llama.cpp's own quantizer.

The tokenizer is the tests' byte-level BPE (``tests/tinygguf.py``) padded with
unused tokens to the real vocabulary size, so the output layer and the logit rows
are full size; text tokenizes to more tokens than with the real tokenizer, which
changes nothing per token.  A registry for ``benchmarks/bench.py`` is written next
to the models.

    python benchmarks/make_shapes.py --shape llama3-8b --type q4_k_m --out /data/shapes
    python benchmarks/bench.py --models /data/shapes/models.toml --pair llama3-8b-q4_k_m --workloads single
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


@dataclass(frozen=True)
class Shape:
    arch: str  # llama.cpp architecture
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rope_base: float
    n_ctx_train: int
    qkv_bias: bool = False
    tied: bool = False  # output layer shares the token embedding


SHAPES = {
    # config.json of meta-llama/Meta-Llama-3-8B-Instruct, mistralai/Mistral-7B-Instruct-v0.2, Qwen/Qwen2.5-7B-Instruct
    "llama3-8b": Shape("llama", 4096, 32, 32, 8, 14336, 128256, 500000.0, 8192),
    "mistral-7b": Shape("llama", 4096, 32, 32, 8, 14336, 32000, 1000000.0, 32768),
    "qwen2.5-7b": Shape("qwen2", 3584, 28, 28, 4, 18944, 152064, 1000000.0, 32768, qkv_bias=True),
    # a small shape with the same structure, for tests of this script
    "test-small": Shape("llama", 64, 2, 4, 2, 128, 1000, 10000.0, 2048),
}
QUANT_TYPES = {"f16": None, "q8_0": 7, "q4_k_m": 15}  # llama_ftype values


def tensors(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor, in llama.cpp's names; numpy (rows, cols) = ggml ne (cols, rows)."""
    hd = s.n_embd // s.n_head
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (s.n_vocab, s.n_embd)), ("output_norm.weight", (s.n_embd,))]
    if not s.tied:
        out.append(("output.weight", (s.n_vocab, s.n_embd)))
    for i in range(s.n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (s.n_embd,)), (p + "attn_q.weight", (s.n_head * hd, s.n_embd)),
                (p + "attn_k.weight", (s.n_head_kv * hd, s.n_embd)), (p + "attn_v.weight", (s.n_head_kv * hd, s.n_embd))]
        if s.qkv_bias:
            out += [(p + "attn_q.bias", (s.n_head * hd,)), (p + "attn_k.bias", (s.n_head_kv * hd,)), (p + "attn_v.bias", (s.n_head_kv * hd,))]
        out += [(p + "attn_output.weight", (s.n_embd, s.n_head * hd)), (p + "ffn_norm.weight", (s.n_embd,)),
                (p + "ffn_gate.weight", (s.n_ff, s.n_embd)), (p + "ffn_up.weight", (s.n_ff, s.n_embd)),
                (p + "ffn_down.weight", (s.n_embd, s.n_ff))]
    return out


def write_f16(shape_name: str, path: Path, seed: int = 0) -> Path:
    import gguf
    from tinygguf import CHATML, tiny_vocab

    s = SHAPES[shape_name]
    tokens, types, merges, sid = tiny_vocab(add_bos=False)
    if len(tokens) > s.n_vocab:
        raise ValueError(f"{shape_name}: vocabulary smaller than the test tokenizer's")
    tokens += [f"<unused{i}>" for i in range(s.n_vocab - len(tokens))]
    types += [int(gguf.TokenType.UNUSED)] * (s.n_vocab - len(types))
    hd = s.n_embd // s.n_head
    w = gguf.GGUFWriter(str(path), s.arch)
    w.add_name(f"random-{shape_name}")
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s.n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(sid["<|endoftext|>"])
    w.add_eos_token_id(sid["<|im_end|>"])
    w.add_eot_token_id(sid["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    specs = tensors(s)
    for name, shp in specs:
        dt = np.float32 if len(shp) == 1 else np.float16  # norms and biases stay f32, as converters write them
        w.add_tensor_info(name, shp, np.dtype(dt), int(np.prod(shp)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shp in specs:
        if len(shp) == 1:
            t = (1.0 + 0.1 * rng.standard_normal(shp)).astype(np.float32) if name.endswith("norm.weight") else np.zeros(shp, np.float32)
        else:
            std = 1.0 if name == "token_embd.weight" else 1.0 / np.sqrt(shp[1])
            t = np.empty(shp, np.float16)
            for r0 in range(0, shp[0], 4096):  # in slabs: a 128k x 4096 embedding is 1 GiB in f16
                t[r0 : r0 + 4096] = (rng.standard_normal((min(4096, shp[0] - r0), shp[1]), dtype=np.float32) * std).astype(np.float16)
        w.write_tensor_data(t)
    w.close()
    return path


def quantize(src: Path, dst: Path, ftype: int, threads: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"quantize failed ({rc})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), required=True)
    ap.add_argument("--type", action="append", choices=sorted(QUANT_TYPES), default=None, help="f16, q8_0, q4_k_m (repeatable)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-f16", action="store_true", help="keep the F16 file when only quantized types were asked for")
    args = ap.parse_args(argv)
    types = args.type or ["f16"]
    args.out.mkdir(parents=True, exist_ok=True)
    reg = ["# random-weight models with real 7B-class shapes (benchmarks/make_shapes.py)"]
    for name in args.shape:
        f16 = args.out / f"{name}-f16.gguf"
        if not f16.exists():
            t = time.time()
            write_f16(name, f16)
            print(f"{f16}: {f16.stat().st_size / 2**30:.2f} GiB in {time.time() - t:.0f} s", flush=True)
        for ty in types:
            path = f16 if ty == "f16" else args.out / f"{name}-{ty}.gguf"
            if ty != "f16" and not path.exists():
                t = time.time()
                quantize(f16, path, int(QUANT_TYPES[ty] or 0), args.threads)
                print(f"{path}: {path.stat().st_size / 2**30:.2f} GiB in {time.time() - t:.0f} s", flush=True)
        if "f16" not in types and not args.keep_f16:
            f16.unlink()
    # every shape file in the folder, from this run or an earlier one (so runs add up)
    for name in sorted(SHAPES):
        for ty in QUANT_TYPES:
            key = f"{name}-{ty}"
            if (args.out / f"{key}.gguf").exists():
                reg += [f'[models."{key}"]', f'path = "{key}.gguf"', "", f'[pairs."{key}"]', f'strong = "{key}"', f'weak = "{key}"', ""]
    (args.out / "models.toml").write_text("\n".join(reg) + "\n")
    print(f"registry: {args.out / 'models.toml'}")


if __name__ == "__main__":
    main()
