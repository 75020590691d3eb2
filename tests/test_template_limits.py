"""Sandbox limits of cdr_local.chat: hostile chat templates fail fast, small, on one line.

Each escape a reviewer found (or that the same idea leads to) gets a test that the
render raises TemplateError within a few seconds and without a big allocation
(Python's peak traced memory); legitimate uses below the limits must still
render, identically to plain Jinja.  No models, no mocks.
"""

from __future__ import annotations

import datetime
import threading
import time
import tracemalloc
from typing import Any

import pytest

from cdr_local import chat, sandbox
from cdr_local.chat import (
    BUILTIN_TEMPLATES,
    MAX_TEMPLATE_OUTPUT,
    MAX_TEMPLATE_STRING,
    Message,
    TemplateError,
    render,
    split_template,
)

ONE = [Message("user", "Hi")]
MULTI = [
    Message("system", "Be nice."),
    Message("user", "Hi"),
    Message("assistant", "<think>\nhm\n</think>\n\nHello"),
    Message("user", "Q?"),
]

SECONDS = 5.0  # every refusal must come this fast, on any machine
PEAK_BYTES = 100 * 2**20  # and allocate less than this (the escapes would take gigabytes)
BIG = "{% set s = 'x' * 1000000 %}"  # a string at MAX_TEMPLATE_STRING


def _render_watched(template: str, messages: list[Message], **kw: str) -> tuple[dict[str, Any], float, int]:
    """Render in a thread (a hang fails the test instead of the suite); return the
    outcome, the seconds it took and the peak of Python's traced memory."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = render(template, messages, add_generation_prompt=True, **kw)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.monotonic()
    try:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(4 * SECONDS)
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not was_tracing:
            tracemalloc.stop()
    assert not thread.is_alive(), f"render still running after {4 * SECONDS} s"
    return box, elapsed, peak


def refused(template: str, match: str, messages: list[Message] = ONE) -> str:
    """Assert the render fails with a one-line TemplateError matching ``match``,
    within SECONDS and PEAK_BYTES; return its message."""
    box, elapsed, peak = _render_watched(template, messages)
    assert "out" not in box, f"rendered {len(box['out'])} chars instead of failing"
    error = box["error"]
    assert isinstance(error, TemplateError), repr(error)
    message = str(error)
    assert message.startswith("chat template ") and "\n" not in message, message
    assert len(message) < 400, message
    assert match in message, message
    assert elapsed < SECONDS, f"took {elapsed:.1f} s: {message}"
    assert peak < PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB: {message}"
    return message


def reference(template: str, messages: list[Message], **kw: Any) -> str:
    """Plain Jinja (its own immutable sandbox, no limits) with the same options."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["strftime_now"] = lambda fmt: datetime.datetime(2024, 1, 1).strftime(fmt)
    return env.from_string(template).render(messages=[m.to_dict() for m in messages], **kw)


# ---------------------------------------------------------------------------
# Format specs and printf
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ '{:>800000000}'.format('x') }}",
        "{{ '{:>{w}}'.format('x', w=800000000) }}",  # nested width
        "{{ '{0:{1}}'.format('x', 800000000) }}",
        "{{ '{x:>800000000}'.format_map({'x': 'y'}) }}",
        "{{ '{:.800000000f}'.format(1.5) }}",  # precision
        "{{ '{:>0000000000000000000000000800000000}'.format(1) }}",
        "{{ ('{:>800000000}'|attr('format'))('x') }}",
        "{{ '{:>800000000}'['format']('x') }}",
        "{{ ('{:>800000000}'|safe).format('x') }}",  # Markup's escaping formatter
    ],
)
def test_format_spec_width_is_refused(template: str) -> None:
    refused(template, "width too large")


def test_format_total_is_refused() -> None:
    # Each field is under the width limit; a thousand of them are not.
    refused("{{ ('{:>9999}' * 1000).format(*range(1000)) }}", "string too large")
    refused(BIG + "{{ '{!r}{!r}'.format(s, s) }}", "string too large")


