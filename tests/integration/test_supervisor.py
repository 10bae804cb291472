"""``lockgate up`` start order: the data path (xDS, ext_proc, a real Envoy) serves traffic even while
the controller cannot start; the supervisor says so on stderr, keeps retrying, and the controller
comes up once its port is free."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from tests.harness import PY, REPO, Client, Fleet, _env, requires_envoy, start_echo

pytestmark = [requires_envoy, pytest.mark.envoy]


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line.decode(errors="replace"))


def _wait_line(lines: queue.Queue, text: str, timeout: float, seen: list[str]) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"no line with {text!r} in {timeout} s; seen:\n{''.join(seen)}")


def test_up_serves_traffic_while_the_controller_cannot_start(tmp_path):
    v1, v1_port = start_echo("chat-v1", tmp_path)
    v2, v2_port = start_echo("chat-v2", tmp_path)
    fleet = Fleet(tmp_path, [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
                              "versions": {"v1": {"endpoints": [f"127.0.0.1:{v1_port}"]},
                                           "v2": {"endpoints": [f"127.0.0.1:{v2_port}"]}}}])
    # the controller's HTTP port, taken by a socket this test holds: the controller exits at start
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", fleet.ports["controller_http"]))
    held.listen(1)
    admin_port = fleet.admin_ports[0]
    stderr_path = tmp_path / "up.stderr"
    with open(stderr_path, "wb") as stderr:
        up = subprocess.Popen([PY, "-m", "lockgate", "-c", str(fleet.config_path), "up"], stdout=subprocess.PIPE,
                              stderr=stderr, stdin=subprocess.DEVNULL, cwd=REPO, env=_env(), start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(up.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        serving = _wait_line(lines, "serving models", 90, seen)
        assert "controller is not running yet" in serving, serving
        err = stderr_path.read_text()
        assert "controller could not start" in err and "traffic keeps flowing" in err and "retrying in" in err, err
        assert up.poll() is None

        # traffic flows through Envoy: every request answered by the stable version
        client = Client(fleet.ports["listener"])
        try:
            for i in range(20):
                r = client.request("/v1/chat/completions", headers={"x-user-id": f"u{i}"}, method="POST",
                                   body=b'{"messages": []}')
                assert r.status == 200 and r.version == "chat-v1", (r.status, r.headers)
        finally:
            client.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=5) as resp:
            assert resp.status == 200

        # the supervisor keeps retrying: more than one failed attempt while the port is held
        deadline = time.monotonic() + 20
        while stderr_path.read_text().count("controller could not start") < 2:
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.2)

        held.close()  # the port is free: the next attempt brings the controller up
        _wait_line(lines, "controller ready", 60, seen)
        url = f"http://127.0.0.1:{fleet.ports['controller_http']}/healthz"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
    finally:
        held.close()
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        v1.stop()
        v2.stop()
    assert up.returncode == 0, stderr_path.read_text()[-3000:]


# ------------------------------------------------------------------ Envoy sized by envoy.concurrency
def _port_runs(n: int) -> tuple[int, int]:
    """Two bases p, q with p .. p+n-1 and q .. q+n-1 all free and apart (ext_proc process i: p+i, metrics q+i)."""
    bases: list[int] = []
    for _ in range(200):
        socks = []
        try:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
            socks.append(s)
            for i in range(1, n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            if all(abs(base - b) >= n for b in bases):
                bases.append(base)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        if len(bases) == 2:
            return bases[0], bases[1]
    raise RuntimeError("no free port runs")


def _served(port: int, users: list[str], tag: str, threads: int = 8) -> dict[str, str]:
    """One request per user on ``threads`` fresh keep-alive connections; user → version that answered.
    Each request carries ``x-request-id: <tag>-<user>`` so its observation can be found."""
    out: dict[str, str] = {}
    errors: list[BaseException] = []

    def work(chunk: list[str]) -> None:
        c = Client(port)
        try:
            for u in chunk:
                r = c.request("/v1/chat/completions", {"x-user-id": u, "x-request-id": f"{tag}-{u}"}, "POST",
                              b'{"messages": []}')
                assert r.status == 200, (r.status, r.body[:200])
                out[u] = r.version or "?"
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
        finally:
            c.close()

    ts = [threading.Thread(target=work, args=(users[i::threads],)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("concurrency, extprocs", [(2, 1), (3, 2)])
def test_up_runs_envoy_with_the_configured_workers_and_every_ext_proc(tmp_path, concurrency, extprocs):
    """``envoy: {concurrency: N}``: ``lockgate up`` runs Envoy with N worker threads (its admin's
    ``server.concurrency``, and every worker accepts connections) and the derived ext_proc processes
    (one per 2 workers); weighted routing stays sticky per user across workers and connections, and
    every response is captured, by every ext_proc process."""
    v1, v1_port = start_echo("chat-v1", tmp_path)
    v2, v2_port = start_echo("chat-v2", tmp_path)
    ep, mp = _port_runs(extprocs)
    fleet = Fleet(tmp_path, [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
                              "versions": {"v1": {"endpoints": [f"127.0.0.1:{v1_port}"]},
                                           "v2": {"endpoints": [f"127.0.0.1:{v2_port}"]}}}],
                  extra={"envoy": {"concurrency": concurrency}, "extproc": {"port": ep},
                         "extproc_metrics": {"port": mp}})
    stderr_path = tmp_path / "up.stderr"
    with open(stderr_path, "wb") as stderr:
        up = subprocess.Popen([PY, "-m", "lockgate", "-c", str(fleet.config_path), "up"], stdout=subprocess.PIPE,
                              stderr=stderr, stdin=subprocess.DEVNULL, cwd=REPO, env=_env(), start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(up.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        sized = _wait_line(lines, "data path up", 90, seen)
        assert (f"{concurrency} worker threads (envoy.concurrency), {extprocs} ext_proc "
                f"process{'es' if extprocs > 1 else ''} (one per 2 Envoy workers)") in sized, sized
        serving = _wait_line(lines, "serving models", 90, seen)
        if "not running yet" in serving:
            _wait_line(lines, "controller ready", 60, seen)
        assert up.poll() is None, stderr_path.read_text()
        assert sum("extproc" in line and " ready (pid" in line for line in seen) == extprocs, "".join(seen)
        assert fleet.stat(0, "server.concurrency") == concurrency

        fleet.set_weight("chat", "v2", 50)
        users = [f"user-{i}" for i in range(300)]
        rounds = [_served(fleet.ports["listener"], users, f"r{k}") for k in range(3)]
        for u in users:
            assert rounds[0][u] == rounds[1][u] == rounds[2][u], f"{u} not sticky: {[r[u] for r in rounds]}"
        canary = sum(v == "chat-v2" for v in rounds[0].values())
        assert 90 <= canary <= 210, canary  # 50 % of 300 users (binomial sd 8.7)

        # 24 connections, each hashed by the kernel to one of the workers' listen sockets: every worker took some
        listener = f"listener.127.0.0.1_{fleet.ports['listener']}"
        per_worker = [fleet.stat(0, f"{listener}.worker_{w}.downstream_cx_total") for w in range(concurrency)]
        assert all(n and n > 0 for n in per_worker), per_worker
        assert fleet.stat(0, f"{listener}.worker_{concurrency}.downstream_cx_total") is None  # no extra worker

        # capture: every response stored, with the version that served it, from every ext_proc process
        sent = {f"r{k}-{u}": rounds[k][u] for k in range(3) for u in users}
        deadline = time.monotonic() + 60
        while True:
            stored = {o["client_request_id"]: o for o in fleet.observations(model="chat")
                      if o["client_request_id"] in sent}
            if len(stored) == len(sent) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(stored) == len(sent), f"{len(sent) - len(stored)} of {len(sent)} responses not stored"
        assert all(f"chat-{o['version']}" == sent[rid] for rid, o in stored.items())
        per_process = []
        for i in range(extprocs):
            with urllib.request.urlopen(f"http://127.0.0.1:{mp + i}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            per_process.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                   if line.startswith("lockgate_requests_total{")))
        assert all(n > 0 for n in per_process) and sum(per_process) >= len(sent), per_process
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        v1.stop()
        v2.stop()
    assert up.returncode == 0, stderr_path.read_text()[-3000:]
