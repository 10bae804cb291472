"""Cost of one look at a rollout: the full recomputation vs the incremental evidence, at N stored observations.

    .venv/bin/python bench/evidence_cost.py [--sizes 10000 1000000] [--looks 20]

For each N: an observation store (SQLite, ``ObservationStore``) holding N observations of one rollout
(2,000 sticky users, 10 % then 50 % canary, 2 % errors, latency lognormal), then ``--looks`` times a batch
of 100 new observations is stored and handed to the controller's incremental evidence the way the
collector hands it (``LiveEvidence.rows_stored``), and the look is timed both ways:

* **full** (baseline, the old path): ``evidence.judge`` — read every stored row of the rollout, prepare,
  recompute (what the promoter did at every look);
* **incremental**: ``LiveEvidence.judge`` — fold the new batch, judge from the per-user sums.

Two specs: ``error_rate`` alone (the auto_rollback benchmark's) and error_rate + latency_p95 (a quantile
metric, on the exact in-memory row path). The last batch carries a breach (canary errors at 60 %):
both paths must say ``rollback`` on it, and the time from that batch's hand-over to the rollback
decision is reported. Breach → every Envoy ACKed = this + the push (``bench/weight_push.py``: ms).
Writes ``bench/results/evidence_cost.json`` and the ``evidence_cost`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, save_json, write_doc_section  # noqa: E402
from lockgate.controller.decide import evidence  # noqa: E402
from lockgate.controller.decide.live_evidence import LiveEvidence  # noqa: E402
from lockgate.controller.decide.spec import spec_from_text  # noqa: E402
from lockgate.controller.ingest.observations import ObservationStore  # noqa: E402
from lockgate.controller.ingest.schema import STORED_COLUMN_NAMES  # noqa: E402

SPEC = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 30
  alpha: 0.05
  steps:
    - {{weight_percent: 10, min_duration: 60s}}
    - {{weight_percent: 50, min_duration: 60s}}
  promotion: {{max_duration: 24h, preflight: none}}
  metrics:
    - {{name: error_rate, gating: true, allowed: {{absolute: 0.05}}}}
{extra}"""
SPECS = {"error_rate": spec_from_text(SPEC.format(extra="")),
         "error_rate+latency_p95": spec_from_text(SPEC.format(
             extra="    - {name: latency_p95, gating: true, allowed: {relative: 0.3}}\n"))}
T0 = 1.8e9
COL = {c: i for i, c in enumerate(STORED_COLUMN_NAMES)}


def rows(rng, start: int, n: int, t_from: float, t_to: float, err_canary: float) -> list[tuple]:
    ts = np.sort(rng.uniform(t_from, t_to, n))
    user = rng.integers(0, 2000, n)
    share = np.where(ts < T0 + 3600, 0.1, 0.5)
    canary = (np.abs(np.sin(user * 12.9898)) % 1.0) < share  # sticky by user within a stage
    err = rng.uniform(size=n) < np.where(canary, err_canary, 0.02)
    lat = rng.lognormal(4, 0.4, n)
    out = []
    for i in range(n):
        r = [None] * len(STORED_COLUMN_NAMES)
        r[COL["request_id"]] = f"r{start + i}"
        r[COL["ts"]] = float(ts[i])
        r[COL["model"]] = "chat"
        r[COL["version"]] = "v2" if canary[i] else "v1"
        r[COL["role"]] = "canary" if canary[i] else "baseline"
        r[COL["weight_bp"]] = int(share[i] * 10000)
        r[COL["status_code"]] = 503 if err[i] else 200
        r[COL["user_key"]] = f"u{user[i]}"
        r[COL["duration_ms"]] = float(lat[i])
        for c in ("timeout", "truncated", "output_tokens_estimated", "replay"):
            r[COL[c]] = 0
        r[COL["received_ts"]] = float(ts[i])
        out.append(tuple(r))
    return out


