"""Planning: samples needed, hours, and the auto allowed change."""

import math

import numpy as np
import pytest

from lockgate.controller.stats import MetricSpec, auto_allowed, evaluate_mean, hours_needed, samples_needed


def test_samples_needed_monotone_and_scaling():
    n1 = samples_needed(0.02, 0.01, sd_canary=0.15, share=0.05)
    n2 = samples_needed(0.01, 0.01, sd_canary=0.15, share=0.05)
    n3 = samples_needed(0.02, 0.001, sd_canary=0.15, share=0.05)
    n4 = samples_needed(0.02, 0.01, sd_canary=0.15, share=0.05, design_effect=2.0)
    assert n2 > 3 * n1  # ~4x (slightly more: the boundary grows with log of information)
    assert n3 > n1
    assert n4 > 1.8 * n1
    assert samples_needed(0.02, 0.01, sd_canary=0.15, share=0.05, true_diff=0.01) > n1
    assert samples_needed(0.02, 0.01, sd_canary=0.15, share=0.05, true_diff=0.03) is None
    # equivalent parameterisation
    v1 = 0.15**2 * (1 + 0.05 / 0.95)
    assert samples_needed(0.02, 0.01, var_per_canary_obs=v1) == n1


def test_samples_needed_predicts_when_noninferiority_passes():
    """At ~n_needed the bound reaches delta for a typical sample; well beyond it almost always passes."""
    rng = np.random.default_rng(0)
    sd, delta, alpha, share = 1.0, 0.1, 0.05, 0.5
    n = samples_needed(delta, alpha, sd_canary=sd, share=share)
    spec = MetricSpec("m", "mean", "increase", allowed=delta)
    rates = []
    for mult in (1.0, 4.0):
        k = int(n * mult)
        passes = 0
        for _ in range(100):
            v = np.concatenate([rng.normal(0, sd, k), rng.normal(0, sd, k)])
            is_c = np.repeat([True, False], k)
            passes += evaluate_mean(v, is_c, np.arange(2 * k), spec, alpha).verdict == "pass"
        rates.append(passes / 100)
    assert 0.3 <= rates[0] <= 0.8
    assert rates[1] >= 0.95


def test_verdict_reports_n_needed_and_hours():
    rng = np.random.default_rng(1)
    k = 400
    v = rng.normal(0, 1, 2 * k)
    is_c = np.repeat([True, False], k)
    r = evaluate_mean(v, is_c, np.arange(2 * k), MetricSpec("m", "mean", allowed=0.05), 0.01)
    assert r.verdict == "not-yet"
    assert r.n_needed is not None and r.n_needed > k
    assert f"~{r.n_needed} canary observations" in r.reason
    h = hours_needed(r.n_needed, r.n_canary, requests_per_hour=1000, share=0.05)
    assert h == pytest.approx((r.n_needed - k) / 50.0)
    assert hours_needed(10, 20, 1000, 0.05) == 0.0
    assert hours_needed(None, 20, 1000, 0.05) is None


def test_auto_allowed_from_daily_blocks():
    rng = np.random.default_rng(2)
    days = 14
    day_means = 300 + rng.normal(0, 4, days)
    ts = np.concatenate([d * 86400 + rng.uniform(0, 86400, 500) for d in range(days)])
    vals = np.concatenate([rng.normal(m, 1, 500) for m in day_means])
    vals[::50] = np.nan
    a = auto_allowed(vals, ts, k=2.5, name="output_tokens", unit="tokens")
    expected_sd = np.std([np.nanmean(vals[i * 500:(i + 1) * 500]) for i in range(days)], ddof=1)
    assert a.n_blocks == days
    assert a.block_sd == pytest.approx(expected_sd, rel=1e-9)
    assert a.value == pytest.approx(2.5 * expected_sd)
    assert "2.5 x sd of 14 per-day baseline means of output_tokens" in a.derivation
    spec = MetricSpec("output_tokens", "mean", allowed=a.value, allowed_derivation=a.derivation, unit="tokens")
    assert spec.to_dict()["allowed_derivation"] == a.derivation
    q = auto_allowed(vals, ts, statistic="quantile", quantile=0.95, block_seconds=86400)
    assert "p95" in q.derivation and q.value > 0
    with pytest.raises(ValueError):
        auto_allowed(vals[:1000], ts[:1000])  # two days only
    assert math.isfinite(a.to_dict()["value"])
