"""The controller's ``ObservationCollector`` gRPC service and its Prometheus metrics.

Each ext_proc process sends ``ObservationBatch``es to ``Report``; a batch is stored durably (in paced
slices, one SQLite transaction each, see :class:`ObservationCollectorServicer` and
:class:`~lockgate.controller.ingest.observations.ObservationStore`) before the ack. Report is
idempotent on request id: a retried batch is acknowledged again and stored once, and counted once in
the metrics. If the store fails, Report answers ``UNAVAILABLE`` so the sender retries or drops (and
counts) the batch — the controller never affects traffic.

Metrics (own registry; labels ``model``, ``version``, ``role`` — never per-user):

* ``lockgate_controller_observations_stored_total`` / ``..._duplicate_total`` / ``..._failed_total``
  (model, version, role), ``..._rejected_total`` (reason);
  ``lockgate_controller_source_dropped_observations_total`` (source): what each ext_proc reported it
  dropped before sending; ``lockgate_controller_source_last_report_timestamp_seconds`` (source).
* ``lockgate_controller_response_samples_stored_total`` / ``..._failed_total``: retained response bodies
  (``capture.retain_bodies``, :mod:`lockgate.controller.ingest.samples`); a failed sample write is logged and
  counted but never fails the batch (the observations are stored).
* traffic (replays excluded), the series of :mod:`lockgate.series` (the ext_proc exports the same
  definitions): ``lockgate_requests_total`` (+ ``status`` class 2xx/4xx/5xx/none),
  ``lockgate_request_duration_seconds`` and ``lockgate_time_to_first_byte_seconds`` histograms,
  ``lockgate_output_tokens`` histogram, ``lockgate_refusals_total``, ``lockgate_predicted_class_total``
  (+ ``class``; at most ``series.CLASS_LABEL_CAP`` per model, the rest as ``__other__``),
  ``lockgate_stream_outcomes_total`` (+ ``kind``); and the controller's own
  ``lockgate_request_errors_total`` (:func:`~lockgate.controller.ingest.schema.is_error`: 5xx, upstream
  timeout, or a stream the model cut) and ``lockgate_request_timeouts_total``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lockgate import series
from lockgate.controller.ingest.observations import ObservationStore
from lockgate.controller.ingest.schema import is_error, is_model_failure
from lockgate.proto.v1 import observations_pb2 as pb
from lockgate.proto.v1 import observations_pb2_grpc as pb_grpc

log = logging.getLogger("lockgate.controller.ingest.collector")

LABELS = series.TRAFFIC_LABELS


class _SourceStats:
    """Per-source ``dropped_total`` (as last reported) and last report time, exported as metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.dropped: dict[str, int] = {}
        self.last_report: dict[str, float] = {}

    def dropped_totals(self) -> dict[str, int]:
        """Observations each source reported it dropped, as last reported (the ``DropCounts`` port)."""
        with self._lock:
            return dict(self.dropped)

    def update_dropped(self, source: str, dropped_total: int) -> None:
        """The dropped count from an ended source's ledger (it may never have reported its last drops)."""
        with self._lock:
            self.dropped[source] = max(self.dropped.get(source, 0), int(dropped_total))

    def update(self, source: str, dropped_total: int, now: float) -> None:
        with self._lock:
            # a counter from the source: never let a reordered (older) batch move it back
            self.dropped[source] = max(self.dropped.get(source, 0), int(dropped_total))
            self.last_report[source] = now

    def collect(self):
        with self._lock:
            dropped = dict(self.dropped)
            last = dict(self.last_report)
        c = CounterMetricFamily("lockgate_controller_source_dropped_observations",
                                "Observations an ext_proc source reports it dropped (queue full / send failed)",
                                labels=["source"])
        for source, n in sorted(dropped.items()):
            c.add_metric([source], n)
        yield c
        g = GaugeMetricFamily("lockgate_controller_source_last_report_timestamp_seconds",
                              "When each ext_proc source last reported a batch", labels=["source"])
        for source, ts in sorted(last.items()):
            g.add_metric([source], ts)
        yield g

    def describe(self):
        return []


