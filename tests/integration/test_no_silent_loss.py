"""No silent loss of observations, through the real Envoy (docs/observations.md, "Lost observations" in
docs/operations.md):

* a client that reuses one ``x-request-id`` gets two observations (lockgate's ids are minted by Envoy),
  its own id kept as ``client_request_id``;
* an ext_proc SIGKILLed with a queue of unacknowledged observations: the next ext_proc process
  reports the ledger the dead one left, and the controller counts exactly what was lost;
* an SSE stream the model server cuts (closed, reset, or timed out mid-stream) is a model failure
  (``error_kind``, ``error`` = 1); a client that disconnects mid-stream is a client reset (not an error).
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Client, Fleet, PY, Proc, requires_envoy

pytestmark = [requires_envoy, pytest.mark.envoy]

CHAT = json.dumps({"model": "lockgate-chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM = json.dumps({"model": "lockgate-chat", "messages": [{"role": "user", "content": "hi"}],
                     "stream": True}).encode()


@pytest.fixture
def chat_fleet(tmp_path: Path):
    """One model (``chat``, v1 = the example chat server with its test modes) behind lockgate."""
    up = Proc([PY, "-m", "lockgate.examples.chat_server", "--port", "0", "--version", "v1", "--latency-ms", "0",
               "--latency-jitter-ms", "0", "--ttft-ms", "0", "--inter-token-ms", "0", "--test-modes"],
              tmp_path / "chat.log")
    port = int(up.ready_text.split()[1])
    models = [{"name": "chat", "match": {"path_prefix": "/v1/"}, "stable": "v1", "timeout_s": 1.0,
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{port}"]}}}]
    fleet = Fleet(tmp_path, models, with_controller=True)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()
        up.stop()


def controller_metrics(f: Fleet) -> dict[tuple[str, frozenset], float]:
    url = f"http://127.0.0.1:{f.ports['controller_http']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(metrics: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in metrics.items() if n == name and want <= lab)


def post_feedback(f: Fleet, payload) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{f.ports['controller_http']}/v1/feedback",
                                 data=json.dumps(payload).encode(), headers={"content-type": "application/json"},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_for(fn, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_reused_client_request_id_gives_two_observations(chat_fleet):
    f = chat_fleet
    c = Client(f.ports["listener"])
    # the client reuses its id, and even tries to choose lockgate's
    headers = {"x-request-id": "reused", "x-lockgate-request-id": "forged", "content-type": "application/json"}
    ok = c.request("/v1/chat/completions", headers, "POST", CHAT)
    failed = c.request("/v1/chat/completions", {**headers, "x-test-mode": "error"}, "POST", CHAT)
    unique = c.request("/v1/chat/completions", {"x-request-id": "unique", "content-type": "application/json"},
                       "POST", CHAT)
    c.close()
    assert (ok.status, failed.status, unique.status) == (200, 500, 200)
    assert ok.headers["x-request-id"] == failed.headers["x-request-id"] == "reused"  # the client's, as sent
    ids = [r.headers["x-lockgate-request-id"] for r in (ok, failed, unique)]
    assert len(set(ids)) == 3 and "forged" not in ids  # minted by Envoy per request

    obs = wait_for(lambda: (lambda o: o if len(o) == 3 else None)(f.observations()))
    assert obs and len(obs) == 3, obs
    by_id = {o["request_id"]: o for o in obs}
    assert set(by_id) == set(ids)
    assert [(by_id[i]["client_request_id"], by_id[i]["status_code"]) for i in ids] == \
        [("reused", 200), ("reused", 500), ("unique", 200)]
    m = controller_metrics(f)
    assert total(m, "lockgate_controller_observations_stored_total") == 3
    assert total(m, "lockgate_controller_observations_duplicate_total") == 0  # nothing silently ignored
    assert total(m, "lockgate_requests_total", status="5xx") == 1
    assert total(m, "lockgate_request_errors_total") == 1  # the 500 a reused id used to hide

    # feedback: by lockgate's id (the response header); by the client's id only when it is unambiguous
    status, body = post_feedback(f, {"client_request_id": "reused", "thumbs": "down"})
    assert status == 409 and "ambiguous" in body["error"], body
    assert post_feedback(f, {"request_id": ids[1], "thumbs": "down"})[0] == 200
    assert post_feedback(f, {"client_request_id": "unique", "thumbs": "up"})[0] == 200
    assert [o.get("thumbs") for o in (f.observations(i)[0] for i in ids)] == [None, "down", "up"]
    with urllib.request.urlopen(f"http://127.0.0.1:{f.ports['controller_http']}/v1/observations/{ids[1]}") as r:
        shown = json.loads(r.read())
    assert shown["observations"][0]["client_request_id"] == "reused"
    lines = [json.loads(x) for x in f.cli("observations", "export", "--model", "chat", check=True).stdout.split()]
    assert sorted((x["request_id"], x["client_request_id"]) for x in lines) == \
        sorted(zip(ids, ["reused", "reused", "unique"]))


def test_sigkill_with_a_queue_in_flight_is_counted_exactly(chat_fleet):
    """sent = stored + lost (counted by the controller from the dead process's ledger) + responses Envoy
    passed without the ext_proc (its ``failure_mode_allowed``), exactly."""
    f = chat_fleet
    c = Client(f.ports["listener"])
    sent = 0

    def send(n: int, prefix: str) -> None:
        nonlocal sent
        for i in range(n):
            assert c.request("/v1/chat/completions", {"x-request-id": f"{prefix}-{i}"}, "POST", CHAT).status == 200
            sent += 1

    send(20, "before")
    assert wait_for(lambda: len(f.observations()) == 20)
    f.procs["controller"].kill(signal.SIGSTOP)  # the next batches wait: a queue builds up, unacknowledged
    try:
        send(30, "queued")
        in_flight: list[int] = []

        def stream(k: int) -> None:  # a slow SSE stream still running when the ext_proc dies
            s = Client(f.ports["listener"])
            r = s.request("/v1/chat/completions", {"x-request-id": f"sse-{k}", "x-test-mode": "slow-sse",
                                                   "x-test-interval-ms": "100", "x-test-events": "5"}, "POST", STREAM)
            in_flight.append(r.status)
            s.close()

        threads = [threading.Thread(target=stream, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        killed = f.procs["extproc"].pid
        f.procs["extproc"].kill(signal.SIGKILL)
        for t in threads:
            t.join(10)
        assert in_flight == [200, 200, 200]
        sent += 3
    finally:
        f.procs["controller"].kill(signal.SIGCONT)
    send(5, "down")  # while no ext_proc runs: Envoy lets them through unobserved, and counts them
    ledgers = f.tmp / "state" / "extproc-ledgers"
    assert [p.name.split("-")[0] for p in ledgers.iterdir()] == [str(killed)]  # the dead process's counts

    f.start_extproc()  # the next process claims and reports the ledger
    m = wait_for(lambda: (lambda m: m if total(m, "lockgate_controller_observations_lost_total") else None)(
        controller_metrics(f)))
    assert m, "no loss reported"
    send(5, "after")
    stored = wait_for(lambda: (lambda n: n if n == 25 else None)(len(f.observations())))
    unobserved = f.stat(0, "http.lockgate.ext_proc.lockgate.failure_mode_allowed")
    # the ledger's report may reach the controller in more than one batch: wait until the count settles
    # at the balance (and fail below if it never does)
    m = wait_for(lambda: (lambda m: m if total(m, "lockgate_controller_observations_lost_total") + unobserved
                          == sent - stored else None)(controller_metrics(f))) or controller_metrics(f)
    lost = total(m, "lockgate_controller_observations_lost_total")
    assert (sent, stored, lost, unobserved) == (63, 25, 30, 8)
    assert sent - stored == lost + unobserved
    assert [p.name.split("-")[0] for p in ledgers.iterdir()] == [str(f.procs["extproc"].pid)]  # reported: gone
    ep = urllib.request.urlopen(f"http://127.0.0.1:{f.ports['extproc_metrics']}/metrics").read().decode()
    assert "lockgate_ended_process_unacked_observations_total 30.0" in ep


class Traffic:
    """Steady chat requests, each with its own x-request-id; the status each got (0: no answer)."""

    def __init__(self, port: int, prefix: str, threads: int = 2):
        self.port, self.prefix = port, prefix
        self.stop = threading.Event()
        self.status: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        c = Client(self.port)
        k = 0
        while not self.stop.is_set():
            rid = f"{self.prefix}-{i}-{k}"
            try:
                code = c.request("/v1/chat/completions", {"x-request-id": rid, "x-user-id": f"u{k % 50}"}, "POST",
                                 CHAT).status
            except OSError:
                code = 0
                c.close()
                c = Client(self.port)
            self.status[rid] = code
            k += 1
            time.sleep(0.005)
        c.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


@pytest.mark.parametrize("fault", ["extproc-kill", "extproc-stop", "controller-kill", "controller-stop"])
def test_no_uncounted_loss_under_faults(chat_fleet, fault):
    """Steady traffic through a fault of the ext_proc or the controller: every request answered 200 is a
    stored observation or counted as lost (by the controller from a dead ext_proc's ledger, or by Envoy
    when it passed the response without the ext_proc). Counted losses may exceed the missing ones (an
    ext_proc frozen past Envoy's message timeout still records the responses Envoy gave up on)."""
    f = chat_fleet
    part, how = fault.split("-")
    with Traffic(f.ports["listener"], fault) as traffic:
        time.sleep(1.5)
        proc = f.procs[part]
        if how == "kill":
            proc.kill(signal.SIGKILL)
            time.sleep(2)
            f.start_extproc() if part == "extproc" else f.start_controller()
        else:
            proc.kill(signal.SIGSTOP)
            time.sleep(3)
            proc.kill(signal.SIGCONT)
        time.sleep(2)
    answered = {rid for rid, code in traffic.status.items() if code == 200}
    assert len(answered) > 100 and set(traffic.status.values()) == {200}, Counter(traffic.status.values())

    def settled():
        stored = {o["client_request_id"] for o in f.observations()}
        m = controller_metrics(f)
        counted = total(m, "lockgate_controller_observations_lost_total") + \
            f.stat(0, "http.lockgate.ext_proc.lockgate.failure_mode_allowed")
        return (stored, counted) if len(answered - stored) <= counted else None

    got = wait_for(settled, timeout=30)
    stored = {o["client_request_id"] for o in f.observations()}
    assert got, (fault, len(answered - stored), controller_metrics(f))
    stored, counted = got
    assert stored <= set(traffic.status)  # nothing stored that was not sent
    missing = len(answered - stored)
    print(f"{fault}: answered {len(answered)}, stored {len(answered & stored)}, missing {missing}, "
          f"counted lost {counted:g}, uncounted {max(0, missing - counted):g}")
    if part == "controller":  # the ext_proc keeps its queue and retries: nothing is lost at all
        assert missing == 0 and counted == 0


def _stream_once(port: int, headers: dict[str, str]) -> tuple[int, bytes]:
    """One streamed chat request on its own connection (never retried); a cut body is returned as read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=STREAM, headers={"content-type": "application/json",
                                                                          **headers})
        r = conn.getresponse()
        try:
            return r.status, r.read()
        except http.client.IncompleteRead as exc:
            return r.status, exc.partial
    finally:
        conn.close()


def _client_gone_mid_stream(port: int, rid: str) -> None:
    """A client that reads the first SSE event and disconnects."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
              b"x-test-mode: slow-sse\r\nx-test-interval-ms: 200\r\nx-test-events: 5\r\n"
              + f"x-request-id: {rid}\r\ncontent-length: {len(STREAM)}\r\n\r\n".encode() + STREAM)
    data = b""
    while b"data: " not in data:
        data += s.recv(65536)
    s.close()


def test_upstream_cut_stream_is_a_model_failure_a_client_reset_is_not(chat_fleet):
    f = chat_fleet
    port = f.ports["listener"]
    bodies = {rid: _stream_once(port, {"x-request-id": rid, **({"x-test-mode": mode} if mode else {})})[1]
              for rid, mode in (("closed", "cut-sse"), ("reset", "reset-sse"), ("complete", None))}
    # the route timeout (1 s) fires mid-stream: 6 events 300 ms apart
    bodies["stalled"] = _stream_once(port, {"x-request-id": "stalled", "x-test-mode": "slow-sse",
                                            "x-test-interval-ms": "300", "x-test-events": "6"})[1]
    assert b"[DONE]" in bodies["complete"] and not any(b"[DONE]" in bodies[k] for k in ("closed", "reset", "stalled"))
    _client_gone_mid_stream(port, "gone")

    want = {"closed": "upstream_reset", "reset": "upstream_reset", "stalled": "upstream_timeout",
            "gone": "client_reset", "complete": None}
    obs = wait_for(lambda: (lambda o: o if len(o) == 5 and sum(1 for x in o if x["error_kind"]) == 4 else None)(
        f.observations()))
    assert obs, f.observations()
    got = {o["client_request_id"]: o for o in obs}
    assert {k: o["error_kind"] for k, o in got.items()} == want
    assert all(o["status_code"] == 200 for o in obs)  # the headers went out before every cut

    from lockgate.controller.decide.analysis import prepare
    from lockgate.controller.ingest.observations import ObservationStore

    store = ObservationStore(f.tmp / "state" / "observations.db", read_only=True)
    try:
        cols = prepare(store.fetch("chat"), now=time.time() + 1)
    finally:
        store.close()
    rid_to_client = {o["request_id"]: k for k, o in got.items()}
    error = {rid_to_client[r]: e for r, e in zip(cols["request_id"], cols["error"])}
    assert error == {"closed": 1.0, "reset": 1.0, "stalled": 1.0, "gone": 0.0, "complete": 0.0}

    m = controller_metrics(f)
    assert total(m, "lockgate_request_errors_total") == 3
    assert total(m, "lockgate_request_timeouts_total") == 1
    assert {k: total(m, "lockgate_stream_outcomes_total", kind=k)
            for k in ("upstream_reset", "upstream_timeout", "client_reset")} == \
        {"upstream_reset": 2, "upstream_timeout": 1, "client_reset": 1}
