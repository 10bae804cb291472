"""The evaluation store and metrics: mirrored request samples and their evaluations (docs/evaluation.md).

SQLite in WAL mode at ``state_dir/evaluation.db`` (or the schema ``evaluation`` in PostgreSQL; separate from the observation store, so its
writers never contend with the collector). Samples (request bodies!) are kept ``retention_hours``
and at most ``max_samples`` rows per model, oldest pruned first; evaluations (no bodies) as long as
observations (``controller.retention_days``). Written by the sampler (samples) and the evaluation
worker (evaluations); read by exports and the analysis (:func:`fetch_evaluations`).
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lockgate.config import LockgateConfig
from lockgate.database import Connection, Postgres, Where, open_store, window_where, write_transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    canary TEXT,             -- the canary when sampled (x-lockgate-sample-canary), NULL if unknown
    ts REAL NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    content_type TEXT,
    accept TEXT,
    headers TEXT,            -- JSON object of the model's evaluation.replay_headers found, or NULL
    body BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'new',  -- new | done | no_canary | canary_changed | failed
    done_ts REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS samples_request ON samples(request_id, model);
CREATE INDEX IF NOT EXISTS samples_model_id ON samples(model, id);
CREATE INDEX IF NOT EXISTS samples_ts ON samples(ts);
CREATE INDEX IF NOT EXISTS samples_state ON samples(state, id);
CREATE TABLE IF NOT EXISTS evaluations (
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    role TEXT NOT NULL,      -- baseline | canary
    evaluator TEXT NOT NULL,
    score REAL,              -- [0, 1]; NULL = no score (replay failed, no answer, evaluator error)
    similarity REAL,         -- [0, 1] of the two versions' answers; NULL = not computed
    ts REAL NOT NULL,        -- when evaluated
    sample_ts REAL NOT NULL, -- when the request was sampled
    error TEXT,              -- why there is no score, if so
    PRIMARY KEY (request_id, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS evaluations_model_ts ON evaluations(model, ts);
CREATE INDEX IF NOT EXISTS evaluations_ts ON evaluations(ts);
"""

#: columns of :meth:`EvaluationStore.fetch_evaluations`
EVAL_FLOAT_COLUMNS = ("ts", "sample_ts", "score", "similarity")
EVAL_OBJECT_COLUMNS = ("request_id", "model", "version", "role", "evaluator", "error")
EVAL_COLUMNS = EVAL_FLOAT_COLUMNS + ("is_canary",) + EVAL_OBJECT_COLUMNS


def evaluation_db_path(config: LockgateConfig) -> Where:
    return config.store("evaluation.db")


def evaluation_enabled(config: LockgateConfig) -> bool:
    return any(m.evaluation is not None for m in config.models)


@dataclass(frozen=True)
class Sample:
    """One mirrored request, as stored."""

    request_id: str
    model: str
    ts: float
    method: str
    path: str
    content_type: str | None
    accept: str | None
    body: bytes
    canary: str | None = None
    id: int | None = None
    headers: dict[str, str] | None = None  #: the model's ``replay_headers`` that the request carried


@dataclass(frozen=True)
class EvaluationRow:
    request_id: str
    model: str
    version: str
    role: str
    evaluator: str
    score: float | None
    similarity: float | None
    ts: float
    sample_ts: float
    error: str | None = None


