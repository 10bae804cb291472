"""Incremental evidence: a rollout's sufficient statistics, updated batch by batch, judged in O(users).

The full path (:func:`.analysis.evaluate_at`) re-reads and recomputes every stored row at every look.
Here each stored row is folded once into per-(user, stratum, arm) counts and sums per metric
(:class:`~lockgate.controller.stats.arms.Groups`), and a look judges from those: its cost depends on the
number of users and strata, not rows. The verdicts are those of :func:`.analysis.evaluate_at` on the
same data (same functions of the statistics core, fed sums instead of rows; numbers equal up to float
summation order — ``tests/unit/test_accumulator.py`` checks it on random streams with delayed labels,
users that switch arm, stage changes and late stream outcomes).

**Pure API** (no I/O, no clock; what ``lockgate analyze`` can call to evaluate every look cheaply)::

    ev = RolloutEvidence(spec.to_stats_specs(auto), baseline="v1", canary="v2", since_ts=started_at)
    ev.add_rows(columns)            # columns as ObservationStore.fetch / export.read_jsonl return them
    ev.add_labels([(request_id, kind, value, arrival_ts), ...])   # optional: labels arriving later
    ev.add_outcomes([(request_id, error_kind), ...])              # optional: stream outcomes arriving later
    judgement = ev.evaluate(now, alpha=spec.alpha)  # == analysis.evaluate_at(spec, same data, now)

Rows and labels are folded lazily, at :meth:`RolloutEvidence.evaluate` / :meth:`~RolloutEvidence.advance`:
rows with ``ts <= now`` and labels (joined in the row columns with their arrival column, or given to
``add_labels``) that arrived by ``now`` — exactly what :func:`.analysis.prepare_at` keeps. Looks must come
in non-decreasing ``now``; a label replaced later replaces the earlier one from its own arrival time.
Rows of neither arm, of other versions, before ``since_ts``, replays and request ids already seen are
ignored (the store keeps the first copy of a request).

**Quantile metrics** (latency p95 …) are not sums: the exceedance indicator moves with the baseline's
quantile at every look. They stay exact on the row path (:func:`~lockgate.controller.stats.evaluate_quantile`)
but over per-rollout in-memory arrays appended per batch (integer user and stratum codes), not a
re-read of SQLite: O(rows) numpy per look, no Python per row.

**Live** (:class:`.live_evidence.LiveEvidence`, built in ``app.py``): the collector hands it every stored slice's new
rows and stream outcomes, the observation store every stored label (``on_rows``, ``on_outcomes``,
``on_labels``, cheap appends under a lock); the promoter asks :meth:`LiveEvidence.judge`. A rollout's
state is built at its first look from one full read of the store (so a restarted controller rebuilds
it; events arriving meanwhile are queued and de-duplicated by request id) and dropped when the rollout
ends. Not incremental (the promoter then uses the full path): models with an ``evaluation`` section
(replayed evaluations live in another store) and metrics on columns the store does not have. Pruning
by retention (days) does not remove rows from a running rollout's state.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lockgate.controller.decide import analysis
from lockgate.controller.decide.spec import RolloutSpec
from lockgate.controller.ingest.schema import (FEEDBACK_ARRIVAL_COLUMNS, LABEL_ARRIVAL_COLUMN, MODEL_FAILURE_KINDS,
                                               error_column)
from lockgate.controller.stats import Judgement, MetricSpec, evaluate_quantile, judge, split_alpha
from lockgate.controller.stats.arms import DEFAULT_MIN_CLUSTERS, Groups, undecided
from lockgate.controller.stats.means import difference_verdict
from lockgate.controller.stats.rates import rate_verdict

__all__ = ["KNOWN_COLUMNS", "RolloutEvidence", "supported"]

_MAX_ST = 1 << 20  #: strata per rollout (distinct canary shares) the group key can hold
WAITING_S = 600.0  #: how long a label or outcome of a request not (yet) seen is kept for it
_WAITING_MAX = 10_000  #: ... checked once this many wait
_ROW_COLUMNS = ("latency_ms", "ttfb_ms", "output_tokens", "refusal", "entropy")  #: plain value columns
_LABEL_VALUE = {"true_class": "true_class", **{k: k for k in FEEDBACK_ARRIVAL_COLUMNS}}
#: metric columns the incremental path knows: plain values, the derived error/correct, label-fed ones
KNOWN_COLUMNS = frozenset((*_ROW_COLUMNS, "error", "correct", *FEEDBACK_ARRIVAL_COLUMNS, "predicted_class"))


class _Grow:
    """A 1-D array that grows by appending (amortised O(1) per element)."""

    def __init__(self, dtype: Any, fill: Any):
        self.fill = fill
        self.a = np.full(64, fill, dtype=dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        k = len(values)
        if self.n + k > self.a.size:
            bigger = np.full(max(2 * self.a.size, self.n + k), self.fill, dtype=self.a.dtype)
            bigger[:self.n] = self.a[:self.n]
            self.a = bigger
        self.a[self.n:self.n + k] = values
        self.n += k

    def grow_to(self, n: int) -> None:
        if n > self.n:
            self.extend(np.full(n - self.n, self.fill, dtype=self.a.dtype))

    @property
    def v(self) -> np.ndarray:
        return self.a[:self.n]


def supported(spec: RolloutSpec, specs: Sequence[MetricSpec], has_evaluation: bool) -> bool:
    """Whether :class:`RolloutEvidence` can judge this rollout (else: the full path)."""
    return not has_evaluation and all(s.kind == "quantile" or s.data_column in KNOWN_COLUMNS for s in specs)


class RolloutEvidence:
    """One rollout's evidence, folded incrementally (see the module docstring). Not thread-safe by
    itself (:class:`.live_evidence.LiveEvidence` locks around it)."""

    def __init__(self, specs: Sequence[MetricSpec], *, baseline: str | None = None, canary: str | None = None,
                 since_ts: float | None = None, min_clusters: int = DEFAULT_MIN_CLUSTERS):
        self.specs = list(specs)
        self.versions = None if baseline is None and canary is None else {baseline, canary}
        self.since_ts = since_ts
        self.min_clusters = min_clusters
        self.now = -math.inf                #: the latest look folded up to
        self._rid: dict[Any, int] = {}      #: request id → row
        self._pending_ids: set = set()
        self._pending: list[dict[str, np.ndarray]] = []   #: row chunks not folded yet (ts > now)
        self._labels: list[tuple[float, int, Any, str, Any]] = []  #: heap (arrival, seq, rid, kind, value)
        self._seq = 0
        self._waiting_labels: dict[Any, list[tuple[float, str, Any]]] = {}  #: labels of rows not folded yet
        self._waiting_outcomes: dict[Any, str] = {}
        self._users: dict[Any, int] = {}
        self._strata: dict[float, int] = {}
        self._gkey: dict[int, int] = {}
        self._g_cl, self._g_st, self._g_arm = _Grow(np.int64, 0), _Grow(np.int64, 0), _Grow(np.int64, 0)
        # per row
        self._ts, self._arm = _Grow(float, np.nan), _Grow(np.int8, 0)
        self._cl, self._st, self._grp = _Grow(np.int64, 0), _Grow(np.int64, 0), _Grow(np.int64, 0)
        self._err = _Grow(float, np.nan)
        self._kind = _Grow(object, None)    #: error_kind
        self._pred, self._true = _Grow(object, None), _Grow(object, None)
        self._fb = {k: _Grow(float, np.nan) for k in FEEDBACK_ARRIVAL_COLUMNS}
        self._raw = {c: _Grow(float, np.nan) for c in _ROW_COLUMNS}
        self._labelled = 0                  #: rows with a true_class label counted
        # per metric: each row's counted value, and per group its rows and sum
        grouped = [s for s in self.specs if s.kind != "quantile"]
        self._y = {s.name: _Grow(float, np.nan) for s in grouped}
        self._gn = {s.name: _Grow(float, 0.0) for s in grouped}
        self._gs = {s.name: _Grow(float, 0.0) for s in grouped}

    # ------------------------------------------------------------------ input
    def add_rows(self, columns: Mapping[str, np.ndarray]) -> int:
        """Queue rows (columnar, as ``fetch`` returns them); returns how many are new to this rollout.
        Labels joined in the columns (``true_class`` with ``label_arrival_ts``, the feedback columns with
        theirs) become label events at their arrival time; ``error_kind`` counts at once."""
        ts = np.asarray(columns.get("ts", np.zeros(0)), dtype=float)
        n = ts.size
        if n == 0:
            return 0
        role = _obj(columns, "role", n)
        keep = (role == "baseline") | (role == "canary")
        if self.versions is not None:
            keep &= np.isin(_obj(columns, "version", n), list(self.versions))
        if self.since_ts is not None:
            keep &= ts >= self.since_ts
        if "replay" in columns:
            keep &= ~np.asarray(columns["replay"], dtype=bool)
        rid = _obj(columns, "request_id", n).copy()
        idx = []
        for i in np.flatnonzero(keep):
            r = rid[i] if rid[i] is not None else ("row", self._seq, int(i))
            if r in self._rid or r in self._pending_ids:
                continue
            self._pending_ids.add(r)
            rid[i] = r
            idx.append(i)
        if not idx:
            return 0
        sel = np.asarray(idx, dtype=np.intp)
        chunk = {k: np.asarray(v)[sel] for k, v in columns.items() if np.asarray(v).shape[:1] == (n,)}
        chunk["request_id"] = rid[sel]
        self._pending.append(chunk)
        self._seq += 1
        for kind, col in _LABEL_VALUE.items():
            if col not in chunk:
                continue
            arrival = np.asarray(chunk.get(LABEL_ARRIVAL_COLUMN[kind], np.full(sel.size, np.nan)), dtype=float)
            values = chunk[col]
            for j in np.flatnonzero(np.isfinite(arrival)):
                v = values[j]
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    continue
                self._push_label(float(arrival[j]), chunk["request_id"][j], kind, v)
        return int(sel.size)

    def add_labels(self, labels: Iterable[tuple[Any, str, Any, float]]) -> None:
        """Labels ``(request_id, kind, value, arrival_ts)``: ``value`` as the store's column holds it
        (``thumbs`` 1.0/0.0 or "up"/"down", ``task_success`` 1/0, ``evaluator_score``, ``true_class``)."""
        for rid, kind, value, ts in labels:
            if kind in _LABEL_VALUE:
                self._push_label(float(ts), rid, kind, value)

    def add_outcomes(self, outcomes: Iterable[tuple[Any, str]]) -> None:
        """Stream outcomes ``(request_id, error_kind)``; the first one of a request counts (as stored)."""
        for rid, kind in outcomes:
            i = self._rid.get(rid)
            if i is None:
                self._waiting_outcomes.setdefault(rid, (kind, self.now))
            else:
                self._set_outcome(i, kind)

    def _push_label(self, arrival: float, rid: Any, kind: str, value: Any) -> None:
        if kind == "thumbs" and isinstance(value, str):
            value = {"up": 1.0, "down": 0.0}.get(value, math.nan)
        elif kind != "true_class":
            value = float(value)
        else:
            value = str(value)
        heapq.heappush(self._labels, (arrival, self._seq, rid, kind, value))
        self._seq += 1

    # ------------------------------------------------------------------ folding
    def advance(self, now: float) -> None:
        """Fold the queued rows with ``ts <= now`` and the labels that arrived by ``now``."""
        now = float(now)
        if now < self.now:
            raise ValueError(f"looks must not go back in time ({now} < {self.now})")
        self.now = now
        if self._pending:
            cols = _concat(self._pending)
            ts = np.asarray(cols["ts"], dtype=float)
            due = ts <= now
            later = {k: v[~due] for k, v in cols.items()}
            self._pending = [later] if (~due).any() else []
            if due.any():
                order = np.argsort(ts[due], kind="stable")
                self._fold({k: v[due][order] for k, v in cols.items()})
        while self._labels and self._labels[0][0] <= now:
            arrival, _, rid, kind, value = heapq.heappop(self._labels)
            i = self._rid.get(rid)
            if i is None:
                self._waiting_labels.setdefault(rid, []).append((arrival, kind, value))
            else:
                self._set_label(i, kind, value)
        if len(self._waiting_labels) + len(self._waiting_outcomes) > _WAITING_MAX:
            self._expire_waiting(now - WAITING_S)

    def _expire_waiting(self, before: float) -> None:
        """Forget labels and outcomes of requests this rollout never saw (other models, other rollouts)
        that have waited since before ``before``."""
        self._waiting_labels = {r: x for r, x in self._waiting_labels.items() if x[-1][0] >= before}
        self._waiting_outcomes = {r: x for r, x in self._waiting_outcomes.items() if x[1] >= before}

    def _fold(self, cols: dict[str, np.ndarray]) -> None:
        n = cols["ts"].size
        start = self._ts.n
        rid = cols["request_id"]
        for j, r in enumerate(rid):
            self._pending_ids.discard(r)
            self._rid[r] = start + j
        arm = (_obj(cols, "role", n) == "canary").astype(np.int8)
        users = _obj(cols, "user_key", n)
        codes = self._users
        cl = np.fromiter((codes.setdefault(u if u else r, len(codes)) for u, r in zip(users, rid)),
                         dtype=np.int64, count=n)
        share = np.round(np.nan_to_num(_flt(cols, "weight", n)), 9)
        st = np.empty(n, dtype=np.int64)
        for v in np.unique(share):
            st[share == v] = self._strata.setdefault(float(v), len(self._strata))
        if len(self._strata) >= _MAX_ST:
            raise ValueError("too many distinct canary shares in one rollout")
        key = (cl * _MAX_ST + st) * 2 + arm
        uk, inv = np.unique(key, return_inverse=True)
        gidx = np.empty(uk.size, dtype=np.int64)
        new_g = []
        for j, k in enumerate(uk.tolist()):
            g = self._gkey.get(k)
            if g is None:
                g = self._gkey[k] = len(self._gkey)
                new_g.append(k)
            gidx[j] = g
        if new_g:
            nk = np.asarray(new_g, dtype=np.int64)
            self._g_arm.extend(nk % 2)
            self._g_st.extend((nk // 2) % _MAX_ST)
            self._g_cl.extend((nk // 2) // _MAX_ST)
        for s in self._gn:
            self._gn[s].grow_to(len(self._gkey))
            self._gs[s].grow_to(len(self._gkey))
        self._ts.extend(cols["ts"].astype(float))
        self._arm.extend(arm)
        self._cl.extend(cl)
        self._st.extend(st)
        self._grp.extend(gidx[inv.reshape(-1)])
        kinds = _obj(cols, "error_kind", n)
        self._kind.extend(kinds)
        self._err.extend(error_column(_flt(cols, "status_code", n), _flt(cols, "timeout", n), kinds))
        self._pred.extend(_obj(cols, "predicted_class", n))
        self._true.extend(np.full(n, None, dtype=object))
        for k in self._fb:
            self._fb[k].extend(np.full(n, np.nan))
        for c in self._raw:
            self._raw[c].extend(_flt(cols, c, n))
        rows = np.arange(start, start + n)
        for s in self.specs:
            if s.kind != "quantile":
                self._y[s.name].extend(np.full(n, np.nan))
                self._count(s, rows, self._values(s, rows))
        for j, r in enumerate(rid):
            if r in self._waiting_outcomes:
                self._set_outcome(start + j, self._waiting_outcomes.pop(r)[0])
            for arrival, kind, value in self._waiting_labels.pop(r, ()):
                self._set_label(start + j, kind, value)

    def _values(self, s: MetricSpec, rows: np.ndarray) -> np.ndarray:
        """The value each row counts with for metric ``s`` now (NaN: not counted)."""
        col = s.data_column
        if col == "error":
            return self._err.v[rows]
        if col in self._fb:
            return self._fb[col].v[rows]
        if col in self._raw:
            return self._raw[col].v[rows]
        true = self._true.v[rows]
        has = np.array([t is not None for t in true], dtype=bool)
        pred = self._pred.v[rows]
        if col == "correct":
            return np.where(has, (pred == true).astype(float), np.nan)
        if s.kind == "class_recall":
            return np.where(has & (true == s.cls), (pred == s.cls).astype(float), np.nan)
        if s.kind == "class_precision":
            return np.where(has & (pred == s.cls), (true == s.cls).astype(float), np.nan)
        return np.full(rows.size, np.nan)

    def _count(self, s: MetricSpec, rows: np.ndarray, y: np.ndarray) -> None:
        """Replace the counted values of ``rows`` for ``s`` by ``y`` in the group sums."""
        old = self._y[s.name].v[rows]
        gn, gs, grp = self._gn[s.name].v, self._gs[s.name].v, self._grp.v[rows]
        out = np.isfinite(old)
        if out.any():
            np.subtract.at(gn, grp[out], 1.0)
            np.subtract.at(gs, grp[out], old[out])
        inn = np.isfinite(y)
        if inn.any():
            np.add.at(gn, grp[inn], 1.0)
            np.add.at(gs, grp[inn], y[inn])
        self._y[s.name].v[rows] = y

    def _recount(self, i: int, columns: tuple[str, ...]) -> None:
        rows = np.array([i])
        for s in self.specs:
            if s.kind != "quantile" and (s.data_column in columns or (
                    "true_class" in columns and s.kind in ("class_recall", "class_precision"))):
                self._count(s, rows, self._values(s, rows))

    def _set_label(self, i: int, kind: str, value: Any) -> None:
        if kind == "true_class":
            old = self._true.v[i]
            if old == value:
                return
            self._labelled += old is None
            self._true.v[i] = value
            self._recount(i, ("true_class", "correct"))
        else:
            old = self._fb[kind].v[i]
            if old == value or (math.isnan(old) and math.isnan(value)):
                return
            self._fb[kind].v[i] = value
            self._recount(i, (kind,))

    def _set_outcome(self, i: int, kind: str) -> None:
        if self._kind.v[i] is not None:
            return  # the store keeps the first outcome of a request
        self._kind.v[i] = kind
        if kind in MODEL_FAILURE_KINDS and self._err.v[i] != 1.0:
            self._err.v[i] = 1.0
            self._recount(i, ("error",))

    # ------------------------------------------------------------------ looks
    def evaluate(self, now: float, alpha: float, *, quantile_intervals: bool = True) -> Judgement:
        """The judgement at ``now`` (folds what is due first): :func:`.analysis.evaluate_at`'s."""
        self.advance(now)
        alphas = split_alpha(self.specs, alpha)
        out = [self._verdict(s, alphas[s.name], quantile_intervals) for s in self.specs]
        return judge(out, alpha, {s.name: s.family for s in self.specs if s.gating and s.family and s.alpha is None})

    def _verdict(self, s: MetricSpec, alpha: float, quantile_intervals: bool):
        mc = self.min_clusters
        if s.kind == "quantile":
            return evaluate_quantile(self._raw[s.data_column].v, self._arm.v == 1, self._cl.v, s, alpha,
                                     stratum=self._st.v, min_clusters=mc, compute_interval=quantile_intervals)
        gn = self._gn[s.name].v
        m = gn > 0
        g = Groups(cl=self._g_cl.v[m].astype(np.intp), st=self._g_st.v[m].astype(np.intp),
                   arm=self._g_arm.v[m].astype(np.intp), n=gn[m], s=self._gs[s.name].v[m],
                   n_cl=max(len(self._users), 1), n_st=max(len(self._strata), 1))
        if s.kind == "rate":
            if not m.any():
                return undecided(s, alpha, "no measured requests yet", None)
            return rate_verdict(s, alpha, g, min_clusters=mc)
        if s.kind == "mean":
            if not m.any():
                return undecided(s, alpha, "no measured values yet", None)
            return difference_verdict(s, alpha, g, binary=False, min_clusters=mc)
        if not m.any():
            return undecided(s, alpha, f"no usable labels for class {s.cls!r} at now={self.now:g}", None)
        return difference_verdict(s, alpha, g, binary=True, min_clusters=mc,
                                  details={"labels_usable": self._labelled, "labels_total": self._ts.n,
                                           "now": float(self.now)})

    def traffic(self, now: float, stage_started_at: float) -> dict[str, Any]:
        """What the promoter's summary counts besides the verdicts, over the folded rows."""
        ts, canary = self._ts.v, self._arm.v == 1
        n_c = int(np.count_nonzero(canary))
        return {"in_stage": analysis.canary_samples_in_stage(ts, canary, stage_started_at, now),
                "requests_per_hour": analysis.request_rate_per_hour(ts, now),
                "n_baseline": int(ts.size - n_c), "n_canary": n_c}

    @property
    def rows(self) -> int:
        return self._ts.n


def _obj(cols: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    return np.asarray(cols[name], dtype=object) if name in cols else np.full(n, None, dtype=object)


def _flt(cols: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    return np.asarray(cols[name], dtype=float) if name in cols else np.full(n, np.nan)


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(chunks) == 1:
        return chunks[0]
    names = set().union(*chunks)
    out = {}
    for name in names:
        parts = []
        for c in chunks:
            k = c["ts"].size
            if name in c:
                parts.append(np.asarray(c[name]))
            else:
                ref = next(x[name] for x in chunks if name in x)
                parts.append(np.full(k, np.nan) if np.asarray(ref).dtype.kind == "f" else np.full(k, None, dtype=object))
        kinds = {p.dtype.kind for p in parts}
        out[name] = np.concatenate([p.astype(object) for p in parts]) if len(kinds) > 1 else np.concatenate(parts)
    return out
