"""Per-host gating and ejection (issue 17 part 4): one bad canary host of three, simulated.

Target: with one of three canary hosts at errors x5, that host is ejected and the version is not
rolled back, in >= 95 % of simulated runs at 20,000 req/h, with false ejections <= 1 % on healthy
fleets.

Streams: ``lockgate.controller.stats.simulate.simulate_rollout`` (sticky users with correlated
errors, 1/5/20/50 % ramp of 45 min each = 3 h, diurnal drift, base error rate 1 %) with
``Effects(host_error_mults=...)``: the canary's requests are spread evenly over 3 hosts (Envoy's
round-robin), the bad host's error probability x5.

At each look (every ``--look-s`` seconds, default 120 s = 90 looks):

1. ``stats.hosts.judge_hosts`` on the canary's rows (each active host vs its pooled active peers,
   error rate, allowed ratio 1.5, alpha 0.01 split over the 3 hosts), then ``stats.hosts.ejections``
   (never the last host); an ejected host's rows are left out from then on (all of them);
2. the version's error-rate gate (``default_specs()``'s ``error_rate``: ratio 1.2, at its share 0.01
   of the family-wise 0.05) on baseline + the canary rows of the active hosts: ``fail`` = rollback.

The order is the controller's: hosts first, then the version without the ejected hosts.

A run *succeeds* (bad fleet) when the bad host is ejected, no healthy host is, and the version never
fails. A *false ejection* (healthy fleet, all hosts x1) is any ejection in the run.

Also: a fleet whose three hosts are all bad (errors x7/3 each: the version-level harm of one host at x5),
with and without the hold rule ("rolled back only when the harm is not one host's"): how much later
the version is rolled back because of it.

Run:  nice -n 10 .venv/bin/python bench/host_ejection.py [--runs 200] [--healthy-runs 300] [--allbad-runs 50]
      [--workers 2]   (~22 min on 2 shared cores at load ~10; --resummarize re-reads the runs)
Writes bench/results/host_ejection.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lockgate.controller.stats import evaluate_rate  # noqa: E402
from lockgate.controller.stats.decision import split_alpha  # noqa: E402
from lockgate.controller.stats.hosts import DEFAULT_HOST_ALLOWED, DEFAULT_HOST_ALPHA, ejections, host_spec, judge_hosts, suspect  # noqa: E402
from lockgate.controller.stats.simulate import Effects, RolloutConfig, default_specs, simulate_rollout  # noqa: E402

HOSTS = 3


def run_once(seed: int, mults: tuple[float, ...], look_s: float, rate: float, host_alpha: float,
             host_allowed: float, hold_rule: bool = True) -> dict:
    cfg = RolloutConfig(requests_per_hour=rate)
    rng = np.random.default_rng(seed)
    s = simulate_rollout(rng, cfg, Effects(host_error_mults=mults))
    specs = default_specs()
    err_spec = next(x for x in specs if x.name == "error_rate")
    err_alpha = split_alpha(specs, 0.05)["error_rate"]
    hspec = host_spec(host_allowed)
    names = np.array([f"c{i}" if i >= 0 else "" for i in range(-1, HOSTS)], dtype=object)
    host = names[s["host"] + 1]
    ejected: list[str] = []
    ejected_at: dict[str, float] = {}
    ejected_numbers: dict[str, dict] = {}
    rollback_at = None
    holds = 0
    end = cfg.hours * 3600.0
    t = look_s
    while t <= end + 1e-6 and rollback_at is None:
        m = int(np.searchsorted(s["ts"], t, side="right"))
        is_c = s["is_canary"][:m]
        c = np.flatnonzero(is_c)
        hj = judge_hosts(s["error"][:m][c], host[:m][c], s["cluster"][:m][c], s["stratum"][:m][c],
                         alpha=host_alpha, spec=hspec, n_hosts=HOSTS, ejected=ejected)
        for hv in ejections(hj):
            ejected.append(hv.host)
            ejected_at[hv.host] = t
            v = hv.verdict
            ejected_numbers[hv.host] = {"host_rate": v.canary, "peers_rate": v.baseline, "n_host": v.n_canary,
                                        "n_peers": v.n_baseline, "interval": list(v.interval)}
        keep = ~np.isin(host[:m], ejected) if ejected else np.ones(m, dtype=bool)
        vv = evaluate_rate(s["error"][:m][keep], is_c[keep], s["share"][:m][keep], s["cluster"][:m][keep], err_spec,
                           err_alpha, stratum=s["stratum"][:m][keep])
        if vv.verdict == "fail":
            sus = suspect(hj) if hold_rule else None
            held = False
            if sus is not None:  # the harm may be one host's: the version without it must fail too
                k2 = keep & (host[:m] != sus.host)
                v2 = evaluate_rate(s["error"][:m][k2], is_c[k2], s["share"][:m][k2], s["cluster"][:m][k2], err_spec,
                                   err_alpha, stratum=s["stratum"][:m][k2])
                held = v2.verdict != "fail"
            if held:
                holds += 1
            else:
                rollback_at = t
        t += look_s
    return {"seed": seed, "ejected": ejected, "ejected_at_s": ejected_at, "ejected_numbers": ejected_numbers,
            "rollback_at_s": rollback_at, "looks_held": holds, "canary_requests": int(s["is_canary"].sum())}


def _job(args):
    return run_once(*args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200, help="runs with one bad host (errors x5)")
    ap.add_argument("--healthy-runs", type=int, default=400)
    ap.add_argument("--look-s", type=float, default=120.0)
    ap.add_argument("--rate", type=float, default=20_000.0)
    ap.add_argument("--mult", type=float, default=5.0)
    ap.add_argument("--host-alpha", type=float, default=DEFAULT_HOST_ALPHA)
    ap.add_argument("--host-allowed", type=float, default=DEFAULT_HOST_ALLOWED)
    ap.add_argument("--allbad-runs", type=int, default=100, help="runs with every host bad (errors x(mult+2)/3 each)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "host_ejection.json"))
    ap.add_argument("--resummarize", action="store_true", help="recompute the summary from --out's runs")
    a = ap.parse_args()
    t0 = time.time()
    bad = (a.mult,) + (1.0,) * (HOSTS - 1)
    jobs = [(10_000 + i, bad, a.look_s, a.rate, a.host_alpha, a.host_allowed) for i in range(a.runs)]
    jobs += [(20_000 + i, (1.0,) * HOSTS, a.look_s, a.rate, a.host_alpha, a.host_allowed) for i in range(a.healthy_runs)]
    each = (a.mult + HOSTS - 1) / HOSTS  # the same version-level harm as one bad host, spread over all
    jobs += [(30_000 + i, (each,) * HOSTS, a.look_s, a.rate, a.host_alpha, a.host_allowed, hold)
             for hold in (True, False) for i in range(a.allbad_runs)]
    if a.resummarize:
        old = json.loads(Path(a.out).read_text())
        res = old["bad_runs"] + old["healthy_runs"] + old["all_bad_hold"] + old["all_bad_plain"]
        a.runs, a.healthy_runs, a.allbad_runs = len(old["bad_runs"]), len(old["healthy_runs"]), len(old["all_bad_hold"])
        t0 -= old["summary"]["wall_s"]
    else:
        with mp.Pool(a.workers) as pool:
            res = pool.map(_job, jobs, chunksize=4)
    badr, okr = res[:a.runs], res[a.runs:a.runs + a.healthy_runs]
    allb = res[a.runs + a.healthy_runs:]
    allb_hold, allb_plain = allb[:a.allbad_runs], allb[a.allbad_runs:]

    def delay(held, plain):
        d = [(x["rollback_at_s"] - y["rollback_at_s"]) / 60.0 for x, y in zip(held, plain)
             if x["rollback_at_s"] is not None and y["rollback_at_s"] is not None]
        return {"runs_delayed": sum(v > 0 for v in d), "mean": float(np.mean(d)) if d else None,
                "max": float(max(d)) if d else None}

    def rb(rs):
        ts = sorted(r["rollback_at_s"] / 60.0 for r in rs if r["rollback_at_s"] is not None)
        return {"rolled_back": len(ts), "runs": len(rs), "minutes_p50": float(np.median(ts)) if ts else None,
                "minutes_p95": float(np.percentile(ts, 95)) if ts else None,
                "ejections": sum(bool(r["ejected"]) for r in rs), "looks_held": sum(r["looks_held"] for r in rs)}
    success = [r for r in badr if r["ejected"] == ["c0"] and r["rollback_at_s"] is None]
    bad_ejected = [r for r in badr if "c0" in r["ejected"]]
    wrong = [r for r in badr if any(h != "c0" for h in r["ejected"])]
    rolled = [r for r in badr if r["rollback_at_s"] is not None]
    false_ej = [r for r in okr if r["ejected"]]
    healthy_rolled = [r for r in okr if r["rollback_at_s"] is not None]
    t_ej = sorted(r["ejected_at_s"]["c0"] / 60.0 for r in bad_ejected)
    summary = {
        "rate_per_hour": a.rate, "look_s": a.look_s, "hosts": HOSTS, "bad_host_error_mult": a.mult,
        "host_alpha": a.host_alpha, "host_allowed_ratio": 1.0 + a.host_allowed,
        "runs_bad_fleet": a.runs, "runs_healthy_fleet": a.healthy_runs,
        "bad_ejected_and_not_rolled_back": len(success), "bad_ejected_and_not_rolled_back_share": len(success) / max(1, a.runs),
        "bad_host_ejected": len(bad_ejected), "healthy_host_ejected_in_bad_fleet": len(wrong),
        "version_rolled_back_in_bad_fleet": len(rolled),
        "false_ejections_healthy": len(false_ej), "false_ejection_share": len(false_ej) / max(1, a.healthy_runs),
        "healthy_fleet_rolled_back": len(healthy_rolled),
        "minutes_to_ejection_p50": float(np.median(t_ej)) if t_ej else None,
        "minutes_to_ejection_p95": float(np.percentile(t_ej, 95)) if t_ej else None,
        "looks_held_bad_fleet_p50": float(np.median([r["looks_held"] for r in badr])) if badr else None,
        "all_hosts_bad_each_mult": each,
        "bad_fleet_runs_held_by_the_hold_rule": sum(r["looks_held"] > 0 for r in badr),
        "all_hosts_bad_with_hold_rule": rb(allb_hold), "all_hosts_bad_without_hold_rule": rb(allb_plain),
        "all_hosts_bad_rollback_delay_min": delay(allb_hold, allb_plain),
        "wall_s": round(time.time() - t0, 1),
    }
    Path(a.out).write_text(json.dumps({"summary": summary, "bad_runs": badr, "healthy_runs": okr,
                                          "all_bad_hold": allb_hold, "all_bad_plain": allb_plain}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
