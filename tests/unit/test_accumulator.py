"""The incremental evidence (decide/accumulator.py) judges exactly as the full recomputation.

Random streams (seeded numpy): rows arrive in batches out of ts order, sticky users (a few heavy ones)
some of whom switch arm, three stages (canary shares), delayed labels of every kind arriving after
their observation, stream outcomes arriving after the row (or before it), duplicate rows. At every
look the accumulator's verdicts equal ``evaluate_all(specs, analysis.prepare(data, now))`` on the same
data: same verdict, counts and users; numbers equal to 1e-9 relative.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from lockgate.controller.decide import analysis
from lockgate.controller.decide.accumulator import RolloutEvidence
from lockgate.controller.decide.live_evidence import stored_rows_to_columns
from lockgate.controller.ingest.schema import DECISION_COLUMNS, LABEL_ARRIVAL_COLUMN
from lockgate.controller.stats import MetricSpec, evaluate_all

SPECS = [
    MetricSpec("error_rate", "rate", "increase", 0.05, "absolute", column="error"),
    MetricSpec("error_rel", "rate", "increase", 0.5, "relative", column="error", gating=False),
    MetricSpec("latency_p95", "quantile", "increase", 0.2, "relative", quantile=0.95, column="latency_ms"),
    MetricSpec("latency_ratio", "quantile", "increase", 1.5, "exceedance_ratio", quantile=0.9, column="latency_ms",
               gating=False),
    MetricSpec("output_tokens", "mean", "increase", 0.1, "relative", column="output_tokens"),
    MetricSpec("refusal_rate", "rate", "increase", 0.0, "absolute", column="refusal", gating=False),
    MetricSpec("accuracy", "rate", "decrease", 0.05, "absolute", column="correct"),
    MetricSpec("recall_a", "class_recall", "decrease", 0.05, cls="a", column="predicted_class",
               label_column="true_class", label_ts_column="label_arrival_ts", family="recall"),
    MetricSpec("precision_b", "class_precision", "decrease", 0.05, cls="b", column="predicted_class",
               label_column="true_class", label_ts_column="label_arrival_ts", family="recall"),
    MetricSpec("thumbs", "rate", "decrease", 0.1, "absolute", column="thumbs"),
    MetricSpec("task_success", "rate", "decrease", 0.1, "absolute", column="task_success", gating=False),
    MetricSpec("evaluator_score", "mean", "decrease", 0.05, "absolute", column="evaluator_score"),
]


def stream(seed: int, n: int = 4000, users: int = 300):
    """A random rollout: columns as ``fetch`` returns them (labels joined with their arrival) and, per
    row, when its outcome (``error_kind``) is delivered."""
    rng = np.random.default_rng(seed)
    t0 = 1000.0
    ts = np.sort(t0 + rng.uniform(0, 600, n))
    share = np.where(ts < t0 + 200, 0.1, np.where(ts < t0 + 400, 0.25, 0.5))
    heavy = rng.uniform(size=users) < 0.1
    p_user = np.where(heavy, 12.0, 1.0)
    user = rng.choice(users, size=n, p=p_user / p_user.sum())
    switcher = rng.uniform(size=users) < 0.2
    sticky_canary = rng.uniform(size=users)
    canary = np.where(switcher[user], rng.uniform(size=n) < share, sticky_canary[user] < share)
    bad = 1.0 + 4.0 * canary * (seed % 2)
    status = np.where(rng.uniform(size=n) < 0.04 * bad, 503, 200).astype(float)
    status[rng.uniform(size=n) < 0.02] = np.nan
    timeout = rng.uniform(size=n) < 0.01
    latency = rng.lognormal(4, 0.5, n) * (1 + 0.8 * canary * (seed % 2))
    latency[status >= 500] = np.nan
    tokens = np.round(rng.normal(20, 4, n) * (1 + 0.05 * canary))
    tokens[rng.uniform(size=n) < 0.1] = np.nan
    refusal = (rng.uniform(size=n) < 0.03).astype(float)
    refusal[rng.uniform(size=n) < 0.2] = np.nan
    classes = np.array(["a", "b", "c"], dtype=object)
    true = classes[rng.integers(0, 3, n)]
    pred = np.where(rng.uniform(size=n) < 0.8 - 0.3 * canary * (seed % 3 == 0), true, classes[rng.integers(0, 3, n)]).astype(object)
    pred[rng.uniform(size=n) < 0.03] = None

    def label(p, delay):
        has = rng.uniform(size=n) < p
        return has, np.where(has, ts + rng.exponential(delay, n), np.nan)

    has_true, true_ts = label(0.6, 60)
    true = np.where(has_true, true, None).astype(object)
    has_th, th_ts = label(0.3, 30)
    thumbs = np.where(has_th, (rng.uniform(size=n) < 0.7 - 0.1 * canary).astype(float), np.nan)
    has_ts_, ts_ts = label(0.2, 90)
    task = np.where(has_ts_, (rng.uniform(size=n) < 0.6).astype(float), np.nan)
    has_ev, ev_ts = label(0.25, 20)
    score = np.where(has_ev, rng.beta(5, 2, n), np.nan)
    kinds = np.array([None, "upstream_reset", "upstream_timeout", "client_reset"], dtype=object)
    error_kind = kinds[np.where(rng.uniform(size=n) < 0.05, rng.integers(1, 4, n), 0)]
    outcome_at = ts + rng.uniform(-5, 40, n)  # outcomes may be delivered before their observation
    role = np.where(canary, "canary", "baseline").astype(object)
    role[rng.uniform(size=n) < 0.02] = "other"
    data = {
        "ts": ts, "request_id": np.array([f"r{i}" for i in range(n)], dtype=object),
        "version": np.where(canary, "v2", "v1").astype(object), "role": role, "weight": share,
        "stage": np.full(n, None, dtype=object), "status_code": status, "timeout": timeout,
        "latency_ms": latency, "ttfb_ms": latency / 3, "output_tokens": tokens, "refusal": refusal,
        "entropy": np.full(n, np.nan), "predicted_class": pred, "upstream_host": np.full(n, None, dtype=object),
        "user_key": np.array([f"u{u}" if u % 9 else None for u in user], dtype=object),
        "true_class": true, LABEL_ARRIVAL_COLUMN["true_class"]: true_ts,
        "thumbs": thumbs, "thumbs_arrival_ts": th_ts, "task_success": task, "task_success_arrival_ts": ts_ts,
        "evaluator_score": score, "evaluator_score_arrival_ts": ev_ts,
    }
    return data, error_kind, outcome_at


_NUM = re.compile(r"[-+]?\d[\d,]*\.?\d*(?:e[-+]?\d+)?")


def same(a, b, path="") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            assert a is b, f"{path}: {a} vs {b}"
        else:
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), \
                f"{path}: {a} vs {b}"
    elif isinstance(a, str) and _NUM.search(a):
        # reasons print numbers with 4 significant digits: the same text, or numbers that differ only there
        if a != b:
            assert _NUM.sub("#", a) == _NUM.sub("#", b), f"{path}: {a!r} vs {b!r}"
            for x, y in zip(_NUM.findall(a), _NUM.findall(b)):
                fx, fy = float(x.replace(",", "")), float(y.replace(",", ""))
                assert math.isclose(fx, fy, rel_tol=2e-3, abs_tol=1e-9), f"{path}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.mark.parametrize("seed", range(6))
def test_incremental_verdicts_equal_the_full_recomputation(seed):
    data, error_kind, outcome_at = stream(seed)
    n = data["ts"].size
    rng = np.random.default_rng(100 + seed)
    ev = RolloutEvidence(SPECS, baseline="v1", canary="v2", since_ts=None)
    order = np.argsort(data["ts"] + rng.uniform(0, 8, n), kind="stable")  # stored out of ts order, in batches
    sent = 0
    delivered = np.zeros(n, dtype=bool)
    looks = np.sort(rng.uniform(1000, 1700, 14))
    for now in looks:
        k = int(np.searchsorted(data["ts"][order], now + 30))  # rows of the next 30 s already stored too
        while sent < k:
            b = order[sent:min(k, sent + int(rng.integers(1, 120)))]
            cols = {c: v[b] for c, v in data.items()}
            if rng.uniform() < 0.3:  # a retried batch: stored once
                cols = {c: np.concatenate([v, v[:5]]) for c, v in cols.items()}
            ev.add_rows(cols)
            sent += b.size
        due = ~delivered & (outcome_at <= now) & (error_kind != None)  # noqa: E711
        ev.add_outcomes(zip(data["request_id"][due], error_kind[due]))
        delivered |= due
        full = dict(data, error_kind=np.where(delivered, error_kind, None).astype(object))
        want = evaluate_all(SPECS, analysis.prepare(full, now), 0.05, now=now, quantile_intervals=(seed % 2 == 0))
        got = ev.evaluate(now, 0.05, quantile_intervals=(seed % 2 == 0))
        same(got.to_dict(), want.to_dict())


def test_the_streams_reach_every_verdict():
    seen = set()
    for seed in range(6):
        data, _, _ = stream(seed, n=4000)
        ev = RolloutEvidence(SPECS, baseline="v1", canary="v2")
        ev.add_rows(data)
        seen |= {v.verdict for v in ev.evaluate(1700.0, 0.05, quantile_intervals=False).verdicts}
    assert seen == {"pass", "fail", "not-yet"}


def test_replaced_labels_count_from_their_arrival():
    data, _, _ = stream(3, n=800)
    ev = RolloutEvidence(SPECS)
    ev.add_rows(data)
    ev.evaluate(1300.0, 0.05)
    labelled = [i for i in range(800) if data["true_class"][i] is not None and data["label_arrival_ts"][i] < 1300]
    flip = {"a": "b", "b": "c", "c": "a"}
    ev.add_labels((data["request_id"][i], "true_class", flip[data["true_class"][i]], 1350.0) for i in labelled[:200])
    ev.add_labels((data["request_id"][i], "thumbs", "down", 1350.0) for i in range(0, 800, 3))
    got = ev.evaluate(1700.0, 0.05)
    new = dict(data)
    new["true_class"] = data["true_class"].copy()
    new["label_arrival_ts"] = data["label_arrival_ts"].copy()
    for i in labelled[:200]:
        new["true_class"][i] = flip[data["true_class"][i]]
        new["label_arrival_ts"][i] = 1350.0
    new["thumbs"] = data["thumbs"].copy()
    new["thumbs_arrival_ts"] = data["thumbs_arrival_ts"].copy()
    for i in range(0, 800, 3):
        if not data["thumbs_arrival_ts"][i] > 1350.0:  # a label arriving later than the correction wins
            new["thumbs"][i], new["thumbs_arrival_ts"][i] = 0.0, 1350.0
    same(got.to_dict(), evaluate_all(SPECS, analysis.prepare(new, 1700.0), 0.05, now=1700.0).to_dict())


def test_looks_never_go_back():
    ev = RolloutEvidence(SPECS)
    ev.evaluate(10.0, 0.05)
    with pytest.raises(ValueError):
        ev.evaluate(9.0, 0.05)


def test_stored_rows_become_the_columns_fetch_returns(tmp_path):
    from lockgate.controller.ingest.observations import ObservationStore
    from lockgate.proto.v1 import observations_pb2 as pb
    from lockgate.controller.ingest.observations import observation_row

    store = ObservationStore(tmp_path / "obs.db")
    try:
        obs = [pb.Observation(request_id=f"r{i}", ts=100.0 + i, model="m", version="v2" if i % 3 else "v1",
                              role="canary" if i % 3 else "baseline", weight_bp=1250, status_code=[200, 503, 0][i % 3],
                              user_key=f"u{i % 4}" if i % 5 else "", duration_ms=10.0 + i, timeout=i == 4,
                              predicted_class="x" if i % 2 else "") for i in range(12)]
        obs[2].output_tokens = 7
        obs[3].refusal = True
        store.insert(obs, received_ts=200.0)
        fetched = store.fetch("m", columns=list(DECISION_COLUMNS))
        mine = stored_rows_to_columns([observation_row(o, "", 200.0) for o in obs])
        for c, v in mine.items():
            if c in fetched:
                np.testing.assert_array_equal(v, fetched[c], err_msg=c)
    finally:
        store.close()


def test_live_evidence_fed_by_the_store_judges_as_the_full_path(tmp_path):
    """The controller's wiring: rows, outcomes and labels handed over as the collector and the store hand
    them, a state built at the first look from the store (as after a restart), compared with the full
    path (``evidence.judge``, every stored row re-read) at every look."""
    from types import SimpleNamespace

    from lockgate.controller.decide import evidence
    from lockgate.controller.decide.live_evidence import LiveEvidence
    from lockgate.controller.decide.spec import spec_from_text
    from lockgate.controller.ingest.observations import ObservationStore
    from lockgate.proto.v1 import observations_pb2 as pb

    spec = spec_from_text("""
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 60
  alpha: 0.05
  steps:
    - {weight_percent: 10, min_duration: 5m}
    - {weight_percent: 50, min_duration: 5m}
  promotion: {max_duration: 24h, preflight: none}
  metrics:
    - {name: error_rate, allowed: {absolute: 0.05}}
    - {name: latency_p95, allowed: {relative: 0.3}}
    - {name: evaluator_score, gating: true, allowed: {absolute: 0.15}}
    - {name: feedback_positive_rate, gating: true, allowed: {absolute: 0.1}}
    - {name: class_recall, class: a, gating: true, allowed: {absolute: 0.1}}
