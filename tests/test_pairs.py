"""``cdr pairs``: N scored responses -> TRL preference pairs.

* ``choose()`` (cdr_local/pairs.py) on hand-made records: explicit rewards and
  hand-made 2-D embeddings, so every cosine is obvious;
* ``Embedder`` (cdr_local/embed.py) against a brute-force mean of the model's
  hidden states (tests/reference.py), on the tiny GGUF models;
* the real ``cdr`` script end to end: annotate -> pairs, reproducibility,
  REAL strategies, --min-margin, scoring on the fly, resume, stdin/stdout
  streaming, --keep-dissimilar, conversational input, datasets loading.
"""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from reference import brute_embedding
from test_cli import CDR, _env

from cdr_local.embed import Embedder
from cdr_local.engine import EngineSettings
from cdr_local.engine.llama import LlamaModel
from cdr_local.pairs import (
    STRATEGIES,
    Choice,
    SkipRecord,
    choose,
    keep_threshold,
    kmeans2,
    record_rng,
    selection_key,
)

# ---------------------------------------------------------------------------
# choose(): hand-made records
# ---------------------------------------------------------------------------


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def _cos(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


TEXTS4 = ("alpha", "bravo", "charlie", "delta")


def test_best_worst_is_argmax_argmin() -> None:
    rewards = [0.5, 3.0, -2.0, 1.0]
    c = choose("best-worst", "r", TEXTS4, rewards)
    assert (c.chosen, c.rejected) == (1, 2)
    assert c.margin == 5.0
    assert c.similarity is None  # no embeddings given


def test_best_random_is_reproducible_and_covers_the_others() -> None:
    rewards = [0.5, 3.0, -2.0, 1.0]
    seen: dict[int, int] = {}
    per_id = {}
    for k in range(200):
        rid = f"rec-{k}"
        c = choose("best-random", rid, TEXTS4, rewards)
        assert c.chosen == 1 and c.rejected != 1
        assert c.margin == rewards[1] - rewards[c.rejected]
        # the same draw every time for this id and seed
        for _ in range(3):
            assert choose("best-random", rid, TEXTS4, rewards) == c
        seen[c.rejected] = seen.get(c.rejected, 0) + 1
        per_id[rid] = c.rejected
    # varies across ids: every non-best response is drawn (not only the lowest)
    assert set(seen) == {0, 2, 3}
    assert min(seen.values()) > 30, seen
    # the seed is part of the draw
    other = {rid: choose("best-random", rid, TEXTS4, rewards, seed=7).rejected for rid in per_id}
    assert other != per_id
    assert other == {
        rid: choose("best-random", rid, TEXTS4, rewards, seed=7).rejected for rid in per_id
    }


def test_best_random_never_picks_a_copy_of_the_best() -> None:
    texts = ("same", "other", "same", "third")
    rewards = [4.0, 1.0, 2.0, 0.0]  # index 2 is the best one's text again
    drawn = {choose("best-random", f"id{k}", texts, rewards).rejected for k in range(100)}
    assert drawn == {1, 3}


def test_best_worst_skips_identical_text() -> None:
    texts = ("ok", "ok", "fine")
    c = choose("best-worst", "r", texts, [3.0, 1.0, 2.0])  # the lowest is a copy of the best
    assert (c.chosen, c.rejected, c.margin) == (0, 2, 1.0)
    with pytest.raises(SkipRecord, match="identical"):
        choose("best-worst", "r", ("ok", "ok"), [3.0, 1.0])
    with pytest.raises(SkipRecord, match="identical"):
        choose("best-random", "r", ("ok", "ok", "ok"), [3.0, 1.0, 2.0])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_rewards_tie_is_skipped(strategy: str) -> None:
    emb = np.array([_unit(0), _unit(90), _unit(180)])
    with pytest.raises(SkipRecord, match="all rewards tie"):
        choose(strategy, "r", ("a", "b", "c"), [1.5, 1.5, 1.5], emb)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fewer_than_two_responses(strategy: str) -> None:
    with pytest.raises(SkipRecord, match="fewer than two"):
        choose(strategy, "r", ("only",), [1.0], np.array([_unit(0)]))
    with pytest.raises(SkipRecord, match="fewer than two"):
        choose(strategy, "r", (), [], np.zeros((0, 2)))


def test_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        choose("best-of-both", "r", TEXTS4, [1.0, 2.0, 3.0, 4.0])


def test_real_strategies_need_embeddings() -> None:
    with pytest.raises(ValueError, match="needs embeddings"):
        choose("real-easy", "r", TEXTS4, [1.0, 2.0, 3.0, 4.0])


# 2-D embeddings at known angles: 0 and 5 degrees (nearly the same), 90, 175.
# Lowest cosine: (0, 3) at 175 degrees; highest: (0, 1) at 5 degrees.
EMB4 = np.array([_unit(0), _unit(5), _unit(90), _unit(175)])
REWARDS4 = [1.0, 3.0, 2.0, 0.5]


def test_real_easy_is_the_least_similar_pair() -> None:
    c = choose("real-easy", "r", TEXTS4, REWARDS4, EMB4)
    assert (c.chosen, c.rejected) == (0, 3)  # 1.0 > 0.5: the higher reward is chosen
    assert c.margin == pytest.approx(0.5)
    assert c.similarity == pytest.approx(math.cos(math.radians(175)), abs=1e-12)
    # the reward order decides which is chosen, not the index
    c = choose("real-easy", "r", TEXTS4, [0.0, 3.0, 2.0, 0.5], EMB4)
    assert (c.chosen, c.rejected, c.margin) == (3, 0, 0.5)


def test_real_hard_is_the_most_similar_pair() -> None:
    c = choose("real-hard", "r", TEXTS4, REWARDS4, EMB4)
    assert (c.chosen, c.rejected) == (1, 0)
    assert c.margin == pytest.approx(2.0)
    assert c.similarity == pytest.approx(math.cos(math.radians(5)), abs=1e-12)


def test_real_hard_ignores_identical_texts() -> None:
    # responses 0 and 2 are the same text (cosine 1): never a pair
    texts = ("same", "near", "same", "far")
    emb = np.array([_unit(0), _unit(20), _unit(0), _unit(120)])
    c = choose("real-hard", "r", texts, [2.0, 1.0, 0.0, 3.0], emb)
    assert {c.chosen, c.rejected} in ({0, 1}, {1, 2})
    assert texts[c.chosen] != texts[c.rejected]
    assert c.similarity == pytest.approx(math.cos(math.radians(20)), abs=1e-12)
    with pytest.raises(SkipRecord, match="identical"):
        choose("real-hard", "r", ("x", "x", "x"), [1.0, 2.0, 3.0], np.array([_unit(0)] * 3))


def test_real_centroid_picks_the_response_nearest_each_centre() -> None:
    # two clear clusters, interleaved
    emb = np.array(
        [
            [9.0, 0.0],
            [0.0, 9.0],
            [10.0, 0.0],
            [0.0, 11.0],
            [11.0, 0.0],
            [0.0, 10.0],
            [10.0, 0.4],
            [0.3, 10.0],
        ]
    )
    # on unit vectors: centre A = mean of (1, 0) x3 and 6's (0.99920, 0.03997) =
    # (0.99980, 0.00999): d^2 = 1.0e-4 for the three (1, 0) (the first: 0), 9.0e-4
    # for 6; likewise B -> 1
    texts = tuple(f"t{i}" for i in range(len(emb)))
    rewards = [0.0, 1.0, -1.0, 2.0, 3.0, 0.5, 4.0, -2.0]
    labels, centres = kmeans2(emb)
    assert (
        len(set(labels[[0, 2, 4, 6]].tolist())) == 1
        and len(set(labels[[1, 3, 5, 7]].tolist())) == 1
    )
    assert labels[0] != labels[1]
    c = choose("real-centroid", "r", texts, rewards, emb)
    assert (c.chosen, c.rejected) == (1, 0)  # 1.0 > 0.0
    assert c.margin == pytest.approx(1.0)
    assert c.similarity == pytest.approx(_cos(emb[1], emb[0]), abs=1e-12)


def test_real_centroid_clusters_directions_not_lengths() -> None:
    """REAL normalizes embeddings before k-means.  On raw vectors, three long
    responses along A pull one centre away and the short ones of A and B share the
    other (a split by length); on unit vectors the split is by direction."""
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [10.0, 0.0], [0.0, 1.1], [11.0, 0.5], [1.1, 0.1], [12.0, 0.0], [0.1, 1.0]])
    raw, _ = kmeans2(emb)
    assert sorted(np.nonzero(raw == raw[2])[0].tolist()) == [2, 4, 6]  # raw: the long ones alone
    texts = tuple(f"t{i}" for i in range(len(emb)))
    rewards = [0.0, 5.0, 1.0, 2.0, 3.0, 0.5, 4.0, -2.0]
    c = choose("real-centroid", "r", texts, rewards, emb)
    # unit A = 0, 2, 4, 5, 6: centre (0.99897, 0.02719), nearest 4 (0.99897, 0.04540),
    # d^2 = 3.3e-4 vs 7.4e-4 for (1, 0); unit B = 1, 3, 7: centre (0.03317, 0.99835),
    # nearest 1 (first of the two (0, 1)), d^2 = 1.10e-3 vs 4.4e-3 for 7
    assert (c.chosen, c.rejected) == (1, 4)  # 5.0 > 3.0
    assert c.margin == pytest.approx(2.0)
    assert c.similarity == pytest.approx(_cos(emb[1], emb[4]), abs=1e-12)


