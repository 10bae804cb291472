"""Capacity-aware ramps (issue 17 part 5): ``rollout.capacity`` parsed with file/line errors, the
projection and its decision (pure), and the watch that reads rates from a real observation store and
logs ``capacity_hold`` / ``capacity_clear`` once per change."""

from __future__ import annotations

import pytest
import yaml

from lockgate.config import config_from_text
from lockgate.controller.decide.capacity import MIN_TOKEN_SAMPLES, LoadInputs, capacity_json, judge_capacity
from lockgate.controller.decide.spec import ConfigError, spec_from_text
from lockgate.controller.decide.stages import StageState, decide
from lockgate.controller.stats import Judgement

SPEC = """\
rollout:
  model: chat
  canary: v2
  steps:
    - {weight_percent: 20, min_duration: 60s, min_canary_samples: 10}
    - {weight_percent: 50, min_duration: 60s, min_canary_samples: 10}
  promotion: {max_duration: 1h, preflight: none, require_non_inferiority: false}
  capacity:
    requests_per_s_per_host: 60
  metrics:
    - {name: error_rate, allowed: {absolute: 0.01}}
"""


def _config(tmp_path, canary_endpoints='["127.0.0.1:12", "127.0.0.1:13"]'):
    return config_from_text(f"""
state_dir: {tmp_path}
control: {{port: 1}}
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:11"]}}, v2: {{endpoints: {canary_endpoints}}}}}}}]
""")


def test_capacity_parses_with_defaults_and_changes_the_hash_only_when_set():
    spec = spec_from_text(SPEC)
    c = spec.capacity
    assert (c.requests_per_s_per_host, c.tokens_per_s_per_host, c.headroom, c.window_s) == (60.0, None, 0.8, 60.0)
    assert spec.canonical()["capacity"] == {"requests_per_s_per_host": 60.0, "headroom": 0.8, "window_s": 60.0}
    plain = SPEC.replace("  capacity:\n    requests_per_s_per_host: 60\n", "")
    assert spec_from_text(plain).capacity is None and "capacity" not in spec_from_text(plain).canonical()
    assert spec_from_text(plain).sha256 != spec.sha256
    same = SPEC.replace("requests_per_s_per_host: 60\n", "requests_per_s_per_host: 60.0\n    headroom: 0.8\n"
                                                         "    window_s: 60\n")
    assert spec_from_text(same).sha256 == spec.sha256
    both = spec_from_text(SPEC.replace("requests_per_s_per_host: 60\n", "{tokens_per_s_per_host: 2000, "
                                                                        "requests_per_s_per_host: 5, headroom: 1}\n"))
    assert both.capacity.describe() == "5 req/s and 2000 tokens/s per host, headroom 1"
    # lockgate validate / rollout start print it in the spec's summary
    assert spec.summary().endswith("1 metric (1 gating), capacity: 60 req/s per host, headroom 0.8")


def test_every_capacity_problem_with_file_line_and_field(tmp_path):
    bad = SPEC.replace("    requests_per_s_per_host: 60\n",
                       "    requests_per_s_per_host: 0\n    tokens_per_s_per_host: lots\n    headroom: 1.5\n"
                       "    window_s: 5\n    hedroom: 0.5\n")
    with pytest.raises(ConfigError) as err:
        spec_from_text(bad, "c.yaml")
    lines = [p.render("c.yaml") for p in err.value.problems]
    expect = [
        "c.yaml:9:30: rollout.capacity.requests_per_s_per_host: must be greater than 0 and at most 1e+09, got 0",
        "c.yaml:10:28: rollout.capacity.tokens_per_s_per_host: must be a number, got a string",
        "c.yaml:11:15: rollout.capacity.headroom: must be greater than 0 and at most 1",
        "c.yaml:12:15: rollout.capacity.window_s: must be between 10.0 and 3600.0, got 5",
        "c.yaml:13:14: rollout.capacity.hedroom: unknown field",
    ]
    out = "\n".join(lines)
    for e in expect:
        assert any(line.startswith(e) for line in lines), f"missing: {e}\n--- got:\n{out}"
    assert len(lines) == len(expect), out
    with pytest.raises(ConfigError) as err:
        spec_from_text(SPEC.replace("    requests_per_s_per_host: 60\n", "    headroom: 0.5\n"), "c.yaml")
    assert [p.render("c.yaml") for p in err.value.problems] == [
        "c.yaml:9:5: rollout.capacity: needs requests_per_s_per_host and/or tokens_per_s_per_host (the canary's "
        "capacity per host), or latency_rise (observed mode)"]
    with pytest.raises(ConfigError) as err:
        spec_from_text(SPEC.replace("    requests_per_s_per_host: 60\n", ""), "c.yaml")
    assert "c.yaml:8:12: rollout.capacity: is empty: give requests_per_s_per_host" in str(err.value)
    assert spec_from_text(SPEC, "c.yaml", _config(tmp_path)).capacity is not None


