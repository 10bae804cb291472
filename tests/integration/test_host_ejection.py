"""Per-host ejection through real Envoys (docs/rollout-spec.md, "Per-host gating and ejection"): a canary
version with three endpoints, one of them answering 500 often; the control API's EjectHost takes it out of
rotation through EDS, every Envoy ACKs, it gets no more requests while the other two share them; the
weight store keeps the ejection (a restarted xDS server serves it), a later weight change keeps it, the
last endpoint is never taken out, and a rollback restores every endpoint. Observations carry the host.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import grpc
import pytest

from lockgate.control_client import ControlClient
from tests.harness import PY, Client, Fleet, Proc, requires_envoy

pytestmark = [requires_envoy, pytest.mark.envoy]


def echo(name: str, tmp, error_rate: float = 0.0) -> tuple[Proc, int]:
    argv = [PY, "-m", "tests.echo_upstream", "--port", "0", "--version", name]
    if error_rate:
        argv += ["--error-rate", str(error_rate)]
    p = Proc(argv, tmp / f"echo-{name}.log")
    return p, int(p.ready_text.split()[1])


def eds_hosts(fleet: Fleet, i: int, cluster: str) -> list[str]:
    """The endpoints Envoy ``i`` holds for ``cluster`` (admin /clusters)."""
    out = []
    for line in fleet.admin(i, "/clusters").splitlines():
        parts = line.split("::")
        if len(parts) >= 4 and parts[0] == cluster and parts[2] == "cx_active":
            out.append(parts[1])
    return sorted(out)


def served_by(fleet: Fleet, n: int, users: int = 400) -> Counter:
    """Send ``n`` requests over ``users`` sticky users; which canary host (x-model-version) answered."""
    c = Client(fleet.ports["listener"])
    got: Counter = Counter()
    for i in range(n):
        r = c.request("/v1/chat/completions", {"x-user-id": f"u{i % users}"})
        got[r.version] += 1
    return got


def test_a_bad_host_is_ejected_on_every_envoy_and_restored_by_a_rollback(tmp_path):
    procs, ports = {}, {}
    procs["v1"], ports["v1"] = echo("v1", tmp_path)
    for h, rate in (("a", 0.5), ("b", 0.0), ("c", 0.0)):
        procs[h], ports[h] = echo(f"v2-{h}", tmp_path, rate)
    ep = {h: f"127.0.0.1:{ports[h]}" for h in "abc"}
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{ports['v1']}"]},
                            "v2": {"endpoints": [ep["a"], ep["b"], ep["c"]]}}}]
    fleet = Fleet(tmp_path, models, n_envoys=2, with_controller=True)
    cluster = "chat.v2"
    try:
        with fleet:
            ctl = ControlClient(f"127.0.0.1:{fleet.ports['control']}")
            resp = ctl.set_weight("chat", "v2", 10_000, actor="test", reason="all to v2")
            assert resp.all_acked and len(resp.model.envoys) == 2, resp
            before = served_by(fleet, 300)
            assert set(before) == {"v2-a", "v2-b", "v2-c"} and min(before.values()) >= 60, before

            # observations carry the host that served them (Envoy's upstream.address)
            obs = fleet.wait_observations(300, timeout=30)
            hosts = Counter(o["upstream_host"] for o in obs if o["version"] == "v2")
            assert set(hosts) == set(ep.values()), hosts
            bad = [o for o in obs if o["upstream_host"] == ep["a"]]
            assert sum(o["status_code"] >= 500 for o in bad) > 0.3 * len(bad)
            assert not any(o["status_code"] >= 500 for o in obs if o["upstream_host"] != ep["a"])

            # unknown endpoint, not the canary's, and a version that is not the canary: clear errors
            with pytest.raises(grpc.RpcError) as err:
                ctl.eject_host("chat", "v2", "127.0.0.1:1", actor="test", reason="x")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and ep["a"] in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                ctl.eject_host("chat", "v1", f"127.0.0.1:{ports['v1']}", actor="test", reason="x")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

            resp = ctl.eject_host("chat", "v2", ep["a"], actor="test", reason="host a: errors x5")
            assert resp.all_acked and len(resp.model.envoys) == 2, resp
            assert list(resp.model.ejected) == [ep["a"]] and resp.persisted
            for i in range(2):  # every Envoy's EDS is without it
                assert eds_hosts(fleet, i, cluster) == sorted([ep["b"], ep["c"]]), eds_hosts(fleet, i, cluster)
            after = served_by(fleet, 200)
            assert set(after) == {"v2-b", "v2-c"}, after

            # a weight change keeps the ejection; a restarted xDS server serves it from the store
            assert list(ctl.set_weight("chat", "v2", 9_000, actor="test", reason="w").model.ejected) == [ep["a"]]
            fleet.procs["xds"].kill()
            fleet.start_xds()
            ctl = ControlClient(f"127.0.0.1:{fleet.ports['control']}")
            assert list(ctl.get_weights("chat").models[0].ejected) == [ep["a"]]
            deadline = time.monotonic() + 15
            while len(ctl.get_weights("chat").models[0].envoys) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert eds_hosts(fleet, 0, cluster) == sorted([ep["b"], ep["c"]])

            # the last endpoint in rotation is never taken out
            ctl.eject_host("chat", "v2", ep["b"], actor="test", reason="b too")
            with pytest.raises(grpc.RpcError) as err:
                ctl.eject_host("chat", "v2", ep["c"], actor="test", reason="and c")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "last endpoint" in err.value.details()
            resp = ctl.eject_host("chat", "v2", ep["b"], actor="test", reason="b is fine", restore=True)
            assert resp.all_acked and list(resp.model.ejected) == [ep["a"]]

            # a rollback restores every endpoint of the version (it gets no traffic; the next rollout starts whole)
            resp = ctl.rollback("chat", actor="test", reason="done")
            assert resp.all_acked and list(resp.model.ejected) == []
            for i in range(2):
                assert eds_hosts(fleet, i, cluster) == sorted(ep.values())
    finally:
        for p in procs.values():
            p.stop()


SPEC = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 1
  alpha: 0.05
  steps:
    - {weight_percent: 20, min_duration: 2s, min_canary_samples: 60}
    - {weight_percent: 50, min_duration: 2s, min_canary_samples: 300}
  promotion: {max_duration: 10m}
  metrics:
    - {name: error_rate, gating: true, allowed: {absolute: 0.15}}
"""


