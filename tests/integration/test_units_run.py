"""The systemd units' commands make a working lockgate: each unit's ExecStart (deploy/systemd/, with the
venv's lockgate for /opt/lockgate and a test config for /etc/lockgate/lockgate.yaml) run as its own
process, each with only its own token in LOCKGATE_TOKEN as the units' EnvironmentFile gives it (no
auth.token_file), behind a real Envoy that `lockgate envoy` becomes. Traffic flows and is observed,
the Envoy is known by the unit's node id, a weight change by a person is ACKed and logged under their
name. As root, each process runs in its own mount namespace where the whole file system is read-only
but the test's directory — what ProtectSystem=strict with StateDirectory= leaves it. (No live systemd
here: PID 1 is not systemd on the development machine; `systemd-analyze verify` is in
tests/unit/test_deploy.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness import PY, REPO, Client, Proc, _env, dump_yaml, free_ports, requires_envoy
from tests.integration.test_rollout_e2e import chat_server
from tests.unit.test_deploy import COMMANDS, INSTALLED, SPECIFIERS, UNITS, expand, parse_unit, values

pytestmark = [requires_envoy, pytest.mark.envoy]

NODE = SPECIFIERS["%H"]  #: the host name the Envoy unit passes as its node id


def read_only_but(writable: Path) -> list[str]:
    """A prefix that runs a command with every file system read-only except ``writable`` (a private mount
    namespace, as systemd's ProtectSystem=strict + StateDirectory=); [] when that cannot be made here."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return []
    w = shlex.quote(str(writable))
    script = (f"mount --make-rprivate / && mount --bind {w} {w} && mount -o remount,bind,ro / && "
              f"! touch /.lockgate-ro-probe 2>/dev/null && exec \"$@\"")
    return ["unshare", "--mount", "sh", "-c", script, "sh"]


def unit_argv(unit: str, config: Path) -> list[str]:
    (exec_start,) = values(parse_unit(UNITS / unit), "Service", "ExecStart")
    argv = [expand(a) for a in shlex.split(exec_start)]
    assert argv[0] == INSTALLED + "lockgate" and argv[1:3] == ["-c", "/etc/lockgate/lockgate.yaml"]
    return read_only_but(config.parent) + [str(Path(sys.executable).parent / "lockgate"), "-c", str(config)] + argv[3:]


def test_the_units_commands_run_a_working_lockgate(tmp_path):
    assert set(COMMANDS) >= {"lockgate-xds.service", "lockgate-controller.service", "lockgate-extproc@.service",
                             "lockgate-envoy.service"}
    v1, p1 = chat_server(tmp_path, "v1", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--seed", "2")
    tokens = {role: hashlib.sha256(f"{role}-{os.getpid()}".encode()).hexdigest()
              for role in ("xds", "controller", "extproc", "envoy", "alice")}
    names = ("listener", "admin", "xds", "control", "extproc", "extproc_metrics", "controller", "http")
    ports = dict(zip(names, free_ports(len(names))))
    config = tmp_path / "lockgate.yaml"
    config.write_text(dump_yaml({
        "listener": {"address": "127.0.0.1", "port": ports["listener"]},
        "admin": {"address": "127.0.0.1", "port": ports["admin"]},
        "xds": {"port": ports["xds"]}, "control": {"port": ports["control"]},
        "extproc": {"port": ports["extproc"]}, "extproc_metrics": {"port": ports["extproc_metrics"]},
        "controller": {"address": f"127.0.0.1:{ports['controller']}", "http": f"127.0.0.1:{ports['http']}"},
        "state_dir": str(tmp_path / "state"),
        "envoy": {"concurrency": 1},
        "auth": {"tokens": [{"name": role, "sha256": hashlib.sha256(t.encode()).hexdigest()}
                            for role, t in tokens.items()]},
        "models": [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
                    "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}}],
    }))

    def env(role: str) -> dict[str, str]:
        e = _env()
        e.pop("LOCKGATE_TOKEN", None)
        e["LOCKGATE_TOKEN"] = tokens[role]  # what /etc/lockgate/<role>.env gives the unit
        return e

    procs: list[Proc] = []
    try:
        for unit, role in (("lockgate-xds.service", "xds"), ("lockgate-controller.service", "controller"),
                           ("lockgate-extproc@.service", "extproc")):
            procs.append(Proc(unit_argv(unit, config), tmp_path / f"{role}.log", env=env(role)))
        envoy = Proc(unit_argv("lockgate-envoy.service", config), tmp_path / "envoy.log", ready_line=None,
                     env=env("envoy"))
        procs.append(envoy)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert envoy.alive() and time.monotonic() < deadline, (tmp_path / "envoy.log").read_text()[-3000:]
            time.sleep(0.1)
        # `lockgate envoy` became Envoy: the unit's main process is Envoy itself (systemd signals it directly)
        assert Path(f"/proc/{envoy.proc.pid}/comm").read_text().strip() == "envoy"

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([PY, "-m", "lockgate", "-c", str(config), *args], capture_output=True, text=True,
                                  timeout=60, cwd=REPO, env=env("alice"))

        deadline = time.monotonic() + 20
        while True:  # the Envoy is known by the unit's node id and has ACKed lockgate's routes
            w = cli("weights", "--json")
            envoys = json.loads(w.stdout)["models"][0]["envoys"] if w.returncode == 0 else []
            if any(e["nodeId"] == NODE and e["connected"] and e.get("ackedVersion") for e in envoys):
                break
            assert time.monotonic() < deadline, (w.stdout, w.stderr)
            time.sleep(0.3)

        c = Client(ports["listener"])
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        for i in range(40):
            r = c.request("/v1/chat/completions", {"x-user-id": f"u{i}", "content-type": "application/json"}, "POST",
                          body)
            assert r.status == 200, r.body
        r = cli("set-weight", "chat", "v2", "50", "--reason", "units test")
        assert r.returncode == 0 and NODE in r.stdout, r.stdout + r.stderr
        versions = {c.request("/v1/chat/completions", {"x-user-id": f"w{i}", "content-type": "application/json"},
                              "POST", body).version for i in range(60)}
        c.close()
        assert versions == {"v1", "v2"}, versions

        # observed by the ext_proc (its token) and stored by the controller; /metrics needs a token too
        req = urllib.request.Request(f"http://127.0.0.1:{ports['http']}/metrics",
                                     headers={"authorization": f"Bearer {tokens['alice']}"})
        deadline = time.monotonic() + 20
        while True:
            with urllib.request.urlopen(req, timeout=5) as r:
                text = r.read().decode()
            stored = sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                         if ln.startswith("lockgate_controller_observations_stored_total{"))
            if stored >= 100:
                break
            assert time.monotonic() < deadline, stored
            time.sleep(0.3)
        # the weight change is logged under the person's token name, not the process that applied it
        from lockgate.config import load_config
        from lockgate.xds.store import WeightStore

        store = WeightStore(load_config(config).db_path)
        try:
            change = store.changes("chat")[0]
        finally:
            store.close()
        assert (change["to_bp"], change["actor"]) == (5000, "alice"), change
    finally:
        for p in reversed(procs):
            p.stop()
        v1.stop()
        v2.stop()
