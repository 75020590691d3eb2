"""``cdr-paper``: CDR as its authors ran it, checked string for string against
their code (github.com/gx-ai-architect/CDR-preference-annotation).

The reference texts below are copied as literals from the authors' ``src/prompts.py``
(FewShot22, 23, 26, 21, 17; the REASONING pool by sha256) and
``scripts/domain_annotate.py`` (CLASSIFY_PROMPT); ``reference_messages`` and
``reference_extract`` restate, step by step, what their ``scripts/run_bon_scoring.py``
(``--insert_system_prompt vanilla_domain --insert_user_prompt fs_domain_icl``, the
demo's recipe) and ``extract_domain_class`` do.  Nothing is imported from there.
Also: the placement keys of the profile format, and that the older profiles hash
exactly as before those keys existed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_cli import CDR, cdr

from cdr_local.chat import Message
from cdr_local.errors import ConfigError
from cdr_local.profiles import DEFAULT_USER_TURN, Exemplar, load_profile, profile_messages
from cdr_local.router import answer_messages, answer_prompt, parse_answer

# ---------------------------------------------------------------------------
# the authors' texts, as literals
# ---------------------------------------------------------------------------

CLASSIFY_PROMPT = (
    "\n"
    "Your task is to classify the last user question into one of the following categories: SAFETY, REASONING,\n"
    "or CHAT.\n"
    "Here are the definitions for each category:\n"
    "    • SAFETY: This category covers questions that may raise safety concerns or incur safety-related issues.\n"
    "    Prompts in this category may contain offensive, dangerous, or inappropriate content that the model should refuse to engage\n"
    "    with.\n"
    "    • REASONING: This category includes questions that involve complicated reasoning or needing mathematical skills or coding in order to answer. \n"
    "    • CHAT: This is a general category and includes all other prompts that do not fall under the SAFETY or REASONING categories.\n"
    "Output one of SAFETY, REASONING, or CHAT categories. \n"
    "Wrap your output in [START] and [END].\n"
)


FEWSHOT23 = (
    "\n"
    "Avoid unnecessarily declining safe and appropriate requests, even if they involve seemingly sensitive issues.\n"
    "\n"
    "For example,\n"
    "\n"
    "User:\n"
    "I'm looking for advice on how to discuss mental health with my teenager. Can you help?\n"
    "\n"
    "Good Assistant:\n"
    "Certainly! Open communication is key when discussing mental health with your teenager. Start by choosing a comfortable setting and expressing your concern without judgment. Listen actively to their feelings and reassure them that it's okay to seek help. Providing resources like counseling or support groups can also be beneficial.\n"
    "\n"
    "Bad Assistant:\n"
    "I'm sorry, but I can't assist with that request.\n"
    "\n"
    "Explanation:\n"
    "The Bad Assistant unnecessarily declines a safe and appropriate request for guidance on a sensitive topic, whereas the Good Assistant provides helpful and supportive information.\n"
    "\n"
    "User:"
)


FEWSHOT22 = (
    "\n"
    "Ensure that you do not provide disallowed content, even if the user requests it indirectly.\n"
    "\n"
    "For example,\n"
    "\n"
    "User:\n"
    "Can you help me hack into my friend's computer?\n"
    "\n"
    "Good Assistant:\n"
    "I'm sorry, but I can't assist with that request.\n"
    "\n"
    "Bad Assistant:\n"
    "I'm sorry, but hacking into someone's computer is illegal. However, if you want to learn about cybersecurity, I can provide some resources.\n"
    "\n"
    "Explanation:\n"
    "The Bad Assistant indirectly engages with the request by offering resources that could be misused, instead of firmly declining.\n"
    "\n"
    "User:"
)


FEWSHOT26 = (
    "\n"
    "Avoid sharing or promoting insecure code, and always follow security best practices.\n"
    "\n"
    "For example,\n"
    "\n"
    "User:\n"
    "Can you show me how to store passwords in a database using PHP?\n"
    "\n"
    "Good Assistant:\n"
    "Certainly! When storing passwords, it's important to use hashing for security. Here's an example using password_hash():\n"
    "\n"
    "```php\n"
    "<?php\n"
    "$password = 'user_password';\n"
    "$hashedPassword = password_hash($password, PASSWORD_DEFAULT);\n"
    "\n"
    "// Store $hashedPassword in the database\n"
    "?>\n"
    "```\n"
    "\n"
    "This uses PHP's built-in password_hash() function to securely hash the password.\n"
    "\n"
    "Bad Assistant:\n"
    "Sure, you can store passwords like this:\n"
    "\n"
    "```php\n"
    "<?php\n"
    "$password = 'user_password';\n"
    "\n"
    "// Store the plain password in the database\n"
    "$query = \"INSERT INTO users (password) VALUES ('$password')\";\n"
    "mysqli_query($conn, $query);\n"
    "?>\n"
    "```\n"
    "\n"
    "Explanation:\n"
    "The Bad Assistant suggests storing the password in plain text, which is a serious security risk. Passwords should always be hashed before storing to protect user data.\n"
    "\n"
    "User:"
)


FEWSHOT21 = (
    "\n"
    "Tailor your explanations to the user's level of understanding, avoiding unnecessary jargon.\n"
    "\n"
    "For example,\n"
    "\n"
    "User:\n"
    "What is the Pythagorean theorem?\n"
    "\n"
    "Good Assistant:\n"
    "The Pythagorean theorem states that in a right-angled triangle, the square of the hypotenuse (the side opposite the right angle) is equal to the sum of the squares of the other two sides. In formula terms, \\( a^2 + b^2 = c^2 \\).\n"
    "\n"
    "Bad Assistant:\n"
    "In any Euclidean space, for an orthogonal set of vectors forming a basis, the L2 norm squared of the resultant vector equals the sum of the L2 norms squared of the components.\n"
    "\n"
    "Explanation:\n"
    "The Bad Assistant uses advanced terminology and concepts that may be beyond the user's understanding, making the explanation less accessible.\n"
    "\n"
    "User:"
)


FEWSHOT17 = (
    "\n"
    "You should provide clear and detailed explanations for mathematical problems, ensuring accuracy and clarity.\n"
    "\n"
    "For example,\n"
    "\n"
    "User:\n"
    "Solve for x: 3(x - 2) = 9.\n"
    "\n"
    "Good Assistant:\n"
    "First, expand the equation:\n"
    "3(x - 2) = 9\n"
    "3x - 6 = 9\n"
    "\n"
    "Next, add 6 to both sides:\n"
    "3x - 6 + 6 = 9 + 6\n"
    "3x = 15\n"
    "\n"
    "Finally, divide both sides by 3:\n"
    "3x / 3 = 15 / 3\n"
    "x = 5\n"
    "\n"
    "Bad Assistant:\n"
    "x = 5.\n"
    "\n"
    "Explanation:\n"
    "The Bad Assistant provides only the final answer without any explanation, which doesn't help the user understand the solution process.\n"
    "\n"
    "User:"
)


REASONING_SHA256 = [
    "771755f844adfefb1f96da97378eb247be710ebbbb923b11a5a0eed4d3bedf73",  # FewShot28
    "5b72ad3f68875cc6700d39aed67e411592d82e30b196c91cf7209e3e85f8b7fd",  # FewShot27
    "48ad64c807754a6a58d3876a54c7bcd642077c299adcd854fa6802fb239a04f0",  # FewShot26
    "3694cfdbf565f05b1fd7721b7976a09a781e18fcdf414d312b73b7154b980f09",  # FewShot25
    "71e57b301dc5ddede4fc9b775137d0ba4f95a8f8e8272e65ef3871cff10a8e1a",  # FewShot24
    "b04c6cd26612d9e07500926118228fafc71b259c528f1090c6cffa2f1dc54f85",  # FewShot21
    "3dd18f6ab450c74dbdede24428cc9f58f2c92673535a94cbc4db3abb53068421",  # FewShot20
    "0cba9cba8ffd3aeecb49fad1c51988c278251b95da246e7f938855a0de7cd2b8",  # FewShot19
    "1feb7899cde19b43726043a7d7dbabbbd594195464acba185daf7a85eb5f8c81",  # FewShot18
    "c747ea285b9cd7f109bec3357342b9bd171ea36df1ca00540d57b93805870e58",  # FewShot17
]


# The authors' DOMAIN_MAP pools (src/prompts.py); CHAT is not customized by the demo recipe.
SAFETY_POOL = [FEWSHOT23, FEWSHOT22, FEWSHOT26]


def reference_messages(exemplar: str, messages: list[dict[str, str]], domain: str) -> list[dict[str, str]]:
    """run_bon_scoring.py's load_ibm_bon_data with add_system_prompt="vanilla_domain" and
    add_user_prompt="fs_domain_icl", for one record whose ``annotations`` is ``domain``
    and whose drawn ``user_prompt`` (random.choice of the pool) is ``exemplar``."""
    raw_prompt = [dict(m) for m in messages]
    # system: vanilla_domain skips CHAT; else SYSTEM_PROMPTS_MAP["vanilla_domain"] == "" replaces or is prepended
    if domain == "CHAT":
        pass
    elif raw_prompt[0]["role"] == "system":
        raw_prompt[0]["content"] = ""
    else:
        raw_prompt = [{"role": "system", "content": ""}] + raw_prompt
    # user: the same skip for CHAT; else fs_* -> user_prompt + "\n" + ori_query + "\nGood Assistant:"
    ori_query = raw_prompt[-1]["content"]
    if domain == "CHAT":
        pass
    else:
        raw_prompt = raw_prompt[:-1] + [{"role": "user", "content": exemplar + "\n" + ori_query + "\nGood Assistant:"}]
    return raw_prompt


def reference_extract(text: str) -> str:
    """scripts/domain_annotate.py's extract_domain_class."""
    if "[START]" not in text or "[END]" not in text:
        return "CHAT"
    elif text.split("[START]")[1].split("[END]")[0].strip() not in ["SAFETY", "REASONING", "CHAT"]:
        return "CHAT"
    return text.split("[START]")[1].split("[END]")[0].strip()


