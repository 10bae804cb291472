"""Cohorts through a real Envoy (docs/rollout-spec.md, "Cohorts"): a named group (a header or a cookie
value) goes to the canary whatever the weight and the sticky hash; its requests are labelled with the
cohort and are never part of the sample the gates compare; a rollback sends them back to the baseline
on every Envoy; a client cannot put itself in a cohort by sending lockgate's own cohort header.
"""

from __future__ import annotations

import json
import time

import pytest

from lockgate.control_client import ControlClient
from lockgate.routing import COHORT_HEADER, Cohort
from tests.harness import Client, Fleet, Proc, PY, requires_envoy, start_echo, versions_for_users

pytestmark = [requires_envoy, pytest.mark.envoy]

BETA = Cohort("beta", "header", "x-beta-tester", "true")
STAFF = Cohort("staff", "cookie", "internal", "1")


def echo_fleet(tmp_path, n_envoys=1):
    procs, ports = {}, {}
    for v in ("v1", "v2"):
        procs[v], ports[v] = start_echo(f"chat-{v}", tmp_path)
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {v: {"endpoints": [f"127.0.0.1:{ports[v]}"]} for v in ("v1", "v2")}}]
    return procs, Fleet(tmp_path, models, n_envoys=n_envoys, with_controller=True)


def ask(c: Client, user: str, extra: dict[str, str] | None = None) -> tuple[str | None, dict, str]:
    """(version that answered, the headers the model received, lockgate's request id)."""
    r = c.request("/v1/chat/completions", {"x-user-id": user, **(extra or {})})
    assert r.status == 200, r
    return r.version, json.loads(r.body)["headers"], r.headers["x-lockgate-request-id"]


def cohort_routes(fleet, i=0) -> list[str]:
    dump = json.loads(fleet.admin(i, "/config_dump?resource=dynamic_route_configs"))
    return [route["name"].partition("?")[0] for cfg in dump.get("configs", [])
            for vh in cfg["route_config"].get("virtual_hosts", []) for route in vh.get("routes", [])]


