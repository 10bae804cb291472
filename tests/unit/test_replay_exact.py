"""`lockgate analyze` is the live controller: every look, in order, on what the controller saw then.

Streams are built in memory as the columns `export.read_jsonl` returns and replayed with
`replay.replay` directly (the CLI is covered by test_analyze_replay.py).
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockgate.controller.decide import analysis
from lockgate.controller.decide.replay import cut_stream, look_time, replay
from lockgate.controller.decide.spec import spec_from_text
from lockgate.controller.decide.stages import StageState, decide

T0 = 1.8e9
STEPS = """
  analysis_interval_s: 60
  alpha: 0.05
  steps:
    - {weight_percent: 10, min_duration: 5m, min_canary_samples: 50}
    - {weight_percent: 30, min_duration: 5m, min_canary_samples: 100}
    - {weight_percent: 50, min_duration: 5m, min_canary_samples: 150}
  promotion: {max_duration: 24h, preflight: none}
"""
CHAT = spec_from_text("""
rollout:
  model: chat
  canary: v2""" + STEPS + """
  metrics:
    - {name: error_rate, allowed: {absolute: 0.05}}
    - {name: latency_p95, allowed: {relative: 0.3}}
    - {name: evaluator_score, gating: true, allowed: {absolute: 0.15}}
""")
CLASSIFIER = spec_from_text("""
rollout:
  model: chat
  canary: v2""" + STEPS + """
  metrics:
    - {name: error_rate, allowed: {absolute: 0.05}}
    - {name: class_recall, class: fraud, gating: true, allowed: {absolute: 0.1}}
    - {name: accuracy, gating: true, allowed: {absolute: 0.1}}
