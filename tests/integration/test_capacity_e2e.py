"""Capacity-aware ramps end to end, through a real Envoy and the controller's promotion loop (issue 17
part 5): a rollout whose spec gives the canary's two hosts a capacity below what the next step would send
them holds at its stage (the weights stay; the projection with its numbers in `rollout status`, a
`capacity_hold` entry in the deployment log and the report); aborted and started again with the capacity
raised, the same fleet advances and is promoted. Bounded waits, no timing asserts."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.harness import Fleet, requires_envoy
from tests.integration.test_approvals import events_of, reasons, wait_for
from tests.integration.test_rollout_e2e import Traffic, chat_server, status

pytestmark = [requires_envoy, pytest.mark.envoy]

SPEC = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 1
  steps:
    - {{weight_percent: 10, min_duration: 1s, min_canary_samples: 20}}
    - {{weight_percent: 50, min_duration: 1s, min_canary_samples: 20}}
  promotion: {{max_duration: 10m, require_non_inferiority: false, preflight: none}}
  capacity: {capacity}
  metrics:
    - {{name: error_rate, allowed: {{absolute: 0.15}}}}
"""


def test_low_capacity_holds_with_the_projection_raised_capacity_advances(tmp_path):
    v1, p1 = chat_server(tmp_path, "v1", "--seed", "1")
    v2a, p2a = chat_server(tmp_path, "v2", "--seed", "2")
    (tmp_path / "host-b").mkdir()
    v2b, p2b = chat_server(tmp_path / "host-b", "v2", "--seed", "3")  # the canary's second host
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]},
                            "v2": {"endpoints": [f"127.0.0.1:{p2a}", f"127.0.0.1:{p2b}"]}}}]
    try:
        with Fleet(tmp_path, models, with_controller=True) as fleet, Traffic(fleet.ports["listener"], max_s=150):
            low = tmp_path / "low.yaml"
            low.write_text(SPEC.format(capacity="{requests_per_s_per_host: 0.5, window_s: 10}"))
            r = fleet.cli("rollout", "start", str(low))
            assert r.returncode == 0, r.stderr + r.stdout

            # 1. stage 1 is done, but 50 % of the traffic would exceed 2 hosts x 0.5 req/s x 0.8: held at 10 %
            st = wait_for(fleet, "capacity hold", lambda s: "capacity: holding at 10%" in reasons(s), 60)
            first = st["id"]
            cap = st["last_eval"]["capacity"]
            assert cap["holding"] and not cap["fits"] and cap["hosts"] == 2 and cap["limit_rps"] == 0.8
            assert cap["projected_rps"] > 0.8 and cap["next_bp"] == 5000 and cap["requests"] > 0
            assert ("next step 50% projects" in reasons(st) and "onto 2 canary hosts, capacity 2 × 0.5 × 0.8 = 0.8 "
                    "req/s (traffic" in reasons(st)), reasons(st)
            time.sleep(3.0)  # more looks: still held, the weights unchanged
            st = status(fleet)
            assert st["stage"] == 0 and st["status"] == "running" and st["last_eval"]["capacity"]["holding"]
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 1000)
            text = fleet.cli("rollout", "status", "chat", check=True).stdout
            assert "capacity: HOLDING - capacity: holding at 10%: next step 50% projects" in text, text
            report = tmp_path / "report.html"
            r = fleet.cli("report", str(first), "-o", str(report), "--no-png")
            assert r.returncode == 0, r.stderr
            r = fleet.cli("rollout", "abort", "chat")
            assert r.returncode == 0, r.stderr + r.stdout

            # 2. the same fleet, the capacity raised: advances to 50 % and is promoted
            high = tmp_path / "high.yaml"
            high.write_text(SPEC.format(capacity="{requests_per_s_per_host: 100000, tokens_per_s_per_host: 10000000, "
                                                 "window_s: 10}"))
            r = fleet.cli("rollout", "start", str(high))
            assert r.returncode == 0, r.stderr + r.stdout
            st = wait_for(fleet, "promoted with the raised capacity", lambda s: s["status"] == "promoted", 60)
            second = st["id"]
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 10000)
    finally:
        v1.stop()
        v2a.stop()
        v2b.stop()

    events = events_of(tmp_path, first)
    holds = [e for e in events if e["kind"] == "capacity_hold"]
    assert len(holds) == 1 and holds[0]["stage"] == 0, [e["kind"] for e in events]  # once per change of state
    assert holds[0]["detail"]["reasons"][0].startswith("capacity: holding at 10%: next step 50% projects")
    assert holds[0]["detail"]["limit_rps"] == 0.8
    assert not [e for e in events if e["kind"] == "advanced"]
    html = report.read_text()
    assert "capacity_hold" in html and "capacity 2 × 0.5 × 0.8 = 0.8 req/s" in html
    assert "<h2>Capacity (last judgement)</h2><p>HOLDING: capacity: holding at 10%: next step 50% projects" in html
    events = events_of(tmp_path, second)
    assert not [e for e in events if e["kind"] == "capacity_hold"]
    advanced = [e for e in events if e["kind"] == "advanced"]
    assert len(advanced) == 1 and any(x.startswith("capacity: next step 50% projects") and x.endswith(": fits")
                                      for x in advanced[0]["detail"]["reasons"]), advanced
    promoted = [e for e in events if e["kind"] == "promoted"]
    assert promoted and any("promotion to 100% projects" in x and "tokens/s onto 2 canary hosts" in x
                            for x in promoted[0]["detail"]["reasons"]), promoted


