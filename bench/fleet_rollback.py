"""Rollback ACKed by N Envoys on N hosts: N = 1, 3, 10 (median, max).

    .venv/bin/python bench/fleet_rollback.py [--rounds 40] [--sizes 1,3,10] [--no-doc]

Setup: the control plane (``lockgate xds``, auth tokens, listening on a bridge address) in the root
network namespace; each Envoy 1.40 (``lockgate envoy --node-id <host>``, workers per ``envoy.concurrency``)
on a host of its own — a network namespace made by
``tests/netns.py`` with a veth on the bridge, its own node id, bootstrap and token (as in
``tests/integration/test_hosts.py``; loopback Envoys when namespaces cannot be made, and the result
says so). Envoys start one host at a time; with the first N connected, each round sets chat's canary
v2 to 5 % (ACKed by all), waits ``--pause``, and rolls back through the control API (one gRPC client
held open, as the controller holds its own), recording:

* ``elapsed_ms`` — the xDS server's measure, push (routes snapshot handed to the streams) → the last
  Envoy's ACK; this is what ``lockgate rollback`` prints and the target is about;
* ``per_envoy_ack_ms`` — push → each Envoy's ACK;
* ``call_ms`` — the gRPC call as the caller sees it (request → answer, includes persisting and the
  answer's assembly).

Target (issue 16): rollback ACKed by 10 Envoys ≤ 20 ms median, ≤ 100 ms max.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, median, pct, save_json  # noqa: E402

TARGET_MEDIAN_MS = 20.0
TARGET_MAX_MS = 100.0


def machine_facts() -> dict:
    import platform
    import subprocess

    from lockgate.envoy_proc import envoy_binary

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        envoy = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True,
                               timeout=30).stdout.strip().split("version:")[-1].strip()
    except Exception as exc:  # noqa: BLE001
        envoy = f"unknown ({exc})"
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "envoy": envoy,
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg_at_start": list(os.getloadavg())}


def stats(xs: list[float]) -> dict:
    return {"n": len(xs), "median": median(xs), "p90": pct(xs, 90), "max": max(xs) if xs else None,
            "min": min(xs) if xs else None}


def run(rounds: int, sizes: list[int], pause: float, concurrency: int | None = None) -> dict:
    from lockgate.auth import AuthConfig
    from lockgate.control_client import ControlClient
    from tests.netns import OWN_TOKEN, HostFleet, Hosts

    result: dict = {"benchmark": "fleet_rollback", "machine": machine_facts(),
                    "command": "bench/fleet_rollback.py " + " ".join(a for a in sys.argv[1:] if a != "--no-doc"),
                    "setup": {"rounds": rounds, "sizes": sizes, "pause_s": pause}, "runs": []}
    hosts = Hosts()
    result["setup"]["hosts"] = hosts.note
    result["setup"]["isolated"] = hosts.isolated
    print(f"fleet_rollback: {hosts.note}", flush=True)
    fleet = client = None
    with tempfile.TemporaryDirectory(prefix="s7-hosts-bench-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            all_hosts = [hosts.add(f"envoy-{i + 1}") for i in range(max(sizes))]
            fleet = HostFleet(tmp, hosts, controller=False, extproc=False)
            for h in all_hosts:
                fleet.allow(h.name)
                fleet.host_config(h, envoy=None if concurrency is None else {"concurrency": concurrency})
            fleet.start_control_plane()
            from envoy.config.core.v3 import base_pb2  # noqa: F401  (protos loaded before timing)

            client = ControlClient(f"127.0.0.1:{fleet.ports['control']}", AuthConfig(), OWN_TOKEN)
            running = 0
            for n in sorted(sizes):
                while running < n:
                    fleet.start_envoy(all_hosts[running])
                    running += 1
                deadline = time.monotonic() + 60
                while True:
                    m = client.get_weights("chat").models[0]
                    if sum(1 for e in m.envoys if e.connected and e.acked) == n:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"only {len(m.envoys)} of {n} Envoys in sync")
                    time.sleep(0.1)
                result["setup"]["envoy_argv"] = fleet.envoy_argv(all_hosts[0])[1:]
                load0 = os.getloadavg()[0]
                samples = []
                for k in range(rounds + 2):  # two warm-up rounds, not recorded
                    up = client.set_weight("chat", "v2", 500, actor="bench", reason="bench up", timeout_s=5,
                                           deadline_s=10)
                    time.sleep(pause)
                    t0 = time.perf_counter()
                    down = client.rollback("chat", actor="bench", reason="bench rollback", timeout_s=5, deadline_s=10)
                    call_ms = (time.perf_counter() - t0) * 1000
                    time.sleep(pause)
                    if k < 2:
                        continue
                    samples.append({"elapsed_ms": down.elapsed_ms, "call_ms": call_ms, "all_acked": down.all_acked,
                                    "n_envoys": len(down.model.envoys), "up_all_acked": up.all_acked,
                                    "per_envoy_ack_ms": sorted(e.ack_ms for e in down.model.envoys),
                                    "not_acked": list(down.not_acked)})
                el = [s["elapsed_ms"] for s in samples]
                calls = [s["call_ms"] for s in samples]
                firsts = [s["per_envoy_ack_ms"][0] for s in samples if s["per_envoy_ack_ms"]]
                run_ = {"envoys": n, "elapsed_ms": stats(el), "call_ms": stats(calls), "first_ack_ms": stats(firsts),
                        "all_acked": sum(1 for s in samples if s["all_acked"]), "rounds": len(samples),
                        "loadavg1_before": load0, "loadavg1_after": os.getloadavg()[0], "samples": samples}
                result["runs"].append(run_)
                print(f"N={n:2d}: push→last ACK median {run_['elapsed_ms']['median']:.1f} ms, "
                      f"p90 {run_['elapsed_ms']['p90']:.1f}, max {run_['elapsed_ms']['max']:.1f}; "
                      f"call median {run_['call_ms']['median']:.1f} ms, max {run_['call_ms']['max']:.1f}; "
                      f"all ACKed {run_['all_acked']}/{len(samples)}; load {load0:.2f}→{os.getloadavg()[0]:.2f}",
                      flush=True)
        finally:
            if client is not None:
                client.close()
            if fleet is not None:
                fleet.stop()
            hosts.close()
    big = next((r for r in result["runs"] if r["envoys"] == 10), None)
    if big is not None:
        result["target"] = {"median_ms": TARGET_MEDIAN_MS, "max_ms": TARGET_MAX_MS,
                            "median_met": big["elapsed_ms"]["median"] <= TARGET_MEDIAN_MS,
                            "max_met": big["elapsed_ms"]["max"] <= TARGET_MAX_MS}
    return result


def fmt(x, nd=1) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def ack_gap(run_: dict) -> tuple[float, float]:
    """Median and p90 of the time between consecutive Envoys' ACKs of one rollback (ms)."""
    gaps = [b - a for s in run_["samples"] for a, b in zip(s["per_envoy_ack_ms"], s["per_envoy_ack_ms"][1:])]
    return median(gaps), pct(gaps, 90)


