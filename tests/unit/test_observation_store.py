"""ObservationStore: store / fetch / prune / labels, the JSONL export round trip, the feedback parser,
and the ``controller:`` config section."""

from __future__ import annotations

import io
import json
import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockgate.config import ConfigError, config_from_text
from lockgate.controller.ingest.collector import ControllerMetrics, ObservationCollectorServicer
from lockgate.controller.ingest.export import export_jsonl, parse_time, read_jsonl, record_to_json
from lockgate.controller.api.http import ControllerHTTP, FeedbackError, parse_feedback
from lockgate.controller.ingest.observations import ObservationStore, observation_row
from lockgate.controller.ingest.schema import BOOL_COLUMNS, FETCH_COLUMNS, FLOAT_COLUMNS
from lockgate.proto.v1 import observations_pb2 as pb

NOW = 1_700_000_000.0


def obs(rid: str, ts: float = NOW, model: str = "chat", version: str = "v1", role: str = "baseline", **kw):
    return pb.Observation(request_id=rid, ts=ts, model=model, version=version, role=role, **kw)


@pytest.fixture
def store(tmp_path):
    s = ObservationStore(tmp_path / "observations.db")
    yield s
    s.close()


def assert_columns_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        if k in FLOAT_COLUMNS or k in ("label_ts",):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # NaN == NaN here
        else:
            assert list(a[k]) == list(b[k]), k


# ----- store / fetch -----

def test_insert_fetch_columns_and_nan_for_not_measured(store):
    full = obs("r1", NOW, version="v2", role="canary", weight_bp=2500, stage="s1", route="sticky",
               upstream_host="127.0.0.1:9", status_code=200, user_key="uk1", ttfb_ms=12.5, duration_ms=80.0,
               output_tokens=0, refusal=False, entropy=0.0, predicted_class="spam", confidence=0.9)
    bare = obs("r2", NOW + 1)  # nothing measured
    res = store.insert([full, bare], source="src")
    assert res.new == [0, 1] and res.duplicates == 0 and res.rejected == 0
    c = store.fetch("chat")
    assert set(FETCH_COLUMNS) <= set(c) and {"label", "label_ts"} <= set(c)
    assert list(c["request_id"]) == ["r1", "r2"]
    assert c["ts"].dtype == np.float64 and c["is_canary"].dtype == bool
    assert list(c["is_canary"]) == [True, False]
    assert c["weight"][0] == 0.25 and c["weight"][1] == 0.0
    # measured zeros stay zeros; unmeasured values are NaN / None
    assert c["output_tokens"][0] == 0.0 and math.isnan(c["output_tokens"][1])
    assert c["refusal"][0] == 0.0 and math.isnan(c["refusal"][1])
    assert c["entropy"][0] == 0.0 and math.isnan(c["entropy"][1])
    assert c["latency_ms"][0] == 80.0 and math.isnan(c["latency_ms"][1])
    assert c["status_code"][0] == 200 and math.isnan(c["status_code"][1])
    assert c["predicted_class"][0] == "spam" and c["predicted_class"][1] is None
    assert c["user_key"][1] is None and c["stage"][1] is None
    assert np.isnan(c["label_arrival_ts"]).all() and list(c["true_class"]) == [None, None]


def test_insert_is_idempotent_on_request_id(store):
    batch = [obs(f"r{i}", NOW + i) for i in range(10)]
    assert len(store.insert(batch).new) == 10
    again = store.insert(batch + [obs("r10", NOW + 10)])
    assert again.new == [10] and again.duplicates == 10 and again.stored == 11
    assert store.count() == 11
    # duplicates inside one batch are stored once
    dup = store.insert([obs("x", NOW), obs("x", NOW)])
    assert dup.new == [0] and dup.duplicates == 1
    # a replay with the same request id is a separate row, excluded from fetch by default
    store.insert([obs("x", NOW, replay=True, version="v2", role="canary")])
    assert list(store.fetch("chat")["request_id"]).count("x") == 1
    assert list(store.fetch("chat", include_replay=True)["request_id"]).count("x") == 2


def test_rejected_observations(store):
    res = store.insert([obs("", NOW), pb.Observation(request_id="a", ts=NOW), obs("ok", NOW)])
    assert res.rejected == 2 and res.new == [2]
    # a missing/invalid ts becomes the arrival time
    row = observation_row(obs("t", 0.0), received_ts=123.0)
    assert row[1] == 123.0


