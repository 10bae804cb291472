"""Many Envoys on many hosts: each host a network namespace made by the test (``tests/netns.py``).

The control plane — ``lockgate xds`` and ``lockgate controller`` — runs in the root namespace and
listens on the bridge address (off loopback, so ``auth.tokens``: every host presents its own token).
Each host runs what a GPU host runs: its model servers v1 and v2 on its own ``127.0.0.1`` (the same
ports on every host, as the shared model config says), ``lockgate extproc`` and a real Envoy 1.40 with
the host's name as node id, from its own ``lockgate.yaml``. Then, with real processes only:

* a rollout's weight (10 %) is ACKed by every host's Envoy and is what each Envoy routes by;
* requests through every host reach the one controller: each observation names its host (the
  ext_proc's ``source``), and the rollout's analysis counts the requests of all hosts;
* an Envoy that joins late gets the current weight with its first routes;
* ``rollout abort`` reverts every host;
* an ADS client that NACKs the routes (``tests/fake_ads.py``: a real Envoy cannot be made to reject
  routes its fleet accepts) and an Envoy killed on its host both show in ``lockgate weights`` and
  raise ``trouble`` alerts, and do not hold the others: the rollback is ACKed by every other host
  and names the two; the killed host's Envoy, restarted, gets weight 0 at once and the alert resolves;
* a host cut off by a network partition (its link down; its ADS connection still looks alive) does not
  hold a weight change for the others, keeps serving the weights it had, shows as behind in
  ``lockgate weights`` and raises a trouble alert; with the link back it catches up and the alert resolves;
* a real Envoy that NACKs its listener (another process holds the port on its host) holds no push and
  is alerted on as out of sync.

Where namespaces cannot be made (not root, no ``ip``) the hosts are loopback ports and the test says so
(printed, and in the skip reason of the host-isolation checks).
"""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request

import pytest

from tests.harness import requires_envoy
from tests.integration.test_alerts_registry import Receiver
from tests.netns import HostFleet, Hosts

pytestmark = [requires_envoy, pytest.mark.envoy]

SPEC = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 1
  alpha: 0.05
  steps:
    - {weight_percent: 10, min_duration: 10m, min_canary_samples: 40}
    - {weight_percent: 50, min_duration: 10m, min_canary_samples: 80}
  promotion: {max_duration: 1h}
  metrics:
    - {name: error_rate, gating: true, allowed: {absolute: 0.15}}
