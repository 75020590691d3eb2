"""Hugging Face transformers backend (``backend = "transformers"`` in models.toml).

Reads the registry's GGUF with ``from_pretrained(folder, gguf_file=name)``:
transformers dequantizes the weights its own way (to float32 here), so its
numbers are *not* llama.cpp's -- the metadata says so, and the resume guard
refuses to mix the two backends.  The GGUF's metadata (chat template, ...) is
read with the ``gguf`` package, and its special tokens (BOS/EOS/EOT, the
end-of-generation set, add-BOS) are llama.cpp's own, from a vocabulary-only
load (``llama.vocab_specials``), so the tokens around the text are exactly
llama.cpp's; the text itself goes through the tokenizer transformers builds
from the GGUF (the tests check both give the same ids on the shipped models).

Scoring is batch-first, lm-evaluation-harness style: one forward pass over
a request's continuations, right-padded to the longest, with the attention
mask; log-softmax in float64 and a gather of each continuation token, on the
model's device.  A request is never batched with another, so its numbers
depend on the request alone (the engine's contract).  It is not bitwise
invariant to the batch *within* a request: float32 matrix products of another
shape move a response's log-probs by up to 7e-7 per token with its siblings
(measured on the tiny test models; bitwise the same on SmolLM2), which
``tests/test_backend_hf.py`` bounds against a one-sequence reference.

Device: the GPU when ``n_gpu_layers != 0`` and torch sees one, else the CPU
with ``n_threads`` threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from . import EngineSettings, ScoreRequest
from .llama import vocab_specials
from .sampling import sample


class _Weights:
    """The loaded transformers model and tokenizer, shared by siblings."""

    def __init__(self, path: Path, name: str, settings: EngineSettings) -> None:
        import torch  # type: ignore[import-not-found,unused-ignore]
        import transformers  # type: ignore[import-not-found,unused-ignore]
        from transformers import AutoModelForCausalLM, AutoTokenizer  # type: ignore[import-not-found,unused-ignore]
        from transformers.utils import logging as hf_logging  # type: ignore[import-not-found,unused-ignore]

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        torch.set_num_threads(settings.threads())
        self.torch: Any = torch
        self.tok: Any = None
        self.model: Any = None
        self.device = torch.device("cuda" if settings.n_gpu_layers != 0 and torch.cuda.is_available() else "cpu")
        # the GGUF conversion draws a progress bar of its own: cdr's display says what loads
        conv: Any = None
        try:
            import transformers.modeling_gguf_pytorch_utils as conv  # type: ignore[import-not-found,unused-ignore,no-redef]
        except ImportError:  # pragma: no cover - another transformers layout
            pass
        bar = getattr(conv, "tqdm", None)
        if bar is not None:
            conv.tqdm = lambda it, *a, **k: it
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except Exception as e:  # transformers raises many kinds for an unsupported file
            raise ModelError(f"transformers cannot load {name!r} ({path.name}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        finally:
            if bar is not None:
                conv.tqdm = bar
        self.model.to(device=self.device)
        self.model.eval()
        self.versions = {"transformers": transformers.__version__, "torch": torch.__version__}
        self.refs = 0


def _gguf_fields(path: Path) -> dict[str, Any]:
    """The GGUF's scalar and string metadata (not the token lists)."""
    from gguf import GGUFReader  # type: ignore[import-not-found,unused-ignore]

    r = GGUFReader(str(path))
    out: dict[str, Any] = {}
    for k, f in r.fields.items():
        if k.startswith("tokenizer.ggml.") and k.endswith(("tokens", "token_type", "merges", "scores")):
            continue
        try:
            out[k] = f.contents()
        except Exception:  # pragma: no cover - an odd field type
            continue
    return out