@pytest.mark.parametrize(
    "template",
    [
        "{{ '%0500000000d' % 1 }}",
        "{{ '%-500000000s' % 'x' }}",
        "{{ '%*d' % (500000000, 1) }}",
        "{{ '%.500000000f' % 1.0 }}",
        "{{ '%.*f' % (500000000, 1.0) }}",
        "{{ '%(a)0500000000d' % {'a': 1} }}",
        "{{ ('%s'|safe) ~ ('%0500000000d'|safe % 1) }}",
        "{{ 'x'.encode() ~ ('%0500000000d'.encode() % 1) }}",
    ],
)
def test_printf_width_is_refused(template: str) -> None:
    refused(template, "width too large")


def test_printf_total_is_refused() -> None:
    refused("{{ ('%9999s' * 1000) % ((1,) * 1000) }}", "string too large")
    refused(BIG + "{{ '%s%s' % (s, s) }}", "string too large")


def test_format_filter_is_refused() -> None:
    refused("{{ '%0500000000d'|format(1) }}", "width too large")
    refused("{{ '%(a)0500000000d'|format(a=1) }}", "width too large")
    refused(BIG + "{{ '%s%s'|format(s, s) }}", "string too large")


# ---------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------


def test_center_filter_is_refused() -> None:
    refused("{{ 'x'|center(800000000) }}", "width too large")
    refused("{{ 12|center(800000000) }}", "width too large")
    refused("{% filter center(800000000) %}x{% endfilter %}", "width too large")
    refused("{{ ['x']|map('center', 800000000)|list }}", "width too large")


def test_indent_filter_is_refused() -> None:
    refused("{{ 'x\ny'|indent(800000000) }}", "indent too large")
    refused("{{ ('\n' * 900000)|indent(200) }}", "string too large")  # a many-line string
    refused("{{ ('\u2028' * 900000)|indent(200, blank=true) }}", "string too large")
    refused("{{ ('\n' * 1000)|indent('x' * 10000, first=true) }}", "string too large")


def test_wordwrap_filter_is_refused() -> None:
    # textwrap copies the rest of a long word for every line it breaks off: quadratic.
    refused("{{ ('x' * 1000000)|wordwrap(1) }}", "too many lines")
    refused("{{ ('x' * 200000)|wordwrap(50) }}", "words too long")
    refused("{{ ('a ' * 1000)|wordwrap(1, wrapstring='y' * 100000) }}", "string too large")


def test_truncate_filter_cannot_grow() -> None:
    # truncate returns at most its input plus `end`: a huge length is harmless.
    out = render("{{ ('x' * 1000)|truncate(800000000) }}", ONE, add_generation_prompt=False)
    assert out == "x" * 1000
    out = render("{{ ('ab ' * 10)|truncate(9, end='~') }}", ONE, add_generation_prompt=False)
    assert out == "ab ab~"


def test_join_filter_is_refused() -> None:
    refused("{{ range(100000)|join('y' * 100000) }}", "string too large")  # separator x count
    refused(BIG + "{{ [s, s]|join }}", "string too large")  # big items
    refused(BIG + "{{ [{'a': s}, {'a': s}]|join(attribute='a') }}", "string too large")
    refused(BIG + "{{ (s, s)|map('upper')|join }}", "string too large")  # an iterator


def test_replace_filter_is_refused() -> None:
    refused("{{ ('x' * 100000)|replace('x', 'y' * 100000) }}", "string too large")
    refused("{{ ('x' * 1000)|replace('', 'y' * 10000) }}", "string too large")
    refused("{{ ('x' * 1000)|replace('x', 'y' * 10000, 500) }}", "string too large")


def test_batch_filter_is_refused() -> None:
    refused("{{ [1]|batch(100000000)|list }}", "batch size too large")
    refused(BIG + "{{ [1]|batch(9000, s)|list }}", "list or dict too large")  # fill_with


def test_slice_filter_is_refused() -> None:
    # A huge count loops in Python, outside any template step.
    refused("{{ [1]|slice(100000000)|list }}", "slice count too large")
    refused(BIG + "{{ [1]|slice(9000, s)|list }}", "list or dict too large")


def test_round_filter_is_refused() -> None:
    refused("{{ 12345|round(-100000000) }}", "precision too large")  # computes 10 ** k
    refused("{{ 1.5|round(100000000, 'floor') }}", "precision too large")