""")
WEIGHTS = (0.1, 0.3, 0.5)


def _obj(values) -> np.ndarray:
    values = list(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def make_stream(seed: int, *, classifier: bool, minutes: float, per_min: float, users: int, canary_err: float,
                lat_factor: float, quality_loss: float, label_delay_s: float, shuffle: bool,
                weights: tuple[float, ...] = WEIGHTS) -> dict:
    """Requests of sticky users over equal-length stages (default 10/30/50 %), in the columns read_jsonl
    returns.

    Per-user error propensity (correlated requests), delayed labels (classifier: true_class;
    chat: evaluator_score), some requests and label arrivals exactly on look times, ties in ts.
    """
    rng = np.random.default_rng(seed)
    n = max(50, int(minutes * per_min))
    ts = np.round(T0 + np.sort(rng.uniform(0, minutes * 60, n)), 1)  # rounding makes ties
    ts[0] = T0
    on_look = rng.choice(n, size=min(5, n), replace=False)
    ts[on_look] = [look_time(T0, 60.0, int(k)) for k in rng.integers(1, max(2, int(minutes)), on_look.size)]
    ts.sort()
    stage = np.minimum((ts - T0) // (minutes * 60 / len(weights)), len(weights) - 1).astype(int)
    weight = np.array(weights)[stage]
    u = rng.integers(0, users, n)
    bucket = rng.integers(0, 10000, users)[u]
    canary = bucket < weight * 10000
    propensity = rng.gamma(2.0, 0.5, users)[u]
    err = rng.random(n) < np.clip(np.where(canary, canary_err, 0.02) * propensity, 0, 1)
    latency = rng.lognormal(5, 0.4, n) * np.where(canary, lat_factor, 1.0)
    delay = rng.exponential(label_delay_s, n) if label_delay_s > 0 else np.zeros(n)
    arrival = ts + delay
    on_look = rng.choice(n, size=min(5, n), replace=False)
    arrival[on_look] = [look_time(T0, 60.0, int(k)) for k in rng.integers(1, max(2, int(minutes)), on_look.size)]
    arrival = np.maximum(arrival, ts)
    nan = np.full(n, np.nan)
    data = {
        "ts": ts, "weight": weight, "status_code": np.where(err, 500.0, 200.0), "timeout": np.zeros(n, dtype=bool),
        "latency_ms": latency, "is_canary": canary, "request_id": _obj(f"r{i}" for i in range(n)),
        "model": _obj(["chat"] * n), "version": _obj(np.where(canary, "v2", "v1")),
        "role": _obj(np.where(canary, "canary", "baseline")), "user_key": _obj(f"u{x}" for x in u),
        "thumbs": nan, "thumbs_arrival_ts": nan, "task_success": nan, "task_success_arrival_ts": nan,
        "evaluator_score": nan, "evaluator_score_arrival_ts": nan,
        "predicted_class": _obj([None] * n), "true_class": _obj([None] * n), "label_arrival_ts": nan,
    }
    if classifier:
        fraud = rng.random(n) < 0.25
        hit = rng.random(n) < np.where(canary & fraud, 0.9 - quality_loss, 0.9)
        pred = np.where(fraud, np.where(hit, "fraud", "ok"), np.where(rng.random(n) < 0.95, "ok", "fraud"))
        labelled = rng.random(n) < 0.8
        data["predicted_class"] = _obj(pred)
        data["true_class"] = _obj([("fraud" if f else "ok") if lab else None for f, lab in zip(fraud, labelled)])
        data["label_arrival_ts"] = np.where(labelled, arrival, np.nan)
    else:
        scored = rng.random(n) < 0.6
        score = np.clip(rng.normal(0.7 - np.where(canary, quality_loss, 0.0), 0.15, n), 0, 1)
        data["evaluator_score"] = np.where(scored, score, np.nan)
        data["evaluator_score_arrival_ts"] = np.where(scored, arrival, np.nan)
    data["label"], data["label_ts"] = data["true_class"], data["label_arrival_ts"]  # read_jsonl's aliases
    if shuffle:  # the store gives no order guarantee; the replay sorts (stable) like the controller
        perm = rng.permutation(n)
        data = {k: v[perm] for k, v in data.items()}
    return data


streams = st.builds(
    lambda seed, classifier, minutes, per_min, users, canary_err, lat_factor, quality_loss, label_delay_s, shuffle:
    (CLASSIFIER if classifier else CHAT,
     make_stream(seed, classifier=classifier, minutes=minutes, per_min=per_min, users=users, canary_err=canary_err,
                 lat_factor=lat_factor, quality_loss=quality_loss, label_delay_s=label_delay_s, shuffle=shuffle)),
    seed=st.integers(0, 2**31 - 1), classifier=st.booleans(), minutes=st.floats(12, 60),
    per_min=st.floats(40, 200), users=st.integers(30, 500),
    canary_err=st.sampled_from([0.0, 0.02, 0.05, 0.15, 0.4]), lat_factor=st.sampled_from([0.8, 1.0, 1.3, 2.0]),
    quality_loss=st.sampled_from([-0.05, 0.0, 0.2, 0.5]), label_delay_s=st.sampled_from([0.0, 120.0, 900.0]),
    shuffle=st.booleans())

PROPERTY = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(streams, st.randoms(use_true_random=False))
def test_cutting_the_stream_at_the_answer_gives_the_same_answer(case, rnd):
    spec, data = case
    res = replay(spec, data)
    k, n_looks = res["looks_evaluated"], res["looks"]
    assert res["at_ts"] == look_time(T0, 60.0, k) and 1 <= k <= n_looks and res["looks_thinned"] is False
    if res["decision"] != "continue":
        again = replay(spec, cut_stream(data, res["at_ts"]), until=res["at_ts"])
        assert (again["decision"], again["at_ts"], again["looks"], again["looks_evaluated"]) == \
            (res["decision"], res["at_ts"], k, k)
        assert again["reasons"] == res["reasons"] and again["stage"] == res["stage"]
    else:
        assert k == n_looks
    # cut at earlier looks, nothing was decided yet
    for j in sorted({1, k - 1, rnd.randint(1, k)} - {0, k}):
        t = look_time(T0, 60.0, j)
        earlier = replay(spec, cut_stream(data, t), until=t)
        assert (earlier["decision"], earlier["at_ts"], earlier["looks_evaluated"]) == ("continue", t, j)


def _live_controller(spec, data, n_looks: int):
    """The promoter's loop with its pure functions: at each look only the stream as it was then is visible
    (cut_stream); the rollout record holds the stage of the weight requests were routed with, started when
    its first request was routed (the first stage: at the rollout start)."""
    start = float(np.nanmin(data["ts"]))
    for k in range(1, n_looks + 1):
        now = look_time(start, spec.analysis_interval_s, k)
        seen = cut_stream(data, now)
        judgement = analysis.evaluate_at(spec, seen, now)
        order = np.argsort(seen["ts"], kind="stable")
        ts, weight_bp = seen["ts"][order], seen["weight"][order] * 10000
        stage = max([i for i, s in enumerate(spec.steps) if weight_bp[-1] + 0.5 >= s.weight_bp], default=0)
        stage_started_at = start if stage == 0 else \
            float(ts[np.abs(weight_bp - spec.steps[stage].weight_bp) < 0.5].min())
        # promoter._evaluate: canary rows since the stage started (the store has nothing after now)
        in_stage = int(np.count_nonzero((seen["ts"] >= stage_started_at) & (seen["role"] == "canary")))
        d = decide(spec, StageState("running", stage, start, stage_started_at), judgement, now, in_stage)
        if d.action in ("rollback", "promote", "inconclusive"):
            return d.action, now
    return "continue", now


@PROPERTY
@given(streams)
def test_the_live_controller_decides_at_the_same_look(case):
    spec, data = case
    res = replay(spec, data)
    assert _live_controller(spec, data, res["looks"]) == (res["decision"], res["at_ts"])


def _burst_stream(seed: int = 5) -> dict:
    """One stage (50 %), 400 sticky users, 120 requests/min for an hour. The canary fails 70 % of its
    requests for two minutes (T0+390 s to T0+510 s) and none otherwise; the baseline fails 5 %, and
    40 % after the burst. The harm bound is crossed during the burst and left a minute or two later."""
    rng = np.random.default_rng(seed)
    n = 60 * 120
    ts = np.round(T0 + np.sort(rng.uniform(0, 3600, n)), 3)
    ts[0] = T0
    u = rng.integers(0, 400, n)
    canary = rng.integers(0, 10000, 400)[u] < 5000
    burst = (ts >= T0 + 390) & (ts < T0 + 510)
    p = np.where(canary, np.where(burst, 0.7, 0.0), np.where(ts >= T0 + 510, 0.4, 0.05))
    err = rng.random(n) < p
    nan = np.full(n, np.nan)
    return {"ts": ts, "weight": np.full(n, 0.5), "status_code": np.where(err, 500.0, 200.0),
            "timeout": np.zeros(n, dtype=bool), "latency_ms": rng.lognormal(5, 0.3, n), "is_canary": canary,
            "request_id": _obj(f"r{i}" for i in range(n)), "role": _obj(np.where(canary, "canary", "baseline")),
            "user_key": _obj(f"u{x}" for x in u), "true_class": _obj([None] * n), "label_arrival_ts": nan}


def _coarse_then_bisect(decides, n_looks: int) -> int | None:
    """The search the replay used before: 12 evenly spread looks, then a binary search below the first of
    them that decides — assuming that a crossed bound stays crossed."""
    coarse = sorted(set(np.linspace(0, n_looks - 1, min(n_looks, 12)).round().astype(int)))
    prev = -1
    for i in coarse:
        if decides(i + 1):
            lo, hi = prev + 1, i
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if decides(mid + 1) else (mid + 1, hi)
            return hi + 1
        prev = i
    return None


def test_a_harm_bound_crossed_and_left_again_is_reported_at_the_first_crossing():
    spec = spec_from_text("""
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 60
  alpha: 0.05
  steps:
    - {weight_percent: 50, min_duration: 2h, min_canary_samples: 100}
  promotion: {max_duration: 24h, preflight: none}
  metrics:
    - {name: error_rate, allowed: {absolute: 0.02}}
