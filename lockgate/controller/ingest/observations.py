"""The observation store: every request lockgate's Envoys saw, and the labels (feedback) that arrive later.

SQLite in WAL mode at ``<state_dir>/observations.db``, or the schema ``observations`` in PostgreSQL
(:mod:`lockgate.database`):

* ``observations`` — append-only, one row per :class:`~lockgate.proto.v1.observations_pb2.Observation`
  (a column per field; ``NULL`` = not measured, never 0). ``(request_id, replay)`` is unique, so a
  retried batch is stored once (``ON CONFLICT DO NOTHING``). Indexed by ``ts`` alone (retention) and by
  ``(model, ts)``, ``(model, version, ts)``, ``(model, stage, ts)`` (statistics windows).
* ``labels`` — feedback joined by request id: ``kind`` ∈ :data:`LABEL_KINDS`, ``value``, and the
  arrival time ``ts``. One row per ``(request_id, kind)``: a later different value replaces the earlier
  one (and its arrival time); re-sending the same value keeps the original arrival time.
* ``expired`` — request ids whose observations were pruned (tombstones, kept for one more retention
  period), so late feedback is answered "gone" (410) rather than "unknown" (404).
* ``outcomes`` — how a response stream ended when it did not end normally (Envoy's access log flags,
  forwarded by the ext_proc server): ``error_kind`` ``upstream_reset`` / ``upstream_timeout`` (the model
  failed mid-stream) or ``client_reset``. Joined to the observation of the same request id (either may
  arrive first); ``fetch`` returns it as the ``error_kind`` column.
* ``sources`` — per ext_proc source (``host:pid``): observations stored from it, and — once a later
  ext_proc process reported the ledger the source left when it ended (lockgate/extproc/ledger.py) —
  how many it captured and dropped, so ``captured − dropped − stored`` is exactly what it lost
  (:meth:`ObservationStore.source_losses`).

Request ids are minted by Envoy per request (``x-lockgate-request-id``), so two requests never share
one; ``(request_id, replay)`` is unique and a second copy (a retried batch) is counted as a duplicate.

Writes go through one connection under a lock (the collector's batches, feedback, pruning); reads
(:meth:`ObservationStore.fetch`, lookups) use a small pool of their own connections and never block
writers (WAL). Every observation field and label comes back from :meth:`~ObservationStore.fetch` as
a NumPy column with NaN / ``None`` for "not measured". What the columns are is defined in
:mod:`.schema`; this module is the store.

Over 500 lines because it is one class, the store of five tables whose writes (idempotent batches,
labels, outcomes, ledgers, pruning) and reads (windows, lookups, streaming exports) share its
connections, locks and SQL; split, each half would need the other's internals.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from lockgate.controller.ingest.schema import (
    FETCH_COLUMNS, LABEL_ARRIVAL_COLUMN, LABEL_KINDS, STORED_BOOL_COLUMNS, STORED_COLUMN_NAMES, STORED_COLUMNS,
    add_label_aliases, columns_to_arrays,
)
from lockgate.routing import TOTAL_WEIGHT_BP
from lockgate.database import (Connection, Postgres, Where, columns, insert_new, open_reader, open_store, set_durable,
                               window_where, write_transaction)

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS observations (id INTEGER PRIMARY KEY, "
    + ", ".join(f"{c.name} {c.sql_type}" for c in STORED_COLUMNS)
    + ");\n"
    + """
CREATE UNIQUE INDEX IF NOT EXISTS obs_request_id ON observations(request_id, replay);
CREATE INDEX IF NOT EXISTS obs_ts ON observations(ts);
CREATE INDEX IF NOT EXISTS obs_model_ts ON observations(model, ts);
CREATE INDEX IF NOT EXISTS obs_model_version_ts ON observations(model, version, ts);
CREATE INDEX IF NOT EXISTS obs_model_stage_ts ON observations(model, stage, ts);
CREATE INDEX IF NOT EXISTS obs_client_request_id ON observations(client_request_id);
CREATE INDEX IF NOT EXISTS obs_model_cohort_ts ON observations(model, cohort, ts) WHERE cohort IS NOT NULL;
CREATE TABLE IF NOT EXISTS labels (
    request_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN (@LABEL_KINDS@)),
    value,  -- no type: keeps text classes as text, numbers as numbers
    ts REAL NOT NULL,
    PRIMARY KEY (request_id, kind)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS labels_ts ON labels(ts);
