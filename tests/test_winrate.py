"""cdr winrate and cdr lc end to end on tiny models, checked against recomputation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from test_cli import CDR

from cdr_local.lc import lc_win_rate, sigmoid
from cdr_local.winrate import instruction_id, load_outputs, select_instructions, spearman

INSTRUCTIONS = [f"Question {i}: tell me about topic {i}." for i in range(12)]


def _write_alpaca(path: Path, gen: str, length: int, shift: int) -> None:
    rows = [
        {"instruction": ins, "output": (f"Answer {i + shift} about the topic. " * (1 + (i + length) % 5)).strip(), "generator": gen, "dataset": "x"}
        for i, ins in enumerate(INSTRUCTIONS)
    ]
    path.write_text(json.dumps(rows))


def test_load_outputs_json_list_and_jsonl(tmp_path: Path) -> None:
    _write_alpaca(tmp_path / "a.json", "a", 1, 0)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"instruction": s, "output": "o"}) for s in INSTRUCTIONS[:3]) + "\n")
    assert list(load_outputs(tmp_path / "a.json")) == INSTRUCTIONS
    assert load_outputs(tmp_path / "b.jsonl") == dict.fromkeys(INSTRUCTIONS[:3], "o")


def test_select_instructions_is_seeded_and_ordered() -> None:
    base = {s: "x" for s in INSTRUCTIONS}
    a = select_instructions(base, 5, seed=0)
    assert a == select_instructions(base, 5, seed=0) and len(a) == 5
    assert a == [s for s in INSTRUCTIONS if s in a]  # baseline order kept
    assert select_instructions(base, None) == INSTRUCTIONS


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 4], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)


def _rewards(path: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["id"]: r["scores"][0]["reward"] for r in rows}


def test_winrate_cli_matches_recomputation(tmp_path: Path, tiny_registry: Path) -> None:
    _write_alpaca(tmp_path / "base.json", "base", 0, 0)
    _write_alpaca(tmp_path / "m1.json", "m1", 2, 1)
    _write_alpaca(tmp_path / "m2.json", "m2", 4, 7)
    _write_alpaca(tmp_path / "m3.json", "m3", 1, 3)
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"m1": 30.0, "m2": 20.0, "m3": 10.0}))
    out = tmp_path / "wr"
    args = [*CDR, "winrate", "-m", str(tmp_path / "m1.json"), "-m", str(tmp_path / "m2.json"), "-m", str(tmp_path / "m3.json"),
            "-b", str(tmp_path / "base.json"), "-o", str(out), "--models", str(tiny_registry), "--instructions", "10",
            "--reference", str(ref), "--quiet", "--tau", "2"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "winrate.json").read_text())
    assert rep["instructions"] == 10 and rep["tau"] == 2
    chosen = select_instructions(load_outputs(tmp_path / "base.json"), 10, 0)
    base_r = _rewards(out / "baseline.scores.jsonl")
    base = load_outputs(tmp_path / "base.json")
    margins = {name: {s: _rewards(out / f"{name}.scores.jsonl")[instruction_id(s)] - base_r[instruction_id(s)] for s in chosen}
               for name in ("m1", "m2", "m3")}
    for m in rep["models"]:
        outs = load_outputs(tmp_path / f"{m['name']}.json")
        p = np.array([sigmoid(margins[m["name"]][s] / 2) for s in chosen])
        dlen = np.array([len(base[s]) - len(outs[s]) for s in chosen], dtype=float)
        # difficulty: the two other models' mean logit on each instruction
        others = [n for n in margins if n != m["name"]]
        diff = np.array([sum(margins[o][s] / 2 for o in others) / 2 for s in chosen])
        want = lc_win_rate(p, dlen, diff, cv=True, n_boot=0)
        assert m["n"] == 10
        assert m["win_rate"] == pytest.approx(100 * p.mean(), abs=1e-9)
        assert m["lc_win_rate"] == pytest.approx(want.lc_win_rate, abs=1e-9)
        assert m["phi"] == pytest.approx(want.phi, abs=1e-9)
    lcs = [m["lc_win_rate"] for m in rep["models"]]
    assert lcs == sorted(lcs, reverse=True)  # leaderboard order
    assert "spearman_lc_vs_reference" in rep
    # alpaca_eval's files: one leaderboard row per model, one annotation per (model, instruction)
    board = (out / "leaderboard.csv").read_text().splitlines()
    assert board[0].split(",")[1:4] == ["win_rate", "standard_error", "n_wins"] and len(board) == 4
    row = dict(zip(board[0].split(","), board[1].split(","), strict=True))
    assert float(row["length_controlled_winrate"]) == pytest.approx(rep["models"][0]["lc_win_rate"])
    ann = json.loads((out / "annotations.json").read_text())
    assert len(ann) == 30 and all(1 <= a["preference"] <= 2 for a in ann)
    # a rerun resumes: nothing is rescored, same report
    r2 = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0
    assert json.loads((out / "winrate.json").read_text())["models"] == rep["models"]
    # --report-only scores nothing and reports the same; with a model's scores gone it reports the rest
    (out / "m3.scores.jsonl").unlink()
    r3 = subprocess.run([*args, "--report-only"], capture_output=True, text=True, timeout=120)
    assert r3.returncode == 0, r3.stderr
    partial = json.loads((out / "winrate.json").read_text())["models"]
    # the same raw win rates; LC may move, as the difficulty term needs two other models
    want = {m["name"]: m["win_rate"] for m in rep["models"] if m["name"] != "m3"}
    assert {m["name"]: m["win_rate"] for m in partial} == want
    assert not (out / "m3.scores.jsonl").exists()


def test_winrate_judge_matches_annotate_and_recomputation(tmp_path: Path, tiny_registry: Path) -> None:
    """--method judge: each (model, baseline) pair judged side by side; the margins are what
    `cdr annotate --method judge` gives on the same pairs, the win rates recomputed from them."""
    _write_alpaca(tmp_path / "base.json", "base", 0, 0)
    _write_alpaca(tmp_path / "m1.json", "m1", 2, 1)
    _write_alpaca(tmp_path / "m2.json", "m2", 4, 7)
    out = tmp_path / "wr"
    args = [*CDR, "winrate", "-m", str(tmp_path / "m1.json"), "-m", str(tmp_path / "m2.json"),
            "-b", str(tmp_path / "base.json"), "-o", str(out), "--models", str(tiny_registry), "--instructions", "4",
            "--method", "judge", "--quiet", "--n-ctx", "2048"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "winrate.json").read_text())
    assert rep["rule"] == "judge" and rep["tau"] == 2.0 and "log-odds" in rep["tau_from"]
    assert not (out / "baseline.scores.jsonl").exists()  # the baseline is judged beside each model, not alone
    chosen = select_instructions(load_outputs(tmp_path / "base.json"), 4, 0)
    base = load_outputs(tmp_path / "base.json")
    ann = json.loads((out / "annotations.json").read_text())
    for m in rep["models"]:
        outs = load_outputs(tmp_path / f"{m['name']}.json")
        # the independent path: the same pairs, model output first, through annotate
        recs = tmp_path / f"{m['name']}.pairs.jsonl"
        recs.write_text("".join(json.dumps({"id": instruction_id(s), "prompt": s, "response_a": outs[s], "response_b": base[s]}) + "\n"
                                for s in chosen))
        a = subprocess.run([*CDR, "annotate", str(recs), "-o", str(tmp_path / f"{m['name']}.ann.jsonl"), "--models", str(tiny_registry),
                            "--method", "judge", "--quiet", "--n-ctx", "2048"], capture_output=True, text=True, timeout=300)
        assert a.returncode == 0, a.stderr
        rows = {x["id"]: x for x in map(json.loads, (tmp_path / f"{m['name']}.ann.jsonl").read_text().splitlines())}
        margin = {s: rows[instruction_id(s)]["scores"][0]["judge"] - rows[instruction_id(s)]["scores"][1]["judge"] for s in chosen}
        p = np.array([sigmoid(margin[s] / 2) for s in chosen])
        dlen = np.array([len(base[s]) - len(outs[s]) for s in chosen], dtype=float)
        want = lc_win_rate(p, dlen, None, cv=True, n_boot=0)  # two models: no difficulty term
        assert m["n"] == 4
        assert m["win_rate"] == pytest.approx(100 * p.mean(), abs=1e-9)
        assert m["lc_win_rate"] == pytest.approx(want.lc_win_rate, abs=1e-9)
        mine = {x["instruction"]: x["preference"] for x in ann if x["generator_2"] == m["name"]}
        assert mine == pytest.approx({s: 1 + sigmoid(margin[s] / 2) for s in chosen}, abs=1e-12)
    assert all(x["annotator"].endswith("/judge") for x in ann)
    # a rerun resumes: the same report
    r2 = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr
    assert json.loads((out / "winrate.json").read_text())["models"] == rep["models"]


def test_winrate_judge_says_why_nothing_was_judged(tmp_path: Path, tiny_registry: Path) -> None:
    """Every pair rejected (the judge prompt does not fit the tiny registry's n_ctx 512): one line naming the rejects."""
    _write_alpaca(tmp_path / "base.json", "base", 0, 0)
    _write_alpaca(tmp_path / "m1.json", "m1", 2, 1)
    r = subprocess.run([*CDR, "winrate", "-m", str(tmp_path / "m1.json"), "-b", str(tmp_path / "base.json"), "-o", str(tmp_path / "wr"),
                        "--models", str(tiny_registry), "--instructions", "4", "--method", "judge", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert "m1: 0 pairs judged, 4 rejected: see " in err and "m1.judge.rejects.jsonl" in err
    assert len((tmp_path / "wr" / "m1.judge.rejects.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize(("extra", "msg"), [
    (["--method", "judge", "--rule", "cdr-sum"], "--rule and --calibration go with --method cdr"),
    (["--method", "judge,cdr"], "winrate takes one --method"),
    (["--method", "nope"], "unknown method 'nope'"),
])
def test_winrate_method_errors(tmp_path: Path, extra: list[str], msg: str) -> None:
    _write_alpaca(tmp_path / "base.json", "base", 0, 0)
    r = subprocess.run([*CDR, "winrate", "-m", str(tmp_path / "base.json"), "-b", str(tmp_path / "base.json"),
                        "-o", str(tmp_path / "wr"), *extra], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "wr").exists()  # refused before any folder is made


def test_lc_cli_writes_debiased_labels(tmp_path: Path, tiny_registry: Path) -> None:
    rows = [{"id": str(i), "prompt": f"Say something about {i}.", "response_a": "Short." if i % 2 else "A much longer answer " * (1 + i % 4),
             "response_b": "Another answer, of middling length." * (1 + i % 3)} for i in range(10)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ann = tmp_path / "ann.jsonl"
    r = subprocess.run([*CDR, "annotate", str(inp), "-o", str(ann), "--models", str(tiny_registry), "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "ann.lc.jsonl"
    r = subprocess.run([*CDR, "lc", str(ann), "-o", str(out), "--tau", "1.5"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    recs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(recs) == 10
    m_ab = np.array([x["scores"][0]["value"] - x["scores"][1]["value"] for x in recs])
    dtok = np.array([x["scores"][0]["strong_tokens"] - x["scores"][1]["strong_tokens"] for x in recs], dtype=float)
    slope = float(np.dot(dtok, m_ab) / np.dot(dtok, dtok))  # least squares through the origin, by hand
    meta = json.loads(Path(str(out) + ".lc.json").read_text())
    assert meta["slope_nats_per_token"] == pytest.approx(slope, rel=1e-9) and meta["records"] == 10
    changed = 0
    for x, m, d in zip(recs, m_ab, dtok, strict=True):
        assert x["prob"] == pytest.approx(float(sigmoid(m / 1.5)))
        assert x["lc_margin"] == pytest.approx(m - slope * d)
        assert x["lc_prob"] == pytest.approx(float(sigmoid(x["lc_margin"] / 1.5)))
        assert x["lc_label"] == ("response_a" if x["lc_margin"] > 0 else "response_b")
        changed += (m > 0) != (x["lc_margin"] > 0)
    assert meta["labels_changed"] == changed
    # user errors: one line, exit 2
    r = subprocess.run([*CDR, "lc", str(ann), "-o", str(ann)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("cdr: error:") and "Traceback" not in r.stderr


def test_best_of_n_example_script(tmp_path: Path, tiny_registry: Path) -> None:
    """examples/best_of_n.sh: responses -> annotate -> pairs -> a file datasets loads."""
    pytest.importorskip("datasets")
    import os

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "CDR_MODELS": str(tiny_registry), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home")}  # datasets' cache: not the user's  # fmt: skip
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    r = subprocess.run(["bash", str(root / "examples" / "best_of_n.sh"), str(tmp_path / "o")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dpo-cdr 4 rows" in r.stdout and "dpo-real" in r.stdout
    assert "chosen" in r.stdout and "margin" in r.stdout