def test_sum_filter_is_refused() -> None:
    # sum() of lists copies the running total for every item: quadratic.
    refused("{{ ([[1]] * 100000)|sum(start=[]) }}", "other than numbers")


def test_int_filter_is_refused() -> None:
    refused("{{ ('f' * 100000)|int(base=16) }}", "number too large")
    refused("{{ ('1' * 200000)|int }}", "number too large")


def test_tojson_filter_is_refused() -> None:
    refused("{{ [[[[1]]]]|tojson(indent=800000000) }}", "indent too large")
    refused(BIG + "{{ [s, s]|tojson }}", "too large")
    # Indenting repeats the depth's indentation on every line.
    deep = "{% set ns = namespace(l=[]) %}{% for i in range(90) %}{% set ns.l = [ns.l] %}{% endfor %}"
    refused(deep + "{{ ([ns.l] * 1000)|tojson(indent=100) }}", "too large")


def test_pprint_filter_is_refused() -> None:
    refused("{{ (['x' * 1000] * 2000)|pprint }}", "too large")


def test_text_filters_are_refused() -> None:
    refused("{{ ('&' * 1000000)|e }}", "string too large")  # escaping grows 5x
    refused("{{ ('a ' * 500000)|title }}", "too large")  # a Python loop per word
    refused("{{ ('a.b ' * 100000)|urlize }}", "too large")
    refused("{{ ('a.b ' * 1000)|urlize(target='x' * 100000) }}", "string too large")
    refused(BIG + "{{ ([s] * 3)|string }}", "too large")  # text from a big value
    refused(BIG + "{{ [s] * 3 }}", "too large")  # the same, output directly


# ---------------------------------------------------------------------------
# str, bytes and int methods
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x'.zfill(800000000) }}",
        "{{ 'x'.center(800000000) }}",
        "{{ 'x'.ljust(800000000, '-') }}",
        "{{ 'x'.rjust(800000000) }}",
        "{{ 'x'['zfill'](800000000) }}",
        "{{ ('x'|attr('rjust'))(800000000) }}",
        "{{ ('x'|safe).center(800000000) }}",
        "{{ 'x'.encode().center(800000000) }}",
        "{{ '\t'.expandtabs(800000000) }}",
    ],
)
def test_padding_methods_are_refused(template: str) -> None:
    refused(template, "too large")


def test_expandtabs_many_tabs_is_refused() -> None:
    refused("{{ ('\t' * 100000).expandtabs(9000) }}", "string too large")


def test_str_replace_is_refused() -> None:
    refused("{{ ('x' * 1000).replace('x', 'y' * 10000) }}", "string too large")
    refused("{{ 'x'.replace('', 'y' * 1000000) }}", "string too large")
    refused("{{ ('x' * 1000).encode().replace(''.encode(), ('y' * 10000).encode()) }}", "string too large")


def test_str_join_is_refused() -> None:
    refused("{{ ('y' * 100000).join(['a'] * 100000) }}", "string too large")
    refused(BIG + "{{ ''.join([s, s]) }}", "string too large")  # many big strings
    refused("{{ ('y' * 100000).join(range(20)|map('string')) }}", "string too large")


def test_str_translate_is_refused() -> None:
    refused("{{ ('a' * 100000).translate({97: 'b' * 100000}) }}", "string too large")
    refused("{{ ('a' * 100000).translate(''.maketrans({'a': 'b' * 1000})) }}", "string too large")
    # A big table is not counted char by char (that would be quadratic).
    refused("{{ ('a' * 100000).translate({}.fromkeys(range(97, 2000), 'b' * 20)) }}", "string too large")


def test_to_bytes_is_refused() -> None:
    refused("{{ (1).to_bytes(800000000, 'big') }}", "too large")
    refused("{{ true.to_bytes(800000000, 'big') }}", "too large")


def test_other_growing_methods_are_bounded() -> None:
    # Methods without a check of their own still have their result checked and charged.
    refused("{{ ('x'|safe).escape('&' * 1000000) }}", "string too large")
    refused(BIG + "{% for i in range(1000) %}{% set x = s.split('x') %}{% endfor %}", "allocates too much")
    refused(BIG + "{{ {}.fromkeys(range(100000), s) }}", "list or dict too large")


