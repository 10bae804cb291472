"""Pure evaluation of a rollout at one moment: observation columns + spec → Judgement + plan.

The live controller and ``lockgate analyze`` (offline replay of recorded observations) both call
:func:`evaluate_at`, so an offline replay decides exactly as the controller would have.

Columns are those of :meth:`ObservationStore.fetch` (or :func:`export.read_jsonl`). Derived here:

* ``error`` = :func:`~lockgate.controller.ingest.schema.error_column`: 1 if ``status_code >= 500`` or
  ``timeout`` or the model cut the stream (``error_kind`` ``upstream_reset``/``upstream_timeout``), else 0
  (NaN if the status is unknown);
* ``correct`` = ``predicted_class == true_class`` over requests whose label had arrived by ``now``;
* label-fed columns (``thumbs``, ``task_success``, ``evaluator_score``: ``schema.FEEDBACK_ARRIVAL_COLUMNS``)
  are NaN where the label arrived after ``now`` — a label is used only from its arrival time;
* ``cluster`` = the hashed sticky-user key (falls back to the request id: then requests count as
  independent users); ``share`` = the canary weight in force when the request was routed.
Rows of neither arm (``role`` other than baseline/canary) and rows after ``now`` are dropped.

:func:`prepare` is two parts: :func:`prepare_dataset` (once per dataset: sort by ``ts``, the arm
filter and everything that does not depend on ``now``) and :func:`prepare_at` (per ``now``: the
prefix of rows with ``ts <= now`` and the labels arrived by then). :func:`evaluate_at` is built from
them, and ``lockgate analyze`` calls the same two parts at every look (:mod:`.replay`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from lockgate.controller.ingest.schema import FEEDBACK_ARRIVAL_COLUMNS, LABEL_ARRIVAL_COLUMN, error_column
from lockgate.controller.decide.spec import MetricCriterion, RolloutSpec
from lockgate.controller.stats import Judgement, MetricSpec, auto_allowed, evaluate_all, hours_needed



def _col(data: Mapping[str, np.ndarray], name: str, n: int, dtype=float) -> np.ndarray:
    if name in data:
        return np.asarray(data[name])
    return np.full(n, np.nan) if dtype is float else np.full(n, None, dtype=object)


@dataclass(frozen=True)
class Dataset:
    """The once-per-dataset part of :func:`prepare` (see :func:`prepare_dataset`)."""

    ts: np.ndarray                        #: sorted observation times of the rows of both arms
    columns: dict[str, np.ndarray]        #: per-row columns, in ``ts`` order; nothing here depends on ``now``
    label_known: np.ndarray               #: a ``true_class`` label exists (it may not have arrived yet)
    label_match: np.ndarray               #: 1.0 where ``predicted_class == true_class``
    label_ts: np.ndarray                  #: ``label_arrival_ts``
    feedback_ts: dict[str, np.ndarray]    #: label-fed column → its arrival times


def prepare_dataset(data: Mapping[str, np.ndarray]) -> Dataset:
    """What :func:`prepare` derives without knowing ``now``: done once per dataset.

    Rows of neither arm are dropped and the rest sorted by ``ts`` (stable: the input order among equal
    timestamps), so the rows up to any ``now`` are a prefix. ``error``, ``is_canary``, ``share`` and the
    integer ``cluster`` codes are derived here. Cluster codes are numbered in order of first appearance
    in that order, so the codes of any prefix are exactly the codes :func:`prepare` would give the prefix
    alone (the same grouping, even the same numbers).
    """
    ts_all = np.asarray(data.get("ts", np.zeros(0)), dtype=float)
    n = ts_all.size
    role_all = _col(data, "role", n, object)
    rows = np.flatnonzero((role_all == "baseline") | (role_all == "canary"))
    rows = rows[np.argsort(ts_all[rows], kind="stable")]
    out: dict[str, np.ndarray] = {}
    for k, v in data.items():
        arr = np.asarray(v)
        if arr.shape[:1] == (n,):
            out[k] = arr[rows]
    m = int(rows.size)
    out["is_canary"] = (_col(out, "role", m, object) == "canary")
    out["error"] = error_column(_col(out, "status_code", m).astype(float), _col(out, "timeout", m).astype(float),
                                _col(out, "error_kind", m, object))
    true = _col(out, "true_class", m, object)
    pred = _col(out, "predicted_class", m, object)
    label_known = np.array([t is not None for t in true], dtype=bool)
    label_match = (pred == true).astype(float)
    label_ts = _col(out, LABEL_ARRIVAL_COLUMN["true_class"], m).astype(float)
    feedback_ts = {col: _col(out, ts_col, m).astype(float) for col, ts_col in FEEDBACK_ARRIVAL_COLUMNS.items()
                   if col in out}
    for col in feedback_ts:
        out[col] = np.asarray(out[col], dtype=float)
    users = _col(out, "user_key", m, object)
    rids = _col(out, "request_id", m, object)
    # Integer user codes: the statistics core groups by cluster many times, and sorting integers is
    # ~20x faster than sorting strings (1M rows: 0.1 s instead of 2 s per grouping).
    codes: dict = {}
    out["cluster"] = np.fromiter((codes.setdefault(u if u else (r or ("row", i)), len(codes))
                                  for i, (u, r) in enumerate(zip(users, rids))), dtype=np.int64, count=m)
    out["share"] = np.nan_to_num(_col(out, "weight", m).astype(float))
    return Dataset(ts=_col(out, "ts", m).astype(float), columns=out, label_known=label_known,
                   label_match=label_match, label_ts=label_ts, feedback_ts=feedback_ts)


def prepare_at(ds: Dataset, now: float) -> dict[str, np.ndarray]:
    """The per-``now`` part of :func:`prepare`: the rows with ``ts <= now``; ``correct`` and the
    label-fed columns only where their label had arrived by ``now``."""
    k = int(np.searchsorted(ds.ts, now, side="right"))
    out = {name: col[:k] for name, col in ds.columns.items()}
    usable = ds.label_known[:k] & (ds.label_ts[:k] <= now)
    out["correct"] = np.where(usable, ds.label_match[:k], np.nan)
    for col, arrival in ds.feedback_ts.items():
        out[col] = np.where(arrival[:k] <= now, out[col], np.nan)
    return out


def prepare(data: Mapping[str, np.ndarray], now: float) -> dict[str, np.ndarray]:
    """Columns ready for the statistics core (see the module docstring); rows in ``ts`` order."""
    return prepare_at(prepare_dataset(data), now)


def merge_evaluations(data: Mapping[str, np.ndarray], ev: Mapping[str, np.ndarray], baseline: str,
                      canary: str) -> dict[str, np.ndarray]:
    """Append replay evaluations (see :mod:`lockgate.controller.evaluate.evaluation`) as extra rows.

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
        LABEL_ARRIVAL_COLUMN["evaluator_score"]: ev_ts[keep],
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
    return evaluate_dataset(spec, prepare_dataset(data), now, auto)


def evaluate_dataset(spec: RolloutSpec, ds: Dataset, now: float, auto: Mapping[str, Any] | None = None, *,
                     quantile_intervals: bool = True) -> Judgement:
    """:func:`evaluate_at` on a :func:`prepare_dataset` result (prepared once, evaluated at many ``now``).

    ``quantile_intervals=False`` only leaves the quantile metrics' reported intervals out (cheaper);
    every verdict is the same.
    """
    return evaluate_all(stats_specs(spec, auto or {}), prepare_at(ds, now), spec.alpha, now=now,
                        quantile_intervals=quantile_intervals)


def canary_samples_in_stage(ts: np.ndarray, is_canary: np.ndarray, stage_started_at: float, now: float) -> int:
    """Canary observations of the current stage as :func:`stages.decide` counts them:
    ``stage_started_at <= ts <= now``."""
    ts = np.asarray(ts, dtype=float)
    return int(np.count_nonzero((ts >= stage_started_at) & (ts <= now) & np.asarray(is_canary, dtype=bool)))


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
