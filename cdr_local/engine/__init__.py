"""The scoring interface: ``loglikelihood(requests) -> results``.

Like lm-evaluation-harness's ``LM.loglikelihood``, but on token ids and with
one context shared by several continuations, so an implementation can decode
the context once.  The only implementation (``engine.llama``) runs llama.cpp's
low-level API; this module imports nothing heavy, so the CLI starts fast.

Numerics contract: the log-probs of a request depend only on the request and
the :class:`EngineSettings` -- never on the other requests of a call, on what
was decoded before, or on where a resumed run restarted.  The llama.cpp engine
achieves this by decoding every request with a scheme fixed by the request
alone (see ``engine/llama.py``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class EngineSettings:
    """Everything that changes numbers or speed; recorded in every output's metadata."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 0  # 0: os.cpu_count()
    n_gpu_layers: int = 0
    n_seq_max: int = 8  # responses of one record decoded side by side in one batch
    parallel_responses: bool = False
    flash_attn: bool = False

    def __post_init__(self) -> None:
        if min(self.n_batch, self.n_ubatch) < 16:
            raise ValueError("n_batch and n_ubatch must be at least 16")
        if self.n_ctx < 32:
            raise ValueError("n_ctx must be at least 32")

    def threads(self) -> int:
        return self.n_threads if self.n_threads > 0 else max(1, os.cpu_count() or 1)

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["n_threads"] = self.threads()
        return d


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``continuations`` after ``context``.

    ``context`` is a tuple of token segments; the engine decodes each segment
    as a unit (so a prefix shared by many records, such as a system prompt
    with exemplars, can stay in the KV cache without changing any number).
    Each continuation's first token is predicted by the context's last token.
    """

    context: tuple[tuple[int, ...], ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def context_len(self) -> int:
        return sum(len(s) for s in self.context)


class Scorer(Protocol):
    """What the pipeline needs from a model."""

    n_ctx: int

    def loglikelihood(self, requests: list[ScoreRequest]) -> list[list[np.ndarray]]:
        """Per request, per continuation: float64 log-prob of each token."""
        ...