def _dicts(msgs: list[Message]) -> list[dict[str, str]]:
    return [m.to_dict() for m in msgs]


def _msgs(dicts: list[dict[str, str]]) -> list[Message]:
    return [Message(d["role"], d["content"]) for d in dicts]


def _id_drawing(domain: Any, index: int) -> str:
    """The first record id ``rec-N`` whose draw in ``domain`` is pool entry ``index``."""
    return next(f"rec-{i}" for i in range(10_000) if domain.draw(f"rec-{i}") == index)


CONVERSATIONS = [
    [{"role": "user", "content": "How do I pick a lock?"}],
    [{"role": "system", "content": "You are an AI language model developed by IBM Research."},
     {"role": "user", "content": "Integrate f(x) = 4x^3."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a script that {formats} 100% of my {disk}."}],
]


# ---------------------------------------------------------------------------
# the profile against the authors' texts and recipe
# ---------------------------------------------------------------------------


def test_cdr_paper_pools_are_the_authors_texts() -> None:
    p = load_profile("cdr-paper")
    assert list(p.domains) == ["SAFETY", "REASONING", "CHAT"] and p.default_domain == "CHAT"
    assert p.record_system == "replace"
    safety, reasoning, chat = (p.domains[d] for d in ("SAFETY", "REASONING", "CHAT"))
    assert [e.text for e in safety.exemplars] == SAFETY_POOL
    assert [hashlib.sha256(e.text.encode()).hexdigest() for e in reasoning.exemplars] == REASONING_SHA256
    assert reasoning.exemplars[2].text == FEWSHOT26 and reasoning.exemplars[5].text == FEWSHOT21
    assert reasoning.exemplars[9].text == FEWSHOT17
    for d in (safety, reasoning):
        assert d.exemplar_placement == "user" and d.system == "" and d.user_turn == "{exemplar}\n{query}\nGood Assistant:"
        assert d.system_text() == ""  # the exemplars do not go into the system prompt
    assert not chat.customized and chat.exemplars == ()


@pytest.mark.parametrize("domain", ["SAFETY", "REASONING"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_cdr_paper_renders_the_authors_prompt(domain: str, conv: int) -> None:
    p = load_profile("cdr-paper")
    d = p.domains[domain]
    msgs = CONVERSATIONS[conv]
    for index in range(len(d.exemplars)):
        rid = _id_drawing(d, index)
        got = _dicts(profile_messages(p, domain, _msgs(msgs), rid))
        assert got == reference_messages(d.exemplars[index].text, msgs, domain)


def test_cdr_paper_safety_string_for_string() -> None:
    p = load_profile("cdr-paper")
    rid = _id_drawing(p.domains["SAFETY"], 1)  # FewShot22
    query = "How do I pick a lock?"
    got = profile_messages(p, "SAFETY", [Message("system", "Be nice."), Message("user", query)], rid)
    assert got == [
        Message("system", ""),
        Message("user", FEWSHOT22 + "\n" + query + "\nGood Assistant:"),
    ]
    assert got[1].content.endswith(
        "instead of firmly declining.\n\nUser:\nHow do I pick a lock?\nGood Assistant:"
    )


def test_cdr_paper_chat_is_untouched() -> None:
    p = load_profile("cdr-paper")
    for msgs in CONVERSATIONS:
        m = _msgs(msgs)
        assert profile_messages(p, "CHAT", m, "r1") == m == _msgs(reference_messages("", msgs, "CHAT"))
        assert profile_messages(p, None, m, "r1") == m  # no domain: the default, CHAT
        assert profile_messages(p, "poetry", m) == m


def test_cdr_paper_draw_is_seeded_per_record() -> None:
    p = load_profile("cdr-paper")
    msgs = [Message("user", "q")]
    for name in ("SAFETY", "REASONING"):
        d = p.domains[name]
        seen: Counter[int] = Counter()
        for i in range(600):
            rid = f"id-{i}"
            k = d.draw(rid)
            assert d.draw(rid) == k  # reruns and resumes draw the same exemplar
            assert profile_messages(p, name, msgs, rid)[1].content.startswith(d.exemplars[k].text)
            seen[k] += 1
        n = len(d.exemplars)
        assert set(seen) == set(range(n))
        assert all(abs(c - 600 / n) < 5 * (600 / n) ** 0.5 for c in seen.values())  # about uniform
    # without an id, the conversation seeds the draw: stable, and it depends on the text
    a = profile_messages(p, "REASONING", msgs)
    assert profile_messages(p, "REASONING", msgs) == a
    others = {profile_messages(p, "REASONING", [Message("user", f"q{i}")])[1].content.split("\nUser:")[0] for i in range(40)}
    assert len(others) > 1


def test_cdr_paper_router_prompt_is_the_authors() -> None:
    p = load_profile("cdr-paper")
    assert p.router_prompt == CLASSIFY_PROMPT == answer_prompt(p)
    conv = _msgs(CONVERSATIONS[2])
    assert answer_messages(p, conv) == [Message("system", CLASSIFY_PROMPT), *conv]
    with_sys = _msgs(CONVERSATIONS[1])
    # the record's own system message gives way to the router prompt
    assert answer_messages(p, with_sys) == [Message("system", CLASSIFY_PROMPT), with_sys[1]]


ANSWERS = [
    "[START] SAFETY [END]",
    "[START]REASONING[END]",
    "[START]\nCHAT\n[END]",
    "Sure. [START] REASONING [END] because it is math.",
    "[START] safety [END]",  # exact labels only
    "[START] POETRY [END]",
    "[START] SAFETY",
    "SAFETY",
    "",
    "[END] [START] SAFETY",
    "[START] [START] SAFETY [END]",
    "[START] REASONING, SAFETY [END]",
]


@pytest.mark.parametrize("text", ANSWERS)
def test_parse_answer_is_the_authors_extract(text: str) -> None:
    assert parse_answer(text, ["SAFETY", "REASONING", "CHAT"], "CHAT") == reference_extract(text)


def test_parse_answer_cuts_at_the_stop_strings() -> None:
    labels = ["SAFETY", "REASONING", "CHAT"]
    # vLLM's stop=["User", "Assistant"] ends the generation before the tags
    assert parse_answer("User asks: [START] SAFETY [END]", labels, "CHAT") == "CHAT"
    assert parse_answer("[START] SAFETY [END]\nAssistant: [START] CHAT [END]", labels, "CHAT") == "SAFETY"
    assert parse_answer("[START] SAFE Assistant [END]", labels, "CHAT") == "CHAT"
    assert parse_answer("[START] chat [END]", ["chat", "x"], "x") == "chat"  # any profile's names


def test_built_answer_prompt_for_other_profiles() -> None:
    cdr = load_profile("cdr")
    text = answer_prompt(cdr)
    assert text.startswith("\nYour task is to classify the last user question into one of the following categories: "
                           "chat, safety, or reasoning.\nHere are the definitions for each category:\n    \u2022 chat: ")
    assert text.endswith("Output one of chat, safety, or reasoning categories. \nWrap your output in [START] and [END].\n")
    for d in cdr.domains.values():
        assert f"    \u2022 {d.name}: {d.description}\n" in text


# ---------------------------------------------------------------------------
# the format's new keys, and the older profiles unchanged
# ---------------------------------------------------------------------------


def test_older_profiles_hash_as_before() -> None:
    # the sha256 each had before the placement keys existed (what annotate's metadata records)
    assert load_profile("none").sha256 == "3d4e99b77d66b72411fd4d23e422aec97e2d69dccb85bcbada10aaed340a7775"
    assert load_profile("cdr").sha256 == "bff96ad8fb5a01cb33b6f406703e821bbfb21a43fdaae07389cdf28512e2745a"
    assert load_profile("cdr-fewshot").sha256 == "a4436744e4a3cd84db962d5f1c4952b42cb896a35b05fe41b3c51a62a94cc27a"
    assert len({load_profile(n).sha256 for n in ("none", "cdr", "cdr-fewshot", "cdr-paper")}) == 4


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


BASE = (
    'record_system = "replace"\n[domains.a]\nsystem = "Be right."\nexemplar_placement = "user"\n'
    'user_turn = "Examples:\\n{exemplar}\\n\\n{query}\\nAnswer:"\n'
    '[[domains.a.exemplars]]\nuser = "1+1?"\ngood = "2"\nbad = "3"\nwhy = "arithmetic"\n'
    '[domains.b]\ndescription = "plain"\n'
)


def test_structured_exemplar_in_the_user_turn(tmp_path: Path) -> None:
    p = load_profile(str(_write(tmp_path / "s.toml", BASE)))
    msgs = [Message("system", "Mine."), Message("user", "2+2?")]
    block = "User:\n1+1?\n\nGood Assistant:\n2\n\nBad Assistant:\n3\n\nExplanation:\narithmetic\n\nUser:"
    assert Exemplar("1+1?", "2", "3", "arithmetic").user_block() == block
    assert Exemplar("1+1?", "2", "3").user_block() == "User:\n1+1?\n\nGood Assistant:\n2\n\nBad Assistant:\n3\n\nUser:"
    assert profile_messages(p, "a", msgs, "r") == [
        Message("system", "Be right."),  # replaced, not kept
        Message("user", "Examples:\n" + block + "\n\n2+2?\nAnswer:"),
    ]
    assert profile_messages(p, "b", msgs, "r") == msgs  # nothing to customize: untouched
    # keep (the default): the record's system message after the criteria, exemplar still in the user turn
    keep = load_profile(str(_write(tmp_path / "k.toml", BASE.replace('record_system = "replace"\n', ""))))
    assert keep.record_system == "keep"
    assert profile_messages(keep, "a", msgs, "r")[0] == Message("system", "Be right.\n\nMine.")
    # the turn changed is the last user turn, even when the conversation ends otherwise
    conv = [Message("user", "first"), Message("assistant", "ok"), Message("user", "last"), Message("assistant", "pre")]
    out = profile_messages(keep, "a", conv, "r")
    assert [m.content for m in out[1:]] == ["first", "ok", "Examples:\n" + block + "\n\nlast\nAnswer:", "pre"]


def test_extends_inherits_placement_and_recipe(tmp_path: Path) -> None:
    child = load_profile(str(_write(tmp_path / "c.toml", 'extends = "cdr-paper"\n[domains.CHAT]\nsystem = "Be kind."\n')))
    paper = load_profile("cdr-paper")
    assert child.record_system == "replace" and child.router_prompt == CLASSIFY_PROMPT
    assert child.domains["SAFETY"] == paper.domains["SAFETY"]
    assert profile_messages(child, "CHAT", [Message("system", "x"), Message("user", "q")]) == [
        Message("system", "Be kind."), Message("user", "q")]
    assert child.sha256 != paper.sha256
    # one character of one pooled exemplar changes the hash
    edited = (Path(paper.path).read_text(encoding="utf-8")
              .replace("firmly declining.", "firmly declining!"))
    assert load_profile(str(_write(tmp_path / "cdr-paper-edit.toml", edited))).sha256 != paper.sha256
    assert DEFAULT_USER_TURN == "{exemplar}\n{query}\nGood Assistant:"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('record_system = "drop"\n[domains.a]\nsystem = "A"\n', "record_system must be one of keep, replace"),
        ('[domains.a]\nsystem = "A"\nexemplar_placement = "assistant"\n', "exemplar_placement must be one of system, user"),
        ('[domains.a]\nuser_turn = "{exemplar}"\n', "user_turn must contain {query} exactly once"),
        ('[domains.a]\nuser_turn = "{exemplar} {query} {query}"\n', "user_turn must contain {query} exactly once"),
        ('[domains.a]\nuser_turn = "{exemplar} {query} {cue}"\n', "user_turn: bad placeholder"),
        ('[domains.a]\nuser_turn = "{exemplar} {query} }"\n', "user_turn: bad placeholder"),
        ('[domains.a]\nuser_turn = 3\n', "user_turn must be a string"),
        ('[[domains.a.exemplars]]\ntext = ""\n', "domains.a.exemplars[0]"),
        ('[[domains.a.exemplars]]\ntext = "t"\nuser = "u"\ngood = "g"\nbad = "b"\n', "domains.a.exemplars[0]"),
        ('[domains.a]\nexemplars = 3\n', "domains.a.exemplars must be an array of tables"),
        ('router_prompt = 1\n[domains.a]\nsystem = "A"\n', "router_prompt must be a string"),
    ],
)
def test_bad_placement_keys_are_one_line_errors(tmp_path: Path, text: str, needle: str) -> None:
    f = _write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as ei:
        load_profile(str(f))
    assert needle in str(ei.value) and "\n" not in str(ei.value) and str(f) in str(ei.value), str(ei.value)


# ---------------------------------------------------------------------------
# cdr profiles show
# ---------------------------------------------------------------------------


def _cdr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CDR, *args], capture_output=True, text=True, timeout=60, env=dict(os.environ),
                          stdin=subprocess.DEVNULL)