def test_capacity_document_model_and_schema():
    from lockgate.controller.decide.spec.document import SpecDocument
    from lockgate.controller.decide.spec_schema import rollout_schema

    doc = SpecDocument.model_validate(yaml.safe_load(SPEC))
    assert doc.rollout.capacity.requests_per_s_per_host == 60 and doc.rollout.capacity.headroom == 0.8
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (optional)")
    v = jsonschema.Draft202012Validator(rollout_schema())
    assert not list(v.iter_errors(yaml.safe_load(SPEC)))
    bad = yaml.safe_load(SPEC)
    bad["rollout"]["capacity"]["headroom"] = 2
    assert len(list(v.iter_errors(bad))) == 1


# ----------------------------------------------------------------------------- the projection (pure)


def test_projection_of_requests_onto_the_canary_hosts():
    spec = spec_from_text(SPEC)
    # 360 req/s in total over 60 s; at 20 % the canary had 72 req/s; next step 50 % -> 180 req/s
    load = LoadInputs(window_s=60, hosts=2, requests=360 * 60, canary_requests=72 * 60)
    v = judge_capacity(spec, 0, load)
    assert not v.fits
    assert v.reason == ("capacity: holding at 20%: next step 50% projects 180 req/s onto 2 canary hosts, "
                        "capacity 2 × 60 × 0.8 = 96 req/s (traffic 360 req/s over the last 60 s)")
    assert (v.numbers["projected_rps"], v.numbers["limit_rps"], v.numbers["canary_rps"]) == (180.0, 96.0, 72.0)
    # at the last step the next step is the promotion to 100 %
    v = judge_capacity(spec, 1, LoadInputs(window_s=60, hosts=2, requests=100 * 60))
    assert not v.fits and v.reason.startswith("capacity: holding at 50%: promotion to 100% projects 100 req/s")
    # within: 150 req/s x 50 % = 75 <= 96
    v = judge_capacity(spec, 0, LoadInputs(window_s=60, hosts=2, requests=150 * 60))
    assert v.fits and v.reason == ("capacity: next step 50% projects 75 req/s onto 2 canary hosts, capacity "
                                   "2 × 60 × 0.8 = 96 req/s (traffic 150 req/s over the last 60 s): fits")
    # exactly at the limit fits; just above does not
    assert judge_capacity(spec, 0, LoadInputs(window_s=60, hosts=2, requests=192 * 60)).fits
    assert not judge_capacity(spec, 0, LoadInputs(window_s=60, hosts=2, requests=192 * 60 + 1)).fits
    # one more host: 3 x 60 x 0.8 = 144 >= 90 (150 req/s x 0.5 = 75 … and 180 x 0.5 = 90)
    assert judge_capacity(spec, 0, LoadInputs(window_s=60, hosts=3, requests=180 * 60)).fits
    # no traffic: nothing to project
    assert judge_capacity(spec, 0, LoadInputs(window_s=60, hosts=2)).fits
    # no hosts known (the config changed under a running rollout): hold, saying why
    v = judge_capacity(spec, 0, LoadInputs(window_s=60, hosts=0, requests=10))
    assert not v.fits and "lists no hosts" in v.reason
    # no rule, or past the last step: nothing to say
    assert judge_capacity(spec_from_text(SPEC.replace("  capacity:\n    requests_per_s_per_host: 60\n", "")), 0,
                          load) is None
    assert judge_capacity(spec, 2, load) is None
    j = capacity_json(v, True)
    assert j["holding"] and not j["fits"] and j["reason"] == v.reason and j["hosts"] == 0


