"""Token sampling from a logits row, in numpy: one rule for every backend, so the
same logits and seed give the same token whichever library computed them."""

from __future__ import annotations

import numpy as np


def sample(row: np.ndarray, rng: np.random.Generator, temperature: float, top_p: float) -> int:
    """One token from a logits row: greedy at temperature 0, else temperature + top-p."""
    if temperature <= 0:
        return int(np.argmax(row))
    z = row.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]
        q = p[keep] / p[keep].sum()
        return int(keep[rng.choice(len(keep), p=q)])
    return int(rng.choice(len(p), p=p))