class HFModel:
    """A GGUF model run by transformers; implements ``engine.LanguageModel``."""

    def __init__(self, path: str | Path, settings: EngineSettings, name: str | None = None, *,
                 embeddings: bool = False, _weights: _Weights | None = None, _fields: dict[str, Any] | None = None,
                 _specials: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        self.settings = settings
        self.embeddings = embeddings
        self._fields = _fields if _fields is not None else _gguf_fields(self.path)
        self._w = _weights or _Weights(self.path, self.name, settings)
        self._w.refs += 1
        cfg = self._w.model.config
        self.n_vocab = int(cfg.vocab_size)
        self.n_embd = int(cfg.hidden_size)
        trained = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        if trained and settings.n_ctx > trained:
            raise ModelError(f"n_ctx {settings.n_ctx} exceeds the trained context of model {self.name} ({trained} tokens): pass --n-ctx {trained} or less")
        self.n_ctx = settings.n_ctx
        sp = _specials if _specials is not None else vocab_specials(self.path)
        self._specials = sp
        self.bos_id, self.eos_id, self.eot_id = int(sp["bos"]), int(sp["eos"]), int(sp["eot"])
        self.add_bos = bool(sp["add_bos"]) and self.bos_id >= 0
        self._eog = frozenset(int(t) for t in sp["eog"])

    # ------------------------------------------------------------------ info
    def describe(self) -> dict[str, Any]:
        v = self._w.versions
        return {
            "backend": "transformers",
            "library": "transformers",
            "version": v["transformers"],
            "torch": v["torch"],
            "device": str(self._w.device),
            "dtype": "float32",
            "note": "weights dequantized by transformers; numbers differ from llama.cpp's",
            "numerics": {"transformers": v["transformers"], "torch": v["torch"], "device": self._w.device.type},
        }

    def chat_template(self) -> str | None:
        t = self._fields.get("tokenizer.chat_template")
        return str(t) if t else None

    def meta(self, key: str) -> str | None:
        v = self._fields.get(key)
        return None if v is None else str(v)

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        ids = list(self._w.tok(text, add_special_tokens=False, split_special_tokens=not parse_special)["input_ids"])
        return [self.bos_id, *ids] if add_special and self.add_bos else ids

    def detokenize(self, tokens: list[int]) -> str:
        return str(self._w.tok.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def token_text(self, token: int) -> str:
        return self.detokenize([token]) if token >= 0 else ""

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def end_token(self) -> int:
        for t in (self.eot_id, self.eos_id):
            if t >= 0:
                return t
        raise ModelError(f"model {self.name!r} has neither an EOT nor an EOS token")

    # ---------------------------------------------------------------- score
    def _forward(self, batch: list[list[int]], *, hidden: bool = False) -> Any:
        torch = self._w.torch
        n = max(len(x) for x in batch)
        ids = torch.zeros((len(batch), n), dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        with torch.inference_mode():
            out = self._w.model(input_ids=ids.to(self._w.device), attention_mask=mask.to(self._w.device),
                                output_hidden_states=hidden, use_cache=False)
        return out

    def loglikelihood(self, requests: list[ScoreRequest]) -> list[list[np.ndarray]]:
        return [self._score_one(r) for r in requests]

    def _score_one(self, req: ScoreRequest) -> list[np.ndarray]:
        torch = self._w.torch
        ctx = [t for seg in req.context for t in seg]
        P = len(ctx)
        if P == 0:
            raise ValueError("empty context: a continuation needs at least one context token (BOS or prompt)")
        conts = [list(c) for c in req.continuations]
        if any(len(c) == 0 for c in conts):
            raise ValueError("empty continuation")
        longest = max(len(c) for c in conts)
        if P + longest > self.n_ctx:
            raise ValueError(f"context {P} + continuation {longest} tokens exceed n_ctx {self.n_ctx}")
        # the last token of each continuation predicts nothing we score: not fed
        logits = self._forward([ctx + c[:-1] for c in conts]).logits
        out: list[np.ndarray] = []
        for i, c in enumerate(conts):
            rows = logits[i, P - 1 : P - 1 + len(c)].to(torch.float64)
            lp = torch.log_softmax(rows, dim=-1).gather(1, torch.tensor(c, device=rows.device)[:, None])[:, 0]
            out.append(lp.cpu().numpy().astype(np.float64))
        return out

    def hidden_states(self, tokens: list[int]) -> np.ndarray:
        if not self.embeddings:
            raise ValueError("this model was not opened with embeddings=True")
        toks = list(tokens[: self.n_ctx])
        hs = self._forward([toks], hidden=True).hidden_states[-1][0]  # after the final norm, as llama.cpp's
        return np.asarray(hs.float().cpu().numpy(), dtype=np.float32)

    def generate(self, context: tuple[int, ...], *, max_tokens: int, temperature: float = 0.7, top_p: float = 0.95,
                 seed: int = 0, on_token: Any = None) -> list[int]:
        """Sampled as llama.cpp's backend samples (``engine.sampling``), from this
        backend's logits; a full forward per token (no KV cache: simple, slow)."""
        rng = np.random.default_rng(seed)
        seq = list(context)
        out: list[int] = []
        for _ in range(max_tokens):
            row = self._forward([seq]).logits[0, -1].float().cpu().numpy()
            t = sample(row, rng, temperature, top_p)
            out.append(t)
            seq.append(t)
            if on_token is not None:
                on_token()
            if self.is_eog(t) or len(seq) >= self.n_ctx:
                break
        return out

    def sibling(self, *, embeddings: bool = False) -> HFModel:
        return HFModel(self.path, self.settings, self.name, embeddings=embeddings, _weights=self._w, _fields=self._fields,
                       _specials=self._specials)

    def close(self) -> None:
        w = getattr(self, "_w", None)
        if w is not None:
            w.refs -= 1
            self._w = None  # type: ignore[assignment]

    def __enter__(self) -> HFModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