# ---------------------------------------------------------------------------
# Globals and numbers
# ---------------------------------------------------------------------------


def test_lipsum_is_refused() -> None:
    refused("{{ lipsum(1000000) }}", "string too large")
    refused("{{ lipsum(1, max=100000000) }}", "string too large")


def test_big_power_is_refused() -> None:
    refused("{% set a = 3 ** 10000000 %}{{ a * a }}", "power too large")
    refused("{{ 10 ** 100000 }}", "power too large")


def test_big_products_are_refused() -> None:
    # Each multiply is one step but, on huge numbers, takes seconds.
    refused("{% set a = 3 ** 40000 %}{{ a * a }}", "number too large")
    refused("{% set a = 7 ** 30000 %}{% set b = a * 3 %}{{ b * b }}", "number too large")


def test_big_numbers_are_refused() -> None:
    refused("{{ 0x" + "f" * 30000 + " }}", "number too large")  # a literal
    refused("{{ (0).from_bytes(('x' * 100000).encode(), 'big') }}", "number too large")
    grow = "{% set ns = namespace(x=2 ** 99990) %}{% for i in range(100) %}{% set ns.x = ns.x + ns.x %}{% endfor %}"
    refused(grow, "number too large")


# ---------------------------------------------------------------------------
# Values that double, loop by loop
# ---------------------------------------------------------------------------

DOUBLING = {
    "~": "{% set ns.s = ns.s ~ ns.s %}",
    "+": "{% set ns.s = ns.s + ns.s %}",
    "*": "{% set ns.s = ns.s * 2 %}",
    "format": "{% set ns.s = '{}{}'.format(ns.s, ns.s) %}",
    "printf": "{% set ns.s = '%s%s' % (ns.s, ns.s) %}",
    "join": "{% set ns.s = [ns.s, ns.s]|join %}",
    "set block": "{% set t %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = t %}",
    "macro": "{% set ns.s = twice(ns.s) %}",
}


@pytest.mark.parametrize("how", sorted(DOUBLING))
def test_doubling_a_string_is_refused(how: str) -> None:
    template = (
        "{% macro twice(s) %}{{ s }}{{ s }}{% endmacro %}"
        "{% set ns = namespace(s='x') %}"
        "{% for i in range(40) %}" + DOUBLING[how] + "{% endfor %}{{ ns.s|length }}"
    )
    refused(template, "string too large")


SHARING = {
    "literal": "{% set ns.a = [ns.a, ns.a] %}",
    "+": "{% set ns.a = ns.a + ns.a %}",
    "dict()": "{% set ns.a = dict(x=ns.a, y=ns.a) %}",
    "dict literal": "{% set ns.a = {'x': ns.a, 'y': ns.a} %}",
    "cycler": "{% set ns.a = cycler(ns.a, ns.a).items %}",
    "varargs": "{{ keep(ns.a, ns.a) }}",
}


@pytest.mark.parametrize("how", sorted(SHARING))
def test_doubling_a_list_is_refused(how: str) -> None:
    # 60 levels of shared halves: == (or repr, hash, tojson) would walk 2**60 items in C.
    template = (
        "{% set ns = namespace(a=[1], b=[1]) %}"
        "{% macro keep() %}{% set ns.a = varargs %}{% endmacro %}"
        "{% for i in range(60) %}" + SHARING[how] + "{% endfor %}{{ ns.a == ns.b }}"
    )
    refused(template, "list or dict too large")


def test_deep_nesting_is_refused() -> None:
    # Hashing a tuple recurses in C without a depth check.
    template = (
        "{% set ns = namespace(t=()) %}"
        "{% for i in range(1000) %}{% for j in range(200) %}{% set ns.t = (ns.t,) %}{% endfor %}{% endfor %}"
        "{{ {ns.t: 1} }}"
    )
    refused(template, "too deeply")