def test_random_strategy_draws_a_seeded_distinct_pair() -> None:
    texts = ("a", "b", "a", "c", "d")
    rewards = [1.0, 2.0, 3.0, 0.0, -1.0]
    emb = np.array([_unit(d) for d in (0, 30, 0, 60, 90)])
    got = {choose("random", f"r{k}", texts, rewards, emb) for k in range(60)}
    pairs = {(c.chosen, c.rejected) for c in got}
    distinct = [(i, j) for i in range(5) for j in range(i + 1, 5) if texts[i] != texts[j]]
    assert {frozenset(p) for p in pairs} == {frozenset(p) for p in distinct}  # every distinct pair, never (0, 2)
    for c in got:
        assert rewards[c.chosen] > rewards[c.rejected] and c.margin == rewards[c.chosen] - rewards[c.rejected]
        assert c.similarity == pytest.approx(_cos(emb[c.chosen], emb[c.rejected]), abs=1e-12)
    # the draw is the record's generator: the same id and seed give the same pair, no embeddings needed
    want = record_rng("r7", 3).choice(distinct)
    c = choose("random", "r7", texts, rewards, None, seed=3)
    assert {c.chosen, c.rejected} == set(want) and c.similarity is None


def test_selection_keys_by_hand() -> None:
    assert selection_key("dissimilar", "x", 0.25) == 0.25
    assert selection_key("similar", "x", 0.25) == -0.25
    assert selection_key("random", "x", 0.25, seed=2) == record_rng("x", 2).random()
    with pytest.raises(ValueError):
        selection_key("closest", "x", 0.0)
    assert keep_threshold([0.5, 0.1, 0.9, 0.3], 50) == 0.3  # 2 of 4 at or below
    assert keep_threshold([0.5, 0.1, 0.9, 0.3], 100) == 0.9


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_responses(strategy: str) -> None:
    emb = np.array([_unit(10), _unit(70)])
    c = choose(strategy, "r", ("first", "second"), [-1.0, 2.5], emb)
    assert (c.chosen, c.rejected, c.margin) == (1, 0, 3.5)
    assert c.similarity == pytest.approx(math.cos(math.radians(60)), abs=1e-12)
    with pytest.raises(SkipRecord):
        choose(strategy, "r", ("same", "same"), [-1.0, 2.5], np.array([_unit(0), _unit(0)]))


