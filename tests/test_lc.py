"""The length-controlled GLM: recovery of known parameters, and the length-only model."""

from __future__ import annotations

import numpy as np
import pytest

from cdr_local.lc import (
    fit_length_control,
    fit_logistic,
    fit_tau,
    lc_win_rate,
    length_feature,
    sigmoid,
    soft_rows,
)


def test_length_feature_is_tanh_over_uncentred_std():
    d = np.array([100.0, -300.0, 50.0, 0.0, 900.0])
    f, sd = length_feature(d)
    assert sd == pytest.approx(np.std(d, ddof=1))
    assert np.allclose(f, np.tanh(d / sd))
    # not centred: a constant shift changes the feature
    f2, _ = length_feature(d + 1000)
    assert not np.allclose(f2 - f2.mean(), f - f.mean())


def test_recovers_theta_and_phi_from_soft_labels_exactly():
    rng = np.random.default_rng(0)
    dlen = rng.normal(-200, 600, 3000)
    f, _ = length_feature(dlen)
    theta, phi = 0.4, -1.3
    p = sigmoid(theta + phi * f)
    fit = fit_logistic(*soft_rows(p, f[:, None]))
    assert fit.converged
    # soft labels equal to the model's own probabilities: the MLE is the truth
    assert fit.coef[0] == pytest.approx(theta, abs=1e-6)
    assert fit.coef[1] == pytest.approx(phi, abs=1e-6)


@pytest.mark.parametrize("theta,phi", [(0.0, -1.0), (0.8, 0.5), (-0.5, -2.0)])
def test_recovers_theta_and_phi_from_sampled_labels(theta, phi):
    """Hard 0/1 labels drawn from the GLM: recovered within 0.15 (about 3 standard errors at n=4000)."""
    rng = np.random.default_rng(1)
    n = 4000
    dlen = rng.normal(0, 500, n)
    f, _ = length_feature(dlen)
    y = (rng.random(n) < sigmoid(theta + phi * f)).astype(float)
    res = lc_win_rate(y, dlen, n_boot=0)
    assert res.theta == pytest.approx(theta, abs=0.15)
    assert res.phi == pytest.approx(phi, abs=0.15)