class _LossStats:
    """``lockgate_controller_observations_lost_total{source}``: per ext_proc source that ended with
    observations neither stored nor counted as dropped (killed with a queue), read from the store's
    ``sources`` table at each scrape (so it survives controller restarts)."""

    def __init__(self, store: ObservationStore):
        self.store = store

    def collect(self):
        c = CounterMetricFamily("lockgate_controller_observations_lost",
                                "Observations an ext_proc process created and lost when it died (captured - "
                                "dropped - stored, from the ledger the next process reported)", labels=["source"])
        try:
            losses = self.store.source_losses()
        except Exception:  # the store is closed or failing: report nothing rather than break /metrics
            losses = []
        for x in losses:
            c.add_metric([x["source"]], x["lost"])
        yield c

    def describe(self):
        return []


class ControllerMetrics:
    """All controller metrics, in one :class:`CollectorRegistry` (``registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stored = Counter("lockgate_controller_observations_stored", "Observations stored", LABELS, registry=r)
        self.duplicate = Counter("lockgate_controller_observations_duplicate",
                                 "Observations received again (retried batch) and not stored twice", LABELS,
                                 registry=r)
        self.failed = Counter("lockgate_controller_observations_failed",
                              "Observations not stored because the store failed (batch answered UNAVAILABLE)",
                              LABELS, registry=r)
        self.rejected = Counter("lockgate_controller_observations_rejected",
                                "Observations rejected as invalid", ["reason"], registry=r)
        self.batches = Counter("lockgate_controller_report_batches", "Report calls", ["result"], registry=r)
        self.store_seconds = Histogram("lockgate_controller_store_seconds", "Time to store one batch durably",
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
                                       registry=r)
        self.pruned = Counter("lockgate_controller_observations_pruned", "Observations deleted by retention",
                              registry=r)
        self.feedback = Counter("lockgate_controller_feedback", "Feedback items by kind and result",
                                ["kind", "result"], registry=r)
        self.samples_stored = Counter("lockgate_controller_response_samples_stored",
                                      "Response body samples stored (capture.retain_bodies)", registry=r)
        self.samples_failed = Counter("lockgate_controller_response_samples_failed",
                                      "Batches whose response body samples could not be stored", registry=r)
        self.sources = _SourceStats()
        r.register(self.sources)
        # traffic, as observed by the ext_proc processes (replays excluded)
        self.requests = series.REQUESTS.create(r)
        self.errors = Counter("lockgate_request_errors",
                              "Requests answered 5xx, timed out upstream, or cut off mid-stream by the model server",
                              LABELS, registry=r)
        self.timeouts = Counter("lockgate_request_timeouts", "Upstream timeouts", LABELS, registry=r)
        self.duration = series.REQUEST_DURATION.create(r)
        self.ttft = series.TIME_TO_FIRST_BYTE.create(r)
        self.output_tokens = series.OUTPUT_TOKENS.create(r)
        self.refusals = series.REFUSALS.create(r)
        self.classes = series.PREDICTED_CLASS.create(r)
        self.stream_outcomes = series.STREAM_OUTCOMES.create(r)
        self._loss_stats: _LossStats | None = None
        self._class_label = series.ClassLabels()
        #: (metric id, label values) -> child: ``labels()`` costs ~1 µs per call (a lock and a dict)
        self._children: dict[tuple, Any] = {}

    def track_losses(self, store: ObservationStore) -> None:
        """Export ``lockgate_controller_observations_lost_total`` from ``store`` (once per registry)."""
        if self._loss_stats is None:
            self._loss_stats = _LossStats(store)
            self.registry.register(self._loss_stats)

    def observe_outcome(self, outcome: Any) -> None:
        """Count a newly stored :class:`StreamOutcome`: a model failure is a request error (and an upstream
        timeout a timeout) — Envoy reports only streams whose status was below 500, so no request is
        counted twice."""
        lv = (outcome.model or "unknown", outcome.version or "unknown", outcome.role or "other")
        self._child(self.stream_outcomes, *lv, outcome.error_kind).inc()
        if is_model_failure(outcome.error_kind):
            self._child(self.errors, *lv).inc()
            if outcome.error_kind == "upstream_timeout":
                self._child(self.timeouts, *lv).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, obs: Any) -> None:
        """Count one newly stored observation (from one thread at a time: the store's writer)."""
        lv = (obs.model, obs.version, obs.role or "other")
        child = self._child
        child(self.stored, *lv).inc()
        if obs.replay:
            return
        code = obs.status_code
        child(self.requests, *lv, series.status_class(code)).inc()
        if obs.timeout:
            child(self.timeouts, *lv).inc()
        if is_error(code, obs.timeout):  # a model failure mid-stream: observe_outcome
            child(self.errors, *lv).inc()
        if obs.HasField("duration_ms") and math.isfinite(obs.duration_ms):
            child(self.duration, *lv).observe(obs.duration_ms / 1000.0)
        if obs.HasField("ttfb_ms") and math.isfinite(obs.ttfb_ms):
            child(self.ttft, *lv).observe(obs.ttfb_ms / 1000.0)
        if obs.HasField("output_tokens"):
            child(self.output_tokens, *lv).observe(obs.output_tokens)
        if obs.HasField("refusal") and obs.refusal:
            child(self.refusals, *lv).inc()
        if obs.predicted_class:
            child(self.classes, *lv, self._class_label(obs.model, obs.predicted_class)).inc()


#: a batch is stored in at most this many slices (one transaction each)...
MAX_SLICES = 10
#: ...of at least this many observations
MIN_SLICE = 5
#: while a batch is stored, the writer thread works at most this share of the time: after each slice
#: it pauses ``elapsed × (1 − duty) / duty`` (at most :data:`MAX_PAUSE_S`) before the next one
STORE_DUTY = 0.25
MAX_PAUSE_S = 0.005


def slice_bounds(n: int, min_slice: int = MIN_SLICE, max_slices: int = MAX_SLICES) -> list[tuple[int, int]]:
    """``[start, end)`` ranges cutting a batch of ``n`` observations into at most ``max_slices`` slices
    of at least ``min_slice`` (the last one may be shorter), in order."""
    if n <= 0:
        return []
    size = max(min_slice, -(-n // max_slices))
    return [(start, min(n, start + size)) for start in range(0, n, size)]


class ObservationCollectorServicer(pb_grpc.ObservationCollectorServicer):
    """``Report``: store the batch (in the store's writer thread, paced), then ack with counts.

    Pacing: the controller usually shares its host with an Envoy and the data path, and storing
    costs tens of µs of CPU per observation. Stored in one go, a batch is a burst of several ms that
    delays the requests arriving meanwhile; on the 2-CPU benchmark machine no scheduling priority
    or CPU placement of the controller prevented that (docs/observations.md). So a batch is stored in
    slices (:func:`slice_bounds`, one transaction each), with a pause after each slice that keeps the
    writer thread busy at most ``duty`` of the time. The ack still comes only when every slice is
    durable; a slice that fails answers ``UNAVAILABLE`` and the retried batch stores the rest (the
    slices already stored count as duplicates). Other batches' slices and feedback writes run
    in the pauses, so a busy controller catches up at full speed.
    """

    def __init__(self, store: ObservationStore, metrics: ControllerMetrics,
                 executor: concurrent.futures.Executor | None = None, samples: Any = None,
                 sample_roles: tuple[str, ...] | None = None, *, min_slice: int = MIN_SLICE,
                 max_slices: int = MAX_SLICES, duty: float = STORE_DUTY):
        if not 0 < duty <= 1:
            raise ValueError(f"duty must be in (0, 1], got {duty}")
        self.store = store
        self.metrics = metrics
        #: :class:`~lockgate.controller.ingest.samples.SampleStore` when capture.retain_bodies is on (else None:
        #: body samples that arrive anyway are not kept); only samples of ``sample_roles`` are stored
        self.samples = samples
        self.sample_roles = sample_roles
        self.min_slice = min_slice
        self.max_slices = max_slices
        self.duty = duty
        # one writer thread: SQLite serializes writers anyway, and the event loop never blocks on disk
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="obs-writer")
        #: called on the event loop with the set of models a stored batch had new observations for
        #: (the promotion loop re-checks for harm at once: rollback is event-driven, not polled).
        self.on_stored: list = []
        #: callables returning None (take the batch) or why this controller refuses observations now (a
        #: standby of several controllers: answered UNAVAILABLE, so the ext_proc sends to the next one)
        self.accept_checks: list = []
        #: called on the writer thread, right after each slice is durable, with the slice's proto
        #: observations, the indexes of the new ones, the source and the received time: the incremental
        #: evidence folds those of running rollouts (``decide/live_evidence.py``; a ``ports.RowsCallback``)
        self.on_rows: list = []
        #: likewise with new stream outcomes ``(request_id, error_kind)`` (a ``ports.OutcomesCallback``)
        self.on_outcomes: list = []
        metrics.track_losses(store)

    def _store_extras(self, request: pb.ObservationBatch, now: float) -> None:
        """Store a batch's stream outcomes and ended-source ledgers (idempotent, so a retried batch is fine)."""
        if request.outcomes:
            new = self.store.insert_outcomes(request.outcomes, now)
            for i in new:
                self.metrics.observe_outcome(request.outcomes[i])
            if new and self.on_outcomes:
                stored = [(request.outcomes[i].request_id, request.outcomes[i].error_kind) for i in new]
                for fn in self.on_outcomes:
                    fn(stored)
        if request.ended_sources:
            for x in self.store.record_ended_sources(request.ended_sources, request.source, now):
                self.metrics.sources.update_dropped(x["source"], x["dropped"])
                if x["lost"]:
                    log.warning("ext_proc %s ended (reported by %s) having lost %d observations: captured %d, "
                                "stored %d, dropped %d (counted in lockgate_controller_observations_lost_total)",
                                x["source"], request.source or "?", x["lost"], x["captured"], x["stored"],
                                x["dropped"])
                else:
                    log.info("ext_proc %s ended: captured %d, stored %d, dropped %d, nothing lost", x["source"],
                             x["captured"], x["stored"], x["dropped"])

    def _store_slice(self, obs: Any, source: str, now: float, last: bool) -> tuple[pb.ReportAck, float]:
        """Store one slice (one transaction) and count it; returns its ack and the seconds it took.
        Only the ``last`` slice's commit is synced to disk, which makes the earlier ones durable too
        (one fsync per batch). Raises if the store failed (its observations counted as failed)."""
        t0 = time.perf_counter()
        try:
            result = self.store.insert(obs, source=source, received_ts=now, durable=last)
        except Exception:
            for o in obs:
                self.metrics.failed.labels(o.model, o.version, o.role or "other").inc()
            raise
        self.metrics.store_seconds.observe(time.perf_counter() - t0)
        if result.new:
            for fn in self.on_rows:
                fn(obs, result.new, source, now)
        new = set(result.new)
        for i, o in enumerate(obs):
            if i in new:
                self.metrics.observe(o)
            elif o.request_id and o.model:
                self.metrics.duplicate.labels(o.model, o.version, o.role or "other").inc()
            else:
                self.metrics.rejected.labels("no request_id" if not o.request_id else "no model").inc()
        if self.samples is not None and result.new:
            try:  # best effort, after the observations are durable
                n = self.samples.insert((obs[i] for i in result.new), now, self.sample_roles)
                if n:
                    self.metrics.samples_stored.inc(n)
            except Exception:
                log.exception("storing response body samples failed (observations are stored)")
                self.metrics.samples_failed.inc()
        ack = pb.ReportAck(stored=result.stored, duplicates=result.duplicates, rejected=result.rejected)
        return ack, time.perf_counter() - t0

    async def Report(self, request: pb.ObservationBatch, context) -> pb.ReportAck:
        for check in self.accept_checks:
            if (reason := check()) is not None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, reason)
        loop = asyncio.get_running_loop()
        now = time.time()
        self.metrics.sources.update(request.source or "unknown", request.dropped_total, now)
        obs = request.observations
        ack = pb.ReportAck()
        try:
            if request.outcomes or request.ended_sources:
                await loop.run_in_executor(self.executor, self._store_extras, request, now)
            bounds = slice_bounds(len(obs), self.min_slice, self.max_slices)
            for k, (start, end) in enumerate(bounds):
                part, elapsed = await loop.run_in_executor(self.executor, self._store_slice, obs[start:end],
                                                           request.source, now, k + 1 == len(bounds))
                ack.stored += part.stored
                ack.duplicates += part.duplicates
                ack.rejected += part.rejected
                if k + 1 < len(bounds):
                    await asyncio.sleep(min(MAX_PAUSE_S, elapsed * (1 - self.duty) / self.duty))
        except Exception as exc:  # the store failed: the sender keeps (or drops and counts) the batch
            self.metrics.batches.labels("error").inc()
            log.exception("storing a batch of %d observations from %s failed", len(obs), request.source or "?")
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"observation store failed: {exc}")
            raise  # unreachable: abort raises
        finally:
            if self.on_stored and ack.stored:
                models = {o.model for o in obs if o.model and not o.replay}
                for fn in self.on_stored:
                    fn(models)
        self.metrics.batches.labels("ok").inc()
        return ack


__all__ = ["ControllerMetrics", "LABELS", "ObservationCollectorServicer", "slice_bounds"]