def test_choice_is_a_value() -> None:
    assert choose("best-worst", "r", ("a", "b"), [1.0, 0.0]) == Choice(0, 1, 1.0, None)


# ---------------------------------------------------------------------------
# Embeddings vs a brute-force mean of the hidden states
# ---------------------------------------------------------------------------

# n_batch = n_ubatch = 16: the longer texts are decoded in several chunks.
EMB_SETTINGS = EngineSettings(n_ctx=256, n_batch=16, n_ubatch=16, n_threads=1)
EMB_TEXTS = (
    "Hi!",  # a few tokens: shorter than the engine's 8-row minimum chunk
    "Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog; " * 4 + "then it sleeps.",  # several chunks
)
# The engine and the reference both read float32 hidden states from llama.cpp
# (flash attention off); chunking with every decode >= 8 rows does not change
# them, so the float64 means agree to float32 rounding at most: 1e-4 absolute
# is far above that and far below any real difference (|values| ~ 1).
EMB_TOL = 1e-4


@pytest.mark.parametrize("which", ["bos", "nobos"])
def test_embedding_matches_brute_force(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path: Path = request.getfixturevalue(f"tiny_{which}_model")
    with LlamaModel(path, EMB_SETTINGS, embeddings=True) as m:
        assert m.add_bos == (which == "bos")
        emb = Embedder(m, "sha-" + which)
        try:
            assert emb.cache_path.is_relative_to(Path(os.environ["CDR_HOME"]))
            for text in EMB_TEXTS:
                body = m.tokenize(text, add_special=False, parse_special=False)
                lead = [m.bos_id] if m.add_bos else []
                ref = brute_embedding(str(path), lead + body, skip_first=bool(lead), n_threads=1)
                got = emb.compute(text)
                assert got.shape == (m.n_embd,) and got.dtype == np.float64
                assert np.abs(got - ref).max() < EMB_TOL, (text, np.abs(got - ref).max())
                assert np.abs(ref).max() > 10 * EMB_TOL  # not trivially zero
            assert len(m.tokenize(EMB_TEXTS[0], add_special=False, parse_special=False)) < 8
            assert (
                len(m.tokenize(EMB_TEXTS[2], add_special=False, parse_special=False))
                > 2 * EMB_SETTINGS.n_batch
            )
        finally:
            emb.close()


def test_embedding_cache(tiny_bos_model: Path) -> None:
    with LlamaModel(tiny_bos_model, EMB_SETTINGS, embeddings=True) as m:
        emb = Embedder(m, "0123456789abcdef")
        first = emb.embed(list(EMB_TEXTS))
        assert (emb.hits, emb.misses) == (0, len(EMB_TEXTS))
        assert first.shape == (len(EMB_TEXTS), m.n_embd)
        for i, t in enumerate(EMB_TEXTS):
            assert np.array_equal(first[i], emb.compute(t))
        again = emb.embed(list(EMB_TEXTS))
        assert (emb.hits, emb.misses) == (len(EMB_TEXTS), len(EMB_TEXTS))
        assert np.array_equal(again, first)
        path = emb.cache_path
        emb.close()
        assert path.exists()
        emb2 = Embedder(m, "0123456789abcdef")  # a new embedder on the same cache file
        try:
            assert emb2.cache_path == path
            assert np.array_equal(emb2.embed([EMB_TEXTS[1]]), first[1:2])
            assert (emb2.hits, emb2.misses) == (1, 0)
        finally:
            emb2.close()


def test_embedder_needs_an_embeddings_context(tiny_bos_model: Path) -> None:
    with LlamaModel(tiny_bos_model, EMB_SETTINGS) as m:
        with pytest.raises(ValueError, match="embeddings=True"):
            Embedder(m, "sha")


# ---------------------------------------------------------------------------
# The cdr script end to end
# ---------------------------------------------------------------------------


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "How do I reverse a list in Python?",
    "Name three primary colours.",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
    "What is 12 times 12?",
    "Summarise the plot of Hamlet in one line.",
]
STEMS = [
    "Sure! Here is a careful answer: {}",
    "{}",
    "I am not sure, but maybe {} or something else entirely.",
    "No.",
]
ANSWERS = [
    "Paris",
    "Soft rain on the roof",
    "use reversed() or [::-1]",
    "red, yellow, blue",
    "Rayleigh scattering",
    "joyful",
    "144",
    "A prince avenges his father and everyone dies",
]