""")
    data = _burst_stream()
    res = replay(spec, data)
    assert res["decision"] == "rollback"
    at, k, n_looks = res["at_ts"], res["looks_evaluated"], res["looks"]
    assert T0 + 390 < at <= T0 + 600  # during the burst or just after it

    def decides(j: int) -> bool:
        return analysis.evaluate_at(spec, data, look_time(T0, 60.0, j)).decision == "rollback"

    assert decides(k) and not any(decides(j) for j in range(1, k))
    # the bound is left again: at the end nothing shows harm (the min duration of 2 h holds the rollout)
    assert not decides(n_looks) and not decides(k + 3)
    # so the old search, which assumed a crossed bound stays crossed, missed this rollback
    assert _coarse_then_bisect(decides, n_looks) != k
    # and the stream up to the answer gives the answer
    again = replay(spec, cut_stream(data, at), until=at)
    assert (again["decision"], again["at_ts"]) == ("rollback", at)


def test_labels_arriving_after_a_look_are_not_used_at_that_look():
    """The canary loses recall on 'fraud'; every label arrives in one batch at T0 + 20.5 min. Nothing can be
    decided before the batch; the first look after it rolls back. With the same labels arriving at once,
    the look before the batch would already roll back: the labels alone make the difference."""
    spec = spec_from_text("""
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 60
  alpha: 0.05
  steps:
    - {weight_percent: 50, min_duration: 2h, min_canary_samples: 100}
  promotion: {max_duration: 24h, preflight: none}
  metrics:
    - {name: error_rate, allowed: {absolute: 0.05}}
    - {name: class_recall, class: fraud, gating: true, allowed: {absolute: 0.05}}
