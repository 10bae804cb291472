"""Inline response capture: what lockgate's ext_proc capture costs, how far one process goes, and loss.

    .venv/bin/python bench/capture.py [--quick]

Processes (all on 127.0.0.1, stopped by PID): one nginx (single worker) answering a ~280-byte OpenAI
chat completion; ``lockgate.examples.chat_server`` streaming SSE; a plain Envoy **A** (static routes to
the same upstreams, router only); lockgate fleet **B** (``lockgate xds`` + ``lockgate extproc`` +
``lockgate controller`` + Envoy; full capture = response headers with attributes + STREAMED body, every
response stored as an observation); fleet **B2**, the same with ``extproc_processes: 2`` (two ext_proc
processes as two endpoints of Envoy's ext_proc cluster). Envoys run ``--concurrency 1`` (part workers: 1 and 2).

Pinning (``taskset -a -cp``, every thread): the ext_proc process(es) alone on CPU 1; everything else
(Envoys, nginx, chat_server, xds, controller, the load generators) on CPU 0 — the layout of the
team's earlier ext_proc speed study. The "unpinned" ceiling runs re-pin every process to CPUs 0-1.

Parts:
(a) added latency at 500 rps: open-loop load (``bench/_loadgen.py``: fixed schedule, keep-alive
    connections, lateness recorded) on A and B in interleaved rounds (A B, B A, …); per-round p50/p99 and
    the median of the paired differences B − A.
(b) SSE time to first chunk (first body byte after the request is written), chat_server ``stream: true``
    (``--ttft-ms 2 --inter-token-ms 1``, 10 tokens), A vs B interleaved, open-loop 100 rps.
(c)(d) ceiling rps: wrk closed loop (1 thread, 32 connections) on B (one ext_proc) and B2 (two), pinned
    and unpinned, interleaved; per run: throughput, non-2xx, the share of responses ext_proc observed,
    Envoy's ext_proc message timeouts, CPU of each process.
(loss) 1,000 rps open-loop for 300 s on B: requests sent vs observations stored (by request id), the
    ext_proc drop counter, Envoy's ext_proc message timeouts.
(e) ext_proc RSS while ~1M requests go through B (wrk closed loop, 8 connections, in 20 s chunks,
    bounded to 8 min): RSS after warm-up, after 100k and after 1M requests.
(workers) only with ``--part workers`` (~4 min; ``bench/results/capture_workers.json``, and with ``--doc``
    the ``capture_workers`` section of docs/benchmarks.md): Envoy alone and lockgate (inline capture) with
    ``envoy.concurrency`` 1 and 2, lockgate with 1 and 2 ext_proc processes, nothing pinned; interleaved
    rounds of an open-loop run (``--workers-rps``) and a wrk ceiling, ratios paired within each round.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (NGINX_CONF, REPO, Proc, free_port, machine, median, need, pin, run_wrk,  # noqa: E402
                     save_json, wait_port, write_wrk_lua)
from _loadgen import CHAT_BODY, OpenLoop  # noqa: E402
from routing_latency import (HCM_TYPE, ROUTER, _admin, _static_cluster, envoy_counter,  # noqa: E402
                             extproc_filter_summary, proc_cpu_s, start_static_envoy)

EXTPROC_CPU = "1"
OTHER_CPU = "0"
ALL_CPUS = "0-1"
PY = sys.executable

OPENAI_JSON = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "chat-v1",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "the canary answer is stable and fine"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}}, separators=(",", ":"))
NGINX_OPENAI = """\
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{
      default_type application/json;
      add_header x-model-version v1 always;
      return 200 '{body}';
    }}
  }}
"""
SSE_BODY = json.dumps({"model": "sse", "prompt": "hello", "stream": True, "max_tokens": 10}).encode()


# ----------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------
def start_nginx(tmp: Path) -> tuple[Proc, int]:
    binary = need("nginx", "nginx-light")
    port = free_port()
    d = tmp / "nginx"
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=d, servers=NGINX_OPENAI.format(port=port, body=OPENAI_JSON)))
    p = Proc([binary, "-c", str(conf), "-p", str(d)], d / "nginx.log", ready_line=None)
    wait_port(port)
    return p, port


def start_chat_server(tmp: Path) -> tuple[Proc, int]:
    p = Proc([PY, "-m", "lockgate.examples.chat_server", "--port", "0", "--version", "v1", "--seed", "1",
              "--latency-ms", "0", "--latency-jitter-ms", "0", "--ttft-ms", "2", "--inter-token-ms", "1",
              "--tokens-mean", "10", "--tokens-sd", "0"], tmp / "chat_server.log")
    return p, int(p.ready_text.split()[1])


def plain_bootstrap(listen_port: int, admin_port: int, chat_port: int, sse_port: int) -> dict:
    """A: Envoy without lockgate, the same two routes (SSE completions → chat_server, rest → nginx)."""
    hcm = {"@type": HCM_TYPE, "stat_prefix": "plain", "codec_type": "AUTO", "use_remote_address": True,
           "route_config": {"name": "plain", "virtual_hosts": [{"name": "plain", "domains": ["*"], "routes": [
               {"match": {"prefix": "/v1/completions"}, "route": {"cluster": "sse", "timeout": "300s"}},
               {"match": {"prefix": "/"}, "route": {"cluster": "chat", "timeout": "300s"}}]}]},
           "http_filters": [ROUTER]}
    return {"node": {"id": "bench-plain", "cluster": "bench"}, "admin": _admin(admin_port),
            "static_resources": {
                "listeners": [{"name": "plain", "address": {"socket_address": {"address": "127.0.0.1",
                                                                               "port_value": listen_port}},
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm}]}]}],
                "clusters": [_static_cluster("chat", chat_port), _static_cluster("sse", sse_port)]}}


def free_port_run(n: int) -> int:
    """A port p with p .. p+n-1 all free (ext_proc process i listens on port + i, metrics on port + i)."""
    import socket

    for _ in range(200):
        base = free_port()
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def start_fleet(tmp: Path, chat_port: int, sse_port: int, processes: int, capture: dict | None = None,
                concurrency: int = 1):
    """A lockgate fleet (xDS, ``processes`` ext_proc processes, controller, one Envoy with ``concurrency``
    workers) in front of nginx (chat) and chat_server (SSE)."""
    from tests.harness import Fleet

    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{chat_port}"]}}},
              {"name": "sse", "match": {"path_prefix": "/v1/completions"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{sse_port}"]}}}]
    tmp.mkdir()
    ep_port = free_port_run(processes)
    metrics_port = free_port_run(processes)
    while metrics_port <= ep_port + processes and ep_port <= metrics_port + processes:
        metrics_port = free_port_run(processes)
    fleet = Fleet(tmp, models, with_controller=True,
                  extra={"extproc_processes": processes, "envoy": {"concurrency": concurrency},
                         "extproc": {"port": ep_port},
                         "extproc_metrics": {"port": metrics_port}, **({"capture": capture} if capture else {})})
    fleet.start()
    extprocs = {"extproc": fleet.procs["extproc"]}
    for i in range(1, processes):
        p = Proc([PY, "-m", "lockgate", "-c", str(fleet.config_path), "extproc", "--index", str(i)],
                 tmp / f"extproc-{i}.log")
        fleet.procs[f"extproc-{i}"] = p
        extprocs[f"extproc-{i}"] = p
    fleet.extprocs = extprocs
    fleet.metrics_ports = [metrics_port + i for i in range(processes)]
    return fleet


def pin_layout(fleet_procs: dict[str, Proc], pinned: bool) -> None:
    for name, p in fleet_procs.items():
        if not p.alive():
            continue
        pin(p.pid, (EXTPROC_CPU if name.startswith("extproc") else OTHER_CPU) if pinned else ALL_CPUS)


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------
def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_sum(ports: list[int], prefix: str) -> float:
    total = 0.0
    for port in ports:
        for line in metrics_text(port).splitlines():
            if line.startswith(prefix) and not line.startswith("#"):
                name = line.split("{")[0].split(" ")[0]
                if name == prefix:
                    total += float(line.rsplit(" ", 1)[1])
    return total


def extproc_stats(admin_port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?filter=ext_proc", timeout=5) as r:
        out = {}
        for line in r.read().decode().splitlines():
            k, _, v = line.partition(": ")
            if v.strip().isdigit():
                out[k.replace("http.lockgate.ext_proc.lockgate.", "")] = int(v)
        return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat (busy = all but idle and iowait)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            out[name] = (sum(v) - v[3] - v[4], sum(v))
    return out


class Snapshot:
    """Counters and CPU of a fleet before/after a run."""

    def __init__(self, fleet, pids: dict[str, int]):
        self.fleet, self.pids = fleet, pids
        self.cpu = {n: proc_cpu_s(p) for n, p in pids.items()}
        self.seen = metric_sum(fleet.metrics_ports, "lockgate_requests_total")
        self.dropped = metric_sum(fleet.metrics_ports, "lockgate_observations_dropped_total")
        self.ep = extproc_stats(fleet.admin_ports[0])
        self.cpus = cpu_times()
        self.t = time.monotonic()

    def delta(self, requests: int) -> dict:
        now = Snapshot(self.fleet, self.pids)
        wall = now.t - self.t
        n = max(1, requests)
        streams = now.ep.get("streams_started", 0) - self.ep.get("streams_started", 0)
        sent = now.ep.get("stream_msgs_sent", 0) - self.ep.get("stream_msgs_sent", 0)
        return {"observed": now.seen - self.seen, "observed_pct": 100.0 * (now.seen - self.seen) / n,
                "dropped": now.dropped - self.dropped,
                "message_timeouts": now.ep.get("message_timeouts", 0) - self.ep.get("message_timeouts", 0),
                "failure_mode_allowed": now.ep.get("failure_mode_allowed", 0) - self.ep.get("failure_mode_allowed", 0),
                # streams Envoy closed itself: in observability mode, those the ext_proc had not finished
                # reading within deferred_close_timeout (the server ends every stream it read to the end)
                "streams_closed_by_envoy": now.ep.get("streams_closed", 0) - self.ep.get("streams_closed", 0),
                "extproc_msgs_per_request": sent / max(1, streams),
                "machine_cpu_busy_pct": {c: round(100 * (now.cpus[c][0] - b0) / max(1, now.cpus[c][1] - t0), 1)
                                         for c, (b0, t0) in self.cpus.items()},
                "cpu_us_per_request": {k: round((now.cpu[k] - self.cpu[k]) * 1e6 / n, 1) for k in self.pids},
                "cpu_pct": {k: round(100 * (now.cpu[k] - self.cpu[k]) / wall, 1) for k in self.pids}}


def stored_count(fleet, prefix: str) -> int:
    db = sqlite3.connect(f"file:{fleet.tmp / 'state' / 'observations.db'}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM observations WHERE client_request_id LIKE ?",
                          (prefix + "-%",)).fetchone()[0]
    finally:
        db.close()


def stored_ids(fleet, prefix: str) -> set[str]:
    db = sqlite3.connect(f"file:{fleet.tmp / 'state' / 'observations.db'}?mode=ro", uri=True, timeout=30)
    try:
        return {r for (r,) in db.execute("SELECT client_request_id FROM observations WHERE client_request_id LIKE ?",
                                         (prefix + "-%",))}
    finally:
        db.close()


def wait_stored(fleet, prefix: str, want: int, timeout: float = 60) -> int:
    deadline, last, last_t = time.monotonic() + timeout, -1, time.monotonic()
    n = 0
    while time.monotonic() < deadline:
        try:
            n = stored_count(fleet, prefix)
        except sqlite3.OperationalError:
            n = 0
        if n >= want:
            return n
        if n != last:
            last, last_t = n, time.monotonic()
        elif time.monotonic() - last_t > 10:
            return n
        time.sleep(0.5)
    return n


class RssSampler:
    """Every 5 s: responses the ext_proc process has seen since start, its RSS, the controller's RSS."""

    def __init__(self, fleet, pid: int, every_s: float = 5.0):
        import threading

        self.fleet, self.pid, self.every_s = fleet, pid, every_s
        self.base = metric_sum(fleet.metrics_ports, "lockgate_requests_total")
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def seen(self) -> float:
        return metric_sum(self.fleet.metrics_ports, "lockgate_requests_total") - self.base

    def sample(self) -> None:
        self.samples.append({"t_s": round(time.monotonic() - self._t0, 1), "requests": int(self.seen()),
                             "extproc_rss_mb": round(rss_mb(self.pid), 2),
                             "controller_rss_mb": round(rss_mb(self.fleet.procs["controller"].pid), 2),
                             "queued": metric_sum(self.fleet.metrics_ports, "lockgate_observations_queued")})

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a sample missed is not a result
                pass

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(10)
            self.sample()