def _records() -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = []
    for k, (p, a) in enumerate(zip(PROMPTS, ANSWERS, strict=True)):
        resp = [s.format(a) for s in STEMS]
        resp = resp[k % 4 :] + resp[: k % 4]  # the best one is not always at the same index
        recs.append({"id": f"q{k}", "prompt": p, "responses": resp})
    recs.insert(4, {"id": "copies", "prompt": "Say hello.", "responses": ["Hello there!"] * 4})
    return recs


@dataclass
class Run:
    dir: Path
    home: Path
    registry: Path
    raw: Path  # prompts with responses
    ann: Path  # cdr annotate's output
    pairs: Path  # cdr pairs ANN --strategy best-random

    def cdr(
        self, *args: Any, stdin: bytes | None = None, ok: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        p = subprocess.run(
            [*CDR, *map(str, args)],
            capture_output=True,
            timeout=180,
            env=_env(self.home),
            input=stdin if stdin is not None else b"",
        )
        err = p.stderr.decode("utf-8", "replace")
        assert "Traceback" not in err, err
        if ok:
            assert p.returncode == 0, err
        return p

    def pairs_cmd(
        self, inp: Path | str, out: Path | str, *args: Any, **kw: Any
    ) -> subprocess.CompletedProcess[bytes]:
        return self.cdr("pairs", inp, "-o", out, "--models", self.registry, "--quiet", *args, **kw)


def rows(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [orjson.loads(x) for x in data.splitlines() if x.strip()]


@pytest.fixture(scope="module")
def run(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    d = tmp_path_factory.mktemp("pairs")
    raw = d / "raw.jsonl"
    raw.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in _records()))
    r = Run(d, d / "home", tiny_registry, raw, d / "ann.jsonl", d / "pairs.jsonl")
    r.cdr("annotate", raw, "-o", r.ann, "--models", tiny_registry, "--quiet")
    r.pairs_cmd(r.ann, r.pairs, "--strategy", "best-random")
    return r


def _by_id(path: Path) -> dict[str, dict[str, Any]]:
    return {x["id"]: x for x in rows(path)}


def test_annotate_then_best_random(run: Run) -> None:
    ann = _by_id(run.ann)
    out = rows(run.pairs)
    assert [x["id"] for x in out] == [r["id"] for r in _records() if r["id"] != "copies"]
    for x in out:
        a = ann[x["id"]]
        rewards = [s["reward"] for s in a["scores"]]
        texts = a["responses"]
        c, j = x["chosen_index"], x["rejected_index"]
        assert x["rewards"] == rewards
        assert c == int(np.argmax(rewards)) and x["chosen"] == texts[c]
        assert j != c and x["rejected"] == texts[j] and x["rejected"] != x["chosen"]
        assert x["margin_value"] == rewards[c] - rewards[j] and x["margin_value"] > 0
        assert x["prompt"] == a["prompt"]
        assert x["strategy"] == "best-random" and x["similarity"] is None
    # not always the worst one: best-random, not best-worst
    assert any(x["rejected_index"] != int(np.argmin(x["rewards"])) for x in out)
    rej = rows(run.dir / "pairs.rejects.jsonl")
    assert len(rej) == 1 and rej[0]["id"] == "copies" and "all rewards tie" in rej[0]["reason"]
    meta = orjson.loads((run.dir / "pairs.jsonl.meta.json").read_bytes())
    assert (
        meta["status"] == "complete"
        and meta["command"] == "pairs"
        and meta["strategy"] == "best-random"
    )


def test_rerun_is_byte_identical(run: Run) -> None:
    out = run.dir / "again.jsonl"
    run.pairs_cmd(run.ann, out)
    assert out.read_bytes() == run.pairs.read_bytes()
    run.pairs_cmd(run.ann, out, "--overwrite")
    assert out.read_bytes() == run.pairs.read_bytes()
    # an existing output needs --resume or --overwrite, like annotate
    p = run.pairs_cmd(run.ann, out, ok=False)
    assert p.returncode == 2 and b"--overwrite" in p.stderr


def test_scored_on_the_fly_matches_annotate(run: Run) -> None:
    out = run.dir / "fly.jsonl"
    run.pairs_cmd(run.raw, out)
    ref, got = rows(run.pairs), rows(out)
    assert [x["id"] for x in got] == [x["id"] for x in ref]
    for a, b in zip(ref, got, strict=True):
        assert (a["chosen"], a["rejected"]) == (b["chosen"], b["rejected"])
        assert b["margin"] == pytest.approx(a["margin"], abs=1e-9)
        assert b["rewards"] == pytest.approx(a["rewards"], abs=1e-9)
    assert "all rewards tie" in rows(run.dir / "fly.rejects.jsonl")[0]["reason"]


def test_resume_after_limit(run: Run) -> None:
    out = run.dir / "resumed.jsonl"
    run.pairs_cmd(run.ann, out, "--limit", "3")
    assert len(rows(out)) == 3
    run.pairs_cmd(run.ann, out, "--resume")
    assert out.read_bytes() == run.pairs.read_bytes()
    assert (run.dir / "resumed.rejects.jsonl").read_bytes() == (
        run.dir / "pairs.rejects.jsonl"
    ).read_bytes()


def test_streams_stdin_to_stdout(run: Run) -> None:
    p = run.pairs_cmd("-", "-", stdin=run.ann.read_bytes())
    assert p.stdout == run.pairs.read_bytes()


def test_min_margin(run: Run) -> None:
    margins = sorted(x["margin_value"] for x in rows(run.pairs))
    cut = (margins[len(margins) // 2 - 1] + margins[len(margins) // 2]) / 2
    out = run.dir / "margin.jsonl"
    run.pairs_cmd(run.ann, out, "--min-margin", cut)
    kept = rows(out)
    assert kept == [x for x in rows(run.pairs) if x["margin_value"] >= cut]
    assert len(kept) == len(margins) // 2
    rej = rows(run.dir / "margin.rejects.jsonl")
    below = [r for r in rej if "below" in r["reason"]]
    assert len(below) == len(margins) - len(kept)
    assert all(r["reason"].startswith("skipped: margin ") for r in below)


def _embedder(tiny_bos_model: Path, d: Path) -> tuple[LlamaModel, Embedder]:
    # the tiny registry's engine settings: what the CLI embeds with
    m = LlamaModel(
        tiny_bos_model,
        EngineSettings(n_ctx=512, n_batch=64, n_ubatch=64, n_threads=1),
        embeddings=True,
    )
    return m, Embedder(m, "in-process", cache=d / "emb.sqlite")


def test_real_easy_cli(run: Run, tiny_bos_model: Path, tmp_path: Path) -> None:
    out = run.dir / "easy.jsonl"
    run.pairs_cmd(run.ann, out, "--strategy", "real-easy")
    ann = _by_id(run.ann)
    got = rows(out)
    assert len(got) == len(PROMPTS)
    meta = orjson.loads((run.dir / "easy.jsonl.meta.json").read_bytes())
    assert meta["embed_model"] == "tiny-bos"  # the pair's strong model
    m, emb = _embedder(tiny_bos_model, tmp_path)
    try:
        for x in got:
            texts = ann[x["id"]]["responses"]
            e = emb.embed(texts)
            c, j = x["chosen_index"], x["rejected_index"]
            assert x["similarity"] == pytest.approx(_cos(e[c], e[j]), abs=1e-6)
            lowest = min(_cos(e[a], e[b]) for a in range(4) for b in range(a + 1, 4))
            assert x["similarity"] == pytest.approx(lowest, abs=1e-6)
            assert x["rewards"][c] > x["rewards"][j]
            assert x["margin_value"] == x["rewards"][c] - x["rewards"][j]
    finally:
        emb.close()
        m.close()


def _pair_similarities(recs: list[dict[str, Any]], model: Path, tmp_path: Path) -> dict[str, float]:
    """Each labelled record's chosen/rejected cosine, computed here (the reference for the CLI's)."""
    m, emb = _embedder(model, tmp_path)
    try:
        return {r["id"]: _cos(*emb.embed([r["chosen"], r["rejected"]])) for r in recs}
    finally:
        emb.close()
        m.close()


def test_keep_dissimilar(run: Run, tiny_bos_model: Path, tmp_path: Path) -> None:
    recs = _labelled()
    inp = run.dir / "labelled.jsonl"
    inp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    out = run.dir / "dissimilar.jsonl"
    run.pairs_cmd(inp, out, "--keep-dissimilar", 50)
    sims = _pair_similarities(recs, tiny_bos_model, tmp_path)
    kept = rows(out)
    assert len(kept) == len(recs) // 2
    lowest = sorted(sims, key=sims.__getitem__)[: len(recs) // 2]
    assert {x["id"] for x in kept} == set(lowest)
    for x in kept:
        r = next(r for r in recs if r["id"] == x["id"])
        assert (x["chosen"], x["rejected"], x["prompt"]) == (
            r["chosen"],
            r["rejected"],
            r["prompt"],
        )  # labels kept
        assert x["similarity"] == pytest.approx(sims[x["id"]], abs=1e-6)
    rej = rows(run.dir / "dissimilar.rejects.jsonl")
    assert len(rej) == len(recs) - len(kept)
    assert all("similarity" in r["reason"] and "above" in r["reason"] for r in rej)


def test_keep_similar_and_random(run: Run, tiny_bos_model: Path, tmp_path: Path) -> None:
    """REAL's hard and random subsets, the same size as the easy one: the most similar
    half, and the half with the lowest seeded draw per id (reruns agree)."""
    recs = _labelled()
    inp = run.dir / "labelled.jsonl"
    inp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    sims = _pair_similarities(recs, tiny_bos_model, tmp_path)
    half = len(recs) // 2
    hard = run.dir / "similar.jsonl"
    run.pairs_cmd(inp, hard, "--keep-similar", 50)
    assert {x["id"] for x in rows(hard)} == set(sorted(sims, key=lambda i: -sims[i])[:half])
    assert all(x["strategy"] == "keep-similar" and x["similarity"] == pytest.approx(sims[x["id"]], abs=1e-6) for x in rows(hard))
    assert all("below" in r["reason"] for r in rows(run.dir / "similar.rejects.jsonl"))
    rnd = run.dir / "random.jsonl"
    run.pairs_cmd(inp, rnd, "--keep-random", 50, "--seed", 4)
    draws = {r["id"]: record_rng(r["id"], 4).random() for r in recs}
    assert {x["id"] for x in rows(rnd)} == set(sorted(draws, key=draws.__getitem__)[:half])
    assert all(x["similarity"] == pytest.approx(sims[x["id"]], abs=1e-6) for x in rows(rnd))
    meta = orjson.loads(Path(str(rnd) + ".meta.json").read_bytes())
    assert meta["strategy"] == "keep-random" and meta["keep_random_percent"] == 50 and meta["seed"] == 4
    again = run.dir / "random2.jsonl"
    run.pairs_cmd(inp, again, "--keep-random", 50, "--seed", 4)
    assert again.read_bytes() == rnd.read_bytes()


def test_random_strategy_end_to_end(run: Run, tmp_path: Path) -> None:
    """--strategy random records the pair's similarity (REAL's baseline is compared on it)."""
    inp = run.dir / "n.jsonl"
    inp.write_bytes(b"".join(orjson.dumps({"id": f"r{k}", "prompt": f"Q{k}?", "responses": [f"A{k}.", f"B {k}!", f"C{k} c."]}) + b"\n"
                             for k in range(4)))
    out = run.dir / "random-pairs.jsonl"
    run.pairs_cmd(inp, out, "--strategy", "random")
    got = rows(out)
    assert len(got) == 4
    for x in got:
        assert x["strategy"] == "random" and isinstance(x["similarity"], float)
        assert x["chosen_index"] != x["rejected_index"] and x["rewards"][x["chosen_index"]] > x["rewards"][x["rejected_index"]]


def _labelled() -> list[dict[str, Any]]:
    recs = [
        {
            "id": f"p{k}",
            "prompt": p,
            "chosen": f"The answer is {a}.",
            "rejected": STEMS[k % 4].format(a[::-1]),
        }
        for k, (p, a) in enumerate(zip(PROMPTS, ANSWERS, strict=True))
    ]
    recs += [
        {"id": "p8", "prompt": "Hi", "chosen": "Hello!", "rejected": "Hello."},
        {
            "id": "p9",
            "prompt": "Bye",
            "chosen": "Goodbye, and take care.",
            "rejected": "zzz 123 ###",
        },
    ]
    return recs


def test_annotated_labelled_pairs_keep_rewards_with_their_texts(run: Run) -> None:
    """annotate relabels a chosen/rejected input (the winner becomes "chosen") but
    keeps "scores" in the input's order: pairs must not mix them up."""
    recs = _labelled()
    recs[1] = {
        "id": "ab",
        "prompt": recs[1]["prompt"],
        "response_a": recs[1]["rejected"],
        "response_b": recs[1]["chosen"],
    }
    inp = run.dir / "labelled-raw.jsonl"
    inp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    ann = run.dir / "labelled-ann.jsonl"
    run.cdr("annotate", inp, "-o", ann, "--models", run.registry, "--quiet")
    swapped = [a for a in rows(ann) if a["label"] in ("rejected", "response_b")]
    assert swapped, "no record relabelled: the test would prove nothing"
    fly, from_ann = run.dir / "labelled-fly.jsonl", run.dir / "labelled-from-ann.jsonl"
    run.pairs_cmd(inp, fly, "--strategy", "best-worst")
    run.pairs_cmd(ann, from_ann, "--strategy", "best-worst")
    a, b = rows(fly), rows(from_ann)
    assert len(a) == len(b) == len(recs)
    for x, y in zip(a, b, strict=True):
        assert (x["id"], x["chosen"], x["rejected"]) == (y["id"], y["chosen"], y["rejected"])
        assert y["margin"] == pytest.approx(x["margin"], abs=1e-9) and y["margin"] > 0
    for y, an in zip(b, rows(ann), strict=True):  # annotate's own verdict, read back
        assert (y["chosen"], y["rejected"]) == (an["chosen"], an["rejected"])
        assert y["margin"] == pytest.approx(an["margin"], abs=1e-9)


def test_bad_strategy_is_a_one_line_error(run: Run) -> None:
    p = run.pairs_cmd(run.ann, run.dir / "never.jsonl", "--strategy", "worst-best", ok=False)
    assert p.returncode == 2
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdr: error:") and "worst-best" in lines[0], (
        p.stderr
    )
    assert not (run.dir / "never.jsonl").exists()


def test_conversational_input(run: Run) -> None:
    recs = []
    for k, (p, a) in enumerate(zip(PROMPTS[:3], ANSWERS, strict=False)):
        recs.append(
            {
                "id": f"c{k}",
                "prompt": [{"role": "user", "content": p}],
                "responses": [[{"role": "assistant", "content": s.format(a)}] for s in STEMS],
            }
        )
    inp = run.dir / "conv.jsonl"
    inp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    out = run.dir / "conv-pairs.jsonl"
    run.pairs_cmd(inp, out, "--strategy", "best-worst")  # scored on the fly
    got = rows(out)
    assert len(got) == len(recs)
    for x, r in zip(got, recs, strict=True):
        assert x["prompt"] == r["prompt"]
        c, j = x["chosen_index"], x["rejected_index"]
        assert x["chosen"] == r["responses"][c] and x["rejected"] == r["responses"][j]
        assert x["chosen"][0]["role"] == "assistant" and len(x["chosen"]) == 1
        assert c == int(np.argmax(x["rewards"])) and j == int(np.argmin(x["rewards"]))


def test_output_loads_with_datasets(run: Run) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(
        "json", data_files=str(run.pairs), split="train", cache_dir=str(run.dir / "hf-cache")
    )
    assert {"prompt", "chosen", "rejected", "margin"} <= set(ds.column_names)
    assert ds.num_rows == len(PROMPTS)
    ref = rows(run.pairs)
    assert ds["chosen"] == [x["chosen"] for x in ref]
    assert ds["margin"] == pytest.approx([x["margin"] for x in ref])