def render(d: dict) -> str:
    m, st = d["machine"], d["setup"]
    lines = ["## Rollback ACKed by N Envoys on N hosts (N = 1, 3, 10)", "",
             f"- Machine: {m['nproc']} CPUs, {m['cpu_model']}, Linux {m['kernel']}; Envoy {m['envoy']}; "
             f"Python {m['python']}",
             f"- Date: {m['date_utc']} (load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}:"
             " the machine is shared, other jobs were running)",
             f"- Command: `.venv/bin/python {d['command'].strip()}`",
             f"- Hosts: {st['hosts']}. The xDS server (auth tokens, one per host) in the root namespace; each "
             f"Envoy (`envoy {' '.join('<bootstrap>' if a.endswith('.yaml') else a for a in st.get('envoy_argv', []))}`) in its own namespace with its own node id. "
             f"{st['rounds']} rounds per N, each: set-weight 5 % (ACKed), {st['pause_s']:g} s, rollback, "
             f"{st['pause_s']:g} s; two warm-up rounds not counted.",
             "- *push → last ACK* is the xDS server's own measure (`lockgate rollback` prints it): the new routes "
             "handed to every stream → the last Envoy's ACK. *call* is the control-API call as its caller sees it.",
             "",
             "| Envoys | push → last ACK: median | p90 | max | first ACK median | call median | call max | "
             "all ACKed | load 1 min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in d["runs"]:
        e, c, f = r["elapsed_ms"], r["call_ms"], r["first_ack_ms"]
        lines.append(f"| {r['envoys']} | {fmt(e['median'])} ms | {fmt(e['p90'])} ms | {fmt(e['max'])} ms | "
                     f"{fmt(f['median'])} ms | {fmt(c['median'])} ms | {fmt(c['max'])} ms | "
                     f"{r['all_acked']}/{r['rounds']} | {r['loadavg1_before']:.2f}→{r['loadavg1_after']:.2f} |")
    t = d.get("target")
    if t:
        lines += ["", f"Target (10 Envoys ≤ {t['median_ms']:g} ms median, ≤ {t['max_ms']:g} ms max): median "
                      f"{'**met**' if t['median_met'] else '**NOT met**'}, max "
                      f"{'**met**' if t['max_met'] else '**NOT met**'}."]
    lines += [""] + list(d["notes"]) if d.get("notes") else []
    big = next((r for r in d["runs"] if r["envoys"] == 10), None)
    if big:
        gap = ack_gap(big)
        lines += ["", "**Where the time goes.** The xDS server records what each Envoy ACKed in batches, and every "
                      "weight-store write (the rollback's served-first save, an fsync'd commit; the ACK records) "
                      "runs on the store's own thread, off the event loop that sends the routes, so consecutive ACKs "
                      f"of one rollback come {fmt(gap[0], 2)} ms apart (median; p90 {fmt(gap[1])} ms): most of the "
                      f"time is before the first ACK, {fmt(big['first_ack_ms']['median'])} ms median with 10 Envoys "
                      "— the Envoys applying the routes on two busy cores. (Before the writes left the event loop: "
                      "30.0 ms median, 68.4 ms max with 10 Envoys, 2026-12-08 01:08 UTC.)"]
    return "\n".join(lines) + "\n"


def write_section(d: dict) -> None:
    from run_all import DOC, DOC_HEADER, replace_section

    text = DOC.read_text() if DOC.exists() else DOC_HEADER
    DOC.write_text(replace_section(text, "fleet_rollback", render(d)))
    print(f"wrote {DOC.relative_to(REPO)} section fleet_rollback")


def main() -> int:
    ap = argparse.ArgumentParser(description="Rollback ACKed by N = 1, 3, 10 Envoys on separate hosts.")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--sizes", default="1,3,10")
    ap.add_argument("--pause", type=float, default=0.2, help="seconds between a push and the next")
    ap.add_argument("--envoy-concurrency", type=int, help="envoy.concurrency (default: the config's, sized to the host)")
    ap.add_argument("--out", default="fleet_rollback.json")
    ap.add_argument("--no-doc", action="store_true", help="write the JSON only (run_all.py renders the doc)")
    args = ap.parse_args()
    d = run(args.rounds, [int(x) for x in args.sizes.split(",")], args.pause, args.envoy_concurrency)
    path = save_json(args.out, d)
    print(f"wrote {path.relative_to(REPO)}")
    if not args.no_doc:
        write_section(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
