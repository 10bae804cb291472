"""Separate "hosts" for tests and benchmarks: Linux network namespaces made (and removed) by the test.

``Hosts`` makes one bridge in the root namespace (the control-plane "host": lockgate's xDS server and
controller run there, as does the test itself) at ``10.77.<n>.1/24`` and, per :meth:`Hosts.add`, a
network namespace ``lgt-<pid>-<name>`` joined to the bridge by a veth pair at ``10.77.<n>.<10+i>``, with
its own loopback. Processes started in a host (:meth:`Host.popen`) run under ``ip netns exec`` and a new
UTS namespace whose hostname is the host's name (so an ext_proc's ``source``, ``hostname:pid``, names
its host). Each host has its own port space: two hosts can run model servers on the same
``127.0.0.1:PORT``, which is how a sidecar Envoy reaches its GPU host's model server.

Everything is torn down by :meth:`Hosts.close` — also on a failing test (use it as a context manager or
a fixture): its processes are stopped by PID, then the namespaces and the bridge it made are deleted.
Names carry this process's PID, and the subnet ``<n>`` is one no interface uses yet (picked under a file
lock), so parallel runs do not collide.

Where namespaces cannot be made (not root, no ``ip``, no veth/bridge support) ``Hosts(fallback=True)``
gives *loopback hosts* instead: every host is 127.0.0.1, processes run directly, and hosts share the
port space (so model servers are shared, and Envoys share the listener port through SO_REUSEPORT).
``Hosts.isolated`` says which, and ``Hosts.note`` says why, for the test output.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.harness import Proc, _env

CLONE_NEWNET = 0x40000000
_LOCK = Path("/tmp/lgt-netns.lock")
_libc = None


def _setns(path: str) -> None:
    """Move the *calling thread* into the network namespace at ``path`` (sockets it makes stay there)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def why_no_namespaces() -> str | None:
    """None when this process can make network namespaces with veth pairs and a bridge; else why not.
    ``LOCKGATE_TEST_NO_NETNS=1`` asks for loopback hosts (to run the fallback on purpose)."""
    if os.environ.get("LOCKGATE_TEST_NO_NETNS"):
        return "LOCKGATE_TEST_NO_NETNS is set"
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command (apt-get install iproute2 util-linux)"
    probe = f"lgt-{os.getpid()}-probe"
    link = f"lgp{os.getpid() % 10**8}"
    try:
        _ip("netns", "add", probe)
        try:
            _ip("link", "add", link, "type", "veth", "peer", "name", link + "x", "netns", probe)
            _ip("link", "del", link, check=False)
        finally:
            _ip("netns", "del", probe, check=False)
    except OSError as exc:
        return f"cannot make a network namespace with a veth pair: {exc}"
    return None


