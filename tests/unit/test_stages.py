"""The rollout stage machine (pure) and the durable rollout store."""

from __future__ import annotations

import pytest

from lockgate.controller.decide.rollouts import RolloutConflict, RolloutStore
from lockgate.controller.decide.spec import spec_from_text
from lockgate.controller.decide.stages import StageState, decide
from lockgate.controller.stats import Judgement

SPEC = spec_from_text("""
rollout:
  model: chat
  canary: v2
  steps:
    - {weight_percent: 1, min_duration: 60s, min_canary_samples: 10}
    - {weight_percent: 50, min_duration: 60s, min_canary_samples: 10}
  promotion: {max_duration: 1h, preflight: none}
  metrics:
    - {name: error_rate, allowed: {absolute: 0.01}}
""")


class V:
    def __init__(self, metric, verdict, gating=True):
        self.metric, self.verdict, self.gating = metric, verdict, gating


def J(decision, verdict="not-yet"):
    return Judgement(decision, ("why",), 0.05, 0.05, 1, "stmt", (V("error_rate", verdict),))


def st(stage=0, status="running", started=0.0, stage_started=0.0):
    return StageState(status, stage, started, stage_started)


def test_harm_rolls_back_at_once_even_before_minimums_and_when_paused():
    for status in ("running", "paused"):
        d = decide(SPEC, st(status=status), J("rollback", "fail"), now=1.0, canary_samples_in_stage=0)
        assert (d.action, d.weight_bp) == ("rollback", 0)


def test_minimums_hold_then_advance_without_needing_non_inferiority():
    assert decide(SPEC, st(), J("continue"), now=30, canary_samples_in_stage=100).action == "hold"
    assert decide(SPEC, st(), J("continue"), now=90, canary_samples_in_stage=5).action == "hold"
    d = decide(SPEC, st(), J("continue"), now=90, canary_samples_in_stage=10)
    assert (d.action, d.stage, d.weight_bp) == ("advance", 1, 5000)


def test_promotion_needs_evidence_else_inconclusive_after_max_duration():
    d = decide(SPEC, st(1), J("continue"), now=120, canary_samples_in_stage=50)
    assert d.action == "hold" and "not yet" in " ".join(d.reasons)
    d = decide(SPEC, st(1), J("promote", "pass"), now=120, canary_samples_in_stage=50)
    assert (d.action, d.weight_bp, d.stage) == ("promote", 10000, 2)
    d = decide(SPEC, st(1), J("continue"), now=3600, canary_samples_in_stage=50)
    assert (d.action, d.weight_bp) == ("inconclusive", 5000)


def test_paused_holds():
    d = decide(SPEC, st(status="paused"), J("promote", "pass"), now=1e6, canary_samples_in_stage=1000)
    assert d.action == "hold"


def test_store_transitions_are_atomic_and_single_active(tmp_path):
    store = RolloutStore(tmp_path / "r.db")
    r = store.create(model="chat", canary="v2", baseline="v1", spec_text="x", spec_source="f", spec_hash="h",
                     created_by="t", auto={}, now=10.0)
    with pytest.raises(RolloutConflict):
        store.create(model="chat", canary="v3", baseline="v1", spec_text="x", spec_source="f", spec_hash="h",
                     created_by="t", auto={})
    r = store.transition(r.id, expect=("pending",), status="running", stage=0, kind="started", actor="c", now=20.0)
    assert (r.status, r.stage, r.stage_started_at) == ("running", 0, 20.0)
    r = store.transition(r.id, expect=("running",), status="paused", kind="paused", actor="c", now=25.0)
    assert r.stage_started_at == 20.0  # pausing keeps the stage clock
    with pytest.raises(RolloutConflict):
        store.transition(r.id, expect=("running",), status="promoted", kind="promoted", actor="c")
    r = store.transition(r.id, expect=("paused",), status="rolled_back", kind="rolled_back", actor="c", now=30.0)
    assert r.ended_at == 30.0 and not r.active
    assert [e["kind"] for e in store.events(r.id)] == ["created", "started", "paused", "rolled_back"]
    store.close()


def test_only_one_controller_holds_a_model(tmp_path):
    a = RolloutStore(tmp_path / "r.db")
    b = RolloutStore(tmp_path / "r.db")
    b.owner = "other-host:1"
    assert a.acquire("chat", 10, now=100.0)
    assert not b.acquire("chat", 10, now=105.0)
    assert b.acquire("chat", 10, now=111.0)  # a's lease expired
    assert not a.acquire("chat", 10, now=112.0)
    a.close()
    b.close()


def test_replay_evaluations_join_the_columns_for_score_and_similarity_only():
    import numpy as np

    from lockgate.controller.decide.analysis import merge_evaluations, prepare

    data = {"ts": np.array([1.0, 2.0]), "role": np.array(["baseline", "canary"], dtype=object),
            "status_code": np.array([200.0, 500.0]), "weight": np.array([0.1, 0.1]),
            "user_key": np.array(["a", "b"], dtype=object), "request_id": np.array(["r1", "r2"], dtype=object)}
    ev = {"ts": np.array([1.5, 1.5, 3.0]), "version": np.array(["v1", "v2", "v3"], dtype=object),
          "request_id": np.array(["x", "x", "y"], dtype=object), "score": np.array([0.9, 0.4, 0.5]),
          "similarity": np.array([0.6, 0.6, 0.1]), "error": np.array([None, None, None], dtype=object)}
    merged = merge_evaluations(data, ev, "v1", "v2")
    assert list(merged["ts"]) == [1.0, 1.5, 1.5, 2.0]  # v3 is neither arm: dropped
    p = prepare(merged, now=10.0)
    assert list(np.isnan(p["error"])) == [False, True, True, False]
    assert list(p["evaluator_score"][1:3]) == [0.9, 0.4]
    assert list(p["similarity"][1:3]) == [1.0, 0.6]
    assert list(p["is_canary"]) == [False, False, True, True]


def test_envoy_unobserved_counters_parse():
    from lockgate.controller.ingest.envoy_watch import parse_stats

    text = ("http.lockgate.ext_proc.lockgate.message_timeouts: 3\nhttp.lockgate.ext_proc.lockgate.streams_started: 9\n"
            "http.lockgate.ext_proc.lockgate.failure_mode_allowed: 4\n")
    assert parse_stats(text) == {"http.lockgate.ext_proc.lockgate.message_timeouts": 3,
                                 "http.lockgate.ext_proc.lockgate.streams_started": 9,
                                 "http.lockgate.ext_proc.lockgate.failure_mode_allowed": 4}
    assert parse_stats("http.lockgate.ext_proc.lockgate.other: 1\nnot a stat\n") == {}