def run_open_loop(port: int, rps: float, seconds: float, prefix: str, **kw):
    """One open-loop run from this process (pinned to ``OTHER_CPU`` in ``main``); returns a LoadResult."""
    return OpenLoop("127.0.0.1", port, rps, seconds, id_prefix=prefix, **kw).run()


# ----------------------------------------------------------------------------------------------
# (ab) capture modes and process counts, against Envoy alone, in two CPU layouts
# ----------------------------------------------------------------------------------------------
#: variant → (capture section of lockgate.yaml, ext_proc processes)
AB_VARIANTS = {
    "inline, 1 ext_proc": ({"mode": "inline"}, 1),
    "inline, 2 ext_proc": ({"mode": "inline"}, 2),
    "observability, 1 ext_proc": ({"mode": "observability"}, 1),
    "observability, 2 ext_proc": ({"mode": "observability"}, 2),
    "observability, 1 ext_proc, 500 ms batches": ({"mode": "observability", "flush_interval_s": 0.5}, 1),
}
#: layout → (CPUs of the load generator / wrk, CPUs of Envoy, lockgate's processes and nginx)
AB_LAYOUTS = {"load generator on its own core": ("0", "1"), "everything on one core": ("1", "1")}


def _ab_pids(fleet) -> dict[str, int]:
    pids = {"envoy": fleet.procs["envoy-0"].pid, "controller": fleet.procs["controller"].pid}
    for name, p in fleet.extprocs.items():
        pids[name] = p.pid
    return pids


def _ab_cpu(d: dict) -> dict:
    """CPU µs per request: Envoy, ext_proc (all processes), controller."""
    c = d["cpu_us_per_request"]
    return {"envoy": c.get("envoy", 0.0), "extproc": sum(v for k, v in c.items() if k.startswith("extproc")),
            "controller": c.get("controller", 0.0)}


def run_ab(args, tmp: Path, a_port: int, a_pid: int, nginx: Proc, chat: Proc, chat_port: int, sse_port: int) -> dict:
    """Every variant and Envoy alone (A), per layout: ``args.ab_rounds`` interleaved rounds of (i) open-loop
    500 rps for ``args.ab_seconds`` (latency, CPU per request) and (ii) wrk closed loop (ceiling)."""
    fleets = {}
    try:
        for i, (name, (capture, n)) in enumerate(AB_VARIANTS.items()):
            fleets[name] = start_fleet(tmp / f"ab{i}", chat_port, sse_port, n, capture)
            w = OpenLoop("127.0.0.1", fleets[name].ports["listener"], 200, 1, id_prefix=f"warmab{i}").run()
            if w.status_counts != {200: w.sent}:
                raise RuntimeError(f"warm-up {name}: {w.summary()}")
        lua = write_wrk_lua(tmp)
        out: dict = {"variants": {k: {"capture": c, "extproc_processes": n} for k, (c, n) in AB_VARIANTS.items()},
                     "layouts": {k: {"load_cpus": lc, "server_cpus": sc} for k, (lc, sc) in AB_LAYOUTS.items()},
                     "runs": {}}
        for layout, (load_cpus, server_cpus) in AB_LAYOUTS.items():
            pin(os.getpid(), load_cpus)
            for p in (nginx, chat):
                pin(p.pid, server_cpus)
            pin(a_pid, server_cpus)
            for fl in fleets.values():
                for p in fl.procs.values():
                    if p.alive():
                        pin(p.pid, server_cpus)
            runs = {k: [] for k in ["A", *AB_VARIANTS]}
            for rnd in range(args.ab_rounds):
                keys = list(runs)
                keys = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
                for key in keys:
                    fl = fleets.get(key)
                    port = a_port if fl is None else fl.ports["listener"]
                    pids = {"envoy": a_pid} if fl is None else _ab_pids(fl)
                    snap = Snapshot(fl or fleets[next(iter(fleets))], pids)
                    r = run_open_loop(port, 500, args.ab_seconds, f"ab{rnd}{len(runs[key])}{keys.index(key)}")
                    if fl is not None and fl.procs["extproc"].alive():
                        time.sleep(0.3)  # observability mode: let the ext_proc read what Envoy sent
                    d = {**r.summary(), **snap.delta(r.sent), "round": rnd, "loadavg1": os.getloadavg()[0]}
                    snap = Snapshot(fl or fleets[next(iter(fleets))], pids)
                    w = run_wrk(f"http://127.0.0.1:{port}", lua, duration_s=args.ab_ceiling_seconds, connections=32,
                                cpus=load_cpus, path="/v1/chat/completions")
                    if fl is not None:
                        time.sleep(0.3)
                    wd = snap.delta(w["requests"])
                    d["ceiling"] = {"rps": w["rps"], "error_pct": w["error_pct"], "observed_pct": wd["observed_pct"],
                                    "message_timeouts": wd["message_timeouts"],
                                    "streams_closed_by_envoy": wd["streams_closed_by_envoy"],
                                    "cpu_us_per_request": _ab_cpu(wd), "cpu_pct": wd["cpu_pct"]}
                    if fl is None:  # Envoy alone: the other fleet's counters mean nothing here
                        for k in ("observed", "observed_pct", "dropped", "message_timeouts", "failure_mode_allowed",
                                  "streams_closed_by_envoy", "extproc_msgs_per_request"):
                            d.pop(k, None)
                            d["ceiling"].pop(k, None)
                    runs[key].append(d)
                    print(f"(ab) {layout} round {rnd} {key}: p50 {d['latency_ms']['p50']:.3f} p99 "
                          f"{d['latency_ms']['p99']:.3f} ms, cpu µs/req {_ab_cpu(d)}, ceiling {w['rps']:.0f} rps "
                          f"observed {d['ceiling'].get('observed_pct', float('nan')):.1f}% "
                          f"(500 rps: {d.get('observed_pct', float('nan')):.1f}%)", flush=True)
            out["runs"][layout] = runs
        out["summary"] = ab_summary(out["runs"])
        return out
    finally:
        for fl in fleets.values():
            fl.stop()
        pin(os.getpid(), OTHER_CPU)