@dataclass
class Host:
    """One host: a network namespace (or, in fallback mode, loopback) with its own processes."""

    hosts: "Hosts"
    name: str
    index: int
    ip: str                      #: address the other hosts and the test reach it at
    ns: str | None = None        #: namespace name (None: a loopback host)
    veth: str | None = None      #: its veth pair's end in the root namespace, on the bridge
    procs: list[Proc] = field(default_factory=list)
    _pool: ThreadPoolExecutor | None = None

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` as run inside this host: its network namespace, its own hostname."""
        if self.ns is None:
            return list(argv)
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name, *argv]

    def popen(self, argv: list[str], log_path: Path, ready_line: str | None = "ready", env=None,
              cwd=None) -> Proc:
        """Start ``argv`` in this host (PID = the program's own: ``ip netns exec``, ``unshare`` and
        ``sh -c exec`` all exec); stopped by :meth:`Hosts.close` if not before."""
        p = Proc(self.argv(argv), log_path, ready_line=ready_line, env=env or _env(), cwd=cwd)
        self.procs.append(p)
        return p

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run ``fn`` on a thread inside this host's network namespace (sockets it opens are the host's)."""
        if self.ns is None:
            return fn(*args, **kwargs)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"ns-{self.name}",
                                            initializer=_setns, initargs=(f"/run/netns/{self.ns}",))
        return self._pool.submit(fn, *args, **kwargs).result()

    def http_get(self, url: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET ``url`` from inside this host (e.g. its Envoy's admin on 127.0.0.1)."""
        def get():
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode(errors="replace")
        return self.call(get)

    def link(self, up: bool) -> None:
        """Cut (or restore) this host's network link to the others: a partition; its processes keep running."""
        if self.ns is None:
            raise RuntimeError("a loopback host cannot be partitioned")
        _ip("-n", self.ns, "link", "set", "eth0", "up" if up else "down")

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass
        self.procs.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class Hosts:
    """A set of hosts (see the module docstring). ``fallback``: give loopback hosts when namespaces
    cannot be made (``note`` says why); otherwise raise."""

    def __init__(self, fallback: bool = True):
        self.hosts: list[Host] = []
        self.tag = f"lgt-{os.getpid()}"
        self.bridge: str | None = None
        self.subnet: int | None = None
        why = why_no_namespaces()
        if why is not None:
            if not fallback:
                raise OSError(why)
            self.isolated = False
            self.cp_ip = "127.0.0.1"
            self.note = f"loopback hosts, not network namespaces: {why}"
            return
        self.isolated = True
        _remove_stale()
        self._make_bridge()
        self.cp_ip = f"10.77.{self.subnet}.1"
        self.note = (f"network namespaces {self.tag}-* on bridge {self.bridge} (10.77.{self.subnet}.0/24; "
                     f"control plane {self.cp_ip})")

    # ----- set-up -----
    def _make_bridge(self) -> None:
        _LOCK.touch(exist_ok=True)
        with open(_LOCK) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = set(int(m) for m in re.findall(r"inet 10\.77\.(\d+)\.", _ip("-4", "-o", "addr").stdout))
            free = [n for n in range(1, 255) if n not in used]
            if not free:
                raise OSError("no free 10.77.x.0/24 subnet")
            self.subnet = free[os.getpid() % len(free)]
            self.bridge = f"lgb{os.getpid() % 10**8}"
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"10.77.{self.subnet}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")

    def add(self, name: str) -> Host:
        """A new host named ``name`` (1-20 characters of letters, digits and '-')."""
        if not re.fullmatch(r"[A-Za-z0-9-]{1,20}", name) or any(h.name == name for h in self.hosts):
            raise ValueError(f"bad or duplicate host name {name!r}")
        i = len(self.hosts)
        if not self.isolated:
            host = Host(self, name, i, "127.0.0.1")
            self.hosts.append(host)
            return host
        ns = f"{self.tag}-{name}"
        veth = f"lgv{os.getpid() % 10**7}-{i}"[:15]
        ip = f"10.77.{self.subnet}.{10 + i}"
        _ip("netns", "add", ns)
        host = Host(self, name, i, ip, ns, veth)
        self.hosts.append(host)  # from here on, close() removes it
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return host

    # ----- tear-down -----
    def close(self) -> None:
        """Stop every process started in a host (by PID), then delete the namespaces and the bridge."""
        for host in reversed(self.hosts):
            host.stop()
        if self.isolated:
            for host in self.hosts:
                if host.ns is None:
                    continue
                # a process that outlived its stop (it should not) would keep the namespace alive: end it by PID
                pids = _ip("netns", "pids", host.ns, check=False).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ValueError, ProcessLookupError):
                        pass
                _ip("link", "del", host.veth, check=False)  # the pair goes at once (not when the kernel
                _ip("netns", "del", host.ns, check=False)    # gets round to destroying the namespace)
            if self.bridge:
                _ip("link", "del", self.bridge, check=False)
                self.bridge = None
        self.hosts.clear()

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _remove_stale() -> None:
    """Namespaces and bridges of runs whose process is gone (killed before its clean-up), when nothing
    runs in them any more: a namespace someone's process still lives in is left alone."""
    for ns in leftovers():
        if not _ip("netns", "pids", ns, check=False).stdout.split():
            _ip("netns", "del", ns, check=False)
    for m in re.finditer(r"^\d+: (lgb(\d+))[:@]", _ip("-o", "link", "show", "type", "bridge", check=False).stdout,
                         re.M):
        if not Path(f"/proc/{m.group(2)}").exists():
            _ip("link", "del", m.group(1), check=False)


def leftovers() -> list[str]:
    """Namespaces named by a run of this module whose process is gone (for a manual ``ip netns del``)."""
    out = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(r"(lgt-(\d+)-\S+)", line)
        if m and not Path(f"/proc/{m.group(2)}").exists():
            out.append(m.group(1))
    return out




# ------------------------------------------------------------------------------------------------
# A lockgate fleet over hosts: the control plane in the root namespace, a sidecar pair on each host
# ------------------------------------------------------------------------------------------------
OWN_TOKEN = "lockgate-control-plane-token-7c1e"


def host_token(name: str) -> str:
    return f"host-token-{name}-3b9d0f"


class HostFleet:
    """lockgate on many hosts, started as a user runs it (``lockgate xds``, ``lockgate controller``, and on
    each host ``lockgate extproc --index i`` and ``lockgate envoy --node-id <host>``, as the systemd units do).

    The control plane (xDS server, control API, optional controller) runs in the root namespace with
    ``cp.yaml``; the xDS server and the controller's observations API listen on :attr:`Hosts.cp_ip`
    (off loopback, so ``auth.tokens``: one token per host, each host's processes present their own).
    Each host gets its own ``<host>/lockgate.yaml`` — its own ``node_id`` (the host's name), state and
    token — and, with namespaces, its own model servers ``v1``/``v2`` on the same
    ``127.0.0.1`` ports (the shared model config's endpoints). The listener (from LDS) is
    ``0.0.0.0:<listener>`` on every host (loopback hosts share it through SO_REUSEPORT)."""

    def __init__(self, tmp: Path, hosts: Hosts, *, versions=("v1", "v2"), controller: bool = False,
                 cp_extra: dict | None = None, extproc: bool = True):
        from tests.harness import dump_yaml

        self.tmp = tmp
        self.hosts = hosts
        self.controller = controller
        self.extproc = extproc
        self.versions = versions
        self.procs: dict[str, Proc] = {}
        names = ["listener", "xds", "control", "cp_extproc", "cp_extproc_metrics", "controller", "controller_http",
                 "sampler", *(f"model_{v}" for v in versions)]
        self._used: set[int] = set()
        self.ports = dict(zip(names, self._free(len(names))))
        self.admin_ports: dict[str, int] = {}
        self.host_configs: dict[str, Path] = {}
        self.node_of: dict[str, Host] = {}
        cp = hosts.cp_ip
        self.models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": versions[0],
                        "versions": {v: {"endpoints": [f"127.0.0.1:{self.ports['model_' + v]}"]} for v in versions}}]
        self.cp_dir = tmp / "cp"
        self.cp_dir.mkdir(parents=True, exist_ok=True)
        self._token_file(self.cp_dir / "lockgate.token", OWN_TOKEN)
        self.cp_config = {
            "node_id": "control-plane",
            "listener": {"address": "0.0.0.0" if hosts.isolated else "127.0.0.1", "port": self.ports["listener"]},
            "admin": {"address": "127.0.0.1", "port": self._free(1)[0]},
            "xds": {"address": cp, "port": self.ports["xds"]},
            "control": {"address": "127.0.0.1", "port": self.ports["control"]},
            "extproc": {"address": "127.0.0.1", "port": self.ports["cp_extproc"]},
            "extproc_metrics": {"address": "127.0.0.1", "port": self.ports["cp_extproc_metrics"]},
            "controller": {"address": f"{cp}:{self.ports['controller']}",
                           "http": f"127.0.0.1:{self.ports['controller_http']}",
                           "sampler": f"127.0.0.1:{self.ports['sampler']}"},
            "state_dir": str(self.cp_dir / "state"),
            "models": self.models,
            "auth": {"tokens": [{"name": "lockgate", "sha256": _sha(OWN_TOKEN)}],
                     "token_file": str(self.cp_dir / "lockgate.token")},
            **(cp_extra or {}),
        }
        self._dump = dump_yaml
        self.cp_path = self.cp_dir / "lockgate.yaml"
        self._write_cp()

    def _free(self, n: int) -> list[int]:
        """``n`` free ports none of which this fleet handed out before (a port freed by the probe may be
        handed out again by the kernel; two of the fleet's addresses must never share one)."""
        from tests.harness import free_ports

        while True:
            ports = free_ports(n)
            if not self._used.intersection(ports):
                self._used.update(ports)
                return ports

    @staticmethod
    def _token_file(path: Path, token: str) -> Path:
        path.write_text(token + "\n")
        os.chmod(path, 0o600)
        return path

    def _write_cp(self) -> None:
        self.cp_path.write_text(self._dump(self.cp_config))

    # ----- the control plane -----
    def start_control_plane(self) -> None:
        from tests.harness import PY

        self.procs["xds"] = Proc([PY, "-m", "lockgate", "-c", str(self.cp_path), "xds"], self.tmp / "xds.log")
        if self.controller:
            self.procs["controller"] = Proc([PY, "-m", "lockgate", "-c", str(self.cp_path), "controller"],
                                            self.tmp / "controller.log")

    def allow(self, name: str) -> None:
        """Give host ``name`` a token the control plane accepts (before the control plane starts)."""
        tokens = self.cp_config["auth"]["tokens"]
        if not any(t["name"] == name for t in tokens):
            tokens.append({"name": name, "sha256": _sha(host_token(name))})
            self._write_cp()

    # ----- a host's sidecar pair -----
    def host_config(self, host: Host, envoy: dict | None = None) -> Path:
        """Host ``host``'s lockgate.yaml: the fleet's, with its node id, state and token. With namespaces its
        admin, ext_proc and metrics ports are the defaults (each host has its own ports, like real hosts);
        loopback hosts get free ports each and one ext_proc process (ports ``extproc.port + i`` of several
        hosts could clash). ``envoy``: the config's ``envoy:`` section (default: sized to the host)."""
        d = self.tmp / host.name
        d.mkdir(parents=True, exist_ok=True)
        admin, ep, epm = (9901, 18080, 18090) if self.hosts.isolated else self._free(3)
        self.admin_ports[host.name] = admin
        cfg = dict(self.cp_config)
        cfg.update({
            "node_id": host.name,
            "admin": {"address": "127.0.0.1", "port": admin},
            "extproc": {"address": "127.0.0.1", "port": ep},
            "extproc_metrics": {"address": "127.0.0.1", "port": epm},
            "state_dir": str(d / "state"),
            "auth": {"tokens": [{"name": host.name, "sha256": _sha(host_token(host.name))}],
                     "token_file": str(self._token_file(d / "host.token", host_token(host.name)))},
        })
        if not self.hosts.isolated:
            cfg["extproc_processes"] = 1
        if envoy is not None:
            cfg["envoy"] = envoy
        cfg.pop("alerts", None)
        path = d / "lockgate.yaml"
        path.write_text(self._dump(cfg))
        self.host_configs[host.name] = path
        return path

    def start_models(self, host: Host) -> None:
        """The host's model servers (with namespaces; loopback hosts share the first host's)."""
        from tests.harness import PY

        if not self.hosts.isolated and any(k.startswith("model-") for k in self.procs):
            return
        for v in self.versions:
            self.procs[f"model-{v}-{host.name}"] = host.popen(
                [PY, "-m", "tests.echo_upstream", "--port", str(self.ports["model_" + v]), "--version", v],
                self.tmp / f"model-{v}-{host.name}.log")

    def start_host(self, host: Host, envoy: bool = True) -> None:
        """Models, ext_proc and Envoy on ``host`` (its node id is its name); returns once Envoy is ready."""
        from tests.harness import PY

        path = self.host_configs.get(host.name) or self.host_config(host)
        self.node_of[host.name] = host
        self.start_models(host)
        if self.extproc:
            from lockgate.config import load_config

            for i in range(load_config(path).extproc_processes):  # every process the host's Envoy is given
                self.procs[f"extproc-{host.name}-{i}"] = host.popen(
                    [PY, "-m", "lockgate", "-c", str(path), "extproc", "--index", str(i)],
                    self.tmp / f"extproc-{host.name}-{i}.log")
        if envoy:
            self.start_envoy(host)

    def start_envoy(self, host: Host, timeout: float = 60) -> Proc:
        """``lockgate envoy --node-id <host>`` on the host (it writes the bootstrap and execs Envoy, as the
        systemd unit runs it); returns once Envoy's admin says ready."""
        import time

        from tests.harness import PY

        path = self.host_configs.get(host.name) or self.host_config(host)
        p = host.popen([PY, "-m", "lockgate", "-c", str(path), "envoy", "--node-id", host.name],
                       self.tmp / f"envoy-{host.name}.log", ready_line=None)
        self.procs[f"envoy-{host.name}"] = p
        deadline = time.monotonic() + timeout
        while self.admin(host, "/ready")[0] != 200:
            if time.monotonic() > deadline or not p.alive():
                raise RuntimeError(f"envoy on {host.name} not ready:\n"
                                   + (self.tmp / f"envoy-{host.name}.log").read_text(errors="replace")[-3000:])
            time.sleep(0.05)
        return p

    def envoy_argv(self, host: Host) -> list[str]:
        """The Envoy command line ``lockgate envoy`` ran on ``host`` (from /proc: the process is Envoy now)."""
        return Path(f"/proc/{self.procs[f'envoy-{host.name}'].pid}/cmdline").read_text().split("\0")[:-1]

    def start_fake_nacker(self, host: Host) -> Proc:
        """:mod:`tests.fake_ads` on ``host``: an ADS client that NACKs every route configuration."""
        from tests.harness import PY

        path = self.host_configs.get(host.name) or self.host_config(host)
        self.node_of[host.name] = host
        p = host.popen([PY, "-m", "tests.fake_ads", "--xds", f"{self.hosts.cp_ip}:{self.ports['xds']}",
                        "--node", host.name, "--token-file", str(path.parent / "host.token")],
                       self.tmp / f"fake-ads-{host.name}.log")
        self.procs[f"fake-ads-{host.name}"] = p
        return p

    # ----- looking at a host's Envoy -----
    def admin(self, host: Host, path: str) -> tuple[int, str]:
        try:
            return host.http_get(f"http://127.0.0.1:{self.admin_ports[host.name]}{path}", timeout=2)
        except OSError as exc:
            return 0, str(exc)

    def route_weights(self, host: Host) -> dict[str, list[tuple[str, int]]]:
        """Route name (without ``?…``) → [(cluster, weight)] from the host's Envoy's live config."""
        import json

        status, text = self.admin(host, "/config_dump?resource=dynamic_route_configs")
        if status != 200:
            return {}
        out = {}
        for cfg in json.loads(text).get("configs", []):
            for vh in cfg["route_config"].get("virtual_hosts", []):
                for route in vh.get("routes", []):
                    wc = route.get("route", {}).get("weighted_clusters")
                    if wc:
                        out[route["name"].partition("?")[0]] = [(c["name"], int(c.get("weight", 0)))
                                                                for c in wc["clusters"]]
        return out

    def canary_weight(self, host: Host, canary: str = "v2") -> int | None:
        """The canary's weight (basis points) in the host's Envoy's sticky route, None before routes arrive."""
        routes = self.route_weights(host)
        if not routes:
            return None
        split = dict(routes.get("chat/key/0") or next(iter(routes.values())))
        return split.get(f"chat.{canary}", 0)

    def url(self, host: Host, path: str = "/v1/chat") -> str:
        return f"http://{host.ip}:{self.ports['listener']}{path}"

    # ----- the CLI, as a user runs it on the control-plane host -----
    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        from tests.harness import PY, REPO

        return subprocess.run([PY, "-m", "lockgate", "-c", str(self.cp_path), *args], capture_output=True,
                              text=True, env=_env(), cwd=REPO, timeout=timeout)

    def stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: (not n.startswith(("envoy", "fake")), n)):
            try:
                self.procs[name].stop()
            except Exception:  # noqa: BLE001 - stop the rest
                pass


def _sha(token: str) -> str:
    from lockgate.auth import hash_token

    return hash_token(token)


__all__ = ["Host", "HostFleet", "Hosts", "OWN_TOKEN", "host_token", "leftovers", "why_no_namespaces"]
