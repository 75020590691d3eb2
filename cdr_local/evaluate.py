"""Accuracy of an annotator on labelled pairs, RewardBench-style, and how much of it is length.  Pure numpy, no models.

Rule (RewardBench): a pair is right only if the chosen response scores
*strictly* higher than the rejected one (a tie is wrong).  A section's accuracy
is its subsets' accuracies weighted by subset size (= the pooled mean over the
section's pairs); the overall score is the unweighted mean of the sections.
95% intervals: percentile bootstrap, resampling pairs with replacement within
each subset (so subset sizes stay fixed), 1000 replicates, fixed seed.

Every scoring rule (:mod:`rules`) is computed from the numbers an output
already holds, so one scoring pass gives the whole table: the density-ratio
rules, the strong and weak model alone, and the longer/shorter baselines.
Rule parameters that need no labels (the per-token offsets, the length slope)
are estimated from the pairs being reported on.

Length, because small models' scores follow it: each pair is put in a
*length stratum* by the characters of its two responses: chosen longer, chosen
shorter, or the same length.  Characters, not tokens: the strata must not
depend on the pair's tokenizer, so that two pairs are compared on the same
strata (the report also gives the token differences of each side).  Each method gets its
accuracy in the two strata and their mean, the **length-balanced accuracy**,
per section and overall (overall = mean of the sections, as above), with
bootstrap intervals.  A rule that only follows length scores 100% in one
stratum and 0% in the other: 50% balanced, whatever the sample's length mix.

Confidence, because users keep the labels they trust: pairs are ranked by
the method's confidence -- its margin as a z-like statistic (``Rule.z``),
which a calibration maps to a probability without changing the order -- and
**selective accuracy** is the accuracy of the top 10/20/30/50/100%.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .methods import MEASURED
from .rules import RULES, Response, RuleSpec, estimate, parse_rule

#: the rule a report highlights when none is named (its margins are plotted)
MAIN = "cdr-sum"
COVERAGES = (0.1, 0.2, 0.3, 0.5, 1.0)
LENGTH_MEASURE = "characters of the response"


@dataclass(frozen=True)
class EvalPair:
    id: str
    subset: str
    section: str
    values: dict[str, tuple[float, float]]  # method -> (chosen value, rejected value)
    domain: str | None = None
    # the density pass's numbers of each side (None: scored without it, ``--method judge``)
    chosen: Response | None = None
    rejected: Response | None = None
    # method -> |confidence statistic| (ranks pairs for selective accuracy); default |margin|
    confidence: dict[str, float] = field(default_factory=dict)
    # length measure -> (chosen, rejected): ``chars``, and the tokens each pass read
    # (``strong_tokens``/``weak_tokens`` of the density pass, else ``judge_tokens``)
    lengths: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def chars(self) -> tuple[int, int]:
        """(chosen, rejected) characters; (0, 0) where unknown (the "same" stratum)."""
        return self.lengths.get("chars", (0, 0))


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


def _lengths(c: dict[str, Any], r: dict[str, Any], density: bool) -> dict[str, tuple[int, int]]:
    """The length measures both scores entries hold: the density pass's token counts, else the judge's."""
    keys = ("strong_tokens", "weak_tokens") if density else ("judge_tokens",)
    return {k: (int(c[k]), int(r[k])) for k in (*keys, "chars") if k in c and k in r}


def read_pairs(path: str | Path) -> Iterator[tuple[str, str, str, str | None, Response | None, Response | None,
                                                   dict[str, tuple[float, float]], dict[str, tuple[int, int]]]]:
    """(id, subset, section, domain, chosen, rejected, measured, lengths) of each labelled
    pair in an annotate/eval output (records given as chosen/rejected): chosen and
    rejected are the density pass's numbers (None without that pass); ``measured``: the
    (chosen, rejected) values of the :data:`MEASURED` methods the output holds."""
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            obj = orjson.loads(line)
            if obj.get("input_format") != "chosen_rejected":
                continue
            by_name = {s["response"]: s for s in obj["scores"]}
            subset = str(obj.get("subset") or obj.get("section") or "all")
            section = str(obj.get("section") or subset)
            c, r = by_name["chosen"], by_name["rejected"]
            measured = {m: (float(c[m]), float(r[m])) for m in MEASURED if m in c and m in r}
            density = "strong_logprob" in c and "strong_logprob" in r
            yield (str(obj["id"]), subset, section, obj.get("domain"), Response.from_score(c) if density else None,
                   Response.from_score(r) if density else None, measured, _lengths(c, r, density))


def rule_specs(params: dict[str, float], names: Iterable[str] | None = None) -> list[RuleSpec]:
    """Every rule (or those named), with ``params`` (estimated or calibrated) filled in."""
    return [parse_rule(n, params) for n in (names or RULES)]


def pairs_from_output(
    path: str | Path, *, limit: int | None = None, params: dict[str, float] | None = None, extra: Iterable[str] = ()
) -> list[EvalPair]:
    """Labelled pairs from an output, with every rule's (chosen, rejected) values.

    ``params``: rule parameters; by default estimated from these pairs without
    their labels (:func:`rules.estimate`).  ``extra``: more rule specs to add
    (``cdr-beta:beta=0.75``).  ``limit``: the first K pairs only.
    """
    rows = list(read_pairs(path))
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        return []
    sides = [(c, r) for *_, c, r, _m, _l in rows if c is not None and r is not None]
    density = len(sides) == len(rows)
    measured = [m for m in MEASURED if all(m in ms for *_, ms, _l in rows)]
    if density:
        p = dict(params) if params is not None else estimate(sides)
        specs = rule_specs(p) + [parse_rule(x, p) for x in extra]
    else:  # scored without the density pass: its rules are not measured, the length baselines are
        specs = rule_specs({}, ("longer", "shorter"))
    out = []
    for rid, subset, section, domain, c, r, ms, lengths in rows:
        values: dict[str, tuple[float, float]] = {}
        conf: dict[str, float] = {}
        for m in measured:
            values[m] = ms[m]
            conf[m] = abs(MEASURED[m](ms[m][0] - ms[m][1]))
        # without the density pass only the length baselines are reported; they read characters alone
        sc, sr = (c, r) if c is not None and r is not None else (_chars_only(lengths["chars"][0]), _chars_only(lengths["chars"][1]))
        for spec in specs:
            vc, vr = spec.values([sc, sr])
            values[spec.label()] = (vc, vr)
            conf[spec.label()] = abs(spec.rule.z(vc - vr, sc, sr))
        out.append(EvalPair(rid, subset, section, values, domain, c, r, conf, lengths))
    return out


def _chars_only(chars: int) -> Response:
    """A response known by its characters alone (no density pass): what the length
    baselines ``longer``/``shorter`` read; its log-probs are NaN and never reported."""
    nan = float("nan")
    return Response(nan, 0, nan, 0, chars)


def estimated_params(pairs: list[EvalPair]) -> dict[str, float]:
    """The label-free rule parameters of these pairs (none without the density pass)."""
    both = [(p.chosen, p.rejected) for p in pairs if p.chosen is not None and p.rejected is not None]
    if not both or len(both) < len(pairs):
        return {}
    return estimate(both)


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


def _counts(g: _Groups, n: int, n_boot: int, seed: int) -> np.ndarray:
    """The bootstrap draws of :func:`_draws` as a (draws x pairs) matrix of how often
    each pair was drawn: every resampled statistic is then a matrix product."""
    W = np.zeros((n_boot, n))
    for d, draw in enumerate(_draws(g, n_boot, seed)):
        for ix in draw:
            np.add.at(W[d], ix, 1.0)
    return W


def _ci(x: np.ndarray) -> list[float]:
    lo, hi = np.nanpercentile(x, [2.5, 97.5]) if np.isfinite(x).any() else (np.nan, np.nan)
    return [float(lo), float(hi)]


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def _strata(pairs: list[EvalPair]) -> dict[str, np.ndarray]:
    dl = np.array([p.chars[0] - p.chars[1] for p in pairs])
    return {"longer": dl > 0, "shorter": dl < 0, "same": dl == 0}


def _length_block(correct: np.ndarray, strata: dict[str, np.ndarray], sec_masks: list[np.ndarray], W: np.ndarray,
                  sections: list[str]) -> dict[str, Any]:
    """Accuracy when chosen is longer / shorter and their mean, per section and overall
    (overall = mean over sections that have both strata), point and bootstrap."""
    ones = np.ones(len(correct))

    def per_section(w: np.ndarray) -> dict[str, np.ndarray]:
        # w: (draws x pairs) weights; returns per stratum an array (draws x sections) of accuracies
        out = {}
        for name in ("longer", "shorter"):
            m = strata[name]
            hits = np.stack([w @ (correct * m * sm) for sm in sec_masks], axis=-1)
            cnt = np.stack([w @ (m * sm).astype(float) for sm in sec_masks], axis=-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[name] = np.where(cnt > 0, hits / np.where(cnt > 0, cnt, 1), np.nan)
        return out

    point = per_section(ones[None, :])
    boot = per_section(W)
    res: dict[str, Any] = {"sections": {}, "n": {k: int(v.sum()) for k, v in strata.items()}}

    def summarize(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bal = (v["longer"] + v["shorter"]) / 2  # nan where a stratum is empty
        with np.errstate(invalid="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return {"longer": np.nanmean(v["longer"], axis=-1), "shorter": np.nanmean(v["shorter"], axis=-1),
                        "balanced": np.nanmean(bal, axis=-1), "_bal": bal}

    ps, bs = summarize(point), summarize(boot)
    for k, sec in enumerate(sections):
        res["sections"][sec] = {
            name: {"acc": _num(point[name][0, k]), "ci": _ci(boot[name][:, k]), "n": int((strata[name] * sec_masks[k]).sum())}
            for name in ("longer", "shorter")
        }
        res["sections"][sec]["balanced"] = {"acc": _num(ps["_bal"][0, k]), "ci": _ci(bs["_bal"][:, k])}
    for name in ("longer", "shorter", "balanced"):
        res[name] = {"acc": _num(ps[name][0]), "ci": _ci(bs[name])}
    return res


def _selective(correct: np.ndarray, conf: np.ndarray, W: np.ndarray) -> list[dict[str, Any]]:
    """Accuracy of the most confident share of the pairs (pooled over sections), for
    each coverage; with a paired interval of (top share - all pairs)."""
    order = np.lexsort((np.arange(len(conf)), -conf))  # most confident first; ties in input order
    c = correct[order]
    n = len(c)

    def top(w: np.ndarray, q: float) -> np.ndarray:
        # w: (draws x pairs) counts in confidence order; accuracy of the first q*n drawn items
        k = q * n
        cum = np.cumsum(w, axis=1)
        take = np.clip(k - (cum - w), 0, w)  # how much of each item falls in the top k
        return (take @ c) / k

    ones = np.ones((1, n))
    Wo = W[:, order]
    all_b = top(Wo, 1.0)
    out = []
    for q in COVERAGES:
        pt = float(top(ones, q)[0])
        b = top(Wo, q)
        out.append({"coverage": q, "n": int(round(q * n)), "acc": pt, "ci": _ci(b),
                    "minus_all": pt - float(top(ones, 1.0)[0]), "minus_all_ci": _ci(b - all_b)})
    return out


def report(pairs: Iterable[EvalPair], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy per subset, per section and overall for every method, with bootstrap CIs;
    the same by length stratum (and length-balanced), and selective accuracy."""
    plist = list(pairs)
    if not plist:
        raise ValueError("no labelled pairs (records with chosen/rejected) in the output")
    g = _groups(plist)
    boots = _draws(g, n_boot, seed)
    W = _counts(g, len(plist), n_boot, seed)
    sec_of = np.array([g.sections.index(p.section) for p in plist])
    sec_masks = [(sec_of == k).astype(float) for k in range(len(g.sections))]
    strata = _strata(plist)
    out: dict[str, Any] = {
        "rule": "right iff chosen > rejected strictly (ties are wrong); section = subsets weighted by size; overall = mean of sections",
        "n_pairs": len(plist),
        "sections": {s: int(sum(len(g.subset_idx[i]) for i in range(len(g.subsets)) if g.subset_section[i] == k)) for k, s in enumerate(g.sections)},
        "bootstrap": {"replicates": n_boot, "seed": seed, "ci": 0.95},
        "length": _length_summary(plist, strata),
        "methods": {},
    }
    for m in plist[0].values:  # every rule, plus any extra the caller added
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
        conf = np.array([p.confidence.get(m, abs(p.values[m][0] - p.values[m][1])) for p in plist])
        margin = np.abs(ch - rj)
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
            "length": _length_block(correct, strata, sec_masks, W, g.sections),
            "selective": _selective(correct, conf, W),
            "selective_by_margin": _selective(correct, margin, W),
        }
    domains: dict[str, int] = {}
    for p in plist:
        if p.domain is not None:
            domains[p.domain] = domains.get(p.domain, 0) + 1
    if domains:
        out["domains"] = domains
    return out


