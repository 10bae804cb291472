"""Per-metric evaluators: invariances, NaN handling, label arrival, explanations, JSON, speed."""

import json
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockgate.controller.stats import (
    MetricSpec,
    evaluate_all,
    evaluate_class,
    evaluate_mean,
    evaluate_quantile,
    evaluate_rate,
    judge,
    split_alpha,
    usable_labels,
)
from lockgate.controller.stats.estimators import factorize, stratified_difference
from lockgate.controller.stats.verdict import MetricVerdict
from lockgate.controller.stats.simulate import Effects, RolloutConfig, default_specs, simulate_rollout

MEAN = MetricSpec("tokens", "mean", "increase", allowed=5.0)
RATE = MetricSpec("errors", "rate", "increase", allowed=0.5, allowed_mode="relative")
P95 = MetricSpec("lat_p95", "quantile", "increase", allowed=0.1, allowed_mode="relative", quantile=0.95, unit="ms")


def _data(rng, n=4000, users=400, shift=0.0, share=0.3):
    user = rng.integers(0, users, n)
    is_c = rng.random(users)[user] < share
    ue = rng.normal(0, 1, users)
    v = 100 + 5 * ue[user] + rng.normal(0, 10, n) + shift * is_c
    return v, is_c, user


# ---------------------------------------------------------------- estimator


def test_cluster_robust_variance_matches_hand_computation():
    rng = np.random.default_rng(0)
    v, is_c, user = _data(rng, n=3000, users=300)
    cl, ncl = factorize(user)
    st_idx = np.zeros(v.size, dtype=np.intp)
    est = stratified_difference(v, is_c.astype(int), cl, ncl, st_idx, 1)
    # hand: per-user sums of deviations, one arm per user
    # CR2: each user's summed residual divided by sqrt(1 - leverage), leverage = its share of its arm
    var = 0.0
    for arm in (0, 1):
        m = is_c == bool(arm)
        mu = v[m].mean()
        dev = np.bincount(user[m], weights=v[m] - mu, minlength=300)
        lev = np.bincount(user[m], minlength=300) / m.sum()
        var += np.sum(dev**2 / (1.0 - lev)) / m.sum() ** 2
    g = len(np.unique(user))
    assert est.variance == pytest.approx(var * g / (g - 1), rel=1e-9)
    assert est.estimate == pytest.approx(v[is_c].mean() - v[~is_c].mean())
    # iid (one cluster per row) is much smaller with strongly correlated users
    est_iid = stratified_difference(v, is_c.astype(int), np.arange(v.size), v.size, st_idx, 1)
    assert est_iid.variance < est.variance


def test_stratification_removes_drift_bias():
    """Baseline drifts up over time while canary share grows: pooled difference is biased, stratified is not."""
    rng = np.random.default_rng(1)
    n = 40_000
    stage = np.repeat([0, 1], n // 2)
    share = np.where(stage == 0, 0.05, 0.5)
    is_c = rng.random(n) < share
    level = np.where(stage == 0, 0.0, 10.0)  # drift, same for both arms
    v = level + rng.normal(0, 1, n)
    pooled = v[is_c].mean() - v[~is_c].mean()
    assert pooled > 3  # Simpson-style bias
    verdict = evaluate_mean(v, is_c, np.arange(n), MetricSpec("m", "mean", allowed=0.1), 0.05, stratum=share)
    assert abs(verdict.difference) < 0.05
    assert verdict.verdict == "pass"


# ---------------------------------------------------------------- invariances


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_nan=st.integers(0, 500))
def test_nan_means_not_measured(seed, n_nan):
    rng = np.random.default_rng(seed)
    v, is_c, user = _data(rng, n=1500, users=150)
    base = evaluate_mean(v, is_c, user, MEAN, 0.05)
    v2 = np.concatenate([v, np.full(n_nan, np.nan)])
    c2 = np.concatenate([is_c, rng.random(n_nan) < 0.5])
    u2 = np.concatenate([user, rng.integers(0, 150, n_nan)])
    other = evaluate_mean(v2, c2, u2, MEAN, 0.05)
    assert other.to_dict() == base.to_dict()
    # NaN is never zero: zeros would move the mean
    zero = evaluate_mean(np.nan_to_num(v2), c2, u2, MEAN, 0.05)
    if n_nan > 50:
        assert zero.canary != base.canary or zero.baseline != base.baseline


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_row_order_and_cluster_labels_do_not_matter(seed):
    rng = np.random.default_rng(seed)
    v, is_c, user = _data(rng, n=1200, users=120)
    perm = rng.permutation(v.size)
    names = np.array([f"user-{u:05d}-hash" for u in range(120)])
    a = evaluate_quantile(v, is_c, user, P95, 0.05)
    b = evaluate_quantile(v[perm], is_c[perm], names[user][perm], P95, 0.05)
    assert a.verdict == b.verdict
    assert a.interval == b.interval
    assert a.details["exceedance_lcb_harm"] == pytest.approx(b.details["exceedance_lcb_harm"], rel=1e-9, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(-3, 3))