""")
    t0 = 1.8e9
    rollout = SimpleNamespace(id=1, model="chat", baseline="v1", canary="v2", started_at=t0, stage=1,
                              stage_started_at=t0 + 300, spec_hash="h", auto_values=lambda: {})
    config = SimpleNamespace(model=lambda m: SimpleNamespace(evaluation=None))
    store = ObservationStore(tmp_path / "obs.db")
    live = LiveEvidence(store)
    store.on_labels.append(live.labels_stored)
    rng = np.random.default_rng(7)
    try:
        rid = 0
        labels_due: list = []
        for look in range(12):
            now = t0 + 60 * (look + 1)
            obs = []
            for _ in range(int(rng.integers(100, 300))):
                rid += 1
                u = int(rng.integers(0, 150))
                share = 0.1 if now < t0 + 300 else 0.5
                canary = rng.uniform() < share
                o = pb.Observation(request_id=f"r{rid}", ts=now - rng.uniform(0, 60), model="chat",
                                   version="v2" if canary else "v1", role="canary" if canary else "baseline",
                                   weight_bp=int(share * 10000), status_code=503 if rng.uniform() < 0.05 else 200,
                                   user_key=f"u{u}", duration_ms=float(rng.lognormal(4, 0.4)),
                                   predicted_class=str(rng.choice(["a", "b"])))
                obs.append(o)
                if rng.uniform() < 0.5:
                    labels_due.append((now + rng.uniform(0, 120), f"r{rid}", str(rng.choice(["a", "b"]))))
            if rng.uniform() < 0.3:  # another model's traffic, and a replay
                obs.append(pb.Observation(request_id=f"x{rid}", ts=now - 1, model="other", version="v1",
                                          role="baseline", weight_bp=0, status_code=200))
            for start in range(0, len(obs), 50):  # slices, as the collector stores them
                part = obs[start:start + 50]
                result = store.insert(part, received_ts=now)
                live.observations_stored(part, result.new, "", now)  # as the collector hands them over
            out = [pb.StreamOutcome(request_id=f"r{rid - k}", error_kind="upstream_reset", model="chat")
                   for k in range(0, 40, 7)]
            new = store.insert_outcomes(out, now)
            live.outcomes_stored([(out[i].request_id, out[i].error_kind) for i in new])
            for at, r, cls in [x for x in labels_due if x[0] <= now]:
                store.add_labels([(r, "true_class", cls), (r, "evaluator_score", float(rng.uniform())),
                                  (r, "thumbs", "up" if rng.uniform() < 0.7 else "down")], now=at)
            if look == 7:  # a correction
                done = [x for x in labels_due if x[0] <= now][:30]
                store.add_labels([(r, "true_class", "b" if cls == "a" else "a") for _, r, cls in done], now=now)
            labels_due = [x for x in labels_due if x[0] > now]
            if look < 3:
                continue  # the state is built at the first look, from the store
            got = live.judge(rollout, spec, now)
            want = evidence.judge(store, config, rollout, spec, now)
            assert got is not None
            same(got[1], want[1])
            assert got[2] == want[2]
    finally:
        store.close()


def test_a_rollback_look_is_not_delayed_by_quantile_intervals(tmp_path):
    """When a look that is due to compute the quantile intervals decides ``rollback``, it returns the
    decision judged without them (no verdict uses them): the revert is not delayed by their bisection."""
    from types import SimpleNamespace

    from lockgate.controller.decide.live_evidence import LiveEvidence
    from lockgate.controller.decide.spec import spec_from_text
    from lockgate.controller.ingest.observations import ObservationStore
    from lockgate.proto.v1 import observations_pb2 as pb

    spec = spec_from_text("""
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 60
  alpha: 0.05
  steps:
    - {weight_percent: 50, min_duration: 5m}
  promotion: {max_duration: 24h, preflight: none}
  metrics:
    - {name: error_rate, gating: true, allowed: {absolute: 0.02}}
    - {name: latency_p95, allowed: {relative: 0.3}}