def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_cohorts_route_label_roll_back_and_survive_a_restart(tmp_path):
    procs, fleet = echo_fleet(tmp_path, n_envoys=2)
    try:
        with fleet:
            ctl = ControlClient(f"127.0.0.1:{fleet.ports['control']}")
            resp = ctl.set_weight("chat", "v2", 1, actor="test", reason="cohorts", cohorts=[BETA, STAFF])
            assert resp.all_acked and len(resp.model.envoys) == 2, resp
            assert [c.name for c in resp.model.cohorts] == ["beta", "staff"]
            for i in range(2):  # first match wins: QA (none here), then the cohorts, then the split
                names = cohort_routes(fleet, i)
                assert names[:2] == ["chat/cohort/beta", "chat/cohort/staff"], names
                assert names[2].startswith("chat/key/"), names

            users = [f"user-{i}" for i in range(300)]
            plain = versions_for_users(fleet.ports["listener"], users, "/v1/chat/completions")
            assert sum(v == "chat-v1" for v in plain.values()) >= 295  # 0.01 %: the split sends (almost) nobody
            beta = versions_for_users(fleet.ports["listener"], users, "/v1/chat/completions")  # warm: same answer
            assert beta == plain
            c = Client(fleet.ports["listener"])
            ids = {"beta": [], "staff": [], "forged": [], "plain": []}
            for u in users[:100]:
                v, seen, rid = ask(c, u, {"x-beta-tester": "true"})
                assert v == "chat-v2" and seen.get(COHORT_HEADER) == "beta", (u, v, seen)
                ids["beta"].append(rid)
                # the cookie among others, in any position; a value that only starts with "1" is not it
                v, seen, rid = ask(c, u, {"cookie": f"session={u}; internal=1; theme=dark"})
                assert v == "chat-v2" and seen.get(COHORT_HEADER) == "staff", (u, v, seen)
                ids["staff"].append(rid)
                v, seen, _ = ask(c, u, {"cookie": "internal=10"})
                assert v == plain[u] and COHORT_HEADER not in seen
                v, _, _ = ask(c, u, {"x-beta-tester": "TRUE"})  # exact value only
                assert v == plain[u]
                # a client naming a cohort in lockgate's own header: routed as everyone, the header removed
                v, seen, rid = ask(c, u, {COHORT_HEADER: "beta"})
                assert v == plain[u] and COHORT_HEADER not in seen, (u, v, seen)
                ids["forged"].append(rid)
            # a client-sent cohort header on a cohort route is overwritten with the route's cohort
            v, seen, _ = ask(c, "u-x", {"x-beta-tester": "true", COHORT_HEADER: "staff"})
            assert v == "chat-v2" and seen[COHORT_HEADER] == "beta"

            obs = {o["request_id"]: o for o in fleet.wait_observations(300 * 2 + 501, timeout=30)}
            for rid in ids["beta"]:
                o = obs[rid]
                assert (o["cohort"], o["route"], o["role"], o["version"]) == ("beta", "cohort", "other", "v2"), o
            for rid in ids["staff"]:
                assert (obs[rid]["cohort"], obs[rid]["role"]) == ("staff", "other"), obs[rid]
            for rid in ids["forged"]:
                o = obs[rid]
                assert o["cohort"] is None and o["route"] == "sticky" and o["role"] in ("baseline", "canary"), o
            # the gates' arms never hold a cohort row
            arms = [o for o in obs.values() if o["role"] in ("baseline", "canary")]
            assert arms and not any(o["cohort"] for o in arms)

            # the weight store keeps the cohorts: a restarted xDS server serves them
            fleet.procs["xds"].kill()
            fleet.start_xds()
            got = ControlClient(f"127.0.0.1:{fleet.ports['control']}").get_weights("chat").models[0]
            assert [c.name for c in got.cohorts] == ["beta", "staff"] and got.weight_bp == 1
            assert ask(c, "user-1", {"x-beta-tester": "true"})[0] == "chat-v2"

            # a rollback sends every cohort user back to the baseline, on every Envoy (all ACKed)
            ctl = ControlClient(f"127.0.0.1:{fleet.ports['control']}")
            wait_for(lambda: len(ctl.get_weights("chat").models[0].envoys) == 2, what="both Envoys reconnected")
            rb = ctl.rollback("chat", actor="test", reason="cohort test rollback")
            assert rb.all_acked and rb.persisted and len(rb.model.envoys) == 2, rb
            assert list(rb.model.cohorts) == []
            for i in range(2):
                assert not [n for n in cohort_routes(fleet, i) if "/cohort/" in n]
            for u in users[:50]:
                assert ask(c, u, {"x-beta-tester": "true"})[0] == "chat-v1"
                assert ask(c, u, {"cookie": "internal=1"})[0] == "chat-v1"
            c.close()
    finally:
        for p in procs.values():
            p.stop()


def test_control_api_refuses_bad_cohorts(tmp_path):
    procs, fleet = echo_fleet(tmp_path)
    import grpc

    from lockgate.proto.v1 import control_pb2, control_pb2_grpc
    try:
        with fleet:
            stub = control_pb2_grpc.WeightControlStub(grpc.insecure_channel(f"127.0.0.1:{fleet.ports['control']}"))
            for bad, why in ([control_pb2.Cohort(name="x", kind="header", key="x-lockgate-cohort", value="1")],
                             "reserved"), \
                            ([control_pb2.Cohort(name="x", kind="query", key="a", value="1")], "header or cookie"), \
                            ([control_pb2.Cohort(name="x", kind="header", key="a", value="1"),
                              control_pb2.Cohort(name="x", kind="cookie", key="b", value="1")], "unique"):
                with pytest.raises(grpc.RpcError) as e:
                    stub.SetWeight(control_pb2.SetWeightRequest(model="chat", version="v2", weight_bp=100,
                                                                 actor="t", cohorts=bad), timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details(), \
                    e.value.details()
            # nothing was served
            assert not [n for n in cohort_routes(fleet) if "/cohort/" in n]
    finally:
        for p in procs.values():
            p.stop()