def test_projection_of_output_tokens_uses_the_canarys_mean_once_it_has_enough():
    spec = spec_from_text(SPEC.replace("requests_per_s_per_host: 60", "tokens_per_s_per_host: 1000"))
    # 100 req/s; the model's mean is 10 tokens, the canary's 30 (it talks more)
    few = LoadInputs(window_s=10, hosts=2, requests=1000, canary_requests=10, tokens=10_000, token_responses=1000,
                     canary_tokens=300, canary_token_responses=MIN_TOKEN_SAMPLES - 10)
    v = judge_capacity(spec, 0, few)  # 50 req/s x 10 = 500 tokens/s <= 2 x 1000 x 0.8
    assert v.fits and "(50 req/s × 10 tokens, the model's mean)" in v.reason
    many = LoadInputs(window_s=10, hosts=2, requests=1000, canary_requests=200, tokens=10_000, token_responses=1000,
                      canary_tokens=200 * 40, canary_token_responses=200)
    v = judge_capacity(spec, 0, many)  # 50 x 40 = 2000 > 1600
    assert not v.fits and v.reason.startswith(
        "capacity: holding at 20%: next step 50% projects 2,000 tokens/s onto 2 canary hosts (50 req/s × 40 tokens, "
        "the canary's mean), capacity 2 × 1000 × 0.8 = 1,600 tokens/s")
    assert v.numbers["projected_tps"] == 2000.0 and v.numbers["limit_tps"] == 1600.0
    # no tokens reported: the token rule cannot project, and says so (the request rule, if any, still applies)
    v = judge_capacity(spec, 0, LoadInputs(window_s=10, hosts=2, requests=1000))
    assert v.fits and "no output tokens reported" in v.reason
    both = spec_from_text(SPEC.replace("requests_per_s_per_host: 60", "{requests_per_s_per_host: 40, "
                                                                      "tokens_per_s_per_host: 1000}"))
    v = judge_capacity(both, 0, many)  # 50 req/s <= 64, 2000 tokens/s > 1600
    assert not v.fits and "tokens/s onto" in v.reason and "req/s onto 2 canary hosts, capacity" not in v.reason


def J(decision):
    class V:
        metric, verdict, gating = "error_rate", "pass" if decision == "promote" else "not-yet", True
    return Judgement(decision, ("why",), 0.05, 0.05, 1, "stmt", (V(),))


def test_stage_decision_holds_on_capacity_but_harm_still_rolls_back():
    spec = spec_from_text(SPEC)
    over = judge_capacity(spec, 0, LoadInputs(window_s=60, hosts=2, requests=360 * 60))
    fits = judge_capacity(spec, 0, LoadInputs(window_s=60, hosts=2, requests=100 * 60))
    st = StageState("running", 0, 0.0, 0.0)
    d = decide(spec, st, J("continue"), 100.0, 50, None, over)
    assert (d.action, d.weight_bp, d.capacity_hold) == ("hold", 2000, True) and d.reasons == (over.reason,)
    d = decide(spec, st, J("continue"), 100.0, 50, None, fits)
    assert d.action == "advance" and d.weight_bp == 5000 and d.reasons[-1] == fits.reason and not d.capacity_hold
    d = decide(spec, st, J("rollback"), 100.0, 50, None, over)
    assert d.action == "rollback"  # a capacity hold never stops a rollback
    d = decide(spec, st, J("continue"), 10.0, 50, None, over)  # the stage's own minimum holds first
    assert d.action == "hold" and d.reasons == ("minimum duration: 10 of 60 s",) and not d.capacity_hold
    last = StageState("running", 1, 0.0, 0.0)
    over_last = judge_capacity(spec, 1, LoadInputs(window_s=60, hosts=2, requests=360 * 60))
    d = decide(spec, last, J("continue"), 100.0, 50, None, over_last)
    assert d.action == "hold" and d.capacity_hold and "promotion to 100%" in d.reasons[0]
    d = decide(spec, StageState("paused", 0, 0.0, 0.0), J("continue"), 100.0, 50, None, over)
    assert d.action == "hold" and not d.capacity_hold
    # held up to max_duration: inconclusive for a human, with the reason (never promoted)
    d = decide(spec, st, J("continue"), 3600.0, 50, None, over)
    assert d.action == "inconclusive" and over.reason in d.reasons


# ----------------------------------------------------------------------------- the watch (real stores)


