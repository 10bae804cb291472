"""Alerts and registry feedback end to end: a real controller, real Envoy, real local HTTP receivers.

* a bad canary (errors 2 % → 42 %, clearly beyond its +15-point allowance) is rolled back: the webhook,
  Slack and Alertmanager receivers get the alert with the numbers; a receiver failing its first
  requests gets it after retries; a receiver that hangs delays nothing (the rollback's detected →
  all-ACKed time stays in milliseconds); the file registry says ``failed-canary`` with the metrics;
  the deployment log has the ``alert``/``registry`` events;
* a good canary is promoted: the file registry says ``production``;
* an alert that cannot be delivered survives a controller restart (persisted outbox) and the control API
  going away raises a ``trouble`` alert, resolved when it is back;
* the MLflow adapter against a real ``mlflow server`` (SQLite backend) on loopback.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.harness import Fleet, Proc, free_port, requires_envoy
from tests.integration.test_rollout_e2e import SPEC, Traffic, chat_server, wait_status


class Receiver:
    """A local HTTP receiver recording every POST by path. Per path: fail the first N (503), or hang."""

    def __init__(self):
        self.lock = threading.Lock()
        self.got: dict[str, list] = {}
        self.tries: dict[str, int] = {}
        self.fail: dict[str, int] = {}
        self.hang: set[str] = set()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer.lock:
                    outer.tries[self.path] = outer.tries.get(self.path, 0) + 1
                    failing = outer.fail.get(self.path, 0)
                    if failing:
                        outer.fail[self.path] = failing - 1
                if self.path in outer.hang:
                    time.sleep(60)
                    return
                if failing:
                    self.send_response(503)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                with outer.lock:
                    outer.got.setdefault(self.path, []).append(json.loads(body))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait(self, path, pred=lambda items: bool(items), timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                items = list(self.got.get(path, []))
            if pred(items):
                return items
            time.sleep(0.1)
        with self.lock:
            return list(self.got.get(path, []))

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def models(p1, p2):
    return [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
             "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}}]


FAST = {"initial_backoff_s": 0.3, "max_backoff_s": 1.0}


def log_events(tmp_path, rollout_id):
    from lockgate.controller.decide.rollouts import RolloutStore

    store = RolloutStore(tmp_path / "state" / "rollouts.db")
    try:
        return store.events(rollout_id)
    finally:
        store.close()


@requires_envoy
@pytest.mark.envoy
def test_rollback_alerts_everywhere_registry_failed_canary_hanging_sink_delays_nothing(tmp_path, receiver):
    receiver.fail["/slack"] = 2
    receiver.hang.add("/hang")
    alerts = [{"type": "webhook", "url": receiver.base + "/hook", "name": "hook"},
              {"type": "slack", "url": receiver.base + "/slack", "name": "slack", "retry": FAST},
              {"type": "alertmanager", "url": receiver.base, "name": "am"},
              {"type": "webhook", "url": receiver.base + "/hang", "name": "hang", "timeout_s": 30}]
    v1, p1 = chat_server(tmp_path, "v1", "--error-rate", "0.02", "--seed", "1")
    # +40 points of errors against +15 allowed: a canary worse *within* its allowance is not rolled back
    # (it is promoted once that is shown), so the rollback case has to be clearly beyond it
    v2, p2 = chat_server(tmp_path, "v2", "--error-rate", "0.42", "--seed", "2")
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC.format(max_duration="10m"))
    try:
        with Fleet(tmp_path, models(p1, p2), with_controller=True, extra={"alerts": alerts}) as fleet, \
                Traffic(fleet.ports["listener"]):
            time.sleep(1.0)
            r = fleet.cli("rollout", "start", str(spec))
            assert r.returncode == 0, r.stderr + r.stdout
            final = wait_status(fleet, ("promoted", "rolled_back", "inconclusive", "aborted"), 75)
            assert final["status"] == "rolled_back", final
            hook = receiver.wait("/hook", lambda xs: any(x["kind"] == "rolled_back" for x in xs))
            slack = receiver.wait("/slack", timeout=20)
            am = receiver.wait("/api/v2/alerts", lambda xs: any(
                a["labels"]["alertname"] == "LockgateCanaryRolledBack" for x in xs for a in x))
            weights = fleet.route_weights(0)
    finally:
        v1.stop()
        v2.stop()
    assert weights["chat/key/0"][0] == ("chat.v2", 0)
    rid = final["id"]
    [rb] = [x for x in hook if x["kind"] == "rolled_back"]
    assert rb["model"] == "chat" and rb["canary"] == "v2" and rb["severity"] == "critical" and rb["rollout_id"] == rid
    assert "ROLLED BACK to v1 at" in rb["title"] and "error_rate (gating) FAIL: canary" in rb["text"]
    assert "vs baseline" in rb["text"] and "interval [" in rb["text"] and "allowed +15.00 pp" in rb["text"]
    assert "Rollback: detected → pushed" in rb["text"] and "all 1 Envoy ACKed" in rb["text"]
    # the hanging receiver did not delay the rollback: its timings are those of a plain rollback
    t = rb["timings"]
    assert t["all_acked"] and (t["pushed_at"] - t["detected_at"]) * 1000 + t["push_to_ack_ms"] < 1000, t
    # Slack: failed twice (503), delivered on the third try
    assert receiver.tries["/slack"] >= 3
    assert any("ROLLED BACK" in s["text"] and s["blocks"][0]["type"] == "header" for s in slack)
    [amr] = [a for x in am for a in x if a["labels"]["alertname"] == "LockgateCanaryRolledBack"]
    assert amr["labels"] == {"alertname": "LockgateCanaryRolledBack", "model": "chat", "canary": "v2",
                             "severity": "critical", "rollout": str(rid)}
    assert amr["generatorURL"].endswith("/v1/rollouts?model=chat") and "endsAt" in amr and "startsAt" in amr
    assert "error_rate" in amr["annotations"]["description"]
    # the file registry (default): failed-canary with the key metrics
    doc = json.loads((tmp_path / "state" / "registry" / "chat.json").read_text())
    v2doc = doc["versions"]["v2"]
    assert v2doc["status"] == "failed-canary" and v2doc["rollout_id"] == rid and doc["production"] is None
    err = v2doc["metrics"]["error_rate"]
    assert err["verdict"] == "fail" and err["canary"] > 0.25 and err["allowed"] == pytest.approx(0.15)
    assert err["interval"][0] > err["allowed"], err  # shown worse than the baseline by more than the allowance
    assert v2doc["timings"]["all_acked"] is True
    # the deployment log
    events = log_events(tmp_path, rid)
    outcomes = {(e["kind"], e["detail"].get("sink"), e["detail"]["outcome"]) for e in events
                if e["kind"] in ("alert", "registry")}
    assert ("alert", "hook", "delivered") in outcomes and ("alert", "slack", "retrying") in outcomes
    assert ("alert", "slack", "delivered") in outcomes and ("registry", None, "delivered") in outcomes
    assert not any(receiver.base in json.dumps(e["detail"]) for e in events)  # sink URLs are never logged
    kinds = [e["kind"] for e in events]
    assert kinds.index("rolled_back") < kinds.index("alert")


@requires_envoy
@pytest.mark.envoy
def test_promotion_marks_production_in_the_file_registry(tmp_path, receiver):
    alerts = [{"type": "webhook", "url": receiver.base + "/hook", "on": ["promoted", "advanced"]}]
    v1, p1 = chat_server(tmp_path, "v1", "--error-rate", "0.02", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--error-rate", "0.02", "--seed", "2")
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC.format(max_duration="10m"))
    reg_dir = tmp_path / "my-registry"
    try:
        with Fleet(tmp_path, models(p1, p2), with_controller=True,
                   extra={"alerts": alerts, "registry": {"type": "file", "path": str(reg_dir)}}) as fleet, \
                Traffic(fleet.ports["listener"]):
            time.sleep(1.0)
            assert fleet.cli("rollout", "start", str(spec)).returncode == 0
            final = wait_status(fleet, ("promoted", "rolled_back", "inconclusive", "aborted"), 75)
            assert final["status"] == "promoted", final
            hook = receiver.wait("/hook", lambda xs: any(x["kind"] == "promoted" for x in xs))
    finally:
        v1.stop()
        v2.stop()
    kinds = [x["kind"] for x in hook]
    assert kinds.count("advanced") == 2 and kinds[-1] == "promoted"
    assert [x["title"].split(" (")[0] for x in hook if x["kind"] == "advanced"] == \
        ["chat: canary v2 advanced to 30%", "chat: canary v2 advanced to 50%"]
    prom = hook[-1]
    assert "promoted to 100%" in prom["title"] and "error_rate (gating) pass" in prom["text"]
    doc = json.loads((reg_dir / "chat.json").read_text())
    assert doc["production"] == "v2"
    v2doc = doc["versions"]["v2"]
    assert v2doc["status"] == "production" and v2doc["by_evidence"] is True and v2doc["rollout_id"] == final["id"]
    assert v2doc["metrics"]["error_rate"]["verdict"] == "pass"
    assert set(v2doc["metrics"]) == {"error_rate", "output_tokens"}
    assert [h["status"] for h in doc["history"]] == ["production"]


@requires_envoy
@pytest.mark.envoy
def test_undeliverable_alert_survives_restart_and_control_api_trouble(tmp_path, receiver):
    receiver.fail["/hook"] = 10 ** 6  # down until we say so
    alerts = [{"type": "webhook", "url": receiver.base + "/hook", "name": "hook", "on": ["aborted", "trouble"],
               "retry": {"max_attempts": 1000, "initial_backoff_s": 0.3, "max_backoff_s": 1.0}}]
    v1, p1 = chat_server(tmp_path, "v1", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--seed", "2")
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC.format(max_duration="1h").replace("min_duration: 2s", "min_duration: 5m"))
    try:
        with Fleet(tmp_path, models(p1, p2), with_controller=True, extra={"alerts": alerts}) as fleet:
            time.sleep(1.0)  # the controller started before the xDS server: let its control channel connect
            r = fleet.cli("rollout", "start", str(spec))
            assert r.returncode == 0, r.stderr
            t0 = time.monotonic()
            r = fleet.cli("rollout", "abort", "chat")
            assert r.returncode == 0 and "aborted" in r.stdout
            assert time.monotonic() - t0 < 10
            deadline = time.monotonic() + 15
            while receiver.tries.get("/hook", 0) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert receiver.tries.get("/hook", 0) >= 3 and not receiver.got.get("/hook")
            fleet.procs["controller"].kill()            # SIGKILL: nothing is flushed on the way out
            receiver.fail["/hook"] = 0                  # the receiver is back
            fleet.start_controller()
            got = receiver.wait("/hook", lambda xs: any(x["kind"] == "aborted" for x in xs))
            assert [x["kind"] for x in got] == ["aborted"]
            assert "aborted" in got[0]["title"] and "traffic back on v1" in got[0]["title"]
            # the control API (xDS server) goes away: trouble, then resolved when it is back
            fleet.procs["xds"].stop()
            down = receiver.wait("/hook", lambda xs: any(x.get("component") == "control_api" for x in xs), 30)
            fleet.start_xds()
            up = receiver.wait("/hook", lambda xs: any(x.get("component") == "control_api" and
                                                        x["status"] == "resolved" for x in xs), 30)
    finally:
        v1.stop()
        v2.stop()
    [firing] = [x for x in down if x.get("component") == "control_api"]
    assert firing["kind"] == "trouble" and firing["severity"] == "critical" and firing["status"] == "firing"
    assert "unreachable for" in firing["title"] and "no weight can move" in firing["text"]
    resolved = [x for x in up if x.get("component") == "control_api" and x["status"] == "resolved"]
    assert resolved and "reachable again after" in resolved[0]["title"]
    events = [e for e in log_events(tmp_path, 1) if e["kind"] == "alert"]
    assert [e["detail"]["outcome"] for e in events] == ["retrying", "delivered"]
    assert events[-1]["detail"]["attempts"] >= 4


# ---------------------------------------------------------------------------------------------- MLflow
def _mlflow_cli() -> str | None:
    import sys
    from pathlib import Path

    local = Path(sys.executable).parent / "mlflow"
    return str(local) if local.exists() else shutil.which("mlflow")


requires_mlflow = pytest.mark.skipif(_mlflow_cli() is None,
                                     reason="the mlflow CLI is not installed (optional: pip install mlflow)")


def _mlflow(base, method, endpoint, body=None, query=""):
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{endpoint}{query}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"{}")


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    p = Proc([_mlflow_cli(), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
              "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
              "--workers", "1"], tmp_path / "mlflow.log", ready_line=None)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or not p.alive():
            p.stop()
            pytest.fail("mlflow server did not start:\n" + (tmp_path / "mlflow.log").read_text()[-3000:])
        time.sleep(0.5)
    yield base
    p.stop()


@requires_mlflow
def test_mlflow_registry_against_a_real_server(tmp_path, mlflow_server):
    from lockgate.config import config_from_text
    from lockgate.controller.tell.registry import RegistryError, update_from_event
    from lockgate.controller.tell.registry.mlflow import MlflowRegistry

    base = mlflow_server
    _mlflow(base, "POST", "registered-models/create", {"name": "chat-llm"})
    for i in (1, 2, 3):
        _mlflow(base, "POST", "model-versions/create", {"name": "chat-llm", "source": f"s3://models/chat/{i}",
                                                         "tags": [{"key": "lockgate.version", "value": f"v{i}"}]})
    cfg = config_from_text(f"""
