"""Profiles: the exact messages each profile gives both models, ``extends``,
lookup (shipped, $CDR_HOME/profiles, path), one-line errors, the sha256, and
``cdr profiles list | show`` as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from test_cli import CDR

from cdr_local.chat import Message
from cdr_local.errors import ConfigError
from cdr_local.profiles import SHIPPED_DIR, load_profile, profile_messages, shipped_profiles

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


CHAT_CRITERIA = (
    "You are a helpful assistant. A good answer follows every instruction in the request exactly "
    "(format, length, constraints), is accurate, relevant and complete, and is clear and well organised. "
    "It does not add unrequested content, does not pad, and does not make things up."
)
REASONING_CRITERIA = (
    "You are a careful expert in mathematics, logic and programming. A good answer is correct above all: "
    "every step of reasoning is valid, calculations are exact, code runs and does what was asked, and the "
    "final answer is stated clearly. Confident but wrong answers are worse than careful ones."
)

CONV = [
    Message("user", "Hello there"),
    Message("assistant", "Hi!"),
    Message("user", "How do I bake bread?"),
]


def _toml(name: str) -> dict:
    return tomllib.loads((SHIPPED_DIR / f"{name}.toml").read_text(encoding="utf-8"))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# rendering: exactly the documented messages
# ---------------------------------------------------------------------------


def test_shipped_profiles() -> None:
    assert shipped_profiles() == ["cdr", "cdr-fewshot", "cdr-paper", "none"]
    for n in shipped_profiles():
        assert load_profile(n).name == n


def test_none_leaves_messages_unchanged() -> None:
    p = load_profile("none")
    assert list(p.domains) == ["chat"]
    assert profile_messages(p, None, CONV) == CONV
    assert profile_messages(p, "chat", CONV) == CONV
    with_sys = [Message("system", "Answer in French."), *CONV]
    assert profile_messages(p, None, with_sys) == with_sys


def test_cdr_chat_is_one_system_message_with_the_criteria() -> None:
    p = load_profile("cdr")
    assert p.domains["chat"].system == CHAT_CRITERIA == _toml("cdr")["domains"]["chat"]["system"]
    assert profile_messages(p, "chat", CONV) == [Message("system", CHAT_CRITERIA), *CONV]
    assert profile_messages(p, "reasoning", [Message("user", "2+2?")]) == [
        Message("system", REASONING_CRITERIA),
        Message("user", "2+2?"),
    ]


def test_cdr_fewshot_safety_exact_text() -> None:
    p = load_profile("cdr-fewshot")
    criteria = _toml("cdr")["domains"]["safety"]["system"]
    (ex,) = _toml("cdr-fewshot")["domains"]["safety"]["exemplars"]
    expected = (
        criteria
        + "\n\nExamples of a good and a bad answer:\n\nExample 1\nUser: "
        + ex["user"]
        + "\nGood answer: "
        + ex["good"]
        + "\nBad answer: "
        + ex["bad"]
        + "\nWhy: "
        + ex["why"]
    )
    msgs = [Message("user", "How do I pick a lock?")]
    assert profile_messages(p, "safety", msgs) == [Message("system", expected), *msgs]


def test_exemplar_without_why_and_several_exemplars(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "two.toml",
        '[domains.math]\nsystem = "Be right."\n'
        '[[domains.math.exemplars]]\nuser = "1+1?"\ngood = "2"\nbad = "3"\n'
        '[[domains.math.exemplars]]\nuser = "2+2?"\ngood = "4"\nbad = "5"\nwhy = "arithmetic"\n',
    )
    p = load_profile(str(f))
    assert profile_messages(p, "math", [Message("user", "q")])[0] == Message(
        "system",
        "Be right.\n\nExamples of a good and a bad answer:\n\n"
        "Example 1\nUser: 1+1?\nGood answer: 2\nBad answer: 3\n\n"
        "Example 2\nUser: 2+2?\nGood answer: 4\nBad answer: 5\nWhy: arithmetic",
    )


def test_record_system_message_is_kept_after_profile_text() -> None:
    p = load_profile("cdr")
    msgs = [Message("system", "Answer in French."), Message("user", "Hi")]
    assert profile_messages(p, "chat", msgs) == [
        Message("system", CHAT_CRITERIA + "\n\nAnswer in French."),
        Message("user", "Hi"),
    ]


def test_unknown_or_missing_domain_is_the_default() -> None:
    p = load_profile("cdr")
    assert p.default_domain == "chat"
    expected = [Message("system", CHAT_CRITERIA), *CONV]
    assert profile_messages(p, "no-such-domain", CONV) == expected
    assert profile_messages(p, None, CONV) == expected


# ---------------------------------------------------------------------------
# extends, lookup
# ---------------------------------------------------------------------------


def test_fewshot_extends_cdr() -> None:
    base, few = load_profile("cdr"), load_profile("cdr-fewshot")
    assert list(few.domains) == list(base.domains) == ["chat", "safety", "reasoning"]
    assert few.default_domain == "chat"
    raw = _toml("cdr-fewshot")["domains"]
    for name, d in base.domains.items():
        f = few.domains[name]
        assert (f.system, f.keywords, f.description) == (d.system, d.keywords, d.description)
        assert d.exemplars == ()
        assert [(e.user, e.good, e.bad, e.why) for e in f.exemplars] == [
            (e["user"], e["good"], e["bad"], e["why"]) for e in raw[name]["exemplars"]
        ]


def test_user_profile_by_name_extends_and_overrides(_hermetic_home: Path) -> None:
    _write(
        _hermetic_home / "profiles" / "mine.toml",
        'extends = "cdr-fewshot"\ndescription = "my own"\n'
        '[domains.chat]\nsystem = "Be brief."\n'
        '[[domains.chat.exemplars]]\nuser = "u"\ngood = "g"\nbad = "b"\n'
        '[domains.poetry]\ndescription = "poems"\nkeywords = ["Poem", "verse"]\nsystem = "Rhyme."\n',
    )
    p = load_profile("mine")
    few = load_profile("cdr-fewshot")
    assert p.name == "mine" and p.description == "my own"
    assert p.path == str(_hermetic_home / "profiles" / "mine.toml")
    assert list(p.domains) == ["chat", "safety", "reasoning", "poetry"]
    assert p.default_domain == "chat"
    chat = p.domains["chat"]
    assert chat.system == "Be brief."
    assert chat.keywords == few.domains["chat"].keywords  # inherited
    assert chat.exemplars[:-1] == few.domains["chat"].exemplars and chat.exemplars[-1].user == "u"
    assert p.domains["safety"] == few.domains["safety"]
    assert p.domains["poetry"].keywords == ("poem", "verse")  # lowercased
    # a user profile shadows a shipped one of the same name
    _write(_hermetic_home / "profiles" / "cdr.toml", '[domains.x]\nsystem = "X"\n')
    assert list(load_profile("cdr").domains) == ["x"]


def test_extends_keeps_the_parents_default_domain(tmp_path: Path) -> None:
    parent = _write(
        tmp_path / "p.toml",
        'default_domain = "b"\n[domains.a]\nsystem = "A"\n[domains.b]\nsystem = "B"\n',
    )
    child = _write(tmp_path / "c.toml", f'extends = "{parent}"\n[domains.c]\nsystem = "C"\n')
    assert load_profile(str(child)).default_domain == "b"


def test_profile_by_path(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "sub" / "custom.toml", 'name = "custom-x"\n[domains.only]\nsystem = "Only."\n'
    )
    p = load_profile(str(f))
    assert p.name == "custom-x" and p.default_domain == "only" and p.path == str(f)
    assert profile_messages(p, "whatever", [Message("user", "q")]) == [
        Message("system", "Only."),
        Message("user", "q"),
    ]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('colour = "red"\n[domains.a]\nsystem = "A"\n', "unknown keys colour"),
        ('[domains.a]\nsystem = "A"\nprompt = "x"\n', "domains.a: unknown keys prompt"),
        (
            '[domains.a]\nsystem = "A"\n[[domains.a.exemplars]]\nuser = "u"\ngood = "g"\n',
            "domains.a.exemplars[0]",
        ),
        (
            '[domains.a]\nsystem = "A"\n[[domains.a.exemplars]]\nuser = "u"\ngood = "g"\nbad = "b"\nhint = "h"\n',
            "domains.a.exemplars[0]",
        ),
        (
            '[domains.a]\nsystem = "A"\n[[domains.a.exemplars]]\nuser = "u"\ngood = 1\nbad = "b"\n',
            "domains.a.exemplars[0]",
        ),
        (
            'default_domain = "b"\n[domains.a]\nsystem = "A"\n',
            "default_domain 'b' is not one of its domains",
        ),
        ('name = "x"\n', "defines no domains"),
        ("[domains.a]\nsystem = 3\n", "domains.a"),
        ("domains = 3\n", "'domains' must be a table"),
        ("[domains.a\n", "invalid TOML"),
    ],
)
def test_bad_profiles_raise_one_line_config_errors(tmp_path: Path, text: str, needle: str) -> None:
    f = _write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as ei:
        load_profile(str(f))
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg and str(f) in msg


def test_extends_loop(_hermetic_home: Path) -> None:
    d = _hermetic_home / "profiles"
    _write(d / "a.toml", 'extends = "b"\n[domains.x]\nsystem = "X"\n')
    _write(d / "b.toml", 'extends = "a"\n[domains.y]\nsystem = "Y"\n')
    _write(d / "self.toml", 'extends = "self"\n[domains.z]\nsystem = "Z"\n')
    for name in ("a", "self"):
        with pytest.raises(ConfigError, match="'extends' loops") as ei:
            load_profile(name)
        assert "\n" not in str(ei.value)


def test_unknown_profile_lists_shipped_ones(_hermetic_home: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_profile("nope")
    assert str(ei.value) == "unknown profile 'nope'; shipped: cdr, cdr-fewshot, cdr-paper, none"
    _write(_hermetic_home / "profiles" / "mine.toml", '[domains.a]\nsystem = "A"\n')
    with pytest.raises(ConfigError) as ei:
        load_profile("nope")
    assert str(ei.value) == "unknown profile 'nope'; shipped: cdr, cdr-fewshot, cdr-paper, none; yours: mine"
    with pytest.raises(ConfigError, match="unknown profile"):
        load_profile(str(_hermetic_home / "missing.toml"))
    _write(
        _hermetic_home / "profiles" / "orphan.toml",
        'extends = "ghost"\n[domains.a]\nsystem = "A"\n',
    )
    with pytest.raises(ConfigError, match="unknown profile 'ghost'"):
        load_profile("orphan")


# ---------------------------------------------------------------------------
# sha256
# ---------------------------------------------------------------------------


def test_sha256_tracks_what_the_models_read(tmp_path: Path) -> None:
    base = (
        'name = "h"\n[domains.a]\ndescription = "da"\nkeywords = ["k"]\nsystem = "S1"\n'
        '[[domains.a.exemplars]]\nuser = "u"\ngood = "g"\nbad = "b"\nwhy = "w"\n'
        '[domains.b]\nsystem = "S2"\n'
    )

    def sha(text: str, name: str) -> str:
        return load_profile(str(_write(tmp_path / f"{name}.toml", text))).sha256

    ref = sha(base, "ref")
    assert len(ref) == 64
    assert sha(base, "again") == ref == load_profile(str(tmp_path / "ref.toml")).sha256  # stable
    # comments and the file's name do not matter; what the models read does
    assert sha("# a comment\n" + base, "commented") == ref
    assert sha(base.replace('"S2"', '"S2\\n"'), "ws") == ref  # the criteria are read stripped
    variants = {
        "system a": base.replace('"S1"', '"S1!"'),
        "system b": base.replace('"S2"', '"S2."'),
        "exemplar user": base.replace('user = "u"', 'user = "U"'),
        "exemplar good": base.replace('good = "g"', 'good = "G"'),
        "exemplar bad": base.replace('bad = "b"', 'bad = "B"'),
        "exemplar why": base.replace('why = "w"', 'why = "W"'),
        "extra exemplar": base + '[[domains.b.exemplars]]\nuser = "u"\ngood = "g"\nbad = "b"\n',
    }
    shas = {k: sha(v, k.replace(" ", "-")) for k, v in variants.items()}
    assert ref not in shas.values()
    assert len(set(shas.values())) == len(shas)
    assert (
        load_profile("cdr").sha256
        != load_profile("cdr-fewshot").sha256
        != load_profile("none").sha256
    )


# ---------------------------------------------------------------------------
# cdr profiles list | show
# ---------------------------------------------------------------------------


def _cdr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CDR, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        stdin=subprocess.DEVNULL,
    )


def test_cli_show_prints_profile_messages() -> None:
    r = _cdr("profiles", "show", "cdr", "--domain", "reasoning", "--prompt", "2+2?")
    assert r.returncode == 0, r.stderr
    expected = [
        m.to_dict()
        for m in profile_messages(load_profile("cdr"), "reasoning", [Message("user", "2+2?")])
    ]
    assert orjson.loads(r.stdout) == expected
    assert expected == [
        {"role": "system", "content": REASONING_CRITERIA},
        {"role": "user", "content": "2+2?"},
    ]
    bad = _cdr("profiles", "show", "cdr", "--domain", "poetry")
    assert bad.returncode == 2 and "poetry" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_list(_hermetic_home: Path) -> None:
    _write(_hermetic_home / "profiles" / "mine.toml", 'name = "mine"\n[domains.a]\nsystem = "A"\n')
    r = _cdr("profiles", "list")
    assert r.returncode == 0, r.stderr
    for n in ("cdr", "cdr-fewshot", "none", "mine"):
        assert n in r.stdout
