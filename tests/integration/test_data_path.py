"""Data path through a real Envoy: sticky weighted routing driven by lockgate's xDS server.

Every test starts real processes on loopback (lockgate xds + extproc, Envoy, echo upstreams) and
stops them by PID.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
from scipy import stats

from tests.harness import Client, Fleet, requires_envoy, start_echo, versions_for_users

pytestmark = [requires_envoy, pytest.mark.envoy]

QA_TOKEN = "qa-secret-token-0123456789"


@pytest.fixture
def upstreams(tmp_path):
    procs = {}
    ports = {}
    for name in ("chat-v1", "chat-v2", "chat-v3", "cls-v1", "cls-v2"):
        p, port = start_echo(name, tmp_path, log=True)
        procs[name], ports[name] = p, port
    yield ports, procs
    for p in procs.values():
        p.stop()


def two_models(ports, keys=None):
    chat = {"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
            "versions": {"v1": {"endpoints": [f"127.0.0.1:{ports['chat-v1']}"]},
                         "v2": {"endpoints": [f"127.0.0.1:{ports['chat-v2']}"]},
                         "v3": {"endpoints": [f"127.0.0.1:{ports['chat-v3']}"]}}}
    cls = {"name": "cls", "match": {"path_prefix": "/", "header": {"name": "x-model", "value": "cls"}},
           "stable": "v1",
           "versions": {"v1": {"endpoints": [f"127.0.0.1:{ports['cls-v1']}"]},
                        "v2": {"endpoints": [f"127.0.0.1:{ports['cls-v2']}"]}}}
    if keys:
        chat["sticky_keys"] = keys
    return [chat, cls]


@pytest.fixture
def fleet(tmp_path, upstreams):
    ports, _ = upstreams
    f = Fleet(tmp_path, two_models(ports), extra={"qa_override": {"token": QA_TOKEN}})
    f.start()
    yield f
    f.stop()


def users(n, prefix="user"):
    return [f"{prefix}-{i}" for i in range(n)]


def test_sticky_split_2000_users_at_20_percent(fleet):
    out = fleet.set_weight("chat", "v2", 20)
    assert out["allAcked"] and out["model"]["weightBp"] == 2000
    us = users(2000)
    rounds = [versions_for_users(fleet.ports["listener"], us, "/v1/chat/completions") for _ in range(3)]
    for u in us:
        assert rounds[0][u] == rounds[1][u] == rounds[2][u], f"user {u} not sticky"
    canary = sum(1 for u in us if rounds[0][u] == "chat-v2")
    assert set(rounds[0].values()) == {"chat-v1", "chat-v2"}
    lo, hi = stats.binom.interval(0.999, 2000, 0.20)
    assert lo <= canary <= hi, f"canary users {canary} outside 99.9% interval [{lo}, {hi}]"


def test_monotone_ramp_and_back_to_zero(fleet):
    us = users(1500, "ramp")
    previous: set[str] = set()
    for pct in (1, 5, 20, 50):
        fleet.set_weight("chat", "v2", pct)
        served = versions_for_users(fleet.ports["listener"], us, "/v1/chat/x")
        on_canary = {u for u, v in served.items() if v == "chat-v2"}
        assert previous <= on_canary, f"at {pct}% {len(previous - on_canary)} users left the canary"
        lo, hi = stats.binom.interval(0.999, len(us), pct / 100)
        assert lo <= len(on_canary) <= hi, (pct, len(on_canary), lo, hi)
        previous = on_canary
    fleet.rollback("chat")
    served = versions_for_users(fleet.ports["listener"], us, "/v1/chat/x")
    assert set(served.values()) == {"chat-v1"}


def test_two_models_split_independently_and_canaries_are_independent(fleet):
    fleet.set_weight("chat", "v2", 20)
    fleet.set_weight("cls", "v2", 20)
    us = users(3000, "indep")
    chat = versions_for_users(fleet.ports["listener"], us, "/v1/chat/completions")
    cls = versions_for_users(fleet.ports["listener"], us, "/classify", extra_headers={"x-model": "cls"})
    assert set(chat.values()) == {"chat-v1", "chat-v2"} and set(cls.values()) == {"cls-v1", "cls-v2"}
    a = {u for u in us if chat[u] == "chat-v2"}
    b = {u for u in us if cls[u] == "cls-v2"}
    both = len(a & b)
    # Independent assignment: given a user is in canary A, P(in canary B) = 0.2.
    lo, hi = stats.binom.interval(0.999, len(a), 0.20)
    assert lo <= both <= hi, f"overlap {both} of {len(a)} not ≈20% (99.9% interval [{lo}, {hi}])"
    # Rolling back one model does not move the other.
    fleet.rollback("chat")
    cls_after = versions_for_users(fleet.ports["listener"], us[:500], "/classify", extra_headers={"x-model": "cls"})
    assert all(cls_after[u] == cls[u] for u in us[:500])


def test_rollback_under_traffic_no_canary_request_after_ack(tmp_path, upstreams):
    ports, _ = upstreams
    with Fleet(tmp_path, two_models(ports), n_envoys=2) as fleet:
        fleet.set_weight("chat", "v2", 50)
        stop = threading.Event()
        records: list[tuple[float, str | None, int]] = []
        lock = threading.Lock()

        def traffic(worker: int) -> None:
            c = Client(fleet.ports["listener"])
            i = 0
            while not stop.is_set():
                t0 = time.time()
                r = c.request("/v1/chat/completions", {"x-user-id": f"rb-{worker}-{i % 400}"})
                with lock:
                    records.append((t0, r.version, r.status))
                i += 1
            c.close()

        threads = [threading.Thread(target=traffic, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        r = fleet.cli("rollback", "chat", "--json")
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["allAcked"] and len(out["model"]["envoys"]) == 2
        ack_epoch = out["pushedAt"] + max(e["ackMs"] for e in out["model"]["envoys"]) / 1000
        assert out["elapsedMs"] < 1000
        for i in range(2):
            assert fleet.route_weights(i)["chat/key/0"][0] == ("chat.v2", 0)
        state = json.loads(fleet.cli("weights", "chat", "--json", check=True).stdout)["models"][0]
        assert all(e["acked"] and e["ackedWeightBp"] == 0 for e in state["envoys"]) and len(state["envoys"]) == 2
    assert len(records) > 200 and all(s == 200 for _, _, s in records)
    assert any(v == "chat-v2" and t < ack_epoch for t, v, _ in records), "canary saw no traffic before"
    late = [(t - ack_epoch, v) for t, v, _ in records if t > ack_epoch and v == "chat-v2"]
    assert not late, f"{len(late)} canary responses to requests sent after the rollback ACK: {late[:5]}"
    assert sum(1 for t, _, _ in records if t > ack_epoch) > 50


def test_extproc_killed_and_restarted_traffic_keeps_flowing_sticky(fleet):
    fleet.set_weight("chat", "v2", 30)
    us = users(300, "ep")
    baseline = versions_for_users(fleet.ports["listener"], us, "/v1/chat/completions")
    fleet.procs["extproc"].kill(signal.SIGKILL)
    down = versions_for_users(fleet.ports["listener"], us, "/v1/chat/completions")
    assert down == baseline, "assignment changed while ext_proc was down"
    fleet.start_extproc()
    time.sleep(0.5)
    up = versions_for_users(fleet.ports["listener"], us, "/v1/chat/completions")
    assert up == baseline
    assert set(baseline.values()) == {"chat-v1", "chat-v2"}


def test_xds_restart_keeps_live_weights(fleet):
    fleet.set_weight("chat", "v2", 12.34)
    before = fleet.route_weights(0)
    assert before["chat/key/0"] == [("chat.v2", 1234), ("chat.v1", 8766)]
    us = users(400, "xr")
    served_before = versions_for_users(fleet.ports["listener"], us, "/v1/chat/completions")
    fleet.procs["xds"].kill(signal.SIGKILL)
    # Envoy keeps serving with the last config while the control plane is gone.
    assert versions_for_users(fleet.ports["listener"], us, "/v1/chat/completions") == served_before
    fleet.start_xds()
    deadline = time.monotonic() + 15
    while fleet.stat(0, "control_plane.connected_state") != 1:
        assert time.monotonic() < deadline, "envoy did not reconnect"
        time.sleep(0.1)
    time.sleep(0.5)  # let the reconnect exchange finish
    assert fleet.route_weights(0) == before
    state = json.loads(fleet.cli("weights", "chat", "--json", check=True).stdout)["models"][0]
    assert state["weightBp"] == 1234 and state["canary"] == "v2"
    assert state["envoys"][0]["acked"] and state["envoys"][0]["ackedWeightBp"] == 1234
    assert versions_for_users(fleet.ports["listener"], us, "/v1/chat/completions") == served_before


def test_qa_override_needs_the_token_and_internal_headers_are_stripped(fleet):
    fleet.set_weight("chat", "v2", 0)
    c = fleet.client()
    r = c.request("/v1/chat/completions", {"x-user-id": "qa-1", "x-lockgate-version": "v3"})
    assert r.version == "chat-v1"  # no token: ignored
    r = c.request("/v1/chat/completions", {"x-user-id": "qa-1", "x-lockgate-version": "v3",
                                           "x-lockgate-qa-token": "wrong-token-0123456789"})
    assert r.version == "chat-v1"
    r = c.request("/v1/chat/completions", {"x-user-id": "qa-1", "x-lockgate-version": "v3",
                                           "x-lockgate-qa-token": QA_TOKEN})
    assert r.version == "chat-v3"
    seen = json.loads(r.body)["headers"]
    assert "x-lockgate-qa-token" not in seen and "x-lockgate-version" not in seen
    r = c.request("/v1/chat/completions", {"x-user-id": "qa-1", "x-lockgate-version": "v1",
                                           "x-lockgate-qa-token": "nope"})
    seen = json.loads(r.body)["headers"]
    assert "x-lockgate-qa-token" not in seen and "x-lockgate-version" not in seen
    c.close()


def test_cookie_and_client_ip_key_sources(tmp_path, upstreams):
    ports, _ = upstreams
    keys = [{"header": "x-user-id"}, {"cookie": "session"}, {"client_ip": {}}]
    with Fleet(tmp_path, two_models(ports, keys)) as fleet:
        fleet.set_weight("chat", "v2", 50)
        c = fleet.client()
        by_cookie = {}
        for i in range(400):
            sid = f"s{i}"
            got = {c.request("/v1/chat/q", {"cookie": f"theme=dark; session={sid}; lang=en"}).version
                   for _ in range(2)}
            got.add(c.request("/v1/chat/q", {"cookie": f"session={sid}"}).version)
            assert len(got) == 1, f"cookie session={sid} not sticky: {got}"
            by_cookie[sid] = got.pop()
        share = sum(v == "chat-v2" for v in by_cookie.values())
        lo, hi = stats.binom.interval(0.999, 400, 0.5)
        assert lo <= share <= hi
        # Client IP: all from 127.0.0.1 → one version, the same on every request.
        ip_versions = {c.request("/v1/chat/q").version for _ in range(30)}
        assert len(ip_versions) == 1
        # A client-sent x-forwarded-for does not pick the key: Envoy's appended address does.
        spoofed = {c.request("/v1/chat/q", {"x-forwarded-for": f"10.0.0.{i}"}).version for i in range(30)}
        assert spoofed == ip_versions
        c.close()


def test_cli_errors_change_nothing(fleet, tmp_path):
    fleet.set_weight("chat", "v2", 5)
    before = fleet.route_weights(0)
    for args, needle in (
        (("set-weight", "nosuch", "v2", "10"), "unknown model 'nosuch'"),
        (("set-weight", "chat", "v9", "10"), "has no version 'v9'"),
        (("set-weight", "chat", "v2", "101"), "between 0 and 100"),
        (("set-weight", "chat", "v2", "1.234"), "resolution is 0.01"),
        (("set-weight", "chat", "v3", "10"), "already has canary 'v2'"),
        (("set-weight", "chat", "v1", "10"), "is the stable version"),
        (("rollback", "nosuch"), "unknown model 'nosuch'"),
    ):
        r = fleet.cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
    assert fleet.route_weights(0) == before
    state = json.loads(fleet.cli("weights", "--json", check=True).stdout)["models"]
    assert {m["model"]: m["weightBp"] for m in state} == {"chat": 500, "cls": 0}
    r = fleet.cli("rollback", "chat")
    assert r.returncode == 0 and r.stdout.startswith("reverted chat to v1 on 1/1 Envoys in "), r.stdout
    r = fleet.cli("weights", "chat")
    assert "chat: stable v1, canary v2 at 0%" in r.stdout and "in sync" in r.stdout, r.stdout


def test_invalid_config_starts_nothing(tmp_path):
    import subprocess
    import sys

    from tests.harness import REPO, _env

    bad = tmp_path / "lockgate.yaml"
    bad.write_text(f"state_dir: {tmp_path / 'state'}\nmodels:\n  - name: chat\n    stable: v3\n"
                   "    versions: {v1: {endpoints: ['127.0.0.1:1']}}\n")
    for cmd in ("up", "xds", "extproc", "controller"):
        r = subprocess.run([sys.executable, "-m", "lockgate", "-c", str(bad), cmd], capture_output=True, text=True,
                           cwd=REPO, env=_env(), timeout=30)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert f"{bad}:4:13: models[0].stable: 'v3' is not one of the versions (v1)" in r.stderr, r.stderr
    assert not (tmp_path / "state").exists()  # nothing started, nothing written