def ab_summary(runs_by_layout: dict) -> dict:
    out = {}
    for layout, runs in runs_by_layout.items():
        a = runs["A"]
        a_cpu = median([_ab_cpu(r)["envoy"] for r in a])
        a_ceiling = median([r["ceiling"]["rps"] for r in a])
        rows = {"A": {"p50": median([r["latency_ms"]["p50"] for r in a]), "p99": median([r["latency_ms"]["p99"] for r in a]),
                      "envoy_cpu_us_per_request": a_cpu, "ceiling_rps": a_ceiling,
                      "envoy_cpu_us_per_request_at_ceiling": median([r["ceiling"]["cpu_us_per_request"]["envoy"] for r in a])}}
        for key, v in runs.items():
            if key == "A":
                continue
            cpu = {n: median([_ab_cpu(r)[n] for r in v]) for n in ("envoy", "extproc", "controller")}
            ceil_cpu = {n: median([r["ceiling"]["cpu_us_per_request"][n] for r in v]) for n in ("envoy", "extproc", "controller")}
            rows[key] = {
                "p50": median([r["latency_ms"]["p50"] for r in v]), "p99": median([r["latency_ms"]["p99"] for r in v]),
                "added_p50_ms": median([b["latency_ms"]["p50"] - x["latency_ms"]["p50"] for x, b in zip(a, v)]),
                "added_p99_ms": median([b["latency_ms"]["p99"] - x["latency_ms"]["p99"] for x, b in zip(a, v)]),
                "cpu_us_per_request": cpu,
                "capture_cpu_ratio": (cpu["extproc"] + cpu["controller"]) / a_cpu if a_cpu else None,
                "ceiling_rps": median([r["ceiling"]["rps"] for r in v]),
                "ceiling_ratio": median([b["ceiling"]["rps"] / x["ceiling"]["rps"] for x, b in zip(a, v)]),
                "cpu_us_per_request_at_ceiling": ceil_cpu,
                "capture_cpu_ratio_at_ceiling": ((ceil_cpu["extproc"] + ceil_cpu["controller"]) /
                                                 rows["A"]["envoy_cpu_us_per_request_at_ceiling"]
                                                 if rows["A"]["envoy_cpu_us_per_request_at_ceiling"] else None),
                "observed_pct_500": median([r["observed_pct"] for r in v]),
                "observed_pct_ceiling": median([r["ceiling"]["observed_pct"] for r in v]),
                "ceiling_error_pct_max": max(r["ceiling"]["error_pct"] for r in v),
                "message_timeouts": sum(r["message_timeouts"] + r["ceiling"]["message_timeouts"] for r in v),
                "streams_closed_by_envoy": sum(r["streams_closed_by_envoy"] + r["ceiling"]["streams_closed_by_envoy"]
                                               for r in v),
                "extproc_msgs_per_request": median([r["extproc_msgs_per_request"] for r in v])}
        out[layout] = rows
    return out


# ----------------------------------------------------------------------------------------------
# (workers) Envoy with 1 vs 2 worker threads, and 1 vs 2 ext_proc processes, every process on every CPU
# ----------------------------------------------------------------------------------------------
#: variant → (Envoy workers, ext_proc processes); None = Envoy alone (A)
WORKER_VARIANTS = {
    "A, 1 worker": (1, None),
    "A, 2 workers": (2, None),
    "B, 1 worker, 1 ext_proc": (1, 1),
    "B, 2 workers, 1 ext_proc": (2, 1),
    "B, 2 workers, 2 ext_proc": (2, 2),
}


def worker_connections(admin_port: int, listen_port: int, workers: int) -> list[int]:
    """Connections each Envoy worker has accepted so far (``listener.<addr>.worker_N.downstream_cx_total``)."""
    prefix = f"listener.127.0.0.1_{listen_port}.worker_"
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?filter=^{prefix}", timeout=5) as r:
        got = {}
        for line in r.read().decode().splitlines():
            k, _, v = line.partition(": ")
            if k.endswith(".downstream_cx_total"):
                got[int(k[len(prefix):].split(".")[0])] = int(v)
    return [got.get(w, 0) for w in range(workers)]


def run_workers(args, tmp: Path, nginx: Proc, chat: Proc, chat_port: int, sse_port: int) -> dict:
    """``args.workers_rounds`` interleaved rounds over :data:`WORKER_VARIANTS` (rotated order), each an open-loop
    run at ``args.workers_rps`` of ``args.workers_seconds`` (latency, CPU per request, share observed) and a wrk closed-loop
    run of ``args.workers_ceiling_seconds`` (32 connections: ceiling, errors, share observed, connections per
    Envoy worker). Every process may run on every CPU (the layout ``lockgate up`` gives a host)."""
    pin(os.getpid(), ALL_CPUS)
    for p in (nginx, chat):
        pin(p.pid, ALL_CPUS)
    envoys: dict[str, tuple[Proc, int, int]] = {}
    fleets = {}
    try:
        for i, (name, (workers, extprocs)) in enumerate(WORKER_VARIANTS.items()):
            if extprocs is None:
                port, admin = free_port(), free_port()
                envoys[name] = (start_static_envoy(tmp, f"envoy-plain-{workers}w",
                                                   plain_bootstrap(port, admin, chat_port, sse_port), admin, port,
                                                   concurrency=workers), port, admin)
            else:
                fl = fleets[name] = start_fleet(tmp / f"workers{i}", chat_port, sse_port, extprocs,
                                                {"mode": "inline"}, concurrency=workers)
                envoys[name] = (fl.procs["envoy-0"], fl.ports["listener"], fl.admin_ports[0])
                for p in fl.procs.values():
                    if p.alive():
                        pin(p.pid, ALL_CPUS)
            proc, port, admin = envoys[name]
            pin(proc.pid, ALL_CPUS)
            gauge = int(envoy_counter(admin, "server.concurrency"))
            if gauge != workers:
                raise RuntimeError(f"{name}: Envoy runs {gauge} workers, not {workers}")
            w = OpenLoop("127.0.0.1", port, 200, 1, id_prefix=f"warmw{i}").run()
            if w.status_counts != {200: w.sent}:
                raise RuntimeError(f"warm-up {name}: {w.summary()}")
        lua = write_wrk_lua(tmp)
        any_fleet = next(iter(fleets.values()))
        runs: dict[str, list] = {k: [] for k in WORKER_VARIANTS}
        for rnd in range(args.workers_rounds):
            keys = list(runs)
            keys = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
            for key in keys:
                workers, extprocs = WORKER_VARIANTS[key]
                proc, port, admin = envoys[key]
                fl = fleets.get(key)
                pids = {"envoy": proc.pid} if fl is None else _ab_pids(fl)
                snap = Snapshot(fl or any_fleet, pids)
                r = run_open_loop(port, args.workers_rps, args.workers_seconds, f"w{rnd}{keys.index(key)}")
                if fl is not None:
                    time.sleep(0.3)
                d = {**r.summary(), **snap.delta(r.sent), "round": rnd, "loadavg1": os.getloadavg()[0]}
                cx0 = worker_connections(admin, port, workers)
                snap = Snapshot(fl or any_fleet, pids)
                w = run_wrk(f"http://127.0.0.1:{port}", lua, duration_s=args.workers_ceiling_seconds, connections=32,
                            cpus=ALL_CPUS, path="/v1/chat/completions")
                if fl is not None:
                    time.sleep(0.3)
                wd = snap.delta(w["requests"])
                d["ceiling"] = {"rps": w["rps"], "error_pct": w["error_pct"], "p99_ms": w["p99_us"] / 1000,
                                "observed_pct": wd["observed_pct"], "message_timeouts": wd["message_timeouts"],
                                "cpu_us_per_request": _ab_cpu(wd), "cpu_pct": wd["cpu_pct"],
                                "machine_cpu_busy_pct": wd["machine_cpu_busy_pct"],
                                "connections_per_worker": [b - a for a, b in
                                                           zip(cx0, worker_connections(admin, port, workers))]}
                if fl is None:  # Envoy alone: the fleet's counters mean nothing here
                    for k in ("observed", "observed_pct", "dropped", "message_timeouts", "failure_mode_allowed",
                              "streams_closed_by_envoy", "extproc_msgs_per_request"):
                        d.pop(k, None)
                        d["ceiling"].pop(k, None)
                runs[key].append(d)
                print(f"(workers) round {rnd} {key}: {args.workers_rps:g} rps p50 {d['latency_ms']['p50']:.3f} p99 "
                      f"{d['latency_ms']['p99']:.3f} ms, cpu µs/req {_ab_cpu(d)}; ceiling {w['rps']:.0f} rps, errors "
                      f"{w['error_pct']:.2f}%, observed {d['ceiling'].get('observed_pct', float('nan')):.1f}%, "
                      f"connections per worker {d['ceiling']['connections_per_worker']}, "
                      f"load {d['loadavg1']:.1f}", flush=True)
        return {"variants": {k: {"envoy_workers": wk, "extproc_processes": ep} for k, (wk, ep) in
                             WORKER_VARIANTS.items()},
                "runs": runs, "summary": workers_summary(runs)}
    finally:
        for fl in fleets.values():
            fl.stop()
        for name, (proc, _port, _admin) in envoys.items():
            if name not in fleets:
                proc.stop()