def _length_summary(pairs: list[EvalPair], strata: dict[str, np.ndarray]) -> dict[str, Any]:
    """How the sample's lengths lean: by which measure the strata go, and the
    chosen-minus-rejected length by each measure the pairs hold (strong and weak
    tokens of the density pass, else the judge's tokens; characters)."""
    measures = [k for k in ("strong_tokens", "weak_tokens", "judge_tokens", "chars") if pairs and all(k in p.lengths for p in pairs)]
    if not measures:
        return {"strata_by": LENGTH_MEASURE, "pairs": {k: int(v.sum()) for k, v in strata.items()}}
    d = {k: np.array([p.lengths[k][0] - p.lengths[k][1] for p in pairs], dtype=float) for k in measures}
    return {
        "strata_by": LENGTH_MEASURE,
        "pairs": {k: int(v.sum()) for k, v in strata.items()},
        "chosen_longer_share": {k: float((v > 0).mean()) for k, v in d.items()},
        "mean_chosen_minus_rejected": {k: float(v.mean()) for k, v in d.items()},
    }


def _balanced_overall(correct: np.ndarray, strata: dict[str, np.ndarray], sec_masks: list[np.ndarray], W: np.ndarray) -> np.ndarray:
    """Length-balanced overall accuracy for each row of weights ``W`` (draws x pairs):
    per section the mean of the chosen-longer and chosen-shorter accuracies, then the
    mean over sections that have both (as :func:`_length_block`)."""
    import warnings

    accs = []
    for name in ("longer", "shorter"):
        m = strata[name]
        hits = np.stack([W @ (correct * m * sm) for sm in sec_masks], axis=-1)
        cnt = np.stack([W @ (m * sm).astype(float) for sm in sec_masks], axis=-1)
        accs.append(np.where(cnt > 0, hits / np.where(cnt > 0, cnt, 1), np.nan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(np.nanmean((accs[0] + accs[1]) / 2, axis=-1))


def paired_difference(
    a: list[EvalPair], b: list[EvalPair], method: str = MAIN, *, method_b: str | None = None, metric: str = "accuracy",
    n_boot: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """Overall accuracy (``metric="balanced"``: length-balanced accuracy) of ``a``'s
    ``method`` minus that of ``b``'s ``method_b`` (default the same method), on the
    same labelled pairs, with a paired 95% bootstrap interval.

    Why paired: two annotators scored on the same pairs share the pairs' difficulty,
    so one resample of the pairs (within subsets, as in ``report``) is applied to both
    and the difference is taken per draw.  The interval then reflects how much the
    two agree on which pairs they get wrong, which two separate intervals cannot
    show: it is the right test of "is A better than B on these pairs".  ``a`` and
    ``b`` may be one output (two rules of one scoring pass).
    """
    if [p.id for p in a] != [p.id for p in b]:
        raise ValueError("the two outputs do not hold the same pairs in the same order")
    if not a:
        raise ValueError("no labelled pairs to compare")
    if metric not in ("accuracy", "balanced"):
        raise ValueError(f"unknown metric {metric!r}")
    mb = method_b or method
    g = _groups(a)
    ca = np.array([p.values[method][0] > p.values[method][1] for p in a], dtype=np.float64)
    cb = np.array([p.values[mb][0] > p.values[mb][1] for p in b], dtype=np.float64)
    if metric == "balanced":
        W = _counts(g, len(a), n_boot, seed)
        sec_of = np.array([g.sections.index(p.section) for p in a])
        masks = [(sec_of == k).astype(float) for k in range(len(g.sections))]
        strata = _strata(a)
        ones = np.ones((1, len(a)))
        diff = float(_balanced_overall(ca, strata, masks, ones)[0] - _balanced_overall(cb, strata, masks, ones)[0])
        draws = _balanced_overall(ca, strata, masks, W) - _balanced_overall(cb, strata, masks, W)
    else:
        _, oa = _section_and_overall(ca, g, g.subset_idx)
        _, ob = _section_and_overall(cb, g, g.subset_idx)
        diff = oa - ob
        draws = np.array([_section_and_overall(ca, g, ix)[1] - _section_and_overall(cb, g, ix)[1] for ix in _draws(g, n_boot, seed)])
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return {"method": method, "method_b": mb, "metric": metric, "n_pairs": len(a), "diff": diff, "ci": [float(lo), float(hi)]}


def _cell(d: dict[str, Any] | None, ci: bool = True) -> str:
    if not d or d.get("acc") is None:
        return "-"
    if not ci or d.get("ci") is None or d["ci"][0] is None or not np.isfinite(d["ci"][0]):
        return f"{100 * d['acc']:.1f}"
    return f"{100 * d['acc']:.1f} ({100 * d['ci'][0]:.0f}-{100 * d['ci'][1]:.0f})"


def report_table(rep: dict[str, Any], main: str = MAIN) -> Any:
    """Rich table: one row per method; overall accuracy, by length stratum and
    length-balanced, and the accuracy of its most confident 10/30/50%."""
    from rich.table import Table

    ln = rep.get("length", {}).get("pairs", {})
    t = Table(
        title=f"accuracy on {rep['n_pairs']} labelled pairs (95% bootstrap CI); length strata by the {LENGTH_MEASURE}: "
        f"chosen longer {ln.get('longer', '?')}, shorter {ln.get('shorter', '?')}, same {ln.get('same', '?')}",
        title_justify="left",
    )
    for c in ("method", "overall", "chosen longer", "chosen shorter", "length-balanced", "top 10%", "top 30%", "top 50%"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for m, d in rep["methods"].items():
        sel = {x["coverage"]: x for x in d.get("selective", [])}
        lb = d.get("length", {})
        t.add_row(m, _cell(d["overall"]), _cell(lb.get("longer")), _cell(lb.get("shorter")), _cell(lb.get("balanced")),
                  *(_cell(sel.get(q), ci=False) for q in (0.1, 0.3, 0.5)), style="bold" if m == main else None)
    return t


def section_table(rep: dict[str, Any], main: str = MAIN) -> Any:
    """Rich table: length-balanced accuracy (and plain accuracy) of each method per section."""
    from rich.table import Table

    secs = list(rep["sections"])
    t = Table(title="per section: length-balanced accuracy (plain accuracy)", title_justify="left")
    t.add_column("method")
    for s in secs:
        t.add_column(f"{s} (n={rep['sections'][s]})", justify="right")
    for m, d in rep["methods"].items():
        cells = []
        for s in secs:
            bal = d.get("length", {}).get("sections", {}).get(s, {}).get("balanced")
            cells.append(f"{_cell(bal, ci=False)} ({100 * d['sections'][s]['acc']:.0f})")
        t.add_row(m, *cells, style="bold" if m == main else None)
    return t


def subset_table(rep: dict[str, Any], main: str = MAIN) -> Any:
    from rich.table import Table

    cols = [c for c in dict.fromkeys((main, "cdr-mean", "strong-mean", "longer")) if c in rep["methods"]]
    t = Table(title="accuracy per subset", title_justify="left")
    for c in ("subset", "section", "n", *cols):
        t.add_column(c, justify="left" if c in ("subset", "section") else "right")
    subs = rep["methods"][main]["subsets"]
    for s, d in subs.items():
        t.add_row(s, d["section"], str(d["n"]), *(f"{100 * rep['methods'][m]['subsets'][s]['acc']:.1f}" for m in cols))
    return t


def plot(rep_path: str | Path, pairs: list[EvalPair], path: str | Path, main: str = MAIN) -> str | None:
    """Length-balanced accuracy per section, accuracy against coverage, and margin
    histograms (right vs wrong), drawn by ``python -m cdr_local.plot`` in a child process.

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
    margins = [p.values[main][0] - p.values[main][1] for p in pairs]
    try:
        r = subprocess.run(
            [sys.executable, "-m", "cdr_local.plot", str(rep_path), str(path), main],
            input=orjson.dumps(margins), capture_output=True, timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"plot failed: {e}"
    if r.returncode != 0:
        last = r.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        return f"plot failed (exit {r.returncode}){': ' + last[0] if last[0] else ''}"
    return None
