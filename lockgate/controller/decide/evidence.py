"""The evidence of a rollout and what it plans: the glue between the observation store and the pure
decision code (:mod:`.analysis`, :mod:`.ramp_plan`).

* :func:`rollout_columns` / :func:`judge` — the columns the promotion loop reads for a rollout (its
  baseline and canary since it started, with response evaluations joined when the model has an
  ``evaluation`` section) and the judgement summary recorded with every evaluation.
* :func:`stable_history` / :func:`start_plan` — at ``rollout start``: the stable version's recent
  traffic (``allowed: auto`` is derived from it) and the promotion plan walked through the ramp.
* :func:`status_plan` — the plan shown by ``rollout status``, from the last evaluation.
* :data:`PROMETHEUS` — the Prometheus-sourced metrics' reader (:mod:`.prometheus_evidence`): both the full
  path here and the incremental one (:class:`.live_evidence.LiveEvidence`) merge its verdicts into the
  judgement with :func:`with_prometheus`.

Every function here is synchronous and may run on a worker thread (``fetch`` is thread-safe); times
are epoch seconds.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lockgate.config import LockgateConfig
from lockgate.controller.decide import analysis, ramp_plan
from lockgate.controller.decide.prometheus_evidence import PrometheusEvidence
from lockgate.controller.decide.rollouts import Rollout
from lockgate.controller.ingest.schema import DECISION_COLUMNS, ERROR_COLUMNS, error_column
from lockgate.controller.decide.spec import RolloutSpec
from lockgate.controller.decide.stages import stage_label
from lockgate.controller.ports import ObservationSource
from lockgate.routing import TOTAL_WEIGHT_BP

log = logging.getLogger("lockgate.controller.decide.evidence")

AUTO_HISTORY_S = 14 * 86400.0  #: baseline history used to derive ``allowed: auto``
EVAL_COLUMNS = DECISION_COLUMNS  #: the columns a decision reads (one home: ingest/schema.py)
#: the controller's one reader of Prometheus-sourced metrics (its caches are per process)
PROMETHEUS = PrometheusEvidence()


def with_prometheus(judgement: Any, rollout: Rollout, spec: RolloutSpec, now: float,
                    observations: ObservationSource | None = None) -> Any:
    """``judgement`` with the verdicts of ``spec``'s Prometheus-sourced metrics merged in (itself when none);
    ``observations``: where a controller that starts mid-rollout finds the earlier stages' starts."""
    return PROMETHEUS.with_prometheus(judgement, rollout, spec, now, observations)


def rollout_columns(observations: ObservationSource, config: LockgateConfig, rollout: Rollout,
                    since: float | None = None) -> dict[str, np.ndarray]:
    """Baseline and canary observations of ``rollout`` since ``since`` (default: its start), columnar."""
    since = rollout.started_at if since is None else since
    data = observations.fetch(rollout.model, since_ts=since, versions=[rollout.baseline, rollout.canary],
                              columns=list(EVAL_COLUMNS))
    if config.model(rollout.model).evaluation is not None:
        from lockgate.controller.evaluate.evaluation import fetch_evaluations

        ev = fetch_evaluations(config, rollout.model, since_ts=since)
        data = analysis.merge_evaluations(data, ev, rollout.baseline, rollout.canary)
    return data


def judge(observations: ObservationSource, config: LockgateConfig, rollout: Rollout, spec: RolloutSpec,
          now: float) -> tuple[Any, dict, int]:
    """The judgement of ``rollout`` at ``now``, its JSON summary (verdicts, plan text, traffic, sample
    counts) and the canary samples seen in the current stage: the full path (every stored row re-read;
    :class:`.accumulator.LiveEvidence` gives the same incrementally)."""
    data = rollout_columns(observations, config, rollout)
    judgement = with_prometheus(analysis.evaluate_at(spec, data, now, rollout.auto_values()), rollout, spec, now,
                                observations)
    ts = np.asarray(data.get("ts", []), dtype=float)
    role = np.asarray(data.get("role", []), dtype=object)
    traffic = {"in_stage": analysis.canary_samples_in_stage(ts, role == "canary", rollout.stage_started_at, now),
               "requests_per_hour": analysis.request_rate_per_hour(ts, now),
               "n_baseline": int(np.count_nonzero(role == "baseline")),
               "n_canary": int(np.count_nonzero(role == "canary"))}
    return judgement, with_cohorts(summarize(judgement, spec, rollout, traffic), observations, rollout, spec), \
        traffic["in_stage"]


#: what :func:`cohort_stats` reads of a cohort's rows
COHORT_COLUMNS = ("ts", "version", *ERROR_COLUMNS, "latency_ms")