state_dir: {tmp_path}
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:1"]}}, v2: {{endpoints: ["127.0.0.1:2"]}},
          v3: {{endpoints: ["127.0.0.1:3"]}}, v4: {{endpoints: ["127.0.0.1:4"]}}}}}}]
registry: {{type: mlflow, tracking_uri: "{base}", registered_model: chat-llm, versions: {{v2: "2"}}}}
""")
    reg = MlflowRegistry(cfg.registry)
    verdict = {"metric": "error_rate", "kind": "rate", "verdict": "pass", "gating": True, "baseline": 0.02,
               "canary": 0.021, "difference": 0.001, "interval": [-0.004, 0.006], "allowed": 0.015,
               "n_baseline": 9000, "n_canary": 1000}

    def ev(kind, rid, canary):
        return {"kind": kind, "ts": time.time(), "detail": {"reasons": ["why"], "verdicts": [verdict]},
                "rollout": {"id": rid, "model": "chat", "canary": canary, "baseline": "v1"}}

    # v2 mapped in config → MLflow version 2: promoted → tags + alias production
    out = asyncio.run(reg.report(update_from_event(ev("promoted", 7, "v2"))))
    assert out == {"registered_model": "chat-llm", "mlflow_version": "2", "tags": 8, "alias": "production"}
    mv = _mlflow(base, "GET", "registered-models/alias", query="?name=chat-llm&alias=production")["model_version"]
    tags = {t["key"]: t["value"] for t in mv["tags"]}
    assert mv["version"] == "2" and tags["lockgate.status"] == "production" and tags["lockgate.rollout_id"] == "7"
    assert tags["lockgate.metric.error_rate"].startswith("verdict=pass canary=0.021 baseline=0.02")
    # v3 found by its lockgate.version tag → rolled back: failed-canary, alias unchanged; a retry is harmless
    for _ in range(2):
        out = asyncio.run(reg.report(update_from_event(ev("rolled_back", 8, "v3"))))
    assert out["mlflow_version"] == "3" and out["alias"] is None
    mv3 = _mlflow(base, "GET", "model-versions/get", query="?name=chat-llm&version=3")["model_version"]
    assert {t["key"]: t["value"] for t in mv3["tags"]}["lockgate.status"] == "failed-canary"
    alias = _mlflow(base, "GET", "registered-models/alias", query="?name=chat-llm&alias=production")
    assert alias["model_version"]["version"] == "2"
    # v4 is not in MLflow: a permanent error naming the fix (not retried)
    with pytest.raises(RegistryError) as e:
        asyncio.run(reg.report(update_from_event(ev("inconclusive", 9, "v4"))))
    assert not e.value.retryable and "lockgate.version=v4" in str(e.value)
    # the server down: a retryable error
    down = MlflowRegistry(config_from_text(f"""
state_dir: {tmp_path}
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:1"]}}}}}}]
registry: {{type: mlflow, tracking_uri: "http://127.0.0.1:{free_port()}", timeout_s: 2}}
""").registry)
    with pytest.raises(RegistryError) as e:
        asyncio.run(down.report(update_from_event(ev("promoted", 10, "v1"))))
    assert e.value.retryable
