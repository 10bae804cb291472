"""The verdicts of a rollout's Prometheus-sourced metrics (``prometheus:`` block, :mod:`.spec.prometheus`),
judged by the same statistics core as the metrics read from lockgate's own observations.

What Prometheus gives and how it becomes the core's input:

* **counter** (``events`` / ``total``) and **histogram** (requests above the bucket bound ``le`` / the
  histogram's ``_count``): per stage and arm, ``n`` requests of which ``e`` are events, read as counter
  differences at the stage boundaries (:mod:`lockgate.controller.evaluate.prometheus_source` says why not
  ``increase()``). They go to ``stats.rates.rate_verdict`` — the exact count test and the stratified
  difference — as a :class:`~lockgate.controller.stats.arms.Groups` in which **every counted request is its
  own user** (``n = 1``, ``s`` = 1 for the ``e`` events). Prometheus aggregates have no per-user
  breakdown, so the cluster-robust variance cannot be cluster-robust here: it is the independent-requests
  (binomial) variance. When a few users send many correlated requests, that variance is too small and the
  test is anti-conservative (docs/statistics.md §9); every such verdict says so.
* **gauge** (``query``): samples every ``step`` over the rollout; the mean per arm by
  ``stats.means.evaluate_mean``, the samples of one ``block`` of time forming one cluster (neighbouring
  samples of a gauge are correlated).

Strata are the rollout's stages, as for the built-in metrics: the windows between the stage starts. A
controller learns them as it moves the rollout; one that starts mid-rollout (a restart, a standby taking
over) recovers the earlier ones from the stored observations — each stage began with the first request
routed at its weight, as ``lockgate analyze`` reads them (:func:`stage_starts`). Alpha: each metric runs at its share of the rollout's alpha (``RolloutSpec.alphas``), so the
family-wise guarantee covers both sources together; :func:`merge` re-judges all verdicts as one judgement.

**Missing data holds.** Prometheus unreachable, slow (``timeout_s``), an error, a query selecting no
series: the metric's verdict is ``not-yet`` with the reason — a gating metric then blocks promotion and
never rolls back. Queries run at most once per ``refresh_s`` per rollout (data-triggered looks in between
reuse the last verdicts).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from lockgate.controller.decide.spec import MetricCriterion, RolloutSpec
from lockgate.controller.evaluate.prometheus_source import (
    PrometheusError,
    PrometheusReader,
    counter_expr,
    histogram_exprs,
    read_counter_windows,
)
from lockgate.controller.stats import Judgement, MetricSpec, MetricVerdict, evaluate_mean, judge
from lockgate.controller.stats.arms import DEFAULT_MIN_CLUSTERS, Groups, undecided
from lockgate.controller.stats.rates import rate_verdict

log = logging.getLogger("lockgate.controller.decide.prometheus_evidence")

__all__ = ["CLUSTERING_NOTE", "MAX_REQUESTS", "NOT_REPLAYED", "PrometheusEvidence", "count_groups", "count_verdict",
           "gauge_verdict", "merge", "offline", "stage_starts"]

#: in every Prometheus-sourced verdict
CLUSTERING_NOTE = "per-user clustering not available: Prometheus aggregates"
#: the most requests one look expands into per-request groups; beyond, the counts are scaled down (conservative).
#: A look costs ~60 ms of CPU at 100,000 requests and ~170 ms at 500,000 on the 2-core development machine
#: (numpy work and memory linear in the requests: tens of MB at the cap), once per ``refresh_s`` per rollout
#: (bench/prometheus_clustering.py, part cost)
MAX_REQUESTS = 500_000


def count_groups(windows: Sequence[tuple[float, float, float, float]], max_requests: int = MAX_REQUESTS
                 ) -> tuple[Groups | None, float]:
    """Per-stage counts ``(baseline events, baseline requests, canary events, canary requests)`` as the
    statistics core's per-user sums with every request its own user; and the scale applied (1.0 unless
    there were more than ``max_requests`` requests: then every count is multiplied by the same factor < 1,
    which only widens the intervals and lowers the count test's evidence — it can delay a verdict, never
    make a false one more likely). None when no request was counted."""
    cells = []
    for k, (eb, nb, ec, nc) in enumerate(windows):
        for arm, (e, n) in ((0, (eb, nb)), (1, (ec, nc))):
            n = max(float(n), 0.0)
            cells.append((k, arm, min(max(float(e), 0.0), n), n))
    total = sum(n for *_, n in cells)
    if total <= 0:
        return None, 1.0
    scale = min(1.0, max_requests / total)
    parts_st, parts_arm, parts_s = [], [], []
    for k, arm, e, n in cells:
        n_i, e_i = int(round(n * scale)), int(round(e * scale))
        e_i = min(e_i, n_i)
        if n_i == 0:
            continue
        s = np.zeros(n_i)
        s[:e_i] = 1.0
        parts_s.append(s)
        parts_st.append(np.full(n_i, k, dtype=np.intp))
        parts_arm.append(np.full(n_i, arm, dtype=np.intp))
    if not parts_s:
        return None, scale
    s = np.concatenate(parts_s)
    g = Groups(cl=np.arange(s.size, dtype=np.intp), st=np.concatenate(parts_st), arm=np.concatenate(parts_arm),
               n=np.ones(s.size), s=s, n_cl=int(s.size), n_st=max(len(windows), 1))
    return g, scale


def count_verdict(spec: MetricSpec, alpha: float, windows: Sequence[tuple[float, float, float, float]], *,
                  source: str, details: dict | None = None, min_clusters: int = DEFAULT_MIN_CLUSTERS,
                  max_requests: int = MAX_REQUESTS) -> MetricVerdict:
    """The rate verdict of event counts per stage and arm (see :func:`count_groups`), with the clustering
    note and the counts in its reason. ``source`` names where the counts came from (for the reason)."""
    g, scale = count_groups(windows, max_requests)
    eb = sum(w[0] for w in windows)
    nb = sum(w[1] for w in windows)
    ec = sum(w[2] for w in windows)
    nc = sum(w[3] for w in windows)
    counted = (f"{CLUSTERING_NOTE} (each counted request taken as an independent user: {nc:.0f} canary requests "
               f"with {ec:.0f} events, {nb:.0f} baseline requests with {eb:.0f} events, from {source})")
    det = {"source": "prometheus", "clustering": "none (Prometheus aggregates: requests taken as independent)",
           "windows": [list(map(float, w)) for w in windows], **(details or {})}
    if scale < 1.0:
        det["scaled_to"] = {"factor": scale, "max_requests": max_requests}
        counted += f"; counts scaled by {scale:.3g} to {max_requests:,} requests (conservative)"
    if g is None:
        v = undecided(spec, alpha, "no requests counted yet", None)
    else:
        v = rate_verdict(spec, alpha, g, min_clusters=min_clusters)
    return replace(v, reason=f"{v.reason}; {counted}", details={**v.details, **det})


def gauge_verdict(spec: MetricSpec, alpha: float, samples: dict[str, list[tuple[float, float]]],
                  bounds: Sequence[float], block_s: float, *, source: str, details: dict | None = None,
                  min_clusters: int = DEFAULT_MIN_CLUSTERS) -> MetricVerdict:
    """The mean verdict of a gauge's samples per arm (``{"baseline": [(t, v)], "canary": [...]}``): strata are
    the windows between ``bounds``, clusters the ``block_s`` blocks of time."""
    t = np.array([x for arm in ("baseline", "canary") for x, _ in samples[arm]], dtype=float)
    v = np.array([y for arm in ("baseline", "canary") for _, y in samples[arm]], dtype=float)
    is_c = np.array([arm == "canary" for arm in ("baseline", "canary") for _ in samples[arm]], dtype=bool)
    cluster = np.floor(t / block_s).astype(np.int64) if t.size else np.zeros(0, dtype=np.int64)
    stratum = np.clip(np.searchsorted(np.asarray(bounds[1:-1], dtype=float), t, side="right"), 0, None)
    note = (f"{CLUSTERING_NOTE} (gauge samples: {int(is_c.sum())} canary, {int((~is_c).sum())} baseline, every "
            f"{block_s:g} s of samples one cluster, from {source})")
    det = {"source": "prometheus", "clustering": f"time blocks of {block_s:g} s (no per-user data)", **(details or {})}
    out = evaluate_mean(v, is_c, cluster, spec, alpha, stratum=stratum, min_clusters=min_clusters)
    return replace(out, reason=f"{out.reason}; {note}", details={**out.details, **det})


def stage_starts(spec: RolloutSpec, ts: Any, weight: Any, started_at: float, upto_stage: int) -> dict[int, float]:
    """When each stage ``1..upto_stage`` began: the first observation (``ts``, epoch s) routed with its step's
    weight (``weight``: the canary share 0-1 in force per request) at or after ``started_at``. Stages with
    no such observation are left out (their windows pool with the previous one)."""
    ts = np.asarray(ts, dtype=float)
    bp = np.nan_to_num(np.asarray(weight, dtype=float)) * 10000.0
    out: dict[int, float] = {}
    for k in range(1, min(upto_stage, len(spec.steps) - 1) + 1):
        hit = (np.abs(bp - spec.steps[k].weight_bp) < 0.5) & (ts >= started_at)
        if hit.any():
            out[k] = float(ts[hit].min())
    return out


def merge(judgement: Judgement, extra: Sequence[MetricVerdict], spec: RolloutSpec) -> Judgement:
    """One judgement of the observation-fed verdicts and the Prometheus-sourced ones, in the spec's order, at
    the rollout's alpha (each verdict already ran at its share of it)."""
    by = {v.metric: v for v in judgement.verdicts}
    by.update({v.metric: v for v in extra})
    verdicts = [by[m.key] for m in spec.metrics if m.key in by]
    families = {m.key: m.family for m in spec.metrics if m.gating and m.family and m.alpha is None}
    return judge(verdicts, spec.alpha, families)


