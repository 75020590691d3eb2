"""The template sandbox: what one compile or render of an untrusted chat template may cost.

Chat templates come from GGUF files and from shared models.toml files: they are
untrusted code.  They render in Jinja's immutable sandbox, with every operation
that can build a big value or run a long loop bounded (see the notes below), so
a hostile template fails fast with a one-line :class:`TemplateError` instead of
hanging a run or exhausting memory.  :mod:`chat` is the public face
(``render``, ``split_template``); this module holds the limits and their checks.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any

from .errors import CdrError


class TemplateError(CdrError):
    """A chat template failed to render (bad, hostile, or unsupported)."""


# ---------------------------------------------------------------------------
# The sandbox: what one compile or render of an (untrusted) template may cost
# ---------------------------------------------------------------------------
#
# Jinja's immutable sandbox blocks unsafe attributes and mutation of lists and
# dicts, and caps one range() at 100000 items.  Everything else a hostile
# template could use to hang a render or exhaust memory is bounded here:
#
# * each operation that can build a big value (string and list operators, `~`,
#   str.format and printf `%`, the built-in filters and globals, str, bytes,
#   int and dict methods, slices and list/tuple/dict literals) checks its
#   widths, counts and result size *before* it runs, from the sizes of its
#   inputs; a few that cannot be bounded exactly beforehand are checked after,
#   when their result can be at most a small multiple of their (bounded) input;
# * a render has a step budget (blocks and statements the compiled template
#   executes), a wall clock, an allocation budget (bytes that checked
#   operations create) and an output cap; compiling has the same wall clock.
#
# Real chat templates use a tiny fraction of each limit: they pad to widths of
# a few dozen at most, build strings no longer than the conversation, nest
# values a few levels deep, and render in well under a millisecond.  A longer
# conversation than the limits allow would not fit any local model's context.

# Template steps per render: blocks entered (a loop iteration, a macro call, a
# branch taken) plus statements executed; a million take well under a second.
MAX_TEMPLATE_STEPS = 1_000_000
# Wall clock for one compile and for one render: pure template loops stop on
# steps first; this catches loops of slow (each bounded) operations.
MAX_TEMPLATE_SECONDS = 3.0
# A width or precision (format specs, printf, center/ljust/rjust/zfill), tab
# size, indent, batch or slice count: templates pad to a few dozen columns.
MAX_TEMPLATE_WIDTH = 10_000
# Characters of one string (or bytes) an operation builds: ~250k tokens, more
# than a local model's context, so no real prompt needs more in one piece.
MAX_TEMPLATE_STRING = 1_000_000
# Chars of one rendered conversation (the sum of all pieces output).
MAX_TEMPLATE_OUTPUT = 4_000_000
# "Weight" of one list/tuple/dict a template builds: its strings' characters,
# its numbers' digits and one per item, shared parts counted every time they
# occur.  Templates copy `messages` (`[system] + messages`), so one list may
# hold a whole conversation: the same bound as the output.  Bounding weight
# (not only length) is what keeps repr, ==, hash and tojson of values built by
# `{% set ns.l = [ns.l, ns.l] %}` in a loop from taking 2**n time.
MAX_TEMPLATE_WEIGHT = MAX_TEMPLATE_OUTPUT
MAX_TEMPLATE_DEPTH = 100  # nesting of lists/tuples/dicts a template builds (hash recurses in C)
# Bits of an integer: 30,000 decimal digits.  Multiplying two such numbers takes
# well under a millisecond; `3 ** 10_000_000` (16M bits) then `a * a`, seconds.
MAX_TEMPLATE_INT_BITS = 100_000
# Bytes that checked operations create in one render.  Each operation is
# bounded, but a loop keeping every result (in a `{% set %}` block, in macro
# arguments) could still add up; a real render creates a few times its output.
MAX_TEMPLATE_ALLOCATION = 64 * 2**20
MAX_TEMPLATE_SOURCE = 1_000_000  # chars of template source (real ones: a few KB)

_STEP_CHUNK = 16  # steps between looks at the clock while rendering
_CLOCK_TICKS = 100  # Python calls between looks at the clock while compiling
_BIG_CHARGE = 2**16  # an allocation this large also looks at the clock
_ITEM_BYTES = 64  # charged per item of a list a filter builds (its items may be new)
_MAX_WRAP_LINES = 100_000  # lines |wordwrap may produce (a Python loop per chunk)
_MAX_WRAP_COPY = 100_000_000  # chars textwrap copies breaking long words (quadratic)
_MAX_WORD_LOOP = 100_000  # chars |urlize and |title read (a Python loop per word)

_LINE_BREAKS = ("\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")
_ITEMS_VIEW: type = type({}.items())
_CONTAINERS: tuple[type, ...] = (
    list, tuple, dict, set, frozenset, type({}.keys()), type({}.values()), _ITEMS_VIEW
)


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most about ``limit`` characters (for error messages)."""
    short = " ".join(text[: 2 * limit].split())
    return short if len(short) <= limit and len(text) <= 2 * limit else short[:limit] + "..."