CREATE TABLE IF NOT EXISTS expired (request_id TEXT PRIMARY KEY, ts REAL NOT NULL, pruned_at REAL NOT NULL)
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS expired_pruned_at ON expired(pruned_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outcomes (
    request_id TEXT PRIMARY KEY,
    error_kind TEXT NOT NULL,
    response_flags TEXT,
    details TEXT,
    status_code INTEGER,
    model TEXT, version TEXT, role TEXT,
    ts REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outcomes_ts ON outcomes(ts);
CREATE TABLE IF NOT EXISTS sources (
    source TEXT PRIMARY KEY,
    stored INTEGER NOT NULL DEFAULT 0,    -- observations stored from it (new rows)
    rejected INTEGER NOT NULL DEFAULT 0,  -- observations rejected as invalid
    last_ts REAL NOT NULL,                -- last batch or report
    captured INTEGER, acked INTEGER, dropped INTEGER,  -- from its ledger, once it ended (else NULL)
    ended_ts REAL, reported_by TEXT
) WITHOUT ROWID;
""".replace("@LABEL_KINDS@", ", ".join(f"'{k}'" for k in LABEL_KINDS))
)

#: how long a statement waits for another connection's lock (seconds)
_LOCK_TIMEOUT_S = 30.0


def _add_missing_columns(db: Any) -> None:
    """A store created by an older lockgate gains the newer observation columns (NULL in old rows);
    runs before :data:`SCHEMA` (``open_store``'s ``before_schema``)."""
    have = columns(db, "observations")
    if not have:
        return  # a new store: SCHEMA creates the table
    for c in STORED_COLUMNS:
        if c.name not in have:
            db.execute(f"ALTER TABLE observations ADD COLUMN {c.name} {c.sql_type.replace(' NOT NULL', '')}")


# SQL expression per fetch column (o = observations, l_<kind> = labels)
_SELECT: dict[str, str] = {
    "ts": "o.ts", "weight": f"o.weight_bp / {float(TOTAL_WEIGHT_BP)!r}", "status_code": "o.status_code",
    "latency_ms": "o.duration_ms", "ttfb_ms": "o.ttfb_ms", "request_bytes": "o.request_bytes",
    "response_bytes": "o.response_bytes", "output_tokens": "o.output_tokens", "output_chars": "o.output_chars",
    "refusal": "o.refusal", "entropy": "o.entropy", "confidence": "o.confidence",
    "class_entropy": "o.class_entropy", "events": "o.events",
    "thumbs": "CASE l_thumbs.value WHEN 'up' THEN 1.0 WHEN 'down' THEN 0.0 END",
    # a label value has no SQL type on SQLite, TEXT on PostgreSQL: numbers are read as numbers
    "task_success": "CAST(l_task_success.value AS REAL)", "evaluator_score": "CAST(l_evaluator_score.value AS REAL)",
    **{LABEL_ARRIVAL_COLUMN[k]: f"l_{k}.ts" for k in LABEL_KINDS},
    "is_canary": "o.role = 'canary'", "timeout": "o.timeout", "truncated": "o.truncated",
    "output_tokens_estimated": "o.output_tokens_estimated", "replay": "o.replay",
    "request_id": "o.request_id", "client_request_id": "o.client_request_id",
    "model": "o.model", "version": "o.version", "role": "o.role",
    "stage": "o.stage", "route": "o.route", "upstream_host": "o.upstream_host", "user_key": "o.user_key",
    "analyzer": "o.analyzer", "parse_error": "o.parse_error", "finish_reason": "o.finish_reason",
    "predicted_class": "o.predicted_class", "true_class": "l_true_class.value", "error_kind": "x.error_kind",
    "cohort": "o.cohort",
}
_LABEL_JOINS = " ".join(
    f"LEFT JOIN labels l_{k} ON l_{k}.request_id = o.request_id AND l_{k}.kind = '{k}'" for k in LABEL_KINDS)
_OUTCOME_JOIN = " LEFT JOIN outcomes x ON x.request_id = o.request_id AND o.replay = 0"


class ObservationRejected(ValueError):
    """An observation that cannot be stored (no request id or no model)."""


@dataclass(frozen=True)
class InsertResult:
    """Outcome of one :meth:`ObservationStore.insert`: ``new`` = indexes (into the input) stored now."""

    new: list[int]
    duplicates: int
    rejected: int

    @property
    def stored(self) -> int:
        return len(self.new) + self.duplicates


@dataclass(frozen=True)
class LabelResult:
    request_id: str
    status: str  # "stored" | "unknown" | "expired"


def _finite_or_none(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def observation_row(obs: Any, source: str = "", received_ts: float | None = None) -> tuple:
    """One proto Observation → an ``observations`` row (NULL for not measured). Raises ObservationRejected."""
    if not obs.request_id:
        raise ObservationRejected("no request_id")
    if not obs.model:
        raise ObservationRejected("no model")
    now = time.time() if received_ts is None else received_ts
    out: list[Any] = []
    for name, _, field, mode in STORED_COLUMNS:
        if field is None:
            out.append(source or None if name == "source" else now)
            continue
        v = getattr(obs, field)
        if mode == "opt":
            if not obs.HasField(field):
                v = None
            elif isinstance(v, float):
                v = _finite_or_none(v)
            elif isinstance(v, bool):
                v = int(v)
        elif mode == "str":
            v = v or None
        elif mode == "nz":
            v = v or None
        elif isinstance(v, bool):
            v = int(v)
        out.append(v)
    ts_i = STORED_COLUMN_NAMES.index("ts")
    if not (isinstance(out[ts_i], float) and math.isfinite(out[ts_i]) and out[ts_i] > 0):
        out[ts_i] = now  # a sender without a clock reading: the arrival time is the best we have
    return tuple(out)


def _columnar(rows: Sequence[tuple], names: Sequence[str]) -> dict[str, np.ndarray]:
    cols = list(zip(*rows)) if rows else [() for _ in names]
    return columns_to_arrays(cols, names, len(rows))


def empty_columns() -> dict[str, np.ndarray]:
    return _columnar([], FETCH_COLUMNS)


class ObservationStore:
    """SQLite observation + label store. Thread-safe: writes are serialized, reads use pooled connections."""

    def __init__(self, path: str | Where, *, read_only: bool = False, synchronous: str = "FULL",
                 read_pool: int = 4):
        self.path: Where = path if isinstance(path, Postgres) else Path(path)
        self.read_only = read_only
        self._write_lock = threading.Lock()
        self._pool: queue.LifoQueue[Connection] = queue.LifoQueue()
        self._pool_max = read_pool
        self._all_readers: list[Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        #: called after labels are written with ``[(request_id, kind, stored value, arrival ts), ...]``
        #: (on the writing thread): the incremental evidence folds them (a ``ports.LabelsCallback``)
        self.on_labels: list = []
        #: the ``synchronous`` of a durable commit, and of one whose fsync a later durable commit does
        #: (in WAL mode a commit at FULL syncs the whole WAL file, frames of earlier commits included)
        self._sync_durable = synchronous.upper()
        self._sync_deferred = "NORMAL" if self._sync_durable in ("FULL", "EXTRA") else self._sync_durable
        self._sync_now = self._sync_durable
        self._db: Connection | None = None
        if read_only:  # no writer: readers only (open_reader, the file opened read-only)
            open_store(self.path, read_only=True, what="observation store").close()  # FileNotFoundError if none
        else:
            self._db = open_store(self.path, SCHEMA, read_only=False, what="observation store",
                                  synchronous=synchronous, timeout_s=_LOCK_TIMEOUT_S,
                                  before_schema=_add_missing_columns)

    # ----- connections -----
    def _connect_reader(self) -> Connection:
        conn = open_reader(self.path, timeout_s=_LOCK_TIMEOUT_S, file_read_only=self.read_only)
        with self._readers_lock:
            self._all_readers.append(conn)
        return conn

    @contextlib.contextmanager
    def _reader(self) -> Iterator[Connection]:
        if self._closed:
            raise RuntimeError("observation store is closed")
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect_reader()
        try:
            yield conn
        finally:
            if self._pool.qsize() < self._pool_max and not self._closed:
                self._pool.put(conn)
            else:
                with self._readers_lock:
                    if conn in self._all_readers:
                        self._all_readers.remove(conn)
                conn.close()

    @contextlib.contextmanager
    def _writer(self, durable: bool = True) -> Iterator[Connection]:
        """One write transaction. ``durable=False``: its commit is not synced to disk by itself, only
        by the next durable commit (or checkpoint); a crash of the process loses nothing, a power loss
        may lose it."""
        if self._db is None:
            raise RuntimeError("observation store opened read-only")
        with self._write_lock:
            sync = self._sync_durable if durable else self._sync_deferred
            if sync != self._sync_now:
                set_durable(self._db, durable, sqlite_durable=self._sync_durable, sqlite_fast=self._sync_deferred)
                self._sync_now = sync
            with write_transaction(self._db) as db:
                yield db

    def close(self) -> None:
        self._closed = True
        with self._readers_lock:
            for conn in self._all_readers:
                with contextlib.suppress(Exception):
                    conn.close()
            self._all_readers.clear()
        if self._db is not None:
            with self._write_lock:
                self._db.close()
                self._db = None

    # ----- writes -----
    def insert(self, observations: Iterable[Any], source: str = "", received_ts: float | None = None,
               *, durable: bool = True) -> InsertResult:
        """Store a batch of proto Observations in one transaction; idempotent on (request_id, replay).

        Returns which of them are new (indexes into the input), how many were already stored, and how
        many were rejected (no request id / model). Raises sqlite3.Error if nothing could be stored.
        ``durable=False`` leaves the fsync to the next durable write (see :meth:`_writer`): for all but
        the last part of a batch stored in parts.
        """
        now = time.time() if received_ts is None else received_ts
        rows: list[tuple] = []
        index: list[int] = []
        rejected = 0
        for i, obs in enumerate(observations):
            try:
                rows.append(observation_row(obs, source, now))
                index.append(i)
            except ObservationRejected:
                rejected += 1
        return self._insert_rows(rows, index, rejected, durable, source, now)

    def insert_rows(self, rows: Sequence[tuple]) -> InsertResult:
        """Store already-converted rows (see :func:`observation_row`)."""
        return self._insert_rows(list(rows), list(range(len(rows))), 0)

    def _insert_rows(self, rows: list[tuple], index: list[int], rejected: int, durable: bool = True,
                     source: str = "", now: float = 0.0) -> InsertResult:
        if not rows and not (source and rejected):
            return InsertResult([], 0, rejected)
        keys = [(r[0], r[STORED_COLUMN_NAMES.index("replay")]) for r in rows]
        new: list[int] = []
        with self._writer(durable) as db:
            existing: set[tuple[str, int]] = set()
            ids = list({k[0] for k in keys})
            for start in range(0, len(ids), 900):
                chunk = ids[start:start + 900]
                existing.update(db.execute(
                    f"SELECT request_id, replay FROM observations WHERE request_id IN ({','.join('?' * len(chunk))})",
                    chunk).fetchall())
            insert_new(db, "observations", STORED_COLUMN_NAMES, rows)
            seen: set[tuple[str, int]] = set()
            for k, i in zip(keys, index):
                if k in existing or k in seen:
                    continue
                seen.add(k)
                new.append(i)
            if source:  # in the same transaction: the per-source count is exactly what was stored
                db.execute("INSERT INTO sources(source, stored, rejected, last_ts) VALUES (?,?,?,?) "
                           "ON CONFLICT(source) DO UPDATE SET stored = sources.stored + excluded.stored, "
                           "rejected = sources.rejected + excluded.rejected, last_ts = excluded.last_ts",
                           (source, len(new), rejected, now))
        return InsertResult(new, len(rows) - len(new), rejected)

    def insert_outcomes(self, outcomes: Iterable[Any], now: float | None = None) -> list[int]:
        """Store :class:`StreamOutcome` records (idempotent on request id: the first one kept); returns the
        indexes (into the input) of those that are new."""
        now = time.time() if now is None else now
        new: list[int] = []
        with self._writer() as db:
            for i, o in enumerate(outcomes):
                if not o.request_id or not o.error_kind:
                    continue
                cur = db.execute(
                    "INSERT INTO outcomes(request_id, error_kind, response_flags, details, status_code, "
                    "model, version, role, ts) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                    (o.request_id, o.error_kind, o.response_flags or None, o.details or None, o.status_code or None,
                     o.model or None, o.version or None, o.role or None, o.ts if o.ts > 0 else now))
                if cur.rowcount:
                    new.append(i)
        return new

    def record_ended_sources(self, ledgers: Iterable[Any], reported_by: str = "",
                             now: float | None = None) -> list[dict[str, Any]]:
        """Store the ledgers of ext_proc processes that ended (:class:`SourceLedger`: captured, acked,
        dropped); a repeated report keeps the larger counts. Returns each source's loss (see
        :meth:`source_losses`)."""
        now = time.time() if now is None else now
        names = []
        with self._writer() as db:
            for k in ledgers:
                if not k.source:
                    continue
                names.append(k.source)
                db.execute(
                    "INSERT INTO sources(source, last_ts, captured, acked, dropped, ended_ts, reported_by) "
                    "VALUES (?,?,?,?,?,?,?) ON CONFLICT(source) DO UPDATE SET "
                    + ", ".join(f"{c} = CASE WHEN COALESCE(sources.{c}, 0) > excluded.{c} THEN sources.{c} "
                                f"ELSE excluded.{c} END" for c in ("captured", "acked", "dropped"))  # the larger
                    + ", ended_ts = COALESCE(sources.ended_ts, excluded.ended_ts), reported_by = excluded.reported_by",
                    (k.source, now, int(k.captured), int(k.acked), int(k.dropped), now, reported_by or None))
        return [x for x in self.source_losses() if x["source"] in names]

    def source_losses(self) -> list[dict[str, Any]]:
        """Per ended ext_proc source: ``captured``, ``dropped``, ``stored``, ``rejected`` and ``lost`` =
        captured − dropped − stored − rejected (observations it created that were neither stored nor
        counted as dropped: lost when the process died). A batch the controller stores after the report
        lowers it."""
        with self._reader() as db:
            rows = db.execute("SELECT source, captured, acked, dropped, stored, rejected, ended_ts, reported_by "
                              "FROM sources WHERE captured IS NOT NULL ORDER BY ended_ts, source").fetchall()
        return [{"source": src, "captured": cap, "acked": ack, "dropped": drop, "stored": st, "rejected": rej,
                 "lost": max(0, cap - drop - st - rej), "ended_ts": ended, "reported_by": by}
                for src, cap, ack, drop, st, rej, ended, by in rows]

    def add_labels(self, labels: Sequence[tuple[str, str, Any]], now: float | None = None,
                   retention_s: float | None = None) -> list[LabelResult]:
        """Join feedback ``(request_id, kind, value)`` to stored observations, atomically.

        A request id that was never stored is ``unknown``; one whose observation was pruned, or is
        older than ``retention_s``, is ``expired``; only ``stored`` ones are written. ``thumbs`` values
        are ``"up"``/``"down"``, ``task_success`` bool, ``evaluator_score`` float, ``true_class`` str.
        """
        now = time.time() if now is None else now
        for _, kind, _ in labels:
            if kind not in LABEL_KINDS:
                raise ValueError(f"unknown label kind {kind!r}")
        status = self.lookup_status([rid for rid, _, _ in labels], now, retention_s)
        out = [LabelResult(rid, status[rid]) for rid, _, _ in labels]
        todo = [(rid, kind, _label_db_value(kind, value), now) for rid, kind, value in labels
                if status[rid] == "stored"]
        if todo:
            with self._writer() as db:
                db.executemany(
                    "INSERT INTO labels(request_id, kind, value, ts) VALUES (?,?,?,?) "
                    "ON CONFLICT(request_id, kind) DO UPDATE SET value=excluded.value, ts=excluded.ts "
                    "WHERE labels.value IS DISTINCT FROM excluded.value", todo)
            for fn in self.on_labels:  # after the commit; a value sent again is a no-op there too
                fn(todo)
        return out

    def prune(self, older_than_ts: float, *, now: float | None = None, tombstone_s: float | None = None,
              chunk: int = 5000) -> int:
        """Delete observations with ``ts < older_than_ts`` (and their labels), remembering their request ids
        as expired; forget tombstones older than ``tombstone_s`` (default: as long as the retention).
        Works in chunks so the collector is never blocked for long. Returns rows deleted."""
        now = time.time() if now is None else now
        deleted = 0
        while True:
            with self._writer() as db:
                rows = db.execute("SELECT id, request_id, ts FROM observations WHERE ts < ? LIMIT ?",
                                  (older_than_ts, chunk)).fetchall()
                if not rows:
                    break
                db.executemany("INSERT INTO expired(request_id, ts, pruned_at) VALUES (?,?,?) ON CONFLICT(request_id) "
                               "DO UPDATE SET ts=excluded.ts, pruned_at=excluded.pruned_at",
                               [(rid, ts, now) for _, rid, ts in rows])
                db.executemany("DELETE FROM labels WHERE request_id = ?", [(rid,) for _, rid, _ in rows])
                db.executemany("DELETE FROM outcomes WHERE request_id = ?", [(rid,) for _, rid, _ in rows])
                db.executemany("DELETE FROM observations WHERE id = ?", [(i,) for i, _, _ in rows])
            deleted += len(rows)
            if len(rows) < chunk:
                break
        keep = (now - older_than_ts) if tombstone_s is None else tombstone_s
        with self._writer() as db:
            db.execute("DELETE FROM expired WHERE pruned_at < ?", (now - keep,))
            db.execute("DELETE FROM outcomes WHERE ts < ?", (older_than_ts,))  # outcomes of no observation
            db.execute("DELETE FROM sources WHERE last_ts < ? AND COALESCE(ended_ts, 0) < ?",
                       (older_than_ts, older_than_ts))
            db.execute("INSERT INTO meta(key, value) VALUES ('pruned_before', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value=excluded.value "
                       "WHERE CAST(meta.value AS REAL) < CAST(excluded.value AS REAL)", (repr(older_than_ts),))
        return deleted

    # ----- reads -----
    def lookup_status(self, request_ids: Sequence[str], now: float | None = None,
                      retention_s: float | None = None) -> dict[str, str]:
        """``request_id -> "stored" | "expired" | "unknown"``."""
        now = time.time() if now is None else now
        ids = list(dict.fromkeys(request_ids))
        found: dict[str, float] = {}
        expired: set[str] = set()
        with self._reader() as db:
            for start in range(0, len(ids), 900):
                chunk = ids[start:start + 900]
                marks = ",".join("?" * len(chunk))
                for rid, ts in db.execute(
                        f"SELECT request_id, MAX(ts) FROM observations WHERE request_id IN ({marks}) "
                        "GROUP BY request_id", chunk):
                    found[rid] = ts
                expired.update(r for (r,) in db.execute(
                    f"SELECT request_id FROM expired WHERE request_id IN ({marks})", chunk))
        out: dict[str, str] = {}
        for rid in ids:
            if rid in found:
                old = retention_s is not None and found[rid] < now - retention_s
                out[rid] = "expired" if old else "stored"
            else:
                out[rid] = "expired" if rid in expired else "unknown"
        return out

    def resolve_client_ids(self, client_request_ids: Sequence[str]) -> dict[str, list[str]]:
        """``client_request_id -> [request_id, …]`` of the stored (non-replay) observations carrying it:
        none (unknown), one, or several (the client reused its x-request-id: ambiguous)."""
        ids = list(dict.fromkeys(client_request_ids))
        out: dict[str, list[str]] = {c: [] for c in ids}
        with self._reader() as db:
            for start in range(0, len(ids), 900):
                chunk = ids[start:start + 900]
                for cid, rid in db.execute(
                        "SELECT client_request_id, request_id FROM observations WHERE replay = 0 AND "
                        f"client_request_id IN ({','.join('?' * len(chunk))}) ORDER BY id", chunk):
                    out[cid].append(rid)
        return out

    def _query(self, where: str, params: list[Any], columns: Sequence[str]) -> list[tuple]:
        joins = _LABEL_JOINS + (_OUTCOME_JOIN if "error_kind" in columns else "")
        sql = (f"SELECT {', '.join(_SELECT[c] for c in columns)} FROM observations o {joins} "
               f"WHERE {where} ORDER BY o.ts, o.id")
        with self._reader() as db:
            return db.execute(sql, params).fetchall()

    @staticmethod
    def _where(model: str | None, since_ts: float | None, until_ts: float | None,
               versions: Sequence[str] | None, stage: str | None, include_replay: bool,
               cohort: str | None = None) -> tuple[str, list[Any]]:
        clauses, params = window_where(model=model, since_ts=since_ts, until_ts=until_ts, versions=versions,
                                       prefix="o.")
        if cohort is not None:  # one cohort's rows by the partial index obs_model_cohort_ts, whatever the traffic
            clauses.append("o.cohort = ?")
            params.append(cohort)
        if stage is not None:
            clauses.append("o.stage = ?" if stage else "o.stage IS NULL")
            if stage:
                params.append(stage)
        if not include_replay:
            clauses.append("o.replay = 0")
        return " AND ".join(clauses) or "1 = 1", params

    def fetch(self, model: str, since_ts: float | None = None, until_ts: float | None = None,
              versions: Sequence[str] | None = None, *, stage: str | None = None, include_replay: bool = False,
              columns: Sequence[str] | None = None, cohort: str | None = None) -> dict[str, np.ndarray]:
        """Columnar observations of ``model`` with ``since_ts <= ts < until_ts``, ordered by ts.

        Columns (see :data:`FETCH_COLUMNS`): float64 with NaN for not measured (``latency_ms`` is the
        proto's ``duration_ms``; ``weight`` the canary share 0–1; ``refusal``/``thumbs``/``task_success``
        are 1.0/0.0/NaN; ``status_code`` NaN when unknown), bool (``is_canary`` = role is ``canary``;
        rows with role ``other`` are neither arm), object with ``None`` for unset strings. Labels
        (``true_class``, ``thumbs``, ``task_success``, ``evaluator_score``) come with their arrival time
        (``label_arrival_ts`` for ``true_class``, ``<kind>_arrival_ts`` for the others); ``label`` /
        ``label_ts`` alias ``true_class`` / ``label_arrival_ts``. Replays are excluded unless asked;
        ``cohort``: only the rows that cohort's route sent.
        """
        cols = tuple(columns) if columns is not None else FETCH_COLUMNS
        unknown = [c for c in cols if c not in _SELECT]
        if unknown:
            raise KeyError(f"unknown columns {unknown}")
        where, params = self._where(model, since_ts, until_ts, versions, stage, include_replay, cohort)
        return add_label_aliases(_columnar(self._query(where, params, cols), cols))

    def iter_records(self, model: str | None = None, since_ts: float | None = None, until_ts: float | None = None,
                     versions: Sequence[str] | None = None, *, include_replay: bool = True,
                     batch: int = 5000) -> Iterator[dict[str, Any]]:
        """Observation rows as dicts (every stored column, NULL → None) with their labels, ordered by ts.
        Streams (keyset pagination), for exports of any size."""
        where, params = self._where(model, since_ts, until_ts, versions, None, include_replay)
        label_cols = ", ".join(f"l_{k}.value, l_{k}.ts" for k in LABEL_KINDS)
        obs_cols = ", ".join(f"o.{c}" for c in STORED_COLUMN_NAMES)
        last: tuple[float, int] | None = None
        while True:
            w, p = where, list(params)
            if last is not None:
                w += " AND (o.ts > ? OR (o.ts = ? AND o.id > ?))"
                p += [last[0], last[0], last[1]]
            sql = (f"SELECT o.id, {obs_cols}, {label_cols}, x.error_kind FROM observations o {_LABEL_JOINS}"
                   f"{_OUTCOME_JOIN} WHERE {w} ORDER BY o.ts, o.id LIMIT {int(batch)}")
            with self._reader() as db:
                rows = db.execute(sql, p).fetchall()
            for row in rows:
                yield _record(row)
            if len(rows) < batch:
                return
            last = (rows[-1][1 + STORED_COLUMN_NAMES.index("ts")], rows[-1][0])

    def get(self, request_id: str) -> list[dict[str, Any]]:
        """Every stored row (normal and replay) of one request id, as :meth:`iter_records` dicts."""
        where = "o.request_id = ?"
        label_cols = ", ".join(f"l_{k}.value, l_{k}.ts" for k in LABEL_KINDS)
        obs_cols = ", ".join(f"o.{c}" for c in STORED_COLUMN_NAMES)
        with self._reader() as db:
            rows = db.execute(f"SELECT o.id, {obs_cols}, {label_cols}, x.error_kind FROM observations o "
                              f"{_LABEL_JOINS}{_OUTCOME_JOIN} WHERE {where} ORDER BY o.replay, o.id",
                              (request_id,)).fetchall()
        return [_record(row) for row in rows]

    def count(self, model: str | None = None) -> int:
        with self._reader() as db:
            if model is None:
                return db.execute("SELECT COUNT(*) FROM observations").fetchone()[0]
            return db.execute("SELECT COUNT(*) FROM observations WHERE model = ?", (model,)).fetchone()[0]

    def models(self) -> list[str]:
        with self._reader() as db:
            return [m for (m,) in db.execute("SELECT DISTINCT model FROM observations ORDER BY model")]


def _record(row: tuple) -> dict[str, Any]:
    """One ``SELECT o.id, <STORED_COLUMN_NAMES>, <label value, ts per kind>, x.error_kind`` row as an export dict."""
    rec = dict(zip(STORED_COLUMN_NAMES, row[1:1 + len(STORED_COLUMN_NAMES)]))
    rec["error_kind"] = row[-1]
    for c in STORED_BOOL_COLUMNS:
        rec[c] = bool(rec[c])
    if rec["refusal"] is not None:
        rec["refusal"] = bool(rec["refusal"])
    labels = row[1 + len(STORED_COLUMN_NAMES):-1]
    for j, kind in enumerate(LABEL_KINDS):
        value, ts = labels[2 * j], labels[2 * j + 1]
        if ts is not None:
            rec[kind] = _label_py_value(kind, value)
            rec[LABEL_ARRIVAL_COLUMN[kind]] = ts
    return rec


def _label_db_value(kind: str, value: Any) -> Any:
    if kind == "true_class":
        return str(value)
    if kind == "thumbs":
        if value not in ("up", "down"):
            raise ValueError(f"thumbs must be 'up' or 'down', got {value!r}")
        return value
    if kind == "task_success":
        return 1 if value else 0
    v = float(value)
    if not math.isfinite(v):
        raise ValueError("evaluator_score must be finite")
    return v


def _label_py_value(kind: str, value: Any) -> Any:
    if kind == "task_success":
        return bool(float(value))  # 1/0 on SQLite, '1'/'0' on PostgreSQL
    if kind == "evaluator_score":
        return float(value)
    return value


__all__ = ["InsertResult", "LabelResult", "ObservationRejected", "ObservationStore", "empty_columns",
           "observation_row"]