def test_fetch_filters(store):
    store.insert([obs("a", NOW, version="v1"), obs("b", NOW + 10, version="v2", role="canary", stage="s2"),
                  obs("c", NOW + 20, version="v3", role="other"), obs("d", NOW + 5, model="cls")])
    assert list(store.fetch("chat", since_ts=NOW + 10)["request_id"]) == ["b", "c"]
    assert list(store.fetch("chat", until_ts=NOW + 10)["request_id"]) == ["a"]
    assert list(store.fetch("chat", versions=["v2", "v3"])["request_id"]) == ["b", "c"]
    assert list(store.fetch("chat", versions=[])["request_id"]) == []
    assert list(store.fetch("chat", stage="s2")["request_id"]) == ["b"]
    assert list(store.fetch("cls")["request_id"]) == ["d"]
    assert len(store.fetch("nope")["ts"]) == 0
    sub = store.fetch("chat", columns=["ts", "is_canary"])
    assert set(sub) == {"ts", "is_canary"}


def test_labels_join_arrival_and_statuses(store):
    store.insert([obs("a", NOW), obs("b", NOW + 1), obs("old", NOW - 40 * 86400)])
    res = store.add_labels([("a", "true_class", "spam"), ("a", "thumbs", "down"), ("b", "task_success", True),
                            ("b", "evaluator_score", 0.75), ("zzz", "thumbs", "up"),
                            ("old", "thumbs", "up")], now=NOW + 100, retention_s=30 * 86400)
    assert [r.status for r in res] == ["stored", "stored", "stored", "stored", "unknown", "expired"]
    c = store.fetch("chat", since_ts=NOW - 1)
    assert list(c["true_class"]) == ["spam", None]
    np.testing.assert_array_equal(c["label_arrival_ts"], [NOW + 100, np.nan])
    np.testing.assert_array_equal(c["thumbs"], [0.0, np.nan])
    np.testing.assert_array_equal(c["task_success"], [np.nan, 1.0])
    np.testing.assert_array_equal(c["evaluator_score"], [np.nan, 0.75])
    np.testing.assert_array_equal(c["evaluator_score_arrival_ts"], [np.nan, NOW + 100])
    # the same value again keeps the first arrival time; a different value replaces it
    store.add_labels([("a", "true_class", "spam")], now=NOW + 200)
    assert store.fetch("chat", since_ts=NOW - 1)["label_arrival_ts"][0] == NOW + 100
    store.add_labels([("a", "true_class", "ham")], now=NOW + 300)
    c = store.fetch("chat", since_ts=NOW - 1)
    assert c["true_class"][0] == "ham" and c["label_ts"][0] == NOW + 300
    # numeric-looking classes stay strings
    store.add_labels([("b", "true_class", "1")], now=NOW + 300)
    assert store.fetch("chat", since_ts=NOW - 1)["true_class"][1] == "1"


def test_prune_deletes_old_rows_and_remembers_them(store):
    store.insert([obs(f"o{i}", NOW - 100 + i) for i in range(50)] + [obs("new", NOW)])
    store.add_labels([("o1", "thumbs", "up"), ("new", "thumbs", "up")], now=NOW)
    assert store.prune(NOW - 60, now=NOW, chunk=7) == 40
    assert store.count() == 11
    st_ = store.lookup_status(["o1", "o45", "new", "never"], now=NOW)
    assert st_ == {"o1": "expired", "o45": "stored", "new": "stored", "never": "unknown"}
    assert store.add_labels([("o1", "thumbs", "down")], now=NOW)[0].status == "expired"
    assert store.fetch("chat")["thumbs"][-1] == 1.0
    # tombstones are forgotten after their own retention
    store.prune(NOW - 60, now=NOW + 1000, tombstone_s=10)
    assert store.lookup_status(["o1"], now=NOW)["o1"] == "unknown"


def test_read_only_store_sees_writes(tmp_path, store):
    store.insert([obs("a", NOW)])
    ro = ObservationStore(store.path, read_only=True)
    try:
        assert list(ro.fetch("chat")["request_id"]) == ["a"]
        with pytest.raises(RuntimeError):
            ro.insert([obs("b", NOW)])
    finally:
        ro.close()
    with pytest.raises(FileNotFoundError):
        ObservationStore(tmp_path / "missing.db", read_only=True)


