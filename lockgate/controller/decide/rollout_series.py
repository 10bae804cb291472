"""Rollout state as Prometheus series on the controller's ``/metrics``: what a team alerts on and graphs.

The promotion loop (:class:`~.promoter.Promoter`) tells :class:`RolloutSeries` about every look
(:meth:`RolloutSeries.looked`: the rollout, its spec, the stage decision and the per-metric verdicts)
and every outcome it emits (:meth:`RolloutSeries.outcome`: advanced, promoted, rolled_back, aborted,
inconclusive); the series are a snapshot of the latest of those, exported at scrape time under a
lock (the loop writes on its event loop, ``/metrics`` reads on an HTTP worker thread). Labels are
the model, and for gates the metric name from the rollout spec and the arm: never a user, request or
rollout id (the rollout id is the value of one label of the info series, one per model).

Series (``model`` on every one; a model's gate series are replaced when its next rollout starts):

* ``lockgate_rollout_info{model, rollout, canary, baseline}`` 1 — the model's latest rollout;
* ``lockgate_rollout_status{model, status}`` 1 for the current status, 0 for every other one of
  :data:`STATUSES` (``rolling_back``: a rollback decided, not yet ACKed everywhere);
* ``lockgate_rollout_stage_index{model}`` — the 0-based stage (``lockgate_rollout_stages`` after
  promotion), ``lockgate_rollout_stages{model}`` — the number of stages in the spec;
* ``lockgate_rollout_canary_weight_ratio{model}`` — the canary's share of the model's traffic (0..1) as
  the rollout decided it (Envoy's ACKed weights: ``lockgate weights``);
* ``lockgate_rollout_last_evaluation_timestamp_seconds{model}`` — when the controller last judged it
  (stale while running: the controller is not driving it);
* ``lockgate_rollout_awaiting_approval_since_timestamp_seconds{model}`` — since when the current stage
  waits for a person's approval (``steps[].approval``; ``lockgate rollout approve``); absent otherwise;
* ``lockgate_gate_verdict{model, metric, gating}`` — :data:`VERDICT_CODES`: 1 pass (shown within its
  allowance), 0 not yet shown either way, -1 fail (shown worse beyond its allowance);
* ``lockgate_gate_value{model, metric, arm}`` — the metric's estimate per arm (``baseline``, ``canary``)
  in the metric's own units, ``lockgate_gate_samples{model, metric, arm}`` — observations behind it;
* ``lockgate_gate_difference{model, metric}`` — canary − baseline as the test estimates it,
  ``lockgate_gate_allowed{model, metric}`` — the allowed change in the harmful direction (same units);
* ``lockgate_rollbacks_total{model, reason}`` — reverts completed (every Envoy ACKed weight 0):
  ``reason`` ``harm`` (a gating metric shown worse beyond its allowance) or ``abort`` (by a person);
* ``lockgate_promotions_total{model, by}`` — ``by`` ``evidence`` (every gating metric shown within its
  allowance) or ``manual`` (``lockgate rollout promote``).

The counters start at 0 for every configured model (so ``increase()`` sees the first one) and count
what this controller process did; after a restart or a failover to another controller they start
again (Prometheus' ``increase``/``rate`` handle resets; sum over the controllers). The gauges show
what this process last saw: a standby controller exports none until it drives the model.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lockgate.routing import TOTAL_WEIGHT_BP

log = logging.getLogger("lockgate.controller.decide.rollout_series")

#: every value of the ``status`` label of ``lockgate_rollout_status`` (the rollout statuses)
STATUSES = ("pending", "running", "paused", "rolling_back", "promoted", "rolled_back", "aborted", "inconclusive")
#: the value of ``lockgate_gate_verdict`` per verdict (a verdict not listed here: 0)
VERDICT_CODES = {"pass": 1, "not-yet": 0, "fail": -1}
#: ``reason`` of ``lockgate_rollbacks_total`` per final status of the revert
ROLLBACK_REASONS = {"rolled_back": "harm", "aborted": "abort"}
#: values of ``by`` of ``lockgate_promotions_total``
PROMOTED_BY = ("evidence", "manual")
#: the canary weight of a rollout in these statuses, whatever its stage
_STATUS_WEIGHT_BP = {"promoted": TOTAL_WEIGHT_BP, "rolled_back": 0, "aborted": 0, "rolling_back": 0, "pending": 0}

#: every series this module exports: name (as exposed; counters with ``_total``) → (type, labels)
SERIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lockgate_rollout_info": ("gauge", ("model", "rollout", "canary", "baseline")),
    "lockgate_rollout_status": ("gauge", ("model", "status")),
    "lockgate_rollout_stage_index": ("gauge", ("model",)),
    "lockgate_rollout_stages": ("gauge", ("model",)),
    "lockgate_rollout_canary_weight_ratio": ("gauge", ("model",)),
    "lockgate_rollout_last_evaluation_timestamp_seconds": ("gauge", ("model",)),
    "lockgate_rollout_awaiting_approval_since_timestamp_seconds": ("gauge", ("model",)),
    "lockgate_gate_verdict": ("gauge", ("model", "metric", "gating")),
    "lockgate_gate_value": ("gauge", ("model", "metric", "arm")),
    "lockgate_gate_samples": ("gauge", ("model", "metric", "arm")),
    "lockgate_gate_difference": ("gauge", ("model", "metric")),
    "lockgate_gate_allowed": ("gauge", ("model", "metric")),
    "lockgate_rollbacks_total": ("counter", ("model", "reason")),
    "lockgate_promotions_total": ("counter", ("model", "by")),
}

_HELP = {
    "lockgate_rollout_info": "The model's latest rollout (value 1): its id, canary and baseline versions",
    "lockgate_rollout_status": "1 for the rollout's current status, 0 for the others",
    "lockgate_rollout_stage_index": "The rollout's stage, 0-based (the number of stages once promoted)",
    "lockgate_rollout_stages": "Stages in the rollout's spec",
    "lockgate_rollout_canary_weight_ratio": "The canary's share of the model's traffic as the rollout decided it (0..1)",
    "lockgate_rollout_last_evaluation_timestamp_seconds": "When the controller last judged the rollout (epoch s)",
    "lockgate_rollout_awaiting_approval_since_timestamp_seconds": "Since when the rollout's stage waits for an "
                                                                  "approval (epoch s; absent when it does not)",
    "lockgate_gate_verdict": "Per metric of the rollout spec: 1 pass (shown within its allowance), 0 not yet, "
                             "-1 fail (shown worse beyond its allowance)",
    "lockgate_gate_value": "The metric's estimate per arm (baseline, canary), in the metric's units",
    "lockgate_gate_samples": "Observations behind the metric's estimate per arm",
    "lockgate_gate_difference": "canary - baseline as the metric's test estimates it, in the metric's units",
    "lockgate_gate_allowed": "The metric's allowed change in the harmful direction, in the metric's units",
    "lockgate_rollbacks": "Reverts completed on every Envoy, by reason (harm: a gating metric shown worse beyond "
                          "its allowance; abort: by a person)",
    "lockgate_promotions": "Rollouts promoted to 100%, by evidence or manually",
}


@dataclass
class _Gate:
    verdict: int
    gating: bool
    baseline: float | None
    canary: float | None
    n_baseline: int
    n_canary: int
    difference: float | None
    allowed: float | None


@dataclass
class _ModelState:
    rollout: int
    canary: str
    baseline: str
    status: str
    stage: int
    stages: int | None
    weight_bp: int | None
    steps_bp: tuple[int, ...] = ()
    evaluated_at: float | None = None
    gates: dict[str, _Gate] = field(default_factory=dict)
    awaiting_since: float | None = None


def _finite(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _gates(verdicts: Iterable[Mapping[str, Any]]) -> dict[str, _Gate]:
    out = {}
    for v in verdicts:
        out[str(v["metric"])] = _Gate(
            verdict=VERDICT_CODES.get(v.get("verdict"), 0), gating=bool(v.get("gating", True)),
            baseline=_finite(v.get("baseline")), canary=_finite(v.get("canary")),
            n_baseline=int(v.get("n_baseline") or 0), n_canary=int(v.get("n_canary") or 0),
            difference=_finite(v.get("difference")), allowed=_finite(v.get("allowed")))
    return out


def _awaiting_since(summary: Mapping[str, Any]) -> float | None:
    """When the look's stage started waiting for an approval not yet given (``summary["gates"]``), else None."""
    approval = (summary.get("gates") or {}).get("approval") or {}
    if not approval.get("required") or approval.get("approved_by") is not None:
        return None
    return _finite(approval.get("waiting_since"))


