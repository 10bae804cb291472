"""Pure evaluation of a rollout at one moment: observation columns + spec → Judgement + plan.

The live controller and ``lockgate analyze`` (offline replay of recorded observations) both call
:func:`evaluate_at`, so an offline replay decides exactly as the controller would have.

Columns are those of :meth:`ObservationStore.fetch` (or :func:`export.read_jsonl`). Derived here:

* ``error`` = 1 if ``status_code >= 500`` or ``timeout``, else 0 (NaN if the status is unknown);
* ``correct`` = ``predicted_class == true_class`` over requests whose label had arrived by ``now``;
* label-fed columns (``thumbs``, ``task_success``, ``evaluator_score``) are NaN where the label
  arrived after ``now`` — a label is used only from its arrival time;
* ``cluster`` = the hashed sticky-user key (falls back to the request id: then requests count as
  independent users); ``share`` = the canary weight in force when the request was routed.
Rows of neither arm (``role`` other than baseline/canary) and rows after ``now`` are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from lockgate.controller.spec import MetricCriterion, RolloutSpec
from lockgate.controller.stats import Judgement, MetricSpec, auto_allowed, evaluate_all, hours_needed

#: feedback columns whose values only count once their label has arrived
LABEL_TS = {"thumbs": "thumbs_arrival_ts", "task_success": "task_success_arrival_ts",
            "evaluator_score": "evaluator_score_arrival_ts"}


def _col(data: Mapping[str, np.ndarray], name: str, n: int, dtype=float) -> np.ndarray:
    if name in data:
        return np.asarray(data[name])
    return np.full(n, np.nan) if dtype is float else np.full(n, None, dtype=object)


def prepare(data: Mapping[str, np.ndarray], now: float) -> dict[str, np.ndarray]:
    """Columns ready for the statistics core (see the module docstring)."""
    ts = np.asarray(data.get("ts", np.zeros(0)), dtype=float)
    n = ts.size
    role = _col(data, "role", n, object)
    keep = (ts <= now) & ((role == "baseline") | (role == "canary"))
    out: dict[str, np.ndarray] = {}
    for k, v in data.items():
        arr = np.asarray(v)
        if arr.shape[:1] == (n,):
            out[k] = arr[keep]
    m = int(keep.sum())
    out["is_canary"] = (_col(out, "role", m, object) == "canary")
    status = _col(out, "status_code", m).astype(float)
    timeout = _col(out, "timeout", m).astype(float)
    err = np.where(np.isnan(status), np.nan, (status >= 500).astype(float))
    err = np.where(np.nan_to_num(timeout) > 0, 1.0, err)
    out["error"] = err
    label_ts = _col(out, "label_arrival_ts", m).astype(float)
    true = _col(out, "true_class", m, object)
    pred = _col(out, "predicted_class", m, object)
    usable = np.array([t is not None for t in true], dtype=bool) & (label_ts <= now)
    out["correct"] = np.where(usable, (pred == true).astype(float), np.nan)
    for col, ts_col in LABEL_TS.items():
        if col in out:
            vals = np.asarray(out[col], dtype=float)
            arrived = _col(out, ts_col, m).astype(float) <= now
            out[col] = np.where(arrived, vals, np.nan)
    users = _col(out, "user_key", m, object)
    rids = _col(out, "request_id", m, object)
    # Integer user codes: the statistics core groups by cluster many times, and sorting integers is
    # ~20x faster than sorting strings (1M rows: 0.1 s instead of 2 s per grouping).
    codes: dict = {}
    out["cluster"] = np.fromiter((codes.setdefault(u if u else (r or ("row", i)), len(codes))
                                  for i, (u, r) in enumerate(zip(users, rids))), dtype=np.int64, count=m)
    out["share"] = np.nan_to_num(_col(out, "weight", m).astype(float))
    return out


def merge_evaluations(data: Mapping[str, np.ndarray], ev: Mapping[str, np.ndarray], baseline: str,
                      canary: str) -> dict[str, np.ndarray]:
    """Append replay evaluations (see :mod:`lockgate.controller.evaluation`) as extra rows.

    Each evaluation row carries only ``evaluator_score`` (arrived at its evaluation time) and
    ``similarity`` (canary rows: similarity of the canary's answer to the baseline's on the same
    prompt; baseline rows: 1.0, the baseline compared with itself); every other metric is NaN, so
    these rows count for those two metrics only. Their share is 0.5 (replays go to both versions).
    """
    ev_ts = np.asarray(ev.get("ts", np.zeros(0)), dtype=float)
    versions = np.asarray(ev.get("version", np.zeros(0, dtype=object)), dtype=object)
    errors = np.asarray(ev.get("error", np.full(ev_ts.size, None)), dtype=object)
    keep = ((versions == baseline) | (versions == canary)) & np.array([not e for e in errors], dtype=bool)
    k = int(keep.sum())
    n = int(np.asarray(data.get("ts", np.zeros(0))).size)
    if k == 0:
        return dict(data)
    role = np.where(versions[keep] == canary, "canary", "baseline").astype(object)
    rid = np.asarray(ev["request_id"], dtype=object)[keep]
    extra: dict[str, np.ndarray] = {
        "ts": ev_ts[keep], "role": role, "version": versions[keep],
        "request_id": np.array([f"eval:{r}:{v}" for r, v in zip(rid, role)], dtype=object),
        "user_key": np.array([f"eval:{r}:{v}" for r, v in zip(rid, role)], dtype=object),
        "weight": np.full(k, 0.5),
        "evaluator_score": np.asarray(ev["score"], dtype=float)[keep],
        "evaluator_score_arrival_ts": ev_ts[keep],
        "similarity": np.where(role == "canary", np.asarray(ev["similarity"], dtype=float)[keep], 1.0),
    }
    out: dict[str, np.ndarray] = {}
    for name in set(data) | set(extra):
        base = np.asarray(data[name]) if name in data else None
        add = extra.get(name)
        if base is None:
            base = np.full(n, np.nan) if add is not None and add.dtype.kind == "f" else np.full(n, None, dtype=object)
        if add is None:
            add = np.full(k, np.nan) if base.dtype.kind == "f" else (
                np.zeros(k, dtype=bool) if base.dtype.kind == "b" else np.full(k, None, dtype=object))
        out[name] = np.concatenate([base, add.astype(base.dtype) if base.dtype.kind in "fb" else add])
    order = np.argsort(out["ts"], kind="stable")
    return {name: col[order] for name, col in out.items()}


def resolve_auto(spec: RolloutSpec, history: Mapping[str, np.ndarray], now: float) -> dict[str, Any]:
    """Derive every ``allowed: auto`` from the *baseline's* stored history (before the rollout).

    Returns key → AutoAllowed (value + derivation text). Raises ValueError naming the metric when
    the history is too short (the operator must then set the allowed change explicitly).
    """
    out: dict[str, Any] = {}
    autos = [m for m in spec.metrics if m.allowed_mode == "auto"]
    if not autos:
        return out
    prepared = prepare(history, now)
    base = ~prepared["is_canary"]
    for m in autos:
        statistic, q = m.auto_statistic
        out[m.key] = auto_allowed(np.asarray(prepared[m.column], dtype=float)[base], prepared["ts"][base],
                                  statistic=statistic, quantile=q, name=m.key, unit=m.unit)
    return out


def stats_specs(spec: RolloutSpec, auto: Mapping[str, Any]) -> list[MetricSpec]:
    return spec.to_stats_specs(auto)


def evaluate_at(spec: RolloutSpec, data: Mapping[str, np.ndarray], now: float,
                auto: Mapping[str, Any] | None = None) -> Judgement:
    """The statistics core's judgement of all metrics on the observations up to ``now``."""
    prepared = prepare(data, now)
    return evaluate_all(stats_specs(spec, auto or {}), prepared, spec.alpha, now=now)


