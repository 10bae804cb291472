"""Time-uniform boundaries: crossing probabilities and basic properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockgate.controller.stats.boundaries import (
    conditional_binomial_log_e,
    confidence_bounds,
    half_width_table,
    one_sided_boundary,
)


def _binom_tol(alpha: float, n: int) -> float:
    return alpha + 3.0 * math.sqrt(alpha * (1 - alpha) / n)


def test_boundary_monotone_in_alpha_and_info():
    rho = (1.0, 1 / 16, 1 / 256)
    b1 = one_sided_boundary(100.0, rho, 0.05)
    b2 = one_sided_boundary(100.0, rho, 0.01)
    assert b2 > b1 > 0
    bs = [one_sided_boundary(i, rho, 0.05) for i in (1.0, 10.0, 100.0, 1e4)]
    assert all(a < b for a, b in zip(bs, bs[1:]))
    # boundary / sqrt(info) grows only logarithmically (law-of-the-iterated-log-like)
    assert bs[-1] / math.sqrt(1e4) < 5.0
    assert math.isinf(one_sided_boundary(0.0, rho, 0.05))


def test_brownian_motion_crossing_probability_is_time_uniform():
    """Driftless random walk in information time, checked at every one of 400 looks."""
    rng = np.random.default_rng(0)
    alpha, n_paths, n_steps = 0.05, 20_000, 400
    info = np.cumsum(rng.uniform(0.5, 1.5, n_steps))  # irregular information increments
    incr = rng.normal(0.0, np.sqrt(np.diff(info, prepend=0.0)), size=(n_paths, n_steps))
    s = np.cumsum(incr, axis=1)
    tau = 0.2  # effect scale in units of the per-step drift
    b = np.array([one_sided_boundary(i, tuple(1 / (tau * m) ** 2 for m in (1, 4, 16)), alpha) for i in info])
    crossed = (s >= b[None, :]).any(axis=1).mean()
    assert crossed <= alpha
    # and it is not absurdly conservative for the first-order behaviour
    assert crossed > alpha / 20


def test_bounds_detect_drift_eventually():
    rng = np.random.default_rng(1)
    theta = 0.1
    n = np.arange(1, 20001)
    x = rng.normal(theta, 1.0, n.size)
    means = np.cumsum(x) / n
    lcb = [confidence_bounds(m, 1.0 / k, 0.1, 0.01)[0] for m, k in zip(means[::500], n[::500])]
    assert lcb[-1] > 0  # harm-direction bound eventually excludes 0
    assert lcb[0] < 0


@settings(max_examples=60, deadline=None)
@given(
    theta=st.floats(-1e3, 1e3),
    var=st.floats(1e-8, 1e4),
    tau=st.floats(1e-4, 1e2),
    alpha=st.floats(1e-4, 0.2),
)
def test_bounds_bracket_estimate(theta, var, tau, alpha):
    lo, hi = confidence_bounds(theta, var, tau, alpha)
    assert lo <= theta <= hi
    assert math.isclose(theta - lo, hi - theta, rel_tol=1e-9, abs_tol=1e-12)
    lo2, hi2 = confidence_bounds(theta, var, tau, alpha / 2)
    assert lo2 <= lo and hi2 >= hi


def test_bounds_unbounded_without_variance():
    assert confidence_bounds(0.3, 0.0, 1.0, 0.05) == (-math.inf, math.inf)
    assert confidence_bounds(0.3, float("nan"), 1.0, 0.05) == (-math.inf, math.inf)


def test_half_width_table_matches_exact():
    tau, alpha = 0.5, 0.01
    for info in (0.3, 10.0, 1234.0, 1e7):
        exact = one_sided_boundary(info, tuple(1 / (tau * m) ** 2 for m in (1, 4, 16)), alpha) / info
        approx = half_width_table(np.array([info * tau * tau]), alpha)[0] * tau
        assert approx == pytest.approx(exact, rel=2e-3)


def test_conditional_binomial_null_is_time_uniform():
    """Canary share changes across stages; events independent; e-value checked after every event."""
    rng = np.random.default_rng(2)
    alpha, n_sims = 0.05, 600
    shares = np.array([0.01, 0.05, 0.2, 0.5])
    crossed = 0
    for _ in range(n_sims):
        stage = np.repeat(np.arange(4), [5, 15, 40, 100])  # events per stage
        is_c = rng.random(stage.size) < shares[stage]
        hit = False
        for t in range(5, stage.size + 1, 5):
            x = np.bincount(stage[:t], weights=is_c[:t], minlength=4)
            e = np.bincount(stage[:t], minlength=4).astype(float)
            if conditional_binomial_log_e(x, e, shares, direction=1) >= math.log(1 / alpha):
                hit = True
                break
        crossed += hit
    assert crossed / n_sims <= _binom_tol(alpha, n_sims)


def test_conditional_binomial_detects_and_respects_composite_null():
    shares = np.array([0.05, 0.2, 0.5])
    e = np.array([40.0, 200.0, 800.0])
    # rate ratio 2 -> P(canary | event) = 2s / (2s + 1 - s)
    x_h1 = np.round(e * 2 * shares / (2 * shares + 1 - shares))
    assert conditional_binomial_log_e(x_h1, e, shares, direction=1) > math.log(1e6)
    x_h0 = np.round(e * 0.8 * shares / (0.8 * shares + 1 - shares))  # canary better
    assert conditional_binomial_log_e(x_h0, e, shares, direction=1) < 0
    # non-inferiority against ratio 1.5 with equal rates: evidence accumulates
    x_eq = np.round(e * shares)
    assert conditional_binomial_log_e(x_eq, e, shares, direction=-1, rho0=1.5) > math.log(100)
    assert conditional_binomial_log_e(np.zeros(3), np.zeros(3), shares, direction=1) == 0.0
