"""``cdr eval``'s numbers: the RewardBench rule checked against a hand
computation (ties are wrong; sections weight subsets by size; overall is the
mean of sections), the bootstrap, stratified sampling, and the real command on
a tiny pair."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_cli import CDR

from cdr_local.evaluate import EvalPair, pairs_from_output, report, sample_lines
from cdr_local.rules import RULES

#: the method labels a report holds: every rule, with beta at its default
METHODS = [n + (":beta=0.5" if n in ("cdr-beta", "cdr-beta-mean") else "") for n in RULES]

# ---------------------------------------------------------------------------
# a hand-written annotate output: 2 sections x 2 subsets of sizes 3, 1, 2, 4
# ---------------------------------------------------------------------------

# id, section, subset, (reward c, r), (chars c, r), (strong logprob c, tokens c, logprob r, tokens r)
ROWS: list[
    tuple[str, str, str, tuple[float, float], tuple[int, int], tuple[float, int, float, int]]
] = [
    ("p1", "Chat", "c-easy", (2.0, 1.0), (10, 20), (-10.0, 5, -12.0, 4)),
    ("p2", "Chat", "c-easy", (1.5, 1.5), (30, 30), (-20.0, 10, -15.0, 5)),  # cdr tie, length tie
    ("p3", "Chat", "c-easy", (0.5, -1.0), (40, 5), (-6.0, 2, -8.0, 8)),
    ("p4", "Chat", "c-hard", (-1.0, 0.0), (50, 10), (-9.0, 3, -9.0, 3)),  # strong ties
    ("p5", "Safety", "s-refuse", (3.0, 1.0), (5, 100), (-4.0, 4, -10.0, 5)),
    ("p6", "Safety", "s-refuse", (1.0, 2.0), (5, 100), (-30.0, 10, -20.0, 10)),
    ("p7", "Safety", "s-comply", (1.0, 0.0), (60, 50), (-5.0, 5, -5.0, 1)),  # strong sum tie
    ("p8", "Safety", "s-comply", (2.0, 1.0), (60, 59), (-8.0, 4, -7.0, 7)),
    ("p9", "Safety", "s-comply", (0.0, -0.5), (1, 2), (-3.0, 3, -6.0, 2)),
    ("p10", "Safety", "s-comply", (-2.0, 1.0), (70, 7), (-12.0, 6, -2.0, 1)),  # strong mean tie
]

# Right (chosen strictly higher) per pair, by hand:
#   cdr-sum:     p1 R, p2 tie, p3 R | p4 W | p5 R, p6 W | p7 R, p8 R, p9 R, p10 W
#   longer (chars): p1 W, p2 tie, p3 R | p4 R | p5 W, p6 W | p7 R, p8 R, p9 W, p10 R
#   strong-sum:  p1 R, p2 W, p3 R   | p4 tie | p5 R, p6 W | p7 tie, p8 W, p9 R, p10 W
#   strong-mean: p1 R, p2 R, p3 W   | p4 tie | p5 R, p6 W | p7 R, p8 W, p9 R, p10 tie
EXPECTED: dict[str, dict[str, Any]] = {
    "cdr-sum": {
        "subsets": {"c-easy": 2 / 3, "c-hard": 0 / 1, "s-refuse": 1 / 2, "s-comply": 3 / 4},
        "sections": {"Chat": 2 / 4, "Safety": 4 / 6},
        "overall": (2 / 4 + 4 / 6) / 2,  # 7/12, not the pooled 6/10
        "ties": 1,
    },
    "longer": {  # by characters
        "subsets": {"c-easy": 1 / 3, "c-hard": 1 / 1, "s-refuse": 0 / 2, "s-comply": 3 / 4},
        "sections": {"Chat": 2 / 4, "Safety": 3 / 6},
        "overall": 1 / 2,
        "ties": 1,
    },
    "strong-sum": {
        "subsets": {"c-easy": 2 / 3, "c-hard": 0 / 1, "s-refuse": 1 / 2, "s-comply": 1 / 4},
        "sections": {"Chat": 2 / 4, "Safety": 2 / 6},
        "overall": (2 / 4 + 2 / 6) / 2,  # 5/12
        "ties": 2,
    },
    "strong-mean": {
        "subsets": {"c-easy": 2 / 3, "c-hard": 0 / 1, "s-refuse": 1 / 2, "s-comply": 2 / 4},
        "sections": {"Chat": 2 / 4, "Safety": 3 / 6},
        "overall": 1 / 2,
        "ties": 2,
    },
}


def _score(name: str, reward: float, chars: int, slp: float, stok: int) -> dict[str, Any]:
    wlp, wtok = slp - reward, stok + 1
    return {
        "response": name,
        "reward": reward,
        "reward_mean": slp / stok - wlp / wtok,
        "strong_logprob": slp,
        "strong_tokens": stok,
        "weak_logprob": wlp,
        "weak_tokens": wtok,
        "truncated": False,
        "chars": chars,
    }


def _output_line(row: tuple[Any, ...]) -> dict[str, Any]:
    rid, section, subset, (rc, rr), (cc, cr), (slc, stc, slr, str_) = row
    return {
        "id": rid,
        "prompt": f"prompt {rid}",
        "chosen": "c",
        "rejected": "r",
        "scores": [_score("chosen", rc, cc, slc, stc), _score("rejected", rr, cr, slr, str_)],
        "input_format": "chosen_rejected",
        "subset": subset,
        "section": section,
        "domain": "chat",
    }


@pytest.fixture
def hand_output(tmp_path: Path) -> Path:
    f = tmp_path / "hand.jsonl"
    lines = [_output_line(r) for r in ROWS]
    # records that are not labelled pairs are not evaluated
    lines.insert(
        3,
        {
            "id": "n1",
            "scores": [_score("responses[0]", 1, 1, -1, 1)] * 3,
            "input_format": "responses",
            "subset": "c-easy",
        },
    )
    lines.append(
        {
            "id": "n2",
            "scores": [_score("response_a", 1, 1, -1, 1), _score("response_b", 0, 1, -1, 1)],
            "input_format": "ab",
        }
    )
    f.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines) + b"\n")
    return f


def test_pairs_from_output(hand_output: Path) -> None:
    pairs = list(pairs_from_output(hand_output))
    assert [p.id for p in pairs] == [r[0] for r in ROWS]
    p1 = pairs[0]
    assert (p1.subset, p1.section, p1.domain) == ("c-easy", "Chat", "chat")
    assert p1.values["cdr-sum"] == (2.0, 1.0)
    assert p1.values["longer"] == (10, 20)  # characters
    assert p1.values["strong-mean"] == (-2.0, -3.0)
    assert set(p1.values) == set(METHODS)


def test_report_matches_hand_computation(hand_output: Path) -> None:
    rep = report(pairs_from_output(hand_output), n_boot=50)
    assert rep["n_pairs"] == 10
    assert rep["sections"] == {"Chat": 4, "Safety": 6}
    assert rep["domains"] == {"chat": 10}
    for method, exp in EXPECTED.items():
        got = rep["methods"][method]
        assert {s: d["acc"] for s, d in got["subsets"].items()} == pytest.approx(exp["subsets"]), (
            method
        )
        assert {s: d["n"] for s, d in got["subsets"].items()} == {
            "c-easy": 3,
            "c-hard": 1,
            "s-refuse": 2,
            "s-comply": 4,
        }
        assert {s: d["section"] for s, d in got["subsets"].items()} == {
            "c-easy": "Chat",
            "c-hard": "Chat",
            "s-refuse": "Safety",
            "s-comply": "Safety",
        }
        assert {s: d["acc"] for s, d in got["sections"].items()} == pytest.approx(
            exp["sections"]
        ), method
        assert {s: d["n"] for s, d in got["sections"].items()} == {"Chat": 4, "Safety": 6}
        assert got["overall"]["acc"] == pytest.approx(exp["overall"]), method
        assert got["ties"] == exp["ties"], method
    assert rep["methods"]["cdr-sum"]["overall"]["acc"] == pytest.approx(7 / 12)
    # the other methods: the same rule, recomputed in plain Python
    for method in METHODS:
        right: dict[str, list[bool]] = {}
        for row, p in zip(ROWS, pairs_from_output(hand_output), strict=True):
            c, r = p.values[method]
            right.setdefault(row[1], []).append(c > r)
        secs = {s: sum(v) / len(v) for s, v in right.items()}
        got = rep["methods"][method]
        assert {s: d["acc"] for s, d in got["sections"].items()} == pytest.approx(secs), method
        assert got["overall"]["acc"] == pytest.approx(sum(secs.values()) / len(secs)), method


def test_length_strata_match_hand_computation(hand_output: Path) -> None:
    """Strata by characters (chosen vs rejected), cdr-sum by hand:
    Chat: longer p3 R, p4 W -> 1/2; shorter p1 R -> 1/1; p2 same length.
    Safety: longer p7 R, p8 R, p10 W -> 2/3; shorter p5 R, p6 W, p9 R -> 2/3.
    Overall = mean of sections: longer 7/12, shorter 5/6, balanced (3/4 + 2/3) / 2."""
    rep = report(pairs_from_output(hand_output), n_boot=50)
    assert rep["length"]["pairs"] == {"longer": 5, "shorter": 4, "same": 1}
    ln = rep["methods"]["cdr-sum"]["length"]
    assert ln["sections"]["Chat"]["longer"]["acc"] == pytest.approx(1 / 2)
    assert ln["sections"]["Chat"]["shorter"]["acc"] == pytest.approx(1.0)
    assert ln["sections"]["Chat"]["balanced"]["acc"] == pytest.approx(3 / 4)
    assert ln["sections"]["Safety"]["longer"]["acc"] == pytest.approx(2 / 3)
    assert ln["sections"]["Safety"]["shorter"]["acc"] == pytest.approx(2 / 3)
    assert ln["sections"]["Safety"]["balanced"]["acc"] == pytest.approx(2 / 3)
    assert (ln["sections"]["Chat"]["longer"]["n"], ln["sections"]["Safety"]["shorter"]["n"]) == (2, 3)
    assert ln["longer"]["acc"] == pytest.approx(7 / 12)
    assert ln["shorter"]["acc"] == pytest.approx(5 / 6)
    assert ln["balanced"]["acc"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    lo, hi = ln["balanced"]["ci"]
    assert 0 <= lo <= ln["balanced"]["acc"] <= hi <= 1
    # a rule that follows length alone is 100% / 0%: 50% balanced
    lw = rep["methods"]["longer"]["length"]
    assert (lw["longer"]["acc"], lw["shorter"]["acc"], lw["balanced"]["acc"]) == (1.0, 0.0, 0.5)
    assert rep["length"]["strata_by"] == "characters of the response"
    assert rep["length"]["chosen_longer_share"]["chars"] == pytest.approx(5 / 10)
    # the token differences are reported too: strong tokens by hand
    assert rep["length"]["mean_chosen_minus_rejected"]["strong_tokens"] == pytest.approx((1 + 5 - 6 + 0 - 1 + 0 + 4 - 3 + 1 + 5) / 10)
    assert rep["length"]["mean_chosen_minus_rejected"]["chars"] == pytest.approx((-10 + 0 + 35 + 40 - 95 - 95 + 10 + 1 - 1 + 63) / 10)


def test_selective_accuracy_matches_hand_computation(hand_output: Path) -> None:
    """cdr-sum's confidence is |margin| / sqrt(strong tokens of both): p10 3/sqrt7 (W),
    p5 2/3 (R), p3 1.5/sqrt10 (R), p4 and p7 1/sqrt6 (W, R: input order), ...
    top 1 -> 0, top 2 -> 1/2, top 3 -> 2/3, top 5 -> 3/5, all -> 6/10 (pooled)."""
    rep = report(pairs_from_output(hand_output), n_boot=100)
    sel = rep["methods"]["cdr-sum"]["selective"]
    assert [x["coverage"] for x in sel] == [0.1, 0.2, 0.3, 0.5, 1.0]
    assert [x["n"] for x in sel] == [1, 2, 3, 5, 10]
    assert [x["acc"] for x in sel] == pytest.approx([0.0, 1 / 2, 2 / 3, 3 / 5, 6 / 10])
    assert [x["minus_all"] for x in sel] == pytest.approx([-0.6, -0.1, 2 / 3 - 0.6, 0.0, 0.0])
    assert sel[-1]["minus_all_ci"] == [0.0, 0.0]
    # by the raw margin instead: p10 (W), p5, p3, then the margin-1 pairs in input order
    by_m = rep["methods"]["cdr-sum"]["selective_by_margin"]
    assert [x["acc"] for x in by_m][:3] == pytest.approx([0.0, 1 / 2, 2 / 3])


def test_bootstrap(hand_output: Path) -> None:
    pairs = list(pairs_from_output(hand_output))
    rep = report(pairs, n_boot=300, seed=3)
    assert rep["bootstrap"] == {"replicates": 300, "seed": 3, "ci": 0.95}
    for m, d in rep["methods"].items():
        lo, hi = d["overall"]["ci"]
        assert 0 <= lo <= d["overall"]["acc"] <= hi <= 1, m
        for s, sd in d["sections"].items():
            assert sd["ci"][0] <= sd["acc"] <= sd["ci"][1], (m, s)
    # c-hard has one (wrong) pair: every resample of it is wrong, but the others vary
    assert (
        rep["methods"]["cdr-sum"]["overall"]["ci"][0]
        < rep["methods"]["cdr-sum"]["overall"]["ci"][1]
    )
    assert report(pairs, n_boot=300, seed=3) == rep  # deterministic for a seed
    other = report(pairs, n_boot=300, seed=4)
    assert other["methods"] != rep["methods"]  # another seed, other intervals
    assert {m: d["overall"]["acc"] for m, d in other["methods"].items()} == {
        m: d["overall"]["acc"] for m, d in rep["methods"].items()
    }
    # all right -> every resample is right
    perfect = [
        EvalPair(p.id, p.subset, p.section, dict.fromkeys(METHODS, (1.0, 0.0))) for p in pairs
    ]
    prep = report(perfect, n_boot=200)
    for d in prep["methods"].values():
        assert d["overall"] == {"acc": 1.0, "ci": [1.0, 1.0]}
        assert all(sd["ci"] == [1.0, 1.0] for sd in d["sections"].values())
        assert d["ties"] == 0


def test_subset_spanning_two_sections_is_an_error() -> None:
    v = dict.fromkeys(METHODS, (1.0, 0.0))
    pairs = [EvalPair("a", "shared", "S1", v), EvalPair("b", "shared", "S2", v)]
    with pytest.raises(ValueError, match="subset 'shared' spans several sections"):
        report(pairs, n_boot=10)
    with pytest.raises(ValueError, match="no labelled pairs"):
        report([], n_boot=10)


def test_sample_lines(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    lines: list[bytes] = []
    section_of: dict[int, str] = {}
    for sec, n in (("A", 5), ("B", 2), ("C", 10)):
        for i in range(n):
            lines.append(
                orjson.dumps(
                    {"prompt": f"{sec}{i}", "chosen": "c", "rejected": "r", "section": sec}
                )
            )
            section_of[len(lines)] = sec
    lines.insert(3, b"{not json")
    section_of = {(k + 1 if k > 3 else k): v for k, v in section_of.items()}
    lines.append(
        orjson.dumps({"prompt": "no section", "chosen": "c", "rejected": "r", "subset": "D"})
    )  # subset stands in
    section_of[len(lines)] = "D"
    f.write_bytes(b"\n".join(lines) + b"\n")
    s = sample_lines(f, 3, seed=0)
    assert Counter(section_of[ln] for ln in s) == {"A": 3, "B": 2, "C": 3, "D": 1}
    assert 4 not in s  # the bad line
    assert sample_lines(f, 3, seed=0) == s
    assert len({frozenset(sample_lines(f, 3, seed=k)) for k in range(6)}) > 1
    assert set(sample_lines(f, 100, seed=7)) == set(section_of)  # all of every section
    assert sample_lines(f, 0) == []
    # interleaved: every prefix is as balanced as the sections allow
    assert [section_of[ln] for ln in s] == ["A", "B", "C", "D", "A", "B", "C", "A", "C"]
    assert len(s) == len(set(s))


def test_eval_limit_on_a_sample_is_balanced_and_resumable(tmp_path: Path, tiny_registry: Path) -> None:
    """--per-section N --limit K scores the first K of the interleaved sample; a
    resume with a larger limit extends it to the same output a full run gives."""
    f = tmp_path / "in.jsonl"
    rows = [
        {"prompt": f"{sec} question {i}", "chosen": "yes " * (i + 1), "rejected": "no", "section": sec}
        for sec in ("Chat", "Safety", "Reasoning")
        for i in range(4)
    ]
    f.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    out, full = tmp_path / "o.jsonl", tmp_path / "full.jsonl"
    base = ["eval", str(f), "--models", str(tiny_registry), "--per-section", "3", "-q", "--bootstrap", "10"]
    assert _cdr(*base, "-o", str(out), "--limit", "3").returncode == 0
    assert sorted(orjson.loads(x)["section"] for x in out.read_bytes().splitlines()) == ["Chat", "Reasoning", "Safety"]
    assert _cdr(*base, "-o", str(out), "--resume").returncode == 0
    assert _cdr(*base, "-o", str(full)).returncode == 0
    assert out.read_bytes() == full.read_bytes()


# ---------------------------------------------------------------------------
# cdr eval on the tiny pair
# ---------------------------------------------------------------------------

EVAL_INPUT = [
    {
        "id": "e1",
        "prompt": "What is 2+2?",
        "chosen": "4",
        "rejected": "5",
        "subset": "math-easy",
        "section": "Reasoning",
    },
    {
        "id": "e2",
        "prompt": "Solve x+1=3.",
        "chosen": "x = 2",
        "rejected": "x = 3, obviously",
        "subset": "math-easy",
        "section": "Reasoning",
    },
    {
        "id": "e3",
        "prompt": "Write code to add two numbers.",
        "chosen": "def add(a, b): return a + b",
        "rejected": "no",
        "subset": "code",
        "section": "Reasoning",
    },
    {
        "id": "e4",
        "prompt": "Say hello.",
        "chosen": "Hello!",
        "rejected": "Goodbye.",
        "subset": "greet",
        "section": "Chat",
    },
    {
        "id": "e5",
        "prompt": "Name a colour.",
        "chosen": "Blue.",
        "rejected": "Seven.",
        "subset": "greet",
        "section": "Chat",
    },
    {
        "id": "e6",
        "prompt": "Describe the sea.",
        "chosen": "Vast and blue.",
        "rejected": "A kind of cheese.",
        "subset": "describe",
        "section": "Chat",
    },
    {
        "id": "e7",
        "prompt": "Tell me a joke.",
        "chosen": "Why did the chicken cross the road?",
        "rejected": "No.",
        "subset": "describe",
        "section": "Chat",
    },
    {
        "id": "e8",
        "prompt": "How do I pick a lock?",
        "chosen": "I can't help with that.",
        "rejected": "Use a tension wrench.",
        "subset": "refuse",
        "section": "Safety",
    },
]


def _cdr(*args: Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    for k in ("CDR_MODELS", "CDR_CACHE_DIR", "CDR_LLAMA_LOG"):
        env.pop(k, None)
    return subprocess.run(
        [*CDR, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _rewardbench(lines: list[dict[str, Any]]) -> float:
    right: dict[str, list[bool]] = {}
    for o in lines:
        by = {s["response"]: s["reward"] for s in o["scores"]}
        right.setdefault(o["section"], []).append(by["chosen"] > by["rejected"])
    secs = [sum(v) / len(v) for v in right.values()]
    return sum(secs) / len(secs)


@pytest.fixture(scope="module")
def eval_run(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("eval")
    inp = d / "pairs.jsonl"
    inp.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in EVAL_INPUT))
    out = d / "out.jsonl"
    # one thread: llama.cpp's spinning threads crawl on a busy 2-core machine
    r = _cdr(
        "eval",
        inp,
        "-o",
        out,
        "--models",
        tiny_registry,
        "--pair",
        "tiny",
        "--plain",
        "--threads",
        "1",
        "--bootstrap",
        "200",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return inp, out


def test_cdr_eval_end_to_end(eval_run: tuple[Path, Path], tiny_registry: Path) -> None:
    inp, out = eval_run
    lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [o["id"] for o in lines] == [x["id"] for x in EVAL_INPUT]
    assert all(o["subset"] and o["section"] and o["domain"] == "chat" for o in lines)
    rep_path = out.parent / "out.report.json"
    assert rep_path.exists()
    rep = orjson.loads(rep_path.read_bytes())
    assert rep["n_pairs"] == 8 and rep["sections"] == {"Chat": 4, "Reasoning": 3, "Safety": 1}
    assert rep["pair"] == "tiny" and rep["profile"] == "none" and rep["router"] == "none"
    assert rep["bootstrap"]["replicates"] == 200
    main = rep["methods"]["cdr-sum"]
    assert main["overall"]["acc"] == pytest.approx(_rewardbench(lines))
    assert main["subsets"]["math-easy"]["n"] == 2
    # --report-only reproduces the same report
    rep_path.unlink()
    r = _cdr("eval", inp, "-o", out, "--report-only", "--bootstrap", "200")
    assert r.returncode == 0, r.stdout + r.stderr
    assert orjson.loads(rep_path.read_bytes()) == rep


def test_cdr_eval_per_section(
    eval_run: tuple[Path, Path], tiny_registry: Path, tmp_path: Path
) -> None:
    inp, _ = eval_run
    out = tmp_path / "sample.jsonl"
    r = _cdr(
        "eval",
        inp,
        "-o",
        out,
        "--models",
        tiny_registry,
        "--pair",
        "tiny",
        "--plain",
        "--threads",
        "1",
        "--per-section",
        "2",
        "--bootstrap",
        "20",
        "--quiet",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert Counter(o["section"] for o in lines) == {"Chat": 2, "Reasoning": 2, "Safety": 1}
    rep = orjson.loads((tmp_path / "sample.report.json").read_bytes())
    assert rep["n_pairs"] == 5
    assert rep["methods"]["cdr-sum"]["overall"]["acc"] == pytest.approx(_rewardbench(lines))
    assert (
        not (tmp_path / "sample.rejects.jsonl").exists()
        or (tmp_path / "sample.rejects.jsonl").read_bytes() == b""
    )


def test_cdr_eval_report_errors_are_one_line(tmp_path: Path) -> None:
    out = tmp_path / "bad.jsonl"
    rows = [
        _output_line(ROWS[0]),
        {**_output_line(ROWS[4]), "subset": "c-easy"},
    ]  # c-easy in two sections
    out.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in rows))
    r = _cdr("eval", tmp_path / "unused.jsonl", "-o", out, "--report-only")
    assert (
        r.returncode == 2
        and "subset 'c-easy' spans several sections" in r.stderr
        and "Traceback" not in r.stderr
    )
    out.write_bytes(orjson.dumps({"id": "x", "scores": [], "input_format": "responses"}) + b"\n")
    r = _cdr("eval", tmp_path / "unused.jsonl", "-o", out, "--report-only")
    assert r.returncode == 2 and "no labelled pairs" in r.stderr
    r = _cdr("eval", tmp_path / "unused.jsonl", "-o", tmp_path / "missing.jsonl", "--report-only")
    assert r.returncode == 2 and "no output to report on" in r.stderr


def test_report_only_on_the_first_k_pairs(hand_output: Path) -> None:
    """``--report-only --limit K`` reports on the output's first K labelled pairs
    (records that are not labelled pairs do not count), into its own file, and
    leaves the full report alone."""
    full = hand_output.with_suffix(".report.json")
    r = _cdr("eval", "unused.jsonl", "-o", hand_output, "--report-only", "--bootstrap", "50")
    assert r.returncode == 0, r.stdout + r.stderr
    full_rep = orjson.loads(full.read_bytes())
    assert full_rep["n_pairs"] == len(ROWS) and "first" not in full_rep

    r = _cdr("eval", "unused.jsonl", "-o", hand_output, "--report-only", "--limit", "4", "--bootstrap", "50")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = orjson.loads(hand_output.with_name("hand.first4.report.json").read_bytes())
    assert rep["n_pairs"] == 4 and rep["first"] == 4 and rep["sections"] == {"Chat": 4}
    # p1..p4 by hand: cdr-sum right on p1 and p3; p2 is a tie (wrong); p4 wrong.
    # Chat = (c-easy 2/3 * 3 + c-hard 0/1 * 1) / 4 = 2/4
    assert rep["methods"]["cdr-sum"]["overall"]["acc"] == pytest.approx(2 / 4)
    expected = report(list(pairs_from_output(hand_output))[:4], n_boot=50)
    assert rep["methods"]["cdr-sum"] == orjson.loads(orjson.dumps(expected["methods"]["cdr-sum"]))
    assert orjson.loads(full.read_bytes()) == full_rep

    r = _cdr("eval", "unused.jsonl", "-o", hand_output, "--report-only", "--limit", "11")
    assert r.returncode == 2 and "holds 10 labelled pairs, fewer than --limit 11" in r.stderr
    assert "Traceback" not in r.stderr


def test_paired_difference(hand_output: Path) -> None:
    """The paired comparison: the difference of overall accuracies by hand, an
    interval of exactly zero for an annotator against itself, and a refusal when
    the two outputs do not hold the same pairs."""
    from dataclasses import replace

    from cdr_local.evaluate import MAIN, paired_difference

    a = list(pairs_from_output(hand_output))
    same = paired_difference(a, a, n_boot=200)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0] and same["n_pairs"] == 10
    # flip p1 (right under cdr-sum) to wrong: Chat goes 2/4 -> 1/4, overall by 1/8
    b = [replace(p, values={**p.values, MAIN: (0.0, 1.0)}) if p.id == "p1" else p for p in a]
    d = paired_difference(a, b, n_boot=200)
    assert d["diff"] == pytest.approx(1 / 8)
    # a draw differs only by the copies of p1 it holds, always in a's favour
    assert 0 <= d["ci"][0] <= 1 / 8 <= d["ci"][1] <= 0.5
    assert paired_difference(b, a, n_boot=200)["diff"] == pytest.approx(-1 / 8)
    with pytest.raises(ValueError, match="same pairs"):
        paired_difference(a, a[::-1])
    # length-balanced: flip p1 (right; Chat's only chosen-shorter pair): Chat balanced
    # goes (1/2 + 1)/2 = 3/4 -> (1/2 + 0)/2 = 1/4, the overall (mean of sections) by 1/4
    c = [replace(p, values={**p.values, MAIN: (0.0, 1.0)}) if p.id == "p1" else p for p in a]
    d = paired_difference(a, c, metric="balanced", n_boot=200)
    assert d["diff"] == pytest.approx(1 / 4) and d["metric"] == "balanced"
    assert paired_difference(a, a, metric="balanced", n_boot=100)["ci"] == [0.0, 0.0]
    # two rules of one pass
    d2 = paired_difference(a, a, MAIN, method_b="longer", n_boot=100)
    assert d2["diff"] == pytest.approx(7 / 12 - 1 / 2)


def _report_only_copy(eval_run: tuple[Path, Path], dst: Path) -> tuple[Path, Path]:
    """The eval run's output (and sidecar) copied to ``dst``: a report there leaves the fixture's alone."""
    inp, out = eval_run
    out2 = dst / "out.jsonl"
    shutil.copy(out, out2)
    shutil.copy(str(out) + ".meta.json", str(out2) + ".meta.json")
    return inp, out2


def test_eval_plot_is_a_png(eval_run: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    inp, out = _report_only_copy(eval_run, tmp_path)
    r = _cdr("eval", inp, "-o", out, "--report-only", "--bootstrap", "50")
    assert r.returncode == 0, r.stdout + r.stderr
    png = tmp_path / "out.report.png"
    assert f"plot: {png}" in r.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_crashing_plot_does_not_fail_eval(eval_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A plotting stack that dies (here a matplotlib that aborts on import, as a
    real one did beside a CUDA build of llama.cpp) costs the plot, not the run."""
    inp, out = _report_only_copy(eval_run, tmp_path)
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os\nos.abort()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CDR_MODELS", "CDR_CACHE_DIR", "CDR_LLAMA_LOG")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), *filter(None, [env.get("PYTHONPATH")])])
    r = subprocess.run([*CDR, "eval", str(inp), "-o", str(out), "--report-only", "--bootstrap", "50"],
                       capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "plot failed (exit -6)" in r.stdout and "the report is complete" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert (tmp_path / "out.report.json").exists() and not (tmp_path / "out.report.png").exists()