def workers_summary(runs: dict) -> dict:
    """Medians per variant; ratios 2 workers ÷ 1 worker paired within each round (same machine moment)."""
    out: dict = {"variants": {}}
    for key, v in runs.items():
        row = {"p50_ms": median([r["latency_ms"]["p50"] for r in v]), "p99_ms": median([r["latency_ms"]["p99"] for r in v]),
               "cpu_us_per_request": {n: median([_ab_cpu(r)[n] for r in v]) for n in ("envoy", "extproc", "controller")},
               "ceiling_rps": median([r["ceiling"]["rps"] for r in v]),
               "ceiling_rps_min": min(r["ceiling"]["rps"] for r in v),
               "ceiling_rps_max": max(r["ceiling"]["rps"] for r in v),
               "ceiling_p99_ms": median([r["ceiling"]["p99_ms"] for r in v]),
               "ceiling_error_pct_max": max(r["ceiling"]["error_pct"] for r in v),
               "ceiling_cpu_us_per_request": {n: median([r["ceiling"]["cpu_us_per_request"][n] for r in v])
                                              for n in ("envoy", "extproc", "controller")},
               "ceiling_cpu_pct": {n: median([r["ceiling"]["cpu_pct"][n] for r in v]) for n in v[0]["ceiling"]["cpu_pct"]},
               "connections_per_worker": [r["ceiling"]["connections_per_worker"] for r in v]}
        if not key.startswith("A"):
            row["observed_pct_500"] = median([r["observed_pct"] for r in v])
            row["observed_pct_ceiling"] = median([r["ceiling"]["observed_pct"] for r in v])
            row["message_timeouts"] = sum(r["message_timeouts"] + r["ceiling"]["message_timeouts"] for r in v)
        out["variants"][key] = row

    def ratios(num: str, den: str, field) -> list[float]:
        return [field(a) / field(b) for a, b in zip(runs[num], runs[den]) if field(b)]

    rps = lambda r: r["ceiling"]["rps"]  # noqa: E731
    pairs = {"A: 2 workers ÷ 1 worker": ("A, 2 workers", "A, 1 worker"),
             "B: 2 workers, 1 ext_proc ÷ 1 worker, 1 ext_proc": ("B, 2 workers, 1 ext_proc", "B, 1 worker, 1 ext_proc"),
             "B: 2 workers, 2 ext_proc ÷ 1 worker, 1 ext_proc": ("B, 2 workers, 2 ext_proc", "B, 1 worker, 1 ext_proc"),
             "B: 2 workers, 2 ext_proc ÷ 2 workers, 1 ext_proc": ("B, 2 workers, 2 ext_proc", "B, 2 workers, 1 ext_proc")}
    out["ceiling_ratios"] = {name: {"per_round": [round(x, 3) for x in ratios(n, d, rps)],
                                    "median": median(ratios(n, d, rps))} for name, (n, d) in pairs.items()}
    p99 = lambda r: r["latency_ms"]["p99"]  # noqa: E731
    out["p99_open_loop_ratios"] = {name: {"per_round": [round(x, 3) for x in ratios(n, d, p99)],
                                       "median": median(ratios(n, d, p99))} for name, (n, d) in pairs.items()}
    return out


def render_workers(d: dict) -> str:
    """The ``capture_workers`` section of docs/benchmarks.md."""
    m, w = d["machine"], d["workers"]
    s = w["summary"]
    rate = f"{d['setup']['args']['workers_rps']:g}"
    lines = ["## Envoy workers and ext_proc processes (`envoy.concurrency`)", "",
             f"- Machine: {m['nproc']} CPUs, {m['cpu_model']}, Linux {m['kernel']}; Envoy {m['envoy']}; "
             f"{m['wrk'].split(' Copyright')[0]}; {m['nginx']}; Python {m['python']}",
             f"- Date: {m['date_utc']} (load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}; the machine is shared: other sessions' tests "
             f"were running, so compare rows of the same round, not absolutes)",
             f"- Command: `.venv/bin/python {d['command']}` ({d['elapsed_s']:.0f} s)",
             "- Setup: the chat path of the capture benchmark (nginx, 1 worker, 284-byte OpenAI JSON); **A** = plain "
             "Envoy, **B** = lockgate with full inline capture (every response stored by the controller); Envoy "
             "`--concurrency` 1 or 2; 1 or 2 ext_proc processes. No pinning: every process (Envoys, ext_proc, "
             "controller, nginx, wrk, the load generator) may run on both CPUs, as `lockgate up` runs on a host.",
             f"- Load per round, variants in rotated order: {d['setup']['args']['workers_rps']:g} rps open loop for "
             f"{d['setup']['args']['workers_seconds']:g} s "
             f"(`bench/_loadgen.py`), then wrk closed loop (1 thread, 32 connections, "
             f"{d['setup']['args']['workers_ceiling_seconds']:g} s); {d['setup']['args']['workers_rounds']} rounds.",
             "",
             f"| variant | {rate} rps p50 / p99 ms | CPU µs / request at {rate} rps (Envoy, ext_proc, controller) | ceiling rps, median (min–max) | ceiling p99 ms | observed at ceiling | connections per worker (per round) |",
             "|---|---|---|---|---|---|---|"]
    for key, r in s["variants"].items():
        c = r["cpu_us_per_request"]
        cpu = f"{c['envoy']:.0f}" + ("" if key.startswith("A") else f", {c['extproc']:.0f}, {c['controller']:.0f}")
        obs = "–" if key.startswith("A") else f"{r['observed_pct_ceiling']:.1f} %"
        lines.append(f"| {key} | {r['p50_ms']:.3f} / {r['p99_ms']:.3f} | {cpu} | {r['ceiling_rps']:,.0f} "
                     f"({r['ceiling_rps_min']:,.0f}–{r['ceiling_rps_max']:,.0f}) | {r['ceiling_p99_ms']:.1f} | {obs} | "
                     f"{'; '.join('/'.join(str(x) for x in cw) for cw in r['connections_per_worker'])} |")
    lines += ["", f"Ratios paired within each round (ceiling rps; p99 at {rate} rps):", "",
              f"| ratio | ceiling, median (per round) | p99 at {rate} rps, median (per round) |", "|---|---|---|"]
    for name, r in s["ceiling_ratios"].items():
        p = s["p99_open_loop_ratios"][name]
        lines.append(f"| {name} | {r['median']:.2f} ({', '.join(f'{x:.2f}' for x in r['per_round'])}) | "
                     f"{p['median']:.2f} ({', '.join(f'{x:.2f}' for x in p['per_round'])}) |")
    v = s["variants"]

    def cpu(key: str, at: str = "cpu_us_per_request") -> dict:
        return v[key][at]

    one, two = cpu("B, 2 workers, 1 ext_proc"), cpu("B, 2 workers, 2 ext_proc")
    lock1, lock2 = one["extproc"] + one["controller"], two["extproc"] + two["controller"]
    b1 = cpu("B, 1 worker, 1 ext_proc")
    share = b1["extproc"] / (b1["envoy"] + b1["extproc"] + b1["controller"])
    c1, c2 = cpu("B, 2 workers, 1 ext_proc", "ceiling_cpu_us_per_request"), cpu("B, 2 workers, 2 ext_proc",
                                                                             "ceiling_cpu_us_per_request")
    lines += ["", f"CPU per response of lockgate's own processes (ext_proc + controller) with 2 Envoy workers: "
                  f"{lock1:.0f} µs with 1 ext_proc, {lock2:.0f} µs with 2 (×{lock2 / lock1:.2f}) at {rate} rps; "
                  f"{c1['extproc'] + c1['controller']:.0f} vs {c2['extproc'] + c2['controller']:.0f} µs "
                  f"(×{(c2['extproc'] + c2['controller']) / (c1['extproc'] + c1['controller']):.2f}) at the ceiling. "
                  f"The ext_proc's share of the whole path's CPU per response (1 worker, 1 ext_proc, {rate} rps): "
                  f"{100 * share:.0f} %. Load average at the end: "
                  f"{', '.join(f'{x:.2f}' for x in d['loadavg_at_end'])}.",
              "", "What follows from it — `extproc_processes` defaults to one per two Envoy workers — is in "
                  "[operations.md](operations.md#envoy-and-ext_proc-sizing-envoy)."]
    return "\n".join(lines) + "\n"


