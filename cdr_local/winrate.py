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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .errors import CdrError

if TYPE_CHECKING:
    from .rules import Response, RuleSpec


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


def write_judge_records(path: Path, instructions: list[str], model: dict[str, str], baseline: dict[str, str]) -> int:
    """One record per instruction both answered, for the judge: response_a the model's
    output, response_b the baseline's (the judge reads both orders); returns records written."""
    n = 0
    with open(path, "wb") as f:
        for ins in instructions:
            if ins in model and ins in baseline:
                rec = {"id": instruction_id(ins), "prompt": ins, "response_a": model[ins], "response_b": baseline[ins]}
                f.write(orjson.dumps(rec) + b"\n")
                n += 1
    return n


def judged_margins(path: Path, instructions: list[str], method: str = "judge") -> dict[str, float]:
    """instruction -> ``method``'s value(model) - value(baseline), from its output on
    :func:`write_judge_records`' records (``scores[0]`` is the model's)."""
    ids = {instruction_id(ins): ins for ins in instructions}
    out: dict[str, float] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                obj = orjson.loads(line)
                ins = ids.get(str(obj["id"]))
                if ins is not None:
                    a, b = obj["scores"]
                    out[ins] = float(a[method]) - float(b[method])
    return out


def read_scored(path: Path) -> dict[str, Response]:
    """id -> the scoring pass's numbers of each scored response (rules recompute from them)."""
    from .rules import Response

    out = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                obj = orjson.loads(line)
                out[str(obj["id"])] = Response.from_score(obj["scores"][0])
    return out


@dataclass(frozen=True)
class ModelResult:
    name: str
    n: int
    win_rate: float
    standard_error: float
    lc_win_rate: float
    lc_standard_error: float
    phi: float
    avg_len: float
    n_wins: int = 0
    n_draws: int = 0
    l1: float = 0.0
    converged: bool = True
    warnings: tuple[str, ...] = ()


def paired_responses(model_scores: Path, baseline_scores: Path, instructions: list[str], model: dict[str, str]) -> dict[str, tuple[Response, Response]]:
    """instruction -> (model's, baseline's) scored response, for instructions both have scored."""
    m = read_scored(model_scores)
    b = read_scored(baseline_scores)
    return {ins: (m[k], b[k]) for ins in instructions if (k := instruction_id(ins)) in m and k in b and ins in model}


def margins_of(pairs: dict[str, tuple[Response, Response]], rule: RuleSpec) -> dict[str, float]:
    """instruction -> value(model) - value(baseline) under ``rule``."""
    out = {}
    for ins, (m, b) in pairs.items():
        vm, vb = rule.values([m, b])
        out[ins] = vm - vb
    return out


def default_tau(margins: list[float]) -> float:
    """A temperature from the margins alone (no calibration): their robust spread
    (1.4826 * MAD) over the logistic's standard deviation (pi / sqrt 3), so that
    soft labels use the logistic's range instead of saturating at 0 and 1."""
    import numpy as np

    m = np.asarray(margins, dtype=np.float64)
    mad = float(np.median(np.abs(m - np.median(m)))) * 1.4826
    return float(max(mad / (np.pi / np.sqrt(3)), 1e-3))


def model_result(
    name: str, margins: dict[str, float], instructions: list[str], model: dict[str, str], baseline: dict[str, str],
    tau: float, difficulty: dict[str, float] | None = None, n_boot: int = 200,
) -> ModelResult:
    """Raw and length-controlled win rate of one model.  The GLM (lc.lc_win_rate with
    cross-validated L1) has the instruction-difficulty term when ``difficulty`` is
    given (estimated from the *other* models' margins, so a model's own preferences
    do not explain themselves)."""
    import numpy as np

    from .lc import lc_win_rate, sigmoid

    keys = [ins for ins in instructions if ins in margins]
    if len(keys) < 3:
        raise CdrError(f"{name}: fewer than 3 instructions scored for both the model and the baseline")
    mg = np.array([margins[k] for k in keys])
    p = sigmoid(mg / tau)
    dlen = np.array([len(baseline[k]) - len(model[k]) for k in keys], dtype=float)
    diff = None if difficulty is None else np.array([difficulty.get(k, 0.0) for k in keys])
    res = lc_win_rate(p, dlen, diff, cv=True, n_boot=n_boot)
    se = float(100 * np.std(p, ddof=1) / np.sqrt(len(p))) if len(p) > 1 else float("nan")
    return ModelResult(name, res.n, res.win_rate, se, res.lc_win_rate, res.lc_standard_error, res.phi,
                       float(np.mean([len(model[k]) for k in keys])), int((mg > 0).sum()), int((mg == 0).sum()),
                       res.l1, res.converged, res.warnings)


def difficulties(all_margins: dict[str, dict[str, float]], tau: float) -> dict[str, dict[str, float]]:
    """Per model, each instruction's difficulty: the mean annotator logit (margin / tau)
    of the *other* models on it; empty without at least two other models."""
    out: dict[str, dict[str, float]] = {}
    for name in all_margins:
        others = [m for n, m in all_margins.items() if n != name]
        if len(others) < 2:
            out[name] = {}
            continue
        d: dict[str, float] = {}
        for ins in all_margins[name]:
            vals = [m[ins] / tau for m in others if ins in m]
            if vals:
                d[ins] = sum(vals) / len(vals)
        out[name] = d
    return out


def leaderboard_csv(results: list[ModelResult]) -> bytes:
    """alpaca_eval's leaderboard.csv columns."""
    rows = [",win_rate,standard_error,n_wins,n_wins_base,n_draws,n_total,discrete_win_rate,mode,avg_length,"
            "length_controlled_winrate,lc_standard_error"]
    for r in results:
        disc = 100 * (r.n_wins + 0.5 * r.n_draws) / r.n if r.n else float("nan")
        rows.append(f"{r.name},{r.win_rate},{r.standard_error},{r.n_wins},{r.n - r.n_wins - r.n_draws},{r.n_draws},{r.n},"
                    f"{disc},community,{int(round(r.avg_len))},{r.lc_win_rate},{r.lc_standard_error}")
    return ("\n".join(rows) + "\n").encode()


def annotation_rows(name: str, margins: dict[str, float], model: dict[str, str], baseline: dict[str, str], tau: float,
                annotator: str) -> list[dict[str, Any]]:
    """alpaca_eval's annotations.json rows: preference in [1, 2], 2 = output_2 (the model) preferred."""
    from .lc import sigmoid

    return [{"instruction": ins, "output_1": baseline[ins], "generator_1": "baseline", "output_2": model[ins],
             "generator_2": name, "annotator": annotator, "preference": 1.0 + float(sigmoid(m / tau))}
            for ins, m in margins.items()]


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