def _f(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


class EvaluationStore:
    """``samples`` + ``evaluations`` in one SQLite file. Thread-safe (one connection under a lock);
    ``read_only`` opens an existing file for readers (the export CLI)."""

    def __init__(self, path: str | Where, *, read_only: bool = False):
        self.path: Where = path if isinstance(path, Postgres) else Path(path)
        self.read_only = read_only
        self._lock = threading.Lock()
        # private: prompts and replayed headers (e.g. authorization) live here
        self._db = open_store(self.path, SCHEMA, read_only=read_only, what="evaluation store", private=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._lock:
            with write_transaction(self._db) as db:
                yield db

    # ----- samples -----
    def insert_sample(self, s: Sample, retention_s: float, max_samples: int, now: float | None = None
                      ) -> tuple[bool, int]:
        """Store a sample (once per request id and model) and enforce the model's retention limit.
        Returns (stored, pruned)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO samples(request_id, model, canary, ts, method, path, content_type, accept, "
                "headers, body) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (s.request_id, s.model, s.canary, s.ts, s.method, s.path, s.content_type, s.accept,
                 json.dumps(s.headers) if s.headers else None, s.body))
            stored = cur.rowcount == 1
            pruned = self._prune_model(db, s.model, now - retention_s, max_samples)
        return stored, pruned

    @staticmethod
    def _prune_model(db: Connection, model: str, before_ts: float, max_samples: int) -> int:
        n = db.execute("DELETE FROM samples WHERE model = ? AND ts < ?", (model, before_ts)).rowcount
        (count,) = db.execute("SELECT COUNT(*) FROM samples WHERE model = ?", (model,)).fetchone()
        if count > max_samples:
            n += db.execute("DELETE FROM samples WHERE id IN (SELECT id FROM samples WHERE model = ? "
                            "ORDER BY id LIMIT ?)", (model, count - max_samples)).rowcount
        return n

    def prune_samples(self, limits: dict[str, tuple[float, int]], now: float | None = None) -> dict[str, int]:
        """Apply ``{model: (retention_s, max_samples)}``; samples of models not listed (evaluation
        switched off) are all deleted. Returns rows deleted per model."""
        now = time.time() if now is None else now
        out: dict[str, int] = {}
        with self._tx() as db:
            for model, (retention_s, max_samples) in limits.items():
                out[model] = self._prune_model(db, model, now - retention_s, max_samples)
            models = [m for (m,) in db.execute("SELECT DISTINCT model FROM samples")]
            for model in models:
                if model not in limits:
                    out[model] = db.execute("DELETE FROM samples WHERE model = ?", (model,)).rowcount
        return {m: n for m, n in out.items() if n}

    def pending(self, limit: int = 32, after_id: int = 0) -> list[Sample]:
        """New (not yet evaluated) samples, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, request_id, model, ts, method, path, content_type, accept, body, canary, headers "
                "FROM samples WHERE state = 'new' AND id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        return [Sample(r[1], r[2], r[3], r[4], r[5], r[6], r[7], bytes(r[8]), r[9], r[0],
                       json.loads(r[10]) if r[10] else None) for r in rows]

    def count_pending(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM samples WHERE state = 'new'").fetchone()[0]

    def mark(self, sample_id: int, state: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE samples SET state = ?, done_ts = ? WHERE id = ?", (state, now, sample_id))

    def samples(self, model: str | None = None) -> list[dict[str, Any]]:
        """Stored samples (for tests and debugging), oldest first."""
        sql = ("SELECT id, request_id, model, canary, ts, method, path, content_type, accept, headers, body, state, "
               "done_ts FROM samples")
        params: tuple = ()
        if model is not None:
            sql += " WHERE model = ?"
            params = (model,)
        names = ("id", "request_id", "model", "canary", "ts", "method", "path", "content_type", "accept", "headers",
                 "body", "state", "done_ts")
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", params).fetchall()
        return [dict(zip(names, r)) for r in rows]

    # ----- evaluations -----
    def add_evaluations(self, rows: Sequence[EvaluationRow], sample_id: int | None = None, state: str = "done"
                        ) -> None:
        """Store one sample's evaluations (replacing earlier ones of the same request and version) and
        mark the sample, atomically."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO evaluations(request_id, model, version, role, evaluator, score, similarity, "
                "ts, sample_ts, error) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(request_id, version) DO UPDATE SET "
                + ", ".join(f"{c}=excluded.{c}" for c in ("model", "role", "evaluator", "score", "similarity", "ts",
                                                           "sample_ts", "error")),
                [(r.request_id, r.model, r.version, r.role, r.evaluator, _f(r.score), _f(r.similarity), r.ts,
                  r.sample_ts, r.error) for r in rows])
            if sample_id is not None:
                db.execute("UPDATE samples SET state = ?, done_ts = ? WHERE id = ?", (state, time.time(), sample_id))

    def prune_evaluations(self, before_ts: float) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM evaluations WHERE ts < ?", (before_ts,)).rowcount

    def lookup(self, request_ids: Iterable[str]) -> dict[tuple[str, str], dict[str, Any]]:
        """``(request_id, version) -> {evaluator, score, similarity, ts, role, error}`` of the given ids."""
        ids = list(dict.fromkeys(request_ids))
        out: dict[tuple[str, str], dict[str, Any]] = {}
        with self._lock:
            for start in range(0, len(ids), 900):
                chunk = ids[start:start + 900]
                for rid, version, role, evaluator, score, sim, ts, error in self._db.execute(
                        "SELECT request_id, version, role, evaluator, score, similarity, ts, error FROM evaluations "
                        f"WHERE request_id IN ({','.join('?' * len(chunk))})", chunk):
                    out[(rid, version)] = {"role": role, "evaluator": evaluator, "score": score, "similarity": sim,
                                           "ts": ts, "error": error}
        return out

    def fetch_evaluations(self, model: str, since_ts: float | None = None, until_ts: float | None = None
                          ) -> dict[str, np.ndarray]:
        """Columnar evaluations of ``model`` with ``since_ts <= ts < until_ts`` (evaluation time),
        ordered by ts: float64 ``ts``, ``sample_ts``, ``score``, ``similarity`` (NaN = none), bool
        ``is_canary``, object ``request_id``, ``model``, ``version``, ``role``, ``evaluator``, ``error``.
        Both rows of one request carry the same ``similarity``."""
        clauses, params = window_where(model=model, since_ts=since_ts, until_ts=until_ts)
        sql = (f"SELECT ts, sample_ts, score, similarity, role = 'canary', request_id, model, version, role, evaluator, "
               f"error FROM evaluations WHERE {' AND '.join(clauses)} ORDER BY ts, request_id, role")
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        n = len(rows)
        cols = list(zip(*rows)) if rows else [()] * len(EVAL_COLUMNS)
        out: dict[str, np.ndarray] = {}
        for i, name in enumerate(EVAL_COLUMNS):
            values = cols[i]
            if name in EVAL_FLOAT_COLUMNS:
                out[name] = np.fromiter((math.nan if v is None else float(v) for v in values), dtype=np.float64,
                                        count=n)
            elif name == "is_canary":
                out[name] = np.fromiter((bool(v) for v in values), dtype=bool, count=n)
            else:
                arr = np.empty(n, dtype=object)
                if n:
                    arr[:] = list(values)
                out[name] = arr
        return out


def fetch_evaluations(config: LockgateConfig, model: str, since_ts: float | None = None,
                      until_ts: float | None = None) -> dict[str, np.ndarray]:
    """:meth:`EvaluationStore.fetch_evaluations` from the config's state directory (read-only; empty
    columns when nothing was ever evaluated)."""
    try:
        store = EvaluationStore(evaluation_db_path(config), read_only=True)
    except FileNotFoundError:
        return {c: np.empty(0, dtype=np.float64 if c in EVAL_FLOAT_COLUMNS else bool if c == "is_canary" else object)
                for c in EVAL_COLUMNS}
    try:
        return store.fetch_evaluations(model, since_ts, until_ts)
    finally:
        store.close()


# ----- metrics -----
class EvaluationMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.stored = Counter("lockgate_evaluation_samples_stored", "Mirrored requests stored as samples",
                              ["model"], registry=r)
        self.dropped = Counter("lockgate_evaluation_samples_dropped",
                               "Mirrored requests not stored (no_model, not_enabled, no_request_id, too_large, "
                               "duplicate, overloaded, store_failed, bad_request)", ["reason"], registry=r)
        self.pruned = Counter("lockgate_evaluation_samples_pruned",
                              "Samples deleted by the retention limit (age or max_samples)", ["model"], registry=r)
        self.skipped = Counter("lockgate_evaluation_samples_skipped",
                               "Samples not replayed (no_canary, canary_changed, failed)", ["model", "reason"],
                               registry=r)
        self.replays = Counter("lockgate_evaluation_replays", "Out-of-band replays by result (ok, http_error, "
                               "timeout, connection)", ["model", "version", "role", "result"], registry=r)
        self.evaluations = Counter("lockgate_evaluations", "Answers evaluated by result (scored, no_score, "
                                   "no_answer)", ["model", "version", "role", "evaluator", "result"], registry=r)
        self.evaluator_errors = Counter("lockgate_evaluation_evaluator_errors",
                                        "Evaluator (judge) calls that gave no score, by reason",
                                        ["model", "evaluator", "reason"], registry=r)
        self.score = Histogram("lockgate_evaluation_score", "Evaluator scores", ["model", "version", "role"],
                               buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.similarity = Histogram("lockgate_evaluation_similarity", "Similarity of canary and baseline answers",
                                    ["model"], buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                                    registry=r)
        self.backlog = Gauge("lockgate_evaluation_backlog", "Samples waiting to be replayed", registry=r)


__all__ = ["EVAL_COLUMNS", "EVAL_FLOAT_COLUMNS", "EVAL_OBJECT_COLUMNS", "EvaluationMetrics", "EvaluationRow",
           "EvaluationStore", "SCHEMA", "Sample", "evaluation_db_path", "evaluation_enabled", "fetch_evaluations"]
