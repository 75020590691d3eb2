"""Accuracy of an annotator on labelled pairs, RewardBench-style.  Pure numpy, no models.

Rule (RewardBench): a pair is right only if the chosen response scores
*strictly* higher than the rejected one (a tie is wrong).  A section's accuracy
is its subsets' accuracies weighted by subset size (= the pooled mean over the
section's pairs); the overall score is the unweighted mean of the sections.
95% intervals: percentile bootstrap, resampling pairs with replacement within
each subset (so subset sizes stay fixed), 1000 replicates, fixed seed.

The same pairs give the baselines, from the numbers an annotate output
already holds: longer response wins (characters), the strong model's and the
weak model's log-likelihood alone (sum and per-token mean), and the density
ratio (sum and mean).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

Score = dict[str, Any]

#: method name -> value of one response's score entry (higher = preferred)
METHODS: dict[str, Callable[[Score], float]] = {
    "cdr (sum)": lambda s: s["reward"],
    "cdr (mean)": lambda s: s["reward_mean"],
    "strong (sum)": lambda s: s["strong_logprob"],
    "strong (mean)": lambda s: s["strong_logprob"] / s["strong_tokens"],
    "weak (sum)": lambda s: s["weak_logprob"],
    "weak (mean)": lambda s: s["weak_logprob"] / s["weak_tokens"],
    "longer wins": lambda s: s["chars"],
}
MAIN = "cdr (sum)"


@dataclass(frozen=True)
class EvalPair:
    id: str
    subset: str
    section: str
    values: dict[str, tuple[float, float]]  # method -> (chosen value, rejected value)
    domain: str | None = None


LC_METHOD = "cdr (sum, LC)"


def with_length_control(pairs: list[EvalPair], tau: float = 1.0) -> tuple[list[EvalPair], dict[str, float]]:
    """Add the length-controlled density ratio as a method.

    Fits AlpacaEval-LC's GLM to the annotator's own margins in input order
    (a = chosen, b = rejected; the labels are not used), removes the length
    term, and scores a pair right iff the length-controlled margin is > 0.
    """
    from .lc import fit_length_control

    m_ab = np.array([p.values[MAIN][0] - p.values[MAIN][1] for p in pairs])
    dlen = np.array([p.values["longer wins"][1] - p.values["longer wins"][0] for p in pairs])
    lc = fit_length_control(m_ab, dlen, tau=tau)
    out = []
    for p, m, d in zip(pairs, m_ab, dlen, strict=True):
        vals = dict(p.values)
        vals[LC_METHOD] = (lc.adjust(float(m), float(d)), 0.0)
        out.append(EvalPair(p.id, p.subset, p.section, vals, p.domain))
    return out, {"phi": lc.phi, "theta": lc.theta, "std_dlen": lc.std_dlen, "tau": tau}


def sample_lines(path: str | Path, per_section: int, seed: int = 0) -> list[int]:
    """Line numbers of a stratified random sample: ``per_section`` pairs from each
    section (all of a smaller section), chosen by a seeded reservoir -- one pass,
    memory ~ the sample.

    The order interleaves the sections (round robin, each in file order), so
    the first k records of a run are a balanced sample too: ``--limit`` cuts a
    long evaluation short without losing a section, and ``--resume`` with a
    larger limit extends it.
    """
    import random

    rng = random.Random(seed)
    reservoirs: dict[str, list[int]] = {}
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            sec = str(obj.get("section") or obj.get("subset") or "all")
            n = seen[sec] = seen.get(sec, 0) + 1
            res = reservoirs.setdefault(sec, [])
            if len(res) < per_section:
                res.append(lineno)
            else:
                j = rng.randrange(n)
                if j < per_section:
                    res[j] = lineno
    columns = [sorted(res) for res in reservoirs.values()]
    return [col[i] for i in range(max(map(len, columns), default=0)) for col in columns if i < len(col)]


def pairs_from_output(path: str | Path) -> Iterator[EvalPair]:
    """Labelled pairs from an annotate/eval output (records given as chosen/rejected)."""
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            obj = orjson.loads(line)
            if obj.get("input_format") != "chosen_rejected":
                continue
            by_name = {s["response"]: s for s in obj["scores"]}
            c, r = by_name["chosen"], by_name["rejected"]
            subset = str(obj.get("subset") or obj.get("section") or "all")
            section = str(obj.get("section") or subset)
            yield EvalPair(
                id=str(obj["id"]),
                subset=subset,
                section=section,
                values={m: (f(c), f(r)) for m, f in METHODS.items()},
                domain=obj.get("domain"),
            )


@dataclass
class _Groups:
    subsets: list[str]
    sections: list[str]
    subset_idx: list[np.ndarray]  # pair indices of each subset
    subset_section: list[int]  # section index of each subset


def _groups(pairs: list[EvalPair]) -> _Groups:
    subsets = sorted({p.subset for p in pairs})
    sections = sorted({p.section for p in pairs})
    sub_of = np.array([subsets.index(p.subset) for p in pairs])
    idx = [np.nonzero(sub_of == i)[0] for i in range(len(subsets))]
    sec = []
    for i, s in enumerate(subsets):
        secs = {pairs[j].section for j in idx[i]}
        if len(secs) != 1:
            raise ValueError(f"subset {s!r} spans several sections: {sorted(secs)}")
        sec.append(sections.index(secs.pop()))
    return _Groups(subsets, sections, idx, sec)


def _section_and_overall(correct: np.ndarray, g: _Groups, idx: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Section accuracies (size-weighted over subsets) and their mean, for one draw of indices."""
    hits = np.zeros(len(g.sections))
    counts = np.zeros(len(g.sections))
    for i, ix in enumerate(idx):
        s = g.subset_section[i]
        hits[s] += correct[ix].sum()
        counts[s] += len(ix)
    sec = hits / counts
    return sec, float(sec.mean())


