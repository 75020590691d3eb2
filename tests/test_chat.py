"""Chat templates (cdr_local.chat): built-ins, splitting, resolution, sandbox.  No models."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from cdr_local import chat
from cdr_local.chat import (
    BUILTIN_TEMPLATES,
    CHATML,
    GEMMA,
    LLAMA3,
    PLAIN,
    ZEPHYR,
    Message,
    TemplateError,
    TemplateSplit,
    render,
    resolve_template,
    split_template,
)
from cdr_local.errors import CdrError

SYS = Message("system", "Be nice.")
HI = Message("user", "Hi")
HELLO = Message("assistant", "Hello")
Q = Message("user", "Q?")

ONE = [HI]
WITH_SYSTEM = [SYS, HI]
MULTI = [SYS, HI, HELLO, Q]
CONVERSATIONS = {
    "one": ONE,
    "system": WITH_SYSTEM,
    "multi": MULTI,
    "no-system-multi": [HI, HELLO, Q],
}


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run fn in a thread; fail (instead of hanging the suite) if it takes too long."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"did not finish within {seconds}s"
    box["elapsed"] = time.monotonic() - start
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---------------------------------------------------------------------------
# Built-in templates: exact strings
# ---------------------------------------------------------------------------


def test_chatml_single_user() -> None:
    sp = split_template(CHATML, [Message("user", "{q}")])
    assert sp == TemplateSplit(
        prefix="<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
        suffix="<|im_end|>\n",
    )


def test_chatml_with_system() -> None:
    sp = split_template(CHATML, WITH_SYSTEM)
    assert sp.prefix == (
        "<|im_start|>system\nBe nice.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert sp.suffix == "<|im_end|>\n"


def test_chatml_multi_turn() -> None:
    sp = split_template(CHATML, MULTI)
    assert sp.prefix == (
        "<|im_start|>system\nBe nice.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert sp.suffix == "<|im_end|>\n"


def test_chatml_keeps_content_verbatim() -> None:
    sp = split_template(CHATML, [Message("user", "  padded\n")])
    assert sp.prefix == "<|im_start|>user\n  padded\n<|im_end|>\n<|im_start|>assistant\n"


def test_gemma_system_folded_into_first_user_turn() -> None:
    sp = split_template(GEMMA, MULTI, bos_token="<bos>", eos_token="<eos>")
    assert sp.prefix == (
        "<bos>"
        "<start_of_turn>user\nBe nice.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nQ?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert sp.suffix == "<end_of_turn>\n"
    assert "system" not in sp.prefix


def test_gemma_single_user_and_trim() -> None:
    sp = split_template(GEMMA, [Message("user", "  Hi \n")], bos_token="<bos>")
    assert sp.prefix == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert sp.suffix == "<end_of_turn>\n"


def test_llama3() -> None:
    sp = split_template(LLAMA3, MULTI, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert sp.prefix == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe nice.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert sp.suffix == "<|eot_id|>"


def test_llama3_trims_content_only() -> None:
    sp = split_template(LLAMA3, [Message("user", " \n Hi \n")], bos_token="<s>")
    assert sp.prefix == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_zephyr() -> None:
    sp = split_template(ZEPHYR, MULTI, eos_token="</s>")
    assert sp.prefix == (
        "<|system|>\nBe nice.</s>\n"
        "<|user|>\nHi</s>\n"
        "<|assistant|>\nHello</s>\n"
        "<|user|>\nQ?</s>\n"
        "<|assistant|>\n"
    )
    assert sp.suffix == "</s>\n"


def test_plain() -> None:
    sp = split_template(PLAIN, MULTI, eos_token="</s>")
    assert sp.prefix == "Be nice.\n\nUser: Hi\n\nAssistant: Hello</s>\n\nUser: Q?\n\nAssistant: "
    assert sp.suffix == "</s>\n\n"
    one = split_template(PLAIN, ONE, eos_token="<eos>")
    assert one == TemplateSplit(prefix="User: Hi\n\nAssistant: ", suffix="<eos>\n\n")


def test_builtin_names() -> None:
    assert BUILTIN_TEMPLATES == {
        "chatml": CHATML,
        "llama3": LLAMA3,
        "gemma": GEMMA,
        "zephyr": ZEPHYR,
        "plain": PLAIN,
    }


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_split_prefix_equals_generation_prompt(name: str, conv: str) -> None:
    tpl, msgs = BUILTIN_TEMPLATES[name], CONVERSATIONS[conv]
    kw = {"bos_token": "<BOS>", "eos_token": "<EOS>"}
    sp = split_template(tpl, msgs, **kw)
    assert sp.prefix == render(tpl, msgs, add_generation_prompt=True, **kw)
    # The prefix + an answer + the suffix is exactly the finished conversation.
    answer = "The answer."
    full = render(tpl, [*msgs, Message("assistant", answer)], add_generation_prompt=False, **kw)
    assert full == sp.prefix + answer + sp.suffix
    assert sp.suffix  # every built-in closes the turn with something scorable
    # A tuple of messages works like a list.
    assert split_template(tpl, tuple(msgs), **kw) == sp


def test_render_without_generation_prompt() -> None:
    assert render(CHATML, ONE, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_bos_and_eos_default_to_empty() -> None:
    assert render(LLAMA3, ONE, add_generation_prompt=False) == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    )
    assert split_template(ZEPHYR, ONE).suffix == "\n"


def test_response_with_whitespace_is_located_exactly() -> None:
    # Templates that trim content still place the (untrimmed) answer exactly once.
    for tpl in (LLAMA3, GEMMA):
        sp = split_template(tpl, ONE)
        assert sp.prefix.endswith("\n\n") or sp.prefix.endswith("model\n")


# ---------------------------------------------------------------------------
# Templates that do not place the answer exactly once
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        # drops assistant content
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}",
        # writes every message twice
        "{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}",
        # mangles the content
        "{% for m in messages %}{{ m['content'] | lower }}{% endfor %}",
        # ignores messages entirely
        "static text",
    ],
)
def test_split_requires_answer_verbatim_once(template: str) -> None:
    with pytest.raises(TemplateError, match="exactly once"):
        split_template(template, ONE)


# ---------------------------------------------------------------------------
# resolve_template
# ---------------------------------------------------------------------------


def test_resolve_prefers_gguf_template() -> None:
    assert resolve_template("{{ gguf }}", "chatml", "m") == "{{ gguf }}"
    assert resolve_template("{{ gguf }}", None, "m") == "{{ gguf }}"


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_resolve_builtin_fallback(name: str) -> None:
    assert resolve_template(None, name, "m") == BUILTIN_TEMPLATES[name]
    assert resolve_template("", name, "m") == BUILTIN_TEMPLATES[name]


def test_resolve_inline_jinja_fallback() -> None:
    inline = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    assert resolve_template(None, inline, "m") is inline
    assert split_template(inline, ONE) == TemplateSplit("[user]Hi[assistant]", "")


@pytest.mark.parametrize("gguf, fallback", [(None, None), ("", None), (None, ""), ("", "")])
def test_resolve_neither(gguf: str | None, fallback: str | None) -> None:
    with pytest.raises(TemplateError) as ei:
        resolve_template(gguf, fallback, "my-model")
    msg = str(ei.value)
    assert "chat_template" in msg and "'my-model'" in msg
    for name in BUILTIN_TEMPLATES:
        assert name in msg


def test_template_error_is_a_cdr_error() -> None:
    assert issubclass(TemplateError, CdrError)


# ---------------------------------------------------------------------------
# Real-world template features keep working in the sandbox
# ---------------------------------------------------------------------------

HF_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set sys = 'default' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if tools %}{{ raise_exception('no tools here') }}{%- endif %}"
    "{%- set ns = namespace(n=0) %}"
    "<sys>{{ sys }}</sys>"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set ns.n = ns.n + 1 %}"
    "{%- if loop.last and message['role'] == 'assistant' %}{% break %}{% endif %}"
    "<{{ message.role }} n={{ ns.n }}>{{ message.content | trim }}</{{ message.role }}>"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<assistant>{% endif %}"
)


def test_hf_style_template_features() -> None:
    out = render(HF_STYLE, MULTI, add_generation_prompt=True)
    assert out == (
        "<sys>Be nice.</sys><user n=1>Hi</user><assistant n=2>Hello</assistant><user n=3>Q?</user><assistant>"
    )
    out = render(HF_STYLE, [HI], add_generation_prompt=False)
    assert out == "<sys>default</sys><user n=1>Hi</user>"


def test_template_raise_exception() -> None:
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        render(HF_STYLE, [HI, Q], add_generation_prompt=True)


def test_strftime_now_is_fixed() -> None:
    assert (
        render("{{ strftime_now('%Y-%m-%d') }}", ONE, add_generation_prompt=False) == "2024-01-01"
    )


def test_undefined_variables_are_lenient() -> None:
    # Real templates test optional variables (tools, documents) that we never pass.
    tpl = "{% if tools %}T{% endif %}{% if documents is defined %}D{% endif %}{{ date_string }}ok"
    assert render(tpl, ONE, add_generation_prompt=False) == "ok"


def test_compile_is_cached() -> None:
    tpl = "{{ messages | length }} cached"
    assert render(tpl, ONE, add_generation_prompt=False) == "1 cached"
    assert chat._compile(tpl) is chat._compile(tpl)


# ---------------------------------------------------------------------------
# Sandbox: hostile templates fail cleanly, quickly, and leak nothing
# ---------------------------------------------------------------------------

HOSTILE = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].system('true') }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__code__.co_consts }}",
    "{{ self.__init__.__globals__ }}",
    "{{ open('/etc/passwd').read() }}",
    "{{ __import__('os').system('true') }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}",
    "{% set x = messages[0].update({'content': 'x'}) %}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(100001) %}{% endfor %}",
    "{{ 1 / 0 }}",
    "{{ messages[5] }}{{ messages[5].content.upper() }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% for %}",
    "{{ unclosed",
    "{% if x %}no endif",
    "{{ raise_exception('x') }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_templates_raise_template_error(template: str) -> None:
    def go() -> None:
        with pytest.raises(TemplateError) as ei:
            split_template(template, MULTI)
        msg = str(ei.value)
        assert msg and "\n" not in msg
        assert msg.startswith("chat template ")
        assert "Traceback" not in msg and "root:" not in msg and "uid=" not in msg

    within(10, go)


def test_single_unsafe_attribute_leaks_nothing() -> None:
    # Jinja turns one unsafe attribute into an (empty) undefined: harmless.
    for tpl in ("{{ ''.__class__ }}", "{{ messages[0]['__class__'] }}", "{{ cycler.__init__ }}"):
        try:
            out = render(tpl, ONE, add_generation_prompt=False)
        except TemplateError:
            continue
        assert out == ""


def test_raise_exception_message() -> None:
    with pytest.raises(TemplateError, match="x") as ei:
        render("{{ raise_exception('x') }}", ONE, add_generation_prompt=True)
    assert str(ei.value) == "chat template raised: x"


def test_syntax_error_message() -> None:
    with pytest.raises(TemplateError, match="does not parse") as ei:
        render("{% for %}", ONE, add_generation_prompt=True)
    assert "line 1" in str(ei.value)


def test_unsafe_operation_message() -> None:
    with pytest.raises(TemplateError, match="unsafe"):
        render("{{ cycler.__init__.__globals__ }}", ONE, add_generation_prompt=True)


def test_mutation_is_blocked_and_input_untouched() -> None:
    msgs = [Message("user", "Hi")]
    with pytest.raises(TemplateError):
        render("{{ messages.append(1) }}{{ messages.pop() }}", msgs, add_generation_prompt=True)
    assert msgs == [Message("user", "Hi")]


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{% for i in range(10) %}{{ f(n + 1) if n < 12 }}{% endfor %}{% endmacro %}{{ f(0) }}",
    ],
)
def test_runaway_loops_are_bounded(template: str) -> None:
    def go() -> None:
        with pytest.raises(TemplateError, match="too long"):
            render(template, ONE, add_generation_prompt=True)

    within(15, go)


def test_step_budget_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    tpl = "{% for i in range(5000) %}{% endfor %}done"
    assert render(tpl, ONE, add_generation_prompt=False) == "done"
    from cdr_local import sandbox

    monkeypatch.setattr(sandbox, "MAX_TEMPLATE_STEPS", 1000)
    with pytest.raises(TemplateError, match="too long"):
        render(tpl, ONE, add_generation_prompt=False)


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("{{ 10 ** (10 ** 10) }}", "power"),
        ("{% set n = 9 %}{{ n ** (n ** n) }}", "power"),
        ("{{ 'x' * 10 ** 10 }}", "string too large"),
        ("{{ [1, 2] * 10 ** 8 }}", "list or dict too large"),
        ("{{ 10 ** 8 * 'ab' }}", "string too large"),
    ],
)
def test_huge_values_are_refused(template: str, fragment: str) -> None:
    def go() -> None:
        with pytest.raises(TemplateError, match=fragment):
            render(template, ONE, add_generation_prompt=True)

    within(10, go)


def test_ordinary_arithmetic_still_works() -> None:
    tpl = "{{ 2 ** 10 }} {{ (2 ** 0.5) | round(3) }} {{ 2 ** -1 }} {{ 3 * 4 }} {{ 'ab' * 3 }} {{ [0] * 2 }} {{ 1.5 * 2 }} {{ 2 ** 64 }}"
    assert render(tpl, ONE, add_generation_prompt=False) == (
        "1024 1.414 0.5 12 ababab [0, 0] 3.0 18446744073709551616"
    )


def test_trace_function_is_restored() -> None:
    before = sys.gettrace()
    render(CHATML, ONE, add_generation_prompt=True)
    assert sys.gettrace() is before
    with pytest.raises(TemplateError):
        render("{{ raise_exception('x') }}", ONE, add_generation_prompt=True)
    assert sys.gettrace() is before

    calls: list[str] = []

    def tracer(frame: Any, event: str, arg: Any) -> None:
        calls.append(event)

    sys.settrace(tracer)
    try:
        render(CHATML, ONE, add_generation_prompt=True)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(before)


def test_render_in_threads() -> None:
    # The step budget is per thread/per render: concurrent renders are independent.
    results: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(50):
                results.append(split_template(CHATML, MULTI).prefix)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(results) == 200 and len(set(results)) == 1
