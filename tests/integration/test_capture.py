"""Inline response capture through the real Envoy: analyzer fields, byte identity, streaming, feedback."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixture_upstream import FIXTURES, SSE
from tests.harness import Client, Fleet, Proc, PY, requires_envoy

pytestmark = [requires_envoy, pytest.mark.envoy]


@pytest.fixture
def fixture_fleet(tmp_path):
    up = Proc([PY, "-m", "tests.fixture_upstream", "--port", "0"], tmp_path / "fixture.log")
    port = int(up.ready_text.split()[1])
    models = [{"name": "fx", "match": {"path_prefix": "/"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{port}"]}}}]
    fleet = Fleet(tmp_path, models, with_controller=True,
                  extra={"capture": {"max_body_bytes": 65536, "extra_refusal_patterns": ["computer says no"]}})
    try:
        fleet.start()
        fleet.upstream_port = port
        yield fleet
        fleet.stop()
    finally:
        up.stop()


def get(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
        ) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        try:
            body = r.read()
        except http.client.IncompleteRead as exc:
            body = exc.partial
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        conn.close()


def test_every_analyzer_field_and_byte_identity(fixture_fleet):
    f = fixture_fleet
    ids = {}
    for name, (status, _, body) in FIXTURES.items():
        rid = f"req-{name}"
        st, headers, got = get(f.ports["listener"], f"/fixture/{name}", {"x-request-id": rid, "x-user-id": "alice"})
        assert st == status, name
        assert got == body, f"{name}: body through lockgate differs from the upstream's"
        assert headers.get("x-request-id") == rid  # the client's id comes back as it was sent
        assert headers.get("x-lockgate-request-id")  # and lockgate's own beside it
        direct = get(f.upstream_port, f"/fixture/{name}")[2]
        assert direct == got
        ids[name] = rid
    st, _, got = get(f.ports["listener"], "/sse/stream", {"x-request-id": "req-sse"})
    assert got == b"".join(SSE["stream"])
    get(f.ports["listener"], "/cut-sse", {"x-request-id": "req-cut"})
    obs = {o["client_request_id"]: o for o in f.wait_observations(len(FIXTURES) + 2)}

    chat = obs["req-chat"]
    assert (chat["model"], chat["version"], chat["role"], chat["status_code"]) == ("fx", "v1", "baseline", 200)
    assert chat["analyzer"] == "openai" and chat["output_tokens"] == 6 and not chat["output_tokens_estimated"]
    assert chat["finish_reason"] == "stop" and chat["refusal"] is False
    assert chat["entropy"] is not None and 0 < chat["entropy"] < 0.7
    assert chat["response_bytes"] == len(FIXTURES["chat"][2])
    assert chat["user_key"] and "alice" not in chat["user_key"]
    assert chat["upstream_host"] == f"127.0.0.1:{f.upstream_port}"
    assert chat["ttfb_ms"] >= 0 and chat["duration_ms"] >= chat["ttfb_ms"] - 1e-6
    assert obs["req-chat-nousage"]["output_tokens_estimated"] and obs["req-chat-nousage"]["output_tokens"] > 0
    assert obs["req-refusal"]["refusal"] is True
    assert obs["req-content-filter"]["refusal"] is True
    cls = obs["req-classifier"]
    assert cls["analyzer"] == "classifier" and cls["predicted_class"] == "fraud" and cls["confidence"] == 0.8
    assert obs["req-error"]["status_code"] == 500
    assert obs["req-malformed"]["parse_error"] in ("cut_off", "malformed_json")
    assert obs["req-binary"]["analyzer"] == "none" and obs["req-binary"]["response_bytes"] == 4096
    assert obs["req-gzip"]["parse_error"] == "compressed"
    huge = obs["req-huge"]
    assert huge["truncated"] and huge["response_bytes"] == len(FIXTURES["huge"][2])
    assert obs["req-empty"]["status_code"] == 204
    sse = obs["req-sse"]
    assert sse["analyzer"] == "sse" and sse["output_tokens"] == 6 and sse["finish_reason"] == "stop"
    assert obs["req-cut"]["parse_error"] in ("cut_off", "incomplete")


def test_bodiless_responses_are_observed_once(fixture_fleet):
    """A response whose headers end the stream (HEAD, 204, empty 200/404) is one observation from its
    headers message; an empty chunked body is stored once; a request abandoned before any response
    (no status) is not an observation."""
    f = fixture_fleet
    cases = {  # request id: (method, path, status)
        "b-head": ("HEAD", "/fixture/chat", 200),
        "b-empty-200": ("GET", "/fixture/empty-200", 200),
        "b-204": ("GET", "/fixture/empty", 204),
        "b-404": ("GET", "/no/such/fixture", 404),
        "b-chunked": ("GET", "/empty-chunked", 200),
        "b-chat": ("GET", "/fixture/chat", 200),
    }
    for rid, (method, path, status) in cases.items():
        st, _, body = get(f.ports["listener"], path, {"x-request-id": rid, "x-user-id": "bob"}, method)
        assert st == status and (body == b"" or rid == "b-chat"), rid
    abandoned = socket.create_connection(("127.0.0.1", f.ports["listener"]), timeout=5)
    abandoned.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nx-request-id: b-abandoned\r\n\r\n")
    time.sleep(0.2)
    abandoned.close()  # before any response: no status, not an observation
    time.sleep(1.2)
    f.wait_observations(len(cases))
    time.sleep(0.5)  # a late extra or duplicate observation would show up by now
    obs = f.observations()
    assert sorted(o["client_request_id"] for o in obs) == sorted(cases)  # each exactly once
    for o in obs:
        method, path, status = cases[o["client_request_id"]]
        assert (o["model"], o["version"], o["role"], o["status_code"]) == ("fx", "v1", "baseline", status)
        assert o["user_key"] and o["upstream_host"] == f"127.0.0.1:{f.upstream_port}"
        assert o["duration_ms"] >= o["ttfb_ms"] >= 0
        if o["client_request_id"] != "b-chat":
            assert o["response_bytes"] == 0, o


def test_sse_first_chunk_reaches_client_before_upstream_sends_the_last(fixture_fleet):
    f = fixture_fleet
    sock = socket.create_connection(("127.0.0.1", f.ports["listener"]), timeout=10)
    t0 = time.monotonic()
    sock.sendall(b"GET /sse/stream?interval_ms=300 HTTP/1.1\r\nHost: x\r\nx-request-id: slow-sse\r\n\r\n")
    data = b""
    first_at = None
    while b"[DONE]" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed early"
        data += chunk
        if first_at is None and b"data: " in data:
            first_at = time.monotonic() - t0
    total = time.monotonic() - t0
    sock.close()
    n_events = len(SSE["stream"])
    assert total >= 0.3 * (n_events - 1) * 0.9
    assert first_at is not None and first_at < total - 1.0, (first_at, total)
    (o,) = [o for o in f.wait_observations(1) if o["client_request_id"] == "slow-sse"]
    assert o["output_tokens"] == 6 and o["duration_ms"] >= 0.3 * (n_events - 1) * 900


def test_feedback_joins_and_metrics_parse(fixture_fleet):
    f = fixture_fleet
    c = Client(f.ports["listener"])
    lockgate_id = {}
    for i in range(20):
        r = c.request("/fixture/classifier", {"x-request-id": f"fb-{i}", "x-user-id": f"u{i}"})
        assert r.status == 200
        lockgate_id[f"fb-{i}"] = r.headers["x-lockgate-request-id"]
    c.close()
    f.wait_observations(20)
    base = f"http://127.0.0.1:{f.ports['controller_http']}"

    def post(payload) -> tuple[int, dict]:
        req = urllib.request.Request(f"{base}/v1/feedback", data=json.dumps(payload).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    status, _ = post({"request_id": lockgate_id["fb-3"], "true_class": "billing", "thumbs": "down"})
    assert status == 200
    status, _ = post({"client_request_id": "fb-5", "thumbs": "up"})  # by the client's own id
    assert status == 200 and f.observations(lockgate_id["fb-5"])[0]["thumbs"] == "up"
    status, body = post({"request_id": "no-such-request", "true_class": "x"})
    assert status == 404 and "unknown" in json.dumps(body)
    status, body = post({"request_id": lockgate_id["fb-4"], "thumbs": "sideways"})
    assert status == 400 and "thumbs" in json.dumps(body)
    (o,) = f.observations(lockgate_id["fb-3"])
    assert o["client_request_id"] == "fb-3"
    assert o["true_class"] == "billing" and o["predicted_class"] == "fraud"

    ep_metrics = urllib.request.urlopen(f"http://127.0.0.1:{f.ports['extproc_metrics']}/metrics").read().decode()
    fams = {fam.name: fam for fam in text_string_to_metric_families(ep_metrics)}
    reqs = sum(s.value for s in fams["lockgate_requests"].samples if s.labels.get("model") == "fx")
    assert reqs >= 20
    classes = {s.labels["class"]: s.value for s in fams["lockgate_predicted_class"].samples
               if s.name.endswith("_total")}
    assert classes.get("fraud", 0) >= 20
    assert all("user" not in k for s in fams["lockgate_requests"].samples for k in s.labels)
    assert [s.value for s in fams["lockgate_observations_dropped"].samples if s.name.endswith("_total")] == [0.0]
    deadline = time.monotonic() + 12  # the controller reads Envoy's ext_proc counters every 5 s
    while True:
        ctl = urllib.request.urlopen(f"{base}/metrics").read().decode()
        fams = {fam.name: fam for fam in text_string_to_metric_families(ctl)}
        unobserved = {s.labels["counter"]: s.value for s in fams.get("lockgate_envoy_extproc_unobserved",
                                                                     type("F", (), {"samples": []})).samples}
        if "message_timeouts" in unobserved or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert unobserved.get("message_timeouts") == 0.0, unobserved


def test_controller_down_observations_are_kept_and_delivered_later(fixture_fleet):
    f = fixture_fleet
    f.procs["controller"].kill()
    c = Client(f.ports["listener"])
    for i in range(50):
        assert c.request("/fixture/chat", {"x-request-id": f"down-{i}"}).status == 200
    c.close()
    f.start_controller()
    got = [o for o in f.wait_observations(50, timeout=30) if o["client_request_id"].startswith("down-")]
    assert len(got) == 50
