"""Deployment log read-back (history / show / annotate / causes) on a synthetic rollouts.db."""

from __future__ import annotations

import re
import sqlite3

import pytest

from lockgate.controller.tell import history as h
from lockgate.controller.decide.rollouts import RolloutStore

SPEC = """rollout:
  model: {model}
  canary: {canary}
  steps:
    - {{weight_percent: 10, min_duration: 1m}}
    - {{weight_percent: 50, min_duration: 1m}}
  metrics:
    - {{name: error_rate, gating: true, allowed: {{absolute: 0.05}}}}
"""

T0 = 1_800_000_000.0


def verdict(verdict="not-yet", canary=0.02, lo=-0.1, hi=0.1):
    return {"metric": "error_rate", "verdict": verdict, "baseline": 0.02, "canary": canary, "difference": canary - 0.02,
            "interval": [lo, hi], "allowed": 0.05, "gating": True, "harmful": "increase", "n_baseline": 100,
            "n_canary": 10, "reason": "r"}


def judgement(decision, action, v, reasons=("why",)):
    return {"decision": decision, "verdicts": [v], "stage_decision": {"action": action, "reasons": list(reasons)},
            "n_baseline": 100, "n_canary": 10, "alpha_statement": "alpha"}


def build(tmp_path):
    """Two rollouts: #1 promoted through 2 stages; #2 rolled back in stage 1 with timings."""
    s = RolloutStore(tmp_path / "rollouts.db")
    r1 = s.create(model="chat", canary="v2", baseline="v1", spec_text=SPEC.format(model="chat", canary="v2"),
                  spec_source="good.yaml", spec_hash="a" * 64, created_by="cli:alice", auto={}, now=T0)
    s.transition(r1.id, expect=("pending",), status="running", stage=0, kind="started", actor="controller",
                 weight_bp=1000, detail={"ack_ms": 3.0}, now=T0 + 1)
    s.record_evaluation(r1.id, T0 + 30, 0, 1000, judgement("continue", "hold", verdict()))
    s.record_evaluation(r1.id, T0 + 61, 0, 1000, judgement("continue", "advance", verdict()))
    s.transition(r1.id, expect=("running",), status="running", stage=1, kind="advanced", actor="controller",
                 weight_bp=5000, detail={"reasons": ["stage 1 done"], "ack_ms": 2.0}, now=T0 + 61)
    s.record_evaluation(r1.id, T0 + 122, 1, 5000, judgement("promote", "promote", verdict("pass", 0.02, -0.01, 0.01)))
    s.transition(r1.id, expect=("running",), status="promoted", stage=2, kind="promoted", actor="controller",
                 weight_bp=10000, detail={"reasons": ["promoting to 100%: every gating metric shown"]}, now=T0 + 122)
    r2 = s.create(model="chat", canary="v3", baseline="v1", spec_text=SPEC.format(model="chat", canary="v3"),
                  spec_source="bad.yaml", spec_hash="b" * 64, created_by="cli:bob", auto={}, now=T0 + 200)
    s.transition(r2.id, expect=("pending",), status="running", stage=0, kind="started", actor="controller",
                 weight_bp=1000, now=T0 + 201)
    s.event(r2.id, "paused", "cli:bob", now=T0 + 205)
    s.record_evaluation(r2.id, T0 + 210, 0, 1000, judgement("rollback", "rollback", verdict("fail", 0.3, 0.1, 0.4),
                                                             ["harm shown: error_rate"]))
    timings = {"detected_at": T0 + 210.0, "pushed_at": T0 + 210.004, "acked_at": T0 + 210.010,
               "push_to_ack_ms": 6.0, "all_acked": True, "envoys": [{"node_id": "envoy-0", "acked": True,
                                                                     "ack_ms": 6.0}], "not_acked": []}
    s.transition(r2.id, expect=("running",), status="rolled_back", kind="rolled_back", actor="controller",
                 weight_bp=0, detail={"reasons": ["harm shown: error_rate"], "timings": timings,
                                      "verdicts": [verdict("fail", 0.3, 0.1, 0.4)]}, now=T0 + 210.02)
    r3 = s.create(model="other", canary="v9", baseline="v8", spec_text=SPEC.format(model="other", canary="v9"),
                  spec_source="o.yaml", spec_hash="c" * 64, created_by="cli:carol", auto={}, now=T0 + 300)
    s.transition(r3.id, expect=("pending",), status="aborted", kind="aborted", actor="cli:carol", weight_bp=0,
                 detail={"reasons": ["aborted by cli:carol"]}, now=T0 + 301)
    s.close()
    return tmp_path