""")
    t0 = 1.8e9
    rollout = SimpleNamespace(id=1, model="chat", baseline="v1", canary="v2", started_at=t0, stage=0,
                              stage_started_at=t0, spec_hash="h", auto_values=lambda: {})
    store = ObservationStore(tmp_path / "obs.db")
    rng = np.random.default_rng(3)
    try:
        obs = []
        for i in range(4000):
            canary = i % 2 == 1
            obs.append(pb.Observation(
                request_id=f"r{i}", ts=t0 + i * 0.01, model="chat", version="v2" if canary else "v1",
                role="canary" if canary else "baseline", weight_bp=5000, user_key=f"u{i % 300}",
                status_code=503 if rng.uniform() < (0.4 if canary else 0.01) else 200,
                duration_ms=float(rng.lognormal(4, 0.4))))
        store.insert(obs, received_ts=t0 + 60)
        live = LiveEvidence(store)
        judgement, _, _ = live.judge(rollout, spec, t0 + 60)  # the first look is due for intervals
        assert judgement.decision == "rollback"
        latency = next(v for v in judgement.verdicts if v.metric == "latency_p95")
        assert latency.interval == (None, None)
        judgement, _, _ = live.judge(rollout, spec, t0 + 61)  # not due by the clock, still owed
        latency = next(v for v in judgement.verdicts if v.metric == "latency_p95")
        assert judgement.decision == "rollback" and latency.interval == (None, None)
        judgement, _, _ = live.judge(rollout, spec, t0 + 62, quantile_intervals=True)
        latency = next(v for v in judgement.verdicts if v.metric == "latency_p95")
        assert judgement.decision == "rollback" and latency.interval == (None, None)
    finally:
        store.close()


def test_retain_also_forgets_the_prometheus_state_of_ended_rollouts(tmp_path):
    from lockgate.controller.decide.evidence import PROMETHEUS
    from lockgate.controller.decide.live_evidence import LiveEvidence
    from lockgate.controller.ingest.observations import ObservationStore

    store = ObservationStore(tmp_path / "obs.db")
    try:
        with PROMETHEUS._lock:
            PROMETHEUS._stages[901] = PROMETHEUS._stages[902] = [0.0]
            PROMETHEUS._last[901] = PROMETHEUS._last[902] = {}
        LiveEvidence(store).retain([902])
        assert 901 not in PROMETHEUS._stages and 901 not in PROMETHEUS._last
        assert 902 in PROMETHEUS._stages and 902 in PROMETHEUS._last
    finally:
        PROMETHEUS.forget(())
        store.close()