def test_watch_reads_rates_from_the_store_and_logs_each_change_once(tmp_path):
    import time as _time

    from lockgate.controller.decide.capacity_watch import CapacityWatch
    from lockgate.controller.decide.rollouts import RolloutStore
    from lockgate.controller.ingest.observations import ObservationStore
    from lockgate.proto.v1 import observations_pb2

    cfg = _config(tmp_path)
    spec = spec_from_text(SPEC, "s.yaml", cfg)
    obs = ObservationStore(tmp_path / "obs.db")
    store = RolloutStore(tmp_path / "rollouts.db")
    now = _time.time()
    rows = []
    for i in range(600):  # 60 s at 10 req/s, 20 % canary, 12 output tokens each
        version = "v2" if i % 5 == 0 else "v1"
        rows.append(observations_pb2.Observation(
            request_id=f"r{i}", model="chat", version=version, role="canary" if version == "v2" else "baseline",
            ts=now - 59.95 + i * 0.1, status_code=200, duration_ms=10.0, output_tokens=12))
    obs.insert(rows)
    r = store.create(model="chat", canary="v2", baseline="v1", spec_text=SPEC, spec_source="s.yaml",
                     spec_hash=spec.sha256, created_by="t", auto={})
    r = store.transition(r.id, expect=("pending",), status="running", stage=0, kind="started", actor="t")
    emitted = []
    watch = CapacityWatch(obs, store, cfg, lambda *a: emitted.append(a))
    v = watch.verdict(r, spec, now + 0.01)
    assert v.numbers["requests"] == 600 and v.numbers["canary_requests"] == 120 and v.numbers["hosts"] == 2
    assert v.fits and v.numbers["projected_rps"] == 5.0  # 10 req/s x 50 %
    low = spec_from_text(SPEC.replace("requests_per_s_per_host: 60", "requests_per_s_per_host: 2"), "s.yaml", cfg)
    v_low = watch.verdict(r, low, now + 0.02)  # cached read (same rates), the low rule: 5 > 2 x 2 x 0.8
    assert not v_low.fits and "capacity 2 × 2 × 0.8 = 3.2 req/s" in v_low.reason
    st = StageState("running", 0, 0.0, 0.0)
    for t, s, v_ in ((100.0, low, v_low), (101.0, low, v_low), (102.0, spec, v), (103.0, spec, v),
                     (104.0, low, v_low)):
        d = decide(s, st, J("continue"), t, 50, None, v_)
        block = watch.after(r, s, d, v_)
        assert block["holding"] == (v_ is v_low)
    kinds = [e["kind"] for e in store.events(r.id) if e["kind"].startswith("capacity")]
    assert kinds == ["capacity_hold", "capacity_clear", "capacity_hold"]
    held = next(e for e in store.events(r.id) if e["kind"] == "capacity_hold")
    assert held["detail"]["reasons"] == [v_low.reason] and held["detail"]["limit_rps"] == 3.2
    # the first hold of the stage is an alert (once, though it held twice)
    assert [(k, rid) for k, rid, _ in emitted] == [("capacity_hold", r.id)]
    from lockgate.controller.tell.alerts.message import alert_from_event

    alert = alert_from_event({"kind": "capacity_hold", "detail": emitted[0][2], "ts": 1.0,
                              "rollout": {"id": r.id, "model": "chat", "canary": "v2", "baseline": "v1"}}, 2000)
    assert alert.severity == "warning" and alert.title == (
        f"chat: rollout #{r.id} of v2 HELD at 20% of traffic: its hosts cannot take the next step (capacity); "
        "lower traffic, more canary hosts or a person")
    assert alert.lines == [f"Reason: {v_low.reason}"]
    # a new watch (a restarted controller) reads the state from the log: no second capacity_hold
    again = CapacityWatch(obs, store, cfg, lambda *a: emitted.append(a))
    again.after(r, low, decide(low, st, J("continue"), 105.0, 50, None, v_low), v_low)
    assert [e["kind"] for e in store.events(r.id) if e["kind"].startswith("capacity")] == kinds
    assert len(emitted) == 1  # nor a second alert
    obs.close()
    store.close()


# ----------------------------------------------------------------------------- observed mode (latency_rise)

OBSERVED = SPEC.replace("    requests_per_s_per_host: 60\n", "    latency_rise: 1.5\n    window_s: 30\n")


def test_observed_mode_parses_alone_or_with_a_capacity_and_refuses_bad_factors():
    spec = spec_from_text(OBSERVED)
    assert spec.capacity.latency_rise == 1.5 and spec.capacity.requests_per_s_per_host is None
    assert spec.canonical()["capacity"] == {"latency_rise": 1.5, "headroom": 0.8, "window_s": 30.0}
    assert spec.capacity.describe() == "p50 latency rise at most ×1.5"
    assert spec_from_text(SPEC).sha256 != spec_from_text(SPEC.replace("60\n", "60\n    latency_rise: 2\n", 1)).sha256
    with pytest.raises(ConfigError) as err:
        spec_from_text(OBSERVED.replace("latency_rise: 1.5", "latency_rise: 1"), "o.yaml")
    assert [p.render("o.yaml") for p in err.value.problems] == [
        "o.yaml:9:19: rollout.capacity.latency_rise: must be at least 1.05 and at most 100 (the factor the canary's "
        "p50 latency may rise by with load), got 1"]


