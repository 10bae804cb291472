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
