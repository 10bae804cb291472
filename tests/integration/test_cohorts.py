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


SPEC = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 1
  steps:
    - {weight_percent: 1, min_duration: 10m, min_canary_samples: 10}
    - {weight_percent: 5, min_duration: 10m}
  promotion: {max_duration: 1h}
  metrics:
    - {name: error_rate, gating: true, allowed: {absolute: 0.2}}
  cohorts:
    - {name: beta, header: {name: x-beta-tester, value: "true"}}
    - {name: staff, cookie: {name: internal, value: "1"}, from_step: 2}
"""


def test_rollout_sends_its_cohorts_which_never_count_as_the_gates_sample(tmp_path):
    from tests.integration.test_rollout_e2e import Traffic, chat_server, status

    v1, p1 = chat_server(tmp_path, "v1", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--seed", "2")
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}}]
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC)
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hello"}]}).encode()

    def chat(c: Client, user: str, extra: dict[str, str]) -> str | None:
        r = c.request("/v1/chat/completions", {"x-user-id": user, "content-type": "application/json", **extra},
                      "POST", body)
        return r.version

    try:
        with Fleet(tmp_path, models, n_envoys=2, with_controller=True) as fleet:
            r = fleet.cli("rollout", "start", str(spec))
            assert r.returncode == 0, r.stderr + r.stdout
            c = Client(fleet.ports["listener"])
            with Traffic(fleet.ports["listener"], users=400, threads=2, max_s=8):
                beta = [chat(c, f"beta-{i}", {"x-beta-tester": "true"}) for i in range(60)]
                # staff starts at step 2: at step 1 its cookie is nobody's ticket to the canary
                staff = [chat(c, f"staff-{i}", {"cookie": "internal=1"}) for i in range(60)]
                time.sleep(3)
            assert beta == ["v2"] * 60  # at 1 %: every beta tester, whatever their hash
            assert staff.count("v1") >= 55, staff
            routes = [n for n in fleet.route_weights(1)]  # the second Envoy has the same split routes
            assert "chat/key/0" in routes

            # the gates' canary sample is exactly the canary rows that are not a cohort's
            obs = fleet.wait_observations(1, timeout=5)
            deadline = time.monotonic() + 20
            while True:
                obs = fleet.observations()
                canary_rows = sum(1 for o in obs if o["role"] == "canary")
                v2_rows = sum(1 for o in obs if o["version"] == "v2")
                st = status(fleet)
                ev = st.get("last_eval") or {}
                if ev.get("n_canary") == canary_rows and st.get("cohorts") and st["cohorts"][0]["requests"] == 60:
                    break
                assert time.monotonic() < deadline, (ev.get("n_canary"), canary_rows, st.get("cohorts"))
                time.sleep(0.5)
            cohort_rows = [o for o in obs if o["cohort"]]
            assert len(cohort_rows) == 60 and {(o["cohort"], o["role"], o["version"]) for o in cohort_rows} == \
                {("beta", "other", "v2")}
            assert v2_rows == canary_rows + 60 and ev["n_canary"] < v2_rows
            beta_stats, staff_stats = st["cohorts"]
            assert (beta_stats["name"], beta_stats["requests"], beta_stats["canary"], beta_stats["active"]) == \
                ("beta", 60, 60, True)
            assert beta_stats["p95_ms"] is not None and beta_stats["error_rate"] is not None
            assert (staff_stats["name"], staff_stats["requests"], staff_stats["active"]) == ("staff", 0, False)
            assert (ev.get("cohorts") or [{}])[0].get("requests", 0) > 0  # the judgement's summary has them too
            text = fleet.cli("rollout", "status", "chat").stdout
            assert "cohort beta (header x-beta-tester=true, every stage): 60 requests (60 to the canary)" in text, text
            assert "cohort staff (cookie internal=1, from stage 2, not yet active): 0 requests" in text, text

            # the deployment log says which cohorts the stage sent
            from lockgate.controller.decide.rollouts import RolloutStore

            store = RolloutStore(tmp_path / "state" / "rollouts.db")
            started = [e for e in store.events(st["id"]) if e["kind"] == "started"]
            store.close()
            assert started[0]["detail"]["cohorts"] == ["beta (header x-beta-tester=true)"], started
            shown = fleet.cli("show", str(st["id"]), check=True).stdout
            assert "started stage 1 1% by controller: ACKed in" in shown and \
                "cohorts to the canary: beta (header x-beta-tester=true)" in shown, shown

            # abort: the revert takes the cohort back to the baseline on both Envoys
            r = fleet.cli("rollout", "abort", "chat")
            assert r.returncode == 0 and "reverted to v1 in" in r.stdout, r.stdout + r.stderr
            for i in range(2):
                assert not [n for n in cohort_routes(fleet, i) if "/cohort/" in n]
            assert [chat(c, f"beta-{i}", {"x-beta-tester": "true"}) for i in range(30)] == ["v1"] * 30
            c.close()
    finally:
        v1.stop()
        v2.stop()