def run_size(n: int, looks: int, tmp: Path) -> dict:
    rng = np.random.default_rng(n)
    store = ObservationStore(tmp / f"obs-{n}.db", synchronous="OFF")
    t_fill = time.perf_counter()
    span = 7200.0
    for s in range(0, n, 50_000):
        store.insert_rows(rows(rng, s, min(50_000, n - s), T0 + span * s / n, T0 + span * min(n, s + 50_000) / n,
                               0.02))
    nxt = n
    fill_s = time.perf_counter() - t_fill
    config = SimpleNamespace(model=lambda m: SimpleNamespace(evaluation=None))
    out: dict = {"stored": n, "fill_s": round(fill_s, 1)}
    for name, spec in SPECS.items():
        rollout = SimpleNamespace(id=hash(name) % 1000, model="chat", baseline="v1", canary="v2", started_at=T0,
                                  stage=1, stage_started_at=T0 + 3600, spec_hash=name, auto_values=lambda: {})
        live = LiveEvidence(store)
        now = T0 + span
        t = time.perf_counter()
        live.judge(rollout, spec, now)
        build_s = time.perf_counter() - t
        full, inc = [], []

        def look(batch):
            nonlocal nxt
            nxt += len(batch)
            store.insert_rows(batch)
            t = time.perf_counter()
            live.rows_stored(batch)
            j_inc, s_inc, _ = live.judge(rollout, spec, now, quantile_intervals=False)
            t_inc = time.perf_counter() - t
            t = time.perf_counter()
            j_full, s_full, _ = evidence.judge(store, config, rollout, spec, now)  # with intervals, as before
            t_full = time.perf_counter() - t
            assert j_inc.decision == j_full.decision, (j_inc.decision, j_full.decision)
            assert [v["verdict"] for v in s_inc["verdicts"]] == [v["verdict"] for v in s_full["verdicts"]]
            return j_full.decision, t_full, t_inc

        for k in range(looks):  # ordinary looks: 100 new observations each
            now += 1.0
            _, t_full, t_inc = look(rows(rng, nxt, 100, now - 1.0, now, 0.02))
            full.append(t_full)
            inc.append(t_inc)
        # the canary breaks: its errors accumulate (in 1,000-row batches of canary errors, folded by
        # untimed incremental looks up to ~10 % of the canary's rows) until the stored evidence crosses;
        # the batch that carries the crossing is timed both ways
        n_c = int(np.count_nonzero(np.asarray(store.fetch("chat", columns=["role"])["role"]) == "canary"))
        bad = 0
        while bad + 5000 < 0.09 * n_c:
            now += 1.0
            batch = rows(rng, nxt, 5000, now - 1.0, now, 1.0)
            nxt += len(batch)
            store.insert_rows(batch)
            live.rows_stored(batch)
            live.judge(rollout, spec, now, quantile_intervals=False)
            bad += 5000
        crossing = None
        for _ in range(100):
            now += 1.0
            decision, t_full, t_inc = look(rows(rng, nxt, 1000, now - 1.0, now, 1.0))
            if decision == "rollback":
                crossing = (t_full, t_inc)
                break
        assert crossing is not None, "no rollback"
        out[name] = {"build_from_store_s": round(build_s, 3), "full_ms_median": round(1000 * median(full), 1),
                     "full_ms_max": round(1000 * max(full), 1), "incremental_ms_median": round(1000 * median(inc), 2),
                     "incremental_ms_max": round(1000 * max(inc), 2),
                     "breach_batch_to_rollback_decision_ms": {"full": round(1000 * crossing[0], 1),
                                                              "incremental": round(1000 * crossing[1], 2)},
                     "ratio_full_over_incremental": round(median(full) / median(inc), 1)}
    store.close()
    return out


def render(d: dict) -> str:
    m = d["machine"]
    lines = ["## Evidence cost: one look, full recomputation vs incremental evidence", "",
             f"`bench/evidence_cost.py` ({d['when']}; {m.get('cpu_model', '?')}, {m.get('nproc', '?')} CPUs, load "
             f"{d['loadavg']}; shared machine, compare rows within the run). One look = 100 new stored "
             f"observations handed over as the collector does, then the judgement ({d['looks']} looks per row); then the "
             "canary breaks and 1,000-row batches of canary errors arrive until the stored evidence crosses: the "
             "batch that carries the crossing is timed both ways (both say `rollback` on it; the two paths agree on "
             "every verdict at every look). The full path computes the quantile shift intervals, as the promoter "
             "did at every look; the incremental looks leave them out (they are computed once per analysis "
             "interval; no verdict uses them).",
             "", "| stored observations | spec | full: median / max ms | incremental: median / max ms | full ÷ incremental "
             "| breach batch → rollback decision, full / incremental ms | state built from the store (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in d["sizes"]:
        for name in SPECS:
            x = r[name]
            b = x["breach_batch_to_rollback_decision_ms"]
            lines.append(f"| {r['stored']:,} | {name} | {x['full_ms_median']:,} / {x['full_ms_max']:,} | "
                         f"{x['incremental_ms_median']} / {x['incremental_ms_max']} | {x['ratio_full_over_incremental']}× | "
                         f"{b['full']:,} / {b['incremental']} | {x['build_from_store_s']} |")
    lines += ["", "The incremental path folds each stored row once into per-(user, stratum, arm) counts and sums "
              "(docs/statistics.md, \"Incremental evidence\"): error_rate's look costs O(users × strata). "
              "latency_p95 stays exact on the row path (the exceedance indicator moves with the baseline's "
              "quantile), over in-memory arrays instead of a re-read: O(rows) numpy per look. The state is built "
              "once per rollout (and after a controller restart) from one full read of the store.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--looks", type=int, default=20)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lockgate-evidence-") as tmp:
        sizes = [run_size(n, args.looks, Path(tmp)) for n in args.sizes]
    d = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "looks": args.looks, "sizes": sizes,
         "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    save_json("evidence_cost.json", d)
    text = render(d)
    print(text)
    if not args.no_doc:
        write_doc_section("## Evidence cost: one look", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
