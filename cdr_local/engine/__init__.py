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


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask and a cgroup CPU quota, where
    the platform says; else ``os.cpu_count()``."""
    n = os.cpu_count() or 1
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass
    try:  # cgroup v2: "max 100000" or "200000 100000"
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


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

    #: the accepted range of each integer setting (one place: flags and models.toml's
    #: [engine] table are checked against it).  Upper bounds are sanity limits:
    #: llama.cpp allocates per thread and per context token without checking, and
    #: a typo (--threads 99999, --n-ctx 99999999999) would otherwise crash or
    #: exhaust memory instead of failing in one line.  n_ctx is also checked
    #: against each model's trained context and the free memory when it loads.
    RANGES = {
        "n_ctx": (32, 1 << 20),
        "n_batch": (16, 1 << 16),
        "n_ubatch": (16, 1 << 16),
        "n_threads": (0, 512),
        "n_gpu_layers": (-1, 100_000),
        "n_seq_max": (1, 256),
    }

    def __post_init__(self) -> None:
        for name, (lo, hi) in self.RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}, got {v}" + (" (-1 = all layers)" if name == "n_gpu_layers" else ""))

    def threads(self) -> int:
        """``n_threads``, or for 0 the CPUs this process may run on (affinity), at least 1."""
        return self.n_threads if self.n_threads > 0 else available_cpus()

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
