"""``lockgate analyze``: replay the controller's decisions on recorded observations, offline.

The replay *is* the live controller, run on a recording. Observations (``lockgate observations export``,
JSON Lines or ``--format npz`` columns, see docs/observations.md) are evaluated at every look the live controller
makes — look ``k`` at ``start + k * analysis_interval_s`` for ``k = 1 … K``, ``start`` being the
rollout start (``--start``) or else the first observation, and look ``K`` the first at or after the
horizon (``--until``, or else the last observation) — in order, each with the same pure functions the
controller calls (:func:`analysis.prepare_dataset`/:func:`analysis.prepare_at`, i.e.
:func:`analysis.evaluate_at`, and :func:`stages.decide`). A look at ``t`` sees what the controller saw
at ``t``: observations with ``ts <= t`` and labels that had arrived by ``t`` (:func:`cut_stream` builds
exactly that stream). The stage in force at a look is the one whose weight the recorded requests were
routed with. The first look that rolls back, promotes or ends the rollout as inconclusive is the
answer; otherwise the result is ``continue`` at the last look. No look is skipped: a bound can be
crossed at one look and left again at the next, so nothing can be inferred about a look without
evaluating it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lockgate.controller.decide import accumulator, analysis, prometheus_evidence
from lockgate.controller.ingest.export_npz import read_observations
from lockgate.controller.ingest.schema import ARRIVAL_COLUMNS, DECISION_COLUMNS
from lockgate.controller.decide.spec import RolloutSpec, load_spec
from lockgate.controller.decide.stages import StageState, decide, stage_label
from lockgate.routing import TOTAL_WEIGHT_BP

#: slack for float error when counting looks up to the horizon
LOOK_EPS = 1e-9
#: decisions that end the rollout (the controller stops evaluating it)
FINAL_ACTIONS = {"rollback": "rollback", "promote": "promote", "inconclusive": "inconclusive"}


def look_time(start: float, interval_s: float, k: int) -> float:
    """Time of look ``k`` (1-based). Always computed this way, so equal looks compare equal."""
    return float(start + interval_s * k)


def look_count(start: float, horizon: float, interval_s: float) -> int:
    """K: looks up to the first one at or after ``horizon`` (at least one)."""
    return max(1, int(math.ceil((horizon - start) / interval_s - LOOK_EPS)))


def cut_stream(data: Mapping[str, Any], t: float) -> dict[str, np.ndarray]:
    """The stream as the controller saw it at ``t``: rows with ``ts <= t`` (in their order), and each
    label that arrived after ``t`` removed (its arrival time and its value set to NaN / None)."""
    ts = np.asarray(data.get("ts", np.zeros(0)), dtype=float)
    n = ts.size
    keep = ts <= t
    out: dict[str, np.ndarray] = {}
    for k, v in data.items():
        arr = np.asarray(v)
        out[k] = arr[keep] if arr.shape[:1] == (n,) else v
    for col, ts_col in ARRIVAL_COLUMNS.items():
        if ts_col not in out or np.asarray(out[ts_col]).shape[:1] != (int(keep.sum()),):
            continue
        arrival = np.asarray(out[ts_col], dtype=float)
        late = arrival > t
        if not late.any():
            continue
        out[ts_col] = np.where(late, np.nan, arrival)
        if col in out:
            vals = np.asarray(out[col])
            if vals.dtype.kind in "fc":
                out[col] = np.where(late, np.nan, vals)
            else:
                vals = vals.astype(object, copy=True)
                vals[late] = None
                out[col] = vals
    return out


def _stage_of(spec: RolloutSpec, weight_bp: float) -> int:
    """Index of the step whose weight is closest to ``weight_bp`` from below (0 if below the first)."""
    idx = 0
    for i, step in enumerate(spec.steps):
        if weight_bp + 0.5 >= step.weight_bp:
            idx = i
    return idx


class _Stages:
    """The stage in force at ``now``, derived from the recorded weights, as the rollout record holds it.

    The stage is the step of the weight the last request up to ``now`` was routed with; it started
    when the first request was routed with that step's weight (stage 1: at the rollout start).
    """

    def __init__(self, spec: RolloutSpec, ts: np.ndarray, weight: np.ndarray, start: float):
        self.spec, self.ts, self.start = spec, ts, start
        self.weight_bp = np.nan_to_num(np.asarray(weight, dtype=float)) * TOTAL_WEIGHT_BP
        self.first_ts: list[float] = []
        for step in spec.steps:
            hit = np.flatnonzero(np.abs(self.weight_bp - step.weight_bp) < 0.5)
            self.first_ts.append(float(ts[hit[0]]) if hit.size else math.inf)

    def at(self, now: float) -> tuple[int, float]:
        upto = int(np.searchsorted(self.ts, now, side="right"))
        stage = _stage_of(self.spec, float(self.weight_bp[upto - 1]) if upto else 0.0)
        if stage == 0:
            return 0, self.start
        first = self.first_ts[stage]
        return stage, first if first <= now else float(now)


def replay(spec: RolloutSpec, data: Mapping[str, Any], auto: Mapping[str, Any] | None = None, *,
           until: float | None = None, start: float | None = None, incremental: bool | None = None) -> dict:
    """Evaluate every look in order; the first deciding one (or the last look) is the result.

    ``start``: the rollout start (looks are anchored there; earlier observations are not part of the
    rollout and are left out); default: the first observation. ``until``: the horizon (the last look
    is the first at or after it); default: the last observation. ``incremental``: judge each look from
    :class:`.accumulator.RolloutEvidence` (the rows and labels new since the previous look folded in, as
    the live controller does) or, False, re-evaluate every row at every look (:func:`analysis.evaluate_dataset`);
    default: incremental when the accumulator supports the spec and request ids are unique.
    """
    ts = np.asarray(data.get("ts", np.zeros(0)), dtype=float)
    n = ts.size
    keep = np.isfinite(ts) if start is None else ts >= float(start)
    if keep.all() and (n < 2 or not (ts[1:] < ts[:-1]).any()):  # already in order (exports are): no copy
        data = {k: np.asarray(v) if np.asarray(v).shape[:1] == (n,) else v for k, v in data.items()}
    else:
        order = np.flatnonzero(keep)
        order = order[np.argsort(ts[order], kind="stable")]
        data = {k: (np.asarray(v)[order] if np.asarray(v).shape[:1] == (n,) else v) for k, v in data.items()}
        ts = ts[order]
    if ts.size == 0:
        raise ValueError("no observations of this model in the file" + ("" if start is None else
                                                                       f" at or after --start {start:g}"))
    start_ts = float(ts[0]) if start is None else float(start)
    horizon = float(ts[-1]) if until is None else float(until)
    if horizon < start_ts:
        raise ValueError(f"--until {horizon:g} is before the rollout start {start_ts:g}")
    interval = float(spec.analysis_interval_s)
    n_looks = look_count(start_ts, horizon, interval)

    stages = _Stages(spec, ts, data.get("weight", np.zeros(ts.size)), start_ts)
    is_canary = np.asarray(data.get("role", np.full(ts.size, None)), dtype=object) == "canary"
    judge_at = _Incremental(spec, data, auto) if _incremental(spec, data, auto, incremental) else \
        _Full(spec, data, auto)

    def at(now: float, intervals: bool):
        stage, stage_start = stages.at(now)
        judgement = prometheus_evidence.offline(judge_at(now, intervals), spec)  # its gates: not-yet
        lo, hi = int(np.searchsorted(ts, stage_start, side="left")), int(np.searchsorted(ts, now, side="right"))
        in_stage = analysis.canary_samples_in_stage(ts[lo:hi], is_canary[lo:hi], stage_start, now)
        decision = decide(spec, StageState("running", stage, start_ts, stage_start), judgement, now, in_stage)
        return stage, judgement, decision

    k, action = 0, "hold"
    for k in range(1, n_looks + 1):
        action = at(look_time(start_ts, interval, k), False)[2].action
        if action in FINAL_ACTIONS:
            break
    now = look_time(start_ts, interval, k)
    stage, judgement, decision = at(now, True)  # the same look again, with quantile intervals for the report
    if decision.action != action:  # cannot happen: the intervals are reported, never used for a verdict
        raise RuntimeError(f"look {k}: {action} without quantile intervals, {decision.action} with them")
    verdict = FINAL_ACTIONS.get(decision.action, "continue")
    return {
        "decision": verdict, "at_ts": now, "stage": stage_label(spec, stage),
        "reasons": [_reason(v) for v in judgement.verdicts],
        "stage_reasons": list(decision.reasons), "alpha_statement": judgement.alpha_statement,
        "looks": n_looks, "looks_evaluated": k, "looks_thinned": False,
    }


def _incremental(spec: RolloutSpec, data: Mapping[str, Any], auto: Mapping[str, Any] | None,
                 wanted: bool | None) -> bool:
    """Whether the looks can be judged incrementally: the accumulator supports every metric of the spec,
    and request ids are unique (the accumulator keeps the first row of a request id, as the store does;
    the full path counts every row, as :func:`analysis.evaluate_at` does)."""
    if wanted is False:
        return False
    ok = accumulator.supported(spec, analysis.stats_specs(spec, auto or {}), False)
    if ok and "request_id" in data:
        rids = np.asarray(data["request_id"], dtype=object)
        distinct = set(rids.tolist())
        ok = len(distinct) - (None in distinct) == rids.size - int(np.count_nonzero(rids == None))  # noqa: E711
    if wanted and not ok:
        raise ValueError("this spec or recording cannot be replayed incrementally")
    return ok


class _Full:
    """A look's judgement from every row up to it (:func:`analysis.evaluate_dataset`)."""

    def __init__(self, spec: RolloutSpec, data: Mapping[str, Any], auto: Mapping[str, Any] | None):
        self.spec, self.auto, self.ds = spec, auto, analysis.prepare_dataset(data)

    def __call__(self, now: float, intervals: bool):
        return analysis.evaluate_dataset(self.spec, self.ds, now, self.auto, quantile_intervals=intervals)