def test_history_rows_and_render(tmp_path):
    build(tmp_path)
    store = h.open_log(tmp_path)
    rows = h.history(store)
    store.close()
    assert [r["id"] for r in rows] == [3, 2, 1]
    good, bad = rows[2], rows[1]
    assert good["stages_reached"] == "2/2 → 100%" and good["status"] == "promoted"
    assert good["duration_s"] == pytest.approx(122) and good["revert_ms"] is None
    assert good["reason"].startswith("promoting to 100%")
    assert bad["stages_reached"] == "1/2 (10%)" and bad["revert_ms"] == 6.0
    assert bad["detect_to_ack_ms"] == pytest.approx(10.0, abs=1e-3)
    assert rows[0]["stages_reached"] == "none" and rows[0]["decided_by"] == "cli:carol"
    text = h.render_history(rows)
    lines = text.splitlines()
    assert lines[0].startswith("ID") and len(lines) == 4
    assert "#2  chat" in text and "v1→v3" in text and "ROLLED_BACK" in text and "6.0 ms" in text
    # what rolled it back, against its rollback line (the allowance), not against 0
    assert ("harm: error_rate canary 0.3 vs baseline 0.02, shown worse than baseline by at least +0.1, "
            "allowed +0.05") in text
    assert "2.0m" in lines[3]  # 122 s
    store = h.open_log(tmp_path)
    assert [r["id"] for r in h.history(store, "other")] == [3]
    store.close()
    assert h.render_history([]) == "no rollouts yet"


def test_read_only_store_refuses_writes(tmp_path):
    build(tmp_path)
    store = h.open_log(tmp_path)
    with pytest.raises(sqlite3.OperationalError):
        store.event(1, "annotation", "x", {})
    store.close()
    with pytest.raises(h.LogError, match="no deployment log yet"):
        h.open_log(tmp_path / "nowhere")


def test_describe_per_stage_and_actions(tmp_path):
    build(tmp_path)
    store = h.open_log(tmp_path)
    d = h.describe(*h.load(store, 1))
    d2 = h.describe(*h.load(store, 2))
    with pytest.raises(h.LogError, match="no rollout #42"):
        h.load(store, 42)
    store.close()
    assert [s["stage"] for s in d["stages"]] == [0, 1]
    assert d["stages"][0]["evaluations"] == 2 and d["stages"][0]["last_evaluation"]["action"] == "advance"
    assert d["stages"][0]["left_at"] == T0 + 61 and d["stages"][1]["weight_bp"] == 5000
    assert d["stages"][1]["last_evaluation"]["verdicts"][0]["verdict"] == "pass"
    assert d["decision"]["kind"] == "promoted" and d["rollback"] is None
    assert d["rollout"]["spec_hash"] == "a" * 64 and "rollout:" in d["rollout"]["spec_text"]
    assert [a["kind"] for a in d["actions"]] == ["created", "started", "advanced", "promoted"]
    assert d["actions"][0]["actor"] == "cli:alice"
    assert d2["rollback"]["push_to_ack_ms"] == 6.0
    assert [(a["kind"], a["actor"]) for a in d2["actions"]][2] == ("paused", "cli:bob")
    text = h.render_show(d2)
    assert "decision: rolled_back by controller" in text and "push→ACK 6.0 ms" in text
    assert "envoy-0 6.0 ms" in text and "error_rate" in text and "fail" in text
    assert "paused by cli:bob" in text