def test_harmful_direction_mirrors(seed, shift):
    rng = np.random.default_rng(seed)
    v, is_c, user = _data(rng, n=1500, users=150, shift=shift)
    up = evaluate_mean(v, is_c, user, MetricSpec("m", "mean", "increase", allowed=2.0), 0.05)
    down = evaluate_mean(-v, is_c, user, MetricSpec("m", "mean", "decrease", allowed=2.0), 0.05)
    assert up.verdict == down.verdict
    assert up.interval[0] == pytest.approx(-down.interval[1])
    assert up.interval[1] == pytest.approx(-down.interval[0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(-5, 5), alpha=st.floats(0.001, 0.2))
def test_verdict_consistent_with_interval_and_json(seed, shift, alpha):
    rng = np.random.default_rng(seed)
    v, is_c, user = _data(rng, n=2000, users=200, shift=shift)
    r = evaluate_mean(v, is_c, user, MEAN, alpha)
    lo, hi = r.interval
    # one sequence, one line (the allowance): fail beyond it, pass within it
    if r.verdict == "fail":
        assert lo > r.allowed
    elif r.verdict == "pass":
        assert hi < r.allowed and not lo > r.allowed
    else:
        assert not lo > r.allowed and not hi < r.allowed
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["verdict"] in ("pass", "fail", "not-yet")
    assert isinstance(d["reason"], str) and d["reason"]


# ---------------------------------------------------------------- kinds


def test_mean_regression_detected_and_explained():
    rng = np.random.default_rng(3)
    v, is_c, user = _data(rng, n=20_000, users=2000, shift=10.0)
    r = evaluate_mean(v, is_c, user, MEAN, 0.01)
    assert r.verdict == "fail" and r.interval[0] > MEAN.allowed
    assert "beyond the allowance" in r.reason and "allowed +5" in r.reason


def test_worse_within_the_allowance_is_never_a_rollback_at_any_traffic():
    """The old harm test asked about 0: with enough traffic every real difference was 'harm'."""
    rng = np.random.default_rng(33)
    v, is_c, user = _data(rng, n=200_000, users=20_000, shift=2.5)  # worse by half the allowance of 5
    r = evaluate_mean(v, is_c, user, MEAN, 0.01)
    assert r.interval[0] > 0  # the canary is shown worse ...
    assert r.verdict == "pass"  # ... but within its allowance
    assert r.n_canary + r.n_baseline == v.size
    assert r.clusters_canary + r.clusters_baseline == len(np.unique(user))


def test_relative_allowed_uses_baseline_scale():
    rng = np.random.default_rng(4)
    v, is_c, user = _data(rng, n=20_000, users=4000)
    r = evaluate_mean(v, is_c, user, MetricSpec("m", "mean", allowed=0.05, allowed_mode="relative"), 0.05)
    assert r.allowed == pytest.approx(0.05 * r.baseline)
    assert r.verdict == "pass"
    assert "1.05 x baseline" in r.reason


def test_min_clusters_guard():
    rng = np.random.default_rng(5)
    v, is_c, user = _data(rng, n=2000, users=15, shift=50)
    r = evaluate_mean(v, is_c, user, MEAN, 0.05)
    assert r.verdict == "not-yet" and "too few users" in r.reason
    r2 = evaluate_mean(v, is_c, user, MEAN, 0.05, min_clusters=2)
    assert r2.verdict == "fail"


def test_rate_zero_events_and_detection():
    rng = np.random.default_rng(6)
    n = 50_000
    user = rng.integers(0, 10_000, n)
    share = np.where(np.arange(n) < n // 2, 0.05, 0.5)
    is_c = rng.random(10_000)[user] < share
    none = np.zeros(n, dtype=bool)
    r0 = evaluate_rate(none, is_c, share, user, RATE, 0.05)
    assert r0.verdict != "fail"
    assert r0.interval[1] is not None and r0.interval[1] > 0  # zero events never means zero variance
    ev = rng.random(n) < np.where(is_c, 0.025, 0.01)  # ratio 2.5, allowed 1.5
    r = evaluate_rate(ev, is_c, share, user, RATE, 0.01)
    assert r.verdict == "fail"
    assert "count test against rate ratio 1.5" in r.reason
    ev_within = rng.random(n) < np.where(is_c, 0.012, 0.01)  # ratio 1.2: worse, within 1.5
    assert evaluate_rate(ev_within, is_c, share, user, RATE, 0.01).verdict != "fail"
    ev_ok = rng.random(n) < 0.01
    r_ok = evaluate_rate(ev_ok, is_c, share, user, RATE, 0.05)
    assert r_ok.verdict in ("pass", "not-yet")
    with pytest.raises(ValueError):
        evaluate_rate(np.full(n, 2.0), is_c, share, user, RATE, 0.05)


def test_quantile_interval_covers_shift():
    rng = np.random.default_rng(7)
    n = 60_000
    user = rng.integers(0, 20_000, n)
    is_c = rng.random(20_000)[user] < 0.4
    lat = np.exp(rng.normal(6.5, 0.5, n)) * np.where(is_c, 1.3, 1.0)
    r = evaluate_quantile(lat, is_c, user, P95, 0.01)
    true_b = math.exp(6.5 + 0.5 * 1.6448536)
    assert r.verdict == "fail"
    lo, hi = r.interval
    assert lo < 0.3 * true_b < hi
    assert lo > r.allowed  # shown beyond the allowed +10 %
    assert r.unit == "ms" and "p95" in r.reason
    # decrease-harmful mirror (e.g. throughput p05)
    spec_dn = MetricSpec("tp_p05", "quantile", "decrease", allowed=0.01, allowed_mode="relative", quantile=0.05)
    r_dn = evaluate_quantile(-lat * 5 + 1e5, is_c, user, spec_dn, 0.01)  # p05 falls ~2.4 %, allowed 1 %
    assert r_dn.verdict == "fail"
    assert r_dn.interval[1] < -r_dn.allowed


def test_quantile_exceedance_ratio_allowance():
    rng = np.random.default_rng(8)
    n = 60_000
    user = rng.integers(0, 20_000, n)
    is_c = rng.random(20_000)[user] < 0.4
    spec = MetricSpec("lat_p95", "quantile", "increase", allowed=1.2, allowed_mode="exceedance_ratio",
                      quantile=0.95, unit="ms")
    base = np.exp(rng.normal(6.5, 0.5, n))
    bad = evaluate_quantile(base * np.where(is_c, 1.2, 1.0), is_c, user, spec, 0.01)
    assert bad.verdict == "fail" and bad.interval[0] > bad.allowed
    assert bad.details["exceedance_canary"] > 1.2 * 0.05
    same = evaluate_quantile(base, is_c, user, spec, 0.01)
    assert same.verdict == "pass" and same.interval[1] < same.allowed
    with pytest.raises(ValueError):
        MetricSpec("m", "mean", allowed=1.2, allowed_mode="exceedance_ratio")


def test_quantile_interval_flag_does_not_change_verdict():
    rng = np.random.default_rng(8)
    v, is_c, user = _data(rng, n=5000, users=1000, shift=1.0)
    a = evaluate_quantile(v, is_c, user, P95, 0.05)
    b = evaluate_quantile(v, is_c, user, P95, 0.05, compute_interval=False)
    assert a.verdict == b.verdict and b.interval == (None, None)


# ---------------------------------------------------------------- classes and labels


def _class_data(rng, n=30_000):
    user = rng.integers(0, 5000, n)
    is_c = rng.random(5000)[user] < 0.5
    true = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    pred = np.where(rng.random(n) < 0.85, true, (true + 1) % 3)
    ts = np.arange(n, dtype=float)
    arrival = ts + rng.exponential(600, n)
    return pred, true, arrival, is_c, user


def test_labels_after_now_are_ignored():
    rng = np.random.default_rng(9)
    pred, true, arrival, is_c, user = _class_data(rng)
    now = 20_000.0
    spec = MetricSpec("recall_2", "class_recall", "decrease", allowed=0.02, cls=2)
    a = evaluate_class(pred, true, arrival, now, is_c, user, spec, 0.05)
    late = arrival > now
    true2 = true.copy()
    true2[late] = 2  # what late labels say must not matter
    pred2 = pred.copy()
    pred2[late & is_c] = 0
    b = evaluate_class(pred2, true2, arrival, now, is_c, user, spec, 0.05)
    assert a.to_dict() == b.to_dict()
    assert a.details["labels_usable"] == int(usable_labels(true, arrival, now).sum())
    assert usable_labels(np.array([1.0, np.nan, 2.0]), np.array([1.0, 1.0, np.inf]), 5.0).tolist() == [True, False, False]
    obj = np.array(["a", None, "b"], dtype=object)
    assert usable_labels(obj, np.array([1.0, 1.0, 9.0]), 5.0).tolist() == [True, False, False]


def test_class_precision_and_string_labels():
    rng = np.random.default_rng(10)
    pred, true, arrival, is_c, user = _class_data(rng)
    names = np.array(["billing", "tech", "fraud"])
    spec = MetricSpec("precision_fraud", "class_precision", "decrease", allowed=0.1, cls="fraud")
    r = evaluate_class(names[pred], names[true].astype(object), arrival, 1e9, is_c, user, spec, 0.05)
    assert r.verdict == "pass"
    assert 0.5 < r.baseline < 1.0


def test_no_aggregate_accuracy_kind_and_spec_validation():
    with pytest.raises(ValueError):
        MetricSpec("accuracy", "accuracy")
    with pytest.raises(ValueError):
        MetricSpec("recall", "class_recall", "increase", cls=1)
    with pytest.raises(ValueError):
        MetricSpec("q", "quantile")
    with pytest.raises(ValueError):
        MetricSpec("m", "mean", allowed=-1)
    with pytest.raises(ValueError):
        MetricSpec("m", "mean", allowed_mode="auto")


# ---------------------------------------------------------------- judge


def _v(name, verdict, gating=True, alpha=0.025):
    return MetricVerdict(name, "mean", verdict, f"{name} is {verdict}", 1.0, 1.0, 0.0, (None, None), 0.1,
                         "absolute", "increase", 10, 10, 5, 5, alpha, gating)


def test_judge_rules_and_alpha_split():
    a = 0.05
    assert judge([_v("a", "fail"), _v("b", "pass")], a).decision == "rollback"
    assert judge([_v("a", "pass"), _v("b", "pass")], a).decision == "promote"
    assert judge([_v("a", "pass"), _v("b", "not-yet")], a).decision == "continue"
    j = judge([_v("a", "pass"), _v("b", "pass"), _v("c", "fail", gating=False)], a)
    assert j.decision == "promote" and any("non-gating" in r for r in j.reasons)
    assert "Bonferroni" in j.alpha_statement and j.alpha_per_metric == pytest.approx(0.025)
    assert judge([], a).decision == "continue"
    with pytest.raises(ValueError):
        judge([_v("a", "pass", alpha=0.05), _v("b", "pass", alpha=0.05)], a)
    assert split_alpha(default_specs(), 0.05) == pytest.approx({s.name: 0.01 for s in default_specs()})
    json.dumps(j.to_dict(), allow_nan=False)


def test_alpha_split_by_family_and_explicit_share():
    specs = [MetricSpec("errors", "rate", alpha=0.02)] + [
        MetricSpec(f"recall_{c}", "class_recall", "decrease", cls=c, family="recall") for c in range(5)
    ] + [MetricSpec("tokens", "mean"), MetricSpec("watch", "mean", gating=False)]
    a = split_alpha(specs, 0.05)
    assert a["errors"] == pytest.approx(0.02)
    assert a["tokens"] == pytest.approx(0.015)  # the rest split over two units: tokens and the recall family
    assert all(a[f"recall_{c}"] == pytest.approx(0.003) for c in range(5))
    assert sum(a[s.name] for s in specs if s.gating) == pytest.approx(0.05)
    assert a["watch"] == pytest.approx(0.015)
    with pytest.raises(ValueError, match="use up"):
        split_alpha([MetricSpec("a", "mean", alpha=0.05), MetricSpec("b", "mean")], 0.05)
    with pytest.raises(ValueError, match="more than"):
        split_alpha([MetricSpec("a", "mean", alpha=0.04), MetricSpec("b", "mean", alpha=0.04)], 0.05)
    # judge accepts uneven verdict alphas that add up to alpha, refuses more
    assert judge([_v("a", "pass", alpha=0.04), _v("b", "pass", alpha=0.01)], 0.05).decision == "promote"
    with pytest.raises(ValueError):
        judge([_v("a", "pass", alpha=0.04), _v("b", "pass", alpha=0.02)], 0.05)


def test_evaluate_all_on_simulated_stream_is_json_and_explained():
    rng = np.random.default_rng(11)
    s = simulate_rollout(rng, RolloutConfig(requests_per_hour=8000), Effects(error_mult=3))
    j = evaluate_all(default_specs(with_classes=True), s, 0.05, now=float(s["ts"][-1]))
    d = json.loads(json.dumps(j.to_dict(), allow_nan=False))
    assert d["decision"] == "rollback"
    assert d["n_gating"] == 6
    assert any("error_rate" in r for r in d["reasons"])
    assert all(isinstance(v["alpha"], float) and v["alpha"] == pytest.approx(0.05 / 6) for v in d["verdicts"])


# ---------------------------------------------------------------- performance


def test_one_million_observations_in_seconds():
    rng = np.random.default_rng(12)
    s = simulate_rollout(rng, RolloutConfig(requests_per_hour=1_000_000 / 3.0, requests_per_user=10), Effects())
    assert s["ts"].size >= 999_000
    s["cluster"] = np.array([f"{u:016x}" for u in range(int(s["user"].max()) + 1)])[s["user"]]  # hashed string keys
    t0 = time.perf_counter()
    j = evaluate_all(default_specs(with_classes=True), s, 0.05, now=float(s["ts"][-1]))
    elapsed = time.perf_counter() - t0
    assert j.decision in ("continue", "promote")
    assert elapsed < 45.0, elapsed  # ~2.5-4 s on an idle 2-core VM; generous bound against load
