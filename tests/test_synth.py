"""``cdr synth`` (RMBoost) on tiny GGUF models, with real llama.cpp.

Sampling (``engine.sampling.sample``), generation (``LlamaModel.generate``), the conditioning
prompt against the shipped templates (``rewrite`` by name; ``rmboost``, the default: tags,
retries), template validation, the CLI
(reruns, ``--verify``, ``--keep agree``, rejects) and SIGKILL + ``--resume``.
"""

from __future__ import annotations

import dataclasses
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from test_cli import CDR, _env

from cdr_local.chat import Message
from cdr_local.engine import EngineSettings, ScoreRequest
from cdr_local.engine.llama import LlamaModel
from cdr_local.engine.sampling import sample as _sample
from cdr_local.errors import ConfigError
from cdr_local.pipeline import RecordError
from cdr_local.records import Record, Reject, parse_prompt_line
from cdr_local.scoring import ChatSide
from cdr_local.synth import (
    SynthTask,
    SynthTemplates,
    conditioning_messages,
    draw,
    extract_tagged,
    gen_seed,
    load_templates,
    prompt_text,
    response1_messages,
    response2_seed,
    shipped_templates,
    template_path,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# the tests below are written for the `rewrite` template (the default before `rmboost`), by name
SHIPPED_TEMPLATES = template_path("rewrite")
SHIPPED_TEXT = SHIPPED_TEMPLATES.read_text(encoding="utf-8")
SHIPPED: dict[str, Any] = tomllib.loads(SHIPPED_TEXT)
SETTINGS = EngineSettings(n_ctx=512, n_batch=64, n_ubatch=64, n_threads=1)


# ---------------------------------------------------------------------------
# _sample
# ---------------------------------------------------------------------------


def _softmax(row: Any, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(row, dtype=np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    return p / p.sum()


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    exp = n * probs
    return float(((counts - exp) ** 2 / exp).sum())


ROW = np.array([1.5, -0.3, 0.9, 2.2, -1.0, 0.0, 1.1], dtype=np.float32)
# 99.9% quantiles of chi-square with k degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46}


def test_sample_temperature_zero_is_argmax() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        row = rng.normal(size=300).astype(np.float32)
        for top_p in (1e-9, 0.5, 0.95, 1.0):
            assert _sample(row, rng, 0.0, top_p) == int(np.argmax(row))


def test_sample_tiny_top_p_is_argmax() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        row = rng.normal(size=200).astype(np.float32)
        for temp in (0.3, 1.0, 5.0):
            assert {_sample(row, rng, temp, 1e-9) for _ in range(20)} == {int(np.argmax(row))}


def test_sample_fixed_seed_fixed_sequence() -> None:
    def seq(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [_sample(ROW, rng, 0.8, 0.9) for _ in range(200)]

    assert seq(7) == seq(7)
    assert seq(7) != seq(8)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_sample_frequencies_match_softmax(temperature: float) -> None:
    rng = np.random.default_rng(42)
    n = 20000
    draws = np.array([_sample(ROW, rng, temperature, 1.0) for _ in range(n)])
    counts = np.bincount(draws, minlength=len(ROW))
    p = _softmax(ROW, temperature)
    assert _chi2(counts, p) < CHI2_999[len(ROW) - 1]
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(counts / n - p) < 5 * sigma)


# a row whose distribution (and so whose nucleus) is known: sorted, the
# probabilities are 0.4 (token 1), 0.3 (3), 0.15 (4), 0.1 (2), 0.05 (0);
# cumulative 0.4, 0.7, 0.85, 0.95, 1.0
NUC_P = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
NUC_ROW = np.log(NUC_P).astype(np.float32) + 3.0


@pytest.mark.parametrize(
    ("temperature", "top_p", "nucleus"),
    [
        (1.0, 0.3, [1]),
        (1.0, 0.6, [1, 3]),
        (1.0, 0.8, [1, 3, 4]),
        (1.0, 0.9, [1, 3, 4, 2]),
        (1.0, 0.99, [1, 3, 4, 2, 0]),
        # temperature first, then the nucleus: at T=0.5 the probabilities are
        # p^2 renormalized (0.561, 0.316, 0.079, ...): top-p 0.8 keeps two tokens
        (0.5, 0.8, [1, 3]),
    ],
)
def test_sample_top_p_nucleus(temperature: float, top_p: float, nucleus: list[int]) -> None:
    rng = np.random.default_rng(3)
    n = 6000
    draws = np.array([_sample(NUC_ROW, rng, temperature, top_p) for _ in range(n)])
    assert set(draws.tolist()) == set(nucleus)  # nothing outside; every member seen
    p = _softmax(NUC_ROW, temperature)[nucleus]
    p /= p.sum()
    counts = np.bincount(draws, minlength=5)[nucleus]
    if len(nucleus) > 1:
        assert _chi2(counts, p) < CHI2_999[len(nucleus) - 1]


# ---------------------------------------------------------------------------
# LlamaModel.generate on the tiny model
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_bos_model: Path) -> Any:
    m = LlamaModel(tiny_bos_model, SETTINGS, name="tiny-bos")
    yield m
    m.close()


def _ctx(m: LlamaModel, text: str) -> tuple[int, ...]:
    chat = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return tuple(m.tokenize(chat, add_special=True, parse_special=True))


def test_generate_is_seeded(tiny_model: LlamaModel) -> None:
    m = tiny_model
    ctx = _ctx(m, "Hello world, tell me about the end of the world.")
    kw: dict[str, Any] = {"max_tokens": 40, "temperature": 0.8, "top_p": 0.95}
    a = m.generate(ctx, seed=123, **kw)
    assert 1 <= len(a) <= 40 and all(0 <= t < m.n_vocab for t in a)
    assert m.generate(ctx, seed=123, **kw) == a  # cached context
    m.generate(_ctx(m, "Something else entirely"), seed=5, max_tokens=10)
    assert m.generate(ctx, seed=123, **kw) == a  # context decoded again
    with m.sibling() as fresh:  # a cold context on the same weights
        assert fresh.generate(ctx, seed=123, **kw) == a
    outs = {tuple(m.generate(ctx, seed=s, **kw)) for s in range(6)}
    assert len(outs) == 6  # different seeds, different samples
    greedy = {tuple(m.generate(ctx, seed=s, max_tokens=20, temperature=0.0)) for s in range(3)}
    assert len(greedy) == 1


def test_generate_stops_at_eog_or_max_tokens(tiny_model: LlamaModel) -> None:
    m = tiny_model
    ctx = _ctx(m, "Say something.")
    eog_stops, max_stops = 0, 0
    calls = [0]

    def tick() -> None:
        calls[0] += 1

    for seed in range(60):
        calls[0] = 0
        out = m.generate(ctx, max_tokens=32, temperature=1.0, top_p=1.0, seed=seed, on_token=tick)
        assert 1 <= len(out) <= 32 and calls[0] == len(out)
        assert not any(m.is_eog(t) for t in out[:-1])  # nothing after an end-of-generation token
        if m.is_eog(out[-1]):
            eog_stops += 1  # the end token is included
        else:
            assert len(out) == 32
            max_stops += 1
    assert eog_stops >= 3 and max_stops >= 3
    assert len(m.generate(ctx, max_tokens=1, seed=0)) == 1
    # a context that nearly fills n_ctx: generation stops at the window
    long_ctx = (ctx * (m.n_ctx // len(ctx) + 1))[: m.n_ctx - 3]
    for seed in range(5):
        out = m.generate(long_ctx, max_tokens=50, temperature=0.0, seed=seed)
        assert 1 <= len(out) <= 3


def test_generate_leaves_only_the_context_in_the_cache(tiny_model: LlamaModel) -> None:
    m = tiny_model
    ctx = _ctx(m, "What is the end of the world?")
    conts = (
        tuple(
            m.tokenize(
                "The end is near, and you and the world", add_special=False, parse_special=False
            )
        ),
        tuple(m.tokenize("Hello", add_special=False, parse_special=False)) + (m.eos_id,),
    )
    reqs = [
        ScoreRequest(context=(ctx,), continuations=conts),
        ScoreRequest(context=(ctx[:9], ctx[9:]), continuations=conts),
    ]
    with m.sibling() as fresh:
        ref = [fresh.loglikelihood([r])[0] for r in reqs]
    for i, req in enumerate(reqs):
        before = m.loglikelihood([req])[0]
        for seed in range(3):
            toks = m.generate(ctx, max_tokens=30, temperature=1.0, top_p=1.0, seed=seed)
            assert toks
            after = m.loglikelihood([req])[0]
            for a, b, r in zip(before, after, ref[i], strict=True):
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(a, r)


def test_detokenize_keeps_multibyte_characters(tiny_model: LlamaModel) -> None:
    text = "h\u00e9llo \u65e5\u672c \U0001f600"
    toks = tiny_model.tokenize(text, add_special=False, parse_special=False)
    assert tiny_model.detokenize(toks) == text


# ---------------------------------------------------------------------------
# the conditioning prompt, the seeded draw, the templates
# ---------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"\{(prompt|response1|direction|aspects)\}")


def expected_user(prompt: str, response1: str, label: str, aspects: list[str]) -> str:
    """The documented conditioning user message, from the shipped rewrite.toml text (one pass)."""
    values = {
        "prompt": prompt,
        "response1": response1,
        "direction": SHIPPED[label],
        "aspects": " and ".join(aspects),
    }
    return PLACEHOLDER.sub(lambda mo: values[mo.group(1)], SHIPPED["conditioning_user"])


def test_shipped_templates_load() -> None:
    t = load_templates("rewrite")
    assert t.aspects == tuple(SHIPPED["aspects"]) and t.n_aspects == SHIPPED["n_aspects"]
    assert (t.response_system, t.conditioning_system, t.conditioning_user) == (
        SHIPPED["response_system"],
        SHIPPED["conditioning_system"],
        SHIPPED["conditioning_user"],
    )
    assert (
        (t.better, t.worse)
        == (SHIPPED["better"], SHIPPED["worse"])
        == ("clearly better", "clearly worse")
    )
    assert Path(t.path) == SHIPPED_TEMPLATES
    assert load_templates(SHIPPED_TEMPLATES) == t


@pytest.mark.parametrize(
    ("label", "aspects"),
    [
        ("better", ["clarity"]),
        ("worse", ["accuracy"]),
        ("better", ["clarity", "accuracy"]),
        ("worse", ["helpfulness", "relevance"]),
    ],
)
def test_conditioning_messages(label: str, aspects: list[str]) -> None:
    t = load_templates("rewrite")
    prompt = "Why is the sky blue? {direction} stays literal"
    r1 = "Because of {aspects} and {{braces}}, }{ and\nRayleigh scattering."
    msgs = conditioning_messages(t, prompt, r1, label, aspects)
    user = expected_user(prompt, r1, label, aspects)
    assert msgs == [Message("system", SHIPPED["conditioning_system"]), Message("user", user)]
    # the user message holds response 1 verbatim, the direction text and the aspects
    text = msgs[1].content
    assert r1 in text and prompt in text
    assert f"that is {SHIPPED[label]} than the first answer in {' and '.join(aspects)}." in text
    assert text.count(SHIPPED[label]) == 1
    other = "worse" if label == "better" else "better"
    assert SHIPPED[other] not in text
    if len(aspects) == 2:
        assert f"in {aspects[0]} and {aspects[1]}." in text
    # the shipped layout, literally
    assert text == (
        "Here is a user's request and a first answer to it.\n\n"
        f"Request:\n{prompt}\n\n"
        f"First answer:\n{r1}\n\n"
        f"Write a second answer to the same request that is clearly {label} than the first answer in "
        f"{' and '.join(aspects)}. Reply with the second answer only."
    )
    # no system message when the template has none
    t2 = dataclasses.replace(t, conditioning_system="")
    assert conditioning_messages(t2, prompt, r1, label, aspects) == [Message("user", user)]


@pytest.mark.parametrize("n_aspects", [1, 2, 3])
def test_draw_is_seeded_per_record(n_aspects: int) -> None:
    t = dataclasses.replace(load_templates("rewrite"), n_aspects=n_aspects)
    labels: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    changed = 0
    for i in range(300):
        rid = f"rec-{i}"
        label, aspects = draw(rid, 0, t)
        assert draw(rid, 0, t) == (label, aspects)  # same id + seed, same draw
        assert label in ("better", "worse")
        assert len(aspects) == n_aspects == len(set(aspects)) and set(aspects) <= set(t.aspects)
        labels[label] += 1
        seen.update(aspects)
        changed += draw(rid, 1, t) != (label, aspects)
    assert 100 < labels["better"] < 200 and 100 < labels["worse"] < 200
    assert set(seen) == set(t.aspects)
    assert changed > 100  # the global seed matters


def _task_record(obj: dict[str, Any]) -> Record:
    rec = parse_prompt_line(orjson.dumps(obj), 1)
    assert isinstance(rec, Record)
    return rec


def test_task_reproducible_and_conditioned(
    tiny_model: LlamaModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """process(): response 1, the draw, then response 2 from the documented conditioning prompt."""
    side = ChatSide(tiny_model, system=None, fallback_template=None)
    calls: list[list[Message]] = []
    orig = side.context_tokens

    def spy(messages: Any) -> list[int]:
        calls.append(list(messages))
        return orig(messages)

    monkeypatch.setattr(side, "context_tokens", spy)
    t = dataclasses.replace(load_templates("rewrite"), n_aspects=2)
    rec = _task_record(
        {
            "id": "q1",
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is the end of the world?"},
            ],
            "tag": 7,
        }
    )
    assert prompt_text(rec) == "What is the end of the world?"
    task = SynthTask(side, t, max_tokens=16, seed=3)
    obj, stats = task.process(rec)
    assert len(calls) == 2
    assert calls[0] == response1_messages(t, rec) == list(rec.messages)
    label, aspects = draw("q1", 3, t)
    assert (obj["label"], obj["aspects"]) == (label, aspects) and len(aspects) == 2
    assert calls[1] == [
        Message("system", SHIPPED["conditioning_system"]),
        Message(
            "user",
            expected_user("What is the end of the world?", obj["response_1"], label, aspects),
        ),
    ]
    r1, r2 = obj["response_1"], obj["response_2"]
    assert r1 and r2 and r1 != r2
    chosen, rejected = (r2, r1) if label == "better" else (r1, r2)
    assert obj["chosen"] == [{"role": "assistant", "content": chosen}]
    assert obj["rejected"] == [{"role": "assistant", "content": rejected}]
    assert obj["seeds"] == {
        "response_1": gen_seed("q1", 3, "r1"),
        "response_2": gen_seed("q1", 3, "r2"),
        "label": 3,
    }
    assert obj["tag"] == 7 and obj["margin"] is None and "verify" not in obj and obj["retries"] == 0
    assert 2 <= stats["tokens"] <= 32
    # seeded: the same again (also on a cold context), another seed differs
    assert task.process(rec)[0] == obj
    with tiny_model.sibling() as fresh:
        assert (
            SynthTask(
                ChatSide(fresh, system=None, fallback_template=None), t, max_tokens=16, seed=3
            ).process(rec)[0]
            == obj
        )
    other = SynthTask(side, t, max_tokens=16, seed=4).process(rec)[0]
    assert other["response_1"] != r1


def _shipped_with(edit: Callable[[str], str]) -> str:
    return edit(SHIPPED_TEXT)


BAD_TEMPLATES: dict[str, tuple[Callable[[str], str], str]] = {
    "missing": (lambda s: s.replace('better = "clearly better"\n', ""), "missing better"),
    "missing-two": (
        lambda s: s.replace('better = "clearly better"\n', "").replace("n_aspects = 1\n", ""),
        "missing better, n_aspects",
    ),
    "unknown": (lambda s: s + 'colour = "red"\n', "unknown colour"),
    "n-zero": (
        lambda s: s.replace("n_aspects = 1", "n_aspects = 0"),
        "n_aspects must be between 1 and 5",
    ),
    "n-too-many": (
        lambda s: s.replace("n_aspects = 1", "n_aspects = 6"),
        "n_aspects must be between 1 and 5",
    ),
    "n-string": (lambda s: s.replace("n_aspects = 1", 'n_aspects = "2"'), "n_aspects"),
    "n-bool": (lambda s: s.replace("n_aspects = 1", "n_aspects = true"), "n_aspects"),
    "no-aspects": (
        lambda s: re.sub(r"^aspects = .*$", "aspects = []", s, flags=re.M),
        "aspects must be",
    ),
    "dup-aspects": (
        lambda s: re.sub(r"^aspects = .*$", 'aspects = ["clarity", "clarity"]', s, flags=re.M),
        "distinct",
    ),
    "lacks-aspects": (
        lambda s: s.replace("in {aspects}.", "in some aspects."),
        "conditioning_user must contain {aspects}",
    ),
    "lacks-response1": (
        lambda s: s.replace("First answer:\n{response1}", "First answer:"),
        "must contain {response1}",
    ),
    "escaped": (lambda s: s.replace("in {aspects}.", "in {{aspects}}."), "must contain {aspects}"),
    "unknown-placeholder": (
        lambda s: s.replace("Request:", "Request {kind}:"),
        "conditioning_user",
    ),
    "stray-brace": (lambda s: s.replace("Request:", "Request {:"), "conditioning_user"),
    "not-a-string": (
        lambda s: s.replace('better = "clearly better"', "better = 3"),
        "better must be a string",
    ),
    "bad-toml": (lambda s: s + "this is not toml\n", "invalid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEMPLATES))
def test_bad_templates_are_one_line_config_errors(case: str, tmp_path: Path) -> None:
    edit, needle = BAD_TEMPLATES[case]
    text = _shipped_with(edit)
    assert text != SHIPPED_TEXT
    p = tmp_path / "t.toml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_templates(p)
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg and needle in msg, msg


def test_missing_templates_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_templates(tmp_path / "nope.toml")
    assert "\n" not in str(ei.value) and "nope.toml" in str(ei.value)


def test_custom_templates_load(tmp_path: Path) -> None:
    p = tmp_path / "t.toml"
    p.write_text(
        SHIPPED_TEXT.replace("n_aspects = 1", "n_aspects = 2").replace(
            'response_system = ""', 'response_system = "Be nice."'
        )
    )
    t = load_templates(p)
    assert (
        isinstance(t, SynthTemplates)
        and t.n_aspects == 2
        and t.response_system == "Be nice."
        and t.path == str(p)
    )
    rec = _task_record({"prompt": "Hi"})
    assert response1_messages(t, rec) == [Message("system", "Be nice."), Message("user", "Hi")]


def test_parse_prompt_line() -> None:
    r = parse_prompt_line(b'{"id": 5, "prompt": "Hi there", "label": "x"}', 3)
    assert isinstance(r, Record) and r.id == "5" and r.line == 3 and not r.conversational
    assert (
        r.messages == (Message("user", "Hi there"),)
        and r.extra == {"label": "x"}
        and r.prompt_raw == "Hi there"
    )
    c = parse_prompt_line(orjson.dumps({"prompt": [{"role": "user", "content": "Hi"}]}), 1)
    assert isinstance(c, Record) and c.conversational and c.id  # a content id
    assert parse_prompt_line(b"  \n", 2) is None
    for raw in (
        b'{"id": "a", ',
        b"[1]",
        b'{"id": "a"}',
        b'{"prompt": ""}',
        b'{"prompt": 3}',
        b'{"id": true, "prompt": "x"}',
        b'{"prompt": [{"role": "assistant", "content": "x"}]}',
    ):
        rej = parse_prompt_line(raw, 9)
        assert isinstance(rej, Reject) and rej.line == 9, raw


# ---------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------



def cdr(*args: Any, home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CDR, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(home),
        stdin=subprocess.DEVNULL,
    )


def jsonl(data: bytes) -> list[dict[str, Any]]:
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return [orjson.loads(x) for x in data.splitlines()]


def assert_user_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdr: error:"), p.stderr
    return lines[0]


def _rejects(out: Path) -> Path:
    return out.with_name(out.name[: -len(".jsonl")] + ".rejects.jsonl")


CLI_PROMPTS: list[bytes] = [
    orjson.dumps({"id": "p1", "prompt": "What is the end of the world?", "tag": 1}),
    orjson.dumps({"id": "p2", "prompt": "Tell me about the sea and you.", "label": "input label"}),
    b'{"id": "broken", ',
    orjson.dumps(
        {
            "id": "c1",
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there"},
            ],
        }
    ),
    orjson.dumps({"id": "p3", "prompt": "Is the water cold?"}),
    orjson.dumps({"id": "noprompt", "question": "x"}),
    orjson.dumps({"id": "p4", "prompt": "How long is a day on the world?"}),
    orjson.dumps({"id": "p5", "prompt": "Write one word."}),
    orjson.dumps({"id": 6, "prompt": "Which way is up?"}),
    orjson.dumps({"id": "p7", "prompt": "Can you find the number ten?"}),
]
BAD_CLI_LINES = {3, 6}
GOOD_IDS = ["p1", "p2", "c1", "p3", "p4", "p5", "6", "p7"]


def _synth_args(inp: Path, out: Path, reg: Path, *extra: Any) -> list[Any]:
    return [
        "synth",
        inp,
        "-o",
        out,
        "--models",
        reg,
        "--max-tokens",
        24,
        "--threads",
        1,
        "--quiet",
        *([] if "--templates" in extra else ["--template", "rewrite"]),  # the tests' template, by name
        *extra,
    ]


@pytest.fixture(scope="module")
def cli_runs(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("synth-cli")
    home = d / "home"
    inp = d / "prompts.jsonl"
    inp.write_bytes(b"\n".join(CLI_PROMPTS) + b"\n")
    res: dict[str, Any] = {"inp": inp, "home": home, "dir": d}
    out = d / "plain.jsonl"
    for run in ("plain", "again"):
        p = cdr(
            *_synth_args(inp, out, tiny_registry, *(["--overwrite"] if run == "again" else [])),
            home=home,
        )
        assert p.returncode == 0, p.stderr
        assert "Traceback" not in p.stderr
        res[run] = (
            out.read_bytes(),
            _rejects(out).read_bytes(),
            orjson.loads(Path(str(out) + ".meta.json").read_bytes()),
        )
    assert not Path(str(out) + ".synth-report.json").exists()
    vout = d / "verify.jsonl"
    p = cdr(*_synth_args(inp, vout, tiny_registry, "--verify", "tiny"), home=home)
    assert p.returncode == 0, p.stderr
    res["verify"] = (
        vout.read_bytes(),
        _rejects(vout).read_bytes(),
        orjson.loads(Path(str(vout) + ".synth-report.json").read_bytes()),
    )
    kout = d / "keep.jsonl"
    p = cdr(
        *_synth_args(inp, kout, tiny_registry, "--verify", "tiny", "--keep", "agree"), home=home
    )
    assert p.returncode == 0, p.stderr
    res["keep"] = (
        kout.read_bytes(),
        _rejects(kout).read_bytes(),
        orjson.loads(Path(str(kout) + ".synth-report.json").read_bytes()),
    )
    return res


def test_cli_rerun_is_byte_identical(cli_runs: dict[str, Any]) -> None:
    out, rej, meta = cli_runs["plain"]
    assert cli_runs["again"][0] == out and cli_runs["again"][1] == rej
    assert [r["id"] for r in jsonl(out)] == GOOD_IDS
    rejects = jsonl(rej)
    assert sorted(r["line"] for r in rejects) == sorted(BAD_CLI_LINES)
    assert {r["line"]: r["reason"] for r in rejects}[6] == "missing field 'prompt'"
    assert meta["status"] == "complete" and meta["command"] == "synth"


def test_cli_rows(cli_runs: dict[str, Any]) -> None:
    t = load_templates("rewrite")
    rows = jsonl(cli_runs["plain"][0])
    inputs = {
        str(o["id"]): o
        for o in (orjson.loads(x) for x in CLI_PROMPTS if not x.endswith(b", "))
        if "prompt" in o
    }
    labels = set()
    for r in rows:
        rid = r["id"]
        src = inputs[rid]
        assert r["prompt"] == src["prompt"]  # echoed verbatim
        label, aspects = draw(rid, 0, t)
        assert (r["label"], r["aspects"]) == (label, aspects)
        labels.add(label)
        r1, r2 = r["response_1"], r["response_2"]
        assert r1 and r2 and r1 != r2 and r1 == r1.strip()
        chosen, rejected = (r2, r1) if label == "better" else (r1, r2)
        if isinstance(src["prompt"], list):
            assert r["chosen"] == [{"role": "assistant", "content": chosen}]
            assert r["rejected"] == [{"role": "assistant", "content": rejected}]
        else:
            assert (r["chosen"], r["rejected"]) == (chosen, rejected)
        assert r["seeds"] == {
            "response_1": gen_seed(rid, 0, "r1"),
            "response_2": gen_seed(rid, 0, "r2"),
            "label": 0,
        }
        assert r["generation"] == {
            "model": "tiny-bos",
            "temperature": 0.7,
            "top_p": 0.95,
            "max_tokens": 24,
            "seed": 0,
            "templates": str(SHIPPED_TEMPLATES),
        }
        assert r["margin"] is None and "verify" not in r
    assert labels == {"better", "worse"}
    by = {r["id"]: r for r in rows}
    assert by["p1"]["tag"] == 1 and by["p2"]["input_label"] == "input label"


def _report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, dict[str, list[int]]] = {"overall": {}, "per_aspect": {}, "per_label": {}}
    for r in rows:
        a = int(r["verify"]["agree"])
        keys = (
            [("overall", "")]
            + [("per_aspect", x) for x in r["aspects"]]
            + [("per_label", r["label"])]
        )
        for g, k in keys:
            c = groups[g].setdefault(k, [0, 0])
            c[0] += a
            c[1] += 1

    def rate(c: list[int]) -> dict[str, Any]:
        return {"agree": c[0], "n": c[1], "rate": c[0] / c[1]}

    return {
        "overall": rate(groups["overall"][""]),
        "per_aspect": {k: rate(v) for k, v in sorted(groups["per_aspect"].items())},
        "per_label": {k: rate(v) for k, v in sorted(groups["per_label"].items())},
    }


def test_cli_verify(cli_runs: dict[str, Any], tiny_registry: Path) -> None:
    from cdr_local.models import load_registry
    from cdr_local.pair import LoadedPair, settings_from

    plain = jsonl(cli_runs["plain"][0])
    out, rej, report = cli_runs["verify"]
    rows = jsonl(out)
    assert rej == cli_runs["plain"][1]
    assert len(rows) == len(plain)
    agrees = set()
    for r, p in zip(rows, plain, strict=True):
        v = r["verify"]
        assert {k: x for k, x in r.items() if k not in ("verify", "margin")} == {
            k: x for k, x in p.items() if k != "margin"
        }
        assert v["pair"] == "tiny" and set(v) == {"pair", "reward_1", "reward_2", "agree"}
        rw1, rw2 = v["reward_1"], v["reward_2"]
        assert v["agree"] == ((rw2 > rw1) if r["label"] == "better" else (rw2 < rw1))
        assert r["margin"] == ((rw2 - rw1) if r["label"] == "better" else (rw1 - rw2))
        assert (r["margin"] > 0) == v["agree"]
        agrees.add(v["agree"])
    assert agrees == {True, False}
    assert report == _report(rows)
    assert report["overall"]["n"] == len(rows)
    # the rewards belong to response 1 and response 2, in that order
    reg = load_registry(tiny_registry)
    pair = LoadedPair(reg, "tiny", settings_from(reg), pull=False)
    try:
        src = {
            str(o["id"]): o
            for o in (orjson.loads(x) for x in CLI_PROMPTS if not x.endswith(b", "))
            if "prompt" in o
        }
        for r in rows[:3]:
            rec = _task_record(src[r["id"]])
            sc = pair.score(rec.messages, [r["response_1"], r["response_2"]])
            assert sc[0].reward == pytest.approx(r["verify"]["reward_1"], abs=1e-9)
            assert sc[1].reward == pytest.approx(r["verify"]["reward_2"], abs=1e-9)
    finally:
        pair.close()


def test_cli_keep_agree(cli_runs: dict[str, Any]) -> None:
    vlines = cli_runs["verify"][0].splitlines(keepends=True)
    kept, rej, keep_report = cli_runs["keep"]
    # the report counts the dropped (disagreeing) pairs too, from the rejects' details:
    # it equals the report of the run that kept everything
    assert keep_report == cli_runs["verify"][2]
    agreeing = [ln for ln in vlines if orjson.loads(ln)["verify"]["agree"]]
    assert 0 < len(agreeing) < len(vlines)
    assert kept == b"".join(agreeing)  # the same bytes, the others dropped
    rejects = {r["line"]: r for r in jsonl(rej)}
    dropped = {orjson.loads(ln)["id"] for ln in vlines if not orjson.loads(ln)["verify"]["agree"]}
    assert {r["id"] for ln, r in rejects.items() if ln not in BAD_CLI_LINES} == dropped
    assert set(BAD_CLI_LINES) <= set(rejects)
    for ln, r in rejects.items():
        if ln not in BAD_CLI_LINES:
            assert "disagrees" in r["reason"] and CLI_PROMPTS[ln - 1].startswith(b'{"id":')


def test_cli_user_errors(tiny_registry: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(CLI_PROMPTS[0] + b"\n")
    out = tmp_path / "out.jsonl"
    line = assert_user_error(
        cdr(*_synth_args(inp, out, tiny_registry, "--keep", "agree"), home=tmp_path / "h")
    )
    assert "--verify" in line
    assert "--keep" in assert_user_error(
        cdr(*_synth_args(inp, out, tiny_registry, "--keep", "most"), home=tmp_path / "h")
    )
    bad = tmp_path / "t.toml"
    bad.write_text(SHIPPED_TEXT.replace("in {aspects}.", "in aspects."))
    line = assert_user_error(
        cdr(*_synth_args(inp, out, tiny_registry, "--templates", bad), home=tmp_path / "h")
    )
    assert "{aspects}" in line
    assert not out.exists()


# ---------------------------------------------------------------------------
# the rmboost template (the default): guideline, edit, <response> tags, retries
# ---------------------------------------------------------------------------

RMBOOST_PATH = template_path("rmboost")
RMBOOST_TEXT = RMBOOST_PATH.read_text(encoding="utf-8")
RMBOOST: dict[str, Any] = tomllib.loads(RMBOOST_TEXT)
ALL_PLACEHOLDERS = re.compile(r"\{(prompt|response1|direction|aspects|guideline)\}")


def test_rmboost_is_the_default() -> None:
    assert shipped_templates() == ["rewrite", "rmboost"]
    t = load_templates()
    assert Path(t.path) == RMBOOST_PATH == template_path() and load_templates("rmboost") == t
    assert load_templates(RMBOOST_PATH) == t and load_templates(str(RMBOOST_PATH)) == t
    # a guideline of defined aspects, several per pair, an answer in tags, bounded retries
    assert t.aspects == tuple(a["name"] for a in RMBOOST["aspects"]) and len(t.aspects) >= 5
    assert t.definitions == tuple(a["definition"] for a in RMBOOST["aspects"]) and all(t.definitions)
    assert 2 <= t.n_aspects < len(t.aspects)
    assert (t.response_tag, t.retries, t.better, t.worse) == ("response", 3, "better", "worse")
    rewrite = load_templates("rewrite")
    assert (rewrite.response_tag, rewrite.retries, rewrite.definitions) == ("", 0, ("",) * 5)
    with pytest.raises(ConfigError, match="unknown synth template 'rmbost'; shipped: rewrite, rmboost"):
        load_templates("rmbost")


@pytest.mark.parametrize("label", ["better", "worse"])
def test_rmboost_conditioning_prompt(label: str) -> None:
    t = load_templates()
    label_, aspects = draw("rec-7", 0, t)
    assert len(aspects) == t.n_aspects == len(set(aspects))
    prompt = "Why is the sky blue? {guideline} stays literal"
    r1 = "Because of {aspects} and\nRayleigh scattering."
    msgs = conditioning_messages(t, prompt, r1, label, aspects)
    defs = dict(zip(t.aspects, t.definitions, strict=True))
    guideline = "\n".join(f"- {a}: {defs[a]}" for a in aspects)
    values = {"prompt": prompt, "response1": r1, "direction": RMBOOST[label],
              "aspects": " and ".join(aspects), "guideline": guideline}
    user = ALL_PLACEHOLDERS.sub(lambda mo: values[mo.group(1)], RMBOOST["conditioning_user"])
    assert msgs == [Message("system", RMBOOST["conditioning_system"]), Message("user", user)]
    text = msgs[1].content
    # response 1 in tags, the guideline (name: definition, in drawn order), the edit instruction
    assert f"<response>\n{r1}\n</response>" in text
    assert f"Guideline:\n{guideline}\n\n" in text
    assert f"Edit the response so that the edited response is {label} than the given response on each aspect of the guideline." in text
    assert "between <response> and </response> tags" in text


def _scripted(task: SynthTask, outputs: list[str], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the generator with a script; returns the seeds it was called with.  An
    output ending in "[CUT]" stands for a generation cut at --max-tokens."""
    seeds: list[int] = []
    it = iter(outputs)

    def fake(messages: list[Message], seed: int) -> tuple[str, int, bool]:
        seeds.append(seed)
        text = next(it)
        cut = text.endswith("[CUT]")
        return text.removesuffix("[CUT]").strip(), 5, cut

    monkeypatch.setattr(task, "_generate", fake)
    return seeds


@pytest.fixture()
def rm_task(tiny_model: LlamaModel) -> SynthTask:
    return SynthTask(ChatSide(tiny_model, system=None, fallback_template=None), load_templates(), seed=9)


REC = {"id": "q7", "prompt": "What is the capital of France?"}


def test_rmboost_takes_the_edit_from_the_tags(rm_task: SynthTask, monkeypatch: pytest.MonkeyPatch) -> None:
    seeds = _scripted(rm_task, ["Paris.", "Sure! <response>\n Paris is the capital of France. \n</response> Hope that helps."], monkeypatch)
    obj, stats = rm_task.process(_task_record(REC))
    assert obj["response_1"] == "Paris." and obj["response_2"] == "Paris is the capital of France."
    assert obj["retries"] == 0 and stats["tokens"] == 10
    assert seeds == [gen_seed("q7", 9, "r1"), gen_seed("q7", 9, "r2")]
    assert obj["seeds"] == {"response_1": seeds[0], "response_2": seeds[1], "label": 9}
    label, aspects = draw("q7", 9, rm_task.t)
    assert (obj["label"], obj["aspects"]) == (label, aspects)
    assert (obj["chosen"], obj["rejected"]) == ((obj["response_2"], "Paris.") if label == "better" else ("Paris.", obj["response_2"]))


def test_rmboost_retries_an_unchanged_edit(rm_task: SynthTask, monkeypatch: pytest.MonkeyPatch) -> None:
    outs = ["Paris.", "<response>Paris.</response>", "<response> Paris. </response>", "<response>It is Paris.</response>"]
    seeds = _scripted(rm_task, outs, monkeypatch)
    obj, stats = rm_task.process(_task_record(REC))
    assert obj["response_2"] == "It is Paris." and obj["retries"] == 2 and stats["tokens"] == 20
    # each retry has its own seed, derived from the record id, the global seed and the attempt
    assert seeds == [gen_seed("q7", 9, "r1")] + [response2_seed("q7", 9, k) for k in range(3)]
    assert seeds[1:] == [gen_seed("q7", 9, "r2"), gen_seed("q7", 9, "r2.1"), gen_seed("q7", 9, "r2.2")]
    assert len(set(seeds)) == 4 and obj["seeds"]["response_2"] == seeds[3]
    # the label and the aspects do not change between attempts
    assert (obj["label"], obj["aspects"]) == draw("q7", 9, rm_task.t)


def test_rmboost_skips_after_the_retries(rm_task: SynthTask, monkeypatch: pytest.MonkeyPatch) -> None:
    seeds = _scripted(rm_task, ["Paris."] + ["<response>Paris.</response>"] * 4, monkeypatch)
    with pytest.raises(RecordError) as ei:
        rm_task.process(_task_record(REC))
    assert str(ei.value) == "skipped: response 2 is identical to response 1 (also after 3 retries)"
    assert len(seeds) == 1 + 1 + 3  # response 1, then the first edit and 3 retries: bounded
    assert ei.value.detail == dict(zip(("label", "aspects"), draw("q7", 9, rm_task.t), strict=True))


@pytest.mark.parametrize(
    "edit",
    ["Paris is the capital.", "<response>Paris is the capital.", "Paris</response>", "<Response>Paris</Response>", ""],
)
def test_rmboost_rejects_an_edit_without_tags(edit: str, rm_task: SynthTask, monkeypatch: pytest.MonkeyPatch) -> None:
    seeds = _scripted(rm_task, ["Paris.", edit, "<response>never read</response>"], monkeypatch)
    with pytest.raises(RecordError) as ei:
        rm_task.process(_task_record(REC))
    assert str(ei.value) == "skipped: no <response> tags in the generation"
    assert len(seeds) == 2  # no retry for a malformed answer
    assert ei.value.detail is not None and ei.value.detail["generation"] == edit and ei.value.detail["attempt"] == 0


def test_rmboost_empty_edit(rm_task: SynthTask, monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted(rm_task, ["Paris.", "<response> \n </response>"], monkeypatch)
    with pytest.raises(RecordError, match="^skipped: response 2 came out empty$"):
        rm_task.process(_task_record(REC))


def test_rewrite_has_no_tags_and_no_retry(tiny_model: LlamaModel, monkeypatch: pytest.MonkeyPatch) -> None:
    task = SynthTask(ChatSide(tiny_model, system=None, fallback_template=None), load_templates("rewrite"), seed=9)
    seeds = _scripted(task, ["Paris.", "Paris.", "unused"], monkeypatch)
    with pytest.raises(RecordError) as ei:
        task.process(_task_record(REC))
    assert str(ei.value) == "skipped: response 2 is identical to response 1" and len(seeds) == 2
    _scripted(task, ["Paris.", "<response>Rome.</response>"], monkeypatch)
    obj, _ = task.process(_task_record(REC))
    assert obj["response_2"] == "<response>Rome.</response>" and obj["retries"] == 0  # taken whole


def test_extract_tagged() -> None:
    assert extract_tagged("a <response> b </response> c", "response") == "b"
    assert extract_tagged("<response>x</response><response>y</response>", "response") == "x"
    assert extract_tagged("</response> <response>x</response>", "response") == "x"
    assert extract_tagged("<response></response>", "response") == ""
    assert extract_tagged("<response>x", "response") is None
    assert extract_tagged("<response> x y", "response", cut=True) == "x y"  # --max-tokens cut the closing tag off
    assert extract_tagged("x y", "response", cut=True) is None  # no opening tag: no response, cut or not
    assert extract_tagged("<response>x</response> z", "response", cut=True) == "x"
    assert extract_tagged("x</response>", "response") is None
    assert extract_tagged("<answer>x</answer>", "answer") == "x"


RM_BAD: dict[str, tuple[Callable[[str], str], str]] = {
    "tag": (lambda s: s.replace('response_tag = "response"', 'response_tag = "<response>"'), "response_tag must be a tag name"),
    "tag-type": (lambda s: s.replace('response_tag = "response"', "response_tag = 1"), "response_tag must be a string"),
    "retries-neg": (lambda s: s.replace("retries = 3", "retries = -1"), "retries must be between 0 and 10"),
    "retries-big": (lambda s: s.replace("retries = 3", "retries = 11"), "retries must be between 0 and 10"),
    "retries-bool": (lambda s: s.replace("retries = 3", "retries = true"), "retries must be between 0 and 10"),
    "no-definition": (lambda s: s.replace('{ name = "relevance", definition = "Every part', '{ name = "relevance", defn = "Every part'),
                      "aspects must be a non-empty list of strings or of {name, definition} tables"),
    "empty-definition": (lambda s: re.sub(r'definition = "Facts[^"]*"', 'definition = " "', s), "aspects must be"),
    "dup": (lambda s: s.replace('name = "clarity"', 'name = "accuracy"'), "aspects must be distinct"),
    "no-aspects": (lambda s: s.replace("{guideline}", "the guideline"), "conditioning_user must contain {aspects} or {guideline}"),
    "n-too-many": (lambda s: s.replace("n_aspects = 3", "n_aspects = 8"), "n_aspects must be between 1 and 7"),
}


@pytest.mark.parametrize("case", sorted(RM_BAD))
def test_bad_rmboost_templates(case: str, tmp_path: Path) -> None:
    edit, needle = RM_BAD[case]
    text = edit(RMBOOST_TEXT)
    assert text != RMBOOST_TEXT
    p = tmp_path / "t.toml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_templates(p)
    assert needle in str(ei.value) and "\n" not in str(ei.value) and str(p) in str(ei.value), str(ei.value)


def test_mixed_aspects_and_guideline_only(tmp_path: Path) -> None:
    # bare names and defined aspects mix; {guideline} alone (without {aspects}) is enough
    text = re.sub(r"aspects = \[.*?\n\]", 'aspects = ["tone", { name = "accuracy", definition = "Correct." }]', RMBOOST_TEXT, flags=re.S)
    text = text.replace("n_aspects = 3", "n_aspects = 2")
    assert "{aspects}" not in tomllib.loads(text)["conditioning_user"]
    p = tmp_path / "mixed.toml"
    p.write_text(text, encoding="utf-8")
    t = load_templates(p)
    assert t.aspects == ("tone", "accuracy") and t.definitions == ("", "Correct.")
    assert t.guideline(["accuracy", "tone"]) == "- accuracy: Correct.\n- tone"


def test_cli_default_is_rmboost(tiny_registry: Path, tmp_path: Path) -> None:
    """The tiny model writes no <response> tags: with the default template every pair is
    skipped with the tags reason; `--template rewrite` keeps the earlier behaviour.
    (--n-ctx 2048: the tiny model's byte-level tokenizer needs more than 512 tokens for
    the rmboost prompt.)"""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(CLI_PROMPTS[0] + b"\n" + CLI_PROMPTS[1] + b"\n")
    out = tmp_path / "out.jsonl"
    base = ["synth", inp, "-o", out, "--models", tiny_registry, "--max-tokens", 16, "--threads", 1, "--quiet", "--n-ctx", 2048]
    p = cdr(*base, home=tmp_path / "h")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    rej = jsonl(_rejects(out).read_bytes())
    assert [r["reason"] for r in rej] == ["skipped: no <response> tags in the generation"] * 2
    assert all(set(r["detail"]) == {"label", "aspects", "attempt", "generation"} and len(r["detail"]["aspects"]) == 3 for r in rej)
    meta = orjson.loads(Path(str(out) + ".meta.json").read_bytes())
    assert meta["generation"]["templates"] == str(RMBOOST_PATH)
    p = cdr(*base, "--template", "rewrite", "--overwrite", home=tmp_path / "h")
    assert p.returncode == 0, p.stderr
    assert [r["retries"] for r in jsonl(out.read_bytes())] == [0, 0]
    line = assert_user_error(cdr(*base, "--template", "rewrite", "--templates", SHIPPED_TEMPLATES, "--overwrite", home=tmp_path / "h"))
    assert "--template and --templates" in line
    line = assert_user_error(cdr(*base, "--template", "nope", "--overwrite", home=tmp_path / "h"))
    assert "unknown synth template 'nope'; shipped: rewrite, rmboost" in line


# ---------------------------------------------------------------------------
# SIGKILL at several points, then --resume
# ---------------------------------------------------------------------------

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word but not "
    "what all were we when your can said there use an each which she do how their if will up other about out many then"
).split()
N_KILL = 30
KILL_BAD_LINE = 8


@pytest.fixture(scope="module")
def kill_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = random.Random(99)
    lines: list[bytes] = []
    for i in range(N_KILL):
        if len(lines) + 1 == KILL_BAD_LINE:
            lines.append(b'{"id": "torn", "prompt": ')
        lines.append(
            orjson.dumps(
                {
                    "id": f"k{i:02d}",
                    "prompt": " ".join(
                        r.choice(WORDS) for _ in range(r.randint(4, 12))
                    ).capitalize()
                    + "?",
                }
            )
        )
    p = tmp_path_factory.mktemp("synth-kill") / "in.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def _kill_args(inp: Path, out: Path, reg: Path, *extra: str) -> list[Any]:
    return [
        "synth",
        inp,
        "-o",
        out,
        "--models",
        reg,
        "--max-tokens",
        48,
        "--threads",
        1,
        "--verify",
        "tiny",
        "-q",
        "--template",
        "rewrite",
        *extra,
    ]


@pytest.fixture(scope="module")
def kill_reference(kill_input: Path, tiny_registry: Path) -> tuple[bytes, bytes, bytes]:
    out = kill_input.parent / "ref.jsonl"
    p = cdr(*_kill_args(kill_input, out, tiny_registry), home=kill_input.parent / "home")
    assert p.returncode == 0, p.stderr
    ref = out.read_bytes()
    rows = jsonl(ref)
    assert len(rows) == N_KILL
    rej = _rejects(out).read_bytes()
    assert KILL_BAD_LINE in {r["line"] for r in jsonl(rej)}
    return ref, rej, Path(str(out) + ".synth-report.json").read_bytes()


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return -1


@pytest.mark.parametrize("kill_at", ["start", 0, 5, 15])
def test_sigkill_then_resume(
    kill_at: str | int,
    kill_input: Path,
    kill_reference: tuple[bytes, bytes, bytes],
    tiny_registry: Path,
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [*CDR, *map(str, _kill_args(kill_input, out, tiny_registry))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(home),
    )
    try:
        if kill_at != "start":
            t_end = time.monotonic() + 60
            while _lines(out) < int(kill_at):
                assert proc.poll() is None, (
                    f"cdr finished before the kill point: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
                assert time.monotonic() < t_end, "timed out waiting for the kill point"
                time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ref, ref_rej, ref_report = kill_reference
    if out.exists():
        partial = out.read_bytes()
        assert ref.startswith(partial)  # complete lines, then at most a torn piece of the next one
        n = partial.count(b"\n")
        if kill_at != "start":
            assert n >= int(kill_at)
        assert n < ref.count(b"\n"), "the run finished before it was killed"
    p = cdr(*_kill_args(kill_input, out, tiny_registry, "--resume"), home=home)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    final = out.read_bytes()
    ids = [r["id"] for r in jsonl(final)]
    assert len(ids) == len(set(ids))  # no duplicates
    assert final == ref  # nothing lost, nothing torn, input order
    rej = jsonl(_rejects(out).read_bytes())
    assert sorted(r["line"] for r in rej) == sorted(
        r["line"] for r in jsonl(ref_rej)
    )  # each reject once
    assert Path(str(out) + ".synth-report.json").read_bytes() == ref_report
    assert orjson.loads(Path(str(out) + ".meta.json").read_bytes())["status"] == "complete"


def test_reverify_with_cdr_eval_matches_synth_verify(cli_runs: dict[str, Any], tiny_registry: Path) -> None:
    """benchmarks/synth_agreement.py over `cdr eval` of a synth output, with the
    verifier's own pair, reproduces `cdr synth --verify`'s report group by group:
    the two paths (synth's verify, eval's scoring of chosen/rejected) agree."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "synth_agreement.py"
    spec = importlib.util.spec_from_file_location("synth_agreement", script)
    assert spec is not None and spec.loader is not None
    sa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sa)
    out, _, report = cli_runs["verify"]
    src = cli_runs["dir"] / "verify.jsonl"
    ev = cli_runs["dir"] / "reverify.jsonl"
    p = cdr("eval", src, "-o", ev, "--models", tiny_registry, "--pair", "tiny", "--plain", "--threads", "1",
            "--bootstrap", "50", home=cli_runs["home"])
    assert p.returncode == 0, p.stdout + p.stderr
    got = sa.agreement(jsonl(out), jsonl(ev.read_bytes()))
    assert got["overall"] == (report["overall"]["agree"], report["overall"]["n"])
    for lab, v in report["per_label"].items():
        assert got[f"label: {lab}"] == (v["agree"], v["n"])
    for asp, v in report["per_aspect"].items():
        assert got[f"aspect: {asp}"] == (v["agree"], v["n"])
    rows = jsonl(out)
    second = sum(r["verify"]["reward_2"] > r["verify"]["reward_1"] for r in rows)
    assert got["prefers response 2"] == (second, len(rows))


def test_rmboost_takes_an_edit_cut_at_max_tokens(rm_task: SynthTask, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation stopped by --max-tokens after <response> has lost only its closing
    tag to the cut: the edit counts, and the output says it was cut; an uncut
    generation without the closing tag is still refused."""
    _scripted(rm_task, ["Paris.", "Sure: <response>It is Paris, on the Seine, in[CUT]"], monkeypatch)
    obj, _ = rm_task.process(_task_record(REC))
    assert obj["response_2"] == "It is Paris, on the Seine, in"
    assert obj["cut_at_max_tokens"] == {"response_1": False, "response_2": True}
    _scripted(rm_task, ["Paris.", "Sure: <response>It is Paris."], monkeypatch)
    with pytest.raises(RecordError, match="no <response> tags"):
        rm_task.process(_task_record(REC))
