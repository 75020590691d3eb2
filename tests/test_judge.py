"""The pairwise judge method (cdr_local.methods.judge) and --method on the commands.

The judge's numbers are checked against brute-force full logits of the same
prompt (tests/reference.py), on the tiny real GGUF models the tests build."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from reference import brute_logprobs
from test_cli import CDR, _env

from cdr_local.chat import Message
from cdr_local.engine import EngineSettings
from cdr_local.errors import CdrError
from cdr_local.methods import MEASURED, parse_methods
from cdr_local.methods.judge import JUDGE_SYSTEM, JUDGE_USER, JudgeMethod, allot, question_text
from cdr_local.models import load_registry
from cdr_local.pair import LoadedPair
from cdr_local.profiles import load_profile
from cdr_local.records import parse_line

RECORD = {"id": "r1", "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I like turtles and other animals."}


@pytest.fixture(scope="module")
def pair(tiny_registry: Path) -> Any:
    lp = LoadedPair(load_registry(tiny_registry), "tiny", EngineSettings(n_threads=2, n_ctx=2048), pull=False)
    yield lp
    lp.close()


def _record(obj: dict[str, Any]) -> Any:
    return parse_line(orjson.dumps(obj), 1)


def test_parse_methods() -> None:
    assert parse_methods(None) == ["cdr"]
    assert parse_methods("judge, cdr") == ["judge", "cdr"]
    for bad, why in (("nope", "unknown method"), ("judge,judge", "twice"), ("cdr,strong", "share one"), (",", "needs a name")):
        with pytest.raises(CdrError, match=why):
            parse_methods(bad)


def test_allot_keeps_the_shorter_whole() -> None:
    assert allot([10, 100], 60) == [10, 50]
    assert allot([100, 10], 60) == [50, 10]
    assert allot([40, 100], 60) == [30, 30]
    assert sum(allot([7, 9], 5)) <= 5


def test_judge_values_match_brute_force_logits(pair: Any, tiny_bos_model: Path) -> None:
    """d = log P(A) - log P(B) of each order from full logits; values = +-(d1 - d2)/2;
    position bias = (d1 + d2)/2; z = half the margin."""
    j = JudgeMethod(pair, profile=load_profile("none"))
    rec = _record(RECORD)
    got = j.score(rec, rec.messages)
    side = j.side
    d = []
    for a, b in (("Blue.", RECORD["rejected"]), (RECORD["rejected"], "Blue.")):
        msgs = [Message("system", JUDGE_SYSTEM), Message("user", JUDGE_USER.format(question=RECORD["prompt"], a=a, b=b))]
        ctx = side.tokenize(msgs, ["A"]).context
        la = brute_logprobs(str(tiny_bos_model), list(ctx), list(j.letters[0])).sum()
        lb = brute_logprobs(str(tiny_bos_model), list(ctx), list(j.letters[1])).sum()
        d.append(la - lb)
    pref = (d[0] - d[1]) / 2
    assert got.values[0] == pytest.approx(pref, abs=2e-4)
    assert got.values[1] == pytest.approx(-pref, abs=2e-4)
    assert got.record["judge"]["position_bias"] == pytest.approx((d[0] + d[1]) / 2, abs=2e-4)
    assert got.z(got.values[0] - got.values[1], 0, 1) == pytest.approx(pref, abs=2e-4)
    assert got.truncated == [False, False]


def test_swapping_the_responses_swaps_the_values(pair: Any) -> None:
    """Both orders are read whatever the input order: the judge has no position left."""
    j = JudgeMethod(pair, profile=load_profile("none"))
    r1 = _record({"id": "a", "prompt": "Hi?", "responses": ["Hello there.", "Go away, I am busy."]})
    r2 = _record({"id": "a", "prompt": "Hi?", "responses": ["Go away, I am busy.", "Hello there."]})
    v1, v2 = j.score(r1, r1.messages).values, j.score(r2, r2.messages).values
    assert v1[0] == pytest.approx(v2[1], abs=1e-5) and v1[1] == pytest.approx(v2[0], abs=1e-5)


def test_three_responses_are_judged_pairwise(pair: Any) -> None:
    j = JudgeMethod(pair, profile=load_profile("none"))
    rec = _record({"id": "b", "prompt": "2+2?", "responses": ["4", "5", "four"]})
    got = j.score(rec, rec.messages)
    assert got.record["judge"]["orders"] == 6
    assert sum(got.values) == pytest.approx(0.0, abs=1e-9)  # each pref counted once for and once against


def test_long_responses_are_cut_to_fit(tiny_registry: Path) -> None:
    lp = LoadedPair(load_registry(tiny_registry), "tiny", EngineSettings(n_threads=2, n_ctx=1200), pull=False)
    try:
        j = JudgeMethod(lp, profile=load_profile("none"))
        rec = _record({"id": "c", "prompt": "Say a word.", "responses": ["word " * 400, "Yes."]})
        got = j.score(rec, rec.messages)
        assert got.truncated == [True, False]
        assert got.fields[1]["judge_tokens"] == len(lp.strong.model.tokenize("Yes.", add_special=False, parse_special=False))
        assert all(math.isfinite(v) for v in got.values)
    finally:
        lp.close()


def test_question_text_keeps_the_conversation() -> None:
    one = [Message("user", "Q?")]
    assert question_text(one) == "Q?"
    multi = [Message("system", "S"), Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
    assert question_text(multi) == "[System Prompt]\nS\n\nUser: a\nAssistant: b\nUser: c"


def test_measured_z_is_half_the_margin() -> None:
    assert MEASURED["judge"](3.0) == 1.5


def _cdr(home: Path, *args: Any, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
    p = subprocess.run([*CDR, *map(str, args)], capture_output=True, timeout=300, env=_env(home))
    err = p.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    if ok:
        assert p.returncode == 0, err
    return p


def _rows(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def test_cli_annotate_eval_pairs_with_the_judge(tiny_registry: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    inp = tmp_path / "in.jsonl"
    recs = [{"id": f"p{i}", "prompt": f"Question {i}?", "chosen": "A short fine answer." * (1 + i % 3),
             "rejected": "No." * (1 + i % 2), "section": "Chat" if i % 2 else "Safety"} for i in range(12)]
    inp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    # judge alone: labels and confidences from the judge's values; no density fields
    ann = tmp_path / "ann.jsonl"
    _cdr(home, "annotate", inp, "-o", ann, "--models", tiny_registry, "--method", "judge", "--quiet", "--n-ctx", "2048")
    for x in _rows(ann):
        v = [s["value"] for s in x["scores"]]
        assert [s["judge"] for s in x["scores"]] == v and "strong_logprob" not in x["scores"][0]
        assert x["margin_value"] == max(v) - min(v) and x["margin_z"] == pytest.approx(x["margin_value"] / 2)
        assert x["confidence"] == pytest.approx(1 / (1 + math.exp(-abs(x["margin_z"]))))  # uncalibrated: sigmoid(|z|)
        assert set(x["judge"]) == {"position_bias", "verdict_mass", "orders"}
    meta = orjson.loads((tmp_path / "ann.jsonl.meta.json").read_bytes())
    assert meta["method"]["names"] == ["judge"] and "prompt_sha256" in meta["judge"]
    # a judge-only output reports the judge and the length baselines, with the judge's token counts as a length measure
    _cdr(home, "eval", inp, "-o", ann, "--models", tiny_registry, "--report-only", "--method", "judge", "--quiet",
         "--bootstrap", "20")
    rep = orjson.loads((tmp_path / "ann.report.json").read_bytes())
    assert set(rep["methods"]) == {"judge", "longer", "shorter"}
    sides = [{s["response"]: s for s in x["scores"]} for x in _rows(ann)]
    for k in ("judge_tokens", "chars"):
        want = sum(d["chosen"][k] - d["rejected"][k] for d in sides) / len(sides)
        assert rep["length"]["mean_chosen_minus_rejected"][k] == pytest.approx(want)
    assert set(rep["length"]["mean_chosen_minus_rejected"]) == {"judge_tokens", "chars"}
    longer = sum(d["chosen"]["chars"] > d["rejected"]["chars"] for d in sides) / len(sides)
    assert rep["methods"]["longer"]["overall"]["acc"] == pytest.approx(longer)
    # a resume must not mix methods
    p = _cdr(home, "annotate", inp, "-o", ann, "--models", tiny_registry, "--resume", "--quiet", "--n-ctx", "2048", ok=False)
    assert p.returncode != 0 and "method" in p.stderr.decode()
    # eval reports judge and every rule side by side; main = the first method named
    ev = tmp_path / "ev.jsonl"
    _cdr(home, "eval", inp, "-o", ev, "--models", tiny_registry, "--method", "judge,cdr", "--quiet", "--bootstrap", "20",
         "--n-ctx", "2048")
    rep = orjson.loads((tmp_path / "ev.report.json").read_bytes())
    assert rep["main"] == "judge" and {"judge", "cdr-sum", "longer"} <= set(rep["methods"])
    rows = _rows(ev)
    acc = sum(s["judge"] > r["judge"] for x in rows for s, r in [x["scores"]] if s["response"] == "chosen") / len(rows)
    sec = rep["methods"]["judge"]["sections"]
    assert sum(sec[s]["acc"] * sec[s]["n"] for s in sec) / len(rows) == pytest.approx(acc)
    assert "balanced" in rep["methods"]["judge"]["length"]
    # the same output, judged alone and with cdr, gives the judge the same values
    assert [s["judge"] for x in rows for s in x["scores"]] == [s["judge"] for x in _rows(ann) for s in x["scores"]]
    # the report's main entry follows --method: the recorded rule of the density pass, the strong model's default rule
    for m, main in (("cdr", orjson.loads((tmp_path / "ev.jsonl.meta.json").read_bytes())["rule"]["label"]), ("strong", "strong-sum")):
        _cdr(home, "eval", inp, "-o", ev, "--models", tiny_registry, "--report-only", "--method", m, "--quiet", "--bootstrap", "20")
        assert orjson.loads((tmp_path / "ev.report.json").read_bytes())["main"] == main
    # report-only on a cdr output asked for the judge: one line
    plain = tmp_path / "plain.jsonl"
    _cdr(home, "eval", inp, "-o", plain, "--models", tiny_registry, "--quiet", "--bootstrap", "20")
    p = _cdr(home, "eval", inp, "-o", plain, "--models", tiny_registry, "--report-only", "--method", "judge", ok=False)
    assert p.returncode != 0 and "no judge scores" in p.stderr.decode()
    # pairs: from the judge's annotate output, by the judge's values
    out = tmp_path / "pairs.jsonl"
    _cdr(home, "pairs", ann, "-o", out, "--models", tiny_registry, "--method", "judge", "--strategy", "best-worst", "--quiet",
         "--n-ctx", "2048")
    by_id = {x["id"]: x for x in _rows(ann)}
    for x in _rows(out):
        a = by_id[x["id"]]
        assert x["rule"] == "judge" and x["margin_value"] == pytest.approx(a["margin_value"])
        assert x["chosen"] == a["chosen"]


def test_cli_unknown_method_is_one_line(tiny_registry: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(orjson.dumps(RECORD) + b"\n")
    p = _cdr(tmp_path / "home", "annotate", inp, "-o", tmp_path / "o.jsonl", "--models", tiny_registry, "--method", "vibes", ok=False)
    err = p.stderr.decode().strip()
    assert p.returncode == 2 and "unknown method 'vibes'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()
    p = _cdr(tmp_path / "home", "annotate", inp, "-o", tmp_path / "o.jsonl", "--models", tiny_registry, "--method", "strong",
             "--rule", "cdr-sum", ok=False)
    assert p.returncode == 2 and "--method strong" in p.stderr.decode()


def test_api_takes_the_method(tiny_registry: Path) -> None:
    import cdr_local

    with cdr_local.Annotator(models=tiny_registry, method="judge", n_ctx=2048) as a:
        rec = a.score("Name a colour.", ["Blue.", "I like turtles."])
        assert a.metadata()["method"]["names"] == ["judge"]
    assert [s["value"] for s in rec["scores"]] == [s["judge"] for s in rec["scores"]]
    with pytest.raises(CdrError, match="unknown method"):
        cdr_local.Annotator(models=tiny_registry, method="vibes")
