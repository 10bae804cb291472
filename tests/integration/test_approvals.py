"""Approval and external gates end to end, through a real Envoy and the controller's promotion loop
(issue 17 part 3): a step waits for `lockgate rollout approve` (the log names the approver: the name given
without auth, marked unauthenticated; the token's client name with auth, whatever the caller writes), and
for HTTP checks served by a tiny server in the test: one answering fail holds, then pass lets it advance;
one that times out holds with a timeout reason, then passes. The weights stay at the gated stage while it
holds. Bounded waits, no timing asserts."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lockgate.auth import hash_token
from tests.harness import Fleet, requires_envoy
from tests.integration.test_rollout_e2e import Traffic, chat_server, status

pytestmark = [requires_envoy, pytest.mark.envoy]

SPEC = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 1
  steps:
    - weight_percent: 10
      min_duration: 1s
      min_canary_samples: 20
      approval: {{required: true}}
    - weight_percent: 30
      min_duration: 1s
      min_canary_samples: 20
      checks:
        - name: loadtest
          url: http://127.0.0.1:{port}/loadtest
          timeout_s: 1
          interval_s: 1
          expect: {{status: 200, field: result.verdict, equals: pass}}
    - weight_percent: 50
      min_duration: 1s
      min_canary_samples: 20
      checks:
        - {{name: window, url: "http://127.0.0.1:{port}/window", method: POST, timeout_s: 0.5, interval_s: 1}}
  promotion: {{max_duration: 10m, require_non_inferiority: false, preflight: none}}
  metrics:
    - {{name: error_rate, allowed: {{absolute: 0.15}}}}
"""


