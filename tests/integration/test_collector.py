"""The controller as a real process: ``python -m lockgate -c cfg controller`` on free loopback ports.

Batches go in over real gRPC (ObservationCollector.Report), feedback over HTTP, metrics are scraped
and parsed, the export CLI reads the store while the controller runs, and SIGTERM ends it with exit 0.
Every process started here is stopped by PID.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lockgate.proto.v1 import observations_pb2 as pb
from lockgate.proto.v1 import observations_pb2_grpc as pb_grpc
from tests.harness import dump_yaml, PY, REPO, Proc, _env, free_port

DAY = 86400.0


@pytest.fixture
def controller(tmp_path):
    ports = {"grpc": free_port(), "http": free_port()}
    cfg = {
        "state_dir": str(tmp_path / "state"),
        "controller": {"address": f"127.0.0.1:{ports['grpc']}", "http": f"127.0.0.1:{ports['http']}",
                       "retention_days": 30, "prune_interval_s": 0.5},
        "models": [{"name": "chat", "stable": "v1",
                    "versions": {"v1": {"endpoints": ["127.0.0.1:18001"]},
                                 "v2": {"endpoints": ["127.0.0.1:18002"]}}}],
    }
    path = tmp_path / "lockgate.yaml"
    path.write_text(dump_yaml(cfg))
    procs: list[Proc] = []

    def start() -> Proc:
        p = Proc([PY, "-m", "lockgate", "-c", str(path), "controller"], tmp_path / "controller.log")
        procs.append(p)
        return p

    yield start, ports, path
    for p in procs:
        p.stop()


def report(port: int, batch: pb.ObservationBatch) -> pb.ReportAck:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return pb_grpc.ObservationCollectorStub(ch).Report(batch, timeout=10)


def http(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(port: int, obj) -> tuple[int, dict]:
    code, body = http(port, "POST", "/v1/feedback", json.dumps(obj).encode())
    return code, json.loads(body)


def metrics(port: int) -> dict[tuple[str, frozenset], float]:
    """Scrape and parse /metrics: ``{(sample name, frozenset(labels.items())): value}``."""
    code, body = http(port, "GET", "/metrics")
    assert code == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def mk(rid: str, ts: float, version: str = "v1", **kw) -> pb.Observation:
    role = "baseline" if version == "v1" else "canary"
    return pb.Observation(request_id=rid, ts=ts, model="chat", version=version, role=role, weight_bp=2000,
                          stage="canary-20", route="sticky", upstream_host="127.0.0.1:18001",
                          user_key="k" + rid[-4:], **kw)


def test_collector_end_to_end(controller, tmp_path):
    start, ports, cfg_path = controller
    p = start()
    assert p.ready_text == f"ready controller=127.0.0.1:{ports['grpc']} http=127.0.0.1:{ports['http']}"
    now = time.time()
    obs = [mk(f"req-{i:04d}", now + i * 0.001, "v2" if i % 4 == 0 else "v1", status_code=500 if i % 10 == 0 else 200,
              duration_ms=100.0 + i, ttfb_ms=10.0, output_tokens=20 + i % 5, refusal=(i % 7 == 0),
              predicted_class="spam" if i % 2 else "ham", confidence=0.9) for i in range(200)]
    obs.append(mk("no-measure", now))  # nothing measured
    obs.append(mk("ancient", now - 40 * DAY))  # older than the retention: feedback gets 410
    batch = pb.ObservationBatch(source="host:123", observations=obs, dropped_total=5)
    ack = report(ports["grpc"], batch)
    assert (ack.stored, ack.duplicates, ack.rejected) == (202, 0, 0)
    # a retried batch is acknowledged and not stored twice
    ack = report(ports["grpc"], batch)
    assert (ack.stored, ack.duplicates) == (202, 202)
    ack = report(ports["grpc"], pb.ObservationBatch(source="host:123", observations=[pb.Observation(ts=now)]))
    assert ack.rejected == 1

    # feedback: join, unknown, expired, malformed, lists
    code, body = post(ports["http"], {"request_id": "req-0001", "true_class": "spam", "thumbs": "up"})
    assert code == 200 and body["stored"] == 1, body
    code, body = post(ports["http"], {"request_id": "req-0002", "task_success": False, "evaluator_score": 0.25})
    assert code == 200, body
    code, body = post(ports["http"], {"request_id": "never-seen", "thumbs": "down"})
    assert code == 404 and "unknown request_id" in body["error"]
    code, body = post(ports["http"], {"request_id": "ancient", "true_class": "spam"})
    assert code == 410, body
    code, body = post(ports["http"], {"request_id": "req-0003", "thumbs": "meh"})
    assert code == 400 and body["field"] == "thumbs" and "thumbs" in body["error"]
    code, raw = http(ports["http"], "POST", "/v1/feedback", b'{"request_id": ')
    assert code == 400 and "invalid JSON" in json.loads(raw)["error"]
    code, body = post(ports["http"], [{"request_id": "req-0004", "true_class": "ham"},
                                      {"request_id": "req-0005", "true_class": 7}])
    assert code == 200 and body["stored"] == 2
    code, body = post(ports["http"], [{"request_id": "req-0006", "true_class": "ham"},
                                      {"request_id": "nope-2", "true_class": "ham"}])
    assert code == 207 and [r["status"] for r in body["results"]] == [200, 404]

    # debugging view
    code, raw = http(ports["http"], "GET", "/v1/observations/req-0001")
    rec = json.loads(raw)["observations"][0]
    assert code == 200 and rec["true_class"] == "spam" and rec["thumbs"] == "up" and rec["label_arrival_ts"] >= now
    assert rec["weight"] == 0.2 and rec["latency_ms"] == 101.0
    code, raw = http(ports["http"], "GET", "/v1/observations/no-measure")
    rec = json.loads(raw)["observations"][0]
    assert "latency_ms" not in rec and "refusal" not in rec and "status_code" not in rec
    assert http(ports["http"], "GET", "/v1/observations/never-seen")[0] == 404
    assert http(ports["http"], "GET", "/nope")[0] == 404

    # the pruner (every 0.5 s) deletes the 40-day-old observation; its id is then "gone", not "unknown"
    deadline = time.monotonic() + 10
    while http(ports["http"], "GET", "/v1/observations/ancient")[0] != 410:
        assert time.monotonic() < deadline, "ancient observation was not pruned"
        time.sleep(0.2)

    # metrics
    m = metrics(ports["http"])
    base = frozenset({"model": "chat", "role": "baseline", "version": "v1"}.items())
    can = frozenset({"model": "chat", "role": "canary", "version": "v2"}.items())
    assert m[("lockgate_controller_observations_stored_total", base)] == 152  # 150 + no-measure + ancient
    assert m[("lockgate_controller_observations_stored_total", can)] == 50
    assert m[("lockgate_controller_observations_duplicate_total", can)] == 50
    assert m[("lockgate_controller_observations_rejected_total", frozenset({("reason", "no request_id")}))] == 1
    assert m[("lockgate_controller_source_dropped_observations_total", frozenset({("source", "host:123")}))] == 5
    assert m[("lockgate_request_errors_total", can)] == 10
    assert m[("lockgate_requests_total", can | {("status", "5xx")})] == 10
    assert m[("lockgate_request_duration_seconds_count", can)] == 50
    assert m[("lockgate_time_to_first_byte_seconds_count", base)] == 150
    assert m[("lockgate_output_tokens_count", base)] == 150
    assert m[("lockgate_predicted_class_total", base | {("class", "spam")})] == 100
    assert m[("lockgate_controller_observations_pruned_total", frozenset())] == 1
    assert m[("lockgate_controller_feedback_total", frozenset({("kind", "true_class"), ("result", "expired")}))] == 1
    assert m[("lockgate_controller_feedback_total", frozenset({("kind", "thumbs"), ("result", "unknown")}))] == 1
    assert not any("user_key" in dict(labels) or "request_id" in dict(labels) for _, labels in m)

    # export, read straight from the store while the controller runs
    out = subprocess.run([PY, "-m", "lockgate", "-c", str(cfg_path), "observations", "export", "--model", "chat",
                          "--since", str(now - DAY)], capture_output=True, text=True, cwd=REPO, env=_env(),
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(lines) == 201
    by_id = {r["request_id"]: r for r in lines}
    r1 = by_id["req-0001"]
    for key in ("ts", "request_id", "model", "version", "role", "weight", "stage", "status_code", "timeout",
                "latency_ms", "ttfb_ms", "output_tokens", "refusal", "predicted_class", "confidence",
                "user_key", "upstream_host", "true_class", "label_arrival_ts", "thumbs", "thumbs_arrival_ts"):
        assert key in r1, key
    assert by_id["req-0002"]["task_success"] is False and by_id["req-0002"]["evaluator_score"] == 0.25
    assert by_id["req-0005"]["true_class"] == "7"
    assert "latency_ms" not in by_id["no-measure"] and "entropy" not in by_id["no-measure"]
    bad = subprocess.run([PY, "-m", "lockgate", "-c", str(cfg_path), "observations", "export", "--model", "chat",
                          "--since", "last tuesday"], capture_output=True, text=True, cwd=REPO, env=_env(),
                         timeout=60)
    assert bad.returncode == 2 and "--since" in bad.stderr

    # SIGTERM: clean exit 0
    p.kill(signal.SIGTERM)
    assert p.proc.returncode == 0

    # durable: a new controller on the same state answers with the same data
    p2 = start()
    code, body = post(ports["http"], {"request_id": "req-0010", "thumbs": "down"})
    assert code == 200, body
    ack = report(ports["grpc"], batch)
    assert ack.duplicates == 201  # "ancient" was pruned: stored again, and pruned again later
    p2.kill(signal.SIGINT)
    assert p2.proc.wait(10) == 0


def test_collector_stores_40_concurrent_batches_completely(controller):
    """40 batches of 250 in flight at once (paced slices interleave on the writer): every one stored
    and counted once. The rate is printed, not asserted (timing belongs in bench/)."""
    start, ports, _ = controller
    start()
    now = time.time()
    n_batches, size = 40, 250
    batches = [pb.ObservationBatch(source="bench:1", observations=[
        mk(f"{uuid.uuid4()}", now + j, status_code=200, duration_ms=50.0, ttfb_ms=5.0, output_tokens=30)
        for j in range(size)]) for _ in range(n_batches)]
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as ch:
        stub = pb_grpc.ObservationCollectorStub(ch)
        stub.Report(pb.ObservationBatch(source="bench:1"), timeout=10)  # connect
        t = time.perf_counter()
        futures = [stub.Report.future(b, timeout=30) for b in batches]
        acks = [f.result() for f in futures]
        rate = n_batches * size / (time.perf_counter() - t)
    assert sum(a.stored for a in acks) == n_batches * size
    print(f"collector: {rate:.0f} observations/s stored durably over gRPC")
    assert all(a.stored == size and a.duplicates == 0 for a in acks)
    m = metrics(ports["http"])
    base = frozenset({"model": "chat", "role": "baseline", "version": "v1"}.items())
    assert m[("lockgate_controller_observations_stored_total", base)] == n_batches * size


def test_controller_port_in_use_is_a_clear_error(controller):
    start, ports, path = controller
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports["http"]))
        s.listen()
        out = subprocess.run([PY, "-m", "lockgate", "-c", str(path), "controller"], capture_output=True, text=True,
                             cwd=REPO, env=_env(), timeout=60)
    assert out.returncode == 2 and "controller.http" in out.stderr, out.stderr