def test_namespace_repr_is_short() -> None:
    # Namespaces are mutable, so weights cannot count them: their repr shows nothing.
    assert render("{{ namespace(a=1) }}", ONE, add_generation_prompt=False) == "<Namespace>"
    template = "{% set ns = namespace(v='') %}{% set l = [ns] * 1000 %}{% set ns.v = 'y' * 1000000 %}{{ l }}"
    assert len(render(template, ONE, add_generation_prompt=False)) == 1000 * len("<Namespace>, ")


# ---------------------------------------------------------------------------
# Whole-render budgets: output, allocation, steps, clock, compile
# ---------------------------------------------------------------------------


def test_output_is_bounded() -> None:
    refused("{% set s = 'x' * 1000 %}{% for i in range(100000) %}{{ s }}{% endfor %}", "output is too long")
    out = render("{% set s = 'x' * 1000 %}{% for i in range(3000) %}{{ s }}{% endfor %}", ONE, add_generation_prompt=False)
    assert len(out) == 3_000_000 < MAX_TEMPLATE_OUTPUT


@pytest.mark.parametrize(
    "body",
    [
        "{{ s }}",  # a `{% set %}` block keeps what it outputs until it joins it
        "{{ s[i:] }}",  # slices are new strings
        "{{ s.upper() }}",
        "{{ s|list|length }}",
    ],
)
def test_kept_values_are_bounded(body: str) -> None:
    refused(BIG + "{% set out %}{% for i in range(100000) %}" + body + "{% endfor %}{% endset %}", "allocates too much")


def test_many_statements_keeping_values_are_bounded() -> None:
    # Not a loop: a long template keeping a new big string in each variable.
    template = "{% set s = 'x' * 999000 %}" + "".join(f"{{% set v{i} = s + 'x' %}}" for i in range(200))
    refused(template, "allocates too much")


def test_runaway_loop_message() -> None:
    refused("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran too long")


def test_wall_clock_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A loop of slow operations, each bounded, under the step budget.
    template = BIG + "{% for i in range(100000) %}{% if 'y' in s %}{% endif %}{% endfor %}"
    monkeypatch.setattr(sandbox, "MAX_TEMPLATE_SECONDS", 0.2)
    start = time.monotonic()
    message = refused(template, "ran too long (over 0.2 s)")
    assert time.monotonic() - start < 2, message


def test_slow_operations_stop_at_the_clock() -> None:
    template = BIG + "{% for i in range(100000) %}{% for j in range(3) %}{% if 'y' in s %}{% endif %}{% endfor %}{% endfor %}"
    refused(template, "ran too long")


