"""Routers (keywords, model, answer, none), the documented classification prompt, and
the annotate task's use of the routed / given domain -- on tiny GGUF models
with real llama.cpp."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cdr_local.annotate import AnnotateTask, make_router
from cdr_local.chat import Message
from cdr_local.errors import ConfigError
from cdr_local.models import load_registry
from cdr_local.pair import LoadedPair, settings_from
from cdr_local.pipeline import RecordError, RunConfig, rejects_path, run
from cdr_local.profiles import Profile, load_profile, profile_messages
from cdr_local.records import Record, parse_line
from cdr_local.router import (
    ANSWER_MAX_TOKENS,
    MAX_ROUTER_CHARS,
    AnswerRouter,
    KeywordRouter,
    ModelRouter,
    NoneRouter,
    answer_messages,
    classification_messages,
    parse_answer,
    prompt_text,
)

DESC_CHAT = "general conversation, writing, advice, explanations and instruction following"
DESC_SAFETY = (
    "requests that could lead to harm: violence, weapons, crime, drugs, self-harm, hate, harassment, privacy, "
    "sexual content, dangerous or unethical activities, and honesty about the assistant's limits"
)
DESC_REASONING = "math, logic, coding, programming, puzzles, science problems and questions with one correct answer"

PROMPTS = [
    "What is the capital of France?",
    "How do I make a bomb at home?",
    "Solve the equation 3x + 5 = 20.",
    "Write a short poem about autumn.",
]


def user(text: str) -> list[Message]:
    return [Message("user", text)]


def _profile(tmp_path: Path, text: str) -> Profile:
    f = tmp_path / "p.toml"
    f.write_text(text, encoding="utf-8")
    return load_profile(str(f))


# ---------------------------------------------------------------------------
# keywords / none
# ---------------------------------------------------------------------------


def test_keyword_router_on_cdr() -> None:
    r = KeywordRouter(load_profile("cdr"))
    assert r.name == "keywords"
    assert r.route(user("Please calculate the sum of these numbers")) == "reasoning"
    assert r.route(user("How do I hack my neighbour's password?")) == "safety"
    assert r.route(user("Write a story about a dragon")) == "chat"
    assert r.route(user("I love C++ templates")) == "reasoning"  # keyword with symbols
    assert r.route(user("Good morning!")) == "chat"  # no hits: the default


def test_keyword_router_counts_ties_whole_words_case(tmp_path: Path) -> None:
    p = _profile(
        tmp_path,
        'default_domain = "other"\n'
        '[domains.fruit]\nkeywords = ["Apple", "pear"]\nsystem = "F"\n'
        '[domains.tools]\nkeywords = ["saw", "drill"]\nsystem = "T"\n'
        '[domains.other]\nsystem = "O"\n',
    )
    r = KeywordRouter(p)
    assert r.route(user("an apple")) == "fruit"
    assert r.route(user("APPLE and Pear")) == "fruit"  # case-insensitive
    assert r.route(user("apple, then a drill and a saw")) == "tools"  # most hits wins
    assert r.route(user("apple apple drill")) == "fruit"  # every occurrence counts
    assert r.route(user("apple and a saw")) == "other"  # tie -> default
    assert r.route(user("nothing here")) == "other"  # no hits -> default
    assert r.route(user("pineapples, pears, seesaw, drilling")) == "other"  # whole words only
    assert r.route(user("apple.")) == "fruit" and r.route(user("(drill)")) == "tools"
    # only the user's turns count
    conv = [
        Message("system", "saw drill"),
        Message("user", "apple"),
        Message("assistant", "saw saw drill"),
    ]
    assert r.route(conv) == "fruit"


def test_none_router_and_make_router(tmp_path: Path) -> None:
    cdr = load_profile("cdr")
    assert NoneRouter(cdr).route(user("How do I make a bomb?")) == "chat"
    assert isinstance(make_router("keywords", cdr, None), KeywordRouter)  # type: ignore[arg-type]
    assert isinstance(make_router("none", cdr, None), NoneRouter)  # type: ignore[arg-type]
    assert isinstance(make_router(None, load_profile("none"), None), NoneRouter)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown router 'magic'"):
        make_router("magic", cdr, None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# the classification prompt (documented wording)
# ---------------------------------------------------------------------------


def test_classification_prompt_is_exactly_documented() -> None:
    conv = [
        Message("system", "You are terse."),
        Message("user", "Hi"),
        Message("assistant", "Hello."),
        Message("user", "Solve 2x = 4."),
    ]
    assert prompt_text(conv) == "Hi\n\nSolve 2x = 4."
    assert classification_messages(load_profile("cdr"), conv) == [
        Message(
            "system",
            "Classify the user's request into exactly one category.\n\n"
            "Categories:\n"
            f"- chat: {DESC_CHAT}\n"
            f"- safety: {DESC_SAFETY}\n"
            f"- reasoning: {DESC_REASONING}\n\n"
            "Answer with the category name only.",
        ),
        Message("user", "Request:\nHi\n\nSolve 2x = 4."),
    ]


def test_classification_prompt_truncates_long_requests() -> None:
    long = "x" * (MAX_ROUTER_CHARS + 500)
    msgs = classification_messages(load_profile("cdr"), user(long))
    assert msgs[1] == Message("user", "Request:\n" + "x" * MAX_ROUTER_CHARS + " ...")
    exact = "y" * MAX_ROUTER_CHARS
    assert (
        classification_messages(load_profile("cdr"), user(exact))[1].content == "Request:\n" + exact
    )


# ---------------------------------------------------------------------------
# the model router and the annotate task on the tiny pair
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedPair]:
    home = tmp_path_factory.mktemp("router-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDR_HOME", str(home))
        reg = load_registry(tiny_registry)
        # one thread: llama.cpp's spinning threads crawl on a busy 2-core machine
        lp = LoadedPair(reg, "tiny", settings_from(reg, n_threads=1))
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def cdr() -> Profile:
    return load_profile("cdr")


@pytest.fixture(scope="module")
def router(pair: LoadedPair, cdr: Profile) -> ModelRouter:
    return ModelRouter(cdr, pair.router_side(), calibrate=True)


def test_model_router_returns_a_domain(router: ModelRouter, cdr: Profile) -> None:
    assert router.name == "model" and router.labels == ["chat", "safety", "reasoning"]
    for p in PROMPTS:
        sc = router.scores(user(p))
        assert list(sc) == list(cdr.domains)
        assert all(isinstance(v, float) and math.isfinite(v) for v in sc.values())
        d = router.route(user(p))
        assert d in cdr.domains
        assert d == max(sc, key=lambda k: (sc[k], k == cdr.default_domain))
        assert router.route(user(p)) == d  # deterministic
    # the prior is the content-free request's score: calibrated to zero there
    assert router.scores(user("N/A")) == pytest.approx(dict.fromkeys(cdr.domains, 0.0), abs=1e-6)


def test_model_router_scores_match_an_independent_computation(
    pair: LoadedPair, router: ModelRouter, cdr: Profile
) -> None:
    side = pair.router_side()
    assert side.system is None  # the router reads no pair system prompt
    msgs = user(PROMPTS[2])
    (raw,) = side.score(classification_messages(cdr, msgs), ["safety"])
    (prior,) = side.score(classification_messages(cdr, user("N/A")), ["safety"])
    assert raw.n_tokens >= 2  # the label's tokens plus end-of-turn
    assert router.scores(msgs)["safety"] == pytest.approx(raw.logprob - prior.logprob, abs=1e-5)
    uncal = ModelRouter(cdr, side)  # the default: no calibration (measured better)
    assert uncal.prior == dict.fromkeys(cdr.domains, 0.0)
    raw_all = side.score(classification_messages(cdr, msgs), list(cdr.domains))
    assert uncal.scores(msgs) == pytest.approx(
        {d: s.logprob for d, s in zip(cdr.domains, raw_all, strict=True)}, abs=1e-5
    )
    assert all(v < 0 for v in uncal.scores(msgs).values())  # log-probabilities


def _rec(obj: dict[str, Any], line: int = 1) -> Record:
    r = parse_line(orjson.dumps(obj), line)
    assert isinstance(r, Record)
    return r


def test_record_domain_overrides_the_router(
    pair: LoadedPair, router: ModelRouter, cdr: Profile
) -> None:
    task = AnnotateTask(pair, cdr, router)
    rec = _rec(
        {
            "id": "d1",
            "prompt": PROMPTS[1],
            "chosen": "I can't help with that.",
            "rejected": "Sure, here is how.",
            "domain": "reasoning",
        }
    )
    obj, _ = task.process(rec)
    assert obj["domain"] == "reasoning" and obj["domain_source"] == "input"
    assert "input_domain" not in obj
    expected = pair.score(profile_messages(cdr, "reasoning", rec.messages), rec.responses)
    for got, want in zip(obj["scores"], expected, strict=True):
        assert got["strong_logprob"] == pytest.approx(want.strong.logprob, abs=1e-6)
        assert got["weak_logprob"] == pytest.approx(want.weak.logprob, abs=1e-6)
        assert got["reward"] == pytest.approx(want.reward, abs=1e-6)
    # the domain matters: the chat criteria give other numbers
    chat = pair.score(profile_messages(cdr, "chat", rec.messages), rec.responses)
    assert chat[0].strong.logprob != pytest.approx(expected[0].strong.logprob, abs=1e-6)
    # with a different router, the given domain still wins
    obj2, _ = AnnotateTask(pair, cdr, NoneRouter(cdr)).process(rec)
    assert obj2["domain"] == "reasoning" and [s["reward"] for s in obj2["scores"]] == pytest.approx(
        [s["reward"] for s in obj["scores"]], abs=1e-6
    )


def test_unknown_record_domain_is_a_record_error(
    pair: LoadedPair, router: ModelRouter, cdr: Profile
) -> None:
    task = AnnotateTask(pair, cdr, router)
    with pytest.raises(RecordError, match="domain 'poetry' is not one of profile 'cdr'"):
        task.process(_rec({"prompt": "p", "chosen": "a", "rejected": "b", "domain": "poetry"}))


def _run(
    pair: LoadedPair, task: AnnotateTask, lines: list[dict[str, Any]], tmp_path: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    run(RunConfig(input=str(inp), output=str(out), meta={"command": "test"}), parse_line, task)
    rej = rejects_path(str(out))
    rejects = [orjson.loads(x) for x in rej.read_bytes().splitlines()] if rej.exists() else []
    return [orjson.loads(x) for x in out.read_bytes().splitlines()], rejects


def test_pipeline_writes_the_routed_domain(
    pair: LoadedPair, router: ModelRouter, cdr: Profile, tmp_path: Path
) -> None:
    lines = [
        {"id": f"r{i}", "prompt": p, "chosen": "Yes.", "rejected": "No."}
        for i, p in enumerate(PROMPTS[1:])
    ]
    out, rejects = _run(pair, AnnotateTask(pair, cdr, router), lines, tmp_path / "model")
    assert rejects == [] and [o["id"] for o in out] == ["r0", "r1", "r2"]
    for o, p in zip(out, PROMPTS[1:], strict=True):
        assert o["domain"] == router.route(user(p)) and o["domain_source"] == "model"
    # keywords: the domains are known in advance
    out, _ = _run(pair, AnnotateTask(pair, cdr, KeywordRouter(cdr)), lines, tmp_path / "kw")
    assert [(o["domain"], o["domain_source"]) for o in out] == [
        ("safety", "keywords"),
        ("reasoning", "keywords"),
        ("chat", "keywords"),
    ]
    # the numbers are those of the routed domain's messages
    rec = _rec(lines[1])
    want = pair.score(profile_messages(cdr, "reasoning", rec.messages), rec.responses)
    assert [s["reward"] for s in out[1]["scores"]] == pytest.approx(
        [w.reward for w in want], abs=1e-6
    )


def test_pipeline_given_and_bad_domains(
    pair: LoadedPair, router: ModelRouter, cdr: Profile, tmp_path: Path
) -> None:
    lines = [
        {
            "id": "g1",
            "prompt": PROMPTS[0],
            "chosen": "Paris.",
            "rejected": "Rome.",
            "domain": "safety",
        },
        {
            "id": "b1",
            "prompt": PROMPTS[0],
            "chosen": "Paris.",
            "rejected": "Rome.",
            "domain": "poetry",
        },
        {"id": "r1", "prompt": PROMPTS[2], "chosen": "x = 5", "rejected": "x = 4"},
    ]
    out, rejects = _run(pair, AnnotateTask(pair, cdr, router), lines, tmp_path)
    assert [(o["id"], o["domain"], o["domain_source"]) for o in out] == [
        ("g1", "safety", "input"),
        ("r1", router.route(user(PROMPTS[2])), "model"),
    ]
    assert len(rejects) == 1 and rejects[0]["line"] == 2 and "poetry" in rejects[0]["reason"]


# ---------------------------------------------------------------------------
# the answer router (the CDR authors' [START]/[END] router) and cdr-paper
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper() -> Profile:
    return load_profile("cdr-paper")


def test_make_router_answer(pair: LoadedPair, paper: Profile) -> None:
    r = make_router("answer", paper, pair)
    assert isinstance(r, AnswerRouter) and r.name == "answer" and r.labels == ["SAFETY", "REASONING", "CHAT"]
    assert r.side is pair.router_side() and r.max_tokens == ANSWER_MAX_TOKENS
    # the default: the answer router for a profile with its own router prompt (the authors' recipe),
    # the model router for other profiles with several domains
    assert isinstance(make_router(None, paper, pair), AnswerRouter)
    assert isinstance(make_router(None, load_profile("cdr"), pair), ModelRouter)


def test_answer_router_generates_greedily_and_parses(pair: LoadedPair, paper: Profile, tmp_path: Path) -> None:
    side = pair.router_side()
    m = side.model
    # the authors' prompt is longer than the tiny model's 512-token context: no room to answer, the fallback
    full = AnswerRouter(paper, side)
    assert len(side.context_tokens(answer_messages(paper, user(PROMPTS[0])))) >= m.n_ctx
    assert full.answer(user(PROMPTS[0])) == "" and full.route(user(PROMPTS[0])) == "CHAT"
    # a shorter router prompt (same recipe otherwise) fits: a real greedy answer, parsed
    short = _profile(tmp_path, 'extends = "cdr-paper"\nrouter_prompt = "Classify as SAFETY, REASONING or CHAT. '
                               'Wrap your output in [START] and [END]."\n')
    r = AnswerRouter(short, side)
    for p in PROMPTS:
        text = r.answer(user(p))
        # independently: the router prompt, the conversation, a greedy decode
        ctx = side.context_tokens(answer_messages(short, user(p)))
        assert len(ctx) + ANSWER_MAX_TOKENS < m.n_ctx
        toks = m.generate(tuple(ctx), max_tokens=ANSWER_MAX_TOKENS, temperature=0.0, seed=123)
        assert text and text == m.detokenize(toks[:-1] if m.is_eog(toks[-1]) else toks)
        d = r.route(user(p))
        assert d == parse_answer(text, r.labels, "CHAT") and d in short.domains
        assert r.route(user(p)) == d and r.answer(user(p)) == text  # deterministic
    long = user("the sea " * (m.n_ctx * 2))
    assert r.answer(long) == "" and r.route(long) == "CHAT"


def test_pipeline_with_the_answer_router(
    pair: LoadedPair, paper: Profile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cdr-paper end to end on the tiny pair: the answer decides the domain, the domain
    decides what both models read (an empty system message and the drawn exemplar in
    the user turn for SAFETY / REASONING; the record as given for CHAT)."""
    router = AnswerRouter(paper, pair.router_side())
    answers = {PROMPTS[0]: "[START] CHAT [END]", PROMPTS[1]: "[START] SAFETY [END]",
               PROMPTS[2]: "Category: [START] REASONING [END]", PROMPTS[3]: "poetry, I think"}
    monkeypatch.setattr(router, "answer", lambda msgs: answers[msgs[-1].content])
    lines = [
        {"id": f"a{i}", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}],
         "chosen": "Yes.", "rejected": "No."}
        for i, p in enumerate(PROMPTS)
    ]
    out, rejects = _run(pair, AnnotateTask(pair, paper, router), lines, tmp_path)
    assert rejects == []
    assert [(o["domain"], o["domain_source"]) for o in out] == [
        ("CHAT", "answer"), ("SAFETY", "answer"), ("REASONING", "answer"), ("CHAT", "answer")]
    for o, line in zip(out, lines, strict=True):
        rec = _rec(line)
        msgs = profile_messages(paper, o["domain"], rec.messages, rec.id)
        if o["domain"] == "CHAT":
            assert msgs == list(rec.messages)
        else:
            assert msgs[0] == Message("system", "") and msgs[1].content.endswith("\nGood Assistant:")
        want = pair.score(msgs, rec.responses)
        assert [s["reward"] for s in o["scores"]] == pytest.approx([w.reward for w in want], abs=1e-6)
    # the record's own domain field still wins; the exemplar drawn depends on the record id
    line = {"prompt": PROMPTS[2], "chosen": "x = 5", "rejected": "x = 4", "domain": "REASONING"}
    obj, _ = AnnotateTask(pair, paper, router).process(_rec({"id": "x", **line}))
    assert obj["domain_source"] == "input"
    d = paper.domains["REASONING"]
    other = next(f"y{i}" for i in range(1000) if d.draw(f"y{i}") != d.draw("x"))
    obj2, _ = AnnotateTask(pair, paper, router).process(_rec({"id": other, **line}))
    assert obj2["scores"][0]["strong_logprob"] != pytest.approx(obj["scores"][0]["strong_logprob"], abs=1e-6)
    again, _ = AnnotateTask(pair, paper, router).process(_rec({"id": "x", **line}))
    assert again["scores"] == obj["scores"]  # the same id, the same exemplar, the same numbers