class RolloutSeries:
    """The rollout series of the models in ``models`` (see the module docstring), registered in ``registry``.

    :meth:`looked` and :meth:`outcome` never raise (a metrics problem never stops a decision)."""

    def __init__(self, registry: CollectorRegistry, models: Sequence[str] = ()):
        self._lock = threading.Lock()
        self._state: dict[str, _ModelState] = {}
        self._rollbacks: dict[tuple[str, str], int] = {(m, r): 0 for m in models
                                                       for r in sorted(set(ROLLBACK_REASONS.values()))}
        self._promotions: dict[tuple[str, str], int] = {(m, b): 0 for m in models for b in PROMOTED_BY}
        registry.register(self)

    # ----------------------------------------------------------------- updates (the promotion loop)
    def looked(self, rollout: Any, spec: Any, decision: Any, summary: Mapping[str, Any], now: float) -> None:
        """One judgement of ``rollout`` (a ``rollouts.Rollout``) under ``spec``: its verdicts, and the stage,
        weight and status the ``decision`` (a ``stages.StageDecision``) leaves it at until the outcome."""
        try:
            steps = tuple(s.weight_bp for s in spec.steps)
            status, stage = rollout.status, rollout.stage
            weight = steps[min(stage, len(steps) - 1)] if steps else None
            if decision.action == "rollback":
                status, weight = "rolling_back", 0
            state = _ModelState(rollout.id, rollout.canary, rollout.baseline, status, stage, len(steps), weight,
                                steps, now, _gates(summary.get("verdicts") or ()), _awaiting_since(summary))
            with self._lock:
                self._state[rollout.model] = state
        except Exception:
            log.exception("rollout series: cannot record the look at rollout #%s", getattr(rollout, "id", "?"))

    def outcome(self, kind: str, rollout: Any, detail: Mapping[str, Any], spec: Any = None) -> None:
        """An outcome the promotion loop emitted (``kind``: started, advanced, promoted, rolled_back, aborted,
        inconclusive, …) for ``rollout`` as now stored; ``detail`` is what its transition recorded; ``spec``
        (else the last look's) gives the stages' weights."""
        if rollout is None:
            return
        try:
            model = rollout.model
            with self._lock:
                old = self._state.get(model)
                same = old is not None and old.rollout == rollout.id
                steps = tuple(s.weight_bp for s in spec.steps) if spec is not None else (old.steps_bp if same else ())
                weight = _STATUS_WEIGHT_BP.get(rollout.status)
                if weight is None and steps:
                    weight = steps[min(rollout.stage, len(steps) - 1)]
                gates = _gates(detail["verdicts"]) if detail.get("verdicts") else (old.gates if same else {})
                awaiting = old.awaiting_since if same and old.stage == rollout.stage else None
                self._state[model] = _ModelState(rollout.id, rollout.canary, rollout.baseline, rollout.status,
                                                 rollout.stage, len(steps) if steps else (old.stages if same else None),
                                                 weight, steps, old.evaluated_at if same else None, gates, awaiting)
                if kind in ROLLBACK_REASONS:
                    key = (model, ROLLBACK_REASONS[kind])
                    self._rollbacks[key] = self._rollbacks.get(key, 0) + 1
                elif kind == "promoted":
                    # a promotion by the loop carries the verdicts that justified it; a manual one does not
                    key = (model, "evidence" if detail.get("verdicts") else "manual")
                    self._promotions[key] = self._promotions.get(key, 0) + 1
        except Exception:
            log.exception("rollout series: cannot record %s of rollout #%s", kind, getattr(rollout, "id", "?"))

    # ----------------------------------------------------------------- export (any thread)
    def collect(self):
        with self._lock:
            state = {m: s for m, s in self._state.items()}
            rollbacks, promotions = dict(self._rollbacks), dict(self._promotions)
        fam = {name: GaugeMetricFamily(name, _HELP[name], labels=labels)
               for name, (kind, labels) in SERIES.items() if kind == "gauge"}
        for model, s in sorted(state.items()):
            fam["lockgate_rollout_info"].add_metric([model, str(s.rollout), s.canary, s.baseline], 1)
            for st in STATUSES:
                fam["lockgate_rollout_status"].add_metric([model, st], 1 if st == s.status else 0)
            fam["lockgate_rollout_stage_index"].add_metric([model], s.stage)
            if s.stages is not None:
                fam["lockgate_rollout_stages"].add_metric([model], s.stages)
            if s.weight_bp is not None:
                fam["lockgate_rollout_canary_weight_ratio"].add_metric([model], s.weight_bp / TOTAL_WEIGHT_BP)
            if s.evaluated_at is not None:
                fam["lockgate_rollout_last_evaluation_timestamp_seconds"].add_metric([model], s.evaluated_at)
            if s.awaiting_since is not None and s.status in ("running", "paused"):
                fam["lockgate_rollout_awaiting_approval_since_timestamp_seconds"].add_metric([model], s.awaiting_since)
            for metric, g in sorted(s.gates.items()):
                fam["lockgate_gate_verdict"].add_metric([model, metric, "true" if g.gating else "false"], g.verdict)
                for arm, value, n in (("baseline", g.baseline, g.n_baseline), ("canary", g.canary, g.n_canary)):
                    if value is not None:
                        fam["lockgate_gate_value"].add_metric([model, metric, arm], value)
                    fam["lockgate_gate_samples"].add_metric([model, metric, arm], n)
                if g.difference is not None:
                    fam["lockgate_gate_difference"].add_metric([model, metric], g.difference)
                if g.allowed is not None:
                    fam["lockgate_gate_allowed"].add_metric([model, metric], g.allowed)
        yield from fam.values()
        rb = CounterMetricFamily("lockgate_rollbacks", _HELP["lockgate_rollbacks"], labels=["model", "reason"])
        for (model, reason), n in sorted(rollbacks.items()):
            rb.add_metric([model, reason], n)
        yield rb
        pr = CounterMetricFamily("lockgate_promotions", _HELP["lockgate_promotions"], labels=["model", "by"])
        for (model, by), n in sorted(promotions.items()):
            pr.add_metric([model, by], n)
        yield pr

    def describe(self):
        return []


__all__ = ["PROMOTED_BY", "ROLLBACK_REASONS", "RolloutSeries", "SERIES", "STATUSES", "VERDICT_CODES"]