def test_compile_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    refused("x" * (chat.MAX_TEMPLATE_SOURCE + 1), "too long")
    refused("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "does not compile")
    # Compiling is Python code with no template steps: the clock watches it.
    monkeypatch.setattr(sandbox, "MAX_TEMPLATE_SECONDS", 0.05)
    big = "{% for m in messages %}{{ m.role ~ 'x' | upper }}{% if m.content %}{{ m.content|trim }}{% endif %}{% endfor %}\n" * 3000
    refused(big + "{# unique #}", "ran too long")


def test_compile_failure_is_remembered() -> None:
    template = "{{ 0x" + "f" * 30001 + " }}"
    first = refused(template, "number too large")
    start = time.monotonic()
    assert refused(template, "number too large") == first
    assert time.monotonic() - start < 1


def test_raise_exception_message_is_one_line() -> None:
    message = refused("{{ raise_exception('bad\nrole ' * 100000) }}", "chat template raised: bad role bad role")
    assert message.endswith("...")
    assert refused("{{ raise_exception(['a', 'b']) }}", "raised") == "chat template raised: ['a', 'b']"


# ---------------------------------------------------------------------------
# Legitimate uses below the limits render, as plain Jinja renders them
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, expected",
    [
        ("{{ '{:>5}|{:<4}|{:^5}|{:.3f}|{:05d}|{:,}'.format('x', 'ab', 'c', 3.14159, 42, 1234567) }}", "    x|ab  |  c  |3.142|00042|1,234,567"),
        ("{{ '{a}-{b!r}'.format_map({'a': 1, 'b': 'z'}) }}", "1-'z'"),
        ("{{ '{:>{w}}'.format('x', w=3) }}", "  x"),
        ("{{ '%-4s|%05.1f|%x|%c|%%' % ('ab', 3.14159, 255, 65) }}", "ab  |003.1|ff|A|%"),
        ("{{ '%(a)s=%(b)03d' % {'a': 'k', 'b': 7} }}", "k=007"),
        ("{{ '%5.2f'|format(3.14159) }}", " 3.14"),
        ("{{ '%(x)s!'|format(x='hi') }}", "hi!"),
        ("{{ 'ab'|center(6) }}|{{ 'a\nb'|indent(2, first=true) }}", "  ab  |  a\n  b"),
        ("{{ 'aaa bbb ccc'|wordwrap(7) }}", "aaa bbb\nccc"),
        ("{{ 'hello world'|truncate(9, true, '', 0) }}", "hello wor"),
        ("{{ [1, 2, 3]|join(', ') }}|{{ messages|join(',', attribute='role') }}", "1, 2, 3|user"),
        ("{{ 'a-b-c'|replace('-', '+', 1) }}", "a+b-c"),
        ("{{ range(5)|batch(2, 0)|list }}|{{ range(5)|slice(2)|list }}", "[[0, 1], [2, 3], [4, 0]]|[[0, 1, 2], [3, 4]]"),
        ("{{ 3.14159|round(2) }}|{{ [1, 2.5]|sum }}|{{ '12'|int + 1 }}|{{ 'ff'|int(base=16) }}", "3.14|3.5|13|255"),
        ("{{ {'b': [1, 2], 'a': 'x'}|tojson }}", '{"a": "x", "b": [1, 2]}'),
        ("{{ {'a': [1]}|tojson(indent=2) }}", '{\n  "a": [\n    1\n  ]\n}'),
        ("{{ [1, 'a']|pprint }}|{{ 'hi there'|title }}|{{ '<b>'|e }}", "[1, 'a']|Hi There|&lt;b&gt;"),
        ("{{ 'x'.zfill(3) }}|{{ 'x'.center(3, '*') }}|{{ 'x'.ljust(2) }}|{{ 'x'.rjust(2) }}", "00x|*x*|x | x"),
        ("{{ 'a\tb'.expandtabs(4) }}|{{ 'aXb'.replace('X', '--') }}|{{ '-'.join(['a', 'b']) }}", "a   b|a--b|a-b"),
        ("{{ 'abc'.translate(''.maketrans('ab', 'xy')) }}|{{ 'a,b'.split(',') }}|{{ ' x '.strip() }}", "xyc|['a', 'b']|x"),
        ("{{ 'abc'.encode().hex() }}|{{ (258).to_bytes(2, 'big')|list }}|{{ (0).from_bytes('ab'.encode(), 'big') }}", "616263|[1, 2]|24930"),
        ("{{ {}.fromkeys(['a'], 0) }}|{{ [1, 2].copy() }}|{{ {'a': 1}.get('a') }}", "{'a': 0}|[1, 2]|1"),
        ("{{ 2 ** 64 }}|{{ (3 ** 60000) % 7 }}|{{ (7 ** 3000 * 7 ** 3000) % 1000 }}", "18446744073709551616|1|1"),
        ("{{ 'ab' * 3 }}|{{ [0] * 3 }}|{{ (1,) * 2 }}|{{ 5 - 7 }}|{{ 7 // 2 }}|{{ 7 % 3 }}", "ababab|[0, 0, 0]|(1, 1)|-2|3|1"),
        ("{{ lipsum(1, false, 5, 6)|wordcount in [5, 6] }}", "True"),
        ("{{ strftime_now('%Y-%m-%d') }}|{{ 'a' ~ 1 ~ none }}", "2024-01-01|a1None"),
        ("{% set x %}a{{ 1 }}b{% endset %}{{ x }}|{% filter upper %}up{% endfilter %}", "a1b|UP"),
        ("{{ messages[0].content[::-1] }}|{{ messages[:1]|length }}|{{ 'abcdef'[1:4] }}", "iH|1|bcd"),
        ("{% set a, b = 1, 2 %}{{ a + b }}|{{ dict(a=1, b=[2]) }}|{{ (1, (2, [3])) }}", "3|{'a': 1, 'b': [2]}|(1, (2, [3]))"),
        ("{% macro m(x) %}{{ x }}{{ varargs|length }}{{ kwargs|length }}{% endmacro %}{{ m(1, 2, 3, k=4) }}", "121"),
        ("{% set c = cycler('a', 'b') %}{{ c.next() }}{{ c.next() }}{{ c.next() }}|{% for i in range(3) %}{{ loop.cycle('x', 'y') }}{% endfor %}", "aba|xyx"),
    ],
)
def test_uses_below_the_limits_render(template: str, expected: str) -> None:
    assert render(template, ONE, add_generation_prompt=False) == expected