def test_batches_of_100_are_all_stored_once(store):
    """40 batches of 100 stored in 40 durable transactions: every observation new once, none twice (the
    rate is a benchmark's business: bench/store_throughput.py)."""
    batches = [[obs(f"b{j}-{i}", NOW + i, status_code=200, duration_ms=10.0, ttfb_ms=1.0, user_key=f"u{i}",
                    output_tokens=5, weight_bp=500) for i in range(100)] for j in range(40)]
    for b in batches:
        result = store.insert(b, source="bench")
        assert len(result.new) == 100 and result.rejected == 0
    assert store.count() == 4000
    assert len(store.insert(batches[7], source="bench").new) == 0


# ----- export / read round trip -----

def test_export_format(store):
    store.insert([obs("a", NOW, version="v2", role="canary", weight_bp=500, status_code=503, timeout=True,
                      duration_ms=30000.0, refusal=True),
                  obs("b", NOW + 1, output_tokens=0)])
    store.add_labels([("a", "true_class", "spam"), ("a", "thumbs", "up")], now=NOW + 5)
    buf = io.StringIO()
    assert export_jsonl(store, buf, "chat") == 2
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    a, b = lines
    assert a["weight"] == 0.05 and a["role"] == "canary" and a["timeout"] is True
    assert a["latency_ms"] == 30000.0 and a["status_code"] == 503 and a["refusal"] is True
    assert a["true_class"] == "spam" and a["label_arrival_ts"] == NOW + 5
    assert a["thumbs"] == "up" and a["thumbs_arrival_ts"] == NOW + 5
    assert b["output_tokens"] == 0 and b["timeout"] is False
    for missing in ("latency_ms", "ttfb_ms", "refusal", "status_code", "entropy", "true_class", "user_key"):
        assert missing not in b, missing
    assert "replay" not in b


def test_reader_accepts_label_lines_and_nulls():
    lines = [
        json.dumps({"ts": NOW, "request_id": "a", "model": "chat", "version": "v1", "role": "baseline",
                    "weight": 0.1, "latency_ms": None, "timeout": False}),
        json.dumps({"kind": "label", "request_id": "a", "ts": NOW + 9, "true_class": "x"}),
        json.dumps({"kind": "label", "request_id": "a", "ts": NOW + 3, "true_class": "old"}),  # older: loses
        json.dumps({"kind": "label", "request_id": "ghost", "ts": NOW, "true_class": "x"}),  # no observation
        "",
        json.dumps({"kind": "observation", "ts": NOW - 1, "request_id": "b", "model": "chat", "version": "v2",
                    "role": "canary", "weight": 0.1, "true_class": "y", "label_arrival_ts": NOW + 1}),
        json.dumps({"ts": NOW, "request_id": "c", "model": "other", "version": "v1", "role": "baseline"}),
    ]
    c = read_jsonl(lines, "chat")
    assert list(c["request_id"]) == ["b", "a"]
    assert list(c["true_class"]) == ["y", "x"]
    np.testing.assert_array_equal(c["label_arrival_ts"], [NOW + 1, NOW + 9])
    assert list(c["is_canary"]) == [True, False]
    assert math.isnan(c["latency_ms"][1])
    with pytest.raises(ValueError, match="line 1"):
        read_jsonl(["{nope"])
    with pytest.raises(ValueError, match="line 1: latency_ms"):
        read_jsonl([json.dumps({"ts": 1, "request_id": "a", "model": "m", "latency_ms": "fast"})])
    with pytest.raises(ValueError, match="label line needs one of"):
        read_jsonl([json.dumps({"kind": "label", "request_id": "a", "ts": 1})])


def _finite(lo=0.0, hi=1e6):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
observation_st = st.fixed_dictionaries(
    {"ts": _finite(1.0, 2e9), "version": st.sampled_from(["v1", "v2", "v3"]),
     "role": st.sampled_from(["baseline", "canary", "other"]), "weight_bp": st.integers(0, 10000),
     "replay": st.booleans(), "timeout": st.booleans()},
    optional={"stage": text, "status_code": st.integers(100, 599), "user_key": text, "upstream_host": text,
              "ttfb_ms": _finite(), "duration_ms": _finite(), "output_tokens": st.integers(0, 2**32 - 1),
              "refusal": st.booleans(), "entropy": _finite(0, 20), "predicted_class": text,
              "confidence": _finite(0, 1), "finish_reason": text, "truncated": st.booleans()})
