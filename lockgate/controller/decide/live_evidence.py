"""The controller's incremental evidence: a :class:`~.accumulator.RolloutEvidence` per running rollout,
fed as observations, stream outcomes and labels are stored, and judged by the promoter.

See :mod:`.accumulator` for what is folded and why the verdicts are those of the full path. Here: the
hooks (``observations_stored``, ``outcomes_stored``, ``labels_stored``: the collector's ``on_rows`` /
``on_outcomes`` and the observation store's ``on_labels``, wired in ``app.py``; each is a cheap append
under a lock, the folding happens at the next look), building a rollout's state at its first look from
one full read of the store (a restarted controller rebuilds it the same way; events arriving during the
read are queued and de-duplicated by request id), and :meth:`LiveEvidence.judge`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterable, Sequence

import numpy as np

from lockgate.controller.decide.accumulator import RolloutEvidence, supported
from lockgate.controller.decide.evidence import PROMETHEUS, summarize, with_cohorts, with_prometheus
from lockgate.controller.decide.rollouts import Rollout
from lockgate.controller.decide.spec import RolloutSpec
from lockgate.controller.ingest.observations import observation_row
from lockgate.controller.ingest.schema import DECISION_COLUMNS, STORED_COLUMN_NAMES, columns_to_arrays
from lockgate.controller.ports import ObservationSource
from lockgate.controller.stats import Judgement, MetricSpec
from lockgate.routing import TOTAL_WEIGHT_BP

log = logging.getLogger("lockgate.controller.decide.live_evidence")

__all__ = ["LiveEvidence", "stored_rows_to_columns"]

_NAME_INDEX = {c: STORED_COLUMN_NAMES.index(c) for c in STORED_COLUMN_NAMES}
#: fetch column ← stored column (see ObservationStore._SELECT)
_FROM_STORED = {"ts": "ts", "request_id": "request_id", "version": "version", "role": "role", "stage": "stage",
                "status_code": "status_code", "timeout": "timeout", "latency_ms": "duration_ms",
                "ttfb_ms": "ttfb_ms", "output_tokens": "output_tokens", "refusal": "refusal", "entropy": "entropy",
                "predicted_class": "predicted_class", "user_key": "user_key", "upstream_host": "upstream_host",
                "replay": "replay", "model": "model"}


def stored_rows_to_columns(rows: Sequence[tuple]) -> dict[str, np.ndarray]:
    """Rows as stored (``schema.STORED_COLUMN_NAMES`` tuples) → the columns ``fetch`` returns for them
    (no labels or outcome yet: those arrive as events)."""
    n = len(rows)
    names = list(_FROM_STORED)
    cols = [[r[_NAME_INDEX[_FROM_STORED[c]]] for r in rows] for c in names]
    out = columns_to_arrays(cols, names, n)
    out["weight"] = np.fromiter((r[_NAME_INDEX["weight_bp"]] / float(TOTAL_WEIGHT_BP) for r in rows), dtype=float,
                                count=n)
    return out


class LiveEvidence:
    """The controller's incremental evidence: one :class:`RolloutEvidence` per running rollout, fed by
    the collector (:meth:`rows_stored`, :meth:`outcomes_stored`) and the label store
    (:meth:`labels_stored`), judged by the promoter (:meth:`judge`). Thread-safe."""

    def __init__(self, observations: ObservationSource, has_evaluation: Any = lambda model: False):
        self.observations = observations
        self.has_evaluation = has_evaluation
        self._lock = threading.Lock()
        self._states: dict[int, tuple[str, str, RolloutEvidence, threading.Lock]] = {}  #: id → (model, hash, state, lock)
        self._intervals_at: dict[int, float] = {}  #: rollout id → last look with quantile intervals

    # hooks: cheap, on the collector's writer thread or a feedback thread
    def observations_stored(self, observations: Sequence[Any], new: Sequence[int], source: str,
                            received_ts: float) -> None:
        """The collector's hook: ``observations[i]`` for ``i`` in ``new`` were just stored. Only those of
        models with a running rollout are converted (nothing is done for the others)."""
        if not new or not self._states:
            return
        with self._lock:
            models = {x[0] for x in self._states.values()}
        rows = [observation_row(observations[i], source, received_ts) for i in new
                if observations[i].model in models and not observations[i].replay]
        self.rows_stored(rows)

    def rows_stored(self, rows: Sequence[tuple]) -> None:
        """New observations just stored (``STORED_COLUMN_NAMES`` tuples)."""
        if not rows or not self._states:
            return
        with self._lock:
            states = list(self._states.values())
        mi = _NAME_INDEX["model"]
        for model in {r[mi] for r in rows}:
            mine = [x for x in states if x[0] == model]
            if not mine:
                continue
            cols = stored_rows_to_columns([r for r in rows if r[mi] == model])
            for _, _, state, lock in mine:
                with lock:
                    state.add_rows(cols)

    def outcomes_stored(self, outcomes: Sequence[tuple[str, str]]) -> None:
        """New stream outcomes ``(request_id, error_kind)``."""
        for _, _, state, lock in self._snapshot():
            with lock:
                state.add_outcomes(outcomes)

    def labels_stored(self, labels: Sequence[tuple[str, str, Any, float]]) -> None:
        """Labels written ``(request_id, kind, stored value, arrival ts)``."""
        for _, _, state, lock in self._snapshot():
            with lock:
                state.add_labels(labels)

    def _snapshot(self) -> list:
        with self._lock:
            return list(self._states.values())

    def retain(self, rollout_ids: Iterable[int]) -> None:
        """Forget the state of every rollout not in ``rollout_ids``."""
        keep = set(rollout_ids)
        with self._lock:
            for rid in [r for r in self._states if r not in keep]:
                del self._states[rid]
                self._intervals_at.pop(rid, None)
        PROMETHEUS.forget(keep)  # the Prometheus-sourced metrics' per-rollout stage starts and last verdicts

    def judge(self, rollout: Rollout, spec: RolloutSpec, now: float, *, quantile_intervals: bool | None = None
              ) -> tuple[Judgement, dict, int] | None:
        """The promoter's judgement of ``rollout`` at ``now`` with its summary (as :func:`.evidence.judge`),
        or None when this rollout cannot be judged incrementally (then use the full path).

        ``quantile_intervals`` (default: once per ``analysis_interval_s``): whether quantile metrics
        report their interval on the shift scale — a bisection of dozens of exceedance estimates that no
        verdict uses; the data-triggered looks in between leave it out (every verdict is the same). A look
        that decides ``rollback`` never waits for them: it is judged without intervals first."""
        scheduled = quantile_intervals is None
        if scheduled:
            last = self._intervals_at.get(rollout.id)
            quantile_intervals = last is None or now - last >= spec.analysis_interval_s
        specs = spec.to_stats_specs(rollout.auto_values())
        if not supported(spec, specs, bool(self.has_evaluation(rollout.model))):
            return None
        entry = self._state(rollout, specs)
        _, _, state, lock = entry
        with lock:
            judgement = state.evaluate(now, spec.alpha, quantile_intervals=False)
            # A rollback is decided without the intervals (no verdict uses them): it is not delayed by
            # their bisection; the next look computes them. Any other decision gets them when due.
            if quantile_intervals and judgement.decision != "rollback":
                judgement = state.evaluate(now, spec.alpha, quantile_intervals=True)
                if scheduled:
                    self._intervals_at[rollout.id] = now
            traffic = state.traffic(now, rollout.stage_started_at)
        # outside the lock: it may query Prometheus (and, at a first look mid-rollout, read the stage starts)
        judgement = with_prometheus(judgement, rollout, spec, now, self.observations)
        summary = with_cohorts(summarize(judgement, spec, rollout, traffic), self.observations, rollout, spec)
        return judgement, summary, traffic["in_stage"]

    def _state(self, rollout: Rollout, specs: list[MetricSpec]):
        with self._lock:
            entry = self._states.get(rollout.id)
            if entry is not None and entry[1] == rollout.spec_hash:
                return entry
            state = RolloutEvidence(specs, baseline=rollout.baseline, canary=rollout.canary,
                                    since_ts=rollout.started_at)
            entry = (rollout.model, rollout.spec_hash, state, threading.Lock())
            self._states[rollout.id] = entry  # events from now on are queued; the read below de-duplicates
        data = self.observations.fetch(rollout.model, since_ts=rollout.started_at,
                                       versions=[rollout.baseline, rollout.canary], columns=list(DECISION_COLUMNS))
        with entry[3]:
            state.add_rows(data)
        log.info("rollout #%d: incremental evidence built from %d stored observations", rollout.id,
                 int(np.asarray(data.get("ts", [])).size))
        return entry