"""
PER_HOST = 60  # requests sent through each host's Envoy


def wait_until(what: str, pred, timeout: float = 30.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def weights_json(fleet: HostFleet) -> dict:
    r = fleet.cli("weights", "chat", "--json")
    assert r.returncode == 0, r.stderr
    [model] = json.loads(r.stdout)["models"]
    return model


def envoys(model: dict) -> dict[str, dict]:
    return {e["nodeId"]: e for e in model["envoys"]}


def get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}


def controller_json(fleet: HostFleet, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{fleet.ports['controller_http']}{path}",
                                 headers={"authorization": "Bearer " + (fleet.cp_dir / "lockgate.token").read_text()
                                          .strip()})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def trouble(receiver: Receiver, node: str, status: str = "firing", text: str = "") -> list[dict]:
    return [x for x in receiver.got.get("/hook", []) if x.get("kind") == "trouble" and x.get("component") == "envoy"
            and f"Envoy {node} " in x["title"] and x["status"] == status and text in x["title"]]


def test_many_hosts_weights_rollback_late_join_nack_disconnect_and_one_analysis(tmp_path, receiver, capsys):
    import urllib.error  # noqa: F401  (controller_json)

    hosts = Hosts()
    with capsys.disabled():
        print(f"\n[test_hosts] {hosts.note}")
    fleet = None
    try:
        h1, h2, h3, late, nacker = (hosts.add(n) for n in ("gpu-1", "gpu-2", "gpu-3", "gpu-late", "old-envoy"))
        fleet = HostFleet(tmp_path, hosts, controller=True, cp_extra={
            "alerts": [{"type": "webhook", "url": receiver.base + "/hook", "name": "hook", "on": ["trouble"],
                        "retry": {"max_attempts": 100, "initial_backoff_s": 0.3, "max_backoff_s": 1.0}}]})
        for h in (h1, h2, h3, late, nacker):
            fleet.allow(h.name)
        fleet.start_control_plane()
        for h in (h1, h2, h3):
            fleet.start_host(h)
        for h in (h1, h2, h3):
            wait_until(f"routes on {h.name}", lambda: fleet.canary_weight(h) is not None)

        # --- a rollout's weight change: ACKed by every host, and what each Envoy routes by
        spec = tmp_path / "chat-v2.yaml"
        spec.write_text(SPEC)
        r = fleet.cli("rollout", "start", str(spec))
        assert r.returncode == 0, r.stdout + r.stderr
        model = weights_json(fleet)
        assert model["canary"] == "v2" and model["weightBp"] == 1000
        assert {n: (e["connected"], e["acked"], e["ackedWeightBp"]) for n, e in envoys(model).items()} == {
            n: (True, True, 1000) for n in ("gpu-1", "gpu-2", "gpu-3")}
        for h in (h1, h2, h3):
            assert fleet.canary_weight(h) == 1000, h.name

        # --- traffic through every host reaches the one controller and its one analysis
        served: dict[str, dict[str, str]] = {}
        for h in (h1, h2, h3):
            for k in range(PER_HOST):
                status, headers = get(fleet.url(h), {"x-user-id": f"{h.name}-user-{k}"})
                assert status == 200
                served[headers["x-lockgate-request-id"]] = {"host": h.name, "version": headers["x-model-version"]}
        assert {v["version"] for v in served.values()} == {"v1", "v2"}
        for rid, want in list(served.items())[::PER_HOST // 4]:
            status, body = wait_until(f"observation {rid}",
                                      lambda: (lambda sb: sb if sb[0] == 200 else None)(
                                          controller_json(fleet, f"/v1/observations/{rid}")), 30)
            [obs] = body["observations"]
            assert obs["version"] == want["version"]
            if hosts.isolated:  # each host has its own hostname: the ext_proc's source names it
                assert obs["source"].startswith(want["host"] + ":"), (obs["source"], want)

        def analysed():
            st, body = controller_json(fleet, "/v1/rollouts?model=chat")
            ev = (body.get("rollouts") or [{}])[0].get("last_eval") or {} if st == 200 else {}
            return ev if ev.get("n_baseline", 0) + ev.get("n_canary", 0) >= 3 * PER_HOST else None
        ev = wait_until("the rollout's analysis to count every host's requests", analysed, 40, 0.5)
        assert ev["n_baseline"] + ev["n_canary"] == 3 * PER_HOST
        assert ev["n_canary"] == sum(1 for v in served.values() if v["version"] == "v2")

        # --- an Envoy that joins late gets the current weight with its first routes
        fleet.start_host(late)
        first = wait_until("routes on the late Envoy", lambda: fleet.canary_weight(late))
        assert first == 1000
        model = weights_json(fleet)
        assert envoys(model)["gpu-late"]["acked"] and envoys(model)["gpu-late"]["ackedWeightBp"] == 1000
        # Envoy's own record: the routes version it runs is the current one
        assert f'rds.lockgate.version_text: "{model["xdsVersion"]}"' in fleet.admin(late, "/stats?filter=rds")[1]

        # --- rollout abort reverts every host
        r = fleet.cli("rollout", "abort", "chat")
        assert r.returncode == 0, r.stdout + r.stderr
        model = weights_json(fleet)
        assert model["weightBp"] == 0
        assert all(e["acked"] and e["connected"] for e in model["envoys"]) and len(model["envoys"]) == 4
        for h in (h1, h2, h3, late):
            assert fleet.canary_weight(h) == 0, h.name

        # --- trouble: a NACKing ADS client and a killed Envoy, while the others take a weight and a rollback
        r = fleet.cli("set-weight", "chat", "v2", "5", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        fleet.start_fake_nacker(nacker)
        model = wait_until("the NACK in lockgate weights",
                           lambda: (lambda m: m if envoys(m).get("old-envoy", {}).get("nackVersion") else None)(
                               weights_json(fleet)))
        e = envoys(model)["old-envoy"]
        assert e["connected"] and not e["acked"] and "cannot load the route configuration" in e["nackError"]
        assert e["nackVersion"] == model["xdsVersion"]
        text = fleet.cli("weights", "chat").stdout
        assert "envoy old-envoy: connected" in text and "NOT in sync" in text and "last NACK of version" in text
        fleet.procs["envoy-gpu-2"].kill(signal.SIGKILL)
        model = wait_until("gpu-2 disconnected in lockgate weights",
                           lambda: (lambda m: m if not envoys(m)["gpu-2"]["connected"] else None)(weights_json(fleet)))
        assert envoys(model)["gpu-2"]["ackedWeightBp"] == 500
        text = fleet.cli("weights", "chat").stdout
        assert "envoy gpu-2: DISCONNECTED" in text
        assert "  5 Envoys: 3 in sync, 1 NACKed, 1 DISCONNECTED" in text
        nack_alert = wait_until("a trouble alert for the NACK", lambda: trouble(receiver, "old-envoy", text="NACKed"),
                                30, 0.2)
        gone_alert = wait_until("a trouble alert for gpu-2", lambda: trouble(receiver, "gpu-2", text="disconnected"),
                                30, 0.2)
        assert "cannot load the route configuration" in nack_alert[0]["title"]
        assert "disconnected from the xDS server" in gone_alert[0]["title"]

        r = fleet.cli("rollback", "chat", "--json", "--timeout", "20")
        assert r.returncode == 1, r.stdout + r.stderr  # not every Envoy has it: says so, non-zero
        resp = json.loads(r.stdout)
        by_node = envoys(resp["model"])
        for name in ("gpu-1", "gpu-3", "gpu-late"):
            assert by_node[name]["acked"] and by_node[name]["ackMs"] > 0, by_node[name]
        assert sorted(resp["notAcked"]) == ["gpu-2 (disconnected, last ACKed v2 at 5%)", "old-envoy (nacked)"]
        assert resp["elapsedMs"] < 20_000  # answered once the others ACKed: nobody waited for the timeout
        for h in (h1, h3, late):
            assert fleet.canary_weight(h) == 0, h.name

        # --- the killed Envoy comes back: weight 0 at once, in sync, its alert resolves
        fleet.start_envoy(h2)
        wait_until("routes on the restarted gpu-2", lambda: fleet.canary_weight(h2) is not None)
        assert fleet.canary_weight(h2) == 0
        model = wait_until("gpu-2 in sync", lambda: (lambda m: m if envoys(m)["gpu-2"]["acked"] else None)(
            weights_json(fleet)))
        assert envoys(model)["gpu-2"]["connected"] and envoys(model)["gpu-2"]["ackedWeightBp"] == 0
        wait_until("gpu-2's alert resolved", lambda: trouble(receiver, "gpu-2", status="resolved"), 30, 0.2)
    finally:
        if fleet is not None:
            fleet.stop()
        hosts.close()


def test_a_partitioned_host_and_a_real_envoy_that_nacks_its_listener(tmp_path, receiver, capsys):
    """A network partition (the host's link down; its processes run on, its ADS connection looks alive to
    the xDS server): a weight change is ACKed by the other hosts without waiting for it, it keeps serving
    the weights it had, `lockgate weights` shows it behind, a trouble alert names it; once the link is back
    it takes the current weights and the alert resolves. Beside it, a real Envoy on a host where another
    process holds the listener port NACKs the listener ("cannot bind … Address already in use"), so it
    never asks for routes: it holds no push, shows NOT in sync, and is alerted on as out of sync."""
    hosts = Hosts()
    with capsys.disabled():
        print(f"\n[test_hosts] {hosts.note}")
    if not hosts.isolated:
        hosts.close()
        pytest.skip(f"a partition needs network namespaces ({hosts.note})")
    fleet = None
    try:
        h1, h2, h3, busy = (hosts.add(n) for n in ("gpu-1", "gpu-2", "gpu-3", "busy"))
        fleet = HostFleet(tmp_path, hosts, controller=True, cp_extra={
            "alerts": [{"type": "webhook", "url": receiver.base + "/hook", "name": "hook", "on": ["trouble"],
                        "retry": {"max_attempts": 100, "initial_backoff_s": 0.3, "max_backoff_s": 1.0}}]})
        for h in (h1, h2, h3, busy):
            fleet.allow(h.name)
        fleet.start_control_plane()
        for h in (h1, h2, h3):
            fleet.start_host(h)
        for h in (h1, h2, h3):
            wait_until(f"routes on {h.name}", lambda: fleet.canary_weight(h) is not None)
        r = fleet.cli("set-weight", "chat", "v2", "10", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        # another service holds the listener port on host "busy": its (real) Envoy NACKs the listener
        busy.popen([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                    f"s.bind(('0.0.0.0', {fleet.ports['listener']})); s.listen(); print('ready', flush=True); "
                    "time.sleep(3600)"], tmp_path / "squatter.log")
        fleet.start_envoy(busy)
        wait_until("busy's listener NACK", lambda: "lds.update_rejected: 1" in fleet.admin(busy, "/stats?filter=lds")[1])
        assert fleet.canary_weight(busy) is None  # no listener, so no routes
        e = envoys(weights_json(fleet))["busy"]
        assert e["connected"] and not e["acked"] and not e["ackedVersion"]

        h3.link(up=False)
        r = fleet.cli("set-weight", "chat", "v2", "30", "--json", "--timeout", "10")
        assert r.returncode == 1, r.stdout + r.stderr
        resp = json.loads(r.stdout)
        assert sorted(x.partition(" ")[0] for x in resp["notAcked"]) == ["busy", "gpu-3"], resp["notAcked"]
        assert "gpu-3 (timeout)" in resp["notAcked"]
        assert all(envoys(resp["model"])[n]["acked"] for n in ("gpu-1", "gpu-2"))
        assert resp["elapsedMs"] < 10_000  # the others' ACKs were not held for the partitioned one
        assert fleet.canary_weight(h1) == fleet.canary_weight(h2) == 3000
        # the partitioned host serves on, with the weights it had
        assert fleet.canary_weight(h3) == 1000
        status, headers = h3.call(get, f"http://127.0.0.1:{fleet.ports['listener']}/v1/chat", {"x-user-id": "u-1"})
        assert status == 200 and headers["x-model-version"] in ("v1", "v2")
        e = envoys(weights_json(fleet))["gpu-3"]
        assert e["connected"] and not e["acked"] and e["ackedWeightBp"] == 1000
        alert = wait_until("a trouble alert for the partitioned gpu-3",
                           lambda: trouble(receiver, "gpu-3", text="has not ACKed routes"), 40, 0.2)
        assert "canary v2 at 10%" in alert[0]["title"]
        alert = wait_until("a trouble alert for busy", lambda: trouble(receiver, "busy", text="has not ACKed routes"),
                           30, 0.2)
        assert "it ACKed nothing: no routes" in alert[0]["title"]

        h3.link(up=True)
        wait_until("gpu-3 to catch up", lambda: fleet.canary_weight(h3) == 3000, 60, 0.2)
        wait_until("gpu-3 in sync", lambda: envoys(weights_json(fleet))["gpu-3"]["acked"], 30, 0.2)
        wait_until("gpu-3's alert resolved", lambda: trouble(receiver, "gpu-3", status="resolved"), 30, 0.2)
    finally:
        if fleet is not None:
            fleet.stop()
        hosts.close()
