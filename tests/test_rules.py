"""Scoring rules, their label-free parameters, calibration and abstention: each
number checked against a hand computation; the CLI end to end on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from test_cli import cdr

from cdr_local.calibration import (
    Calibration,
    Confidence,
    abstain_rule,
    abstainer,
    fit_confidence,
    reliability,
)
from cdr_local.errors import CdrError
from cdr_local.rules import RULES, Response, estimate, parse_rule

A = Response(strong_logprob=-10.0, strong_tokens=5, weak_logprob=-14.0, weak_tokens=4, chars=30)
B = Response(strong_logprob=-30.0, strong_tokens=20, weak_logprob=-40.0, weak_tokens=25, chars=90)


def test_rule_values_by_hand() -> None:
    p = {"strong_offset": -1.5, "weak_offset": -2.0, "length_slope": 0.25, "beta": 0.5}
    want = {
        "cdr-sum": (4.0, 10.0),
        "cdr-mean": (-2.0 + 3.5, -1.5 + 1.6),
        "cdr-offset": ((-10 + 7.5) - (-14 + 8), (-30 + 30) - (-40 + 50)),  # (3.5, -10)
        "cdr-lc": (4.0 - 0.25 * 5, 10.0 - 0.25 * 20),
        "cdr-beta": (-10 + 7.0, -30 + 20.0),
        "cdr-beta-mean": (-2.0 + 0.5 * 3.5, -1.5 + 0.5 * 1.6),
        "strong-sum": (-10.0, -30.0),
        "strong-mean": (-2.0, -1.5),
        "weak-sum": (-14.0, -40.0),
        "weak-mean": (-3.5, -1.6),
        "longer": (30.0, 90.0),
        "shorter": (-30.0, -90.0),
    }
    assert set(want) == set(RULES)
    for name, (va, vb) in want.items():
        assert parse_rule(name, p).values([A, B]) == pytest.approx([va, vb]), name


def test_z_scales_by_hand() -> None:
    assert RULES["cdr-sum"].z(5.0, A, B) == pytest.approx(5.0 / math.sqrt(25))
    assert RULES["cdr-mean"].z(0.5, A, B) == pytest.approx(0.5 / math.sqrt(1 / 5 + 1 / 20))
    assert RULES["longer"].z(15.0, A, B) == 15.0


def test_estimate_by_hand() -> None:
    recs = [(A, B), (B, A, A)]
    got = estimate(recs)
    s_lp, s_n = -10 - 30 - 30 - 10 - 10, 5 + 20 + 20 + 5 + 5
    w_lp, w_n = -14 - 40 - 40 - 14 - 14, 4 + 25 + 25 + 4 + 4
    assert got["strong_offset"] == pytest.approx(s_lp / s_n)
    assert got["weak_offset"] == pytest.approx(w_lp / w_n)
    # pairs (i < j): (A,B): d=-15, m=-6; (B,A): 15, 6; (B,A): 15, 6; (A,A): 0, 0
    assert got["length_slope"] == pytest.approx((90 + 90 + 90) / (225 * 3))


def test_parse_rule() -> None:
    assert parse_rule("cdr-beta").label() == "cdr-beta:beta=0.5"
    assert parse_rule("cdr-beta:beta=0.25").params["beta"] == 0.25
    # estimated parameters are not part of the label
    assert parse_rule("cdr-offset", {"strong_offset": -1, "weak_offset": -2}).label() == "cdr-offset"
    for bad, why in (("nope", "unknown rule"), ("cdr-sum:beta=1", "takes none"), ("cdr-beta:gamma=1", "bad parameter"),
                     ("cdr-beta:beta=x", "must be a number"), ("cdr-beta:beta=0", "beta must be in"), ("cdr-beta:beta=nan", "finite")):
        with pytest.raises(CdrError, match=why):
            parse_rule(bad)
    with pytest.raises(CdrError, match="needs strong_offset"):
        parse_rule("cdr-offset").values([A, B])


def test_confidence_fit_and_reliability() -> None:
    rng = np.random.default_rng(0)
    z = rng.uniform(0, 3, 4000)
    right = (rng.random(4000) < 1 / (1 + np.exp(-(-0.2 + 1.1 * z)))).astype(float)
    a, b = fit_confidence(z, right)
    assert a == pytest.approx(-0.2, abs=0.15) and b == pytest.approx(1.1, abs=0.15)
    # evidence that does not help: the confidence is the (weighted) accuracy, never falling with |z|
    a0, b0 = fit_confidence(z, (z < 1).astype(float))
    assert b0 == 0.0 and 1 / (1 + math.exp(-a0)) == pytest.approx(np.mean(z < 1), abs=1e-6)
    # reliability: equal-count bins, by hand
    rel = reliability(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.0, 1.0, 1.0, 1.0]), bins=2)
    assert rel["bins"] == [{"n": 2, "predicted": pytest.approx(0.15), "observed": 0.5},
                           {"n": 2, "predicted": pytest.approx(0.85), "observed": 1.0}]
    assert rel["ece"] == pytest.approx(0.5 * 0.35 + 0.5 * 0.15)


def test_abstain_thresholds() -> None:
    cal = Calibration(pair="p", models={}, rule="cdr-sum", params={}, z_quantiles={"cdr-sum": list(np.linspace(0, 10, 101))})
    cut = abstain_rule(cal, "cdr-sum", 0.6, 0.3)
    assert cut == {"min_confidence": 0.6, "min_abs_z": pytest.approx(7.0), "keep_top": 0.3}
    why = abstainer(cut)
    assert why is not None
    assert why({"confidence": 0.9, "margin_z": 8.0}) is None
    assert "below --min-confidence" in (why({"confidence": 0.5, "margin_z": 8.0}) or "")
    assert "--keep-top" in (why({"confidence": 0.9, "margin_z": -6.0}) or "")
    assert why({"id": "single response"}) is None
    with pytest.raises(CdrError, match="needs a calibration"):
        abstain_rule(None, "cdr-sum", None, 0.5)
    with pytest.raises(CdrError, match="probability"):
        abstain_rule(None, "cdr-sum", 1.5, None)
    assert Confidence()(0.0) == 0.5 and Confidence()(1.0) == pytest.approx(1 / (1 + math.exp(-1)))


# --------------------------------------------------------------------------- CLI

ROWS = [{"id": f"q{i}", "prompt": f"Question {i}?", "chosen": "A fine answer. " * (1 + i % 4), "rejected": "No. " * (1 + i % 3),
         "section": "AB"[i % 2], "subset": "ab"[i % 2]} for i in range(24)]


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    p = tmp_path / "lab.jsonl"
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in ROWS))
    return p


def _lines(p: Path) -> list[dict[str, object]]:
    return [orjson.loads(x) for x in p.read_bytes().splitlines()] if p.exists() else []


def test_annotate_labels_by_the_rule(labelled: Path, tiny_registry: Path, tmp_path: Path) -> None:
    for rule in ("cdr-sum", "cdr-mean", "strong-mean"):
        out = tmp_path / f"{rule}.jsonl"
        r = cdr("annotate", labelled, "-o", out, "--models", tiny_registry, "--rule", rule, "-q")
        assert r.returncode == 0, r.stderr
        spec = parse_rule(rule)
        for o in _lines(out):
            sc = o["scores"]
            vals = spec.values([Response.from_score(s) for s in sc])  # type: ignore[arg-type]
            assert [s["value"] for s in sc] == vals  # type: ignore[index]
            best = max(range(2), key=lambda i: (vals[i], -i))
            assert o["label"] == ("tie" if vals[0] == vals[1] else sc[best]["response"])  # type: ignore[index]
            assert o["margin_value"] == pytest.approx(abs(vals[0] - vals[1]))
            assert o["margin"] == pytest.approx(math.log(o["confidence"] / (1 - o["confidence"])) if o["confidence"] > 0.5 else 0.0)
            assert o["confidence"] == pytest.approx(1 / (1 + math.exp(-abs(o["margin_z"]))))  # the uncalibrated default
        meta = orjson.loads(Path(str(out) + ".meta.json").read_bytes())
        assert meta["rule"]["label"] == rule and meta["confidence"]["calibrated"] is False
    # the rule is guarded on resume
    r = cdr("annotate", labelled, "-o", tmp_path / "cdr-sum.jsonl", "--models", tiny_registry, "--rule", "cdr-mean", "--resume")
    assert r.returncode == 2 and "rule: 'cdr-sum' -> 'cdr-mean'" in r.stderr


def test_calibrate_then_keep_top_and_resume(labelled: Path, tiny_registry: Path, tmp_path: Path) -> None:
    ev = tmp_path / "ev.jsonl"
    r = cdr("eval", labelled, "-o", ev, "--models", tiny_registry, "--calibrate", "--rule", "cdr-mean", "-q", "--bootstrap", "50")
    assert r.returncode == 0, r.stderr
    cal = orjson.loads((tmp_path / "ev.calibration.json").read_bytes())
    assert cal["rule"] == "cdr-mean" and "cdr-mean" in cal["confidence"] and len(cal["z_quantiles"]["cdr-mean"]) == 101
    out = tmp_path / "an.jsonl"
    args = ["annotate", labelled, "-o", out, "--models", tiny_registry, "--calibration", tmp_path / "ev.calibration.json",
            "--keep-top", "0.5", "-q"]
    assert cdr(*args, "--limit", "10").returncode == 0
    assert cdr(*args, "--resume").returncode == 0
    kept, held = _lines(out), _lines(tmp_path / "an.abstained.jsonl")
    assert len(kept) + len(held) == len(ROWS)
    assert sorted(str(o["id"]) for o in kept + held) == sorted(str(x["id"]) for x in ROWS)  # each once, none lost
    zq = cal["z_quantiles"]["cdr-mean"]
    thr = float(np.interp(50, np.linspace(0, 100, len(zq)), zq))
    assert all(abs(float(o["margin_z"])) >= thr for o in kept)  # type: ignore[arg-type]
    assert all(abs(float(o["margin_z"])) < thr and "--keep-top" in str(o["abstained"]) for o in held)  # type: ignore[arg-type]
    meta = orjson.loads(Path(str(out) + ".meta.json").read_bytes())
    assert meta["rule"]["label"] == "cdr-mean" and meta["confidence"]["calibrated"] is True
    assert meta["abstain"]["keep_top"] == 0.5
    # calibrated confidence: sigmoid(a + b |z|) with the file's a, b
    a, b = cal["confidence"]["cdr-mean"]["a"], cal["confidence"]["cdr-mean"]["b"]
    for o in kept:
        assert o["confidence"] == pytest.approx(1 / (1 + math.exp(-(a + b * abs(float(o["margin_z"]))))))  # type: ignore[arg-type]


def test_calibration_for_another_pair_is_refused(labelled: Path, tiny_registry: Path, tmp_path: Path) -> None:
    ev = tmp_path / "ev.jsonl"
    assert cdr("eval", labelled, "-o", ev, "--models", tiny_registry, "--calibrate", "-q", "--bootstrap", "20").returncode == 0
    r = cdr("annotate", labelled, "-o", tmp_path / "x.jsonl", "--models", tiny_registry, "--pair", "tiny-self",
            "--calibration", tmp_path / "ev.calibration.json")
    assert r.returncode == 2 and "does not fit pair tiny-self" in r.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_shipped_calibrations_fit_the_shipped_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shipped calibration whose models no longer match its pair is silently
    unused (confidence falls back to uncalibrated): every file under
    cdr_local/calibrations must resolve for its pair, with a rule that parses,
    and the default pair must have one (the README's default rule is its rule)."""
    import importlib.resources

    from cdr_local.calibration import resolve
    from cdr_local.models import load_registry

    monkeypatch.delenv("CDR_MODELS", raising=False)
    reg = load_registry()
    files = [f for f in importlib.resources.files("cdr_local").joinpath("calibrations").iterdir() if f.name.endswith(".json")]
    assert files
    for f in files:
        pair = f.name.removesuffix(".json")
        cal = resolve(reg, pair, None)
        assert cal is not None, f"{f.name} does not fit pair {pair} of the shipped registry"
        parse_rule(cal.rule, cal.params)
        assert cal.rule in cal.confidence and cal.confidence[cal.rule]["b"] >= 0
    default = resolve(reg, None, None)
    assert default is not None and default.pair == reg.default_pair
