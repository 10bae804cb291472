"""Valid at the edge: a canary sitting exactly at its allowance is rolled back with probability <= alpha.

This is the hardest case for the harm test (its null is "degradation <= delta", and here the
degradation *is* delta). Every metric kind is checked under continuous looks, with the canary share
changing between stages (5 -> 20 -> 50 %) and sticky, correlated users (heavy users, per-user random
effects, users moving from baseline to canary as the share grows):

* rates with a ratio allowance (count test + cluster-robust sequence) and with an absolute one,
* means with an absolute and a relative allowance,
* quantiles with a relative shift allowance and with an exceedance-ratio allowance,
* per-class recall and precision from delayed labels (labels arrive minutes later; a look uses only
  the labels arrived by then).

Each test runs a few hundred seeded rollouts and counts those in which the metric's verdict was ever
``fail``. The assertion allows two binomial standard errors of simulation noise above alpha; the
observed rates (printed with ``-s``) are far below it — the mixture boundaries are conservative.
The same streams with the canary *within* its allowance (half of delta) are never rolled back more
often than at the edge, and with a canary clearly beyond it the same tests do roll back (power check:
the simulation can fail).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from lockgate.controller.stats import MetricSpec, evaluate_class, evaluate_mean, evaluate_quantile, evaluate_rate

ALPHA = 0.05
N_RUNS = 240
N_LOOKS = 24
STAGES = (0.05, 0.20, 0.50)
N_REQUESTS = 6000
N_USERS = 900
LAT_SIGMA_USER, LAT_SIGMA_REQ = 0.3, 0.5


def _routing(rng: np.random.Generator, n: int = N_REQUESTS, users: int = N_USERS):
    """Sticky, heavy-tailed users; the canary share grows by stage; users only move to the canary."""
    ts = np.sort(rng.uniform(0.0, 3.0 * 3600.0, n))
    stage = np.minimum((ts / 3600.0).astype(np.intp), len(STAGES) - 1)
    share = np.asarray(STAGES)[stage]
    activity = rng.gamma(0.7, 1.0, users)
    user = rng.choice(users, size=n, p=activity / activity.sum())
    is_c = rng.uniform(0.0, 1.0, users)[user] < share
    return ts, user, is_c, share


def _looks() -> np.ndarray:
    return np.linspace(3.0 * 3600.0 / N_LOOKS, 3.0 * 3600.0, N_LOOKS)


def _ever_fails(ts: np.ndarray, evaluate) -> bool:
    for t in _looks():
        m = int(np.searchsorted(ts, t, side="right"))
        if evaluate(m, float(t)).verdict == "fail":
            return True
    return False


def _rate_of_fail(make_stream, evaluate, seed: int, runs: int = N_RUNS) -> float:
    rng = np.random.default_rng(seed)
    fails = 0
    for _ in range(runs):
        s = make_stream(rng)
        fails += _ever_fails(s["ts"], lambda m, t, s=s: evaluate(s, m, t))
    return fails / runs


def _assert_at_most_alpha(rate: float, runs: int = N_RUNS) -> None:
    se = math.sqrt(ALPHA * (1 - ALPHA) / runs)
    print(f"false rollback at the allowance: {rate:.3f} (alpha {ALPHA}, runs {runs})")
    assert rate <= ALPHA + 2 * se, rate


# ---------------------------------------------------------------------------------------------- rates


def _rate_stream(base: float, canary_rate) -> callable:
    def make(rng):
        ts, user, is_c, share = _routing(rng)
        g = rng.gamma(1.0, 1.0, N_USERS)[user]  # per-user propensity, mean 1: correlated errors
        p = np.clip(np.where(is_c, canary_rate(base), base) * g, 0.0, 1.0)
        return {"ts": ts, "user": user, "is_c": is_c, "share": share, "y": rng.random(ts.size) < p}
    return make


def _eval_rate(spec):
    def ev(s, m, t):
        return evaluate_rate(s["y"][:m], s["is_c"][:m], s["share"][:m], s["user"][:m], spec, ALPHA)
    return ev


RATE_RATIO = MetricSpec("errors", "rate", "increase", allowed=0.5, allowed_mode="relative")
RATE_ABS = MetricSpec("errors", "rate", "increase", allowed=0.02, allowed_mode="absolute")


@pytest.mark.parametrize("spec,canary,label", [
    (RATE_RATIO, lambda b: 1.5 * b, "ratio allowance 1.5, canary at ratio 1.5"),
    (RATE_ABS, lambda b: b + 0.02, "absolute allowance +2 points, canary at +2 points"),
])
def test_rate_at_the_allowance_rolls_back_at_most_alpha(spec, canary, label):
    _assert_at_most_alpha(_rate_of_fail(_rate_stream(0.05, canary), _eval_rate(spec), seed=11))


def test_rate_beyond_the_allowance_is_rolled_back():
    """Power check on the same streams: the edge tests could fail."""
    rate = _rate_of_fail(_rate_stream(0.05, lambda b: 3.0 * b), _eval_rate(RATE_RATIO), seed=12, runs=40)
    assert rate >= 0.9, rate


# ---------------------------------------------------------------------------------------------- means


def _mean_stream(shift, rel: float = 0.0):
    def make(rng):
        ts, user, is_c, share = _routing(rng)
        u = rng.normal(0.0, 40.0, N_USERS)[user]
        v = 300.0 + u + rng.normal(0.0, 120.0, ts.size)
        v = np.where(is_c, v * (1.0 + rel) + shift, v)
        v[rng.random(ts.size) < 0.1] = np.nan  # not measured (e.g. errored requests)
        return {"ts": ts, "user": user, "is_c": is_c, "share": share, "y": v}
    return make


def _eval_mean(spec):
    def ev(s, m, t):
        return evaluate_mean(s["y"][:m], s["is_c"][:m], s["user"][:m], spec, ALPHA, stratum=s["share"][:m])
    return ev


MEAN_ABS = MetricSpec("tokens", "mean", "increase", allowed=15.0)
MEAN_REL = MetricSpec("tokens", "mean", "increase", allowed=0.05, allowed_mode="relative")


@pytest.mark.parametrize("spec,stream", [
    (MEAN_ABS, _mean_stream(15.0)),
    (MEAN_REL, _mean_stream(0.0, rel=0.05)),
], ids=["absolute", "relative"])
def test_mean_at_the_allowance_rolls_back_at_most_alpha(spec, stream):
    _assert_at_most_alpha(_rate_of_fail(stream, _eval_mean(spec), seed=21))


def test_mean_within_and_beyond():
    within = _rate_of_fail(_mean_stream(7.5), _eval_mean(MEAN_ABS), seed=22, runs=60)
    assert within <= 0.02, within
    beyond = _rate_of_fail(_mean_stream(45.0), _eval_mean(MEAN_ABS), seed=23, runs=40)
    assert beyond >= 0.9, beyond


# ------------------------------------------------------------------------------------------ quantiles

P = 0.95
SIGMA_TOT = math.sqrt(LAT_SIGMA_USER**2 + LAT_SIGMA_REQ**2)


def _latency_stream(mult: float):
    def make(rng):
        ts, user, is_c, share = _routing(rng)
        lu = rng.normal(0.0, LAT_SIGMA_USER, N_USERS)[user]
        lat = 800.0 * np.exp(lu + rng.normal(0.0, LAT_SIGMA_REQ, ts.size)) * np.where(is_c, mult, 1.0)
        return {"ts": ts, "user": user, "is_c": is_c, "share": share, "y": lat}
    return make


def _eval_quantile(spec):
    def ev(s, m, t):
        return evaluate_quantile(s["y"][:m], s["is_c"][:m], s["user"][:m], spec, ALPHA, stratum=s["share"][:m],
                                 compute_interval=False)
    return ev


def _mult_at_exceedance_ratio(r: float) -> float:
    """Latency multiplier at which the canary's share above the baseline's p95 is exactly r x 5 %.

    The marginal latency (per request, user effect included) is lognormal with sigma SIGMA_TOT, so
    P(m X > q95) = 1 - Phi(z95 - ln(m) / sigma)  =>  ln m = sigma (z95 - z_{1 - r (1 - p)}).
    """
    return math.exp(SIGMA_TOT * (norm.ppf(P) - norm.ppf(1.0 - r * (1.0 - P))))


Q_REL = MetricSpec("latency_p95", "quantile", "increase", allowed=0.10, allowed_mode="relative", quantile=P)
Q_RATIO = MetricSpec("latency_p95", "quantile", "increase", allowed=1.5, allowed_mode="exceedance_ratio", quantile=P)


@pytest.mark.parametrize("spec,mult", [
    (Q_REL, 1.10),
    (Q_RATIO, _mult_at_exceedance_ratio(1.5)),
], ids=["relative shift", "exceedance ratio"])
def test_quantile_at_the_allowance_rolls_back_at_most_alpha(spec, mult):
    _assert_at_most_alpha(_rate_of_fail(_latency_stream(mult), _eval_quantile(spec), seed=31))


def test_quantile_beyond_is_rolled_back():
    beyond = _rate_of_fail(_latency_stream(1.5), _eval_quantile(Q_RATIO), seed=32, runs=40)
    assert beyond >= 0.9, beyond


# ------------------------------------------------------------------------------ per-class, delayed labels

CLASS_P = np.array([0.6, 0.3, 0.1])  # class 2 is the 10 % minority
RECALL = MetricSpec("recall_2", "class_recall", "decrease", allowed=0.05, cls=2, column="pred")
PRECISION = MetricSpec("precision_2", "class_precision", "decrease", allowed=0.05, cls=2, column="pred")


def _class_stream(kind: str, drop: float):
    """Labels arrive ~20 min (exponential) after the request; 80 % of requests are ever labelled."""
    def make(rng):
        ts, user, is_c, share = _routing(rng, n=2 * N_REQUESTS)
        n = ts.size
        hard = rng.uniform(-0.08, 0.08, N_USERS)[user]  # per-user difficulty: correlated correctness, no clipping
        if kind == "recall":
            true = rng.choice(3, size=n, p=CLASS_P)
            rec = np.where(true == 2, 0.80 - np.where(is_c, drop, 0.0), 0.90)
            correct = rng.random(n) < rec + hard
            pred = np.where(correct, true, (true + rng.integers(1, 3, n)) % 3)
        else:
            pred = rng.choice(3, size=n, p=CLASS_P)
            prec = np.where(pred == 2, 0.80 - np.where(is_c, drop, 0.0), 0.90)
            right = rng.random(n) < prec + hard
            true = np.where(right, pred, (pred + rng.integers(1, 3, n)) % 3)
        labelled = rng.random(n) < 0.8
        arrival = np.where(labelled, ts + rng.exponential(1200.0, n), np.inf)
        label = np.where(labelled, true.astype(float), np.nan)
        return {"ts": ts, "user": user, "is_c": is_c, "share": share, "pred": pred, "label": label,
                "arrival": arrival}
    return make


def _eval_class(spec):
    def ev(s, m, t):
        return evaluate_class(s["pred"][:m], s["label"][:m], s["arrival"][:m], t, s["is_c"][:m], s["user"][:m],
                              spec, ALPHA, stratum=s["share"][:m])
    return ev


@pytest.mark.parametrize("spec,kind", [(RECALL, "recall"), (PRECISION, "precision")])
def test_class_metric_at_the_allowance_rolls_back_at_most_alpha(spec, kind):
    """The canary's recall / precision sits exactly delta below the baseline's (per-user difficulty is
    additive and never clipped, so it cancels in the difference)."""
    _assert_at_most_alpha(_rate_of_fail(_class_stream(kind, 0.05), _eval_class(spec), seed=41, runs=160), runs=160)


def test_class_metric_beyond_is_rolled_back():
    beyond = _rate_of_fail(_class_stream("recall", 0.25), _eval_class(RECALL), seed=42, runs=30)
    assert beyond >= 0.9, beyond


def test_row_grouping_dense_and_sorted_paths_agree():
    """group_rows counts dense keys without sorting and falls back to np.unique for sparse ones: both give
    the same groups, and summing values over them matches a per-row loop."""
    from lockgate.controller.stats.estimators import group_rows

    rng = np.random.default_rng(7)
    n = 5000
    arm = rng.integers(0, 2, n)
    st = rng.integers(0, 3, n)
    y = rng.normal(size=n)
    for cl in (rng.integers(0, 200, n), rng.integers(0, 200, n) * 10_000_000):  # dense, then sparse keys
        g = group_rows(arm, cl, st, 3)
        expect: dict[tuple[int, int, int], list[float]] = {}
        for i in range(n):
            expect.setdefault((int(cl[i]), int(st[i]), int(arm[i])), []).append(float(y[i]))
        got = {(int(c), int(s), int(a)): (float(k), float(t))
               for c, s, a, k, t in zip(g.cl, g.st, g.arm, g.n, g.sums(y))}
        assert got.keys() == expect.keys()
        for key, vals in expect.items():
            assert got[key][0] == len(vals) and got[key][1] == pytest.approx(sum(vals))
