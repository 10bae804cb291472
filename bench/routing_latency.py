"""Latency the lockgate routing path adds, versus the same Envoy without it, measured side by side.

    .venv/bin/python bench/routing_latency.py [--rounds 5] [--latency-seconds 8] [--ceiling-seconds 4]

Three Envoys (1.40, ``--concurrency 1``) run at once, each in front of the same nginx upstream:

* **A — plain Envoy**: a hand-written static bootstrap, one route to one static cluster, router only.
* **B — lockgate**: Envoy driven by ``lockgate xds`` (ADS) with lockgate's sticky
  ``use_hash_policy`` routes (canary v2 at 10 %) and ``lockgate extproc`` on response headers
  (request SKIP / response-headers SEND) — exactly what ``lockgate up`` runs.
* **C — lockgate routes, no ext_proc**: the same listener, routes and clusters rendered statically from
  ``lockgate.xds.resources.build_resources`` with the ext_proc filter removed (what the hash policy
  and weighted split cost on their own).

Pinning (2 cores): the three Envoys and nginx on CPU 0; wrk, ``lockgate extproc`` and ``lockgate xds`` on
CPU 1. Each round runs A, B, C in a rotated order (A B C, B C A, C A B, …) so machine noise is spread
over all three; the reported figure is the median over rounds, and "added" is the median of the
per-round paired differences B − A (and C − A).

Load: ``wrk`` (one thread, 20 keep-alive connections, a random ``x-user-id`` out of 100,000 per
request). wrk has no fixed-rate mode, so the "500 rps" runs pace each connection with a Lua ``delay()``
of a random 0–78 ms (mean 39 ms): offered ≈ 20 / (39 ms + latency) ≈ 500 rps; the achieved rate of each
run is recorded. The ceiling is wrk closed-loop (32 connections, no delay): throughput and error %.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (REPO, Nginx, Proc, free_port, machine, median, need, pin, run_wrk, save_json,  # noqa: E402
                     wait_port, write_wrk_lua)

from google.protobuf import json_format  # noqa: E402

ENVOY_CPU = "0"   # Envoys + nginx
CLIENT_CPU = "1"  # wrk + lockgate extproc + lockgate xds
CANARY_PCT = 10

ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _admin(port: int) -> dict:
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def _static_cluster(name: str, port: int) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def plain_bootstrap(listen_port: int, admin_port: int, upstream_port: int) -> dict:
    """A: the Envoy a user would run without lockgate: one static route to one upstream."""
    hcm = {"@type": HCM_TYPE, "stat_prefix": "plain", "codec_type": "AUTO", "use_remote_address": True,
           "route_config": {"name": "plain", "virtual_hosts": [{"name": "plain", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "300s"}}]}]},
           "http_filters": [ROUTER]}
    return {"node": {"id": "bench-plain", "cluster": "bench"}, "admin": _admin(admin_port),
            "static_resources": {
                "listeners": [{"name": "plain", "address": {"socket_address": {"address": "127.0.0.1",
                                                                               "port_value": listen_port}},
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm}]}]}],
                "clusters": [_static_cluster("upstream", upstream_port)]}}


def lockgate_static_bootstrap(config, weights, listen_port: int, admin_port: int) -> dict:
    """C: lockgate's own listener/routes/clusters (from build_resources), static, ext_proc filter removed."""
    from lockgate.xds.resources import (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_NAME, LISTENER_TYPE, ROUTE_CONFIG_NAME,
                                        ROUTE_TYPE, build_resources)

    res = build_resources(config, weights)
    listener = json_format.MessageToDict(res[LISTENER_TYPE][LISTENER_NAME], preserving_proto_field_name=True)
    listener["address"]["socket_address"]["port_value"] = listen_port
    listener["name"] = "lockgate-static"
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["@type"] == HCM_TYPE
    hcm.pop("rds")
    hcm["route_config"] = json_format.MessageToDict(res[ROUTE_TYPE][ROUTE_CONFIG_NAME], preserving_proto_field_name=True)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    clusters = []
    for name, cluster in res[CLUSTER_TYPE].items():
        c = json_format.MessageToDict(cluster, preserving_proto_field_name=True)
        c.pop("eds_cluster_config")
        c["type"] = "STATIC"
        c["load_assignment"] = json_format.MessageToDict(res[ENDPOINT_TYPE][name], preserving_proto_field_name=True)
        clusters.append(c)
    return {"node": {"id": "bench-lockgate-static", "cluster": "bench"}, "admin": _admin(admin_port),
            "static_resources": {"listeners": [listener], "clusters": clusters}}