class _RenderState:
    """The budgets of one render (its compile included).

    Steps are counted by the compiled template itself: the code generator below
    puts ``next(cdr_steps)`` at the start of every block (a loop iteration, a
    macro call, a branch taken) and before every statement.  ``cdr_steps`` is a
    C-level iterator that runs dry every _STEP_CHUNK steps, when a Python
    generator refills it and looks at the clock; it costs far less than tracing,
    under which every Python call would cost a trace callback.  The compiler,
    which has no template code, is watched by a trace function instead (__call__)."""

    __slots__ = ("steps", "deadline", "ticks", "alloc", "measured", "tripped")

    def __init__(self, timed: bool) -> None:
        self.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS if timed else float("inf")
        self.ticks = _CLOCK_TICKS
        self.alloc = MAX_TEMPLATE_ALLOCATION
        # id -> (container, (weight, depth, items)); holds the container so its id stays its own.
        self.measured: dict[int, tuple[Any, tuple[int, int, int]]] = {}
        self.tripped: str | None = None
        self.steps = itertools.chain.from_iterable(self._step_chunks())

    def restart(self) -> None:
        """A fresh clock and step budget (after the compile, for the render)."""
        self.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS
        self.steps = itertools.chain.from_iterable(self._step_chunks())

    def _step_chunks(self) -> Iterator[range]:
        chunk = range(_STEP_CHUNK)
        for _ in range(MAX_TEMPLATE_STEPS // _STEP_CHUNK):
            yield chunk
            if time.monotonic() > self.deadline:
                raise self.trip(f"chat template ran too long (over {MAX_TEMPLATE_SECONDS:g} s)")
        raise self.trip(f"chat template ran too long (over {MAX_TEMPLATE_STEPS} steps)")

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        # The trace function while compiling: every Python call ticks the clock.
        self.ticks -= 1
        if self.ticks <= 0:
            self.check_clock()

    def check_clock(self) -> None:
        self.ticks = _CLOCK_TICKS
        if time.monotonic() > self.deadline:
            raise self.trip(f"chat template ran too long (over {MAX_TEMPLATE_SECONDS:g} s)")

    def trip(self, message: str) -> TemplateError:
        # Remembered, so that render() fails even if library code swallowed the
        # exception (jinja's constant folding does; and Python unsets a trace
        # function that raises).
        self.tripped = message
        return TemplateError(message)

    def charge(self, nbytes: int) -> None:
        self.alloc -= nbytes
        if self.alloc < 0:
            mib = MAX_TEMPLATE_ALLOCATION // 2**20
            raise TemplateError(f"chat template allocates too much (over {mib} MiB in one render)")
        if nbytes > _BIG_CHARGE:
            self.check_clock()


_tls = threading.local()


def _untimed() -> _RenderState:
    return _RenderState(timed=False)


def _state() -> _RenderState:
    """The current render's state; outside a render (constant folding in a bare
    compile) a fresh one, so per-operation limits still hold.  Hot paths inline
    this as ``getattr(_tls, "state", None) or _untimed()``: rendering is on the
    per-record hot path, and each Python call in a check costs."""
    return getattr(_tls, "state", None) or _untimed()


def _too_large(what: str, size: int, limit: int) -> TemplateError:
    return TemplateError(f"chat template builds {what} too large ({size}; the limit is {limit})")


def _check_length(n: int) -> None:
    if n > MAX_TEMPLATE_STRING:
        raise _too_large("a string", n, MAX_TEMPLATE_STRING)


def _check_width(width: Any, what: str = "a width") -> None:
    if isinstance(width, int) and width > MAX_TEMPLATE_WIDTH:
        raise TemplateError(
            f"chat template uses {what} too large ({width}; the limit is {MAX_TEMPLATE_WIDTH})"
        )


def _check_int(n: int) -> int:
    if n.bit_length() > MAX_TEMPLATE_INT_BITS:
        raise TemplateError(
            f"chat template computes a number too large (over {MAX_TEMPLATE_INT_BITS} bits)"
        )
    return n


def _measure(x: Any, st: _RenderState) -> tuple[int, int, int]:
    """(weight, depth, items) of a value; see MAX_TEMPLATE_WEIGHT.  Containers are
    measured once per render (the sandbox keeps them immutable), so a DAG of shared
    parts costs its number of distinct containers, not its unfolded size."""
    if isinstance(x, (str, bytes)):
        return len(x), 0, 1
    if isinstance(x, int):
        return 1 + x.bit_length() // 3, 0, 1
    if not isinstance(x, _CONTAINERS):
        return 1, 0, 1  # numbers, None, undefined, namespaces, functions: short reprs
    measured = st.measured
    hit = measured.get(id(x))
    if hit is not None and hit[0] is x:
        return hit[1]
    weight, depth, items = 2, 0, 1
    # A dict's (or items view's) keys and values, not (transient) item tuples.
    parts: Any = x
    if isinstance(x, dict):
        parts = itertools.chain.from_iterable(x.items())
    elif isinstance(x, _ITEMS_VIEW):
        parts = itertools.chain.from_iterable(parts)
    for part in parts:
        # Strings, numbers and measured containers inline (no call per item).
        if isinstance(part, (str, bytes)):
            weight += len(part) + 1
            items += 1
        elif type(part) is int:
            weight += 2 + part.bit_length() // 3
            items += 1
        elif not isinstance(part, _CONTAINERS):
            weight += 2
            items += 1
        else:
            hit = measured.get(id(part))
            w, d, n = hit[1] if hit is not None and hit[0] is part else _measure(part, st)
            weight += w + 1
            items += n
            if d > depth:
                depth = d
        if weight > MAX_TEMPLATE_WEIGHT:
            break  # over every limit already: stop counting
    result = (weight, depth + 1, items)
    measured[id(x)] = (x, result)
    return result


def _check_weight(weight: int, depth: int) -> None:
    if weight > MAX_TEMPLATE_WEIGHT:
        raise _too_large("a list or dict", weight, MAX_TEMPLATE_WEIGHT)
    if depth > MAX_TEMPLATE_DEPTH:
        raise TemplateError(f"chat template nests values too deeply (over {MAX_TEMPLATE_DEPTH} levels)")


def _built(x: Any, st: _RenderState) -> Any:
    """Check and charge a container a template just built (a literal, ``+``, ``*``, dict())."""
    weight, depth, _ = _measure(x, st)
    if weight > MAX_TEMPLATE_WEIGHT or depth > MAX_TEMPLATE_DEPTH:
        _check_weight(weight, depth)
    st.alloc -= sys.getsizeof(x)
    if st.alloc < 0:
        st.charge(0)  # raises
    return x


def _text_estimate(value: Any, st: _RenderState) -> int:
    """Roughly len(str(value)) (at least a twelfth of it), refusing to turn a
    container heavier than MAX_TEMPLATE_STRING into text."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, float):
        return 330  # '%f' of 1e308
    if isinstance(value, int):
        return 2 + value.bit_length() // 3
    if isinstance(value, _CONTAINERS):
        weight = _measure(value, st)[0]
        if weight > MAX_TEMPLATE_STRING:
            raise _too_large("text from a value", weight, MAX_TEMPLATE_STRING)
        return weight
    return 64


def _text(value: Any, st: _RenderState) -> str:
    if isinstance(value, str):
        return value
    _text_estimate(value, st)
    return str(value)


def _string_result(s: Any, st: _RenderState) -> Any:
    n = len(s)
    if n > MAX_TEMPLATE_STRING:
        raise _too_large("a string", n, MAX_TEMPLATE_STRING)
    st.charge(sys.getsizeof(s))
    return s


def _result(x: Any, st: _RenderState) -> Any:
    """Check and charge what a filter or method returned."""
    if isinstance(x, (str, bytes)):
        return _string_result(x, st)
    if isinstance(x, (list, tuple, dict)):
        st.charge(sys.getsizeof(x) + _ITEM_BYTES * len(x))
    elif type(x) is int:
        _check_int(x)
    return x


def _line_breaks(s: str) -> int:
    return sum(map(s.count, _LINE_BREAKS))


# -- operators ---------------------------------------------------------------


def _binop(op: str, left: Any, right: Any) -> Any:
    """The intercepted operators (str + str is inlined in _Sandbox.call_binop)."""
    if op == "+":
        return _add(left, right)
    if op == "*":
        return _mul(left, right)
    if op == "**":
        return _pow(left, right)
    if op == "%":
        return _mod(left, right)
    result = left - right
    return _check_int(result) if type(result) is int else result


def _add(left: Any, right: Any) -> Any:
    st = _state()
    if isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
        _check_length(len(left) + len(right))
        return _string_result(operator.add(left, right), st)  # Markup escapes the other side: checked after
    if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        lw, ld, ln = _measure(left, st)
        rw, rd, rn = _measure(right, st)
        _check_weight(lw + rw, max(ld, rd))
        result = operator.add(left, right)
        st.measured[id(result)] = (result, (lw + rw, max(ld, rd), ln + rn))
        st.charge(sys.getsizeof(result))
        return result
    result = left + right
    return _check_int(result) if type(result) is int else result


def _mul(left: Any, right: Any) -> Any:
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, (str, bytes, list, tuple)) and isinstance(count, int):
            st = _state()
            times = max(count, 0)
            if isinstance(seq, (str, bytes)):
                _check_length(len(seq) * times)
                return _string_result(left * right, st)
            weight, depth, items = _measure(seq, st)
            _check_weight(2 + (weight - 2) * times, depth)
            result = left * right
            st.measured[id(result)] = (result, (2 + (weight - 2) * times, depth, 1 + (items - 1) * times))
            st.charge(sys.getsizeof(result))
            return result
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_TEMPLATE_INT_BITS:
            raise TemplateError(
                f"chat template computes a number too large (over {MAX_TEMPLATE_INT_BITS} bits)"
            )
    return left * right


def _pow(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        if right * math.log2(abs(left)) > MAX_TEMPLATE_INT_BITS:  # the result's bits
            raise TemplateError(
                f"chat template computes a power too large (over {MAX_TEMPLATE_INT_BITS} bits)"
            )
    return left**right


def _mod(left: Any, right: Any) -> Any:
    if isinstance(left, (str, bytes)):  # printf-style formatting
        st = _state()
        _check_length(_printf_bound(left, right, st))
        return _string_result(left % right, st)
    return left % right


def _printf_number(text: str, i: int, args: tuple[Any, ...], argi: int) -> tuple[int, int, int]:
    """A printf width or precision at text[i]: (value, next i, next argument)."""
    if i < len(text) and text[i] == "*":
        value = args[argi] if argi < len(args) else 0
        return (abs(value) if isinstance(value, int) else 0), i + 1, argi + 1
    j = i
    while j < len(text) and "0" <= text[j] <= "9":
        j += 1
    digits = text[i:j].lstrip("0")
    value = MAX_TEMPLATE_WIDTH + 1 if len(digits) > 9 else int(digits or "0")
    return value, j, argi


def _printf_bound(fmt: str | bytes, values: Any, st: _RenderState) -> int:
    """About len(fmt % values), from the conversions in fmt (parsed as CPython
    does); raises for a width or precision over MAX_TEMPLATE_WIDTH."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    args = values if isinstance(values, tuple) else (values,)
    mapping = None  # for %(key)s
    if not isinstance(values, (tuple, str, bytes)) and hasattr(values, "__getitem__"):
        mapping = values
    total, i, argi, n = 0, 0, 0, len(text)
    while True:
        j = text.find("%", i)
        if j < 0:
            return total + n - i
        total += j - i
        i = j + 1
        key = None
        if i < n and text[i] == "(":
            depth, k = 1, i + 1
            while k < n and depth:
                depth += (text[k] == "(") - (text[k] == ")")
                k += 1
            key, i = text[i + 1 : k - 1], k
        while i < n and text[i] in "-+ #0":
            i += 1
        width, i, argi = _printf_number(text, i, args, argi)
        precision = None
        if i < n and text[i] == ".":
            precision, i, argi = _printf_number(text, i + 1, args, argi)
        while i < n and text[i] in "hlL":
            i += 1
        if i >= n:
            return total  # incomplete: Python raises
        conversion = text[i]
        i += 1
        _check_width(max(width, precision or 0))
        if conversion == "%":
            total += max(width, 1)
            continue
        if key is not None:
            if mapping is None:
                return total  # Python raises
            try:
                value = mapping[key]
            except Exception:  # noqa: BLE001 - Python raises it again
                return total
        elif argi < len(args):
            value = args[argi]
            argi += 1
        else:
            return total  # not enough arguments: Python raises
        if conversion == "c":
            size = 1
        else:
            size = _text_estimate(value, st)
            if conversion in "sra" and precision is not None:
                size = min(size, precision)
            else:
                size += precision or 0
        total += max(width, size)


_SPEC_NUMBER = re.compile(r"[0-9]+")


def _spec_number(spec: str) -> int:
    """The largest number in a format spec: its width or precision (a fill digit is smaller)."""
    largest = 0
    for run in _SPEC_NUMBER.findall(spec):
        digits = run.lstrip("0")
        largest = max(largest, MAX_TEMPLATE_WIDTH + 1 if len(digits) > 9 else int(digits or "0"))
    return largest


# -- filters -----------------------------------------------------------------
# Each built-in filter runs through _checked_filter: filters in _TEXT_FILTERS turn
# their value into text (refused for a container heavier than MAX_TEMPLATE_STRING);
# those in _FILTER_CHECKS have a check run on their arguments first (which may
# turn a one-shot iterator into a list, so the check and the filter see the same
# items); every result is checked and charged after.  The rest cannot grow their
# input: abs attr count d default dictsort filesizeformat first float groupby
# items last length list map max min random reject rejectattr reverse select
# selectattr sort truncate unique (truncate: at most its input plus `end`).

_Pos = tuple[Any, ...]
_Kw = dict[str, Any]

_TEXT_FILTERS = frozenset(
    "capitalize center e escape forceescape format lower replace safe string "
    "striptags title trim upper urlencode urlize wordcount xmlattr".split()
)


def _arg(rest: _Pos, kwargs: _Kw, index: int, name: str, default: Any) -> Any:
    return rest[index] if len(rest) > index else kwargs.get(name, default)


def _pre_center(head: _Pos, value: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    _check_pad(len(_text(value, st)), _arg(rest, kwargs, 0, "width", 80))
    return value


def _check_pad(length: int, width: Any) -> None:
    if isinstance(width, int) and width > length:
        _check_width(width)


def _pre_indent(head: _Pos, s: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    width = _arg(rest, kwargs, 0, "width", 4)
    if isinstance(s, str) and isinstance(width, (int, str)):
        if isinstance(width, int):
            _check_width(width, "an indent")
        pad = len(width) if isinstance(width, str) else max(width, 0)
        _check_length(len(s) + 1 + (_line_breaks(s) + 2) * (pad + 1))
    return s


def _pre_wordwrap(head: _Pos, s: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    width = _arg(rest, kwargs, 0, "width", 79)
    break_long_words = _arg(rest, kwargs, 1, "break_long_words", True)
    wrapstring = _arg(rest, kwargs, 2, "wrapstring", None)
    if wrapstring is None:
        wrapstring = head[0].newline_sequence
    if not (isinstance(s, str) and isinstance(width, int) and width > 0 and isinstance(wrapstring, str)):
        return s  # the filter raises
    _check_length(len(s))
    breaks = _line_breaks(s)
    # Greedy wrapping: two consecutive lines of a paragraph hold more than `width` chars.
    lines = 2 * len(s) // width + breaks + 1
    if lines > _MAX_WRAP_LINES:
        raise TemplateError(
            f"chat template wraps text into too many lines ({lines}; the limit is {_MAX_WRAP_LINES})"
        )
    _check_length(len(s) + (lines + breaks + 1) * len(wrapstring))
    if break_long_words and len(s) > width:
        longest = max(map(len, s.split()), default=0)
        if longest > width and len(s) // width * longest > _MAX_WRAP_COPY:
            raise TemplateError("chat template wraps words too long for the width")
    return s


def _check_replace(s: str | bytes, old: Any, new: Any, count: Any) -> None:
    if type(old) is not type(new) or not isinstance(old, (str, bytes)):
        return  # the method raises
    if isinstance(s, str) != isinstance(old, str):
        return
    found = s.count(old) if old else len(s) + 1  # type: ignore[arg-type]
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    _check_length(len(s) + found * (len(new) - len(old)))


def _pre_replace(head: _Pos, value: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    old, new = _arg(rest, kwargs, 0, "old", ""), _arg(rest, kwargs, 1, "new", "")
    count = _arg(rest, kwargs, 2, "count", None)
    _check_replace(_text(value, st), _text(old, st), _text(new, st), -1 if count is None else count)
    return value


def _join_bound(items: list[Any] | tuple[Any, ...], sep: Any, st: _RenderState) -> int:
    """About the length of `sep` joining the text of `items` (| join, `~`)."""
    total = 0
    for item in items:
        if isinstance(item, str):
            total += len(item)
        elif type(item) is int:
            total += 2 + item.bit_length() // 3
        else:
            total += _text_estimate(item, st)
    if sep == "":
        return total
    return total + _text_estimate(sep, st) * max(len(items) - 1, 0)


def _pre_join(head: _Pos, value: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    items = value if isinstance(value, (list, tuple)) else list(value)
    attribute = _arg(rest, kwargs, 1, "attribute", None)
    shown = items
    if attribute is not None:
        from jinja2.filters import make_attrgetter

        shown = list(map(make_attrgetter(head[0].environment, attribute), items))
    _check_length(_join_bound(shown, _arg(rest, kwargs, 0, "d", ""), st))
    return items


def _pre_format(head: _Pos, value: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    _check_length(_printf_bound(_text(value, st), kwargs or rest, st))
    return value


def _pre_chunks(name: str, what: str) -> Callable[..., Any]:
    def check(head: _Pos, value: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
        count = _arg(rest, kwargs, 0, name, None)
        fill = _arg(rest, kwargs, 1, "fill_with", None)
        _check_width(count, what)
        if fill is not None and isinstance(count, int):
            weight, depth, _ = _measure(fill, st)
            _check_weight(count * (weight + 1), depth + 1)
        return value

    return check


def _pre_round(head: _Pos, value: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    precision = _arg(rest, kwargs, 0, "precision", 0)
    if isinstance(precision, int):
        _check_width(abs(precision), "a precision")  # round(n, -k) computes 10**k
    return value


def _pre_int(head: _Pos, value: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    if isinstance(value, (str, bytes)) and len(value) > MAX_TEMPLATE_INT_BITS + 64:
        raise TemplateError(f"chat template computes a number too large (over {MAX_TEMPLATE_INT_BITS} bits)")
    return value


def _pre_sum(head: _Pos, value: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    # sum() of lists or strings copies its running total at each item: quadratic.
    items = list(value)
    attribute = _arg(rest, kwargs, 0, "attribute", None)
    numbers: Any = items
    if attribute is not None:
        from jinja2.filters import make_attrgetter

        numbers = map(make_attrgetter(head[0], attribute), items)
    for number in itertools.chain((_arg(rest, kwargs, 1, "start", 0),), numbers):
        if not isinstance(number, (int, float)):
            raise TemplateError("chat template sums something other than numbers")
    return items


def _check_serialized(value: Any, indent: int, st: _RenderState) -> None:
    weight, depth, items = _measure(value, st)
    bound = weight + items * (depth * indent + 2) if indent else weight
    if bound > MAX_TEMPLATE_STRING:
        raise _too_large("text from a value", bound, MAX_TEMPLATE_STRING)


def _pre_tojson(head: _Pos, value: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    indent = _arg(rest, kwargs, 0, "indent", None)
    if isinstance(indent, int):
        _check_width(indent, "an indent")
    pad = len(indent) if isinstance(indent, str) else max(indent, 0) if isinstance(indent, int) else 0
    _check_serialized(value, pad, st)
    return value


def _pre_title(head: _Pos, value: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    text = _text(value, st)
    if len(text) > _MAX_WORD_LOOP:
        raise _too_large("a title of a text", len(text), _MAX_WORD_LOOP)
    return value


def _pre_pprint(head: _Pos, value: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    weight = _measure(value, st)[0]
    _check_length(2 * weight)  # long strings are split into indented lines
    _check_serialized(value, 2, st)
    return value


def _pre_urlize(head: _Pos, value: Any, rest: _Pos, kwargs: _Kw, st: _RenderState) -> Any:
    text = _text(value, st)
    if len(text) > _MAX_WORD_LOOP:
        raise _too_large("links in a text", len(text), _MAX_WORD_LOOP)
    schemes = _arg(rest, kwargs, 4, "extra_schemes", None)
    if schemes is not None and (not isinstance(schemes, (list, tuple)) or len(schemes) > 16):
        raise TemplateError("chat template links up with too many schemes")
    attributes = (_arg(rest, kwargs, 2, "target", ""), _arg(rest, kwargs, 3, "rel", ""))
    per_link = 64 + sum(len(_text(x, st)) for x in attributes if x)
    marks = text.count(".") + text.count("@") + text.count(":")  # every link has one
    _check_length(7 * len(text) + marks * per_link)
    return value


_FILTER_CHECKS: dict[str, Callable[..., Any]] = {
    "batch": _pre_chunks("linecount", "a batch size"),
    "center": _pre_center,
    "format": _pre_format,
    "indent": _pre_indent,
    "int": _pre_int,
    "join": _pre_join,
    "pprint": _pre_pprint,
    "replace": _pre_replace,
    "round": _pre_round,
    "slice": _pre_chunks("slices", "a slice count"),
    "sum": _pre_sum,
    "title": _pre_title,
    "tojson": _pre_tojson,
    "urlize": _pre_urlize,
    "wordwrap": _pre_wordwrap,
}


def _checked_filter(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    check = _FILTER_CHECKS.get(name)
    stringifies = name in _TEXT_FILTERS
    pass_arg = getattr(original, "jinja_pass_arg", None)
    skip = 0 if pass_arg is None else 1  # the context/environment jinja passes first

    def checked(*args: Any, **kwargs: Any) -> Any:
        st = getattr(_tls, "state", None) or _untimed()
        if len(args) > skip:
            value = args[skip]
            if stringifies and not isinstance(value, str):
                _text_estimate(value, st)
            if check is not None:
                checked_value = check(args[:skip], value, args[skip + 1 :], kwargs, st)
                if checked_value is not value:
                    args = (*args[:skip], checked_value, *args[skip + 1 :])
        result = original(*args, **kwargs)
        if type(result) is str and len(result) <= MAX_TEMPLATE_STRING:
            st.alloc -= len(result)
            if st.alloc < 0:
                st.charge(0)  # raises
            return result
        return _result(result, st)

    checked.__name__ = getattr(original, "__name__", name)
    if pass_arg is not None:
        setattr(checked, "jinja_pass_arg", pass_arg)  # noqa: B010 - jinja reads it from the function
    return checked


# -- methods -------------------------------------------------------------------
# The sandbox hands out bound methods through getattr/getitem; every one comes
# back wrapped, its result checked and charged like a filter's, with checks
# first for those that grow a string (the _TEXT_METHOD_CHECKS), int.to_bytes and
# dict.fromkeys.  Only lookups and predicates of builtin types are handed out as
# they are:

_PURE_METHODS = frozenset(
    "count endswith find index isalnum isalpha isascii isdecimal isdigit isidentifier "
    "islower isnumeric isprintable isspace istitle isupper rfind rindex startswith "
    "get keys values items bit_length bit_count is_integer isdisjoint issubset issuperset".split()
)
_PURE_OWNERS = (str, bytes, int, float, list, tuple, dict, set, frozenset, range)


def _m_pad(s: Any, args: _Pos, kwargs: _Kw, st: _RenderState) -> _Pos:
    _check_pad(len(s), args[0] if args else None)
    return args


def _m_expandtabs(s: Any, args: _Pos, kwargs: _Kw, st: _RenderState) -> _Pos:
    tabsize = args[0] if args else kwargs.get("tabsize", 8)
    if isinstance(tabsize, int):
        _check_width(tabsize, "a tab size")
        _check_length(len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(tabsize, 0))
    return args


def _m_replace(s: Any, args: _Pos, kwargs: _Kw, st: _RenderState) -> _Pos:
    if len(args) >= 2:
        _check_replace(s, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    return args


def _m_join(s: Any, args: _Pos, kwargs: _Kw, st: _RenderState) -> _Pos:
    if len(args) != 1:
        return args
    items = args[0] if isinstance(args[0], (list, tuple)) else list(args[0])
    if all(isinstance(item, (str, bytes)) for item in items):  # else join raises
        _check_length(sum(map(len, items)) + len(s) * max(len(items) - 1, 0))
    return (items,)


def _m_translate(s: Any, args: _Pos, kwargs: _Kw, st: _RenderState) -> _Pos:
    table = args[0] if args else None
    if isinstance(s, bytes) or table is None or isinstance(table, (str, bytes)):
        return args  # one char (or byte) for one char
    if not isinstance(table, (dict, list, tuple)):
        raise TemplateError("chat template translates with an unsupported table")
    replacements = table.items() if isinstance(table, dict) else enumerate(table)
    growing = [(k, len(v)) for k, v in replacements if isinstance(v, str) and len(v) > 1]
    if len(growing) > 256:  # counting each in s would be quadratic: assume the longest everywhere
        _check_length(len(s) * max(n for _, n in growing))
        return args
    total = len(s)
    for key, n in growing:
        if isinstance(key, int) and 0 <= key < 0x110000:
            total += s.count(chr(key)) * (n - 1)
    _check_length(total)
    return args


def _m_to_bytes(owner: Any, args: _Pos, kwargs: _Kw, st: _RenderState) -> _Pos:
    length = args[0] if args else kwargs.get("length", 1)
    if isinstance(length, int):
        _check_length(length)
    return args


_TEXT_METHOD_CHECKS: dict[str, Callable[..., tuple[Any, ...]]] = {
    "center": _m_pad,
    "ljust": _m_pad,
    "rjust": _m_pad,
    "zfill": _m_pad,
    "expandtabs": _m_expandtabs,
    "replace": _m_replace,
    "join": _m_join,
    "translate": _m_translate,
}


def _checked_method(method: Any) -> Any:
    owner, name = method.__self__, method.__name__
    if name in _PURE_METHODS and isinstance(owner, _PURE_OWNERS):
        return method
    check: Callable[..., tuple[Any, ...]] | None = None
    if isinstance(owner, (str, bytes)):
        check = _TEXT_METHOD_CHECKS.get(name)
    elif name == "to_bytes" and isinstance(owner, int):
        check = _m_to_bytes
    built = name == "fromkeys"  # dict.fromkeys: one value under every key

    def checked(*args: Any, **kwargs: Any) -> Any:
        st = getattr(_tls, "state", None) or _untimed()
        if check is not None:
            args = check(owner, args, kwargs, st)
        result = method(*args, **kwargs)
        return _built(result, st) if built and isinstance(result, dict) else _result(result, st)

    return checked


# -- globals -------------------------------------------------------------------


def _raise_exception(message: Any) -> None:
    text = message if isinstance(message, str) else _text(message, _state())
    raise TemplateError(f"chat template raised: {_one_line(text)}")


def _strftime_now(fmt: Any) -> Any:
    # Fixed date: scores must not depend on the day a run happens.
    import datetime

    if isinstance(fmt, str):
        _check_length(len(fmt) + 64 * fmt.count("%"))
    return _string_result(datetime.datetime(2024, 1, 1).strftime(fmt), _state())


def _checked_dict(*args: Any, **kwargs: Any) -> Any:
    return _built(dict(*args, **kwargs), _state())


def _checked_lipsum(*args: Any, **kwargs: Any) -> Any:
    import inspect

    from jinja2.utils import generate_lorem_ipsum

    bound = inspect.signature(generate_lorem_ipsum).bind(*args, **kwargs)
    bound.apply_defaults()
    paragraphs, words = bound.arguments["n"], bound.arguments["max"]
    if isinstance(paragraphs, int) and isinstance(words, int):
        _check_length(max(paragraphs, 0) * (16 * max(words, 0) + 16))
    return _string_result(generate_lorem_ipsum(*args, **kwargs), _state())


def _checked_concat(parts: Any) -> str:
    """Environment.concat: joins the output of a `{% set %}` block, a macro, a filter block."""
    pieces = parts if isinstance(parts, list) else list(parts)
    _check_length(sum(map(len, pieces)))
    return str(_string_result("".join(pieces), _state()))


def _finalize(value: Any) -> Any:
    """Every `{{ ... }}` passes here before it becomes text; what it outputs is
    charged: a `{% set %}` block or a macro keeps it until it joins its output."""
    st = getattr(_tls, "state", None) or _untimed()
    if isinstance(value, str):
        st.alloc -= len(value)
    elif type(value) is int:
        st.alloc -= 8 + value.bit_length() // 3
    else:
        st.alloc -= 8 + _text_estimate(value, st)
    if st.alloc < 0:
        st.charge(0)  # raises
    return value


@lru_cache(maxsize=1)
def _environment() -> Any:
    """The sandboxed Jinja environment all templates compile in (built on first use)."""
    import types

    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator, CompilerExit, Frame, optimizeconst
    from jinja2.exceptions import SecurityError
    from jinja2.filters import FILTERS
    from jinja2.runtime import Macro
    from jinja2.sandbox import (
        ImmutableSandboxedEnvironment,
        SandboxedEscapeFormatter,
        SandboxedFormatter,
    )
    from jinja2.utils import Cycler, Namespace
    from markupsafe import Markup

    class _CheckedCodeGenerator(CodeGenerator):
        """Counts steps (see _RenderState), and routes what plain Python would build
        unchecked through the environment: list/tuple/dict literals, slices and `~`."""

        def write_commons(self) -> None:
            super().write_commons()  # the start of the root and of each block function
            self.writeline("cdr_steps = environment.cdr_steps()")

        def blockvisit(self, nodes: Iterable[nodes.Node], frame: Frame) -> None:
            try:
                self.writeline("next(cdr_steps)")
                for node in nodes:
                    self.writeline("next(cdr_steps)")
                    self.visit(node, frame)
            except CompilerExit:
                pass

        def visit_List(self, node: nodes.List, frame: Frame) -> None:
            self.write("environment.cdr_built(")
            super().visit_List(node, frame)
            self.write(")")

        def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
            if node.ctx != "load":  # an assignment target
                super().visit_Tuple(node, frame)
                return
            self.write("environment.cdr_built(")
            super().visit_Tuple(node, frame)
            self.write(")")

        def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
            self.write("environment.cdr_built(")
            super().visit_Dict(node, frame)
            self.write(")")

        def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
            if not isinstance(node.arg, nodes.Slice):
                super().visit_Getitem(node, frame)
                return
            self.write("environment.cdr_sliced(")  # slices bypass environment.getitem
            super().visit_Getitem(node, frame)
            self.write(")")

        @optimizeconst
        def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
            if frame.eval_ctx.volatile:
                join = "(markup_join if context.eval_ctx.volatile else str_join)"
            elif frame.eval_ctx.autoescape:
                join = "markup_join"
            else:
                join = "str_join"
            self.write(f"environment.cdr_join({join}, (")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class _FieldChecks:
        """For str.format's formatters: bound each field before it is formatted."""

        total = 0

        def convert_field(self, value: Any, conversion: str | None) -> Any:
            if conversion is not None:
                _text_estimate(value, _state())  # repr()/ascii() come next
            return super().convert_field(value, conversion)  # type: ignore[misc]

        def format_field(self, value: Any, format_spec: str) -> Any:
            width = _spec_number(format_spec) if format_spec else 0
            _check_width(width)
            self.total += max(width, _text_estimate(value, _state()))
            _check_length(self.total)
            return super().format_field(value, format_spec)  # type: ignore[misc]

    class _Formatter(_FieldChecks, SandboxedFormatter):
        pass

    class _EscapeFormatter(_FieldChecks, SandboxedEscapeFormatter):
        pass

    class _Namespace(Namespace):
        # Opaque to weights (it is mutable): so its repr must not show its contents.
        def __repr__(self) -> str:
            return "<Namespace>"

    def cycler(*items: Any) -> Any:
        _built(items, _state())
        return Cycler(*items)

    bound_methods = (types.BuiltinMethodType, types.MethodType)

    class _Sandbox(ImmutableSandboxedEnvironment):
        code_generator_class = _CheckedCodeGenerator
        intercepted_binops = frozenset({"+", "-", "*", "**", "%"})
        concat = staticmethod(_checked_concat)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "+" and type(left) is str and type(right) is str:
                # The hot path (real templates concatenate), inline.
                if len(left) + len(right) > MAX_TEMPLATE_STRING:
                    _check_length(len(left) + len(right))
                result = left + right
                st = getattr(_tls, "state", None) or _untimed()
                st.alloc -= len(result)
                if st.alloc < 0:
                    st.charge(0)  # raises
                return result
            return _binop(operator, left, right)

        # getattr, getitem and call are SandboxedEnvironment's, inlined (a super()
        # call would cost a frame on every attribute), plus the checks.

        def getattr(self, obj: Any, attribute: str) -> Any:
            try:
                value = getattr(obj, attribute)
            except AttributeError:
                try:
                    return obj[attribute]
                except (TypeError, LookupError):
                    pass
            else:
                fmt = self.wrap_str_format(value)
                if fmt is not None:
                    return fmt
                if self.is_safe_attribute(obj, attribute, value):
                    return _checked_method(value) if type(value) in bound_methods else value
                return self.unsafe_undefined(obj, attribute)
            return self.undefined(obj=obj, name=attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            try:
                return obj[argument]
            except (TypeError, LookupError):
                pass
            value = super().getitem(obj, argument)  # an attribute, by name
            return _checked_method(value) if type(value) in bound_methods else value

        def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
            if isinstance(obj, Macro) and (args or kwargs):
                # What a macro collects into `varargs` and `kwargs` is a new tuple and dict.
                extra = list(args[len(obj.arguments) :]) if obj.catch_varargs else []
                if obj.catch_kwargs:
                    extra += [
                        v for k, v in kwargs.items() if k not in obj.arguments and not k.startswith("_")
                    ]
                if extra:
                    st = _state()
                    sizes = [_measure(value, st) for value in extra]
                    _check_weight(sum(w + 1 for w, _, _ in sizes), 1 + max(d for _, d, _ in sizes))
            if not self.is_safe_callable(obj):
                raise SecurityError(f"{obj!r} is not safely callable")
            return context.call(obj, *args, **kwargs)

        def wrap_str_format(self, value: Any) -> Any:
            # As jinja's, with formatters that bound every field.
            if not isinstance(value, bound_methods) or value.__name__ not in ("format", "format_map"):
                return None
            f_self = value.__self__
            if not isinstance(f_self, str):
                return None
            is_format_map = value.__name__ == "format_map"
            env = self

            def wrapper(*args: Any, **kwargs: Any) -> str:
                if is_format_map:
                    if kwargs:
                        raise TypeError("format_map() takes no keyword arguments")
                    if len(args) != 1:
                        raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                    kwargs, args = args[0], ()
                formatter: Any
                if isinstance(f_self, Markup):
                    formatter = _EscapeFormatter(env, escape=f_self.escape)
                else:
                    formatter = _Formatter(env)
                formatter.total = len(f_self)
                result = type(f_self)(formatter.vformat(f_self, args, kwargs))
                return str(_string_result(result, _state()))

            return wrapper

        def cdr_steps(self) -> Iterator[int]:
            return (getattr(_tls, "state", None) or _untimed()).steps

        def cdr_built(self, value: Any) -> Any:
            st = getattr(_tls, "state", None) or _untimed()
            weight, depth, _ = _measure(value, st)
            if weight > MAX_TEMPLATE_WEIGHT or depth > MAX_TEMPLATE_DEPTH:
                _check_weight(weight, depth)
            st.alloc -= sys.getsizeof(value)
            if st.alloc < 0:
                st.charge(0)  # raises
            return value

        def cdr_sliced(self, value: Any) -> Any:
            st = _state()
            if isinstance(value, (str, bytes)):
                return _string_result(value, st)
            if isinstance(value, (list, tuple)):
                st.charge(sys.getsizeof(value))
            return value

        def cdr_join(self, join: Callable[[Any], str], parts: tuple[Any, ...]) -> str:
            st = getattr(_tls, "state", None) or _untimed()
            total = 0
            for part in parts:
                total += len(part) if type(part) is str else _join_bound((part,), "", st)
            _check_length(total)
            result = join(parts)
            if len(result) > MAX_TEMPLATE_STRING:  # markup_join escapes: checked after
                _check_length(len(result))
            st.alloc -= len(result)
            if st.alloc < 0:
                st.charge(0)  # raises
            return result

    env = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"],
        finalize=_finalize,
    )
    for name, original in FILTERS.items():
        env.filters[name] = _checked_filter(name, original)
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_checked_dict,
        cycler=cycler,
        lipsum=_checked_lipsum,
        namespace=_Namespace,
    )
    return env


@lru_cache(maxsize=32)
def _compile_or_error(template: str) -> tuple[Any, str | None]:
    # Failures are remembered too: a hostile template fails every record the same way.
    from jinja2 import TemplateSyntaxError, nodes

    if len(template) > MAX_TEMPLATE_SOURCE:
        return None, f"chat template is too long ({len(template)} chars; the limit is {MAX_TEMPLATE_SOURCE})"
    env = _environment()
    try:
        ast = env.parse(template)
        for const in ast.find_all(nodes.Const):
            if isinstance(const.value, int) and const.value.bit_length() > MAX_TEMPLATE_INT_BITS:
                return None, f"chat template has a number too large (over {MAX_TEMPLATE_INT_BITS} bits)"
        return env.from_string(ast), None
    except TemplateSyntaxError as e:
        return None, f"chat template does not parse: {_one_line(e.message or '')} (line {e.lineno})"
    except TemplateError as e:
        return None, str(e)
    except Exception as e:  # RecursionError, MemoryError, a literal too long for int(), ...
        return None, f"chat template does not compile: {type(e).__name__}: {_one_line(str(e))}"


def _compile(template: str) -> Any:
    tpl, error = _compile_or_error(template)
    if error is not None:
        raise TemplateError(error)
    return tpl


def render(
    template: str,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render ``messages`` (:class:`chat.Message` s) with a (sandboxed) chat template, within the limits above."""
    from jinja2.exceptions import SecurityError

    st = _RenderState(timed=True)
    previous_state = getattr(_tls, "state", None)
    previous_trace = sys.gettrace()
    _tls.state = st
    try:
        sys.settrace(st)
        try:
            tpl = _compile(template)
        finally:
            sys.settrace(previous_trace)
        if st.tripped:  # a trip that jinja's constant folding swallowed
            raise TemplateError(st.tripped)
        st.restart()
        context = tpl.new_context(
            {
                "messages": [m.to_dict() for m in messages],
                "add_generation_prompt": add_generation_prompt,
                "bos_token": bos_token,
                "eos_token": eos_token,
            }
        )
        pieces: list[str] = []
        total = 0
        for piece in tpl.root_render_func(context):
            total += len(piece)
            if total > MAX_TEMPLATE_OUTPUT or st.tripped:
                raise TemplateError(
                    st.tripped or f"chat template output is too long (over {MAX_TEMPLATE_OUTPUT} chars)"
                )
            pieces.append(piece)
        if st.tripped:
            raise TemplateError(st.tripped)
        return "".join(pieces)
    except TemplateError:
        raise
    except SecurityError as e:
        raise TemplateError(f"chat template tried an unsafe operation: {_one_line(str(e))}") from None
    except Exception as e:  # Jinja errors, and OverflowError, ZeroDivisionError, MemoryError, ...
        raise TemplateError(f"chat template failed: {type(e).__name__}: {_one_line(str(e))}") from None
    finally:
        _tls.state = previous_state