def test_observed_mode_holds_when_the_canarys_p50_rose_with_load():
    spec = spec_from_text(OBSERVED)
    base = dict(window_s=30, hosts=2, requests=3000, canary_requests=600, start_latency_n=200, canary_latency_n=600)
    v = judge_capacity(spec, 0, LoadInputs(**base, start_p50_ms=120.0, canary_p50_ms=310.0))
    assert not v.fits and v.reason == (
        "capacity: holding at 20%: before the next step 50%: the canary's p50 latency rose from 120 ms (the first "
        "30 s of the rollout, at 20%) to 310 ms over the last 30 s (×2.58, more than the allowed ×1.5): its hosts "
        "slow down with load")
    assert v.numbers["latency_ratio"] == 2.583 and v.numbers["start_p50_ms"] == 120.0
    v = judge_capacity(spec, 0, LoadInputs(**base, start_p50_ms=120.0, canary_p50_ms=150.0))
    assert v.fits and v.reason == ("capacity: before the next step 50%: the canary's p50 latency 150 ms over the "
                                   "last 30 s vs 120 ms in the first 30 s of the rollout, at 20% (×1.25, within "
                                   "×1.5): fits")
    few = dict(base, start_latency_n=10)
    v = judge_capacity(spec, 0, LoadInputs(**few, start_p50_ms=120.0, canary_p50_ms=900.0))
    assert v.fits and "not compared yet (10 of 30 responses in the first 30 s of the rollout, 600 of 30" in v.reason
    # a sub-millisecond start counts as 1 ms: 0.2 -> 1.2 ms is x1.2, not x6
    assert judge_capacity(spec, 0, LoadInputs(**base, start_p50_ms=0.2, canary_p50_ms=1.2)).fits
    # with a configured capacity too: both said, either one holds
    both = spec_from_text(OBSERVED.replace("    latency_rise: 1.5\n", "    latency_rise: 1.5\n"
                                                                      "    requests_per_s_per_host: 20\n"))
    v = judge_capacity(both, 0, LoadInputs(**base, start_p50_ms=120.0, canary_p50_ms=310.0))
    assert not v.fits and v.reason.startswith("capacity: holding at 20%: next step 50% projects 50 req/s onto 2 "
                                              "canary hosts, capacity 2 × 20 × 0.8 = 32 req/s (traffic 100 req/s "
                                              "over the last 30 s); and the canary's p50 latency rose from 120 ms")
    v = judge_capacity(both, 0, LoadInputs(**dict(base, requests=1200), start_p50_ms=120.0, canary_p50_ms=130.0))
    assert v.fits and "20 req/s onto 2 canary hosts" in v.reason and "(×1.08, within ×1.5): fits" in v.reason


def test_watch_reads_the_start_and_recent_canary_latency(tmp_path):
    import time as _time

    from lockgate.controller.decide.capacity_watch import CapacityWatch
    from lockgate.controller.decide.rollouts import RolloutStore
    from lockgate.controller.ingest.observations import ObservationStore
    from lockgate.proto.v1 import observations_pb2

    cfg = _config(tmp_path)
    spec = spec_from_text(OBSERVED, "o.yaml", cfg)
    obs = ObservationStore(tmp_path / "obs.db")
    store = RolloutStore(tmp_path / "rollouts.db")
    r = store.create(model="chat", canary="v2", baseline="v1", spec_text=OBSERVED, spec_source="o.yaml",
                     spec_hash=spec.sha256, created_by="t", auto={})
    r = store.transition(r.id, expect=("pending",), status="running", stage=0, kind="started", actor="t")
    t0 = r.started_at
    rows = []
    for i in range(900):  # 90 s at 10 req/s from the start; the canary (every 2nd) slows from 100 to 250 ms
        ts = t0 + i * 0.1
        version = "v2" if i % 2 == 0 else "v1"
        rows.append(observations_pb2.Observation(
            request_id=f"r{i}", model="chat", version=version, role="canary" if version == "v2" else "baseline",
            ts=ts, status_code=200, duration_ms=(100.0 if ts < t0 + 45 else 250.0) if version == "v2" else 80.0))
    obs.insert(rows)
    watch = CapacityWatch(obs, store, cfg)
    v = watch.verdict(r, spec, t0 + 90.0)
    assert (v.numbers["start_p50_ms"], v.numbers["start_latency_n"]) == (100.0, 150)
    assert (v.numbers["canary_p50_ms"], v.numbers["canary_latency_n"]) == (250.0, 150)
    assert not v.fits and "rose from 100 ms" in v.reason and "to 250 ms over the last 30 s (×2.50" in v.reason
    assert watch._start[r.id] == (100.0, 150)  # read once: the start window is complete
    obs.close()
    store.close()