def start_static_envoy(tmp: Path, name: str, bootstrap: dict, admin_port: int, listen_port: int,
                       concurrency: int = 1) -> Proc:
    from lockgate.envoy_proc import envoy_command

    path = tmp / f"{name}.json"
    path.write_text(json.dumps(bootstrap, indent=1))
    proc = Proc(envoy_command(path, concurrency=concurrency), tmp / f"{name}.log", ready_line=None)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{name} envoy did not start:\n" + (tmp / f"{name}.log").read_text()[-3000:])
        time.sleep(0.05)
    wait_port(listen_port)
    return proc


def envoy_counter(admin_port: int, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?filter=^{name}$", timeout=5) as r:
        for line in r.read().decode().splitlines():
            k, _, v = line.partition(": ")
            if k == name:
                return int(v)
    return 0


def extproc_seen(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        total = 0.0
        for line in r.read().decode().splitlines():
            # the ext_proc server's per-response counter (name differs across lockgate versions)
            if line.startswith(("lockgate_routed_responses_total{", "lockgate_requests_total{")):
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


def history_name(result: dict) -> str:
    stamp = result["machine"]["date_utc"].replace(" UTC", "").replace("-", "").replace(":", "").replace(" ", "T")
    return f"routing_latency_{stamp}.json"


def make_fleet(Fleet, tmp: Path, models: list, n_envoys: int):
    """A lockgate fleet as deployed: xds + extproc (+ the observation controller when this lockgate has one)."""
    import dataclasses

    if "with_controller" in {f.name for f in dataclasses.fields(Fleet)}:
        extra = {"controller": {"address": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}"}}
        return Fleet(tmp, models, n_envoys=n_envoys, extra=extra, with_controller=True)
    return Fleet(tmp, models, n_envoys=n_envoys)


def extproc_filter_summary(config) -> dict:
    """The ext_proc filter lockgate serves (processing mode, attributes), as measured."""
    from lockgate.xds.resources import build_listener

    listener = json_format.MessageToDict(build_listener(config), preserving_proto_field_name=True)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for f in hcm["http_filters"]:
        if f["name"] == "envoy.filters.http.ext_proc":
            tc = f["typed_config"]
            timeout = tc.get("message_timeout")  # Duration as JSON: "0.500s"
            return {"processing_mode": tc.get("processing_mode", {}),
                    "response_attributes": tc.get("response_attributes", []),
                    "message_timeout_ms": float(timeout.rstrip("s")) * 1000 if timeout else None}
    return {}


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(targets: dict, key: str, fn) -> dict:
    """Run ``fn()`` (a wrk run) and add each of the target's processes' CPU µs per request."""
    pids = targets[key]["pids"]
    before = {n: proc_cpu_s(pid) for n, pid in pids.items()}
    r = fn()
    after = {n: proc_cpu_s(pid) for n, pid in pids.items()}
    n = max(1, r["requests"])
    r["cpu_us_per_request"] = {name: (after[name] - before[name]) * 1e6 / n for name in pids}
    r["loadavg1_after"] = os.getloadavg()[0]
    return r


def summarize(runs: list[dict], key: str) -> float:
    return median([r[key] for r in runs])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--latency-seconds", type=float, default=6.0)
    ap.add_argument("--ceiling-seconds", type=float, default=3.0)
    ap.add_argument("--connections", type=int, default=20, help="paced connections for the ~500 rps runs")
    ap.add_argument("--delay-ms", type=int, default=39, help="mean Lua delay per connection (ms)")
    ap.add_argument("--ceiling-connections", type=int, default=32)
    ap.add_argument("--out", default="routing_latency.json", help="file name under bench/results/")
    args = ap.parse_args(argv)
    need("wrk", "wrk")
    need("nginx", "nginx-light")

    from tests.harness import Fleet

    from lockgate.config import load_config
    from lockgate.xds.resources import CanaryWeight

    procs: list[Proc] = []
    fleet = None
    result: dict = {"benchmark": "routing_latency", "machine": machine(),
                    "command": "bench/routing_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "setup": {"envoy_cpu": ENVOY_CPU, "client_cpu": CLIENT_CPU, "canary_pct": CANARY_PCT,
                              "paced_connections": args.connections, "delay_ms_mean": args.delay_ms,
                              "ceiling_connections": args.ceiling_connections, "rounds": args.rounds,
                              "latency_seconds": args.latency_seconds, "ceiling_seconds": args.ceiling_seconds}}
    with tempfile.TemporaryDirectory(prefix="lockgate-bench-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            nginx = Nginx(tmp, ["v1", "v2"])
            procs.append(nginx.proc)
            pin(nginx.proc.pid, ENVOY_CPU)
            lua = write_wrk_lua(tmp)

            # B: the real lockgate fleet (xds + extproc + Envoy), canary v2 at 10 %
            fleet_dir = tmp / "fleet"
            fleet_dir.mkdir()
            models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
                       "versions": {"v1": {"endpoints": [f"127.0.0.1:{nginx.ports['v1']}"]},
                                    "v2": {"endpoints": [f"127.0.0.1:{nginx.ports['v2']}"]}}}]
            fleet = make_fleet(Fleet, fleet_dir, models, 1)
            fleet.start()
            pin(fleet.procs["envoy-0"].pid, ENVOY_CPU)
            for name in ("xds", "extproc", "controller"):
                if name in fleet.procs:
                    pin(fleet.procs[name].pid, CLIENT_CPU)
            result["setup"]["lockgate_processes"] = sorted(fleet.procs)
            result["setup"]["extproc_filter"] = extproc_filter_summary(load_config(fleet.config_path))
            fleet.set_weight("chat", "v2", CANARY_PCT)
            config = load_config(fleet.config_path)

            # A: plain Envoy; C: lockgate routes, static, no ext_proc
            ports = {"A": (free_port(), free_port()), "C": (free_port(), free_port())}
            a = start_static_envoy(tmp, "envoy-plain", plain_bootstrap(ports["A"][0], ports["A"][1], nginx.ports["v1"]),
                                   ports["A"][1], ports["A"][0])
            procs.append(a)
            c = start_static_envoy(tmp, "envoy-lockgate-static", lockgate_static_bootstrap(
                config, {"chat": CanaryWeight("v2", CANARY_PCT * 100)}, ports["C"][0], ports["C"][1]),
                ports["C"][1], ports["C"][0])
            procs.append(c)
            pin(a.pid, ENVOY_CPU)
            pin(c.pid, ENVOY_CPU)

            targets = {
                "A": {"label": "plain Envoy (static route)", "url": f"http://127.0.0.1:{ports['A'][0]}",
                      "admin": ports["A"][1], "pids": {"envoy": a.pid}},
                "B": {"label": "lockgate (xDS hash-policy routes + lockgate ext_proc)",
                      "url": f"http://127.0.0.1:{fleet.ports['listener']}", "admin": fleet.admin_ports[0],
                      "pids": {"envoy": fleet.procs["envoy-0"].pid, **{n: fleet.procs[n].pid for n in
                                                                        ("extproc", "controller", "xds")
                                                                        if n in fleet.procs}}},
                "C": {"label": "lockgate routes without ext_proc", "url": f"http://127.0.0.1:{ports['C'][0]}",
                      "admin": ports["C"][1], "pids": {"envoy": c.pid}},
            }
            # sanity + warm-up: every path answers 200 and keeps connections warm
            for key, t in targets.items():
                w = run_wrk(t["url"], lua, duration_s=2, connections=8, cpus=CLIENT_CPU)
                if w["errors"]:
                    raise RuntimeError(f"{key} warm-up had errors: {w}")
            ext_before = extproc_seen(fleet.ports["extproc_metrics"])
            v2_before = {k: envoy_counter(t["admin"], "cluster.chat.v2.upstream_rq_total") for k, t in targets.items()}
            rq_before = {k: envoy_counter(t["admin"], "http.%s.downstream_rq_total" % ("plain" if k == "A" else "lockgate"))
                         for k, t in targets.items()}

            runs: dict[str, dict[str, list[dict]]] = {k: {"paced": [], "ceiling": []} for k in targets}
            order = list(targets)
            for rnd in range(args.rounds):
                rot = order[rnd % len(order):] + order[:rnd % len(order)]
                for key in rot:
                    r = measured(targets, key, lambda: run_wrk(
                        targets[key]["url"], lua, duration_s=args.latency_seconds, connections=args.connections,
                        delay_ms=args.delay_ms, cpus=CLIENT_CPU))
                    r["round"] = rnd
                    runs[key]["paced"].append(r)
                    print(f"round {rnd} {key} paced: {r['rps']:.0f} rps p50 {r['p50_us'] / 1000:.3f} ms "
                          f"p99 {r['p99_us'] / 1000:.3f} ms errors {r['errors']}", flush=True)
                for key in rot:
                    r = measured(targets, key, lambda: run_wrk(
                        targets[key]["url"], lua, duration_s=args.ceiling_seconds,
                        connections=args.ceiling_connections, cpus=CLIENT_CPU))
                    r["round"] = rnd
                    runs[key]["ceiling"].append(r)
                    print(f"round {rnd} {key} ceiling: {r['rps']:.0f} rps errors {r['error_pct']:.2f}% "
                          f"p99 {r['p99_us'] / 1000:.2f} ms", flush=True)

            ext_seen = extproc_seen(fleet.ports["extproc_metrics"]) - ext_before
            sanity = {}
            for k, t in targets.items():
                total = envoy_counter(t["admin"], "http.%s.downstream_rq_total" % ("plain" if k == "A" else "lockgate"))
                v2 = envoy_counter(t["admin"], "cluster.chat.v2.upstream_rq_total") - v2_before[k]
                sanity[k] = {"requests": total - rq_before[k], "canary_requests": v2,
                             "canary_share_pct": 100.0 * v2 / max(1, total - rq_before[k])}
            sanity["B"]["extproc_observed_responses"] = ext_seen
            result["sanity"] = sanity
        finally:
            for p in reversed(procs):
                p.stop()
            if fleet is not None:
                fleet.stop()

    summary = {}
    for key, t in targets.items():
        paced, ceil = runs[key]["paced"], runs[key]["ceiling"]
        summary[key] = {"label": t["label"],
                        "rps_at_load": summarize(paced, "rps"),
                        "p50_ms": summarize(paced, "p50_us") / 1000, "p90_ms": summarize(paced, "p90_us") / 1000,
                        "p99_ms": summarize(paced, "p99_us") / 1000, "p999_ms": summarize(paced, "p999_us") / 1000,
                        "errors_at_load": sum(r["errors"] for r in paced),
                        "requests_at_load": sum(r["requests"] for r in paced),
                        "ceiling_rps": summarize(ceil, "rps"),
                        "ceiling_rps_min_max": [min(r["rps"] for r in ceil), max(r["rps"] for r in ceil)],
                        "ceiling_error_pct": max(r["error_pct"] for r in ceil),
                        "ceiling_p99_ms": summarize(ceil, "p99_us") / 1000,
                        "cpu_us_per_request_at_load": {n: median([r["cpu_us_per_request"][n] for r in paced])
                                                       for n in paced[0]["cpu_us_per_request"]},
                        "cpu_us_per_request_at_ceiling": {n: median([r["cpu_us_per_request"][n] for r in ceil])
                                                          for n in ceil[0]["cpu_us_per_request"]}}
    for key in ("B", "C"):
        for q in ("p50", "p99"):
            diffs = [(b[f"{q}_us"] - a[f"{q}_us"]) / 1000 for a, b in zip(runs["A"]["paced"], runs[key]["paced"])]
            summary[key][f"added_{q}_ms"] = median(diffs)
            summary[key][f"added_{q}_ms_per_round"] = diffs
    summary["targets"] = {"added_p50_ms_max": 0.5, "added_p99_ms_max": 1.5,
                          "p50_met": summary["B"]["added_p50_ms"] <= 0.5,
                          "p99_met": summary["B"]["added_p99_ms"] <= 1.5}
    result["summary"] = summary
    result["runs"] = runs
    result["loadavg_at_end"] = os.getloadavg()
    out = save_json(args.out, result)
    if args.out == "routing_latency.json":  # keep every run: docs list run-to-run variation
        save_json(history_name(result), result)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out.relative_to(REPO)}")
    return result


if __name__ == "__main__":
    main()
