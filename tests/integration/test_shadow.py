"""The shadow stage through a real Envoy (docs/rollout-spec.md, "Shadow stage"): at weight 0 a share of
the split's requests is mirrored to the canary's shadow cluster; every user is answered by the
baseline; the canary's answers are captured by the shadow cluster's upstream ext_proc filter as role
``shadow`` rows paired with the user's request by id; a rollback removes the mirror and its cluster.
"""

from __future__ import annotations

import json
import time

import pytest

from lockgate.control_client import ControlClient
from lockgate.routing import paired_request_id, shadow_cluster_name
from tests.harness import PY, Client, Fleet, Proc, requires_envoy

pytestmark = [requires_envoy, pytest.mark.envoy]


PROMPT = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "Say hello."}]}).encode()


def start_upstream(version: str, tmp_path, error_rate: float = 0.0) -> tuple[Proc, int, str]:
    log = tmp_path / f"requests-{version}.jsonl"
    argv = [PY, "-m", "lockgate.examples.chat_server", "--port", "0", "--version", version, "--seed", "7",
            "--latency-ms", "2", "--latency-jitter-ms", "0.5", "--log-requests", str(log), "--error-rate", str(error_rate)]
    p = Proc(argv, tmp_path / f"echo-{version}.log")
    return p, int(p.ready_text.split()[1]), str(log)


def lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def wait_for(pred, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def dynamic_clusters(fleet) -> list[str]:
    dump = json.loads(fleet.admin(0, "/config_dump?resource=dynamic_active_clusters"))
    return [c["cluster"]["name"] for c in dump.get("configs", [])]


def mirror_clusters(fleet) -> list[str]:
    dump = json.loads(fleet.admin(0, "/config_dump?resource=dynamic_route_configs"))
    return [m["cluster"] for cfg in dump.get("configs", []) for vh in cfg["route_config"].get("virtual_hosts", [])
            for route in vh.get("routes", []) for m in route.get("route", {}).get("request_mirror_policies", [])]


def test_shadow_stage_mirrors_captures_pairs_and_rolls_back(tmp_path):
    procs = {}
    procs["v1"], p1, log1 = start_upstream("chat-v1", tmp_path)
    procs["v2"], p2, log2 = start_upstream("chat-v2", tmp_path, error_rate=0.5)  # a canary that fails half
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}}]
    fleet = Fleet(tmp_path, models, with_controller=True)
    try:
        with fleet:
            ctl = ControlClient(f"127.0.0.1:{fleet.ports['control']}")
            resp = ctl.set_weight("chat", "v2", 0, actor="test", reason="shadow", stage="shadow",
                                  mirror_ppm=1_000_000)
            assert resp.all_acked and resp.model.mirror_ppm == 1_000_000, resp
            shadow = shadow_cluster_name("chat", "v2")
            assert shadow in dynamic_clusters(fleet)
            assert shadow in mirror_clusters(fleet)

            c = Client(fleet.ports["listener"])
            user_ids = []
            for i in range(200):
                r = c.request("/v1/chat/completions", {"x-user-id": f"user-{i}", "content-type": "application/json"},
                              method="POST", body=PROMPT)
                # every user is answered by the baseline: 0 user-facing canary responses
                assert r.status == 200 and r.version == "chat-v1", r
                user_ids.append(r.headers["x-lockgate-request-id"])
            wait_for(lambda: lines(log2) >= 200, what="the mirrored requests at the canary")
            assert lines(log1) == 200
            rows = wait_for(lambda: (lambda got: got if len(got) >= 400 else None)(fleet.wait_observations(400)),
                            what="400 observations")
            users = [r for r in rows if r["role"] == "baseline"]
            shadows = [r for r in rows if r["role"] == "shadow"]
            assert len(users) == 200 and not [r for r in rows if r["role"] == "canary"]
            assert len(shadows) == 200, {r["role"] for r in rows}
            assert {r["version"] for r in shadows} == {"v2"} and {r["stage"] for r in shadows} == {"shadow"}
            assert {paired_request_id(r["request_id"]) for r in shadows} == set(user_ids)
            errors = sum(r["status_code"] == 500 for r in shadows)
            assert 60 <= errors <= 140, errors  # ~50 %: the canary's answers, not the user's
            assert all(r["status_code"] == 200 for r in users)

            resp = ctl.rollback("chat", actor="test", reason="shadow failed")
            assert resp.all_acked and resp.model.mirror_ppm == 0, resp
            wait_for(lambda: shadow not in dynamic_clusters(fleet), what="the shadow cluster removed")
            assert mirror_clusters(fleet) == []
            before = lines(log2)
            for i in range(50):
                r = c.request("/v1/chat/completions", {"x-user-id": f"user-{i}", "content-type": "application/json"},
                              method="POST", body=PROMPT)
                assert r.status == 200 and r.version == "chat-v1", r
            time.sleep(0.5)
            assert lines(log2) == before  # no mirror after the rollback
    finally:
        for p in procs.values():
            p.stop()