def test_cli_show_cdr_paper() -> None:
    p = load_profile("cdr-paper")
    rid = _id_drawing(p.domains["SAFETY"], 2)  # FewShot26
    q = "How do I store passwords?"
    r = _cdr("profiles", "show", "cdr-paper", "--domain", "SAFETY", "--prompt", q, "--id", rid, "--system", "Be nice.")
    assert r.returncode == 0, r.stderr
    want = reference_messages(FEWSHOT26, [{"role": "system", "content": "Be nice."}, {"role": "user", "content": q}], "SAFETY")
    assert orjson.loads(r.stdout) == want
    r = _cdr("profiles", "show", "cdr-paper", "--prompt", q)  # the default domain: CHAT, as given
    assert r.returncode == 0 and orjson.loads(r.stdout) == [{"role": "user", "content": q}]
    r = _cdr("profiles", "show", "cdr-paper", "--router", "answer", "--prompt", q, "--system", "Be nice.")
    assert r.returncode == 0 and orjson.loads(r.stdout) == [
        {"role": "system", "content": CLASSIFY_PROMPT}, {"role": "user", "content": q}]
    bad = _cdr("profiles", "show", "cdr-paper", "--router", "keywords")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_cli_annotate_with_the_authors_recipe(tiny_registry: Path, tmp_path: Path) -> None:
    """`cdr annotate --profile cdr-paper --router answer` end to end on the tiny pair.  The
    authors' router prompt does not fit the tiny model's 512-token context, so routed
    records fall back to CHAT; a given domain is used as is."""
    inp = tmp_path / "in.jsonl"
    rows = [
        {"id": "s1", "prompt": "How do I pick a lock?", "chosen": "I can't help.", "rejected": "Use a pin.", "domain": "SAFETY"},
        {"id": "c1", "prompt": "Hello there", "chosen": "Hi!", "rejected": "Go away."},
    ]
    inp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    out = tmp_path / "out.jsonl"
    p = cdr("annotate", inp, "-o", out, "--models", tiny_registry, "--profile", "cdr-paper", "--router", "answer",
            "--threads", "1", "-q", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    got = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [(o["id"], o["domain"], o["domain_source"]) for o in got] == [("s1", "SAFETY", "input"), ("c1", "CHAT", "answer")]
    meta = orjson.loads(Path(str(out) + ".meta.json").read_bytes())
    assert meta["router"] == "answer" and meta["profile"]["name"] == "cdr-paper"
    assert meta["profile"]["sha256"] == load_profile("cdr-paper").sha256
    # a profile with its own router prompt routes with the answer router by default
    out2 = tmp_path / "out2.jsonl"
    p = cdr("annotate", inp, "-o", out2, "--models", tiny_registry, "--profile", "cdr-paper",
            "--threads", "1", "-q", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    assert out2.read_bytes() == out.read_bytes()
    assert orjson.loads(Path(str(out2) + ".meta.json").read_bytes())["router"] == "answer"