@dataclass(frozen=True)
class MetricPlan:
    metric: str
    n_needed: int | None          #: canary observations needed for a decision (None: cannot tell / never)
    n_canary: int
    hours: float | None           #: expected hours until then at the observed rate and current share

    def text(self, stage_label: str, rate_per_h: float) -> str:
        if self.n_needed is None:
            return f"{self.metric}: cannot estimate yet"
        if self.hours is None:
            return f"{self.metric}: needs ~{self.n_needed:,} canary requests"
        if self.hours <= 0:
            return f"{self.metric}: enough samples ({self.n_canary:,} ≥ {self.n_needed:,})"
        return (f"{self.metric}: {stage_label}: ~{_fmt_hours(self.hours)} at {rate_per_h:,.0f} req/h "
                f"({self.n_canary:,} of ~{self.n_needed:,} canary requests)")


def _fmt_hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    return f"{h:.1f} h"


def plan(judgement: Judgement, requests_per_hour: float, share: float) -> list[MetricPlan]:
    """Per gating metric: canary samples needed for a decision and the expected time at this rate."""
    out = []
    for v in judgement.verdicts:
        if not v.gating:
            continue
        n_needed = getattr(v, "n_needed", None)
        n_canary = int(getattr(v, "n_canary", 0) or 0)
        hours = None
        if n_needed is not None and requests_per_hour > 0 and share > 0:
            hours = hours_needed(n_needed, n_canary, requests_per_hour, share)
        out.append(MetricPlan(v.metric, n_needed, n_canary, hours))
    return out


def request_rate_per_hour(ts: np.ndarray, now: float, window_s: float = 600.0) -> float:
    """Observed model request rate (both arms) over the last ``window_s`` seconds."""
    ts = np.asarray(ts, dtype=float)
    if ts.size == 0:
        return 0.0
    start = max(float(ts.min()), now - window_s)
    span = max(now - start, 1.0)
    return float(np.count_nonzero(ts >= start)) * 3600.0 / span


def criterion_by_key(spec: RolloutSpec) -> dict[str, MetricCriterion]:
    return {m.key: m for m in spec.metrics}


def finite_or_none(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