label_st = st.fixed_dictionaries({}, optional={
    "true_class": text, "thumbs": st.sampled_from(["up", "down"]), "task_success": st.booleans(),
    "evaluator_score": _finite(-1e3, 1e3)})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(observation_st, label_st, _finite(0, 1e4)), max_size=25),
       split_labels=st.booleans())
def test_export_jsonl_round_trip(tmp_path_factory, rows, split_labels):
    s = ObservationStore(tmp_path_factory.mktemp("rt") / "observations.db")
    try:
        protos = [obs(f"r{i}", **fields) for i, (fields, _, _) in enumerate(rows)]
        s.insert(protos)
        for i, (_, labels, dt) in enumerate(rows):
            if labels:
                s.add_labels([(f"r{i}", k, v) for k, v in labels.items()], now=NOW + dt)
        buf = io.StringIO()
        export_jsonl(s, buf, "chat")
        lines = buf.getvalue().splitlines()
        if split_labels:  # the same labels as separate label lines, placed first
            label_lines, obs_lines = [], []
            for line in lines:
                o = json.loads(line)
                for kind, ts_key in (("true_class", "label_arrival_ts"), ("thumbs", "thumbs_arrival_ts"),
                                     ("task_success", "task_success_arrival_ts"),
                                     ("evaluator_score", "evaluator_score_arrival_ts")):
                    if kind in o:
                        label_lines.append(json.dumps({"kind": "label", "request_id": o["request_id"],
                                                       "ts": o.pop(ts_key), kind: o.pop(kind)}))
                obs_lines.append(json.dumps(o))
            lines = label_lines + obs_lines
        for replay in (False, True):
            want = s.fetch("chat", include_replay=replay)
            got = read_jsonl(lines, "chat", include_replay=replay)
            assert_columns_equal(got, want)
        assert set(BOOL_COLUMNS) <= set(want)
    finally:
        s.close()


def test_record_to_json_drops_unmeasured():
    rec = {"ts": 1.0, "request_id": "a", "model": "m", "version": "v", "role": "baseline", "weight_bp": 10000,
           "timeout": False, "ttfb_ms": None, "entropy": float("nan"), "replay": False}
    assert record_to_json(rec) == {"ts": 1.0, "request_id": "a", "model": "m", "version": "v", "role": "baseline",
                                   "weight": 1.0, "timeout": False}


def test_parse_time():
    assert parse_time("1700000000") == 1_700_000_000.0
    assert parse_time("1700000000.5") == 1_700_000_000.5
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000.0
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000.0
    assert parse_time("2023-11-14T23:13:20+01:00") == 1_700_000_000.0
    for bad in ("yesterday", "nan", ""):
        with pytest.raises(ValueError):
            parse_time(bad)


# ----- feedback parsing and the HTTP logic (without sockets) -----

@pytest.mark.parametrize("body,field", [
    (b"{", "<body>"), (b"\xff", "<body>"), (b"[]", "<body>"), (b"42", "<body>"),
    (b'{"true_class": "x"}', "request_id"), (b'{"request_id": ""}', "request_id"),
    (b'{"request_id": "a"}', "request_id"),
    (b'{"request_id": "a", "thumbs": "sideways"}', "thumbs"),
    (b'{"request_id": "a", "task_success": 1}', "task_success"),
    (b'{"request_id": "a", "evaluator_score": "high"}', "evaluator_score"),
    (b'{"request_id": "a", "evaluator_score": NaN}', "<body>"),
    (b'{"request_id": "a", "true_class": true}', "true_class"),
    (b'{"request_id": "a", "thumb": "up"}', "thumb"),
    (b'[{"request_id": "a", "thumbs": "up"}, {"request_id": "b", "thumbs": 1}]', "[1].thumbs"),
    (b'[{"request_id": "a", "thumbs": "up"}, 3]', "[1]"),
])
def test_parse_feedback_errors_name_the_field(body, field):
    with pytest.raises(FeedbackError) as info:
        parse_feedback(body)
    assert info.value.field == field


def test_parse_feedback_ok():
    items, was_list = parse_feedback(b'{"request_id": "a", "true_class": 3, "evaluator_score": 1}')
    assert not was_list and items == [("a", [("true_class", "3"), ("evaluator_score", 1.0)])]