def write_doc_section(name: str, text: str) -> None:
    """Replace ``<!-- name:start -->`` … ``<!-- name:end -->`` in docs/benchmarks.md (appended if absent)."""
    doc = REPO / "docs" / "benchmarks.md"
    body = doc.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text}{end}"
    if start in body and end in body:
        body = body[:body.index(start)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(body)


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test of the script, not results)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--sse-rounds", type=int, default=4)
    ap.add_argument("--sse-seconds", type=float, default=8.0)
    ap.add_argument("--sse-rps", type=float, default=100.0)
    ap.add_argument("--ceiling-rounds", type=int, default=3)
    ap.add_argument("--ceiling-seconds", type=float, default=5.0)
    ap.add_argument("--loss-rps", type=float, default=1000.0)
    ap.add_argument("--loss-seconds", type=float, default=300.0)
    ap.add_argument("--rss-requests", type=int, default=1_000_000)
    ap.add_argument("--rss-max-seconds", type=float, default=480.0)
    ap.add_argument("--ab-rounds", type=int, default=3)
    ap.add_argument("--ab-seconds", type=float, default=8.0)
    ap.add_argument("--ab-ceiling-seconds", type=float, default=5.0)
    ap.add_argument("--mode", choices=["inline", "observability"], default="inline",
                    help="capture.mode of fleets B and B2 (parts latency, sse, ceiling, loss, rss)")
    ap.add_argument("--skip", action="append", default=[],
                    choices=["ab", "latency", "sse", "ceiling", "loss", "rss"])
    ap.add_argument("--out", default="capture.json")
    ap.add_argument("--part", choices=["workers"], help="run only this part: workers = Envoy with 1 vs 2 worker "
                    "threads and 1 vs 2 ext_proc processes, unpinned (~4 min; writes capture_workers.json)")
    ap.add_argument("--workers-rounds", type=int, default=3)
    ap.add_argument("--workers-seconds", type=float, default=6.0)
    ap.add_argument("--workers-rps", type=float, default=200.0)
    ap.add_argument("--workers-ceiling-seconds", type=float, default=5.0)
    ap.add_argument("--doc", action="store_true", help="with --part workers: write its docs/benchmarks.md section")
    args = ap.parse_args(argv)
    if args.part == "workers":
        return main_workers(args, argv)
    if args.quick:
        args.rounds, args.latency_seconds, args.sse_rounds, args.sse_seconds = 2, 2.0, 2, 2.0
        args.ceiling_rounds, args.ceiling_seconds, args.loss_seconds = 1, 2.0, 5.0
        args.rss_requests, args.rss_max_seconds = 30_000, 40.0
        args.ab_rounds, args.ab_seconds, args.ab_ceiling_seconds = 1, 2.0, 2.0
        if args.out == "capture.json":
            args.out = "capture_quick.json"
    need("wrk", "wrk")
    # this process runs the open-loop generator: pin it with the Envoys (ext_proc keeps CPU 1 alone)
    pin(os.getpid(), OTHER_CPU)
    result: dict = {"benchmark": "capture", "machine": machine(),
                    "command": "bench/capture.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "setup": {"extproc_cpu": EXTPROC_CPU, "other_cpu": OTHER_CPU, "args": vars(args),
                              "openai_json_bytes": len(OPENAI_JSON)}}
    procs: list[Proc] = []
    fleets = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lockgate-bench-capture-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            nginx, chat_port = start_nginx(tmp)
            procs.append(nginx)
            chat, sse_port = start_chat_server(tmp)
            procs.append(chat)
            b = start_fleet(tmp / "b", chat_port, sse_port, 1, {"mode": args.mode})
            fleets.append(b)
            b2 = start_fleet(tmp / "b2", chat_port, sse_port, 2, {"mode": args.mode})
            fleets.append(b2)
            from lockgate.config import load_config

            result["setup"]["extproc_filter"] = extproc_filter_summary(load_config(b.config_path))
            a_port, a_admin = free_port(), free_port()
            a = start_static_envoy(tmp, "envoy-plain", plain_bootstrap(a_port, a_admin, chat_port, sse_port),
                                   a_admin, a_port)
            procs.append(a)
            upstreams = {"nginx": nginx, "chat_server": chat, "envoy-plain": a}
            for p in upstreams.values():
                pin(p.pid, OTHER_CPU)
            pin_layout(b.procs, True)
            pin_layout(b2.procs, True)
            b_port, b2_port = b.ports["listener"], b2.ports["listener"]
            b_pids = {"envoy": b.procs["envoy-0"].pid, "extproc": b.procs["extproc"].pid,
                      "controller": b.procs["controller"].pid, "nginx": nginx.pid}
            a_pids = {"envoy": a.pid, "nginx": nginx.pid}

            # warm-up and sanity: every path answers 200 (JSON and SSE) and B stores what it sees
            for name, port in (("A", a_port), ("B", b_port), ("B2", b2_port)):
                for path, body in (("/v1/chat/completions", CHAT_BODY), ("/v1/completions", SSE_BODY)):
                    w = OpenLoop("127.0.0.1", port, 200, 1, path=path, body=body, id_prefix=f"warm{name}{path[4]}").run()
                    if w.status_counts != {200: w.sent}:
                        raise RuntimeError(f"warm-up {name} {path}: {w.summary()}")
            result["rss_mb_after_warmup"] = {"extproc": rss_mb(b.procs["extproc"].pid)}

            # (ab) capture modes × ext_proc processes against Envoy alone, in two CPU layouts
            if "ab" not in args.skip:
                result["ab"] = run_ab(args, tmp, a_port, a.pid, nginx, chat, chat_port, sse_port)
                for p in upstreams.values():
                    pin(p.pid, OTHER_CPU)
                pin_layout(b.procs, True)
                pin_layout(b2.procs, True)

            # (a) added latency at 500 rps, interleaved
            if "latency" not in args.skip:
                runs = {"A": [], "B": []}
                for rnd in range(args.rounds):
                    for key in (("A", "B") if rnd % 2 == 0 else ("B", "A")):
                        port, pids = (a_port, a_pids) if key == "A" else (b_port, b_pids)
                        snap = Snapshot(b, pids)
                        r = run_open_loop(port, 500, args.latency_seconds, f"lat{key}{rnd}")
                        d = {**r.summary(), **snap.delta(r.sent), "round": rnd, "loadavg1": os.getloadavg()[0]}
                        runs[key].append(d)
                        print(f"(a) round {rnd} {key}: {d['achieved_rps']:.0f} rps p50 {d['latency_ms']['p50']:.3f} "
                              f"p99 {d['latency_ms']['p99']:.3f} ms late p99 {d['lateness_ms']['p99']:.2f} ms "
                              f"non200 {d['sent'] - d['status_counts'].get('200', 0)} load {d['loadavg1']:.1f}", flush=True)
                result["latency"] = {"runs": runs, "summary": paired(runs, "latency_ms")}

            # (b) SSE time to first chunk, interleaved
            if "sse" not in args.skip:
                runs = {"A": [], "B": []}
                for rnd in range(args.sse_rounds):
                    for key in (("A", "B") if rnd % 2 == 0 else ("B", "A")):
                        port, pids = (a_port, a_pids) if key == "A" else (b_port, b_pids)
                        snap = Snapshot(b, pids)
                        r = run_open_loop(port, args.sse_rps, args.sse_seconds, f"sse{key}{rnd}",
                                          path="/v1/completions", body=SSE_BODY)
                        d = {**r.summary(), **snap.delta(r.sent), "round": rnd, "loadavg1": os.getloadavg()[0]}
                        runs[key].append(d)
                        print(f"(b) round {rnd} {key}: TTFT p50 {d['ttfb_ms']['p50']:.3f} p99 {d['ttfb_ms']['p99']:.3f} "
                              f"ms; complete p50 {d['latency_ms']['p50']:.2f} ms; msgs/req "
                              f"{d['extproc_msgs_per_request']:.1f}", flush=True)
                result["sse"] = {"runs": runs, "summary": paired(runs, "ttfb_ms"),
                                 "complete": paired(runs, "latency_ms")}

            # (c)(d) ceilings
            if "ceiling" not in args.skip:
                lua = write_wrk_lua(tmp)
                b2_pids = {"envoy": b2.procs["envoy-0"].pid, "extproc": b2.procs["extproc"].pid,
                           "extproc-1": b2.procs["extproc-1"].pid, "controller": b2.procs["controller"].pid,
                           "nginx": nginx.pid}
                configs = {"1 ext_proc, pinned": (b, b_pids, True), "2 ext_proc, pinned (both on CPU 1)": (b2, b2_pids, True),
                           "1 ext_proc, unpinned": (b, b_pids, False), "2 ext_proc, unpinned": (b2, b2_pids, False)}
                runs = {k: [] for k in configs}
                for rnd in range(args.ceiling_rounds):
                    keys = list(configs)
                    keys = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
                    for key in keys:
                        fl, pids, pinned = configs[key]
                        pin_layout(fl.procs, pinned)
                        for p in upstreams.values():
                            pin(p.pid, OTHER_CPU if pinned else ALL_CPUS)
                        pin(os.getpid(), OTHER_CPU if pinned else ALL_CPUS)
                        snap = Snapshot(fl, pids)
                        w = run_wrk(f"http://127.0.0.1:{fl.ports['listener']}", lua, duration_s=args.ceiling_seconds,
                                    connections=32, cpus=OTHER_CPU if pinned else ALL_CPUS,
                                    path="/v1/chat/completions")
                        d = {**w, **snap.delta(w["requests"]), "round": rnd, "loadavg1": os.getloadavg()[0]}
                        runs[key].append(d)
                        print(f"(c/d) round {rnd} {key}: {d['rps']:.0f} rps errors {d['error_pct']:.2f}% observed "
                              f"{d['observed_pct']:.1f}% timeouts {d['message_timeouts']} cpu% {d['cpu_pct']}", flush=True)
                time.sleep(1)
                for fl in (b, b2):
                    pin_layout(fl.procs, True)
                for p in upstreams.values():
                    pin(p.pid, OTHER_CPU)
                pin(os.getpid(), OTHER_CPU)
                result["ceiling"] = {"runs": runs, "summary": {
                    k: {"rps_median": median([r["rps"] for r in v]), "rps_min": min(r["rps"] for r in v),
                        "rps_max": max(r["rps"] for r in v), "error_pct_max": max(r["error_pct"] for r in v),
                        "observed_pct_median": median([r["observed_pct"] for r in v]),
                        "message_timeouts": sum(r["message_timeouts"] for r in v),
                        "p99_ms_median": median([r["p99_us"] / 1000 for r in v]),
                        "cpu_pct_median": {n: median([r["cpu_pct"][n] for r in v]) for n in v[0]["cpu_pct"]},
                        "cpu_us_per_request_median": {n: median([r["cpu_us_per_request"][n] for r in v])
                                                      for n in v[0]["cpu_us_per_request"]}}
                    for k, v in runs.items()}}

            ep_pid = b.procs["extproc"].pid
            sampler = RssSampler(b, ep_pid)
            sampler.start()

            # loss check: 1,000 rps open loop for 5 min
            if "loss" not in args.skip:
                b2.stop()  # idle, but free its memory and sockets
                fleets.remove(b2)
                snap = Snapshot(b, b_pids)
                r = run_open_loop(b_port, args.loss_rps, args.loss_seconds, "loss", timeout_s=10)
                d = {**r.summary(), **snap.delta(r.sent)}
                stored = wait_stored(b, "loss", r.sent)
                d["stored"] = stored
                d["lost"] = r.sent - stored
                if d["lost"]:
                    missing = sorted(set(r.ids) - stored_ids(b, "loss"), key=lambda s: int(s.split("-")[1]))
                    d["missing_examples"] = missing[:20]
                d["loadavg"] = os.getloadavg()
                result["loss"] = d
                print(f"(loss) sent {r.sent} at {r.achieved_rps:.1f} rps, non200 {r.sent - r.ok}, stored {stored}, "
                      f"lost {d['lost']}, dropped {d['dropped']}, message timeouts {d['message_timeouts']}, "
                      f"p50 {d['latency_ms']['p50']:.2f} p99 {d['latency_ms']['p99']:.2f} ms", flush=True)

            # (e) RSS: keep going (wrk closed loop, unpinned for throughput) until the ext_proc process has
            # seen rss_requests responses since the sampler started (the loss check's count included)
            if "rss" not in args.skip:
                lua = write_wrk_lua(tmp)
                pin_layout(b.procs, False)
                for p in upstreams.values():
                    pin(p.pid, ALL_CPUS)
                t0 = time.monotonic()
                errors = wrk_requests = 0
                while sampler.seen() < args.rss_requests and time.monotonic() - t0 < args.rss_max_seconds:
                    chunk = int(min(20.0, args.rss_max_seconds - (time.monotonic() - t0)))
                    if chunk < 1:
                        break
                    w = run_wrk(f"http://127.0.0.1:{b_port}", lua, duration_s=chunk, connections=16, cpus=ALL_CPUS,
                                path="/v1/chat/completions")
                    errors += w["errors"]
                    wrk_requests += w["requests"]
                    print(f"(e) {sampler.seen():,.0f} responses seen by ext_proc, RSS {rss_mb(ep_pid):.1f} MB, "
                          f"{w['rps']:.0f} rps", flush=True)
                time.sleep(3)
                sampler.stop()
                samples = sampler.samples

                def at(n):
                    return next((x for x in samples if x["requests"] >= n), None)

                s100k, s1m = at(100_000), at(args.rss_requests)
                end = samples[-1]
                result["rss"] = {"samples": samples, "wrk_errors": errors, "wrk_requests": wrk_requests,
                                 "requests": end["requests"], "base": samples[0], "at_100k": s100k, "at_1m": s1m,
                                 "end": end, "max_mb": max(x["extproc_rss_mb"] for x in samples),
                                 "growth_100k_to_end_mb": end["extproc_rss_mb"] - (s100k or samples[0])["extproc_rss_mb"],
                                 "growth_base_to_end_mb": end["extproc_rss_mb"] - samples[0]["extproc_rss_mb"],
                                 "wrk_seconds": round(time.monotonic() - t0, 1)}
            sampler.stop()
        finally:
            for fl in fleets:
                fl.stop()
            for p in reversed(procs):
                p.stop()
    result["loadavg_at_end"] = os.getloadavg()
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    result["summary"] = summarize(result)
    out = save_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return result