def test_nesting_below_the_limit_renders() -> None:
    template = "{% set ns = namespace(l=1) %}{% for i in range(90) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l|tojson|length }}"
    assert render(template, ONE, add_generation_prompt=False) == str(2 * 90 + 1)


def test_values_up_to_the_limits_render() -> None:
    n = MAX_TEMPLATE_STRING
    out = render("{% set s = 'x' * " + str(n // 2) + " %}{{ (s + s)|length }}|{{ (s ~ s)|length }}|{{ [s, s]|join|length }}", ONE, add_generation_prompt=False)
    assert out == f"{n}|{n}|{n}"
    out = render("{{ 'x'.zfill(10000)|length }}|{{ ('%10000s' % 'x')|length }}|{{ ('{:10000}'.format('x'))|length }}", ONE, add_generation_prompt=False)
    assert out == "10000|10000|10000"


# Real-world chat template features, compared with plain Jinja's rendering.
QWEN3_STYLE = """\
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "system" %}
        {{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

TOOLS_STYLE = """\
{%- set tools = [{'type': 'function', 'function': {'name': 'get_weather', 'description': 'Weather in a city', 'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}}] %}
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{%- for t in tools %}
    {{- t | tojson(indent=4) }}
    {{- "\\n\\n" }}
{%- endfor %}
{{- "Tools: %s (%d)" % (tools|map(attribute='function.name')|join(', '), tools|length) }}
{{- system_message + "<|eot_id|>" }}
{%- set roles = messages|map(attribute='role')|unique|list %}
{%- for message in [{'role': 'user', 'content': 'First.'}] + messages %}
    {{- '<|start_header_id|>{}<|end_header_id|>\\n\\n{}<|eot_id|>'.format(message['role'], message['content'] | trim) }}
{%- endfor %}
{{- '<!-- ' ~ roles|join('/') ~ ' -->' }}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

REAL_WORLD = {**BUILTIN_TEMPLATES, "qwen3-style": QWEN3_STYLE, "tools-style": TOOLS_STYLE}


@pytest.mark.parametrize("name", sorted(REAL_WORLD))
def test_real_templates_render_as_plain_jinja(name: str) -> None:
    kw = {"bos_token": "<s>", "eos_token": "</s>"}
    for gen in (True, False):
        ours = render(REAL_WORLD[name], MULTI, add_generation_prompt=gen, **kw)
        assert ours == reference(REAL_WORLD[name], MULTI, add_generation_prompt=gen, **kw)


@pytest.mark.parametrize("name", sorted(REAL_WORLD))
def test_long_conversations_render(name: str) -> None:
    # A long conversation (well over any local model's context) is far below the limits.
    long = [
        Message("system", "s" * 20_000),
        Message("user", "u\n" * 150_000),
        Message("assistant", "<think>" + "t" * 50_000 + "</think>" + "a" * 100_000),
        Message("user", "q " * 100_000),
    ]
    kw = {"bos_token": "<s>", "eos_token": "</s>"}
    box, elapsed, _ = _render_watched(REAL_WORLD[name], long, **kw)
    assert "error" not in box, box.get("error")
    assert box["out"] == reference(REAL_WORLD[name], long, add_generation_prompt=True, **kw)
    assert elapsed < SECONDS
    if name in BUILTIN_TEMPLATES:
        sp = split_template(REAL_WORLD[name], long, **kw)
        assert sp.prefix == box["out"]