def test_http_feedback_logic(store):
    now = time.time()
    store.insert([obs("a", now), obs("old", now - 31 * 86400)])
    api = ControllerHTTP("127.0.0.1", 0, store, ControllerMetrics(), retention_s=30 * 86400, unknown_grace_s=0.0)
    try:
        assert api.feedback(b'{"request_id": "a", "thumbs": "up"}')[0] == 200
        code, body = api.feedback(b'{"request_id": "nope", "thumbs": "up"}')
        assert code == 404 and body["error"].startswith("unknown request_id")
        assert api.feedback(b'{"request_id": "old", "thumbs": "up"}')[0] == 410
        code, body = api.feedback(b'[{"request_id": "a", "true_class": "x"}, {"request_id": "nope", "thumbs": "up"}]')
        assert code == 207 and body["stored"] == 1 and [r["status"] for r in body["results"]] == [200, 404]
        code, body = api.feedback(b'{"request_id": "a", "thumbs": 5}')
        assert code == 400 and body["field"] == "thumbs"
        assert api.observation("a")[1]["observations"][0]["true_class"] == "x"
        assert api.observation("zzz")[0] == 404
    finally:
        api.server.server_close()


def test_collector_report_stores_and_counts(store):
    import asyncio

    from prometheus_client import generate_latest

    metrics = ControllerMetrics()
    svc = ObservationCollectorServicer(store, metrics)
    batch = pb.ObservationBatch(source="h:1", dropped_total=7, observations=[
        obs("a", NOW, status_code=200, duration_ms=12.0, ttfb_ms=3.0, output_tokens=9, predicted_class="spam"),
        obs("b", NOW, version="v2", role="canary", status_code=502, refusal=True),
        obs("", NOW)])

    async def go():
        return await svc.Report(batch, None), await svc.Report(batch, None)

    first, second = asyncio.run(go())
    svc.executor.shutdown()
    assert (first.stored, first.duplicates, first.rejected) == (2, 0, 1)
    assert (second.stored, second.duplicates, second.rejected) == (2, 2, 1)
    assert store.count() == 2
    reg = metrics.registry
    assert reg.get_sample_value("lockgate_controller_observations_stored_total",
                                {"model": "chat", "version": "v1", "role": "baseline"}) == 1
    assert reg.get_sample_value("lockgate_controller_observations_duplicate_total",
                                {"model": "chat", "version": "v2", "role": "canary"}) == 1
    assert reg.get_sample_value("lockgate_request_errors_total",
                                {"model": "chat", "version": "v2", "role": "canary"}) == 1
    assert reg.get_sample_value("lockgate_controller_source_dropped_observations_total", {"source": "h:1"}) == 7
    assert reg.get_sample_value("lockgate_predicted_class_total",
                                {"model": "chat", "version": "v1", "role": "baseline", "class": "spam"}) == 1
    assert b"user_key" not in generate_latest(reg)


# ----- config -----

BASE = """
models:
  - name: chat
    stable: v1
    versions: {v1: {endpoints: ["127.0.0.1:18001"]}}
"""


def test_controller_config_defaults_and_values():
    c = config_from_text(BASE).controller
    assert (str(c.address), str(c.http), c.retention_days) == ("127.0.0.1:18020", "127.0.0.1:18021", 30.0)
    c = config_from_text(BASE + "controller: {address: '127.0.0.1:1234', http: {port: 1235}, retention_days: 7,"
                                " prune_interval_s: 60}\n").controller
    assert (str(c.address), str(c.http), c.retention_days, c.prune_interval_s) == \
        ("127.0.0.1:1234", "127.0.0.1:1235", 7.0, 60.0)


@pytest.mark.parametrize("section,field", [
    ("{address: nope}", "controller.address"),
    ("{address: '127.0.0.1:0'}", "controller.address"),
    ("{http: 'example.com:80'}", "controller.http"),
    ("{retention_days: 0}", "controller.retention_days"),
    ("{retention_days: soon}", "controller.retention_days"),
    ("{prune_interval_s: -1}", "controller.prune_interval_s"),
    ("{retension_days: 3}", "controller.retension_days"),
    ("{address: '127.0.0.1:18021'}", "controller.http"),
    ("[1]", "controller"),
])
def test_controller_config_errors_name_the_field(section, field):
    with pytest.raises(ConfigError) as info:
        config_from_text(BASE + f"controller: {section}\n")
    assert any(p.path == field for p in info.value.problems), str(info.value)