def main_workers(args, argv: list[str] | None) -> dict:
    """``--part workers``: nginx and chat_server, then :func:`run_workers`; raw JSON to bench/results/."""
    need("wrk", "wrk")
    if args.quick:
        args.workers_rounds, args.workers_seconds, args.workers_ceiling_seconds = 1, 2.0, 2.0
    pin(os.getpid(), ALL_CPUS)
    result: dict = {"benchmark": "capture_workers", "machine": machine(),
                    "command": "bench/capture.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "setup": {"args": vars(args), "openai_json_bytes": len(OPENAI_JSON)}}
    t_start = time.monotonic()
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="lockgate-bench-workers-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            nginx, chat_port = start_nginx(tmp)
            procs.append(nginx)
            chat, sse_port = start_chat_server(tmp)
            procs.append(chat)
            result["workers"] = run_workers(args, tmp, nginx, chat, chat_port, sse_port)
        finally:
            for p in reversed(procs):
                p.stop()
    result["loadavg_at_end"] = os.getloadavg()
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    out = save_json("capture_workers_quick.json" if args.quick else "capture_workers.json", result)
    print(render_workers(result))
    if args.doc and not args.quick:
        write_doc_section("capture_workers", render_workers(result))
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return result


def paired(runs: dict, field: str) -> dict:
    out = {}
    for key in ("A", "B"):
        out[key] = {q: median([r[field][q] for r in runs[key]]) for q in ("p50", "p99")}
        out[key]["achieved_rps"] = median([r["achieved_rps"] for r in runs[key]])
        out[key]["non_200"] = sum(r["sent"] - r["status_counts"].get("200", 0) for r in runs[key])
        out[key]["failures"] = sum(r["failures"] for r in runs[key])
    for q in ("p50", "p99"):
        diffs = [b[field][q] - a[field][q] for a, b in zip(runs["A"], runs["B"])]
        out[f"added_{q}_ms"] = median(diffs)
        out[f"added_{q}_ms_per_round"] = diffs
    out["extproc_msgs_per_request"] = median([r["extproc_msgs_per_request"] for r in runs["B"]])
    out["cpu_us_per_request_B"] = {n: median([r["cpu_us_per_request"][n] for r in runs["B"]])
                                   for n in runs["B"][0]["cpu_us_per_request"]}
    out["cpu_us_per_request_A"] = {n: median([r["cpu_us_per_request"][n] for r in runs["A"]])
                                   for n in runs["A"][0]["cpu_us_per_request"]}
    out["observed_pct_B"] = median([r["observed_pct"] for r in runs["B"]])
    out["message_timeouts_B"] = sum(r["message_timeouts"] for r in runs["B"])
    return out


def summarize(res: dict) -> dict:
    s: dict = {}
    if "latency" in res:
        lat = res["latency"]["summary"]
        s["added_p50_ms"], s["added_p99_ms"] = lat["added_p50_ms"], lat["added_p99_ms"]
        s["latency_target_p50_met"] = lat["added_p50_ms"] <= 0.8
        s["latency_target_p99_met"] = lat["added_p99_ms"] <= 1.5
    if "sse" in res:
        s["sse_ttft_added_p50_ms"] = res["sse"]["summary"]["added_p50_ms"]
        s["sse_target_met"] = s["sse_ttft_added_p50_ms"] <= 1.5
    if "ceiling" in res:
        c = res["ceiling"]["summary"]
        s["ceiling_rps"] = {k: v["rps_median"] for k, v in c.items()}
        s["one_extproc_ceiling_target_met"] = c["1 ext_proc, pinned"]["rps_median"] >= 3000
    if "loss" in res:
        lo = res["loss"]
        s["loss"] = {"sent": lo["sent"], "stored": lo["stored"], "lost": lo["lost"], "achieved_rps": lo["achieved_rps"],
                     "dropped": lo["dropped"], "message_timeouts": lo["message_timeouts"]}
        s["loss_target_met"] = lo["lost"] == 0 and abs(lo["achieved_rps"] - lo["target_rps"]) <= 0.05 * lo["target_rps"]
    if "rss" in res:
        r = res["rss"]
        s["rss"] = {"base_mb": r["base"]["extproc_rss_mb"], "at_100k_mb": (r["at_100k"] or {}).get("extproc_rss_mb"),
                    "at_1m_mb": (r["at_1m"] or {}).get("extproc_rss_mb"), "end_mb": r["end"]["extproc_rss_mb"],
                    "max_mb": r["max_mb"], "requests": r["requests"]}
        s["rss_target_met"] = r["at_1m"] is not None and abs(r["growth_100k_to_end_mb"]) <= 20
    return s


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------
# docs/benchmarks.md section (called by bench/run_all.py)
# ----------------------------------------------------------------------------------------------
def _f(x, nd=2) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def render(d: dict) -> str:
    from run_all import machine_lines

    s, st, m = d["summary"], d["setup"], d["machine"]
    lines = ["## Inline response capture: added latency, SSE time to first token, ceiling, loss, memory", ""]
    lines += machine_lines(m, d["command"])
    pm = st.get("extproc_filter", {}).get("processing_mode", {})
    lines += [
        f"- Setup: nginx (1 worker) answering a {st['openai_json_bytes']}-byte OpenAI chat completion; "
        "`lockgate.examples.chat_server` for SSE (`stream: true`, `--ttft-ms 2 --inter-token-ms 1`, 10 tokens); "
        "**A** = plain Envoy (static routes to the same upstreams, router only); **B** = lockgate "
        "(`lockgate xds` + `lockgate extproc` + `lockgate controller` + Envoy): full capture, i.e. ext_proc "
        f"`{json.dumps(pm)}` with {len(st.get('extproc_filter', {}).get('response_attributes', []))} response "
        "attributes, every response stored by the controller; **B2** = B with `extproc_processes: 2` (two ext_proc "
        "processes, two endpoints of Envoy's ext_proc cluster). Envoys run `--concurrency 1`.",
        f"- Pinning (`taskset -a -cp`, all threads): ext_proc process(es) alone on CPU {st['extproc_cpu']}; Envoys, "
        f"nginx, chat_server, xds, controller, wrk and the load generator on CPU {st['other_cpu']} (the layout of "
        "the team's earlier ext_proc speed study). \"Unpinned\" runs re-pin everything to CPUs 0-1. Other jobs on the shared machine are not "
        "pinned and ran on both CPUs during the whole run (load averages and per-CPU busy % are recorded per run "
        "in the JSON).",
        "- Load: `bench/_loadgen.py`, open loop (request *i* due at *i*/rate; keep-alive connections, more opened "
        "when all are busy; lateness, failures and achieved rate recorded), unique `x-request-id` and random "
        "`x-user-id` per request. Latency = request written → response complete; SSE time to first token = "
        "request written → first body chunk. Ceilings: wrk closed loop, 1 thread, 32 connections.",
        "",
        "### Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    if "latency" in d:
        lat = d["latency"]["summary"]
        lines.append(f"| full capture at 500 rps adds ≤ 0.8 ms p50 | {_f(lat['added_p50_ms'], 3)} ms | "
                     f"{_met(s['latency_target_p50_met'])} |")
        lines.append(f"| … and ≤ 1.5 ms p99 | {_f(lat['added_p99_ms'], 3)} ms | {_met(s['latency_target_p99_met'])} |")
    if "sse" in d:
        lines.append(f"| SSE time to first token added ≤ 1.5 ms p50 | {_f(s['sse_ttft_added_p50_ms'], 3)} ms | "
                     f"{_met(s['sse_target_met'])} |")
    if "loss" in d:
        lo = d["loss"]
        lines.append(f"| 0 observations lost at 1,000 rps for {lo['duration_s']:g} s | {lo['lost']:,} of "
                     f"{lo['sent']:,} lost (achieved {lo['achieved_rps']:.1f} rps) | {_met(s['loss_target_met'])} |")
    if "ceiling" in d:
        c = d["ceiling"]["summary"]["1 ext_proc, pinned"]
        lines.append(f"| one ext_proc ≥ 3,000 rps | {_f(c['rps_median'], 0)} rps (pinned; unpinned "
                     f"{_f(d['ceiling']['summary']['1 ext_proc, unpinned']['rps_median'], 0)}) | "
                     f"{_met(s['one_extproc_ceiling_target_met'])} |")
    if "rss" in d:
        r = s["rss"]
        lines.append(f"| ext_proc RSS flat ±20 MB from 100k to 1M requests | {_f(r['at_100k_mb'], 1)} MB at 100k, "
                     f"{_f(r['at_1m_mb'], 1)} MB at 1M ({r['requests']:,} reached; start {_f(r['base_mb'], 1)} MB, "
                     f"max {_f(r['max_mb'], 1)} MB) | {_met(s['rss_target_met'])} |")

    if "latency" in d:
        lat = d["latency"]["summary"]
        runs = d["latency"]["runs"]
        lines += ["", f"### (a) Added latency at 500 rps ({len(runs['A'])} interleaved rounds of "
                      f"{st['args']['latency_seconds']:g} s each, A B / B A)", "",
                  "| path | achieved rps | p50 ms | p99 ms | non-200 | ext_proc msgs / request | CPU µs / request |",
                  "|---|---|---|---|---|---|---|"]
        for key, label in (("A", "A: plain Envoy"), ("B", "B: lockgate full capture")):
            x = lat[key]
            cpu = lat[f"cpu_us_per_request_{key}"]
            lines.append(f"| {label} | {x['achieved_rps']:.1f} | {_f(x['p50'], 3)} | {_f(x['p99'], 3)} | "
                         f"{x['non_200'] + x['failures']} | {_f(lat['extproc_msgs_per_request'], 2) if key == 'B' else '0'} | "
                         f"{', '.join(f'{n} {v:.0f}' for n, v in cpu.items())} |")
        loads = ", ".join("%.1f" % r["loadavg1"] for r in runs["B"])
        busy = ", ".join("%.0f %%" % r["machine_cpu_busy_pct"].get("cpu" + st["extproc_cpu"], 0) for r in runs["B"])
        ep_pct = ", ".join("%.0f %%" % r["cpu_pct"]["extproc"] for r in runs["B"])
        lines += ["", f"B − A per round, p50: {', '.join(_f(x, 3) for x in lat['added_p50_ms_per_round'])} ms; "
                      f"p99: {', '.join(_f(x, 2) for x in lat['added_p99_ms_per_round'])} ms. "
                      f"Load average (1 min) per B run: {loads}; CPU {st['extproc_cpu']} busy per B run: {busy} "
                      f"(of which ext_proc: {ep_pct}). "
                      f"Observations: ext_proc saw {lat['observed_pct_B']:.1f} % of B's responses (median), Envoy "
                      f"counted {lat['message_timeouts_B']} ext_proc message timeouts."]
    if "sse" in d:
        sse = d["sse"]["summary"]
        comp = d["sse"]["complete"]
        lines += ["", f"### (b) SSE time to first token ({st['args']['sse_rps']:g} rps open loop, "
                      f"{len(d['sse']['runs']['A'])} interleaved rounds of {st['args']['sse_seconds']:g} s)", "",
                  "| path | TTFT p50 ms | TTFT p99 ms | whole stream p50 ms | ext_proc msgs / request |",
                  "|---|---|---|---|---|"]
        for key, label in (("A", "A: plain Envoy"), ("B", "B: lockgate full capture")):
            lines.append(f"| {label} | {_f(sse[key]['p50'], 3)} | {_f(sse[key]['p99'], 3)} | {_f(comp[key]['p50'], 2)} | "
                         f"{_f(sse['extproc_msgs_per_request'], 1) if key == 'B' else '0'} |")
        lines += ["", f"Added TTFT B − A per round, p50: {', '.join(_f(x, 3) for x in sse['added_p50_ms_per_round'])} ms."]
    if "ceiling" in d:
        c = d["ceiling"]["summary"]
        lines += ["", f"### (c)(d) Ceiling (wrk closed loop, 32 connections, {st['args']['ceiling_seconds']:g} s, "
                      f"{st['args']['ceiling_rounds']} interleaved rounds)", "",
                  "| config | rps median (min–max) | errors | responses observed by ext_proc | message timeouts | "
                  "CPU % per process (median) |", "|---|---|---|---|---|---|"]
        for k, v in c.items():
            lines.append(f"| {k} | {_f(v['rps_median'], 0)} ({_f(v['rps_min'], 0)}–{_f(v['rps_max'], 0)}) | "
                         f"{v['error_pct_max']:.2f} % | {v['observed_pct_median']:.1f} % | {v['message_timeouts']} | "
                         f"{', '.join(f'{n} {p:.0f}' for n, p in v['cpu_pct_median'].items())} |")
    if "loss" in d:
        lo = d["loss"]
        lines += ["", f"### Loss check: {lo['target_rps']:g} rps for {lo['duration_s']:g} s (open loop)", "",
                  f"Sent {lo['sent']:,} (achieved {lo['achieved_rps']:.1f} rps, lateness p99 {lo['lateness_ms']['p99']:.1f} ms, "
                  f"{lo['failures']} client failures, statuses {lo['status_counts']}); stored observations "
                  f"{lo['stored']:,}; lost {lo['lost']:,}; ext_proc dropped counter {lo['dropped']:.0f}; Envoy ext_proc "
                  f"message timeouts {lo['message_timeouts']:,} (failure_mode_allowed {lo['failure_mode_allowed']:,}); "
                  f"latency p50 {lo['latency_ms']['p50']:.2f} ms, p99 {lo['latency_ms']['p99']:.2f} ms; CPU % "
                  f"{', '.join(f'{n} {p:.0f}' for n, p in lo['cpu_pct'].items())}; machine CPUs busy "
                  f"{', '.join(f'{n} {p:.0f} %' for n, p in lo['machine_cpu_busy_pct'].items())}."]
    if "rss" in d:
        r = d["rss"]
        smp = r["samples"]
        marks = [0, 100_000, 200_000, 300_000, 500_000, 750_000, 1_000_000]
        picked = []
        for mk in marks:
            x = next((x for x in smp if x["requests"] >= mk), None)
            if x is not None and x not in picked:
                picked.append(x)
        if smp[-1] not in picked:
            picked.append(smp[-1])
        lines += ["", f"### (e) ext_proc memory over {r['requests']:,} responses (the loss check's, then wrk closed loop "
                      f"unpinned for {r['wrk_seconds']:g} s, bounded to {st['args']['rss_max_seconds']:g} s)", "",
                  "| responses seen by ext_proc | t (s) | ext_proc RSS MB | controller RSS MB | shipper queue |",
                  "|---|---|---|---|---|"]
        for x in picked:
            lines.append(f"| {x['requests']:,} | {x['t_s']:g} | {x['extproc_rss_mb']:.1f} | {x['controller_rss_mb']:.1f} | "
                         f"{x['queued']:.0f} |")
        lines += ["", f"RSS after warm-up (before the sampled phase): {d.get('rss_mb_after_warmup', {}).get('extproc', float('nan')):.1f} MB."]
    if "ab" in d:
        lines += [""] + render_ab(d)
    lines += ["", "### Reading", ""] + reading(d)
    notes = d.get("notes")
    if notes:
        lines += ["", "Notes added after this run:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def reading(d: dict) -> list[str]:
    """Plain-language reading generated from the numbers of this run (every claim follows from them)."""
    out = []
    if "latency" in d:
        lat = d["latency"]["summary"]
        runs = d["latency"]["runs"]["B"]
        ep_cpu = median([r["cpu_pct"]["extproc"] for r in runs])
        busy = median([r["machine_cpu_busy_pct"].get("cpu" + d["setup"]["extproc_cpu"], 0) for r in runs])
        cb, ca = lat["cpu_us_per_request_B"], lat["cpu_us_per_request_A"]
        out.append(
            f"- Main cost: every captured response is {lat['extproc_msgs_per_request']:.0f} ext_proc round trips for a "
            f"JSON body (response headers + one body chunk) and {d.get('sse', {}).get('summary', {}).get('extproc_msgs_per_request', float('nan')):.0f} "
            f"for a 10-token SSE stream (one per chunk); Envoy waits for each answer. CPU per request at 500 rps: "
            f"ext_proc {cb.get('extproc', 0):.0f} µs, Envoy {cb.get('envoy', 0):.0f} µs (plain Envoy {ca.get('envoy', 0):.0f} µs), "
            f"controller {cb.get('controller', 0):.0f} µs. At this rate the CPUs are mostly idle, so the cost per "
            f"request includes waking each process (on this VM a wake-up is expensive); at the ceiling ext_proc "
            f"needs far less per request (see below).")
        p50s, p99s = lat["added_p50_ms_per_round"], lat["added_p99_ms_per_round"]
        out.append(
            f"- Spread over rounds: added p50 {min(p50s):.2f}–{max(p50s):.2f} ms, added p99 {min(p99s):.2f}–"
            f"{max(p99s):.2f} ms; during B's runs CPU {d['setup']['extproc_cpu']} was {busy:.0f} % busy (median), "
            f"ext_proc {ep_cpu:.0f} % of it. The p99 is the tail of the round trips through grpcio's threads plus the "
            f"controller storing every observation on the same 2 CPUs; docs/observations.md (\"How the ext_proc server "
            f"keeps its cost down\") has the A/Bs: what was cut and what is left.")
    if "loss" in d:
        lo = d["loss"]
        timeout_ms = d["setup"].get("extproc_filter", {}).get("message_timeout_ms")
        out.append(
            f"- Loss: an observation is lost when Envoy stops waiting for ext_proc (`message_timeout`"
            + (f", {timeout_ms:g} ms" if timeout_ms else "") + ") and lets the response pass (`failure_mode_allow`): "
            f"{lo['message_timeouts']:,} message timeouts, {lo['lost']:,} observations missing, while ext_proc's own "
            f"`lockgate_observations_dropped_total` stayed {lo['dropped']:.0f}. Such losses are counted by Envoy "
            f"(`http.lockgate.ext_proc.lockgate.message_timeouts` / `failure_mode_allowed`), which the controller "
            f"exports as `lockgate_envoy_extproc_unobserved`.")
    if "ceiling" in d:
        c = d["ceiling"]["summary"]
        one, two = c["1 ext_proc, pinned"], c["2 ext_proc, pinned (both on CPU 1)"]
        one_u, two_u = c["1 ext_proc, unpinned"], c["2 ext_proc, unpinned"]
        ep_us = one.get("cpu_us_per_request_median", {}).get("extproc")
        out.append(
            f"- Ceiling: one ext_proc process pinned to its own CPU serves {_f(one['rps_median'], 0)} rps"
            + (f" at {ep_us:.0f} µs of CPU per response" if ep_us else "") + ". Several ext_proc processes: Envoy "
            f"splits streams over the endpoints (both processes show the same CPU), but on this 2-CPU machine there is "
            f"no spare core to scale onto: two processes sharing one CPU, {_f(two['rps_median'], 0)} rps; unpinned "
            f"(sharing both CPUs with Envoy) {_f(one_u['rps_median'], 0)} → {_f(two_u['rps_median'], 0)} rps. "
            f"Errors at the ceiling: {max(v['error_pct_max'] for v in c.values()):.2f} % at most; message timeouts: "
            f"{sum(v['message_timeouts'] for v in c.values())}.")
    if "rss" in d:
        r = d["rss"]
        smp = r["samples"]
        a, b = smp[0], smp[-1]
        slope = (b["extproc_rss_mb"] - a["extproc_rss_mb"]) / max(1, b["requests"] - a["requests"]) * 100_000
        flat = abs(b["extproc_rss_mb"] - a["extproc_rss_mb"]) <= 5
        out.append(
            f"- Memory: ext_proc RSS {a['extproc_rss_mb']:.1f} → {b['extproc_rss_mb']:.1f} MB over {b['requests']:,} "
            f"responses (max {r['max_mb']:.1f} MB; ≈ {slope:.2f} MB per 100k, {slope * 10:.1f} bytes per response)"
            + (": flat. Before the ext_proc sent its last answer without awaiting it, grpcio leaked a failed status "
               "batch for each stream Envoy reset first (grpc/grpc#43360), ~30 B per response." if flat else
               ": growing.")
            + f" The controller: {a['controller_rss_mb']:.0f} → {b['controller_rss_mb']:.0f} MB.")
    return out


def render_ab(d: dict) -> list[str]:
    """The (ab) part: capture modes × ext_proc processes against Envoy alone, per CPU layout."""
    ab, st = d["ab"], d["setup"]["args"]
    lines = [f"### (ab) Capture modes and ext_proc processes against Envoy alone, in two CPU layouts "
             f"({st['ab_rounds']} interleaved rounds per layout: open loop 500 rps for {st['ab_seconds']:g} s, then wrk "
             f"closed loop, 32 connections, {st['ab_ceiling_seconds']:g} s)", "",
             "Layouts (`taskset`, every thread): " + "; ".join(
                 f"**{k}**: load generator and wrk on CPU {v['load_cpus']}, Envoy + lockgate's processes + nginx on "
                 f"CPU {v['server_cpus']}" for k, v in ab["layouts"].items()) + ". Envoy alone (A) runs in the same "
             "layout, on the same CPU, in the same rounds; every ratio is to A of the same round (latency, ceiling) "
             "or the same layout (CPU).", ""]
    for layout, rows in ab["summary"].items():
        a = rows["A"]
        lines += [f"**{layout}** — Envoy alone: p50 {a['p50']:.3f} ms, p99 {a['p99']:.3f} ms at 500 rps, "
                  f"{a['envoy_cpu_us_per_request']:.0f} µs CPU per request (at its ceiling "
                  f"{a['envoy_cpu_us_per_request_at_ceiling']:.0f} µs), ceiling {a['ceiling_rps']:,.0f} rps.", "",
                  "| variant | added p50 / p99 ms at 500 rps | CPU µs per captured response at 500 rps: ext_proc, controller, "
                  "Envoy | (ext_proc + controller) ÷ Envoy alone per request: at 500 rps / at the ceiling | ceiling rps "
                  "(÷ Envoy alone) | observed at 500 rps / ceiling (by the end of the run) | ext_proc msgs per request |",
                  "|---|---|---|---|---|---|---|"]
        for key, r in rows.items():
            if key == "A":
                continue
            c = r["cpu_us_per_request"]
            lines.append(
                f"| {key} | {r['added_p50_ms']:+.3f} / {r['added_p99_ms']:+.3f} | {c['extproc']:.0f}, {c['controller']:.0f}, "
                f"{c['envoy']:.0f} | {r['capture_cpu_ratio']:.2f}× / {r['capture_cpu_ratio_at_ceiling']:.2f}× | "
                f"{r['ceiling_rps']:,.0f} ({100 * r['ceiling_ratio']:.0f} %) | {r['observed_pct_500']:.1f} % / "
                f"{r['observed_pct_ceiling']:.1f} % | {r['extproc_msgs_per_request']:.1f} |")
        lines.append("")
    return lines
