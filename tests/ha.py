"""A highly available lockgate for tests and benchmarks: two xDS servers and two controllers on one
database (a shared SQLite state directory, or PostgreSQL), one ext_proc, real Envoys whose bootstrap
lists both xDS servers, all on loopback, stopped by PID.

Process names: ``xds-a``, ``xds-b``, ``controller-a``, ``controller-b``, ``extproc``, ``envoy-0`` …
``config("a")`` / ``config("b")`` are the two hosts' lockgate.yaml (same fleet, each listening on its
own ports); the CLI can be pointed at either.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness import PY, Proc, dump_yaml, free_ports

SIDES = ("a", "b")


class HaFleet:
    def __init__(self, tmp: Path, models: list[dict[str, Any]], database: str | None = None, n_envoys: int = 2,
                 other_host_b: bool = False):
        """``other_host_b``: controller-b runs in its own UTS namespace with another host name (as on a
        second machine: its lease owner is not checkable from controller-a's host, so a takeover waits
        for the lease to run out); needs root and ``unshare``."""
        self.tmp, self.n_envoys, self.other_host_b = tmp, n_envoys, other_host_b
        names = ["listener", "extproc", "extproc_metrics"] + [f"{k}-{s}" for s in SIDES for k in
                                                               ("xds", "control", "controller", "http", "sampler")]
        ports = free_ports(len(names) + n_envoys)
        self.ports = dict(zip(names, ports))
        self.admin_ports = ports[len(names):]
        self.procs: dict[str, Proc] = {}
        self.paths: dict[str, Path] = {}
        for side in SIDES:
            cfg = {
                "node_id": "envoy-0",
                "listener": {"address": "127.0.0.1", "port": self.ports["listener"]},
                "admin": {"address": "127.0.0.1", "port": self.admin_ports[0]},
                "xds": {"port": self.ports[f"xds-{side}"]},
                "control": {"port": self.ports[f"control-{side}"]},
                "extproc": {"port": self.ports["extproc"]},
                "extproc_metrics": {"port": self.ports["extproc_metrics"]},
                "extproc_processes": 1,
                "envoy": {"concurrency": 1},
                "controller": {"address": f"127.0.0.1:{self.ports[f'controller-{side}']}",
                               "http": f"127.0.0.1:{self.ports[f'http-{side}']}",
                               "sampler": f"127.0.0.1:{self.ports[f'sampler-{side}']}"},
                "xds_servers": [{"xds": f"127.0.0.1:{self.ports[f'xds-{s}']}",
                                 "control": f"127.0.0.1:{self.ports[f'control-{s}']}"} for s in SIDES],
                "controllers": [f"127.0.0.1:{self.ports[f'controller-{s}']}" for s in SIDES],
                "state_dir": str(tmp / "state"),
                "models": models,
            }
            if database:
                cfg["database"] = database
            path = tmp / f"lockgate-{side}.yaml"
            path.write_text(dump_yaml(cfg))
            self.paths[side] = path

    # ----- lifecycle
    def start(self) -> "HaFleet":
        try:
            for side in SIDES:
                self.start_xds(side)
            self.start_proc("extproc", "a", "extproc")
            for i in range(self.n_envoys):
                self.start_envoy(i)
            self.wait_routes()
            for side in SIDES:
                self.start_controller(side)
        except BaseException:
            self.stop()
            raise
        return self

    def start_proc(self, name: str, side: str, command: str, prefix: list[str] | None = None) -> Proc:
        argv = [*(prefix or []), PY, "-m", "lockgate", "-c", str(self.paths[side]), command]
        self.procs[name] = Proc(argv, self.tmp / f"{name}.log")
        return self.procs[name]

    def start_xds(self, side: str) -> Proc:
        return self.start_proc(f"xds-{side}", side, "xds")

    def start_controller(self, side: str) -> Proc:
        prefix = None
        if side == "b" and self.other_host_b:
            prefix = [shutil.which("unshare") or "unshare", "--uts", "sh", "-c",
                      'hostname lockgate-test-host-b && exec "$@"', "sh"]
        return self.start_proc(f"controller-{side}", side, "controller", prefix)

    def start_envoy(self, i: int) -> None:
        from lockgate.config import Address, load_config
        from lockgate.envoy_proc import envoy_command, render_bootstrap

        config = load_config(self.paths["a"])
        bootstrap = self.tmp / f"envoy-{i}.yaml"
        bootstrap.write_text(render_bootstrap(config, node_id=f"envoy-{i}",
                                              admin=Address("127.0.0.1", self.admin_ports[i])))
        self.procs[f"envoy-{i}"] = Proc(envoy_command(bootstrap), self.tmp / f"envoy-{i}.log", ready_line=None)
        deadline = time.monotonic() + 30
        while not self._admin_ok(i, "/ready"):
            if time.monotonic() > deadline or not self.procs[f"envoy-{i}"].alive():
                raise RuntimeError("envoy not ready:\n" + (self.tmp / f"envoy-{i}.log").read_text()[-3000:])
            time.sleep(0.05)

    def stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: not n.startswith("envoy")):
            self.procs[name].stop()

    def __enter__(self) -> "HaFleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- Envoy
    def _admin_ok(self, i: int, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_ports[i]}{path}", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def admin(self, i: int, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_ports[i]}{path}", timeout=5) as r:
            return r.read().decode()

    def route_weights(self, i: int) -> dict[str, list[tuple[str, int]]]:
        dump = json.loads(self.admin(i, "/config_dump?resource=dynamic_route_configs"))
        out = {}
        for cfg in dump.get("configs", []):
            for vh in cfg["route_config"].get("virtual_hosts", []):
                for route in vh.get("routes", []):
                    wc = route.get("route", {}).get("weighted_clusters")
                    if wc:
                        out[route["name"].partition("?")[0]] = [(c["name"], int(c.get("weight", 0)))
                                                                for c in wc["clusters"]]
        return out

    def canary_weight(self, i: int, route: str = "chat/key/0", cluster: str = "chat.v2") -> int | None:
        """envoy-i's live weight of ``cluster`` on ``route`` (None when it cannot be read)."""
        try:
            return dict(self.route_weights(i)[route]).get(cluster)
        except (OSError, KeyError):
            return None

    def stat(self, i: int, name: str) -> int | None:
        for line in self.admin(i, f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return None

    def xds_server_of(self, i: int) -> str | None:
        """Which xDS server envoy-i's ADS stream is on (``a``/``b``), from Envoy's per-host stats of the
        ``lockgate_xds`` cluster (the host with an open connection), or None."""
        try:
            text = self.admin(i, "/clusters")
        except OSError:
            return None
        for side in SIDES:
            key = f"lockgate_xds::127.0.0.1:{self.ports[f'xds-{side}']}::cx_active::"
            for line in text.splitlines():
                if line.startswith(key) and int(line[len(key):]) > 0:
                    return side
        return None

    def wait_routes(self, timeout: float = 30) -> None:
        import socket

        deadline = time.monotonic() + timeout
        for i in range(self.n_envoys):
            while True:
                try:
                    if self.route_weights(i):
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("routes never reached envoy-%d" % i)
                time.sleep(0.05)
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.ports["listener"]), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # ----- CLI and state
    def cli(self, side: str, *args: str, check: bool = False):
        import subprocess

        from tests.harness import REPO, _env

        r = subprocess.run([PY, "-m", "lockgate", "-c", str(self.paths[side]), *args], capture_output=True, text=True,
                           env=_env(), cwd=REPO, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"lockgate {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def status(self, side: str, model: str = "chat") -> dict:
        r = self.cli(side, "rollout", "status", model, "--json", check=True)
        return json.loads(r.stdout)["rollouts"][0]

    def rollout_store(self):
        from lockgate.config import load_config
        from lockgate.controller.decide.rollouts import RolloutStore

        return RolloutStore(load_config(self.paths["a"]).store("rollouts.db"))

    def events(self, rollout_id: int) -> list[dict]:
        store = self.rollout_store()
        try:
            return store.events(rollout_id)
        finally:
            store.close()

    def lease(self, model: str = "chat") -> tuple[str, float] | None:
        store = self.rollout_store()
        try:
            return store.lease_owner(model)
        finally:
            store.close()


def can_unshare_uts() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None
