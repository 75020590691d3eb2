"""Pure parts of scoring: system-prompt placement and the truncation policy."""

from __future__ import annotations

from cdr_local.chat import Message
from cdr_local.scoring import _truncate, with_system


def test_with_system_prepends_or_merges():
    u = Message("user", "q")
    assert with_system([u], None) == [u]
    assert with_system([u], "crit") == [Message("system", "crit"), u]
    s = Message("system", "record's own")
    assert with_system([s, u], "crit") == [Message("system", "crit\n\nrecord's own"), u]


def test_truncate_noop_when_it_fits():
    t = _truncate([1, 2, 3], [[4, 5], [6]], n_ctx=5, keep_first=1)
    assert t.context == (1, 2, 3) and t.continuations == ((4, 5), (6,)) and t.truncated == (False, False)


def test_truncate_keeps_prompt_end_response_start_and_bos():
    ctx = [100] + list(range(1, 60))  # BOS + 59 prompt tokens
    long = list(range(200, 300))
    short = [7, 8]
    t = _truncate(ctx, [long, short], n_ctx=64, keep_first=1)
    # the prompt keeps half the window: BOS + its last 31 tokens
    assert t.context == (100, *range(29, 60))
    assert len(t.context) == 32
    # the response keeps its start, to the window's end
    assert t.continuations[0] == tuple(range(200, 232))
    assert t.continuations[1] == (7, 8)
    # the long one is cut; the short one is flagged because its prompt was cut
    assert t.truncated == (True, True)
    assert all(len(t.context) + len(c) <= 64 for c in t.continuations)


def test_truncate_short_prompt_long_response():
    t = _truncate([1, 2, 3], [list(range(100))], n_ctx=50, keep_first=0)
    assert t.context == (1, 2, 3)  # a short prompt is never cut
    assert t.continuations[0] == tuple(range(47))
    assert t.truncated == (True,)


def test_truncate_long_prompt_short_response_keeps_what_fits():
    t = _truncate(list(range(100)), [[1, 2]], n_ctx=50, keep_first=0)
    assert t.context == tuple(range(52, 100))  # all the room the response leaves
    assert t.continuations[0] == (1, 2)
    assert t.truncated == (True,)
