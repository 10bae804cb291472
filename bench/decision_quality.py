"""Decision quality of lockgate's anytime-valid rules vs Flagger- and Kayenta-style rules.

The same simulated rollout streams (``lockgate.controller.stats.simulate``: sticky users with
correlated requests, 1/5/20/50 % ramp, diurnal baseline drift) are judged by three rules, at two
traffic levels: 20,000 req/h with a 3 h ramp (45 min per stage) and 1,000 req/h with a 12 h ramp
(3 h per stage).

* lockgate   -- ``lockgate.controller.stats.evaluate_all`` on the 5 gating metrics of
                ``default_specs()`` (the issue's allowances), alpha 0.05 family-wise, 0.01 each;
                rollback when any gating metric fails; promotion when every gating metric passes at
                a look after the last stage started (what the stage machine does).
* flagger    -- fixed thresholds at every look: canary error rate > baseline + 1 pt, or canary p95
                latency > 1.1 x baseline p95; promoted when the ramp ends without a failed check.
* kayenta    -- ``scipy.stats.mannwhitneyu(canary, baseline)`` at every look for each metric (error,
                refusal, latency, output tokens, score), p < 0.05 in the harmful direction; promoted
                when the ramp ends without a failed check.

Scenarios (each changes ONE metric, except A/A and the benign improvement): A/A; a benign
improvement; "within" = half the allowance (errors / refusals x1.1, output tokens +5 %, score
-0.005, p95: 5.5 % of canary requests above the baseline's p95); "at delta" = exactly on the
allowance (x1.2, x1.2, +10 %, -0.01, 6 % above the baseline's p95); and the issue's regressions
(errors x2, p95 latency x1.2, output tokens +30 %, refusals x3, score -0.03).  The p95 latency
multipliers are solved numerically per traffic level (``simulate.latency_mult_for_exceedance``).

Looks: evenly spaced (36 per rollout at 20,000 req/h = every 5 min, 48 at 1,000 req/h = every
15 min); when a look rolls back, the interval since the previous look is re-examined every 30 s (the
live controller's analysis interval) and the first 30-s look that rolls back decides, so "canary
requests before rollback" is what the live controller would have served.

Follow-ups (after the main runs): within / at-delta cells where lockgate rolled back for the changed
metric are re-run with that metric alone over ``--followup-runs`` rollouts (default 1,000), and the
20,000 req/h regressions that missed a target with a look every 30 s (``--fine-runs``, default 40);
for a missed rate regression, the two tests behind the verdict are inspected at the end of the ramp.

Run:  nice -n 10 .venv/bin/python bench/decision_quality.py [--sims 150] [--sims-other 40] [--workers 2]
      [--raw /tmp/dq.pkl.gz]   (~35 min of CPU on 2 shared cores; --raw keeps the per-run rows and
      lets an interrupted run resume; --from-raw re-reports from them without simulating)
Writes bench/results/decision_quality.md, bench/results/decision_quality.json and the
`decision_quality` section of docs/benchmarks.md (``--doc-only``: only the section, from the
existing JSON file).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing as mp
import os
import pickle
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lockgate.controller.stats import evaluate_all, hours_needed, split_alpha  # noqa: E402
from lockgate.controller.stats.simulate import (  # noqa: E402
    Effects,
    RolloutConfig,
    default_specs,
    latency_mult_for_exceedance,
    look_times,
    prefix,
    simulate_rollout,
)

ALPHA = 0.05
N_GATING = 5
ALPHA_PER_METRIC = ALPHA / N_GATING
SUBLOOK_S = 30.0  # the live controller's analysis_interval_s
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"

LEVELS = {
    "20k": {"rph": 20_000.0, "hours_per_stage": 0.75, "looks": 36},
    "1k": {"rph": 1_000.0, "hours_per_stage": 3.0, "looks": 48},
}
METRICS = ("error_rate", "refusal_rate", "latency_p95", "output_tokens", "score")
SHORT = {"error_rate": "errors", "refusal_rate": "refusals", "latency_p95": "p95 latency",
         "output_tokens": "output tokens", "score": "evaluator score"}
# the 20,000 req/h targets for the regressions: p95 of canary requests before rollback
REGRESSION_P95_TARGET = {"error_rate": 10_000, "latency_p95": 2_700, "output_tokens": 500, "refusal_rate": 1_600,
                         "score": 2_200}
RULES = ("lockgate", "flagger", "kayenta")
RULE_NAMES = {"lockgate": "lockgate (anytime-valid)", "flagger": "Flagger-style thresholds",
              "kayenta": "Kayenta-style repeated Mann-Whitney"}


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # aa | benign | within | delta | regression
    metric: str | None  # the one metric changed (None: A/A, benign)
    effects: Effects


LAT_BATCHES = 4
LAT_STREAMS = {"20k": 100, "1k": 500}  # A/A streams per batch


def _lat_task(args: tuple) -> tuple:
    level, weighting, batch, seed = args
    rng = np.random.default_rng([seed, 99, batch])
    m = latency_mult_for_exceedance(rng, config(level), share_above=(0.055, 0.06), quantile=0.95,
                                    n_streams=LAT_STREAMS[level], weighting=weighting)
    return level, weighting, m


def latency_multipliers(levels: list[str], seed: int, workers: int) -> dict[str, dict]:
    """p95 latency multipliers for 'within' (5.5 % above the baseline's p95) and 'at delta' (6 %): the mean
    over ``LAT_BATCHES`` independent batches of A/A streams, with the batches' standard error."""
    tasks = [(lv, w, b, seed) for lv in levels for w in ("stage", "pooled") for b in range(LAT_BATCHES)]
    got: dict[tuple[str, str], list[float]] = {}
    for _, (lv, w, (m_within, m_delta)) in run_tasks(_lat_task, tasks, workers):
        got.setdefault((lv, f"within_{w}"), []).append(m_within)
        got.setdefault((lv, f"delta_{w}"), []).append(m_delta)
    out: dict[str, dict] = {lv: {"n_streams": LAT_STREAMS[lv] * LAT_BATCHES} for lv in levels}
    for (lv, k), ms in got.items():
        out[lv][k] = float(np.mean(ms))
        out[lv][k + "_se"] = float(np.std(ms, ddof=1) / math.sqrt(len(ms)))
    return out


def run_tasks(fn, tasks: list, workers: int, done: set | None = None):
    """Yield ``(index, fn(task))`` as tasks finish, on ``workers`` processes.  A worker that dies (killed
    from outside) breaks the pool; the unfinished tasks are then resubmitted on a new pool (3 tries)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    todo = {i for i in range(len(tasks)) if not done or i not in done}
    for attempt in range(3):
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as ex:
            futs = {ex.submit(fn, tasks[i]): i for i in sorted(todo)}
            try:
                pending = set(futs)
                while pending:
                    fin, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in fin:
                        i = futs[f]
                        r = f.result()
                        todo.discard(i)
                        yield i, r
                return
            except BrokenProcessPool as exc:
                print(f"  a worker died ({exc}); resubmitting {len(todo)} tasks (attempt {attempt + 2})", flush=True)
    raise RuntimeError(f"{len(todo)} tasks never finished")


def config(level: str) -> RolloutConfig:
    lv = LEVELS[level]
    return RolloutConfig(requests_per_hour=lv["rph"], hours_per_stage=lv["hours_per_stage"])


def scenarios(lat: dict[str, float]) -> list[Scenario]:
    lw, ld = lat["within_stage"], lat["delta_stage"]
    return [
        Scenario("A/A (no change)", "aa", None, Effects()),
        Scenario("benign improvement (errors x0.7, latency x0.9, score +0.02)", "benign", None,
                 Effects(error_mult=0.7, latency_mult=0.9, score_shift=0.02)),
        Scenario("within: errors x1.1", "within", "error_rate", Effects(error_mult=1.1)),
        Scenario("within: refusals x1.1", "within", "refusal_rate", Effects(refusal_mult=1.1)),
        Scenario(f"within: latency x{lw:.4f} (5.5 % above baseline p95)", "within", "latency_p95",
                 Effects(latency_mult=lw)),
        Scenario("within: output tokens +5 %", "within", "output_tokens", Effects(length_mult=1.05)),
        Scenario("within: score -0.005", "within", "score", Effects(score_shift=-0.005)),
        Scenario("at delta: errors x1.2", "delta", "error_rate", Effects(error_mult=1.2)),
        Scenario("at delta: refusals x1.2", "delta", "refusal_rate", Effects(refusal_mult=1.2)),
        Scenario(f"at delta: latency x{ld:.4f} (6 % above baseline p95)", "delta", "latency_p95",
                 Effects(latency_mult=ld)),
        Scenario("at delta: output tokens +10 %", "delta", "output_tokens", Effects(length_mult=1.10)),
        Scenario("at delta: score -0.01", "delta", "score", Effects(score_shift=-0.01)),
        Scenario("regression: errors x2", "regression", "error_rate", Effects(error_mult=2.0)),
        Scenario("regression: p95 latency +20 % (latency x1.2)", "regression", "latency_p95",
                 Effects(latency_mult=1.2)),
        Scenario("regression: output tokens +30 %", "regression", "output_tokens", Effects(length_mult=1.3)),
        Scenario("regression: refusals x3", "regression", "refusal_rate", Effects(refusal_mult=3.0)),
        Scenario("regression: score -0.03", "regression", "score", Effects(score_shift=-0.03)),
    ]


# ------------------------------------------------------------------------------------------------
# Flagger- and Kayenta-style rules: each returns (rollback?, the metrics that fired)
# ------------------------------------------------------------------------------------------------
def rule_flagger(d: dict) -> tuple[bool, tuple[str, ...]]:
    c = d["is_canary"]
    if c.sum() == 0 or (~c).sum() == 0:
        return False, ()
    fired = []
    if d["error"][c].mean() > d["error"][~c].mean() + 0.01:
        fired.append("error_rate")
    lc, lb = d["latency_ms"][c], d["latency_ms"][~c]
    lc, lb = lc[np.isfinite(lc)], lb[np.isfinite(lb)]
    if lc.size and lb.size and np.quantile(lc, 0.95) > 1.1 * np.quantile(lb, 0.95):
        fired.append("latency_p95")
    return bool(fired), tuple(fired)


KAYENTA_METRICS = (("error", "greater", "error_rate"), ("refusal", "greater", "refusal_rate"),
                   ("latency_ms", "greater", "latency_p95"), ("output_tokens", "greater", "output_tokens"),
                   ("score", "less", "score"))


def rule_kayenta(d: dict) -> tuple[bool, tuple[str, ...]]:
    c = d["is_canary"]
    fired = []
    for col, harmful, name in KAYENTA_METRICS:
        v = np.asarray(d[col], dtype=float)
        a, b = v[c], v[~c]
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if a.size < 2 or b.size < 2:
            continue
        if a.min() == a.max() == b.min() == b.max():
            continue
        p = mannwhitneyu(a, b, alternative="two-sided").pvalue
        worse = np.mean(a) > np.mean(b) if harmful == "greater" else np.mean(a) < np.mean(b)
        if p < ALPHA and worse:
            fired.append(name)
    return bool(fired), tuple(fired)


RULE_FN = {"flagger": rule_flagger, "kayenta": rule_kayenta}


# ------------------------------------------------------------------------------------------------
# one rollout under one rule
# ------------------------------------------------------------------------------------------------
def gating_specs() -> list:
    """Each gating metric of ``default_specs()`` with its share of the family-wise alpha made explicit.

    ``evaluate_all([spec], data, ALPHA)`` then judges that one metric exactly as
    ``evaluate_all(default_specs(), data, ALPHA)`` does (alpha 0.01 each), so metrics can be evaluated
    one at a time and an unchanged metric's verdicts reused (see ``_task``).
    """
    specs = default_specs()
    alphas = split_alpha(specs, ALPHA)
    return [replace(s, alpha=alphas[s.name]) for s in specs]


def verdicts_at(specs1: list, d: dict, names=None) -> dict:
    """Verdict objects of the gating metrics (all, or those in ``names``) on data ``d``."""
    return {s.name: evaluate_all([s], d, ALPHA, quantile_intervals=False).verdicts[0]
            for s in specs1 if names is None or s.name in names}


def run_lockgate(s: dict, cfg: RolloutConfig, looks: np.ndarray, specs1: list, aa_cache: list[dict],
                 reuse: set[str]) -> dict:
    """The stage machine on one stream: rollback at the first failing look, promotion when every gating
    metric passes at a look after the last stage started.  Metrics in ``reuse`` read exactly the same
    data as in the A/A stream of this run (common random numbers), so their verdicts at look ``k`` are
    ``aa_cache[k]``; the others are evaluated here."""
    last_stage_start = cfg.hours_per_stage * (len(cfg.stages) - 1) * 3600.0
    out = {"rollback": False, "rb_time_h": None, "rb_canary": None, "rb_metrics": [], "promoted": False,
           "promo_time_h": None, "last_stage_passes": [], "evals": 0}
    own = [sp.name for sp in specs1 if sp.name not in reuse]
    prev = 0.0
    for k, t in enumerate(looks):
        v = {m: aa_cache[k][m][0] for m in reuse}
        if own:
            v.update({m: x.verdict for m, x in verdicts_at(specs1, prefix(s, t), own).items()})
            out["evals"] += 1
        fails = [m for m in METRICS if v[m] == "fail"]
        if fails:
            t_dec, fired = t, fails
            for u in np.arange(prev + SUBLOOK_S, t - 1e-6, SUBLOOK_S):
                vu = verdicts_at(specs1, prefix(s, u))
                out["evals"] += 1
                fu = [m for m in METRICS if vu[m].verdict == "fail"]
                if fu:
                    t_dec, fired = float(u), fu
                    break
            out.update(rollback=True, rb_time_h=t_dec / 3600.0, rb_metrics=fired,
                       rb_canary=int(prefix(s, t_dec)["is_canary"].sum()))
            break
        if t > last_stage_start + 1e-6:  # a look after the last stage started
            passes = [m for m in METRICS if v[m] == "pass"]
            out["last_stage_passes"].append([float(t) / 3600.0, passes])
            if len(passes) == N_GATING:
                out.update(promoted=True, promo_time_h=t / 3600.0)
                break
        prev = t
    return out


def run_rule(rule: str, s: dict, cfg: RolloutConfig, looks: np.ndarray) -> dict:
    """A Flagger- or Kayenta-style rule on one stream: rollback at the first failing look (located to
    30 s like lockgate's), promotion when the ramp ends without one."""
    fn = RULE_FN[rule]
    out = {"rollback": False, "rb_time_h": None, "rb_canary": None, "rb_metrics": [], "promoted": False,
           "promo_time_h": None, "evals": 0}
    prev = 0.0
    for t in looks:
        rb, fired = fn(prefix(s, t))
        out["evals"] += 1
        if rb:
            t_dec, fired_dec = t, fired
            for u in np.arange(prev + SUBLOOK_S, t - 1e-6, SUBLOOK_S):
                rb_u, fired_u = fn(prefix(s, u))
                out["evals"] += 1
                if rb_u:
                    t_dec, fired_dec = float(u), fired_u
                    break
            out.update(rollback=True, rb_time_h=t_dec / 3600.0, rb_metrics=list(fired_dec),
                       rb_canary=int(prefix(s, t_dec)["is_canary"].sum()))
            return out
        prev = t
    out.update(promoted=True, promo_time_h=cfg.hours)
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and (np.array_equal(a, b, equal_nan=True) if a.dtype.kind == "f" else np.array_equal(a, b))


def _task(args: tuple) -> tuple:
    """Runs ``run_ids`` of one traffic level: every scenario, every rule (Flagger/Kayenta for i < n_other)."""
    level, run_ids, scs, n_other, seed = args
    cfg = config(level)
    looks = look_times(cfg, LEVELS[level]["looks"])
    specs1 = gating_specs()
    cols = {sp.name: sp.data_column for sp in specs1}
    keys = ("is_canary", "cluster", "share", "stratum")
    res: dict[int, list[dict]] = {}
    t0 = time.process_time()
    for i in run_ids:
        # common random numbers: run i of every scenario (and every rule) sees the same draws
        seed_i = [seed, 1 if level == "20k" else 2, i]
        s0 = simulate_rollout(np.random.default_rng(seed_i), cfg, Effects())
        aa_cache = []
        for t in looks:
            d = prefix(s0, t)
            aa_cache.append({m: (x.verdict, x.n_canary, x.n_needed) for m, x in verdicts_at(specs1, d).items()})
        for k, sc in enumerate(scs):
            s = s0 if sc.kind == "aa" else simulate_rollout(np.random.default_rng(seed_i), cfg, sc.effects)
            same_keys = all(_same(s[c], s0[c]) for c in keys)
            reuse = {m for m, c in cols.items() if same_keys and _same(s[c], s0[c])}
            row = {"run": i, "reused": sorted(reuse), "lockgate": run_lockgate(s, cfg, looks, specs1, aa_cache, reuse)}
            if sc.kind == "aa":
                row["lockgate"]["end"] = {m: {"verdict": x[0], "n_canary": x[1], "n_needed": x[2],
                                              "canary_requests": int(s0["is_canary"].sum())}
                                          for m, x in aa_cache[-1].items()}
            if i < n_other:
                for rule in ("flagger", "kayenta"):
                    row[rule] = run_rule(rule, s, cfg, looks)
            res.setdefault(k, []).append(row)
    return level, res, time.process_time() - t0


# ------------------------------------------------------------------------------------------------
# follow-ups: one metric alone, many runs (the cells that missed a target, measured more precisely)
# ------------------------------------------------------------------------------------------------
def _single_task(args: tuple) -> tuple:
    """The changed metric alone on runs ``run_ids`` of one scenario: its first failing look.

    ``spacing_s`` None: the main run's evenly spaced looks with the 30-s re-examination; else a look
    every ``spacing_s`` seconds from the start (the live controller's cadence when 30).  Alone, the
    metric cannot be stopped earlier by another metric, so its rollback rate is an upper bound of the
    rate attributable to it in the full stage machine."""
    level, sc, run_ids, seed, spacing_s = args
    cfg = config(level)
    spec = next(sp for sp in gating_specs() if sp.name == sc.metric)
    coarse = look_times(cfg, LEVELS[level]["looks"])
    looks = coarse if spacing_s is None else np.arange(spacing_s, cfg.hours * 3600.0 + 1e-6, spacing_s)
    out = []
    t0 = time.process_time()
    for i in run_ids:
        s = simulate_rollout(np.random.default_rng([seed, 1 if level == "20k" else 2, i]), cfg, sc.effects)
        hit, prev = None, 0.0
        for t in looks:
            if verdicts_at([spec], prefix(s, t))[spec.name].verdict == "fail":
                hit = float(t)
                if spacing_s is None:
                    for u in np.arange(prev + SUBLOOK_S, t - 1e-6, SUBLOOK_S):
                        if verdicts_at([spec], prefix(s, u))[spec.name].verdict == "fail":
                            hit = float(u)
                            break
                break
            prev = t
        out.append(None if hit is None else int(prefix(s, hit)["is_canary"].sum()))
    return out, time.process_time() - t0


def followups(raw: dict, res: dict, n_edge: int, n_fine: int, workers: int, seed: int, chunk: int = 25) -> list[dict]:
    """Cells that missed (or came close to) a target, re-measured with the changed metric alone:

    * within / at delta with any rollback for the changed metric: ``n_edge`` runs at the main looks;
    * 20,000 req/h regressions that missed a target: ``n_fine`` runs with a look every 30 s."""
    jobs = []
    for lv in raw["levels"]:
        scs = scenarios(raw["lat"][lv])
        for k, sc in enumerate(scs):
            g = res["levels"][lv]["scenarios"][k]["rules"]["lockgate"]
            if sc.kind in ("within", "delta") and g["attributable_rate"] > 0 and n_edge > 0:
                jobs.append((lv, k, sc, n_edge, None))
            if sc.kind == "regression" and lv == "20k" and n_fine > 0:
                lim = REGRESSION_P95_TARGET[sc.metric]
                p95 = g["canary_before_rollback_p95"]
                if g["attributable_rate"] < 0.95 or p95 is None or p95 > lim:
                    jobs.append((lv, k, sc, n_fine, SUBLOOK_S))
    tasks, owner = [], []
    for j, (lv, k, sc, n, sp) in enumerate(jobs):
        for a in range(0, n, chunk):
            tasks.append((lv, sc, list(range(a, min(n, a + chunk))), seed, sp))
            owner.append(j)
    got: dict[int, list] = {}
    cpu = 0.0
    for i, (hits, c) in run_tasks(_single_task, tasks, workers):
        got.setdefault(owner[i], []).extend(hits)
        cpu += c
    out = []
    for j, (lv, k, sc, n, sp) in enumerate(jobs):
        hits = got.get(j, [])
        det = [h for h in hits if h is not None]
        p = len(det) / len(hits)
        out.append({"level": lv, "scenario": sc.name, "kind": sc.kind, "metric": sc.metric, "n": len(hits),
                    "looks": "main looks" if sp is None else f"every {sp:g} s",
                    "rollback_rate": p, "rollback_se": math.sqrt(p * (1 - p) / len(hits)),
                    "rollback_upper95": _upper95(len(det), len(hits)), "rollbacks": len(det),
                    "canary_median": float(np.median(det)) if det else None, "canary_p95": pct(det, 95)})
    print(f"  follow-ups: {len(jobs)} cells, {cpu:.0f} s CPU", flush=True)
    return out, cpu


def diagnose(raw: dict, res: dict, seed: int) -> list[dict]:
    """Regressions missed in the main 20,000 req/h runs: what held the verdict back, at the end of the ramp."""
    out = []
    for lv in raw["levels"]:
        scs = scenarios(raw["lat"][lv])
        for k, sc in enumerate(scs):
            g = res["levels"][lv]["scenarios"][k]["rules"]["lockgate"]
            if sc.kind != "regression" or lv != "20k" or g["attributable_rate"] >= 0.95:
                continue
            spec = next(sp for sp in gating_specs() if sp.name == sc.metric)
            missed = [r["run"] for r in raw["rows"][f"{lv}|{k}"] if not r["lockgate"]["rollback"]]
            d = {"level": lv, "scenario": sc.name, "kind": "diagnosis", "metric": sc.metric, "missed": len(missed),
                 "true_ratio": {"error_rate": sc.effects.error_mult, "refusal_rate": sc.effects.refusal_mult,
                                "output_tokens": sc.effects.length_mult}.get(sc.metric),
                 "count_test_rejected": 0, "cluster_robust_beyond": 0, "ratio_estimates": []}
            for i in missed:
                s = simulate_rollout(np.random.default_rng([seed, 1 if lv == "20k" else 2, i]), config(lv), sc.effects)
                v = verdicts_at([spec], s)[spec.name]
                e = v.details.get("count_test_e_harm")
                d["count_test_rejected"] += int(e is not None and e >= 1.0 / v.alpha)
                d["cluster_robust_beyond"] += int(v.details.get("contrast_lcb", -math.inf) > 0.0
                                                  if spec.allowed_mode == "relative" else
                                                  (v.interval[0] or -math.inf) > (v.allowed or 0.0))
                if v.baseline:
                    d["ratio_estimates"].append(float(v.canary / v.baseline))
            out.append(d)
    return out


# ------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(math.ceil(q / 100 * len(s))) - 1))
    return s[k]


def summarise(sc: Scenario, rows: list[dict], rule: str) -> dict:
    rs = [r[rule] for r in rows if rule in r]
    n = len(rs)
    if n == 0:
        return {"n": 0}
    rb = [r for r in rs if r["rollback"]]
    attributable = [r for r in rb if sc.metric and sc.metric in r["rb_metrics"]]
    canary = [r["rb_canary"] for r in (attributable if sc.kind == "regression" else rb)]
    promo = [r for r in rs if r["promoted"]]
    p_rb = len(rb) / n
    p_at = len(attributable) / n
    per_metric = {m: sum(m in r["rb_metrics"] for r in rb) / n for m in METRICS}
    out = {
        "n": n,
        "rollback_rate": p_rb,
        "rollback_se": math.sqrt(max(p_rb * (1 - p_rb), 0.0) / n),
        "rollback_rate_upper95": _upper95(len(rb), n),
        "attributable_rate": p_at if sc.metric else None,
        "attributable_se": math.sqrt(p_at * (1 - p_at) / n) if sc.metric else None,
        "attributable_upper95": _upper95(len(attributable), n) if sc.metric else None,
        "per_metric_rollback_rate": per_metric,
        "canary_before_rollback_median": float(np.median(canary)) if canary else None,
        "canary_before_rollback_p95": pct(canary, 95),
        "canary_before_rollback_max": max(canary) if canary else None,
        "rollback_time_h_median": float(np.median([r["rb_time_h"] for r in rb])) if rb else None,
        "promotion_rate": len(promo) / n,
        "promotion_time_h_median": float(np.median([r["promo_time_h"] for r in promo])) if promo else None,
    }
    if rule == "lockgate" and sc.kind == "aa":
        out["gates"] = gate_summary(rs)
    return out


def _upper95(k: int, n: int) -> float:
    """One-sided 95 % Clopper-Pearson upper bound of a binomial proportion."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(0.95, k + 1, n - k))


def gate_summary(rs: list[dict]) -> dict:
    """Per gating metric on A/A: pass by the ramp's end, n_needed vs canary observations at the end."""
    out = {}
    for m in METRICS:
        ends = [r["end"][m] for r in rs if "end" in r]
        nn = [e["n_needed"] for e in ends if e["n_needed"] is not None]
        nc = [e["n_canary"] for e in ends]
        passed_last_stage = sum(any(m in p for _, p in r["last_stage_passes"]) for r in rs) / len(rs)
        out[m] = {
            "pass_in_last_stage_rate": passed_last_stage,
            "pass_at_end_rate": sum(e["verdict"] == "pass" for e in ends) / max(1, len(ends)),
            "n_needed_median": float(np.median(nn)) if nn else None,
            "n_canary_end_median": float(np.median(nc)) if nc else None,
            # observations of this metric per canary request (errors, refusals: 1; latency: not errored; ...)
            "obs_per_request": float(np.median([e["n_canary"] / max(1, e["canary_requests"]) for e in ends])),
        }
        out[m]["provable"] = bool(nn and out[m]["n_needed_median"] <= out[m]["n_canary_end_median"])
    return out


# ------------------------------------------------------------------------------------------------
# main run
# ------------------------------------------------------------------------------------------------
def run(n_sims: int, n_other: int, seed: int, workers: int, chunk: int, levels: list[str],
        checkpoint: Path | None = None) -> dict:
    """Simulate; returns the raw per-run rows.  With ``checkpoint``, finished tasks are appended to that
    file as they come, and a restarted run with the same arguments skips them."""
    import datetime as _dt

    t0 = time.perf_counter()
    lat = latency_multipliers(levels, seed, workers)
    for lv in levels:
        print(f"{lv}: latency multipliers {lat[lv]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    scs = {lv: scenarios(lat[lv]) for lv in levels}
    tasks = []
    for lv in levels:
        for a in range(0, n_sims, chunk):
            tasks.append((lv, list(range(a, min(n_sims, a + chunk))), scs[lv], n_other, seed))
    # the expensive tasks first (20,000 req/h; runs also judged by the other rules), so the workers finish together
    tasks.sort(key=lambda t: (t[0] != "20k", t[1][0] >= n_other))
    sig = repr((n_sims, n_other, seed, chunk, levels, [(t[0], t[1]) for t in tasks]))
    done: dict[int, tuple] = {}
    if checkpoint is not None and checkpoint.exists():
        with checkpoint.open("rb") as fh:
            while True:
                try:
                    s_, i, r = pickle.load(fh)
                except EOFError:
                    break
                if s_ == sig:
                    done[i] = r
        print(f"  {len(done)} tasks from {checkpoint}", flush=True)
    for i, r in run_tasks(_task, tasks, workers, set(done)):
        done[i] = r
        if checkpoint is not None:
            with checkpoint.open("ab") as fh:
                pickle.dump((sig, i, r), fh)
        print(f"  {len(done)}/{len(tasks)} tasks, {time.perf_counter() - t0:.0f} s wall, "
              f"{sum(c for _, _, c in done.values()):.0f} s CPU", flush=True)
    rows: dict[tuple[str, int], list[dict]] = {}
    for lv, res, _ in done.values():
        for k, rs in res.items():
            rows.setdefault((lv, k), []).extend(rs)
    return {"levels": levels, "lat": lat, "rows": {f"{lv}|{k}": rs for (lv, k), rs in rows.items()},
            "cpu_s_workers": sum(c for _, _, c in done.values()), "wall_s": time.perf_counter() - t0,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_end": " / ".join(f"{x:.2f}" for x in os.getloadavg())}


def report(raw: dict) -> dict:
    """Summaries per traffic level and scenario from the raw per-run rows of :func:`run`."""
    levels, lat = raw["levels"], raw["lat"]
    scs = {lv: scenarios(lat[lv]) for lv in levels}
    rows = {tuple((key.split("|")[0], int(key.split("|")[1]))): rs for key, rs in raw["rows"].items()}
    out = {"levels": {}, "cpu_s_workers": raw["cpu_s_workers"], "wall_s": raw["wall_s"]}
    for lv in levels:
        cfg = config(lv)
        looks = look_times(cfg, LEVELS[lv]["looks"])
        last_start = cfg.hours_per_stage * (len(cfg.stages) - 1)
        lvl = {"config": {**LEVELS[lv], "hours": cfg.hours, "stages": list(cfg.stages),
                          "look_every_min": float(looks[0] / 60.0), "last_stage_start_h": last_start},
               "latency_multipliers": lat[lv], "scenarios": []}
        for k, sc in enumerate(scs[lv]):
            rs = sorted(rows[(lv, k)], key=lambda r: r["run"])
            entry = {"name": sc.name, "kind": sc.kind, "metric": sc.metric, "effects": asdict(sc.effects),
                     "rules": {rule: summarise(sc, rs, rule) for rule in RULES}}
            if sc.kind == "aa":
                gates = entry["rules"]["lockgate"]["gates"]
                provable = [m for m in METRICS if gates[m]["provable"]]
                lg = [r["lockgate"] for r in rs]
                hits = []
                for r in lg:
                    for t_h, p in r["last_stage_passes"]:
                        if provable and set(provable) <= set(p):
                            hits.append(t_h)
                            break
                entry["provable_gates"] = provable
                entry["provable_gates_promotion_rate"] = len(hits) / len(lg) if provable else None
                entry["provable_gates_promotion_time_h_median"] = float(np.median(hits)) if hits else None
                for m in METRICS:
                    g = gates[m]
                    h = hours_needed(int(g["n_needed_median"]) if g["n_needed_median"] else None,
                                     int(g["n_canary_end_median"] or 0), LEVELS[lv]["rph"] * g["obs_per_request"],
                                     cfg.stages[-1])
                    g["extra_hours_at_last_share"] = h
            lvl["scenarios"].append(entry)
        out["levels"][lv] = lvl
    return out


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def _p(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f} %"


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _fu(res: dict, lv: str, name: str) -> dict | None:
    return next((f for f in res.get("followups", []) if f["level"] == lv and f["scenario"] == name
                 and f["kind"] != "diagnosis"), None)


def diagnosis_text(dg: dict) -> str:
    r = dg["ratio_estimates"]
    txt = (f"Why {dg['scenario']} at {LEVELS[dg['level']]['rph']:,.0f} req/h was missed in {dg['missed']} main runs "
           f"(the {SHORT[dg['metric']]} verdict on all the ramp's data, at its end): ")
    if dg["metric"] in ("error_rate", "refusal_rate"):
        txt += (f"the count test (conditional binomial against rate ratio 1.2) had rejected in {dg['count_test_rejected']} "
                f"of {dg['missed']}; the cluster-robust bound on canary − 1.2 × baseline was beyond 0 in "
                f"{dg['cluster_robust_beyond']} of {dg['missed']} — a rate fails only when both reject, so the "
                "cluster-robust half is the binding one")
    else:
        txt += f"the time-uniform bound was beyond the allowance in {dg['cluster_robust_beyond']} of {dg['missed']}"
    if r and dg.get("true_ratio"):
        txt += (f"; observed canary/baseline ratio in those runs {min(r):.2f}–{max(r):.2f} (median {np.median(r):.2f}, "
                f"true {dg['true_ratio']:g})")
    return txt + "."


def _fu_txt(f: dict) -> str:
    return (f"{f['metric'] and SHORT[f['metric']]} alone over {f['n']:,} runs: {_p(f['rollback_rate'], 2)} ± "
            f"{_p(f['rollback_se'], 2)} ({f['rollbacks']} of {f['n']:,}; 95 % upper bound {_p(f['rollback_upper95'], 2)})")


def _edge_rate(res: dict, lv: str, sc: dict) -> tuple[float, str]:
    """Rate used for a within / at-delta target: the larger follow-up sample when there is one."""
    g = sc["rules"]["lockgate"]
    rate = g["rollback_rate"] if sc["kind"] in ("aa", "within") else g["attributable_rate"]
    se = g["rollback_se"] if sc["kind"] in ("aa", "within") else g["attributable_se"]
    main = f"{_p(rate)} ± {_p(se)} (n={g['n']})"
    f = _fu(res, lv, sc["name"])
    if f is None:
        return rate, main
    # within: the other (unchanged) metrics' false rollbacks in the main runs add to the changed metric's
    others = g["rollback_rate"] - g["attributable_rate"] if sc["kind"] == "within" else 0.0
    return f["rollback_rate"] + others, f"{main}; {_fu_txt(f)}"


def targets(res: dict) -> list[dict]:
    """The issue's targets, each with the numbers and met / not met."""
    t = []
    lv_all = res["levels"]
    for lv, L in lv_all.items():
        for sc in L["scenarios"]:
            g = sc["rules"]["lockgate"]
            if sc["kind"] in ("aa", "within"):
                rate, txt = _edge_rate(res, lv, sc)
                t.append({"target": f"{lv}: false rollback <= 1 % on {sc['name']}", "met": rate <= 0.01,
                          "measured": txt + (f", 95 % upper bound {_p(g['rollback_rate_upper95'])}"
                                             if _fu(res, lv, sc["name"]) is None else "")})
            if sc["kind"] == "delta":
                rate, txt = _edge_rate(res, lv, sc)
                t.append({"target": f"{lv}: rollback attributable to {SHORT[sc['metric']]} <= alpha per metric "
                                    f"({ALPHA_PER_METRIC:g}) at delta", "met": rate <= ALPHA_PER_METRIC,
                          "measured": f"{txt}; main runs, any metric {_p(g['rollback_rate'])}"})
    if "20k" in lv_all:
        for sc in lv_all["20k"]["scenarios"]:
            if sc["kind"] != "regression":
                continue
            g = sc["rules"]["lockgate"]
            lim = REGRESSION_P95_TARGET[sc["metric"]]
            p95 = g["canary_before_rollback_p95"]
            f = _fu(res, "20k", sc["name"])
            fine = (f"; {SHORT[sc['metric']]} alone with a look every 30 s, {f['n']} runs: caught "
                    f"{_p(f['rollback_rate'])}, canary requests median {_n(f['canary_median'])}, p95 {_n(f['canary_p95'])}"
                    if f else "")
            t.append({"target": f"20k: {sc['name']} caught in >= 95 % of runs", "met": g["attributable_rate"] >= 0.95,
                      "measured": f"{_p(g['attributable_rate'])} (n={g['n']}; rolled back for any metric "
                                  f"{_p(g['rollback_rate'])}){fine}"})
            t.append({"target": f"20k: {sc['name']}: p95 of canary requests before rollback <= ~{lim:,}",
                      "met": p95 is not None and p95 <= lim,
                      "measured": f"p95 {_n(p95)}, median {_n(g['canary_before_rollback_median'])} "
                                  f"(over detected runs)"})
    promoted_reg = [(lv, sc["name"], sc["rules"]["lockgate"]["promotion_rate"]) for lv, L in lv_all.items()
                    for sc in L["scenarios"] if sc["kind"] == "regression"]
    worst = max(promoted_reg, key=lambda x: x[2])
    n_reg = sum(sc["rules"]["lockgate"]["n"] for L in lv_all.values() for sc in L["scenarios"] if sc["kind"] == "regression")
    t.append({"target": "no regression ever promoted (lockgate, both traffic levels)", "met": worst[2] == 0.0,
              "measured": f"0 promotions in {n_reg:,} regression rollouts (5 regressions x 2 traffic levels)"
              if worst[2] == 0.0 else f"{_p(worst[2])} in {worst[0]} {worst[1]}"})
    return t


def compact_targets(res: dict) -> list[dict]:
    """The targets grouped: one row per traffic level and kind, one per regression.  Within / at-delta
    cells with a follow-up (the changed metric alone over many runs) are judged on the follow-up."""
    rows = []
    for lv, L in res["levels"].items():
        rate = f"{L['config']['rph']:,.0f} req/h"
        fr = [sc for sc in L["scenarios"] if sc["kind"] in ("aa", "within")]
        total = sum(sc["rules"]["lockgate"]["n"] for sc in fr)
        k = sum(round(sc["rules"]["lockgate"]["rollback_rate"] * sc["rules"]["lockgate"]["n"]) for sc in fr)
        judged = [(sc, *_edge_rate(res, lv, sc)) for sc in fr]
        worst = max(judged, key=lambda x: x[1])
        rows.append({"target": f"{rate}: false rollback ≤ 1 % on A/A and on each within-allowance canary",
                     "met": worst[1] <= 0.01,
                     "measured": f"{k} of {total:,} main rollouts in the 6 scenarios; highest: {worst[0]['name']}, "
                                 f"{worst[2]}"})
        dl = [(sc, *_edge_rate(res, lv, sc)) for sc in L["scenarios"] if sc["kind"] == "delta"]
        rows.append({"target": f"{rate}: at delta, rollback for that metric ≤ alpha per metric ({ALPHA_PER_METRIC:g})",
                     "met": all(r <= ALPHA_PER_METRIC for _, r, _ in dl),
                     "measured": "; ".join(f"{SHORT[sc['metric']]} {txt}" for sc, _, txt in dl)})
    if "20k" in res["levels"]:
        for sc in res["levels"]["20k"]["scenarios"]:
            if sc["kind"] != "regression":
                continue
            g = sc["rules"]["lockgate"]
            lim = REGRESSION_P95_TARGET[sc["metric"]]
            p95 = g["canary_before_rollback_p95"]
            caught = g["attributable_rate"] >= 0.95
            fast = p95 is not None and p95 <= lim
            f = _fu(res, "20k", sc["name"])
            rows.append({"target": f"20,000 req/h: {sc['name'].split(': ', 1)[1]} caught in ≥ 95 %, p95 of canary "
                                   f"requests before rollback ≤ ~{lim:,}",
                         "met": caught and fast,
                         "measured": f"caught {_p(g['attributable_rate'])} (n={g['n']}); canary requests median "
                                     f"{_n(g['canary_before_rollback_median'])}, p95 {_n(p95)}"
                                     + ("" if fast else f" ({p95 / lim:.2f}x the target)" if p95 else "")
                                     + (f"; with a look every 30 s ({f['n']} runs, {SHORT[sc['metric']]} alone): caught "
                                        f"{_p(f['rollback_rate'])}, median {_n(f['canary_median'])}, p95 "
                                        f"{_n(f['canary_p95'])}" if f else "")})
    t = targets(res)[-1]
    rows.append({"target": "no regression ever promoted", "met": t["met"], "measured": t["measured"]})
    return rows


def write_md(res: dict, meta: dict) -> str:
    L = []
    L += [
        "# Decision quality: lockgate vs fixed-threshold and repeated-test rules",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- command: `{meta['cmd']}` (main runs: wall {res['wall_s']:.0f} s, {res['cpu_s_workers']:.0f} s CPU in "
        f"{meta['workers']} worker processes; follow-ups {res.get('followup_cpu_s', 0):.0f} s CPU; load average at "
        f"the end of the main runs {meta['load_end']})",
        f"- code: {meta['commit']}",
        f"- runs: {meta['sims']} simulated rollouts per scenario and traffic level for lockgate, the first "
        f"{meta['sims_other']} of them also for the Flagger- and Kayenta-style rules (seed {meta['seed']}; run i of "
        "every scenario uses the same random draws: common random numbers).",
        "- streams: `lockgate.controller.stats.simulate.simulate_rollout`: sticky users (~8 requests each, "
        "per-user random effects on every metric), stages 1/5/20/50 %, diurnal drift of the baseline's error rate "
        "and latency common to both arms.",
        f"- lockgate: `evaluate_all(default_specs(), alpha={ALPHA})`: errors and refusals rate ratio 1.2, p95 latency "
        "exceedance ratio 1.2 (at most 6 % of canary requests above the baseline's p95), output tokens +10 %, "
        f"evaluator score -0.01; Bonferroni {ALPHA_PER_METRIC:g} per metric; rollback when any gating metric fails, "
        "promotion when all 5 pass at a look after the last stage (50 %) started.",
        "- Flagger-style: error rate > baseline + 1 pt or p95 > 1.1 x baseline p95 at any look; Kayenta-style: "
        f"two-sided Mann-Whitney per metric (5 metrics) at each look, p < {ALPHA} in the harmful direction; both "
        "promote when the ramp ends without a failed check.",
        f"- looks: evenly spaced, {LEVELS['20k']['looks']} per rollout at 20,000 req/h (every 5 min) and "
        f"{LEVELS['1k']['looks']} at 1,000 req/h (every 15 min); the live controller looks every 30 s, too many to "
        "simulate hundreds of rollouts. When a look rolls back, the interval since the previous look is re-examined "
        "every 30 s and the first 30-s look that rolls back decides (its canary requests are reported). A crossing "
        "at a 30-s look that has reverted by the next evenly spaced look is not counted: the false-rollback rates "
        "are those of the evenly spaced looks.",
        "",
        "## p95 latency multipliers for 'within' and 'at delta'",
        "",
        "The simulator draws latency = 800 ms x drift(t) x exp(u_user + e_request) x latency_mult (u ~ N(0, 0.3²), "
        "e ~ N(0, 0.5²); drift = 1 + 0.15 sin(2π(t/24 h + random phase)), common to both arms). Without drift the "
        "multiplier putting a share s of canary requests above the baseline's p95 is exp(σ (z_0.95 − z_(1−s))), "
        "σ = √(0.5² + 0.3²): 1.0539 for 6 %, 1.0276 for 5.5 %. `simulate.latency_mult_for_exceedance` solves it "
        "numerically on A/A streams of each traffic level (the canary's latencies scale by the multiplier with the "
        "same draws, so the share above the baseline's empirical p95 is a function of the multiplier on one A/A "
        "stream; the condition is set on the average over streams), with the evaluator's stage weighting (the "
        "exceedance-ratio test's null boundary: Σ_k w_k (share_c,k − 1.2 share_b,k) = 0, w_k ∝ n_c,k n_b,k / n_k) — "
        "used here — and pooled over the rollout (all canary requests against the pooled baseline p95), for "
        f"comparison. Each value is the mean of {LAT_BATCHES} independent batches of A/A streams ± the batches' "
        "standard error (the drift's random phase makes single streams vary, most over the 12 h ramp):",
        "",
        "| traffic | streams | within (5.5 %), stage-weighted | within, pooled | at delta (6 %), stage-weighted | at delta, pooled |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for lv, Lv in res["levels"].items():
        m = Lv["latency_multipliers"]
        L.append(f"| {Lv['config']['rph']:,.0f} req/h | {m['n_streams']:,} | " + " | ".join(
            f"{m[k]:.4f} ± {m[k + '_se']:.4f}" for k in ("within_stage", "within_pooled", "delta_stage", "delta_pooled"))
                 + " |")
    L += ["", "## Results", "",
          "Rollback = rolled back at any look (on A/A, benign, within and at-delta canaries a false rollback; on "
          "regressions a detection). 'for it' = rolled back with the changed metric among the failing ones (at "
          "delta this must stay <= alpha per metric, 1 %; on regressions it is the detection rate). ± = binomial "
          "standard error. Canary requests = canary requests served up to the deciding 30-s look (for regressions: "
          "over the runs rolled back for the changed metric, else over all rolled-back runs); median / p95. "
          "Promoted = lockgate: every gating metric `pass` at a look in the last stage; Flagger-/Kayenta-style: "
          "the ramp ended without a failed check.", ""]
    for lv, Lv in res["levels"].items():
        c = Lv["config"]
        L += [f"### {c['rph']:,.0f} req/h: {c['hours']:g} h ramp, stages 1/5/20/50 % x {c['hours_per_stage'] * 60:.0f} min, "
              f"{c['looks']} looks (every {c['look_every_min']:.0f} min)", "",
              "| scenario | lockgate rollback | for it | canary req. median / p95 | promoted (median h) "
              "| Flagger-style rollback | canary req. median | promoted "
              "| Kayenta-style rollback | canary req. median | promoted |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for sc in Lv["scenarios"]:
            g, f, k = (sc["rules"][r] for r in RULES)
            at = "-" if g["attributable_rate"] is None else f"{_p(g['attributable_rate'])} ± {_p(g['attributable_se'])}"
            L.append(
                f"| {sc['name']} | {_p(g['rollback_rate'])} ± {_p(g['rollback_se'])} (n={g['n']}) | {at} | "
                f"{_n(g['canary_before_rollback_median'])} / {_n(g['canary_before_rollback_p95'])} | "
                f"{_p(g['promotion_rate'])}"
                + (f" ({g['promotion_time_h_median']:.2f})" if g["promotion_time_h_median"] is not None else "") + " | "
                f"{_p(f['rollback_rate'])} (n={f['n']}) | {_n(f['canary_before_rollback_median'])} | {_p(f['promotion_rate'])} | "
                f"{_p(k['rollback_rate'])} (n={k['n']}) | {_n(k['canary_before_rollback_median'])} | {_p(k['promotion_rate'])} |")
        L.append("")
        # per-metric false rollbacks where it matters
        fr = [(sc["name"], sc["rules"]["lockgate"]["per_metric_rollback_rate"]) for sc in Lv["scenarios"]
              if sc["kind"] != "regression" and sc["rules"]["lockgate"]["rollback_rate"] > 0]
        if fr:
            L += ["lockgate rollbacks by failing metric (non-regression scenarios with any rollback):", "",
                  "| scenario | " + " | ".join(SHORT[m] for m in METRICS) + " |",
                  "|---|" + "---:|" * len(METRICS)]
            for name, pm in fr:
                L.append(f"| {name} | " + " | ".join(_p(pm[m]) for m in METRICS) + " |")
            L.append("")
        aa = Lv["scenarios"][0]
        gates = aa["rules"]["lockgate"]["gates"]
        L += [f"A/A at {c['rph']:,.0f} req/h — which gates are provable within the ramp (medians over the A/A runs "
              "at the end of the ramp; `n_needed` = the verdict's planning estimate of canary observations at which "
              "non-inferiority is shown at the observed variance; provable = median `n_needed` <= median canary "
              "observations by the end):", "",
              "| gate | pass at a last-stage look | pass at the end | canary obs. at the end | n_needed | provable in the ramp | "
              f"more hours at {100 * c['stages'][-1]:g} % to reach n_needed |",
              "|---|---:|---:|---:|---:|---|---:|"]
        for m in METRICS:
            gm = gates[m]
            eh = gm["extra_hours_at_last_share"]
            L.append(f"| {SHORT[m]} | {_p(gm['pass_in_last_stage_rate'])} | {_p(gm['pass_at_end_rate'])} | "
                     f"{_n(gm['n_canary_end_median'])} | {_n(gm['n_needed_median'])} | "
                     f"{'yes' if gm['provable'] else 'no'} | {'-' if eh is None else f'{eh:.1f}'} |")
        prov = aa["provable_gates"]
        L += ["", f"A/A promoted by the end of the ramp (all 5 gates pass): {_p(aa['rules']['lockgate']['promotion_rate'])}"
              + (f", median at {aa['rules']['lockgate']['promotion_time_h_median']:.2f} h" if aa['rules']['lockgate']['promotion_time_h_median'] else "")
              + f". Counting only the gates provable within the ramp ({', '.join(SHORT[m] for m in prov) or 'none'}): "
              + (f"{_p(aa['provable_gates_promotion_rate'])}" + (f", median at {aa['provable_gates_promotion_time_h_median']:.2f} h"
                 if aa["provable_gates_promotion_time_h_median"] else "") if prov else "-") + ".", ""]
    if res.get("followups"):
        L += ["## Follow-ups: the changed metric alone, more runs", "",
              "Cells that missed or came near a target, re-measured with only the changed metric evaluated (the other "
              "metrics are unchanged; alone, the metric cannot be pre-empted by another one, so its rate is an upper "
              "bound of the rate attributable to it). Within / at delta: runs 0..N-1 of the same streams (the main "
              "runs are the first 150) at the main looks; 20,000 req/h regressions that missed: a look every 30 s "
              "from the start (the live controller's cadence), so no crossing between looks is missed.", "",
              "| traffic | scenario | looks | runs | rollback rate | 95 % upper bound | canary req. median / p95 |",
              "|---|---|---|---:|---:|---:|---:|"]
        for f in [f for f in res["followups"] if f["kind"] != "diagnosis"]:
            L.append(f"| {LEVELS[f['level']]['rph']:,.0f} req/h | {f['scenario']} | {f['looks']} | {f['n']:,} | "
                     f"{_p(f['rollback_rate'], 2)} ± {_p(f['rollback_se'], 2)} ({f['rollbacks']}) | "
                     f"{_p(f['rollback_upper95'], 2)} | {_n(f['canary_median'])} / {_n(f['canary_p95'])} |")
        L.append("")
        for dg in [f for f in res["followups"] if f["kind"] == "diagnosis"]:
            L += [diagnosis_text(dg), ""]
    L += ["## Targets (lockgate)", "", "| target | measured | met? |", "|---|---|---|"]
    for row in compact_targets(res):
        L.append(f"| {row['target']} | {row['measured']} | {'**met**' if row['met'] else '**NOT met**'} |")
    L += ["", "Each target row by row:", "", "| target | measured | met? |", "|---|---|---|"]
    for t in targets(res):
        L.append(f"| {t['target']} | {t['measured']} | {'**met**' if t['met'] else '**NOT met**'} |")
    L.append("")
    return "\n".join(L)


def doc_section(res: dict, meta: dict) -> str:
    L = ["## Decision quality: lockgate vs Flagger-style thresholds and Kayenta-style repeated tests", "",
         "A simulation (no processes): the same rollout streams judged by three rules, at 20,000 req/h (3 h ramp) and "
         "1,000 req/h (12 h ramp), stages 1/5/20/50 %. Written by `bench/decision_quality.py`; definitions, per-metric "
         "tables and the p95 latency multipliers in "
         "[`bench/results/decision_quality.md`](../bench/results/decision_quality.md) (raw numbers: `decision_quality.json`).",
         "",
         f"- Machine: {meta['machine']}",
         f"- Date: {meta['date']}; code: {meta['commit']}",
         f"- Command: `{meta['cmd']}` (main runs {res['cpu_s_workers']:.0f} s CPU in {meta['workers']} workers, "
         f"{res['wall_s']:.0f} s wall, follow-ups {res.get('followup_cpu_s', 0):.0f} s CPU; load average "
         f"{meta['load_end']})",
         f"- Runs: {meta['sims']} rollouts per row for lockgate, {meta['sims_other']} for the Flagger-/Kayenta-style "
         "rules (the same streams). Looks: 36 per rollout at 20,000 req/h (every 5 min), 48 at 1,000 req/h (every "
         "15 min); a rollback is located to the first 30-s look (the live controller's interval) since the previous look.",
         "- lockgate: `default_specs()` (errors, refusals rate ratio 1.2; p95 exceedance ratio 1.2; output tokens +10 %; "
         f"score −0.01), alpha {ALPHA} family-wise, {ALPHA_PER_METRIC:g} per metric. Flagger-style: error rate > baseline "
         "+ 1 pt or p95 > 1.1 × baseline. Kayenta-style: Mann-Whitney per metric, p < 0.05, at every look.",
         "- Within = half the allowance, at delta = exactly on it (p95: 5.5 % / 6 % of canary requests above the "
         "baseline's p95, a latency multiplier solved on simulated A/A streams).",
         "",
         "Rollback = rolled back at any look (false on A/A / benign / within / at delta; detection on regressions); "
         "'for it' = with the changed metric failing; ± binomial standard error; canary requests before rollback "
         "median / p95; promoted = lockgate: all gates `pass` in the last stage; others: the ramp ended cleanly.",
         ""]
    for lv, Lv in res["levels"].items():
        c = Lv["config"]
        L += [f"**{c['rph']:,.0f} req/h, {c['hours']:g} h ramp**", "",
              "| scenario | lockgate rollback | for it | canary req. median / p95 | promoted | Flagger-style rollback "
              "| Flagger promoted | Kayenta-style rollback | Kayenta promoted |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for sc in Lv["scenarios"]:
            g, f, k = (sc["rules"][r] for r in RULES)
            at = "-" if g["attributable_rate"] is None else f"{_p(g['attributable_rate'])} ± {_p(g['attributable_se'])}"
            L.append(f"| {sc['name']} | {_p(g['rollback_rate'])} ± {_p(g['rollback_se'])} | {at} | "
                     f"{_n(g['canary_before_rollback_median'])} / {_n(g['canary_before_rollback_p95'])} | "
                     f"{_p(g['promotion_rate'])} | {_p(f['rollback_rate'])} | {_p(f['promotion_rate'])} | "
                     f"{_p(k['rollback_rate'])} | {_p(k['promotion_rate'])} |")
        L.append("")
    L += ["Targets (lockgate; every target row by row in the results file):", "",
          "| target | measured | met? |", "|---|---|---|"]
    for row in compact_targets(res):
        L.append(f"| {row['target']} | {row['measured']} | {'**met**' if row['met'] else '**NOT met**'} |")
    L.append("")
    for dg in [f for f in res.get("followups", []) if f["kind"] == "diagnosis"]:
        L += [diagnosis_text(dg), ""]
    if res.get("followups"):
        L += ["Follow-ups (the changed metric alone: 1,000 runs for the within / at-delta cells with any rollback, a "
              "look every 30 s for the 20,000 req/h regressions that missed) are tabulated in the results file.", ""]
    L += ["A/A promotion within the ramp (no target; the issue asks how often an identical canary is promoted):", ""]
    for lv, Lv in res["levels"].items():
        aa = Lv["scenarios"][0]
        g = aa["rules"]["lockgate"]
        gates = g["gates"]
        prov = aa["provable_gates"]
        unprov = [m for m in METRICS if m not in prov]
        rate_txt = _p(g["promotion_rate"]) + (f" (median {g['promotion_time_h_median']:.2f} h)"
                                              if g["promotion_time_h_median"] else "")
        L.append(
            f"- {Lv['config']['rph']:,.0f} req/h, A/A promoted within the {Lv['config']['hours']:g} h ramp: {rate_txt}. "
            f"Provable within the ramp: {', '.join(SHORT[m] for m in prov) or 'none'}"
            + (f" (promotion counting only these: {_p(aa['provable_gates_promotion_rate'])})" if prov else "")
            + (f"; not provable: " + "; ".join(
                f"{SHORT[m]} (needs ~{_n(gates[m]['n_needed_median'])} canary observations, has "
                f"~{_n(gates[m]['n_canary_end_median'])}: ~{gates[m]['extra_hours_at_last_share']:.1f} h more at 50 %)"
                if gates[m]["extra_hours_at_last_share"] is not None else f"{SHORT[m]} (no estimate)"
                for m in unprov) if unprov else "") + ".")
    L.append("")
    return "\n".join(L) + "\n"


def write_doc_section(res: dict, meta: dict) -> None:
    start, end = "<!-- decision_quality:start -->", "<!-- decision_quality:end -->"
    block = f"{start}\n{doc_section(res, meta).rstrip()}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# lockgate benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text, count=1) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)} section decision_quality")


def machine_line() -> str:
    import datetime as _dt
    import platform

    try:
        sys.path.insert(0, str(ROOT / "bench"))
        from _common import machine  # noqa: PLC0415

        m = machine()
        return (f"{m['nproc']} CPUs, {m['cpu_model']}, Linux {m['kernel']}, Python {m['python']}, numpy "
                f"{np.__version__}, scipy {__import__('scipy').__version__} (load average at start "
                f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}; shared VM, other jobs running)")
    except Exception as exc:  # noqa: BLE001
        return (f"{os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}, Python "
                f"{platform.python_version()}, numpy {np.__version__} (machine() failed: {exc}) "
                f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}")


def main() -> None:
    import datetime as _dt
    import subprocess

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=150, help="rollouts per scenario and traffic level (lockgate)")
    ap.add_argument("--sims-other", type=int, default=40, help="of which also judged by the Flagger-/Kayenta-style rules")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=2, help="runs per task")
    ap.add_argument("--levels", default="20k,1k")
    ap.add_argument("--out", default=str(RESULTS / "decision_quality.md"))
    ap.add_argument("--code-note", default=None,
                    help="what code was measured (default: the last commit touching lockgate/controller/stats, "
                         "and whether the working tree differs from it)")
    ap.add_argument("--raw", default=None, help="also save the per-run rows here (gzipped pickle); finished tasks "
                    "go to RAW.parts as they come, and a re-run with the same arguments resumes from it")
    ap.add_argument("--from-raw", default=None, help="no simulation: report from per-run rows saved with --raw "
                    "and the run's own arguments")
    ap.add_argument("--followup-runs", type=int, default=1000,
                    help="runs of the changed metric alone for within/at-delta cells with any rollback for it")
    ap.add_argument("--fine-runs", type=int, default=40,
                    help="runs with 30-s looks of the changed metric alone for 20,000 req/h regressions that missed")
    ap.add_argument("--doc-only", action="store_true",
                    help="no simulation: write the docs/benchmarks.md section from the existing JSON results")
    a = ap.parse_args()
    out_md = Path(a.out)
    out_json = out_md.with_suffix(".json")
    if a.doc_only:
        data = json.loads(out_json.read_text())
        write_doc_section(data["results"], data["meta"])
        return
    workers = max(1, min(2, a.workers))
    if a.from_raw:
        raw = pickle.loads(gzip.decompress(Path(a.from_raw).read_bytes()))
        a.sims, a.sims_other, a.seed, workers, a.levels = (raw["args"][k] for k in ("sims", "sims_other", "seed",
                                                                                    "workers", "levels"))
    else:
        mach = machine_line()
        raw = run(a.sims, min(a.sims_other, a.sims), a.seed, workers, a.chunk, a.levels.split(","),
                  Path(a.raw + ".parts") if a.raw else None)
        raw["machine"] = mach
        raw["args"] = {"sims": a.sims, "sims_other": a.sims_other, "seed": a.seed, "workers": workers,
                       "levels": a.levels}
        if a.raw:
            Path(a.raw).write_bytes(gzip.compress(pickle.dumps(raw)))
            print(f"wrote {a.raw}")
    res = report(raw)
    if (a.followup_runs or a.fine_runs) and "followups" not in raw:
        raw["followups"], raw["followup_cpu_s"] = followups(raw, res, a.followup_runs, a.fine_runs, workers, a.seed)
        raw["followup_args"] = {"followup_runs": a.followup_runs, "fine_runs": a.fine_runs}
        if a.raw or a.from_raw:
            Path(a.raw or a.from_raw).write_bytes(gzip.compress(pickle.dumps(raw)))
    if (a.followup_runs or a.fine_runs) and "diagnosis" not in raw:
        raw["diagnosis"] = diagnose(raw, res, a.seed)
        if a.raw or a.from_raw:
            Path(a.raw or a.from_raw).write_bytes(gzip.compress(pickle.dumps(raw)))
    res["followups"] = raw.get("followups", []) + raw.get("diagnosis", [])
    res["followup_args"] = raw.get("followup_args", {})
    res["followup_cpu_s"] = raw.get("followup_cpu_s", 0.0)
    commit = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %cd", "--date=format:%Y-%m-%d %H:%M",
                             "--", "lockgate/controller/stats"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "lockgate/controller/stats"],
                           capture_output=True, text=True).stdout.strip()
    meta = {
        "date": raw.get("date") or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": raw["machine"],
        "cmd": f"nice -n 10 .venv/bin/python bench/decision_quality.py --sims {a.sims} --sims-other {a.sims_other} "
               f"--seed {a.seed} --workers {workers}" + (f" --levels {a.levels}" if a.levels != "20k,1k" else "")
               + f" --followup-runs {raw.get('followup_args', {}).get('followup_runs', 0)}"
               f" --fine-runs {raw.get('followup_args', {}).get('fine_runs', 0)}",
        "commit": a.code_note or (f"statistics core at {commit}" + (" + uncommitted changes" if dirty else "")
                                  if commit else "unknown"),
        "sims": a.sims, "sims_other": min(a.sims_other, a.sims), "seed": a.seed, "workers": workers,
        "load_end": raw.get("load_end") or " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    md = write_md(res, meta)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md)
    out_json.write_text(json.dumps({"meta": meta, "results": res}, indent=1) + "\n")
    print(md)
    print(f"wrote {out_md} and {out_json}")
    if out_md.resolve() == (RESULTS / "decision_quality.md").resolve():
        write_doc_section(res, meta)


if __name__ == "__main__":
    main()
