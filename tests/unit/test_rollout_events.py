"""RolloutStore.events_after: the cursor the trouble monitor reads new deployment-log events with."""

from lockgate.controller.decide.rollouts import RolloutStore


def _store(tmp_path):
    s = RolloutStore(tmp_path / "rollouts.db")
    r = s.create(model="chat", canary="v2", baseline="v1", spec_text="x", spec_source="x.yaml", spec_hash="h",
                 created_by="test", auto={})
    return s, r


def test_events_after_returns_new_events_of_the_kinds_asked_with_model_and_canary(tmp_path):
    s, r = _store(tmp_path)
    start = s.last_event_id()
    s.event(r.id, "drill", "ops", {"all_acked": False})
    s.event(r.id, "note", "ops", {})
    s.event(r.id, "push_incomplete", "controller", {"not_acked": ["node-b"]})
    events, cursor = s.events_after(start, ("drill", "push_incomplete"))
    assert [e["kind"] for e in events] == ["drill", "push_incomplete"]
    assert all(e["model"] == "chat" and e["canary"] == "v2" and e["rollout_id"] == r.id for e in events)
    assert events[1]["detail"] == {"not_acked": ["node-b"]}
    assert cursor == s.last_event_id()
    assert s.events_after(cursor, ("drill", "push_incomplete")) == ([], cursor)  # nothing read twice


def test_events_after_resumes_after_the_last_returned_when_the_limit_is_hit(tmp_path):
    s, r = _store(tmp_path)
    start = s.last_event_id()
    for i in range(5):
        s.event(r.id, "drill", "ops", {"i": i})
    first, cursor = s.events_after(start, ("drill",), limit=3)
    rest, cursor2 = s.events_after(cursor, ("drill",), limit=3)
    assert [e["detail"]["i"] for e in first + rest] == [0, 1, 2, 3, 4]
    assert cursor2 == s.last_event_id()
