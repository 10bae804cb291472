"""Faults end to end, with a rollout running under steady traffic through real Envoys.

For each lockgate part — ext_proc, xDS server, controller — killed (SIGKILL, then restarted) or frozen
(SIGSTOP, then SIGCONT), and for one of two Envoys killed and restarted:

* 0 non-2xx answers caused by lockgate (ext_proc fails open, the xDS server and the controller are not on
  the request path); the two Envoys share the listener port, so killing one drops the connections it
  held — the only requests allowed to go unanswered;
* no weight moved except by a decision (every Envoy still has the stage's 10 %, the rollout is still
  running at its stage: the controller re-took it after a restart);
* the deployment log holds nothing but the rollout's own events (no rollback, no drift);
* afterwards an abort reaches every Envoy (weight 0 ACKed by both) and is recorded.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections import Counter

import pytest

from tests.harness import Client, Fleet, requires_envoy
from tests.integration.test_rollout_e2e import SPEC, chat_server, status, wait_status

pytestmark = [requires_envoy, pytest.mark.envoy]

@contextlib.contextmanager
def chat_rollout(tmp_path, min_duration: str):
    """Two real chat servers (v1 stable, v2 canary) as one model, and a rollout spec for them whose stages
    last ``min_duration`` (so a test stays at stage 1); the servers are stopped afterwards."""
    v1, p1 = chat_server(tmp_path, "v1", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--seed", "2")
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}}]
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC.format(max_duration="1h").replace("min_duration: 2s", f"min_duration: {min_duration}"))
    try:
        yield models, spec
    finally:
        v1.stop()
        v2.stop()


FAULTS = ["extproc-kill", "extproc-stop", "xds-kill", "xds-stop", "controller-kill", "controller-stop",
          "envoy-kill", "envoy-stop"]


class CountingTraffic:
    """Sticky users through one Envoy, counting answers by status (0 = no answer at all)."""

    def __init__(self, port: int, users: int = 300, threads: int = 3):
        self.port, self.users = port, users
        self.stop = threading.Event()
        self.codes: Counter = Counter()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i, threads), daemon=True) for i in range(threads)]

    def _run(self, i: int, n: int) -> None:
        c = Client(self.port)
        body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
        k = i
        deadline = time.monotonic() + 150
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                code = c.request("/v1/chat/completions", {"x-user-id": f"user-{k % self.users}",
                                                          "content-type": "application/json"}, "POST", body).status
            except OSError:
                code = 0
                c.close()
                c = Client(self.port)
            with self._lock:
                self.codes[code] += 1
            k += n
            time.sleep(0.005)
        c.close()

    def snapshot(self) -> Counter:
        with self._lock:
            return Counter(self.codes)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def _restart(fleet: Fleet, name: str) -> None:
    if name == "xds":
        fleet.start_xds()
    elif name == "controller":
        fleet.start_controller()
    elif name == "extproc":
        fleet.start_extproc()
    elif name.startswith("envoy-"):
        fleet.start_envoy(int(name.split("-")[1]))


def _events(fleet: Fleet, rollout_id: int) -> list[str]:
    shown = json.loads(fleet.cli("show", str(rollout_id), "--json", check=True).stdout)
    events = shown["actions"]
    return [e["kind"] for e in events]


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_during_a_rollout_moves_nothing_and_fails_no_request(tmp_path, fault):
    part, how = fault.rsplit("-", 1)
    target = "envoy-1" if part == "envoy" else part
    with chat_rollout(tmp_path, "10m") as (models, spec):
        with Fleet(tmp_path, models, n_envoys=2, with_controller=True) as fleet, \
                CountingTraffic(fleet.ports["listener"]) as traffic:
            assert fleet.cli("rollout", "start", str(spec)).returncode == 0
            before = wait_status(fleet, ("running",), 30)
            assert before["status"] == "running" and before["stage"] == 0
            time.sleep(2)
            proc = fleet.procs[target]
            if how == "kill":
                proc.kill(signal.SIGKILL)
                time.sleep(3)
                _restart(fleet, target)
            else:
                proc.kill(signal.SIGSTOP)
                time.sleep(4)
                proc.kill(signal.SIGCONT)
            time.sleep(4)
            codes = traffic.snapshot()
            assert sum(codes.values()) > 200, codes
            # Every answer is a 200. Both Envoys listen on one port, so when one is *killed* the connections it
            # held die with it (the data plane itself, not lockgate): those, and only those, may have no answer.
            assert set(codes) - {0} == {200}, f"{fault}: answers other than 200: {codes}"
            assert codes[0] == 0 or fault == "envoy-kill", f"{fault}: requests without an answer: {codes}"
            # no weight moved: both Envoys (a restarted one got the current weights at once) at 10 %
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    if all(fleet.route_weights(i)["chat/key/0"][0] == ("chat.v2", 1000) for i in range(2)):
                        break
                except (OSError, KeyError):
                    pass
                time.sleep(0.5)
            assert all(fleet.route_weights(i)["chat/key/0"][0] == ("chat.v2", 1000) for i in range(2))
            after = wait_status(fleet, ("running",), 30)
            assert after["status"] == "running" and after["stage"] == 0 and after["id"] == before["id"], after
            kinds = _events(fleet, after["id"])
            assert not {"rolled_back", "aborted", "rolling_back", "weight_drift", "paused"} & set(kinds), kinds
            # a revert asked for now reaches every Envoy; it is recorded done only once every Envoy has it
            # (after an xDS restart an Envoy may not have reconnected yet: then the abort says so, exits 1,
            # and the controller completes it when that Envoy is back)
            r = fleet.cli("rollout", "abort", "chat")
            assert r.returncode == 0 or (r.returncode == 1 and "revert NOT complete" in r.stderr), (r.stdout, r.stderr)
            final = wait_status(fleet, ("aborted",), 60)
            assert final["status"] == "aborted", final
            assert all(fleet.route_weights(i)["chat/key/0"][0] == ("chat.v2", 0) for i in range(2))


def test_full_disk_on_the_state_directory(tmp_path):
    """The state directory (every lockgate store) on a tmpfs filled to the last byte mid-rollout: traffic
    keeps flowing, an abort asked for then reaches every Envoy at once (served before it is saved) but
    is not called done; once space is back the controller records it, without being asked again."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs (a real full disk)")
    state = tmp_path / "state"
    state.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(state)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    from tests.unit.test_revert import fill

    try:
        with chat_rollout(tmp_path, "10m") as (models, spec):
            with Fleet(tmp_path, models, n_envoys=2, with_controller=True) as fleet, \
                    CountingTraffic(fleet.ports["listener"]) as traffic:
                assert fleet.cli("rollout", "start", str(spec)).returncode == 0
                assert wait_status(fleet, ("running",), 30)["status"] == "running"
                import sqlite3

                for db in state.glob("*.db"):  # no WAL pages left to reuse: every write needs new space
                    with contextlib.closing(sqlite3.connect(str(db), timeout=5)) as conn:
                        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                filler = fill(state)
                time.sleep(3)
                r = fleet.cli("rollout", "abort", "chat")
                assert r.returncode == 1 and "revert NOT complete" in r.stderr, (r.stdout, r.stderr)
                # served before it could be saved: both Envoys already at 0
                assert all(fleet.route_weights(i)["chat/key/0"][0] == ("chat.v2", 0) for i in range(2))
                assert status(fleet)["status"] in ("running", "rolling_back")  # not called done
                time.sleep(2)
                filler.unlink()
                final = wait_status(fleet, ("aborted",), 60)
                assert final["status"] == "aborted", final
                assert all(fleet.route_weights(i)["chat/key/0"][0] == ("chat.v2", 0) for i in range(2))
                codes = traffic.snapshot()
                assert set(codes) == {200}, codes
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
