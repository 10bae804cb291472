"""What the shadow stage's mirror adds to the user's request (issue 17 part 2 target: <= 0.1 ms p50).

One lockgate fleet as deployed (xds, ext_proc capture, controller, one Envoy with one worker) in front of
one nginx serving the baseline (chat-v1) and the canary (chat-v2). The model is at weight 0 (every user
answered by the baseline); rounds alternate (off on, on off, ...) the mirror off (``mirror_ppm`` 0) and on at 100 %
(``mirror_ppm`` 1,000,000: every request mirrored to the canary's shadow cluster, its response captured by
the upstream ext_proc filter) — the worst case: a real shadow stage mirrors ``min(mirror_percent,
max_rps / rate)``. Each round is a paced ``wrk`` run (4 connections, a random 0..40 ms pause between a
connection's requests, ~150 requests/s); the result is each round's p50 / p99 and, per adjacent off/on
pair of rounds, the difference of their p50s (on − off), whose median is the headline (the machine is shared: a
single round's p50 moves by more than the effect). The canary's shadow cluster counters show what the
mirror sent and whether its circuit breaker dropped any.

    .venv/bin/python bench/shadow_mirror.py [--rounds 6] [--duration 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Nginx, machine, median, need, run_wrk, save_json, write_wrk_lua  # noqa: E402

from lockgate.control_client import ControlClient  # noqa: E402
from lockgate.routing import shadow_cluster_name  # noqa: E402
from tests.harness import Fleet  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds per arm (off, on alternate)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per round")
    args = ap.parse_args(argv)
    need("wrk", "wrk")
    with tempfile.TemporaryDirectory(prefix="s7-shadow-bench-") as d:
        tmp = Path(d)
        nginx = Nginx(tmp, ["chat-v1", "chat-v2"])
        models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
                   "versions": {"v1": {"endpoints": [f"127.0.0.1:{nginx.ports['chat-v1']}"]},
                                "v2": {"endpoints": [f"127.0.0.1:{nginx.ports['chat-v2']}"]}}}]
        rounds = []
        try:
            with Fleet(tmp, models, with_controller=True) as fleet:
                ctl = ControlClient(f"127.0.0.1:{fleet.ports['control']}")
                lua = write_wrk_lua(tmp)
                url = f"http://127.0.0.1:{fleet.ports['listener']}"
                shadow = shadow_cluster_name("chat", "v2")
                ctl.set_weight("chat", "v2", 0, actor="bench", reason="warm-up")
                run_wrk(url, lua, duration_s=2, connections=4, delay_ms=20)
                for i in range(2 * args.rounds):
                    mirror = i % 4 in (1, 2)  # off on on off ...: neither arm always runs first
                    resp = ctl.set_weight("chat", "v2", 0, actor="bench", reason="bench", stage="shadow",
                                          mirror_ppm=1_000_000 if mirror else 0)
                    assert resp.all_acked, resp
                    time.sleep(0.5)
                    before = fleet.stat(0, f"cluster.{shadow}.upstream_rq_total") or 0
                    overflow0 = fleet.stat(0, f"cluster.{shadow}.upstream_rq_pending_overflow") or 0
                    w = run_wrk(url, lua, duration_s=args.duration, connections=4, delay_ms=20)
                    after = fleet.stat(0, f"cluster.{shadow}.upstream_rq_total") or 0
                    overflow = (fleet.stat(0, f"cluster.{shadow}.upstream_rq_pending_overflow") or 0) - overflow0
                    rounds.append({"mirror": mirror, "requests": w["requests"], "rps": round(w["rps"], 1),
                                   "errors": w["errors"], "p50_ms": w["p50_us"] / 1000, "p99_ms": w["p99_us"] / 1000,
                                   "mirrored": (after - before) if mirror else 0,
                                   "mirror_overflow": overflow if mirror else 0,
                                   "load1": round(os.getloadavg()[0], 2)})
                    print(rounds[-1], flush=True)
                shadow_rows = sum(1 for o in fleet.observations(model="chat") if o["role"] == "shadow")
        finally:
            nginx.stop()
    off = [r["p50_ms"] for r in rounds if not r["mirror"]]
    on = [r["p50_ms"] for r in rounds if r["mirror"]]
    pairs = [rounds[i:i + 2] for i in range(0, len(rounds) - 1, 2)]  # each pair: one round off, one on
    diffs = [next(x["p50_ms"] for x in p if x["mirror"]) - next(x["p50_ms"] for x in p if not x["mirror"])
             for p in pairs]
    result = {
        "bench": "shadow_mirror",
        "what": "user request p50 through lockgate's Envoy at weight 0, mirror off vs on at 100 % (paced wrk)",
        "machine": machine(),
        "rounds": rounds,
        "p50_off_ms_median": median(off), "p50_on_ms_median": median(on),
        "p50_added_ms_median_of_pairs": median(diffs), "p50_pair_diffs_ms": diffs,
        "p50_ratio_on_off": median(on) / median(off) if median(off) else None,
        "p99_off_ms_median": median([r["p99_ms"] for r in rounds if not r["mirror"]]),
        "p99_on_ms_median": median([r["p99_ms"] for r in rounds if r["mirror"]]),
        "mirrored_requests": sum(r["mirrored"] for r in rounds),
        "mirror_overflow": sum(r["mirror_overflow"] for r in rounds),
        "shadow_observations_stored": shadow_rows,
    }
    path = save_json("shadow_mirror.json", result)
    print({k: v for k, v in result.items() if k not in ("rounds", "machine")})
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