def test_length_only_advantage_gives_lc_near_50_and_high_raw():
    """A model that wins only by being longer: raw win rate far above 50%, LC near 50%."""
    rng = np.random.default_rng(2)
    n = 2000
    base_len = rng.integers(300, 1500, n)
    model_len = base_len + rng.integers(200, 1500, n)  # always longer
    model_len[: n // 5] = base_len[: n // 5] - rng.integers(0, 400, n // 5)  # sometimes shorter
    dlen = (base_len - model_len).astype(float)
    f, _ = length_feature(dlen)
    # the judge's preference depends on length alone (theta = 0: no quality edge)
    p_true = sigmoid(-2.5 * f)
    y = (rng.random(n) < p_true).astype(float)
    res = lc_win_rate(y, dlen, n_boot=100)
    assert res.win_rate > 75
    assert abs(res.lc_win_rate - 50) < 4
    assert res.phi < -2
    assert 0 < res.lc_standard_error < 3
    # and a model with a real edge keeps it after length control
    y2 = (rng.random(n) < sigmoid(1.0 - 2.5 * f)).astype(float)
    res2 = lc_win_rate(y2, dlen, n_boot=0)
    assert res2.lc_win_rate == pytest.approx(100 * sigmoid(res2.theta), abs=1e-9)
    assert res2.lc_win_rate > 65


def test_difficulty_term():
    rng = np.random.default_rng(3)
    n = 4000
    dlen = rng.normal(0, 400, n)
    diff = rng.normal(0, 1, n)
    f, _ = length_feature(dlen)
    p = sigmoid(0.3 - 0.8 * f + 0.6 * diff)
    res = lc_win_rate(p, dlen, diff, n_boot=0)
    assert res.psi == pytest.approx(0.6, abs=1e-5)
    assert res.lc_win_rate == pytest.approx(100 * np.mean(sigmoid(res.theta + res.psi * diff)), abs=1e-9)


def test_l2_shrinks_and_l1_zeroes():
    rng = np.random.default_rng(4)
    X = rng.normal(0, 1, (500, 2))
    y = (rng.random(500) < sigmoid(0.5 + 1.5 * X[:, 0])).astype(float)
    free = fit_logistic(X, y).coef
    ridge = fit_logistic(X, y, l2=200.0).coef
    lasso = fit_logistic(X, y, l1=30.0).coef
    assert abs(ridge[1]) < abs(free[1])
    assert abs(lasso[2]) < 1e-3 < abs(lasso[1])  # the useless feature is driven to ~0


def test_length_control_removes_the_length_term():
    """Margins that are a sum over tokens (slope nats a token) plus a small content
    term: the margin-scale fit recovers the slope by least squares through the
    origin, and the adjusted margins keep only the content term."""
    rng = np.random.default_rng(5)
    n = 3000
    dtok = rng.integers(-300, 300, n).astype(float)
    content = rng.normal(0, 1.0, n)
    margin = 0.4 * dtok + content
    lc = fit_length_control(margin, dtok)
    assert lc.slope == pytest.approx(float(np.dot(dtok, margin) / np.dot(dtok, dtok)), abs=1e-12)  # the formula
    assert lc.slope == pytest.approx(0.4, abs=0.01)
    assert lc.r2 > 0.9
    adjusted = np.array([lc.adjust(m, d) for m, d in zip(margin, dtok, strict=True)])
    assert np.corrcoef(adjusted, content)[0, 1] > 0.99
    # the labels: those that followed length alone flip; what content says stays
    flipped = np.mean((margin > 0) != (adjusted > 0))
    assert 0.3 < flipped < 0.6


def test_saturated_soft_labels_report_no_convergence():
    """Soft labels of 0 and 1 that length separates perfectly (margins of tens of nats
    read at tau = 1): the MLE is at infinity.  The damped fit must stop and say so
    (the undamped one ran to phi = -268 silently), and lc_win_rate must warn."""
    rng = np.random.default_rng(7)
    dlen = rng.normal(0, 500, 200)
    p = (dlen < 0).astype(float)  # the longer one always wins, with certainty
    fit = fit_logistic(*soft_rows(p, length_feature(dlen)[0][:, None]))
    assert not fit.converged
    assert np.all(np.isfinite(fit.coef))
    res = lc_win_rate(p, dlen, n_boot=0)
    assert not res.converged and any("did not converge" in w for w in res.warnings)


def test_step_halving_never_increases_the_objective():
    from cdr_local.lc import _objective

    rng = np.random.default_rng(8)
    X = rng.normal(0, 3, (300, 1))
    y = (X[:, 0] + rng.normal(0, 0.1, 300) > 0).astype(float)  # nearly separable
    A = np.hstack([np.ones((300, 1)), X])
    pen = np.array([0.0, 1.0])
    fit = fit_logistic(X, y, max_iter=1)
    assert _objective(A, y, np.ones(300), fit.coef, 0, 0, pen) <= _objective(A, y, np.ones(300), np.zeros(2), 0, 0, pen)


def test_cv_drops_a_length_term_that_does_not_predict():
    """A model whose outputs are always longer (every dlen < 0) but whose preferences do
    not depend on length: cross-validated L1 removes the length term, so LC stays at
    the raw win rate instead of extrapolating to dlen = 0 (the twice-written baseline:
    raw 51.8 went to LC 18.9 with the unpenalised fit)."""
    rng = np.random.default_rng(9)
    n = 100
    base_len = rng.integers(200, 2000, n)
    dlen = -base_len.astype(float)  # the model's output is the baseline's written twice
    p = sigmoid(rng.normal(0.1, 1.0, n))  # content equal: preferences are noise around 50
    res = lc_win_rate(p, dlen, cv=True, n_boot=50)
    assert res.l1 > 0 and abs(res.phi) < 1e-3
    assert res.lc_win_rate == pytest.approx(res.win_rate, abs=0.5)
    assert not any("extrapolates" in w for w in res.warnings)
    # without the penalty the same rows can drag LC far off
    free = lc_win_rate(p, dlen, n_boot=0)
    assert abs(free.lc_win_rate - free.win_rate) > abs(res.lc_win_rate - res.win_rate)


def test_cv_keeps_a_length_term_that_predicts():
    rng = np.random.default_rng(10)
    n = 2000
    dlen = rng.normal(0, 600, n)
    f, _ = length_feature(dlen)
    y = (rng.random(n) < sigmoid(0.2 - 2.0 * f)).astype(float)
    res = lc_win_rate(y, dlen, cv=True, n_boot=0)
    assert res.phi < -1.5  # kept, barely shrunk (true -2.0)
    assert res.lc_win_rate == pytest.approx(100 * sigmoid(res.theta), abs=1e-9)


def test_extreme_change_is_alpaca_evals_rule():
    from cdr_local.lc import extreme_change

    # raw 20: warn below min(20 - 5, 20 - 10) = 10 or above max(20 + 20, 30) = 40
    assert extreme_change(20, 9.9) and not extreme_change(20, 10.1)
    assert extreme_change(20, 40.1) and not extreme_change(20, 39.9)
    # raw 50: below 37.5 or above 62.5
    assert extreme_change(50, 37.4) and not extreme_change(50, 37.6) and extreme_change(50, 62.6)


def test_fit_tau():
    rng = np.random.default_rng(6)
    m = rng.normal(1.0, 3.0, 5000)
    y = rng.random(5000) < sigmoid(m / 2.5)
    # flip the margin sign where the label says rejected won: margins are chosen - rejected
    mcr = np.where(y, m, -m)
    assert fit_tau(mcr) == pytest.approx(2.5, rel=0.1)
    with pytest.raises(ValueError):
        fit_tau(-np.abs(m))
