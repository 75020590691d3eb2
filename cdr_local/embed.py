"""Text embeddings for REAL's pair selection: mean-pooled final hidden states.

A response is embedded *alone* (no prompt), as REAL does: the text is
tokenized by the model (BOS first where the model adds one), decoded from
position 0, and the final-layer hidden states (after the output norm) of the
text's own tokens are averaged (BOS excluded).  Any model of the registry can
serve.  Vectors are cached in ``$CDR_HOME/embeddings/<model sha12>.sqlite``
by a hash of the text, so a rerun costs nothing.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .paths import home_dir

if TYPE_CHECKING:
    from .engine import LanguageModel


class Embedder:
    def __init__(self, model: LanguageModel, model_sha256: str, cache: Path | None = None) -> None:
        if not model.embeddings:
            raise ValueError("the model context must be created with embeddings=True")
        self.model = model
        from .engine.backends import DEFAULT_BACKEND

        backend = model.describe()["backend"]
        # another backend's vectors are other numbers: their own cache (llama.cpp's keeps its old name)
        self.model_sha256 = model_sha256 if backend == DEFAULT_BACKEND else hashlib.sha256(f"{model_sha256}:{backend}".encode()).hexdigest()
        self.cache_path = cache if cache is not None else home_dir() / "embeddings" / f"{self.model_sha256[:12]}.sqlite"
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.cache_path)
        self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, dim INTEGER, vec BLOB)")
        self.hits = 0
        self.misses = 0

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.model_sha256}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()

    def compute(self, text: str) -> np.ndarray:
        """The embedding of one text, computed now (no cache)."""
        m = self.model
        body = m.tokenize(text, add_special=False, parse_special=False)
        if not body:
            return np.zeros(m.n_embd, dtype=np.float64)
        lead = [m.bos_id] if m.add_bos and m.bos_id >= 0 else []
        hs = m.hidden_states(lead + body)
        return hs[len(lead) :].astype(np.float64).mean(axis=0)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), n_embd) float64; cached by text hash."""
        out = np.empty((len(texts), self.model.n_embd), dtype=np.float64)
        for i, t in enumerate(texts):
            k = self._key(t)
            row = self._db.execute("SELECT dim, vec FROM emb WHERE key = ?", (k,)).fetchone()
            if row is not None and row[0] == self.model.n_embd:
                out[i] = np.frombuffer(row[1], dtype=np.float64)
                self.hits += 1
                continue
            v = self.compute(t)
            self._db.execute("INSERT OR REPLACE INTO emb VALUES (?, ?, ?)", (k, len(v), v.tobytes()))
            self._db.commit()
            out[i] = v
            self.misses += 1
        return out

    def close(self) -> None:
        self._db.close()
