"""From N scored responses to one training pair.  Pure functions, no models.

Strategies (rewards = the density ratio, higher is better):

* ``best-random`` (the CDR recipe): chosen = the highest reward, rejected = a
  random one of the others (not the lowest), drawn with a generator seeded by
  the record id, so reruns agree.
* ``best-worst``: chosen = highest, rejected = lowest.
* ``random``: two distinct responses drawn with the record's generator, ordered
  by reward (REAL's random baseline).
* ``real-easy`` / ``real-hard`` (REAL, arXiv 2409.17169): the pair of responses
  whose embeddings have the lowest / highest cosine similarity; the density
  ratio orders it (the higher reward is chosen).
* ``real-centroid``: k-means with k=2 on the L2-normalized embeddings (as the
  REAL authors cluster: the norm of a mean hidden state tracks length, not
  meaning); the response nearest each centre; ordered by reward.

Selection over labelled pairs (REAL's subsets): keep the share of pairs whose
:func:`selection_key` lies at or below the share's quantile -- the least similar
(``dissimilar``), the most similar (``similar``) or a seeded random subset of
the same size (``random``), for the paper's easy / hard / random comparison.

Skipped (with the reason): records whose rewards all tie, and candidates whose
text is identical to the chosen one (a pair of identical texts teaches nothing).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("best-random", "best-worst", "random", "real-easy", "real-hard", "real-centroid")
NEEDS_EMBEDDINGS = {"real-easy", "real-hard", "real-centroid"}
#: Strategies whose pairs carry a similarity: REAL's, and its random baseline (the
#: comparison is on similarity, margin and length alike).
EMBEDS = NEEDS_EMBEDDINGS | {"random"}
#: Selections over labelled pairs: ``--keep-dissimilar``, ``--keep-similar``, ``--keep-random``.
SELECTIONS = ("dissimilar", "similar", "random")


class SkipRecord(Exception):
    """This record gives no pair; the message says why."""


@dataclass(frozen=True)
class Choice:
    chosen: int
    rejected: int
    margin: float  # reward[chosen] - reward[rejected] >= 0
    similarity: float | None  # cosine of the two embeddings, when known


def record_rng(record_id: str, seed: int = 0) -> random.Random:
    """A generator seeded by the record id (and a global seed): reruns and resumes agree."""
    h = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0 when either is zero)."""
    return float(np.dot(a, b) / ((np.linalg.norm(a) * np.linalg.norm(b)) or 1.0))


def unit_rows(emb: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero)."""
    e = np.asarray(emb, dtype=np.float64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return e / norms


def selection_key(kind: str, record_id: str, similarity: float, seed: int = 0) -> float:
    """The key a selection keeps the smallest of: similarity (``dissimilar``), minus
    similarity (``similar``), or a uniform draw seeded by the record id (``random``)."""
    if kind == "dissimilar":
        return similarity
    if kind == "similar":
        return -similarity
    if kind == "random":
        return record_rng(record_id, seed).random()
    raise ValueError(f"unknown selection {kind!r}")


def keep_threshold(keys: Sequence[float], percent: float) -> float:
    """The key at or below which ``percent`` % of ``keys`` lie (a value of ``keys``)."""
    return float(np.percentile(np.asarray(keys, dtype=np.float64), percent, method="lower"))


def kmeans2(emb: np.ndarray, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k=2, deterministic: initialised with the two most distant points
    (farthest-first from the first point).  Returns (labels, centres)."""
    x = np.asarray(emb, dtype=np.float64)
    a = int(np.argmax(((x - x[0]) ** 2).sum(1)))
    b = int(np.argmax(((x - x[a]) ** 2).sum(1)))
    centres = np.stack([x[a], x[b]])
    labels = np.zeros(len(x), dtype=int)
    for _ in range(iters):
        d = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(2)
        new = d.argmin(1)
        if np.array_equal(new, labels) and _ > 0:
            break
        labels = new
        for k in (0, 1):
            if (labels == k).any():
                centres[k] = x[labels == k].mean(0)
    return labels, centres


def _order(i: int, j: int, rewards: Sequence[float], sim: float | None) -> Choice:
    if rewards[i] == rewards[j]:
        raise SkipRecord("the two selected responses have equal rewards")
    c, r = (i, j) if rewards[i] > rewards[j] else (j, i)
    return Choice(c, r, float(rewards[c] - rewards[r]), sim)


def choose(
    strategy: str,
    record_id: str,
    texts: Sequence[str],
    rewards: Sequence[float],
    embeddings: np.ndarray | None = None,
    seed: int = 0,
) -> Choice:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    n = len(texts)
    if n < 2:
        raise SkipRecord("fewer than two responses")
    if max(rewards) == min(rewards):
        raise SkipRecord("all rewards tie")
    units = unit_rows(embeddings) if embeddings is not None else None  # cosine everywhere, k-means on these too
    sims = units @ units.T if units is not None else None

    def sim(i: int, j: int) -> float | None:
        return None if sims is None else float(sims[i, j])

    if strategy in ("best-random", "best-worst"):
        best = max(range(n), key=lambda i: (rewards[i], -i))
        others = [i for i in range(n) if i != best and texts[i] != texts[best]]
        if not others:
            raise SkipRecord("every other response is identical to the best one")
        if strategy == "best-worst":
            rej = min(others, key=lambda i: (rewards[i], i))
        else:
            rej = record_rng(record_id, seed).choice(others)
        if rewards[rej] == rewards[best]:
            raise SkipRecord("the rejected response ties with the best one")
        return Choice(best, rej, float(rewards[best] - rewards[rej]), sim(best, rej))

    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if texts[i] != texts[j]]
    if not pairs:
        raise SkipRecord("all responses are identical")
    if strategy == "random":
        i, j = record_rng(record_id, seed).choice(pairs)
        return _order(i, j, rewards, sim(i, j))
    if units is None or sims is None:
        raise ValueError(f"strategy {strategy} needs embeddings")
    if strategy == "real-centroid":
        if n == 2:
            i, j = pairs[0]
            return _order(i, j, rewards, sim(i, j))
        x = units
        labels, centres = kmeans2(x)
        if len(set(labels.tolist())) < 2:
            raise SkipRecord("k-means found a single cluster")
        picks = []
        for k in (0, 1):
            members = np.nonzero(labels == k)[0]
            d = ((x[members] - centres[k]) ** 2).sum(1)
            picks.append(int(members[int(np.argmin(d))]))
        i, j = picks
        if texts[i] == texts[j]:
            raise SkipRecord("the two centroid responses are identical")
        return _order(i, j, rewards, sim(i, j))
    key = (lambda p: (sims[p], p)) if strategy == "real-hard" else (lambda p: (-sims[p], p))
    i, j = max(pairs, key=key)
    return _order(i, j, rewards, sim(i, j))