class DelayProxy:
    """A TCP proxy in front of the canary's server whose answers it holds back ``delay_s`` (set at run time):
    the canary's hosts slowing down, without a restart (a restart's refused connections would be errors,
    and the error-rate gate would rightly roll back)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.delay_s = 0.0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for a, b, slow in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(a, b, slow), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while data := src.recv(65536):
                if slow and self.delay_s:
                    time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def test_observed_mode_holds_while_the_canary_slows_with_load_and_moves_on_when_it_recovers(tmp_path):
    """latency_rise: the canary's p50 over the last window against its p50 in the rollout's first window. A
    proxy in front of the canary's server holds its answers 400 ms (standing in for hosts slowing with load):
    held at 10 % with both p50s in the reason; fast again: capacity_clear, advanced, promoted."""
    v1, p1 = chat_server(tmp_path, "v1", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--seed", "2")
    proxy = DelayProxy(p2)
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]},
                            "v2": {"endpoints": [f"127.0.0.1:{proxy.port}"]}}}]
    spec = tmp_path / "observed.yaml"
    spec.write_text(SPEC.format(capacity="{latency_rise: 3, window_s: 10}").replace(
        "{weight_percent: 10, min_duration: 1s", "{weight_percent: 10, min_duration: 60s"))  # room to slow down
    try:
        with Fleet(tmp_path, models, with_controller=True) as fleet, Traffic(fleet.ports["listener"], max_s=240):
            r = fleet.cli("rollout", "start", str(spec))
            assert r.returncode == 0, r.stderr + r.stdout

            def cap(s):
                return (s.get("last_eval") or {}).get("capacity") or {}

            # the rollout's first 10 s give the start p50 (the canary as fast as it is)
            st = wait_for(fleet, "start window", lambda s: cap(s).get("start_latency_n", 0) >= 30
                          and time.time() > s["started_at"] + 11, 60)
            assert st["stage"] == 0 and cap(st)["start_p50_ms"] > 0 and not cap(st)["holding"], cap(st)
            proxy.delay_s = 0.4  # slow now: every canary answer 400 ms later
            st = wait_for(fleet, "latency hold", lambda s: "the canary's p50 latency rose from" in reasons(s), 60)
            rid = st["id"]
            assert st["stage"] == 0 and cap(st)["holding"] and cap(st)["canary_p50_ms"] >= 400, cap(st)
            assert "capacity: holding at 10%: before the next step 50%: the canary's p50 latency rose from" in \
                reasons(st) and "more than the allowed ×3): its hosts slow down with load" in reasons(st), reasons(st)
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 1000)
            text = fleet.cli("rollout", "status", "chat", check=True).stdout
            assert "capacity: HOLDING - capacity: holding at 10%" in text, text
            proxy.delay_s = 0.0  # recovered
            st = wait_for(fleet, "promoted once the canary is fast again", lambda s: s["status"] == "promoted", 120)
    finally:
        v1.stop()
        v2.stop()
        proxy.close()

    events = events_of(tmp_path, rid)
    kinds = [e["kind"] for e in events if e["kind"] in ("capacity_hold", "capacity_clear", "advanced", "promoted")]
    assert kinds[:3] == ["capacity_hold", "capacity_clear", "advanced"] and kinds[-1] == "promoted", kinds
    hold = next(e for e in events if e["kind"] == "capacity_hold")
    assert hold["detail"]["latency_ratio"] > 3 and hold["detail"]["start_latency_n"] >= 30
    # a slow canary is no harm to the error-rate gate: never rolled back
    assert not [e for e in events if e["kind"] in ("rolled_back", "rolling_back")]