""")
    data = make_stream(3, classifier=True, minutes=30, per_min=100, users=400, canary_err=0.02, lat_factor=1.0,
                       quality_loss=0.6, label_delay_s=0.0, shuffle=False, weights=(0.5,))
    batch = T0 + 20.5 * 60
    late = data["label_arrival_ts"].copy()
    late[np.isfinite(late)] = np.maximum(batch, data["ts"][np.isfinite(late)])
    delayed = dict(data, label_arrival_ts=late, label_ts=late)
    res = replay(spec, delayed)
    assert res["decision"] == "rollback" and res["at_ts"] == look_time(T0, 60.0, 21)
    before = look_time(T0, 60.0, 20)
    assert analysis.evaluate_at(spec, delayed, before).decision == "continue"
    assert analysis.evaluate_at(spec, dict(data), before).decision == "rollback"  # labels there at once
    assert replay(spec, data)["at_ts"] < before
    # the stream as seen at the look before holds no label at all
    seen = cut_stream(delayed, before)
    assert all(v is None for v in seen["true_class"]) and np.isnan(seen["label_arrival_ts"]).all()


def test_cut_stream_withholds_rows_and_labels_after_t():
    data = {"ts": np.array([3.0, 1.0, 2.0, 5.0]), "role": _obj(["canary", "baseline", "canary", "canary"]),
            "true_class": _obj(["a", "b", None, "a"]), "label_arrival_ts": np.array([3.0, 4.0, np.nan, 5.0]),
            "thumbs": np.array([1.0, 0.0, 1.0, 1.0]), "thumbs_arrival_ts": np.array([2.5, 3.0, 3.5, 6.0]),
            "note": "not a column"}
    out = cut_stream(data, 3.0)
    assert list(out["ts"]) == [3.0, 1.0, 2.0] and out["note"] == "not a column"
    assert list(out["true_class"]) == ["a", None, None]
    assert np.array_equal(out["label_arrival_ts"], [3.0, np.nan, np.nan], equal_nan=True)
    assert np.array_equal(out["thumbs"], [1.0, 0.0, np.nan], equal_nan=True)
    assert np.array_equal(out["thumbs_arrival_ts"], [2.5, 3.0, np.nan], equal_nan=True)
    assert list(data["true_class"]) == ["a", "b", None, "a"]  # the input is not modified


def test_start_and_until_anchor_the_looks():
    data = make_stream(5, classifier=False, minutes=20, per_min=60, users=200, canary_err=0.02, lat_factor=1.0,
                       quality_loss=0.0, label_delay_s=0.0, shuffle=False)
    res = replay(CHAT, data, until=T0 + 600)
    assert res["looks"] == 10 and res["at_ts"] == look_time(T0, 60.0, res["looks_evaluated"]) <= T0 + 600
    res = replay(CHAT, data, until=T0 + 601)
    assert res["looks"] == 11
    start = T0 + 90.5
    res = replay(CHAT, data, start=start, until=T0 + 900)
    assert res["looks"] == 14 and res["at_ts"] == look_time(start, 60.0, res["looks_evaluated"])
    # observations before --start are not part of the rollout: the same as if they were not recorded
    later = {k: v[data["ts"] >= start] for k, v in data.items()}
    assert replay(CHAT, later, start=start, until=T0 + 900) == res


def test_prepare_in_two_parts_is_prepare_of_the_prefix():
    """Cluster codes of the once-per-dataset part, cut at any now, equal coding the prefix alone."""
    data = make_stream(11, classifier=True, minutes=15, per_min=80, users=150, canary_err=0.05, lat_factor=1.0,
                       quality_loss=0.2, label_delay_s=300.0, shuffle=True)
    ds = analysis.prepare_dataset(data)
    for k in (1, 4, 9, 15):
        now = look_time(T0, 60.0, k)
        whole, alone = analysis.prepare_at(ds, now), analysis.prepare(cut_stream(data, now), now)
        assert set(whole) == set(alone)
        for name in whole:
            a, b = whole[name], alone[name]
            assert a.shape == b.shape, name
            if name in ("true_class", "label", "label_ts") or name.endswith("_arrival_ts"):
                continue  # raw label columns: the cut stream has late labels removed; prepare masks by now
            if a.dtype.kind == "f":
                assert np.array_equal(a, b, equal_nan=True), name
            else:
                assert list(a) == list(b), name


def test_max_duration_ends_the_replay_as_inconclusive_like_the_controller():
    """Past max_duration without evidence for promotion the controller marks the rollout inconclusive and
    stops evaluating it; so does the replay (nothing after that look can change the outcome)."""
    spec = spec_from_text("""
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 60
  alpha: 0.05
  steps:
    - {weight_percent: 50, min_duration: 10m, min_canary_samples: 100}
  promotion: {max_duration: 15m, preflight: none}
  metrics:
    - {name: error_rate, allowed: {absolute: 0.0001}}
""")
    data = make_stream(2, classifier=False, minutes=30, per_min=60, users=200, canary_err=0.02, lat_factor=1.0,
                       quality_loss=0.0, label_delay_s=0.0, shuffle=False, weights=(0.5,))
    res = replay(spec, data)
    assert (res["decision"], res["at_ts"], res["looks_evaluated"], res["looks"]) == \
        ("inconclusive", look_time(T0, 60.0, 15), 15, 30)
    assert _live_controller(spec, data, res["looks"]) == ("inconclusive", res["at_ts"])
