"""Promotion you can plan: the ramp planner (lockgate.controller.decide.ramp_plan), its use by the promoter and the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from types import SimpleNamespace as NS

import numpy as np
import pytest

from lockgate.controller.decide import analysis
from lockgate.controller.decide.ramp_plan import (
    StageSpan,
    hours_to_reach,
    metric_estimate,
    plan_start,
    plan_status,
    stage_hours,
)
from lockgate.controller.decide.spec import spec_from_text
from lockgate.controller.stats import MetricSpec, evaluate_all, samples_needed, split_alpha
from lockgate.controller.stats.simulate import CLASSES, RolloutConfig, default_specs, prefix, simulate_rollout

T0 = 1_700_000_000.0


def _spec(weight_bp=5000, min_duration_s=600.0, max_duration_s=24 * 3600.0, require_ni=True, alpha=0.05, steps=None):
    steps = steps or [(weight_bp, min_duration_s, 0)]
    return NS(steps=[NS(weight_bp=w, min_duration_s=d, min_canary_samples=n) for w, d, n in steps], alpha=alpha,
              promotion=NS(max_duration_s=max_duration_s, require_non_inferiority=require_ni))


def _store_columns(stream: dict, t0: float = T0) -> dict:
    """A simulated baseline stream as ObservationStore.fetch columns (the stable version's history)."""
    n = stream["ts"].size
    label = stream["label"]
    return {
        "ts": t0 + stream["ts"],
        "request_id": np.array([f"r{i}" for i in range(n)], dtype=object),
        "version": np.full(n, "v1", dtype=object),
        "role": np.full(n, "baseline", dtype=object),
        "weight": np.zeros(n),
        "status_code": np.where(stream["error"], 500.0, 200.0),
        "timeout": np.zeros(n),
        "latency_ms": stream["latency_ms"],
        "output_tokens": stream["output_tokens"],
        "refusal": stream["refusal"].astype(float),
        "user_key": np.array([f"u{u}" for u in stream["user"]], dtype=object),
        "predicted_class": np.array([CLASSES[p] for p in stream["pred"]], dtype=object),
        "true_class": np.array([None if not np.isfinite(x) else CLASSES[int(x)] for x in label], dtype=object),
        "label_arrival_ts": t0 + stream["label_ts"],
    }


@pytest.fixture(scope="module")
def store_history():
    cfg = RolloutConfig(stages=(0.0,), hours_per_stage=24.0, requests_per_hour=2000.0)
    stream = simulate_rollout(np.random.default_rng(7), cfg)
    return _store_columns(stream), T0 + 24 * 3600.0


# --------------------------------------------------------------------------- calibration


def test_predicted_samples_match_when_an_identical_canary_first_passes():
    """A/A: the planner's canary observations needed for a mean and a rate metric (from a separate baseline
    history) is within a factor 1.5 of the median number of canary observations at which evaluate_all first
    says `pass` for that metric, over 30 simulated rollouts at one stage share."""
    hours = 4.0
    kw = dict(hours_per_stage=hours, base_error=0.05)  # errors at 5 %: the rate metric passes within hours
    specs = default_specs()
    alphas = split_alpha(specs, 0.05)
    history = simulate_rollout(np.random.default_rng(1000), RolloutConfig(stages=(0.0,), **kw))
    plan = plan_start(_spec(), specs, history, now=hours * 3600.0, alphas=alphas)
    predicted = {m.metric: m.needed for m in plan.metrics}
    watched = [dataclasses.replace(s, alpha=alphas[s.name]) for s in specs if s.name in ("error_rate", "output_tokens")]
    looks = np.geomspace(0.05 * 3600.0, hours * 3600.0, 30)
    first: dict[str, list[float]] = {s.name: [] for s in watched}
    cfg = RolloutConfig(stages=(0.5,), **kw)
    for run in range(30):
        stream = simulate_rollout(np.random.default_rng(run), cfg)
        todo = {s.name for s in watched}
        for t in looks:
            for v in evaluate_all([s for s in watched if s.name in todo], prefix(stream, t), 0.05).verdicts:
                if v.verdict == "pass":
                    first[v.metric].append(v.n_canary)
                    todo.discard(v.metric)
            if not todo:
                break
        for name in todo:
            first[name].append(math.inf)
    for name, ns in first.items():
        med = float(np.median(ns))
        assert math.isfinite(med), name
        ratio = predicted[name] / med
        assert 1 / 1.5 <= ratio <= 1.5, (name, predicted[name], med)


def test_design_effect_is_measured_per_user_and_grows_with_the_window():
    hours = 4.0
    history = simulate_rollout(np.random.default_rng(3), RolloutConfig(stages=(0.0,), hours_per_stage=hours))
    spec = default_specs()[3]  # output_tokens
    short = metric_estimate(spec, history, hours * 3600, 0.5, requests_per_hour=20000, window_hours=0.1)
    long = metric_estimate(spec, history, hours * 3600, 0.5, requests_per_hour=20000, window_hours=hours)
    assert 1.0 <= short.design_effect < long.design_effect
    # the same history with every request its own user: no clustering
    iid = dict(history, cluster=np.arange(history["ts"].size))
    flat = metric_estimate(spec, iid, hours * 3600, 0.5, requests_per_hour=20000, window_hours=hours)
    assert flat.design_effect == pytest.approx(1.0, abs=0.05)
    assert long.v1 / flat.v1 == pytest.approx(long.design_effect / flat.design_effect, rel=1e-6)
    # v1 = deff var (1 + c^2 s/(1-s)) for a relative allowance: c = 1.1
    y = history["output_tokens"][np.isfinite(history["output_tokens"])]
    assert flat.v1 == pytest.approx(flat.design_effect * y.var() * (1 + 1.21), rel=1e-6)
    assert flat.gap == pytest.approx(0.1 * y.mean())


def test_quantile_plan_uses_the_exceedance_share_gap():
    hours = 4.0
    history = simulate_rollout(np.random.default_rng(4), RolloutConfig(stages=(0.0,), hours_per_stage=hours))
    ratio = MetricSpec("latency_p95", "quantile", "increase", allowed=1.2, allowed_mode="exceedance_ratio",
                       quantile=0.95, column="latency_ms")
    e = metric_estimate(ratio, history, hours * 3600, 0.5, requests_per_hour=20000)
    assert e.gap == pytest.approx(0.2 * 0.05, rel=0.02)  # (r - 1) x the baseline's share beyond its p95
    shift = MetricSpec("latency_p95", "quantile", "increase", allowed=0.1, allowed_mode="relative",
                       quantile=0.95, column="latency_ms")
    e2 = metric_estimate(shift, history, hours * 3600, 0.5, requests_per_hour=20000)
    lat = history["latency_ms"][np.isfinite(history["latency_ms"])]
    q = np.quantile(lat, 0.95)
    assert e2.gap == pytest.approx(np.mean(lat > q) - np.mean(lat > 1.1 * q), rel=1e-9)
    assert e2.unit == "requests with latency_ms measured"  # errored requests have no latency


# --------------------------------------------------------------------------- the walk


def test_walk_through_the_ramp():
    stages = [StageSpan(0.1, 1.0), StageSpan(0.5, 2.0)]
    # 1000 obs/h: 100 canary obs in stage 1, then 500/h
    assert hours_to_reach(50, stages, 1000.0) == pytest.approx(0.5)
    assert hours_to_reach(600, stages, 1000.0) == pytest.approx(2.0)
    assert hours_to_reach(5100, stages, 1000.0) == pytest.approx(11.0)  # beyond the ramp: the last stage holds
    assert hours_to_reach(600, stages, 1000.0, have=100, start_stage=1, elapsed_in_stage=0.5) == pytest.approx(1.0)
    assert hours_to_reach(10, stages, 0.0) is None
    assert hours_to_reach(10, stages, 1000.0, have=10) == 0.0
    spans = stage_hours([NS(weight_bp=100, min_duration_s=600, min_canary_samples=200)], 10000.0)
    assert spans[0].hours == pytest.approx(2.0)  # 200 canary samples at 1 % of 10,000 req/h take 2 h > 10 min


def test_hours_walk_stages_and_fit_the_ramp():
    hours = 4.0
    history = simulate_rollout(np.random.default_rng(5), RolloutConfig(stages=(0.0,), hours_per_stage=hours))
    spec = _spec(steps=[(500, 1800.0, 0), (5000, 3600.0, 0)], max_duration_s=48 * 3600.0)
    plan = plan_start(spec, default_specs(), history, now=hours * 3600.0)
    assert plan.ramp_hours == pytest.approx(1.5)
    by = {m.metric: m for m in plan.metrics}
    tok, ref = by["output_tokens"], by["refusal_rate"]
    assert tok.fits_ramp and tok.hours == pytest.approx(1.5) and "fits the ramp" in tok.text
    # refusals at 1 %: longer than the ramp; the walk counts the 5 % stage's canary observations too
    assert not ref.fits_ramp and ref.fits_max_duration
    expected = 0.5 + (ref.needed - ref.obs_per_hour * 0.05 * 0.5) / (ref.obs_per_hour * 0.5)
    assert ref.hours == pytest.approx(expected, rel=1e-6)
    assert "holds at the last stage (50%)" in ref.text
    assert any(w.startswith("refusal_rate:") and "longer than the ramp" in w for w in plan.warnings)
    assert ref.baseline_needed == ref.needed  # 50 %: as many on the baseline
    assert "per arm" in ref.text
    json.dumps(plan.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------- classes, warnings


def test_class_plan_counts_labelled_requests_of_the_class(store_history):
    history, now = store_history
    spec = spec_from_text("""
rollout:
  model: chat
  canary: v2
  steps: [{weight_percent: 10, min_duration: 1h}, {weight_percent: 50, min_duration: 2h}]
  promotion: {max_duration: 24h}
  metrics:
    - {name: class_recall, class: fraud, allowed: {absolute: 0.01}}
    - {name: output_tokens, allowed: {relative: 0.2}}
""")
    prepared = analysis.prepare(history, now)
    plan = plan_start(spec, spec.to_stats_specs({}), prepared, now)
    fraud = plan.metrics[0]
    assert fraud.metric == "class_recall[fraud]" and fraud.unit == "labelled fraud requests"
    # 2,000 req/h x 10 % fraud x 80 % labelled
    assert fraud.obs_per_hour == pytest.approx(2000 * 0.1 * 0.8, rel=0.1)
    assert fraud.details["measured_fraction"] == pytest.approx(0.08, rel=0.1)
    assert fraud.details["label_delay_hours"] == pytest.approx(1800 * math.log(2) / 3600, rel=0.15)
    # the needed count is of recall's own observations: R(1-R) with R = 0.8, allowance 1 point
    r = fraud.details["baseline"]
    assert r == pytest.approx(0.8, abs=0.02)
    v1 = fraud.details["var_per_canary_obs"]
    assert v1 >= r * (1 - r) * 2 * 0.999
    assert fraud.needed == samples_needed(0.01, spec.alpha / 2, var_per_canary_obs=v1, tau=0.01)
    # ~ 128 labelled fraud/h over both arms: tens of thousands needed means hundreds of hours
    assert not fraud.fits_max_duration and fraud.hours > 24
    assert "labelled fraud requests per arm needed" in fraud.text
    (w,) = [w for w in plan.warnings if w.startswith("class_recall[fraud]")]
    assert "longer than max_duration 24 h" in w and "loosen the allowance or gate it offline" in w
    tok = plan.metrics[1]
    assert tok.fits_max_duration and tok.warning is None


def test_empty_history_cannot_estimate():
    spec = _spec()
    specs = default_specs()
    plan = plan_start(spec, specs, {"ts": np.zeros(0)}, now=T0)
    assert len(plan.metrics) == 5 and all(m.needed is None for m in plan.metrics)
    (w,) = plan.warnings
    assert "cannot estimate" in w and "error_rate" in w and "no baseline traffic" in w
    json.dumps(plan.to_dict(), allow_nan=False)


def test_metric_without_history_is_named(store_history):
    history, now = store_history
    specs = [MetricSpec("similarity", "mean", "decrease", allowed=0.05),
             MetricSpec("output_tokens", "mean", "increase", allowed=0.1, allowed_mode="relative"),
             MetricSpec("recall_x", "class_recall", "decrease", allowed=0.01, cls="nope", column="predicted_class",
                        label_column="true_class", label_ts_column="label_arrival_ts")]
    plan = plan_start(_spec(), specs, analysis.prepare(history, now), now)
    sim, tok, rx = plan.metrics
    assert sim.needed is None and "similarity: cannot estimate" in sim.text and "'similarity'" in sim.text
    assert tok.needed is not None
    assert rx.needed is None and "only 0 labelled requests of class 'nope'" in rx.text
    assert sum("cannot estimate" in w for w in plan.warnings) == 2


def test_zero_allowance_is_never_provable_for_an_identical_canary(store_history):
    history, now = store_history
    specs = [MetricSpec("output_tokens", "mean", "increase", allowed=0.0)]
    plan = plan_start(_spec(), specs, analysis.prepare(history, now), now)
    (m,) = plan.metrics
    assert m.needed is None and m.fits_max_duration is False and "allowance of 0" in m.warning


def test_no_warnings_when_promotion_does_not_wait(store_history):
    history, now = store_history
    specs = [MetricSpec("recall", "class_recall", "decrease", allowed=0.01, cls="fraud", column="predicted_class",
                        label_column="true_class", label_ts_column="label_arrival_ts")]
    plan = plan_start(_spec(require_ni=False), specs, analysis.prepare(history, now), now)
    assert plan.warnings == () and "require_non_inferiority is false" in plan.metrics[0].text


# --------------------------------------------------------------------------- status


def _last_eval(verdicts, rate=10000.0, n_canary=20000):
    return {"requests_per_hour": rate, "n_canary": n_canary, "verdicts": verdicts}


def test_status_plan_remaining_and_rescaled_to_the_last_stage():
    spec = _spec(steps=[(1000, 3600.0, 0), (5000, 3600.0, 0)], max_duration_s=10 * 3600.0)
    specs = [MetricSpec("m", "mean", "increase", allowed=1.0), MetricSpec("p", "mean", "increase", allowed=1.0),
             MetricSpec("info", "mean", "increase", allowed=1.0, gating=False)]
    ev = _last_eval([
        {"metric": "m", "kind": "mean", "gating": True, "verdict": "not-yet", "n_needed": 30000,
         "n_canary": 10000, "n_baseline": 90000},
        {"metric": "p", "kind": "mean", "gating": True, "verdict": "pass", "n_needed": 100, "n_canary": 10000,
         "n_baseline": 90000},
        {"metric": "info", "kind": "mean", "gating": False, "verdict": "not-yet", "n_needed": 5, "n_canary": 1},
    ], rate=100000.0, n_canary=10000)
    now = T0 + 3600.0
    plan = plan_status(spec, specs, ev, stage=0, started_at=T0, stage_started_at=T0, now=now)
    assert [m.metric for m in plan.metrics] == ["m", "p"]
    m, p = plan.metrics
    # split now 1:9 -> 1:1 at the last stage: v1 grows by (1 + 1) / (1 + 1/9)
    assert m.needed == math.ceil(30000 * 2 / (1 + 1 / 9))
    assert m.remaining == m.needed - 10000
    # stage 1 is over (1 h elapsed); 100,000 obs/h x 50 % on the canary
    assert m.hours_remaining == pytest.approx(max(1.0, m.remaining / 50000.0))
    assert m.hours == pytest.approx(1.0 + m.hours_remaining)
    assert m.fits_max_duration and m.warning is None
    assert p.remaining == 0 and "shown within its allowance" in p.text
    # much slower traffic: now it cannot fit max_duration
    slow = plan_status(spec, specs, dict(ev, requests_per_hour=1000.0), stage=1, started_at=T0,
                       stage_started_at=T0 + 3600.0, now=T0 + 2 * 3600.0)
    m2 = slow.metrics[0]
    assert m2.needed == 30000  # at the last stage already: no rescaling
    assert not m2.fits_max_duration
    (w,) = slow.warnings
    assert w.startswith("m: ~20,000 more requests on the canary") and "cannot be promoted in time" in w
    json.dumps(slow.to_dict(), allow_nan=False)


def test_status_plan_cannot_estimate_without_n_needed():
    spec = _spec()
    ev = _last_eval([{"metric": "m", "kind": "mean", "gating": True, "verdict": "not-yet", "n_needed": None,
                      "n_canary": 10, "n_baseline": 10}])
    plan = plan_status(spec, [], ev, stage=0, started_at=T0, stage_started_at=T0, now=T0 + 60)
    assert "cannot estimate yet" in plan.metrics[0].text and plan.warnings == ()


# --------------------------------------------------------------------------- CLI and promoter


def test_cli_plan_lines():
    from lockgate.cli import _plan_lines

    plan = plan_status(_spec(max_duration_s=3600.0), [MetricSpec("m", "mean", allowed=1.0)],
                       _last_eval([{"metric": "m", "kind": "mean", "gating": True, "verdict": "not-yet",
                                    "n_needed": 10**6, "n_canary": 100, "n_baseline": 100}], rate=1000.0,
                                  n_canary=100),
                       stage=0, started_at=T0, stage_started_at=T0, now=T0 + 60).to_dict()
    lines = _plan_lines(plan)
    assert lines[0].startswith("  plan: at 1,000 req/h (last evaluation)")
    assert lines[1].startswith("   !m: ~1,000,000 more requests on the canary")
    assert _plan_lines(None) == [] and _plan_lines({"metrics": []}) == []


def test_promoter_start_and_status_carry_the_plan(tmp_path, store_history):
    from lockgate.config import config_from_text
    from lockgate.controller.decide.actions import RolloutActions
    from lockgate.controller.decide.promoter import Promoter
    from lockgate.controller.decide.rollouts import RolloutStore

    history, now = store_history
    cfg = config_from_text(f"""
state_dir: {tmp_path}
control: {{port: 1}}
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:11"]}}, v2: {{endpoints: ["127.0.0.1:12"]}}}}}}]
""")
    spec_text = """
rollout:
  model: chat
  canary: v2
  steps: [{weight_percent: 50, min_duration: 1h, min_canary_samples: 0}]
  promotion: {max_duration: 24h, preflight: none}
  metrics:
    - {name: error_rate, allowed: {relative: 0.5}}
    - {name: output_tokens, allowed: {relative: 0.1}}
    - {name: class_recall, class: fraud, allowed: {absolute: 0.01}}
    - {name: similarity, allowed: {absolute: 0.05}}
    - {name: latency_p95, allowed: {relative: 0.1}, gating: false}
"""

    class Store:
        def fetch(self, model, since_ts=None, versions=None, columns=None):
            keep = history["ts"] >= since_ts
            return {k: v[keep] for k, v in history.items()}

    async def main():
        rollouts = RolloutStore(tmp_path / "rollouts.db")
        promoter = Promoter(cfg, rollouts, weights=None, observations=Store())  # no weights: begin is faked

        async def no_envoy(rollout):
            return {}

        promoter.begin = no_envoy
        actions = RolloutActions(cfg, rollouts, promoter, Store())
        import lockgate.controller.decide.actions as pm

        real_time = pm.time.time
        pm.time.time = lambda: now
        try:
            out = await actions.start(spec_text, "chat.yaml", "tester")
        finally:
            pm.time.time = real_time
        return actions, out

    promoter, out = asyncio.run(main())
    json.dumps(out, allow_nan=False)
    plan = out["plan"]
    assert [m["metric"] for m in plan["metrics"]] == ["error_rate", "output_tokens", "class_recall[fraud]", "similarity"]
    by = {m["metric"]: m for m in plan["metrics"]}
    assert by["class_recall[fraud]"]["unit"] == "labelled fraud requests"
    assert by["class_recall[fraud]"]["fits_max_duration"] is False
    assert any(w.startswith("class_recall[fraud]:") and "max_duration" in w for w in out["warnings"])
    assert any(w.startswith("similarity: cannot estimate") for w in out["warnings"])
    rid = out["rollout"]["id"]
    (ev,) = [e for e in promoter.rollouts.events(rid) if e["kind"] == "warnings"]
    assert ev["detail"]["plan"]["metrics"][0]["metric"] == "error_rate"
    assert ev["detail"]["warnings"] == out["warnings"]

    # status: a running rollout with an evaluation carries the plan from its verdicts
    store = promoter.rollouts
    store.transition(rid, expect=("pending",), status="running", kind="started", actor="t", weight_bp=5000)
    store.record_evaluation(rid, now + 600, 0, 5000, _last_eval([
        {"metric": "error_rate", "kind": "rate", "gating": True, "verdict": "not-yet", "n_needed": 40000,
         "n_canary": 1000, "n_baseline": 1000}], rate=2000.0, n_canary=1000))
    (st,) = promoter.status("chat")
    assert st["plan"]["kind"] == "status"
    (m,) = st["plan"]["metrics"]
    assert m["metric"] == "error_rate" and m["remaining"] == 39000 and m["hours_remaining"] > 0
    json.dumps(st, allow_nan=False, default=str)


def test_a_ramp_longer_than_max_duration_is_one_warning():
    hours = 4.0
    history = simulate_rollout(np.random.default_rng(5), RolloutConfig(stages=(0.0,), hours_per_stage=hours))
    # 20,000 req/h: 5,000 canary samples at 1 % take 25 h
    spec = _spec(steps=[(100, 600.0, 5000), (5000, 600.0, 0)], max_duration_s=12 * 3600.0)
    plan = plan_start(spec, default_specs()[3:4], history, now=hours * 3600.0)
    assert plan.ramp_hours == pytest.approx(25.0 + 1 / 6, rel=0.01)
    (m,) = plan.metrics
    assert m.fits_ramp and not m.fits_max_duration and m.warning is None
    (w,) = plan.warnings
    assert w.startswith("the ramp's minimums take ~25 h") and "stage 1 (1%) 25 h" in w and "max_duration 12 h" in w
