"""Shared helpers for lockgate's benchmarks: nginx upstreams, wrk runs, CPU pinning, machine facts.

Every process a benchmark starts is bound to 127.0.0.1, tracked by PID and stopped by PID.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.harness import Proc, free_port  # noqa: E402  (real-process helpers shared with the tests)

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/bin/nginx")


class MissingTool(RuntimeError):
    pass


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


# A benchmark stopped with SIGTERM (``timeout``, ``kill PID``) unwinds like Ctrl-C: its ``finally``
# blocks stop every process it started, instead of leaving Envoys and lockgate servers running.
signal.signal(signal.SIGTERM, _exit_on_sigterm)


def need(tool: str, apt_package: str) -> str:
    path = shutil.which(tool) or next((p for p in NGINX_CANDIDATES if tool == "nginx" and os.path.exists(p)), None)
    if path is None:
        raise MissingTool(f"`{tool}` not found: install it with `apt-get install -y {apt_package}`")
    return path


def pin(pid: int, cpus: str) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (e.g. "0"); no-op on a 1-CPU machine."""
    if (os.cpu_count() or 1) < 2:
        return
    subprocess.run(["taskset", "-a", "-cp", cpus, str(pid)], check=True, capture_output=True)


def taskset_prefix(cpus: str) -> list[str]:
    return ["taskset", "-c", cpus] if (os.cpu_count() or 1) >= 2 and shutil.which("taskset") else []


# ----------------------------------------------------------------------------------------------
# nginx upstream: one server block per model version, answering a small JSON with x-model-version
# ----------------------------------------------------------------------------------------------
NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
{servers}
}}
"""
NGINX_SERVER = """\
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{
      default_type application/json;
      add_header x-model-version {version} always;
      return 200 '{{"version":"{version}","ok":true}}';
    }}
  }}
"""


class Nginx:
    """One single-worker nginx serving ``versions`` (name → port)."""

    def __init__(self, tmp: Path, versions: list[str]):
        binary = need("nginx", "nginx-light")
        self.ports = {v: free_port() for v in versions}
        servers = "".join(NGINX_SERVER.format(port=p, version=v) for v, p in self.ports.items())
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, servers=servers))
        self.proc = Proc([binary, "-c", str(conf), "-p", str(tmp)], tmp / "nginx.log", ready_line=None)
        wait_port(next(iter(self.ports.values())))

    def stop(self) -> None:
        self.proc.stop()


def wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# ----------------------------------------------------------------------------------------------
# wrk
# ----------------------------------------------------------------------------------------------
WRK_LUA = r"""
-- lockgate bench: random x-user-id per request (many users), optional paced requests, JSON summary.
local delay_ms = tonumber(os.getenv("LOCKGATE_WRK_DELAY_MS") or "0")
local users = tonumber(os.getenv("LOCKGATE_WRK_USERS") or "100000")
local path = os.getenv("LOCKGATE_WRK_PATH") or "/v1/chat"
local non2xx = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
  bad = 0
end

function request()
  return wrk.format("GET", path, {["x-user-id"] = "u" .. math.random(1, users)})
end

if delay_ms > 0 then
  function delay()
    -- uniform 0..2*delay_ms: mean delay_ms, spreads the connections' requests over time
    return math.random(0, 2 * delay_ms)
  end
end

function response(status, headers, body)
  if status < 200 or status > 299 then bad = bad + 1 end
end

function done(summary, latency, requests)
  for _, t in ipairs(threads) do non2xx = non2xx + (t:get("bad") or 0) end
  local e = summary.errors
  io.write(string.format(
    'LOCKGATE_JSON {"requests":%d,"duration_us":%d,"non2xx":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d,"status":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, non2xx, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
"""


def write_wrk_lua(tmp: Path) -> Path:
    path = tmp / "lockgate_bench.lua"
    path.write_text(WRK_LUA)
    return path


def run_wrk(url: str, lua: Path, *, duration_s: float, connections: int, delay_ms: int = 0, cpus: str | None = None,
            path: str = "/v1/chat", timeout_s: int = 2) -> dict:
    """One wrk run (1 thread). ``delay_ms`` > 0 paces each connection (random 0..2·delay ms between its
    requests): offered rate ≈ connections / (delay + latency). Returns wrk's summary as a dict."""
    wrk = need("wrk", "wrk")
    env = dict(os.environ, LOCKGATE_WRK_DELAY_MS=str(delay_ms), LOCKGATE_WRK_PATH=path)
    argv = taskset_prefix(cpus) if cpus else []
    argv += [wrk, "-t1", f"-c{connections}", f"-d{duration_s:g}s", f"--timeout={timeout_s}s", "-s", str(lua), url]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration_s + 30)
    for line in r.stdout.splitlines():
        if line.startswith("LOCKGATE_JSON "):
            out = json.loads(line[len("LOCKGATE_JSON "):])
            errors = out["non2xx"] + out["connect"] + out["read"] + out["write"] + out["timeout"]
            out["errors"] = errors
            out["rps"] = out["requests"] / (out["duration_us"] / 1e6) if out["duration_us"] else 0.0
            out["error_pct"] = 100.0 * errors / out["requests"] if out["requests"] else 100.0
            return out
    raise RuntimeError(f"wrk gave no summary (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")


# ----------------------------------------------------------------------------------------------
# facts and results
# ----------------------------------------------------------------------------------------------
def machine() -> dict:
    from lockgate.envoy_proc import envoy_binary

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        envoy_version = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True,
                                       timeout=30).stdout.strip().split("version:")[-1].strip()
    except Exception as exc:  # noqa: BLE001
        envoy_version = f"unknown ({exc})"

    def tool_version(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return "absent"

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": envoy_version,
        "wrk": tool_version(["wrk", "-v"]),
        "nginx": tool_version([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": os.getloadavg(),
    }


def save_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def write_doc_section(head: str, text: str) -> None:
    """Replace the docs/benchmarks.md section starting with the line ``head`` (up to the next ``## ``
    heading) by ``text``; append it when there is none."""
    path = REPO / "docs" / "benchmarks.md"
    doc = path.read_text()
    if head in doc:
        start = doc.index(head)
        nxt = doc.find("\n## ", start + 1)
        doc = doc[:start] + text + (doc[nxt + 1:] if nxt >= 0 else "")
    else:
        doc = doc.rstrip() + "\n\n" + text
    path.write_text(doc)
