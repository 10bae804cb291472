"""Weight-push propagation: `lockgate set-weight` / `lockgate rollback` → every Envoy ACKed, and → the
last request that still reached the canary, under continuous traffic, with 2 Envoys.

    .venv/bin/python bench/weight_push.py [--trials 24] [--rps 300]

Setup: a real lockgate fleet (``lockgate xds`` + ``lockgate extproc`` + 2 Envoys 1.40 with
``--concurrency 1`` sharing the listener port through SO_REUSEPORT), model ``chat`` with stable v1 and
canary v2 served by one nginx (two ports; every response carries ``x-model-version``). Envoys and nginx
are pinned to CPU 0; the xDS/ext_proc servers, this script (traffic generator) and the CLI processes to
CPU 1.

Traffic: an open-loop Python asyncio client, ``--rps`` requests per second spread over 16 keep-alive
connections (kernel-balanced over both Envoys), each request with a random ``x-user-id`` out of 10,000;
it records every request's send time (epoch), status and served version (``x-model-version``).

Each trial runs the real CLI (``python -m lockgate set-weight chat v2 20 --json``, then
``python -m lockgate rollback chat --json``) with a pause between, and records:

* ACK: the control API's ``elapsedMs`` (push → last Envoy ACK) and per-Envoy ``ackMs``;
* set-weight → first request *sent* after the push that reached the canary;
* rollback → last request *sent* that still reached the canary, relative to the push time
  (``pushedAt``, the epoch time at which the xDS server handed the new routes to the streams);
  negative when the last canary request was sent before the push;
* the wall time of the whole CLI command (Python start-up + gRPC call), for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, Nginx, machine, median, need, pct, pin, save_json  # noqa: E402
from routing_latency import make_fleet  # noqa: E402

ENVOY_CPU = "0"
CLIENT_CPU = "1"


class Traffic(threading.Thread):
    """Open-loop keep-alive HTTP/1.1 load: ``rps`` over ``conns`` connections; records every request."""

    def __init__(self, port: int, rps: float, conns: int = 16, users: int = 10000, path: str = "/v1/chat"):
        super().__init__(daemon=True)
        self.port, self.rps, self.conns, self.users, self.path = port, rps, conns, users, path
        self.records: list[tuple[float, float, int, str]] = []  # (sent epoch, latency s, status, version)
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self._stop_evt = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._main())
        self._loop.close()

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(15)

    async def _main(self) -> None:
        await asyncio.gather(*(self._worker(i) for i in range(self.conns)))

    async def _worker(self, i: int) -> None:
        period = self.conns / self.rps
        rng = random.Random(i)
        next_t = time.monotonic() + i * period / self.conns
        reader = writer = None
        while not self._stop_evt.is_set():
            now = time.monotonic()
            if next_t > now:
                await asyncio.sleep(next_t - now)
            next_t = max(next_t + period, time.monotonic())  # open loop, but never burst to catch up
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                user = f"u{rng.randrange(self.users)}"
                req = (f"GET {self.path} HTTP/1.1\r\nhost: bench\r\nx-user-id: {user}\r\n\r\n").encode()
                sent = time.time()
                t0 = time.monotonic()
                writer.write(req)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                headers = {}
                for line in lines[1:]:
                    k, sep, v = line.partition(":")
                    if sep:
                        headers[k.strip().lower()] = v.strip()
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    await asyncio.wait_for(self._read_chunked(reader), 5)
                else:
                    n = int(headers.get("content-length", "0"))
                    if n:
                        await asyncio.wait_for(reader.readexactly(n), 5)
                self.records.append((sent, time.monotonic() - t0, status, headers.get("x-model-version", "?")))
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as exc:
                self.errors += 1
                kind = type(exc).__name__
                self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> None:
        # lockgate's ext_proc streams response bodies (STREAMED), so Envoy answers chunked
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the blank line
                    pass
                return
            await reader.readexactly(size + 2)


def run_cli(fleet, *args: str) -> tuple[dict, float]:
    t0 = time.monotonic()
    r = fleet.cli(*args, "--json")
    wall = (time.monotonic() - t0) * 1000
    if r.returncode not in (0, 1) or not r.stdout.strip():
        raise RuntimeError(f"lockgate {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout), wall


def ack_fields(resp: dict) -> dict:
    envoys = resp["model"]["envoys"]
    return {"elapsed_ms": resp["elapsedMs"], "all_acked": resp["allAcked"], "pushed_at": resp["pushedAt"],
            "ack_ms": {e["nodeId"]: e["ackMs"] for e in envoys}, "n_envoys": len(envoys)}


def stats(xs: list[float]) -> dict:
    return {"n": len(xs), "median": median(xs), "p90": pct(xs, 90), "max": max(xs) if xs else None,
            "min": min(xs) if xs else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--rps", type=float, default=300.0)
    ap.add_argument("--canary-pct", type=float, default=50.0,
                    help="canary weight while up (50: dense canary traffic, so the last canary request is resolved finely)")
    ap.add_argument("--hold-seconds", type=float, default=0.8, help="traffic time after each push")
    ap.add_argument("--envoys", type=int, default=2)
    ap.add_argument("--out", default="weight_push.json")
    args = ap.parse_args(argv)
    need("nginx", "nginx-light")
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {int(CLIENT_CPU)})  # this process, its traffic thread and the CLI children

    from tests.harness import Fleet

    result: dict = {"benchmark": "weight_push", "machine": machine(),
                    "command": "bench/weight_push.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "setup": {"envoys": args.envoys, "rps": args.rps, "connections": 16, "users": 10000,
                              "canary_pct": args.canary_pct, "trials": args.trials, "hold_seconds": args.hold_seconds,
                              "envoy_cpu": ENVOY_CPU, "client_cpu": CLIENT_CPU}}
    trials: list[dict] = []
    fleet = nginx = traffic = None
    with tempfile.TemporaryDirectory(prefix="lockgate-bench-wp-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            nginx = Nginx(tmp, ["v1", "v2"])
            pin(nginx.proc.pid, ENVOY_CPU)
            fleet_dir = tmp / "fleet"
            fleet_dir.mkdir()
            models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
                       "versions": {"v1": {"endpoints": [f"127.0.0.1:{nginx.ports['v1']}"]},
                                    "v2": {"endpoints": [f"127.0.0.1:{nginx.ports['v2']}"]}}}]
            fleet = make_fleet(Fleet, fleet_dir, models, args.envoys)
            fleet.start()
            for i in range(args.envoys):
                pin(fleet.procs[f"envoy-{i}"].pid, ENVOY_CPU)
            for name in ("xds", "extproc", "controller"):
                if name in fleet.procs:
                    pin(fleet.procs[name].pid, CLIENT_CPU)
            result["setup"]["lockgate_processes"] = sorted(fleet.procs)
            rq0 = [fleet.stat(i, "http.lockgate.downstream_rq_total") or 0 for i in range(args.envoys)]

            traffic = Traffic(fleet.ports["listener"], args.rps)
            traffic.start()
            time.sleep(1.0)
            for k in range(args.trials):
                up, up_wall = run_cli(fleet, "set-weight", "chat", "v2", f"{args.canary_pct:g}")
                time.sleep(args.hold_seconds)
                down, down_wall = run_cli(fleet, "rollback", "chat")
                time.sleep(args.hold_seconds)
                trials.append({"trial": k, "set_weight": {**ack_fields(up), "cli_wall_ms": up_wall},
                               "rollback": {**ack_fields(down), "cli_wall_ms": down_wall}})
                print(f"trial {k}: set-weight ACK {up['elapsedMs']:.1f} ms, rollback ACK {down['elapsedMs']:.1f} ms "
                      f"({len(down['model']['envoys'])} Envoys, all ACKed {down['allAcked']})", flush=True)
            time.sleep(0.5)
            traffic.stop()
            rq1 = [fleet.stat(i, "http.lockgate.downstream_rq_total") or 0 for i in range(args.envoys)]
            result["per_envoy_requests"] = [b - a for a, b in zip(rq0, rq1)]
        finally:
            if traffic is not None and traffic.is_alive():
                traffic.stop()
            if fleet is not None:
                fleet.stop()
            if nginx is not None:
                nginx.stop()

    recs = sorted(traffic.records)
    bad = sum(1 for r in recs if r[2] != 200)
    canary_sends = [r[0] for r in recs if r[3] == "v2"]
    for idx, t in enumerate(trials):
        up_at = t["set_weight"]["pushed_at"]
        down_at = t["rollback"]["pushed_at"]
        next_up = trials[idx + 1]["set_weight"]["pushed_at"] if idx + 1 < len(trials) else float("inf")
        in_up = [s for s in canary_sends if up_at <= s < down_at]
        t["set_weight"]["first_canary_sent_ms"] = (min(in_up) - up_at) * 1000 if in_up else None
        t["canary_requests_during_canary"] = len(in_up)
        window = [s for s in canary_sends if up_at <= s < next_up]
        t["rollback"]["last_canary_sent_ms"] = (max(window) - down_at) * 1000 if window else None
        t["rollback"]["canary_sent_after_push"] = sum(1 for s in window if s >= down_at)
        t["requests_in_trial"] = sum(1 for r in recs if up_at <= r[0] < next_up)

    def col(section: str, key: str) -> list[float]:
        return [t[section][key] for t in trials if t[section].get(key) is not None]

    per_envoy_rb = [ms for t in trials for ms in t["rollback"]["ack_ms"].values()]
    summary = {
        "set_weight_all_acked_ms": stats(col("set_weight", "elapsed_ms")),
        "set_weight_first_canary_sent_ms": stats(col("set_weight", "first_canary_sent_ms")),
        "rollback_all_acked_ms": stats(col("rollback", "elapsed_ms")),
        "rollback_per_envoy_ack_ms": stats(per_envoy_rb),
        "rollback_last_canary_sent_ms": stats(col("rollback", "last_canary_sent_ms")),
        "rollback_canary_sent_after_push_total": sum(t["rollback"]["canary_sent_after_push"] for t in trials),
        "rollback_trials_last_canary_before_last_ack": sum(
            1 for t in trials if t["rollback"].get("last_canary_sent_ms") is not None
            and t["rollback"]["last_canary_sent_ms"] <= t["rollback"]["elapsed_ms"]),
        "set_weight_cli_wall_ms": stats(col("set_weight", "cli_wall_ms")),
        "rollback_cli_wall_ms": stats(col("rollback", "cli_wall_ms")),
        "all_trials_all_acked": all(t["set_weight"]["all_acked"] and t["rollback"]["all_acked"] and
                                    t["rollback"]["n_envoys"] == args.envoys for t in trials),
        "requests": len(recs), "non_200": bad, "client_errors": traffic.errors,
        "client_error_kinds": traffic.error_kinds,
        "achieved_rps": len(recs) / (recs[-1][0] - recs[0][0]) if len(recs) > 1 else 0.0,
        "client_latency_ms_p50_p99": [pct([r[1] * 1000 for r in recs], 50), pct([r[1] * 1000 for r in recs], 99)],
    }
    rb = summary["rollback_all_acked_ms"]
    summary["targets"] = {"rollback_median_ms_max": 50, "rollback_max_ms_max": 250,
                          "median_met": rb["median"] <= 50, "max_met": rb["max"] <= 250}
    result["summary"] = summary
    result["trials"] = trials
    out = save_json(args.out, result)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out.relative_to(REPO)}")
    return result


if __name__ == "__main__":
    main()