class _Incremental:
    """A look's judgement from :class:`.accumulator.RolloutEvidence`: the rows with ``ts`` up to the look
    that it has not seen yet are added (a contiguous slice: the rows are in ``ts`` order), then it
    folds them and the labels that arrived by then, and judges."""

    def __init__(self, spec: RolloutSpec, data: Mapping[str, Any], auto: Mapping[str, Any] | None):
        self.alpha = spec.alpha
        self.ev = accumulator.RolloutEvidence(analysis.stats_specs(spec, auto or {}))
        self.ts = np.asarray(data["ts"], dtype=float)
        self.columns = {c: np.asarray(data[c]) for c in DECISION_COLUMNS if c in data}
        self.added = 0

    def __call__(self, now: float, intervals: bool):
        upto = int(np.searchsorted(self.ts, now, side="right"))
        if upto > self.added:
            self.ev.add_rows({c: v[self.added:upto] for c, v in self.columns.items()})
            self.added = upto
        return self.ev.evaluate(now, self.alpha, quantile_intervals=intervals)


def _reason(v) -> dict:
    d = v.to_dict()
    return {"metric": d["metric"], "baseline": d["baseline"], "canary": d["canary"], "interval": d["interval"],
            "allowed": d["allowed"], "verdict": d["verdict"], "gating": d["gating"], "n_baseline": d["n_baseline"],
            "n_canary": d["n_canary"], "reason": d["reason"]}


def analyze_file(spec_path: str, observations_path: str, config_path: str | None = None, *,
                 until: float | None = None, start: float | None = None) -> dict:
    config = None
    if config_path:
        from lockgate.config import load_config

        config = load_config(config_path)
    spec = load_spec(spec_path, config)
    if any(m.allowed_mode == "auto" for m in spec.metrics):
        raise ValueError("the spec uses allowed: auto; offline analysis needs explicit allowed changes "
                         "(auto is derived from the live baseline history at rollout start)")
    data = read_observations(Path(observations_path), spec.model, since_ts=start)
    return replay(spec, data, until=until, start=start)