def test_annotate_is_append_only_latest_wins_and_causes(tmp_path):
    build(tmp_path)
    c0 = h.causes(h.history(h.open_log(tmp_path)))
    assert c0["failures"] == 2 and c0["unannotated"] == 2 and c0["by_category"] == {"unannotated": 2}
    h.annotate(tmp_path, 2, "bad tokenizer config", "tokenizer", "cli:bob", now=T0 + 400)
    h.annotate(tmp_path, 2, "canary on an A10 instead of an A100", "hardware", "cli:bob", now=T0 + 500)
    h.annotate(tmp_path, 1, "label drift found a week later", "data", "cli:alice", now=T0 + 600)
    with pytest.raises(h.LogError, match="category"):
        h.annotate(tmp_path, 2, "x", "cosmic", "me")
    with pytest.raises(h.LogError, match="no rollout #9"):
        h.annotate(tmp_path, 9, "x", "data", "me")
    with pytest.raises(h.LogError, match="empty"):
        h.annotate(tmp_path, 2, "  ", "data", "me")
    store = h.open_log(tmp_path)
    events = store.events(2)
    rows = h.history(store)
    store.close()
    anns = [e for e in events if e["kind"] == "annotation"]
    assert [a["detail"]["category"] for a in anns] == ["tokenizer", "hardware"]  # nothing rewritten
    assert anns[1]["detail"]["supersedes_event"] == anns[0]["id"]
    by_id = {r["id"]: r for r in rows}
    assert by_id[2]["annotation"]["category"] == "hardware"
    c = h.causes(rows)
    # #2 hardware, #3 unannotated (aborted), #1 promoted but annotated later: counted
    assert c["failures"] == 3 and c["annotated"] == 2 and c["unannotated"] == 1
    assert c["by_category"] == {"data": 1, "hardware": 1, "unannotated": 1}
    assert c["by_model"] == {"chat": {"data": 1, "hardware": 1}, "other": {"unannotated": 1}}
    assert [e["id"] for e in c["recent"]] == [3, 2, 1]
    text = h.render_causes(c)
    assert "3 failed rollout(s) of 3" in text and re.search(r"hardware +1", text)
    assert "#2 chat v1→v3 rolled_back" in text and "A10" in text and "no root cause recorded" in text
    assert "[cause: hardware]" in h.render_history(rows)


def test_causes_without_failures():
    assert "no failed rollouts" in h.render_causes(h.causes([]))


def test_formatters():
    assert h.fmt_duration(5) == "5.0s" and h.fmt_duration(600) == "10.0m" and h.fmt_duration(7200) == "2.0h"
    assert h.fmt_duration(3 * 86400) == "3.0d" and h.fmt_duration(None) == "-"
    assert h.fmt_ts(0) == "1970-01-01 00:00:00Z"
    rows = h.verdict_rows([verdict("fail", 0.3, 0.1, None)])
    assert rows[0].split()[:2] == ["metric", "verdict"] and "[0.1, -]" in rows[1]
    assert "allowed (rollback line)" in rows[0] and "fail (beyond the allowance)" in rows[1] and "+0.05" in rows[1]


def test_rollback_line_from_details_else_allowed():
    # recorded line wins; evaluations stored before it was recorded fall back to +/-allowed
    assert h.rollback_line(dict(verdict(), details={"rollback_line": 0.042})) == 0.042
    assert h.rollback_line(verdict()) == 0.05
    assert h.rollback_line(dict(verdict(), harmful="decrease")) == -0.05
    assert h.rollback_line(dict(verdict(), allowed=None)) is None
    dec = dict(verdict("fail", -0.1, None, -0.04), harmful="decrease", allowed=0.02,
               details={"rollback_line": -0.02})
    assert h.worse_bound(dec) == -0.04 and h.allowance_state(dec) == "beyond the allowance"
    assert h.beyond_text(dec) == "shown worse than baseline by at least -0.04, allowed -0.02"
    assert h.fmt_line(dec) == "-0.02"


def test_pass_above_zero_below_the_allowance_is_within_it():
    # the interval excludes 0 (the canary is worse), but lies below the allowed +0.05: within the allowance
    v = dict(verdict("pass", 0.04, 0.01, 0.04), details={"rollback_line": 0.05})
    assert h.allowance_state(v) == "within the allowance"
    rows = h.verdict_rows([v])
    assert "pass (within the allowance)" in rows[1] and "[0.01, 0.04]" in rows[1] and "+0.05" in rows[1]
    assert "beyond" not in rows[1] and "harm" not in rows[1]


def test_old_any_harm_fail_is_not_called_beyond_the_allowance():
    # stored before the allowance was respected: a fail whose interval is above 0 but not beyond the line
    old = verdict("fail", 0.05, 0.01, 0.09)
    assert h.any_harm_fail(old) and "earlier any-harm rule" in h.allowance_state(old)
    assert "fail (any-harm rule; not beyond the allowance)" in h.verdict_rows([old])[1]
    assert not h.any_harm_fail(dict(old, details={"rollback_line": 0.05}))  # new verdicts are taken as judged
    assert not h.any_harm_fail(verdict("fail", 0.3, 0.1, 0.4))


def test_exceedance_ratio_verdicts_are_labelled_on_their_scale():
    v = dict(verdict("pass", 812.0, -0.004, 0.008), metric="latency_p95", kind="quantile", baseline=790.0,
             allowed=0.01, unit="", allowed_mode="exceedance_ratio",
             details={"interval_scale": h.EXCEEDANCE_SCALE, "rollback_line": 0.01})
    row = h.verdict_rows([v])[1]
    assert "[-0.004, 0.008] exceedance share" in row and "+0.01 exceedance share" in row and "ms" not in row