def run_rollout(tmp_path, rates: tuple[str, str, str]):
    """chat v1 at 2 % errors, v2 on three hosts at ``rates``; a controller-driven rollout of v2 with 2 Envoys.
    Returns (final status, the rollout's log, live weights, each Envoy's v2 endpoints, observations, endpoints)."""
    from tests.integration.test_rollout_e2e import Traffic, chat_server, wait_status

    servers, ports = [], {}
    p, ports["v1"] = chat_server(tmp_path, "v1", "--error-rate", "0.02", "--seed", "1")
    servers.append(p)
    for h, rate, seed in zip("abc", rates, ("2", "3", "4")):
        p, ports[h] = chat_server(tmp_path, f"v2{h}", "--error-rate", rate, "--seed", seed)
        servers.append(p)
    ep = {h: f"127.0.0.1:{ports[h]}" for h in "abc"}
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{ports['v1']}"]},
                            "v2": {"endpoints": [ep["a"], ep["b"], ep["c"]]}}}]
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC)
    try:
        with Fleet(tmp_path, models, n_envoys=2, with_controller=True) as fleet, Traffic(fleet.ports["listener"]):
            time.sleep(1.0)
            r = fleet.cli("rollout", "start", str(spec))
            assert r.returncode == 0, r.stderr + r.stdout
            final = wait_status(fleet, ("promoted", "rolled_back", "inconclusive", "aborted"), 90)
            live = ControlClient(f"127.0.0.1:{fleet.ports['control']}").get_weights("chat").models[0]
            eds = [eds_hosts(fleet, i, "chat.v2") for i in range(2)]
            obs = fleet.observations(model="chat")
            final["text"] = fleet.cli("rollout", "status", "chat").stdout
    finally:
        for p in servers:
            p.stop()
    from lockgate.controller.decide.rollouts import RolloutStore

    store = RolloutStore(tmp_path / "state" / "rollouts.db")
    try:
        events = store.events(final["id"])
    finally:
        store.close()
    return final, events, live, eds, obs, ep


def test_the_controller_ejects_a_bad_canary_host_and_promotes_the_version(tmp_path):
    """One of three canary hosts answers 500 to 70 % of requests (the version as a whole: ~25 %, beyond the
    baseline's 2 % + 15 points): the controller ejects that host (every Envoy ACKed, logged with its
    numbers), judges the version without it, and promotes it."""
    final, events, live, eds, obs, ep = run_rollout(tmp_path, ("0.7", "0.02", "0.02"))
    assert final["status"] == "promoted", [e["kind"] for e in events]
    ejected = [e for e in events if e["kind"] == "host_ejected"]
    assert len(ejected) == 1, [e["kind"] for e in events]
    d = ejected[0]["detail"]
    assert d["host"] == ep["a"] and sorted(d["peers"]) == sorted([ep["b"], ep["c"]])
    assert d["host_error_rate"] > 0.4 and d["peers_error_rate"] < 0.1 and d["host_requests"] > 0, d
    assert d["not_acked"] == [] and "shown worse than its peers" in d["reasons"][0]
    assert [e["detail"]["host"] for e in final["hosts"] if e["kind"] == "host_ejected"] == [ep["a"]]  # status
    assert f"host {ep['a']} EJECTED: errors" in final["text"], final["text"]
    assert f"hosts out of rotation: {ep['a']}" in final["text"], final["text"]
    # still out after the promotion, on every Envoy
    assert list(live.ejected) == [ep["a"]] and live.weight_bp == 10_000
    assert eds == [sorted([ep["b"], ep["c"]])] * 2, eds
    # no request reached it once every Envoy had ACKed (a few in flight at that moment may finish)
    after = [o for o in obs if o["version"] == "v2" and o["ts"] > ejected[0]["ts"] + 1.0]
    assert after and not any(o["upstream_host"] == ep["a"] for o in after)
    # the version's last verdict left the ejected host's rows out: its error rate is the healthy hosts'
    err = {v["metric"]: v for v in final["last_eval"]["verdicts"]}["error_rate"]
    assert err["verdict"] == "pass" and err["canary"] < 0.1, err
    assert final["last_eval"]["hosts"]["ejected"] == [ep["a"]]


def test_healthy_canary_hosts_are_judged_and_none_is_ejected(tmp_path):
    final, events, live, eds, obs, ep = run_rollout(tmp_path, ("0.02", "0.02", "0.02"))
    assert final["status"] == "promoted", [e["kind"] for e in events]
    assert not [e for e in events if e["kind"].startswith("host_")], [e["kind"] for e in events]
    hosts = final["last_eval"]["hosts"]
    assert hosts["ejected"] == [] and sorted(h["host"] for h in hosts["hosts"]) == sorted(ep.values())
    assert all(h["verdict"] != "fail" and h["host_requests"] > 0 for h in hosts["hosts"]), hosts
    assert list(live.ejected) == [] and eds == [sorted(ep.values())] * 2
    assert "EJECTED" not in final["text"] and "hosts out" not in final["text"]
