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
            assert resp.all_acked, resp
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
            assert resp.all_acked, resp
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
