"""What losing per-user clustering costs: the Prometheus-sourced rate verdict (counts, every request taken as
an independent user: ``decide.prometheus_evidence.count_verdict``) against the observation path (the same rows
with their users: ``stats.evaluate_rate``), on the same simulated streams.

Sticky users (600, geometric requests per user with mean 20, half on each arm) each with their own error
propensity drawn from a Beta distribution around 5 % (``--icc-a`` sets its spread: the intra-user correlation
is ICC = 1 / (a + b + 1)); the canary's rate is exactly 1.2 x the baseline's and the allowance is relative
0.2, so a rollback is false (the canary is *at* its allowance, not beyond it). Ten looks, alpha 0.05 per
metric; a run counts as a false rollback when any look fails. Pure statistics, no I/O.

Part ``cost``: the CPU of one Prometheus-sourced rate verdict (``count_verdict``: the counts expanded into
per-request groups, then the core) at 10,000 to 500,000 requests (the cap, ``MAX_REQUESTS``) and beyond it
(scaled down to the cap), median of 5.

    python -m bench.prometheus_clustering [--runs 300] [--part all|clustering|cost]
        ->  bench/results/prometheus_clustering.json (the parts run are replaced, the others kept)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lockgate.controller.decide.prometheus_evidence import count_verdict
from lockgate.controller.stats import MetricSpec, evaluate_rate

OUT = Path(__file__).resolve().parent / "results" / "prometheus_clustering.json"
SPEC = MetricSpec("errors", "rate", "increase", allowed=0.2, allowed_mode="relative", column="errors")


def one_run(seed: int, icc_a: float, users: int = 600, mean_req: float = 20.0, rate: float = 0.05,
            looks: int = 10, alpha: float = 0.05) -> tuple[bool, bool, float]:
    rng = np.random.default_rng(seed)
    a, b = icc_a, icc_a * (1 - rate) / rate
    p = rng.beta(a, b, users)
    m = rng.geometric(1 / mean_req, users)
    arm = rng.random(users) < 0.5
    uid = np.repeat(np.arange(users), m)
    t = rng.random(uid.size)
    is_c = arm[uid]
    y = (rng.random(uid.size) < p[uid] * np.where(is_c, 1.2, 1.0)).astype(float)
    prom = own = False
    for k in range(1, looks + 1):
        keep = t <= k / looks
        yy, cc, uu = y[keep], is_c[keep], uid[keep]
        if not own:
            own = evaluate_rate(yy, cc, np.zeros(yy.size), uu, SPEC, alpha).verdict == "fail"
        if not prom:
            w = [(yy[~cc].sum(), float((~cc).sum()), yy[cc].sum(), float(cc.sum()))]
            prom = count_verdict(SPEC, alpha, w, source="simulation").verdict == "fail"
    return prom, own, 1.0 / (a + b + 1.0)


def cost() -> list[dict]:
    spec = MetricSpec("errors", "rate", "increase", allowed=0.5, allowed_mode="relative", column="errors")
    out = []
    for n in (10_000, 100_000, 500_000, 1_000_000, 10_000_000):
        w = [(n * 0.02 / 4, n / 4, n * 0.025 / 4, n / 4)] * 2  # two stages, half the requests on each arm
        times = []
        for _ in range(5):
            t0 = time.process_time()
            v = count_verdict(spec, 0.01, w, source="bench")
            times.append(time.process_time() - t0)
        row = {"requests": n, "cpu_ms_median": round(1000 * float(np.median(times)), 1),
               "scaled": "scaled_to" in v.details, "verdict": v.verdict}
        out.append(row)
        print(json.dumps(row))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--part", choices=("all", "clustering", "cost"), default="all")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.part in ("all", "cost"):
        old["cost"] = cost()
    if args.part == "cost":
        args.out.write_text(json.dumps(old, indent=1) + "\n")
        return
    rows = []
    for icc_a in (200.0, 2.0, 0.5):
        t0 = time.perf_counter()
        res = [one_run(s, icc_a) for s in range(args.runs)]
        n_prom, n_own = sum(r[0] for r in res), sum(r[1] for r in res)
        row = {"icc": round(res[0][2], 4), "runs": args.runs, "false_rollbacks_prometheus": n_prom,
               "false_rollbacks_observations": n_own, "rate_prometheus": n_prom / args.runs,
               "rate_observations": n_own / args.runs, "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row))
    old.update({"alpha": 0.05, "looks": 10, "users": 600, "mean_requests_per_user": 20, "baseline_rate": 0.05,
                "canary_ratio": 1.2, "allowed_relative": 0.2, "rows": rows})
    args.out.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
