"""Outputs in the formats other tools read.  Pure functions, no models.

* rewardbench: ``OUT.rewardbench.json`` from ``cdr eval``, shaped like
  RewardBench's per-model results (``model``, ``ref_model``, ``model_type``,
  one accuracy per subset, and the section scores), so its leaderboard
  scripts and users' notebooks read it as they read RewardBench's own.
"""

from __future__ import annotations

from typing import Any


def rewardbench_results(rep: dict[str, Any], method: str) -> dict[str, Any]:
    """RewardBench-style results of ``method`` from a ``cdr eval`` report."""
    m = rep["methods"][method]
    meta_models = rep.get("models") or {}
    out: dict[str, Any] = {
        "model": (meta_models.get("strong") or {}).get("model") or rep.get("pair"),
        "ref_model": (meta_models.get("weak") or {}).get("model"),
        "model_type": f"cdr-local ({method})",
        "pair": rep.get("pair"),
        "num_pairs": rep["n_pairs"],
    }
    out.update({s: d["acc"] for s, d in m["subsets"].items()})
    out.update({s: d["acc"] for s, d in m["sections"].items()})
    out["score"] = m["overall"]["acc"]
    out["length_balanced_score"] = m.get("length", {}).get("balanced", {}).get("acc")
    return out