def cohort_stats(observations: ObservationSource, rollout: Rollout, spec: RolloutSpec) -> list[dict]:
    """Per cohort of ``spec`` (``rollout.cohorts``), what its requests looked like since the rollout
    started: ``requests``, ``canary`` (of those, served by the canary), ``errors`` / ``error_rate`` and
    ``p95_ms`` (latency; None when unmeasured). Shown apart in status, the log and the report: a cohort is
    chosen, not a random sample, so these rows are never part of the gates' comparison (role ``other``).
    One indexed read per cohort (its rows only, whatever the model's traffic); [] without cohorts."""
    out = []
    for rule in spec.cohorts:
        c = rule.cohort
        data = observations.fetch(rollout.model, since_ts=rollout.started_at, cohort=c.name,  # type: ignore[call-arg]
                                  columns=list(COHORT_COLUMNS))
        n = int(np.asarray(data.get("ts", [])).size)
        err = error_column(data["status_code"], data["timeout"], data["error_kind"]) if n else np.zeros(0)
        known = err[~np.isnan(err)]
        lat = np.asarray(data.get("latency_ms", []), dtype=float)
        lat = lat[~np.isnan(lat)]
        out.append({"name": c.name, "match": f"{c.kind} {c.key}={c.value}",
                    "from_stage": rule.from_stage + 1, "active": rule.active(rollout.stage),
                    "requests": n, "canary": int(np.count_nonzero(np.asarray(data.get("version", [])) == rollout.canary)),
                    "errors": int(np.nansum(known)), "error_rate": float(known.mean()) if known.size else None,
                    "p95_ms": float(np.quantile(lat, 0.95)) if lat.size else None})
    return out


def with_cohorts(summary: dict, observations: ObservationSource | None, rollout: Rollout, spec: RolloutSpec) -> dict:
    """``summary`` (an evaluation's) with ``cohorts``: :func:`cohort_stats` (untouched without cohorts; a
    failed read is logged and leaves them out: they never decide anything)."""
    if not spec.cohorts or observations is None:
        return summary
    try:
        summary["cohorts"] = cohort_stats(observations, rollout, spec)
    except Exception as exc:  # noqa: BLE001 - a display; the judgement stands without it
        log.warning("rollout #%d: cohort statistics not read: %s", rollout.id, exc)
    return summary


def summarize(judgement: Any, spec: RolloutSpec, rollout: Rollout, traffic: dict) -> dict:
    """The JSON summary recorded with an evaluation: the judgement, plan text and ``traffic``
    (``in_stage``, ``requests_per_hour``, ``n_baseline``, ``n_canary``)."""
    rate = traffic["requests_per_hour"]
    share = spec.steps[min(rollout.stage, len(spec.steps) - 1)].weight_bp / TOTAL_WEIGHT_BP
    plans = analysis.plan(judgement, rate, share)
    label = stage_label(spec, rollout.stage)
    summary = judgement.to_dict()
    summary["plan"] = [p.text(label, rate) for p in plans]
    summary["plan_hours"] = {p.metric: p.hours for p in plans}
    summary["requests_per_hour"] = rate
    summary["canary_samples_in_stage"] = traffic["in_stage"]
    summary["n_baseline"] = traffic["n_baseline"]
    summary["n_canary"] = traffic["n_canary"]
    return summary


def stable_history(observations: ObservationSource, config: LockgateConfig, model: str, now: float
                   ) -> dict[str, np.ndarray]:
    """The stable version's observations of the last :data:`AUTO_HISTORY_S` (for ``allowed: auto``)."""
    return observations.fetch(model, since_ts=now - AUTO_HISTORY_S, versions=[config.model(model).stable],
                              columns=list(EVAL_COLUMNS))


def start_plan(spec: RolloutSpec, history: dict, auto: dict, now: float) -> ramp_plan.RampPlan:
    """Per gating metric: canary observations and hours needed to show it within its allowance at
    today's traffic, walked through the ramp; warnings for those that exceed the ramp or max_duration."""
    prepared = analysis.prepare(history, now)
    return ramp_plan.plan_start(spec, spec.to_stats_specs(auto), prepared, now)


def status_plan(spec: RolloutSpec, rollout: Rollout, now: float) -> dict | None:
    """The plan of a running or paused rollout from its last evaluation, as JSON; None when there is
    none (a plan is advice: a failure to compute it is logged, never raised)."""
    if rollout.status not in ("running", "paused") or not rollout.last_eval:
        return None
    try:
        return ramp_plan.plan_status(
            spec, spec.to_stats_specs(rollout.auto_values()), rollout.last_eval, stage=rollout.stage,
            started_at=rollout.started_at, stage_started_at=rollout.stage_started_at, now=now).to_dict()
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("rollout #%d: no plan in status: %s", rollout.id, exc)
        return None


__all__ = ["AUTO_HISTORY_S", "COHORT_COLUMNS", "EVAL_COLUMNS", "PROMETHEUS", "cohort_stats", "with_cohorts",
           "with_prometheus", "judge", "rollout_columns", "stable_history", "start_plan",
           "status_plan", "summarize"]
