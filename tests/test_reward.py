"""The CDR reward and the per-record judgement (cdr_local.reward).  Pure, no models."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdr_local.reward import Judgement, ResponseScore, judge
from cdr_local.scoring import SideScore


def rs(
    strong: float,
    weak: float,
    n_strong: int = 1,
    n_weak: int = 1,
    *,
    trunc: tuple[bool, bool] = (False, False),
) -> ResponseScore:
    return ResponseScore(SideScore(strong, n_strong, trunc[0]), SideScore(weak, n_weak, trunc[1]))


def by_reward(*rewards: float) -> list[ResponseScore]:
    """Scores whose (sum) rewards are exactly the given values."""
    return [rs(r - 10.0, -10.0) for r in rewards]


def test_reward_is_strong_minus_weak() -> None:
    s = rs(-12.5, -20.0, 5, 8)
    assert s.reward == pytest.approx(7.5)
    assert rs(-20.0, -12.5).reward == pytest.approx(-7.5)
    assert rs(-3.0, -3.0).reward == 0.0


def test_reward_mean_uses_each_sides_token_count() -> None:
    s = rs(-12.0, -20.0, 4, 10)
    assert s.reward_mean == pytest.approx(-12.0 / 4 - (-20.0 / 10))  # -3 - (-2) = -1
    assert s.reward_mean == pytest.approx(-1.0)
    # Not the summed reward divided by one count.
    assert s.reward_mean != pytest.approx(s.reward / 4)
    assert s.reward_mean != pytest.approx(s.reward / 10)
    same = rs(-6.0, -9.0, 3, 3)
    assert same.reward_mean == pytest.approx(same.reward / 3)


def test_truncated_if_either_side_is() -> None:
    assert not rs(-1, -1).truncated
    assert rs(-1, -1, trunc=(True, False)).truncated
    assert rs(-1, -1, trunc=(False, True)).truncated
    assert rs(-1, -1, trunc=(True, True)).truncated


def test_judge_two() -> None:
    a = rs(-10.0, -15.0, 5, 5)  # reward 5, mean 1
    b = rs(-30.0, -28.0, 10, 4)  # reward -2, mean -3 + 7 = 4
    j = judge([a, b])
    assert j == Judgement(
        best=0, worst=1, tie=False, margin=pytest.approx(7.0), margin_mean=pytest.approx(1.0 - 4.0)
    )
    # margin_mean is for the same two responses and may be negative.
    assert j.margin_mean < 0
    j2 = judge([b, a])
    assert (j2.best, j2.worst, j2.tie) == (1, 0, False)
    assert j2.margin == pytest.approx(7.0)
    assert j2.margin_mean == pytest.approx(-3.0)


@given(
    st.lists(
        st.tuples(st.floats(-1e4, 0), st.floats(-1e4, 0), st.integers(1, 500), st.integers(1, 500)),
        min_size=2,
        max_size=6,
    )
)
@settings(max_examples=200, deadline=None)
def test_judge_properties(rows: list[tuple[float, float, int, int]]) -> None:
    scores = [rs(a, b, n, m) for a, b, n, m in rows]
    rewards = [s.reward for s in scores]
    j = judge(scores)
    assert 0 <= j.best < len(scores) and 0 <= j.worst < len(scores)
    assert j.best != j.worst
    assert j.margin >= 0
    assert j.margin == rewards[j.best] - rewards[j.worst]
    assert j.margin_mean == scores[j.best].reward_mean - scores[j.worst].reward_mean
    assert j.tie == (max(rewards) == min(rewards))
    if j.tie:
        assert (j.best, j.worst, j.margin) == (0, 1, 0)
    else:
        assert rewards[j.best] == max(rewards) and j.best == rewards.index(max(rewards))
        assert rewards[j.worst] == min(rewards)


def test_tie_two_identical() -> None:
    s = rs(-7.0, -9.0, 3, 4)
    j = judge([s, s])
    assert j.tie is True
    assert (j.best, j.worst) == (0, 1)
    assert j.margin == 0.0
    assert j.margin_mean == 0.0


def test_tie_equal_rewards_different_means() -> None:
    a = rs(-10.0, -12.0, 2, 4)  # reward 2, mean -5 + 3 = -2
    b = rs(-20.0, -22.0, 10, 11)  # reward 2, mean -2 + 2 = 0
    j = judge([a, b])
    assert j.tie is True and (j.best, j.worst) == (0, 1) and j.margin == 0.0
    assert j.margin_mean == pytest.approx(-2.0)


def test_tie_three_all_equal() -> None:
    j = judge(by_reward(1.5, 1.5, 1.5))
    assert (j.best, j.worst, j.tie, j.margin) == (0, 1, True, 0.0)


def test_single_response() -> None:
    s = rs(-3.0, -5.0, 2, 2)
    j = judge([s])
    assert j.tie is True
    assert j.margin == 0.0 and j.margin_mean == 0.0
    assert j.best == 0 and j.worst == 0


def test_empty_raises() -> None:
    with pytest.raises(ValueError):
        judge([])


@pytest.mark.parametrize(
    "rewards, best, worst",
    [
        ((1.0, 4.0, -2.0, 3.0), 1, 2),
        ((-1.0, -4.0, -2.0, -3.0), 0, 1),
        ((0.5, 0.1, 0.2, 0.9), 3, 1),
        ((4.0, 1.0, 4.0, 2.0), 0, 1),  # first index wins among equal maxima
        ((1.0, 4.0, 4.0, 4.0), 1, 0),
        ((3.0, -1.0, 2.0, -1.0), 0, 1),  # first index among equal minima
        ((2.0, 2.0, 2.0, -5.0), 0, 3),  # equal maxima, not a tie
    ],
)
def test_judge_four(rewards: tuple[float, ...], best: int, worst: int) -> None:
    scores = by_reward(*rewards)
    assert [s.reward for s in scores] == pytest.approx(list(rewards))
    j = judge(scores)
    assert (j.best, j.worst, j.tie) == (best, worst, False)
    assert j.margin == pytest.approx(rewards[best] - rewards[worst])
    assert j.margin > 0
    assert j.margin_mean == pytest.approx(scores[best].reward_mean - scores[worst].reward_mean)


def test_judge_uses_sum_not_mean() -> None:
    # a wins on the summed reward, b on the per-token mean: the sum decides.
    a = rs(-100.0, -110.0, 100, 100)  # reward 10, mean 0.1
    b = rs(-1.0, -3.0, 1, 1)  # reward 2, mean 2
    j = judge([b, a])
    assert (j.best, j.worst) == (1, 0)
    assert j.margin == pytest.approx(8.0)
    assert j.margin_mean == pytest.approx(0.1 - 2.0)