#: the reason of a Prometheus-sourced verdict in a replay of recorded observations (``lockgate analyze``)
NOT_REPLAYED = ("read from Prometheus by the live controller, not part of a recording of observations: this replay "
                "holds it not-yet (a gating one keeps the replay from promoting)")


def offline(judgement: Judgement, spec: RolloutSpec) -> Judgement:
    """``judgement`` with a ``not-yet`` verdict for each Prometheus-sourced metric (:data:`NOT_REPLAYED`): a
    replay never promotes past a gate it cannot see. Itself when the spec has none."""
    metrics = getattr(spec, "prometheus_metrics", ())
    if not metrics:
        return judgement
    alphas = spec.alphas
    return merge(judgement, [undecided(m.to_stats_spec(), alphas[m.key], NOT_REPLAYED, None) for m in metrics], spec)


class PrometheusEvidence:
    """Reads and judges the Prometheus-sourced metrics of running rollouts. One per controller process; holds
    a reader per Prometheus endpoint, the stage starts seen per rollout, and each rollout's last verdicts
    (reused for ``refresh_s``). Thread-safe."""

    def __init__(self, clock: Any = time.time):
        self._lock = threading.Lock()
        self._readers: dict[tuple[str, float], PrometheusReader] = {}
        self._stages: dict[int, dict[int, float]] = {}   #: rollout id → stage → when it started
        self._last: dict[int, tuple[str, int, float, tuple[MetricVerdict, ...]]] = {}
        self.clock = clock

    def reader(self, url: str, timeout_s: float) -> PrometheusReader:
        with self._lock:
            key = (url, float(timeout_s))
            if key not in self._readers:
                self._readers[key] = PrometheusReader(url, timeout_s)
            return self._readers[key]

    def bounds(self, rollout: Any, now: float, spec: RolloutSpec | None = None, observations: Any = None
               ) -> list[float]:
        """The stage boundaries of ``rollout`` up to ``now``: its start, each stage start, ``now``. At the first
        look at a rollout past its first stage, the earlier stages' starts come from ``observations`` (an
        ``ObservationSource``: one read of two columns), when given."""
        with self._lock:
            first = rollout.id not in self._stages
        recovered: dict[int, float] = {}
        if first and observations is not None and spec is not None and int(rollout.stage) > 0:
            try:
                data = observations.fetch(rollout.model, since_ts=rollout.started_at,
                                          versions=[rollout.baseline, rollout.canary], columns=["ts", "weight"])
                recovered = stage_starts(spec, data.get("ts", ()), data.get("weight", ()), rollout.started_at,
                                         int(rollout.stage) - 1)
            except Exception:  # advice for the strata only: without it the earlier stages pool into one window
                log.exception("rollout #%s: the earlier stage starts could not be read", getattr(rollout, "id", "?"))
        with self._lock:
            seen = self._stages.setdefault(rollout.id, {})
            for k, t in recovered.items():
                seen.setdefault(k, t)
            seen.setdefault(int(rollout.stage), float(rollout.stage_started_at))
            starts = sorted(t for t in seen.values() if rollout.started_at < t < now)
        return [float(rollout.started_at), *starts, float(now)]

    def with_prometheus(self, judgement: Judgement, rollout: Any, spec: RolloutSpec, now: float,
                        observations: Any = None) -> Judgement:
        """``judgement`` (of the observation-fed metrics) merged with the verdicts of ``spec``'s
        Prometheus-sourced metrics; ``judgement`` itself when the spec has none. ``observations`` (an
        ``ObservationSource``) lets a controller that starts mid-rollout recover the earlier stage starts."""
        if not getattr(spec, "prometheus_metrics", ()):
            return judgement
        if judgement.decision == "rollback":  # decided without Prometheus: never wait for it to roll back
            return merge(judgement, self.last_verdicts(rollout, spec), spec)
        return merge(judgement, self.verdicts(rollout, spec, now, observations), spec)

    def last_verdicts(self, rollout: Any, spec: RolloutSpec) -> tuple[MetricVerdict, ...]:
        """The verdicts of the last round of queries (whatever their age), or ``not-yet`` ones: for a look that
        rolls back on other metrics, which must not wait for Prometheus."""
        with self._lock:
            last = self._last.get(rollout.id)
        if last is not None and last[0] == spec.sha256:
            return last[3]
        alphas = spec.alphas
        return tuple(undecided(m.to_stats_spec(), alphas[m.key], "not read at this look: other gating metrics roll "
                               "the canary back", None) for m in spec.prometheus_metrics)

    def verdicts(self, rollout: Any, spec: RolloutSpec, now: float, observations: Any = None
                 ) -> tuple[MetricVerdict, ...]:
        metrics = spec.prometheus_metrics
        refresh = min(m.prometheus.refresh_s for m in metrics)
        with self._lock:
            last = self._last.get(rollout.id)
        if last is not None and last[0] == spec.sha256 and last[1] == rollout.stage and 0 <= now - last[2] < refresh:
            return last[3]
        bounds = self.bounds(rollout, now, spec, observations)
        alphas = spec.alphas
        out = tuple(self.verdict(m, m.to_stats_spec(), alphas[m.key], rollout, bounds, now) for m in metrics)
        with self._lock:
            self._last[rollout.id] = (spec.sha256, int(rollout.stage), now, out)
        return out

    def verdict(self, m: MetricCriterion, spec: MetricSpec, alpha: float, rollout: Any, bounds: Sequence[float],
                now: float) -> MetricVerdict:
        """One Prometheus-sourced metric's verdict; ``not-yet`` with the reason when it cannot be read."""
        src = m.prometheus
        spec = replace(spec, alpha=None, family=None)
        if not src.endpoint:
            return undecided(spec, alpha, f"{m.key}: no Prometheus to read (no prometheus.url on the metric and no "
                                          "controller.prometheus.url in lockgate.yaml); the gate holds", None)
        reader = self.reader(src.endpoint, src.timeout_s)
        names = {"model": rollout.model, "canary": rollout.canary, "baseline": rollout.baseline}
        try:
            if src.kind == "gauge":
                return self._gauge(src, spec, alpha, reader, names, bounds, now)
            return self._counts(src, spec, alpha, reader, names, bounds, now)
        except PrometheusError as exc:
            log.warning("rollout #%s %s: %s", getattr(rollout, "id", "?"), m.key, exc)
            return replace(undecided(spec, alpha, f"cannot read Prometheus: {exc}; the gate holds (no promotion on "
                                                  "missing data)", None),
                           details={"source": "prometheus", "error": str(exc), "url": src.endpoint})

    def _counts(self, src: Any, spec: MetricSpec, alpha: float, reader: PrometheusReader, names: dict,
                bounds: Sequence[float], now: float) -> MetricVerdict:
        per_arm: dict[str, tuple[Any, Any]] = {}
        queries: dict[str, dict[str, str]] = {}
        notes: list[str] = []
        for arm in ("baseline", "canary"):
            if src.kind == "counter":
                ev_q = counter_expr(src.events.render(arm, **names))
                tot_q = counter_expr(src.total.render(arm, **names))
                events = read_counter_windows(reader, ev_q, bounds, now)
                total = read_counter_windows(reader, tot_q, bounds, now)
                queries[arm] = {"events": ev_q, "total": tot_q}
            else:
                tot_q, below_q = histogram_exprs(src.histogram.render(arm, **names), src.le)
                total = read_counter_windows(reader, tot_q, bounds, now)
                try:
                    below = read_counter_windows(reader, below_q, bounds, now)
                except PrometheusError:
                    raise PrometheusError(f"the histogram has no bucket le={src.le:g} ({below_q} selects nothing): "
                                          "le must be one of its bucket bounds") from None
                events = type(total)(tuple(max(t - b, 0.0) for t, b in zip(total.counts, below.counts)),
                                     total.notes + below.notes)
                queries[arm] = {"total": tot_q, "at_or_below_le": below_q}
            per_arm[arm] = (events, total)
            notes += [f"{arm}: {n}" for n in events.notes + total.notes]
        windows = [(per_arm["baseline"][0].counts[k], per_arm["baseline"][1].counts[k],
                    per_arm["canary"][0].counts[k], per_arm["canary"][1].counts[k]) for k in range(len(bounds) - 1)]
        bad = [w for w in windows if w[0] > w[1] + 0.5 or w[2] > w[3] + 0.5]
        if bad:
            raise PrometheusError(f"more events than requests in a window ({bad[0]}): the events query must count a "
                                  "subset of the total query's requests")
        det = {"url": reader.url, "queries": queries, "bounds": [float(b) for b in bounds]}
        if notes:
            det["notes"] = notes
        v = count_verdict(spec, alpha, windows, source=f"Prometheus {reader.url}", details=det)
        return v

    def _gauge(self, src: Any, spec: MetricSpec, alpha: float, reader: PrometheusReader, names: dict,
               bounds: Sequence[float], now: float) -> MetricVerdict:
        samples: dict[str, list[tuple[float, float]]] = {}
        queries = {}
        for arm in ("baseline", "canary"):
            q = src.query.render(arm, **names)
            queries[arm] = q
            series = reader.range(q, bounds[0], now, src.step_s)
            if not series:
                raise PrometheusError(f"no series for {q} since the rollout started (the query selects nothing)")
            if len(series) > 1:
                raise PrometheusError(f"{q} returned {len(series)} series, not one per arm: aggregate it "
                                      "(avg(...) or sum(...))")
            samples[arm] = [(t, v) for t, v in series[0][1] if math.isfinite(v)]
        return gauge_verdict(spec, alpha, samples, bounds, src.block_s, source=f"Prometheus {reader.url}",
                             details={"url": reader.url, "queries": queries, "step_s": src.step_s})

    def forget(self, rollout_ids: Any) -> None:
        """Keep only the state of ``rollout_ids``."""
        keep = set(rollout_ids)
        with self._lock:
            for d in (self._stages, self._last):
                for rid in [r for r in d if r not in keep]:
                    del d[rid]
