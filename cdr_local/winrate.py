"""Win rates against a baseline, raw and length-controlled (AlpacaEval style).

Every response is scored alone (one response per record): a response's reward
depends only on its prompt and the pair (see engine/llama.py), so the
baseline's outputs are scored once and reused for every model, and the margin
model - baseline is exactly what scoring the two side by side would give.

P(model beats baseline on x) = sigmoid((reward_model - reward_baseline) / tau).
tau defaults to 1 (the margin is a log-likelihood ratio in nats, read as a
logit); ``cdr eval --calibrate`` fits it on labelled pairs.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .errors import CdrError


def load_outputs(path: str | Path) -> dict[str, str]:
    """instruction -> output, from AlpacaEval's model_outputs.json (a JSON list) or JSONL."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise CdrError(f"cannot read {p}: {e.strerror}") from None
    rows: list[Any]
    try:
        data = orjson.loads(raw)
        rows = data if isinstance(data, list) else [data]
    except orjson.JSONDecodeError:
        rows = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                raise CdrError(f"{p}:{i}: not JSON (expected a JSON list or JSONL of {{instruction, output}})") from None
    out: dict[str, str] = {}
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise CdrError(f"{p}: item {i} needs string fields instruction and output")
        out.setdefault(r["instruction"], r["output"])
    return out


def instruction_id(instruction: str) -> str:
    return hashlib.sha256(instruction.encode("utf-8")).hexdigest()[:16]


def select_instructions(baseline: dict[str, str], n: int | None, seed: int = 0) -> list[str]:
    """All instructions in baseline order, or a seeded random sample of n of them (kept in that order)."""
    keys = list(baseline)
    if n is None or n >= len(keys):
        return keys
    chosen = set(random.Random(seed).sample(range(len(keys)), n))
    return [k for i, k in enumerate(keys) if i in chosen]


def write_records(path: Path, instructions: list[str], outputs: dict[str, str]) -> int:
    """One record per instruction with the single response to score; returns records written."""
    n = 0
    with open(path, "wb") as f:
        for ins in instructions:
            out = outputs.get(ins)
            if out is None:
                continue
            f.write(orjson.dumps({"id": instruction_id(ins), "prompt": ins, "responses": [out]}) + b"\n")
            n += 1
    return n


def read_rewards(path: Path) -> Iterator[tuple[str, float]]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                obj = orjson.loads(line)
                yield str(obj["id"]), float(obj["scores"][0]["reward"])


@dataclass(frozen=True)
class ModelResult:
    name: str
    n: int
    win_rate: float
    lc_win_rate: float
    lc_standard_error: float
    phi: float
    avg_len: float


def model_result(
    name: str, model_scores: Path, baseline_scores: Path, instructions: list[str], model: dict[str, str],
    baseline: dict[str, str], tau: float, n_boot: int = 200,
) -> ModelResult:
    import numpy as np

    from .lc import lc_win_rate, sigmoid

    m = dict(read_rewards(model_scores))
    b = dict(read_rewards(baseline_scores))
    margins, dlen, lens = [], [], []
    for ins in instructions:
        k = instruction_id(ins)
        if k in m and k in b and ins in model:
            margins.append(m[k] - b[k])
            dlen.append(len(baseline[ins]) - len(model[ins]))
            lens.append(len(model[ins]))
    if len(margins) < 3:
        raise CdrError(f"{name}: fewer than 3 instructions scored for both the model and the baseline")
    p = sigmoid(np.array(margins) / tau)
    res = lc_win_rate(p, np.array(dlen, dtype=float), n_boot=n_boot)
    return ModelResult(name, res.n, res.win_rate, res.lc_win_rate, res.lc_standard_error, res.phi, float(np.mean(lens)))


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import numpy as np

    def ranks(x: list[float]) -> np.ndarray:
        arr = np.asarray(x, dtype=float)
        order = arr.argsort()
        r = np.empty(len(arr))
        r[order] = np.arange(len(arr))
        for v in np.unique(arr):  # average ties
            idx = arr == v
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
