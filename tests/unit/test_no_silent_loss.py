"""The pure parts of "no silent loss" (the real Envoy: tests/integration/test_no_silent_loss.py):
the ext_proc ledger and its claim after a SIGKILL, the shipper's ledger counts and reports, the store's
per-source counts, losses and stream outcomes, the error definition, the access-log classification,
request ids in capture, and feedback by client_request_id."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import struct_pb2

from envoy.data.accesslog.v3 import accesslog_pb2 as ald
from lockgate.config import config_from_text
from lockgate.controller.decide.analysis import prepare
from lockgate.controller.ingest.collector import ControllerMetrics, ObservationCollectorServicer
from lockgate.controller.ingest.export import export_jsonl, read_jsonl
from lockgate.controller.api.http import ControllerHTTP, FeedbackError, parse_feedback
from lockgate.controller.ingest.observations import ObservationStore
from lockgate.controller.ingest.schema import model_failure
from lockgate.extproc.capture import ATTR_NS, ResponseCapture
from lockgate.extproc.analyzers import AnalyzerConfig
from lockgate.extproc.ledger import Ledger, claim_ended
from lockgate.extproc.outcomes import classify, outcome_from_entry
from lockgate.routing import LOGGED_FLAGS
from lockgate.xds.resources import access_log
from lockgate.extproc.shipper import ObservationShipper
from lockgate.proto.v1 import observations_pb2 as pb
from tests.unit.test_body_samples import BASE, messages
from tests.unit.test_shipper import Collector, CollectorServer

NOW = 1_700_000_000.0
REPO = Path(__file__).resolve().parents[2]


def obs(rid: str, ts: float = NOW, **kw) -> pb.Observation:
    kw.setdefault("model", "chat")
    kw.setdefault("version", "v1")
    kw.setdefault("role", "baseline")
    return pb.Observation(request_id=rid, ts=ts, **kw)


@pytest.fixture
def store(tmp_path):
    s = ObservationStore(tmp_path / "observations.db")
    yield s
    s.close()


# ----- the ledger -----

def test_ledger_counts_survive_a_sigkill_and_are_claimed_once(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from lockgate.extproc.ledger import Ledger
        led = Ledger(Path({str(tmp_path)!r}), "host:child")
        for _ in range(52):
            led.add_captured()
        led.add_acked(48, 0)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert r.returncode == -signal.SIGKILL, r.stderr
    (claimed,) = claim_ended(tmp_path)
    k = claimed.counts
    assert (k.source, k.captured, k.acked, k.dropped, k.unacked) == ("host:child", 52, 48, 0, 4)
    assert claim_ended(tmp_path) == []  # held by this claim: nobody else reports it
    claimed.release(delete=True)
    assert list(tmp_path.iterdir()) == []


def test_a_live_ledger_is_never_claimed_and_a_settled_one_is_deleted(tmp_path):
    live = Ledger(tmp_path, "h:1")
    live.add_captured(3)
    assert claim_ended(tmp_path) == []  # its process holds the lock
    live.add_acked(3, 0)
    assert live.close().settled and list(tmp_path.iterdir()) == []  # clean and all acknowledged: no file
    unsettled = Ledger(tmp_path, "h:2")
    unsettled.add_captured(5)
    unsettled.add_acked(3, 0)
    unsettled.add_dropped(2)  # dropped at shutdown, never reported to the controller
    unsettled.close()
    (c,) = claim_ended(tmp_path)
    assert (c.counts.captured, c.counts.acked, c.counts.dropped, c.counts.unacked) == (5, 3, 2, 0)
    c.release(delete=False)
    (tmp_path / "9-00.ledger").write_bytes(b"\0" * 4096)  # died while creating it: no magic
    assert [x.counts.source for x in claim_ended(tmp_path)] == ["h:2"]
    assert not (tmp_path / "9-00.ledger").exists()


def test_shipper_counts_in_its_ledger_and_reports_ended_ones(tmp_path):
    old = Ledger(tmp_path, "h:dead")
    old.add_captured(10)
    old.add_acked(6, 0)
    old.close()

    async def go():
        collector = Collector()
        server = CollectorServer(collector)
        port = await server.start()
        sh = ObservationShipper(f"127.0.0.1:{port}", queue_size=3, batch_size=10, flush_interval_s=0.05)
        sh.ledger = Ledger(tmp_path, sh.source)
        sh.ended = claim_ended(tmp_path, own=sh.ledger.path)
        sh.start()
        for i in range(5):  # queue_size 3: two dropped and counted
            sh.offer(obs(f"r{i}"))
        sh.offer_outcome(pb.StreamOutcome(request_id="r0", error_kind="upstream_reset"))
        deadline = time.monotonic() + 10
        while len(collector.ids()) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        counts = sh.ledger.counts()
        await sh.close()
        await server.stop()
        return collector, counts

    collector, counts = asyncio.run(go())
    batches = [b for _, b in collector.batches]
    assert collector.ids() == ["r0", "r1", "r2"]
    assert [(e.source, e.captured, e.acked) for b in batches for e in b.ended_sources] == [("h:dead", 10, 6)]
    assert [o.request_id for b in batches for o in b.outcomes] == ["r0"]
    assert (counts.captured, counts.acked, counts.dropped, counts.dropped_reported) == (5, 3, 2, 2)
    # the dead process's ledger was reported and deleted; ours was settled (its drops went out with an
    # acknowledged batch), so nothing is left for a successor
    assert list(tmp_path.iterdir()) == []


# ----- the store and the collector -----

def test_loss_is_captured_minus_dropped_minus_stored_per_source(store):
    store.insert([obs(f"a{i}") for i in range(20)], source="h:1", received_ts=NOW)
    store.insert([obs("a0")], source="h:1", received_ts=NOW)  # a retried batch: a duplicate, not counted again
    ledger = pb.SourceLedger(source="h:1", captured=52, acked=20, dropped=2)
    (x,) = store.record_ended_sources([ledger], reported_by="h:2", now=NOW + 5)
    assert (x["captured"], x["stored"], x["dropped"], x["lost"]) == (52, 20, 2, 30)
    store.record_ended_sources([ledger], reported_by="h:3", now=NOW + 9)  # reported again: same counts
    store.insert([obs(f"late{i}") for i in range(4)], source="h:1", received_ts=NOW + 10)  # stored, not acked
    (x,) = store.source_losses()
    assert (x["stored"], x["lost"], x["ended_ts"]) == (24, 26, NOW + 5)


def test_collector_stores_outcomes_and_ended_sources_and_counts_them(store):
    metrics = ControllerMetrics()
    svc = ObservationCollectorServicer(store, metrics)
    first = pb.ObservationBatch(source="h:2", observations=[obs("cut", status_code=200),
                                                            obs("gone", status_code=200), obs("ok", status_code=200)])
    outcomes = [pb.StreamOutcome(request_id="cut", model="chat", version="v1", role="baseline",
                                 error_kind="upstream_reset", response_flags="UPE", status_code=200, ts=NOW),
                pb.StreamOutcome(request_id="gone", model="chat", version="v1", role="baseline",
                                 error_kind="client_reset", response_flags="DC", status_code=200, ts=NOW),
                pb.StreamOutcome(request_id="later", model="chat", version="v2", role="canary",
                                 error_kind="upstream_timeout", response_flags="UT", status_code=200, ts=NOW)]
    second = pb.ObservationBatch(source="h:2", outcomes=outcomes,
                                 ended_sources=[pb.SourceLedger(source="h:1", captured=7, acked=3, dropped=1)])

    async def go():
        await svc.Report(first, None)
        await svc.Report(second, None)
        await svc.Report(second, None)  # retried: nothing counted twice
        await svc.Report(pb.ObservationBatch(source="h:2", observations=[
            obs("later", version="v2", role="canary", status_code=200)]), None)

    asyncio.run(go())
    svc.executor.shutdown()
    reg = metrics.registry
    base = {"model": "chat", "version": "v1", "role": "baseline"}
    assert reg.get_sample_value("lockgate_request_errors_total", base) == 1
    assert reg.get_sample_value("lockgate_request_errors_total", {**base, "version": "v2", "role": "canary"}) == 1
    assert reg.get_sample_value("lockgate_request_timeouts_total", {**base, "version": "v2", "role": "canary"}) == 1
    assert reg.get_sample_value("lockgate_stream_outcomes_total", {**base, "kind": "client_reset"}) == 1
    assert reg.get_sample_value("lockgate_controller_observations_lost_total", {"source": "h:1"}) == 6
    assert reg.get_sample_value("lockgate_controller_source_dropped_observations_total", {"source": "h:1"}) == 1
    cols = store.fetch("chat", include_replay=True)
    kinds = dict(zip(cols["request_id"], cols["error_kind"]))
    assert kinds == {"cut": "upstream_reset", "gone": "client_reset", "ok": None, "later": "upstream_timeout"}
    assert store.get("cut")[0]["error_kind"] == "upstream_reset"
    err = dict(zip(prepare(cols, NOW + 1)["request_id"], prepare(cols, NOW + 1)["error"]))
    assert err == {"cut": 1.0, "gone": 0.0, "ok": 0.0, "later": 1.0}  # the model's failures only


def test_error_kind_and_client_request_id_round_trip_through_the_export(store, tmp_path):
    store.insert([obs("a", client_request_id="mine", status_code=200), obs("b", ts=NOW + 1, status_code=200)])
    store.insert_outcomes([pb.StreamOutcome(request_id="a", error_kind="upstream_reset", ts=NOW)])
    path = tmp_path / "o.jsonl"
    with open(path, "w") as f:
        export_jsonl(store, f, "chat", evaluations=None)
    text = path.read_text()
    assert '"client_request_id":"mine"' in text and '"error_kind":"upstream_reset"' in text
    cols = read_jsonl(text.splitlines(), model="chat")
    fetched = store.fetch("chat")
    for c in ("request_id", "client_request_id", "error_kind"):
        assert list(cols[c]) == list(fetched[c]), c
    assert list(model_failure(cols["error_kind"])) == [True, False]


def test_an_old_store_gains_the_new_columns(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE observations (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, ts REAL NOT NULL, "
               "model TEXT NOT NULL, version TEXT NOT NULL, role TEXT NOT NULL, weight_bp INTEGER NOT NULL, "
               "replay INTEGER NOT NULL, received_ts REAL NOT NULL)")
    db.execute("INSERT INTO observations(request_id, ts, model, version, role, weight_bp, replay, received_ts) "
               "VALUES ('old', ?, 'chat', 'v1', 'baseline', 0, 0, ?)", (NOW, NOW))
    db.commit()
    db.close()
    s = ObservationStore(path)
    try:
        s.insert([obs("new", client_request_id="c")])
        assert [(r["request_id"], r["client_request_id"]) for r in s.iter_records("chat")] == \
            [("old", None), ("new", "c")]
    finally:
        s.close()


# ----- Envoy's access log -----

def test_classify_prefers_the_upstream_cause():
    assert classify(ald.ResponseFlags(upstream_protocol_error=True)) == ("upstream_reset", "UPE")
    assert classify(ald.ResponseFlags(upstream_request_timeout=True)) == ("upstream_timeout", "UT")
    assert classify(ald.ResponseFlags(downstream_connection_termination=True)) == ("client_reset", "DC")
    both = ald.ResponseFlags(upstream_connection_termination=True, downstream_connection_termination=True)
    assert classify(both) == ("upstream_reset", "UC,DC")
    assert classify(ald.ResponseFlags(no_route_found=True))[0] == ""


def test_outcome_from_an_access_log_entry():
    config = config_from_text(BASE)
    models = {m.name: m for m in config.models}
    entry = ald.HTTPAccessLogEntry()
    entry.common_properties.response_flags.upstream_protocol_error = True
    entry.common_properties.upstream_cluster = "chat.v2"
    entry.common_properties.route_name = "chat/key/0?canary=v2&w=500&stage=s1"
    entry.request.request_headers["x-lockgate-request-id"] = "lg-1"
    entry.response.response_code.value = 200
    entry.response.response_code_details = "upstream_reset_after_response_started{protocol_error}"
    o = outcome_from_entry(entry, models, NOW)
    assert (o.request_id, o.model, o.version, o.role, o.error_kind, o.response_flags, o.status_code) == \
        ("lg-1", "chat", "v2", "canary", "upstream_reset", "UPE", 200)
    entry.request.request_headers.clear()
    assert outcome_from_entry(entry, models, NOW) is None  # no lockgate id: not ours
    log = access_log("lockgate_extproc")
    flags = log.filter.and_filter.filters[0].response_flag_filter.flags
    assert list(flags) == list(LOGGED_FLAGS) and "DC" in flags and "UPE" in flags


# ----- request ids -----

def capture_of(attrs_update: dict, drop: tuple[str, ...] = ()) -> pb.Observation:
    config = config_from_text(BASE)
    (h, *_) = messages("v1", "lg-9", b"{}", 1)
    attrs = h.attributes[ATTR_NS]
    for k in drop:
        del attrs.fields[k]
    attrs.update(attrs_update)
    cap = ResponseCapture.start(h.response_headers, attrs, NOW, {m.name: m for m in config.models},
                                AnalyzerConfig(max_body_bytes=1 << 20, refusal_patterns=()), b"k" * 32, [])
    return cap.obs


def test_request_id_is_lockgates_and_the_clients_is_kept():
    o = capture_of({"request.id": "client-chosen"})
    assert (o.request_id, o.client_request_id) == ("lg-9", "client-chosen")
    minted = capture_of({}, drop=("request.headers['x-lockgate-request-id']",))  # an Envoy without lockgate's routes
    again = capture_of({}, drop=("request.headers['x-lockgate-request-id']",))
    assert minted.request_id.startswith("lg-") and minted.request_id != again.request_id
    assert minted.client_request_id == "client-lg-9"


def test_feedback_by_client_request_id(store):
    now = time.time()
    store.insert([obs("L1", now, client_request_id="dup"), obs("L2", now, client_request_id="dup"),
                  obs("L3", now, client_request_id="one")])
    api = ControllerHTTP("127.0.0.1", 0, store, ControllerMetrics(), retention_s=30 * 86400, unknown_grace_s=0.0)
    try:
        code, body = api.feedback(b'{"client_request_id": "dup", "thumbs": "up"}')
        assert code == 409 and "ambiguous" in body["error"] and body["client_request_id"] == "dup"
        code, body = api.feedback(b'{"client_request_id": "one", "thumbs": "up"}')
        assert code == 200 and body["request_id"] == "L3"
        code, body = api.feedback(b'{"client_request_id": "none", "thumbs": "up"}')
        assert code == 404 and "unknown client_request_id" in body["error"]
        code, body = api.feedback(b'[{"client_request_id": "one", "thumbs": "down"}, {"request_id": "L1", '
                                  b'"thumbs": "up"}, {"client_request_id": "dup", "thumbs": "up"}]')
        assert code == 207 and [r["status"] for r in body["results"]] == [200, 200, 409]
        assert [store.get(r)[0].get("thumbs") for r in ("L1", "L2", "L3")] == ["up", None, "down"]
    finally:
        api.server.server_close()
    with pytest.raises(FeedbackError) as info:
        parse_feedback(b'{"request_id": "a", "client_request_id": "b", "thumbs": "up"}')
    assert info.value.field == "client_request_id"
    (item,), _ = parse_feedback(b'{"client_request_id": "c", "thumbs": "up"}')
    assert item[0] == "c" and type(item[0]).__name__ == "ClientRequestId"