def _draws(g: _Groups, n_boot: int, seed: int) -> list[list[np.ndarray]]:
    """Bootstrap resamples of the pairs, within subsets: ``n_boot`` lists of index
    arrays, one per subset.  ``report`` and ``paired_difference`` draw alike."""
    rng = np.random.default_rng(seed)
    return [[ix[rng.integers(0, len(ix), len(ix))] for ix in g.subset_idx] for _ in range(n_boot)]


def report(pairs: Iterable[EvalPair], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy per subset, per section and overall for every method, with bootstrap CIs."""
    plist = list(pairs)
    if not plist:
        raise ValueError("no labelled pairs (records with chosen/rejected) in the output")
    g = _groups(plist)
    boots = _draws(g, n_boot, seed)
    out: dict[str, Any] = {
        "rule": "right iff chosen > rejected strictly (ties are wrong); section = subsets weighted by size; overall = mean of sections",
        "n_pairs": len(plist),
        "sections": {s: int(sum(len(g.subset_idx[i]) for i in range(len(g.subsets)) if g.subset_section[i] == k)) for k, s in enumerate(g.sections)},
        "bootstrap": {"replicates": n_boot, "seed": seed, "ci": 0.95},
        "methods": {},
    }
    for m in plist[0].values:  # METHODS, plus any extra the caller added (e.g. length-controlled)
        ch = np.array([p.values[m][0] for p in plist], dtype=np.float64)
        rj = np.array([p.values[m][1] for p in plist], dtype=np.float64)
        correct = (ch > rj).astype(np.float64)
        sec, overall = _section_and_overall(correct, g, g.subset_idx)
        draws = []
        for b in boots:
            sec_b, overall_b = _section_and_overall(correct, g, b)
            draws.append([*sec_b, overall_b])
        bs = np.array(draws)
        lo, hi = np.percentile(bs, [2.5, 97.5], axis=0)
        out["methods"][m] = {
            "overall": {"acc": overall, "ci": [float(lo[-1]), float(hi[-1])]},
            "sections": {
                s: {"acc": float(sec[k]), "ci": [float(lo[k]), float(hi[k])], "n": out["sections"][s]} for k, s in enumerate(g.sections)
            },
            "subsets": {
                s: {"acc": float(correct[g.subset_idx[i]].mean()), "n": len(g.subset_idx[i]), "section": g.sections[g.subset_section[i]]}
                for i, s in enumerate(g.subsets)
            },
            "ties": int((ch == rj).sum()),
        }
    domains: dict[str, int] = {}
    for p in plist:
        if p.domain is not None:
            domains[p.domain] = domains.get(p.domain, 0) + 1
    if domains:
        out["domains"] = domains
    return out


def paired_difference(
    a: list[EvalPair], b: list[EvalPair], method: str = MAIN, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Overall accuracy of ``a`` minus that of ``b``, on the same labelled pairs, with a
    paired 95% bootstrap interval.

    Why paired: two annotators scored on the same pairs share the pairs' difficulty,
    so one resample of the pairs (within subsets, as in ``report``) is applied to both
    and the difference is taken per draw.  The interval then reflects how much the
    two agree on which pairs they get wrong, which two separate intervals cannot
    show: it is the right test of "is A better than B on these pairs".
    """
    if [p.id for p in a] != [p.id for p in b]:
        raise ValueError("the two outputs do not hold the same pairs in the same order")
    if not a:
        raise ValueError("no labelled pairs to compare")
    g = _groups(a)
    ca, cb = ((np.array([p.values[method][0] > p.values[method][1] for p in x], dtype=np.float64)) for x in (a, b))
    _, oa = _section_and_overall(ca, g, g.subset_idx)
    _, ob = _section_and_overall(cb, g, g.subset_idx)
    draws = [_section_and_overall(ca, g, ix)[1] - _section_and_overall(cb, g, ix)[1] for ix in _draws(g, n_boot, seed)]
    lo, hi = np.percentile(np.array(draws), [2.5, 97.5])
    return {"method": method, "n_pairs": len(a), "diff": oa - ob, "ci": [float(lo), float(hi)]}


def report_table(rep: dict[str, Any]) -> Any:
    """Rich table: sections (and overall) as rows, methods as columns."""
    from rich.table import Table

    t = Table(title=f"accuracy on {rep['n_pairs']} labelled pairs (95% bootstrap CI)", title_justify="left")
    t.add_column("section")
    t.add_column("n", justify="right")
    methods = rep["methods"]
    for m in methods:
        t.add_column(m, justify="right")

    def cell(d: dict[str, Any]) -> str:
        return f"{100 * d['acc']:.1f} ({100 * d['ci'][0]:.0f}-{100 * d['ci'][1]:.0f})"

    for s, n in rep["sections"].items():
        t.add_row(s, str(n), *(cell(methods[m]["sections"][s]) for m in methods))
    t.add_row("overall", str(rep["n_pairs"]), *(cell(methods[m]["overall"]) for m in methods), style="bold")
    return t


def subset_table(rep: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title="accuracy per subset", title_justify="left")
    for c in ("subset", "section", "n", MAIN, "cdr (mean)", "longer wins"):
        t.add_column(c, justify="left" if c in ("subset", "section") else "right")
    subs = rep["methods"][MAIN]["subsets"]
    for s, d in subs.items():
        t.add_row(s, d["section"], str(d["n"]), *(f"{100 * rep['methods'][m]['subsets'][s]['acc']:.1f}" for m in (MAIN, "cdr (mean)", "longer wins")))
    return t


def plot(rep_path: str | Path, pairs: list[EvalPair], path: str | Path) -> str | None:
    """Accuracy per section and margin histograms (right vs wrong), drawn by
    ``python -m cdr_local.plot`` in a child process.

    Why a child: the report is complete by now, and a plotting stack that
    cannot live beside llama.cpp in one process must not take the command
    down with it (seen: importing matplotlib after a CUDA build of llama.cpp
    segfaulted).  Returns None when the plot was written, else why not.
    """
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("matplotlib") is None:
        return "missing"
    margins = [p.values[MAIN][0] - p.values[MAIN][1] for p in pairs]
    try:
        r = subprocess.run(
            [sys.executable, "-m", "cdr_local.plot", str(rep_path), str(path)],
            input=orjson.dumps(margins), capture_output=True, timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"plot failed: {e}"
    if r.returncode != 0:
        last = r.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        return f"plot failed (exit {r.returncode}){': ' + last[0] if last[0] else ''}"
    return None