# ----- the shadow stage of a rollout, driven by the controller

ROLLOUT = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 1
  alpha: 0.05
  shadow: {{mirror_percent: 100, max_rps: 1000, min_duration: {min_duration}, min_pairs: 200}}
  steps:
    - {{weight_percent: 10, min_duration: 1h, min_canary_samples: 40}}
  promotion: {{max_duration: 3h}}
  metrics:
    - {{name: error_rate, gating: true, allowed: {{relative: 0.5}}}}
    - {{name: output_tokens, gating: false, allowed: {{relative: 0.5}}}}
"""


class Users:
    """Sticky users sending chat requests through Envoy until stopped; counts who answered them."""

    def __init__(self, port: int, threads: int = 3, max_s: float = 90):
        import threading
        self.port, self.max_s = port, max_s
        self.stop = threading.Event()
        self.versions: dict[str, int] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i, threads), daemon=True) for i in range(threads)]

    def _run(self, i: int, n: int) -> None:
        c = Client(self.port)
        k = i
        deadline = time.monotonic() + self.max_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            r = c.request("/v1/chat/completions", {"x-user-id": f"user-{k % 500}", "content-type": "application/json"},
                          "POST", PROMPT)
            with self.lock:
                self.versions[r.version or "?"] = self.versions.get(r.version or "?", 0) + 1
            k += n
            time.sleep(0.004)
        c.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def rollout_status(fleet):
    r = fleet.cli("rollout", "status", "chat", "--json", check=True)
    return json.loads(r.stdout)["rollouts"][0]


@pytest.mark.parametrize("canary_errors, bad", [("0.2", True), ("0.04", False)],
                         ids=["errors-x5-rolled-back-in-shadow", "healthy-canary-to-its-first-step"])
def test_a_rollout_starts_in_shadow(tmp_path, canary_errors, bad):
    procs = {}
    procs["v1"], p1, log1 = start_upstream("chat-v1", tmp_path, error_rate=0.04)
    procs["v2"], p2, log2 = start_upstream("chat-v2", tmp_path, error_rate=float(canary_errors))
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}}]
    spec = tmp_path / "rollout.yaml"
    spec.write_text(ROLLOUT.format(min_duration="1h" if bad else "5s"))
    try:
        with Fleet(tmp_path, models, with_controller=True) as fleet, Users(fleet.ports["listener"]) as users:
            time.sleep(1.0)
            r = fleet.cli("rollout", "start", str(spec))
            assert r.returncode == 0, r.stderr + r.stdout
            final = wait_for(lambda: (lambda st: st if st["status"] != "pending" else None)(rollout_status(fleet)),
                             timeout=75, what="the shadow stage's outcome")
            weights = fleet.route_weights(0)
            mirrors = mirror_clusters(fleet)
            seen_during = dict(users.versions)
            shadows = [o for o in fleet.observations(model="chat") if o["role"] == "shadow"]
        canary_hits = lines(log2)
    finally:
        for p in procs.values():
            p.stop()
    ev = final["last_eval"] or {}
    print(f"shadow outcome {final['status']}: users answered {seen_during}, canary asked {canary_hits} times, "
          f"{ev.get('shadow')}, verdicts {[(v['metric'], v['verdict'], v.get('baseline'), v.get('canary')) for v in ev.get('verdicts', [])]}")
    if bad:
        assert ev["shadow"]["pairs"] > 0 and ev["shadow"]["action"] == "rollback", ev
        assert final["status"] == "rolled_back", final
        # not a single user-facing canary response: every user was answered by the baseline
        assert seen_during.get("chat-v2", 0) == 0 and seen_during.get("chat-v1", 0) > 200, seen_during
        assert canary_hits > 0  # the canary was asked (the mirror), its answers went nowhere but the gates
        assert weights["chat/key/0"][0] == ("chat.v2", 0) and mirrors == []
        err = {v["metric"]: v for v in ev["verdicts"]}["error_rate"]
        assert err["verdict"] == "fail", ev
        assert "no user saw the canary" in " ".join(ev["stage_decision"]["reasons"])
    else:
        assert final["status"] == "running" and final["stage"] == 0, final
        assert weights["chat/key/0"][0] == ("chat.v2", 1000)  # the first user-facing step: 10 %
        assert mirrors == []  # the mirror ends with the shadow stage
        assert len(shadows) >= 200  # min_pairs (and 5 s) in shadow before the first step
    assert len(shadows) > 0 and {o["version"] for o in shadows} == {"v2"}