class CheckServer:
    """``/<name>`` answers as ``modes[name]`` says: ``fail`` (503, verdict fail), ``pass`` (200, verdict pass)
    or ``slow`` (waits 3 s, beyond any check's timeout, then 200). Remembers the POST bodies it got."""

    def __init__(self):
        self.modes: dict[str, str] = {}
        self.posted: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                mode = outer.modes.get(self.path.strip("/"), "fail")
                if mode == "slow":
                    time.sleep(3.0)
                status = 503 if mode == "fail" else 200
                body = json.dumps({"result": {"verdict": "fail" if mode == "fail" else "pass",
                                              "p99_ms": 812 if mode == "fail" else 95}}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the controller gave up waiting (the timeout case)
                    pass

            def do_GET(self):
                self._answer()

            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                outer.posted.append(json.loads(self.rfile.read(n) or b"{}"))
                self._answer()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def wait_for(fleet, what, pred, timeout):
    """Poll `rollout status` until ``pred(status)``; fail naming ``what`` with the last status."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(fleet)
        if pred(st):
            return st
        if time.monotonic() > deadline or st["status"] not in ("pending", "running", "paused", "rolling_back"):
            raise AssertionError(f"{what}: not reached; last status:\n{json.dumps(st, indent=1)[:4000]}")
        time.sleep(0.3)


def check_state(st, name):
    g = (st.get("last_eval") or {}).get("gates") or {}
    return next((c["state"] for c in g.get("checks", []) if c["name"] == name), None)


def reasons(st):
    return " ".join(((st.get("last_eval") or {}).get("stage_decision") or {}).get("reasons", []))


def chat_models(p1, p2):
    return [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
             "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}}]


def events_of(tmp_path, rollout_id):
    from lockgate.controller.decide.rollouts import RolloutStore

    store = RolloutStore(tmp_path / "state" / "rollouts.db")
    try:
        return store.events(rollout_id)
    finally:
        store.close()


def test_approval_then_failing_passing_and_timing_out_checks(tmp_path):
    v1, p1 = chat_server(tmp_path, "v1", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--seed", "2")
    try:
        with CheckServer() as checks, Fleet(tmp_path, chat_models(p1, p2), with_controller=True) as fleet, \
                Traffic(fleet.ports["listener"], max_s=150):
            checks.modes.update(loadtest="fail", window="slow")
            spec = tmp_path / "rollout.yaml"
            spec.write_text(SPEC.format(port=checks.port))
            r = fleet.cli("rollout", "start", str(spec))
            assert r.returncode == 0, r.stderr + r.stdout

            # 1. stage 1 is done but waits for an approval: held at 10 %, said in status
            st = wait_for(fleet, "waiting for approval", lambda s: "waiting for approval of stage 1/3" in reasons(s), 40)
            assert st["stage"] == 0 and st["last_eval"]["gates"]["approval"]["waiting_since"]
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 1000)
            text = fleet.cli("rollout", "status", "chat", check=True).stdout
            assert "approval: waiting since" in text and "lockgate rollout approve chat" in text, text
            # a stage without approval cannot be approved; a later gated one is named
            r = fleet.cli("rollout", "approve", "chat", "--stage", "2")
            assert r.returncode == 2 and "needs no approval" in r.stderr and "stages that need one: 1" in r.stderr
            # still held after more looks
            time.sleep(2.0)
            assert status(fleet)["stage"] == 0

            # 2. approved by alice (no auth: the given name, marked unauthenticated) → stage 2 at 30 %
            r = fleet.cli("rollout", "approve", "chat", "--as", "alice", "--note", "load test booked")
            assert r.returncode == 0 and "stage 1/3 (10%) approved by alice (unauthenticated)" in r.stdout, r.stdout
            st = wait_for(fleet, "stage 2 after the approval", lambda s: s["stage"] >= 1, 30)
            text = fleet.cli("rollout", "status", "chat", check=True).stdout
            assert "approved: end of stage 1 by alice (unauthenticated)" in text, text
            assert st["approvals"] == [{"stage": 1, "approved_by": "alice", "approved_at": st["approvals"][0]
                                        ["approved_at"], "authenticated": False}]

            # 3. the load test answers fail: held at 30 % with the answer in the reason
            st = wait_for(fleet, "loadtest fail", lambda s: check_state(s, "loadtest") == "fail", 40)
            assert st["stage"] == 1
            assert "HTTP 503" in reasons(st) and '"verdict": "fail"' in reasons(st), reasons(st)
            time.sleep(2.0)
            st = status(fleet)
            assert st["stage"] == 1 and check_state(st, "loadtest") == "fail"
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 3000)
            text = fleet.cli("rollout", "status", "chat", check=True).stdout
            assert "check loadtest: fail" in text, text

            # 4. it answers pass → stage 3 at 50 %
            checks.modes["loadtest"] = "pass"
            st = wait_for(fleet, "stage 3 after the load test passed", lambda s: s["stage"] >= 2, 30)

            # 5. the change-window check does not answer within its 0.5 s: held with a timeout reason
            st = wait_for(fleet, "window timeout", lambda s: check_state(s, "window") == "timeout", 40)
            assert st["stage"] == 2 and "no answer within 0.5 s (timeout)" in reasons(st), reasons(st)
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 5000)
            assert checks.posted and checks.posted[0]["model"] == "chat" and checks.posted[0]["stage"] == 3

            # 6. the window opens → promoted
            checks.modes["window"] = "pass"
            st = wait_for(fleet, "promoted", lambda s: s["status"] == "promoted", 40)
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 10000)
            show = fleet.cli("show", str(st["id"]), check=True).stdout
            report = tmp_path / "report.html"
            r = fleet.cli("report", str(st["id"]), "-o", str(report), "--no-png")
            assert r.returncode == 0, r.stderr
    finally:
        v1.stop()
        v2.stop()

    # the deployment log: who approved, every check's change of state, the gated advances' reasons
    events = events_of(tmp_path, st["id"])
    approved = [e for e in events if e["kind"] == "approved"]
    assert len(approved) == 1 and approved[0]["actor"] == "alice" and approved[0]["stage"] == 0
    assert approved[0]["detail"]["authenticated"] is False and approved[0]["detail"]["note"] == "load test booked"
    assert [e["stage"] for e in events if e["kind"] == "awaiting_approval"] == [0]
    checks_log = [(e["detail"]["name"], e["detail"]["state"]) for e in events if e["kind"] == "check"]
    assert checks_log[:2] == [("loadtest", "fail"), ("loadtest", "pass")], checks_log
    assert ("window", "timeout") in checks_log and checks_log[-1] == ("window", "pass"), checks_log
    advanced = [e for e in events if e["kind"] == "advanced"]
    assert [e["stage"] for e in advanced] == [1, 2]
    assert "approved by alice, unauthenticated" in " ".join(advanced[0]["detail"]["reasons"])
    assert "check loadtest passed" in " ".join(advanced[1]["detail"]["reasons"])
    promoted = [e for e in events if e["kind"] == "promoted"]
    assert promoted and "check window passed" in " ".join(promoted[-1]["detail"]["reasons"])
    # nothing moved while a gate held: the weights went 10 → 30 → 50 → 100 in that order only
    moves = [e["weight_bp"] for e in events if e["kind"] in ("started", "advanced", "promoted")]
    assert moves == [1000, 3000, 5000, 10000]
    assert "approved by alice" in show and "loadtest" in show, show
    html = report.read_text()
    assert "approved by alice" in html and "no answer within 0.5 s (timeout)" in html


OWN = "lockgate-own-token-approvals-1"
CI = "release-manager-token-approvals-2"


def test_with_auth_the_approver_is_the_token_client_not_the_name_given(tmp_path, monkeypatch):
    v1, p1 = chat_server(tmp_path, "v1", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--seed", "2")
    (tmp_path / "lockgate.token").write_text(OWN + "\n")
    os.chmod(tmp_path / "lockgate.token", 0o600)
    auth = {"tokens": [{"name": "lockgate", "sha256": hash_token(OWN)},
                       {"name": "release-manager", "sha256": hash_token(CI)}],
            "token_file": str(tmp_path / "lockgate.token")}
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC.format(port=1).split("    - weight_percent: 30")[0]
                    + "    - {weight_percent: 30, min_duration: 5m}\n"
                    + "  promotion: {max_duration: 10m, preflight: none}\n"
                    + "  metrics:\n    - {name: error_rate, allowed: {absolute: 0.15}}\n")
    try:
        with Fleet(tmp_path, chat_models(p1, p2), with_controller=True, extra={"auth": auth}) as fleet, \
                Traffic(fleet.ports["listener"], max_s=60):
            assert fleet.cli("rollout", "start", str(spec)).returncode == 0
            wait_for(fleet, "waiting for approval", lambda s: "waiting for approval" in reasons(s), 40)
            monkeypatch.setenv("LOCKGATE_TOKEN", "not-a-token")
            r = fleet.cli("rollout", "approve", "chat", "--as", "mallory")
            assert r.returncode == 2 and "invalid token" in r.stderr, r.stderr  # refused: 401
            monkeypatch.delenv("LOCKGATE_TOKEN")  # the CLI's own token (auth.token_file): client "lockgate"
            assert status(fleet)["stage"] == 0 and not status(fleet)["approvals"]
            monkeypatch.setenv("LOCKGATE_TOKEN", CI)
            r = fleet.cli("rollout", "approve", "chat", "--as", "mallory")
            assert r.returncode == 0 and "approved by release-manager" in r.stdout, r.stdout + r.stderr
            assert "mallory" not in r.stdout and "unauthenticated" not in r.stdout
            st = wait_for(fleet, "stage 2 after the approval", lambda s: s["stage"] >= 1, 30)
            r = fleet.cli("rollout", "approve", "chat", "--stage", "1")
            assert r.returncode == 2 and "past stage 1/2" in r.stderr, r.stderr
            monkeypatch.delenv("LOCKGATE_TOKEN")
            assert fleet.cli("rollout", "abort", "chat").returncode == 0
    finally:
        v1.stop()
        v2.stop()
    approved = [e for e in events_of(tmp_path, st["id"]) if e["kind"] == "approved"]
    assert [(e["actor"], e["detail"]["authenticated"]) for e in approved] == [("release-manager", True)]


def test_harm_rolls_back_while_waiting_for_an_approval(tmp_path):
    """An approval never stands between harm and the rollback: the canary's server dies while its stage
    waits for an approval (Envoy answers 503 for it), and the rollout is rolled back without one."""
    v1, p1 = chat_server(tmp_path, "v1", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--seed", "2")
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC.format(port=1).split("    - weight_percent: 30")[0]
                    + "    - {weight_percent: 30, min_duration: 5m}\n"
                    + "  promotion: {max_duration: 10m, preflight: none}\n"
                    + "  metrics:\n    - {name: error_rate, allowed: {absolute: 0.15}}\n")
    try:
        with Fleet(tmp_path, chat_models(p1, p2), with_controller=True) as fleet, \
                Traffic(fleet.ports["listener"], max_s=90):
            assert fleet.cli("rollout", "start", str(spec)).returncode == 0
            wait_for(fleet, "waiting for approval", lambda s: "waiting for approval" in reasons(s), 40)
            v2.stop()  # every canary request now fails
            st = wait_for(fleet, "rolled back", lambda s: s["status"] == "rolled_back", 60)
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 0)
    finally:
        v1.stop()
        v2.stop()
    events = events_of(tmp_path, st["id"])
    kinds = [e["kind"] for e in events]
    assert "approved" not in kinds and kinds.index("awaiting_approval") < kinds.index("rolled_back"), kinds
    rb = next(e for e in events if e["kind"] == "rolled_back")
    assert rb["actor"] == "controller" and "harm shown" in " ".join(rb["detail"]["reasons"])
