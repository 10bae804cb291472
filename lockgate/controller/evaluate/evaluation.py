"""Evaluation of sampled requests: the sample store, out-of-band replays and scoring (docs/evaluation.md).

Flow (in the controller process, only for models with an ``evaluation`` section):

1. Envoy mirrors ``sample_rate`` of a model's sticky-route requests to the sampler
   (:mod:`lockgate.controller.evaluate.sampler`), which stores them in ``samples`` (:class:`EvaluationStore`).
2. :class:`EvaluationWorker` takes each new sample and, while the model still has the canary it had
   when sampled (desired weights from the control API's ``GetWeights``, :class:`DesiredCanaries`;
   before it first answers, the canary named by the mirror's ``x-lockgate-sample-canary`` header),
   replays it directly to one endpoint of the stable version (role ``baseline``) and one of the
   canary (role ``canary``) — never through Envoy, so replays are never observations or traffic —
   with ``x-lockgate-replay: 1`` and the original ``x-request-id``; JSON bodies with a ``stream``
   field are replayed with ``"stream": false``.
3. Each answer's text (:func:`~lockgate.controller.evaluate.texts.extract_text`) is scored by the model's
   evaluator for the request's prompt, the two answers are compared by the similarity, and one row
   per version goes to ``evaluations``: (request_id, model, version, role, evaluator, score,
   similarity, ts, error). :meth:`EvaluationStore.fetch_evaluations` returns them as NumPy columns.

SQLite in WAL mode at ``state_dir/evaluation.db`` (separate from the observation store, so its
writers never contend with the collector). Samples (request bodies!) are kept ``retention_hours``
and at most ``max_samples`` rows per model, oldest pruned first; evaluations (no bodies) as long as
observations (``controller.retention_days``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import logging
import math
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lockgate.config import Address, LockgateConfig, Model
from lockgate.controller.evaluate.canaries import DesiredCanaries, control_api_fetch
from lockgate.controller.evaluate.evaluators import Evaluator, make_evaluator, run_score
from lockgate.controller.evaluate.similarity import Similarity, make_similarity, safe_compare
from lockgate.controller.evaluate.texts import extract_prompt, extract_text, replay_body
from lockgate.routing import REPLAY_HEADER
from lockgate.sqlite_util import open_store, window_where

log = logging.getLogger("lockgate.controller.evaluate.evaluation")

#: most response bytes read from a replay
MAX_REPLAY_RESPONSE = 8 << 20

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


def evaluation_db_path(config: LockgateConfig) -> Path:
    return config.state_dir / "evaluation.db"


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

    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.Lock()
        # private: prompts and replayed headers (e.g. authorization) live here
        self._db = open_store(self.path, SCHEMA, read_only=read_only, what="evaluation store", private=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ----- samples -----
    def insert_sample(self, s: Sample, retention_s: float, max_samples: int, now: float | None = None
                      ) -> tuple[bool, int]:
        """Store a sample (once per request id and model) and enforce the model's retention limit.
        Returns (stored, pruned)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO samples(request_id, model, canary, ts, method, path, content_type, accept, "
                "headers, body) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (s.request_id, s.model, s.canary, s.ts, s.method, s.path, s.content_type, s.accept,
                 json.dumps(s.headers) if s.headers else None, s.body))
            stored = cur.rowcount == 1
            pruned = self._prune_model(db, s.model, now - retention_s, max_samples)
        return stored, pruned

    @staticmethod
    def _prune_model(db: sqlite3.Connection, model: str, before_ts: float, max_samples: int) -> int:
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
                "INSERT OR REPLACE INTO evaluations(request_id, model, version, role, evaluator, score, similarity, "
                "ts, sample_ts, error) VALUES (?,?,?,?,?,?,?,?,?,?)",
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


# ----- replay -----
@dataclass(frozen=True)
class ReplayResult:
    status: int | None
    content_type: str | None
    body: bytes
    error: str | None  #: None | http_error | timeout | connection

    @property
    def ok(self) -> bool:
        return self.error is None


def pick_endpoint(endpoints: Sequence[Address], request_id: str) -> Address:
    """One endpoint of a version, spread by request id (deterministic)."""
    return endpoints[zlib.crc32(request_id.encode()) % len(endpoints)]


def replay_headers(sample: Sample, streamed_forced_off: bool) -> dict[str, str]:
    """The replay's headers: the sample's ``replay_headers``, content-type, accept (JSON when streaming
    was forced off), the original ``x-request-id`` and ``x-lockgate-replay: 1``."""
    headers = dict(sample.headers or {})
    headers.update({REPLAY_HEADER: "1", "x-request-id": sample.request_id})
    if sample.content_type:
        headers["content-type"] = sample.content_type
    accept = "application/json" if streamed_forced_off else sample.accept
    if accept:
        headers["accept"] = accept
    return headers


def replay_once(addr: Address, method: str, path: str, headers: dict[str, str], body: bytes, timeout_s: float
                ) -> ReplayResult:
    """One blocking HTTP/1.1 request straight to a model endpoint (never through Envoy)."""
    host = "127.0.0.1" if addr.host == "localhost" else addr.host
    conn = http.client.HTTPConnection(host, addr.port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body if body or method not in ("GET", "HEAD") else None, headers=headers)
        r = conn.getresponse()
        data = r.read(MAX_REPLAY_RESPONSE)
        ctype = r.getheader("content-type")
        return ReplayResult(r.status, ctype, data, None if 200 <= r.status < 300 else "http_error")
    except TimeoutError:
        return ReplayResult(None, None, b"", "timeout")
    except (OSError, http.client.HTTPException):
        return ReplayResult(None, None, b"", "connection")
    finally:
        conn.close()


# ----- worker -----
class EvaluationWorker:
    """Replays and evaluates new samples (see the module docstring). Runs as a controller task."""

    def __init__(self, config: LockgateConfig, store: EvaluationStore, metrics: EvaluationMetrics,
                 db: concurrent.futures.Executor, evaluators: dict[str, Evaluator] | None = None,
                 similarities: dict[str, Similarity | None] | None = None,
                 weights: DesiredCanaries | None = None):
        self.config = config
        self.models = {m.name: m for m in config.models if m.evaluation is not None}
        self.store = store
        self.metrics = metrics
        self.db = db
        self.concurrency = config.controller.evaluation_concurrency
        self.http = concurrent.futures.ThreadPoolExecutor(2 * self.concurrency, thread_name_prefix="eval-replay")
        self.weights = weights or DesiredCanaries(control_api_fetch(config))
        if evaluators is None:
            evaluators = {}
            for name, m in self.models.items():
                assert m.evaluation is not None
                evaluators[name] = make_evaluator(m.evaluation, self._on_evaluator_error(name, m.evaluation.evaluator))
        self.evaluators = evaluators
        self.similarities = similarities if similarities is not None else {
            name: make_similarity(m.evaluation.similarity) for name, m in self.models.items()
            if m.evaluation is not None}
        self.wake = asyncio.Event()
        self._replay_slots = asyncio.Semaphore(self.concurrency)
        self._score_slots = asyncio.Semaphore(self.concurrency)

    def _on_evaluator_error(self, model: str, evaluator: str):
        def count(reason: str) -> None:
            self.metrics.evaluator_errors.labels(model, evaluator, reason).inc()
        return count

    def close(self) -> None:
        self.http.shutdown(wait=False, cancel_futures=True)

    async def _db(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.db, fn, *args)

    async def run(self, stop: asyncio.Event, poll_s: float = 1.0) -> None:
        """Process samples until ``stop``; wakes on :attr:`wake` (a new sample) or every ``poll_s``."""
        last_id = 0
        while not stop.is_set():
            self.wake.clear()
            try:
                batch = await self._db(self.store.pending, 4 * self.concurrency, last_id)
                self.metrics.backlog.set(await self._db(self.store.count_pending))
            except sqlite3.Error:
                log.exception("reading samples failed")
                batch = []
            if batch:
                slots = asyncio.Semaphore(self.concurrency)

                async def one(s: Sample) -> None:
                    async with slots:
                        await self.process(s)

                await asyncio.gather(*(one(s) for s in batch))
                last_id = max(s.id or 0 for s in batch)
                continue
            last_id = 0  # nothing newer: rescan from the start next time (failed marks may have lagged)
            waiter = asyncio.ensure_future(self.wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()

    async def process(self, sample: Sample) -> list[EvaluationRow]:
        """Replay one sample to both versions, evaluate, store. Never raises (a failure marks it failed)."""
        model = self.models.get(sample.model)
        try:
            if model is None:
                await self._skip(sample, "not_enabled")
                return []
            known = await self.weights.canaries()
            if known is not None:
                canary = DesiredCanaries.canary_of(model, known.get(model.name))
            else:  # the control API never answered yet: trust the mirror's header
                canary = DesiredCanaries.canary_of(model, sample.canary)
            if canary is None:
                await self._skip(sample, "no_canary")
                return []
            if sample.canary is not None and sample.canary != canary:
                await self._skip(sample, "canary_changed")
                return []
            rows = await self._evaluate(model, canary, sample)
            await self._db(self.store.add_evaluations, rows, sample.id)
            return rows
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("evaluating sample %s of %s failed", sample.request_id, sample.model)
            await self._skip(sample, "failed")
            return []

    async def _skip(self, sample: Sample, reason: str) -> None:
        self.metrics.skipped.labels(sample.model, reason).inc()
        if sample.id is not None:
            try:
                await self._db(self.store.mark, sample.id, reason)
            except sqlite3.Error:
                log.exception("marking sample %s failed", sample.request_id)

    async def _replay(self, model: Model, version: str, role: str, sample: Sample, body: bytes,
                      headers: dict[str, str]) -> ReplayResult:
        assert model.evaluation is not None
        addr = pick_endpoint(model.versions[version].endpoints, sample.request_id)
        async with self._replay_slots:
            result = await asyncio.get_running_loop().run_in_executor(
                self.http, replay_once, addr, sample.method, sample.path, headers, body,
                model.evaluation.replay_timeout_s)
        self.metrics.replays.labels(model.name, version, role, result.error or "ok").inc()
        return result

    async def _score(self, evaluator: Evaluator, prompt: str, answer: str) -> float | None:
        async with self._score_slots:
            return await run_score(evaluator, prompt, answer)

    async def _evaluate(self, model: Model, canary: str, sample: Sample) -> list[EvaluationRow]:
        body, forced = replay_body(sample.body)
        headers = replay_headers(sample, forced)
        arms = (("baseline", model.stable), ("canary", canary))
        results = await asyncio.gather(*(self._replay(model, v, role, sample, body, headers) for role, v in arms))
        prompt = extract_prompt(sample.body)
        texts = [extract_text(r.body, r.content_type) if r.ok else None for r in results]
        evaluator = self.evaluators[model.name]
        ev_name = str(getattr(evaluator, "name", "") or type(evaluator).__name__)
        scores = await asyncio.gather(*(self._score(evaluator, prompt, t) if t is not None else _none()
                                        for t in texts))
        sim_impl = self.similarities.get(model.name)
        similarity = None
        if sim_impl is not None and texts[0] is not None and texts[1] is not None:
            similarity = safe_compare(sim_impl, texts[0], texts[1])
            if similarity is not None:
                self.metrics.similarity.labels(model.name).observe(similarity)
        now = time.time()
        rows = []
        for (role, version), r, text, score in zip(arms, results, texts, scores):
            if not r.ok:
                error = f"replay_{r.error}" + (f"_{r.status}" if r.status else "")
                result = "no_answer"
            elif text is None:
                error, result = "no_answer", "no_answer"
            elif score is None:
                error, result = "no_score", "no_score"
            else:
                error, result = None, "scored"
                self.metrics.score.labels(model.name, version, role).observe(score)
            self.metrics.evaluations.labels(model.name, version, role, ev_name, result).inc()
            rows.append(EvaluationRow(sample.request_id, model.name, version, role, ev_name, score, similarity, now,
                                      sample.ts, error))
        return rows


async def _none() -> None:
    return None


class EvaluationService:
    """The evaluation parts of the controller: store, sampler server, worker, retention."""

    def __init__(self, config: LockgateConfig, registry: CollectorRegistry):
        from lockgate.controller.evaluate.sampler import SamplerServer

        self.config = config
        self.metrics = EvaluationMetrics(registry)
        self.store = EvaluationStore(evaluation_db_path(config))
        self.db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eval-db")
        try:
            self.worker = EvaluationWorker(config, self.store, self.metrics, self.db)
        except BaseException:
            self.store.close()
            self.db.shutdown(wait=False)
            raise
        self.sampler = SamplerServer(config, self.store, self.metrics, self.db, on_stored=self.worker.wake.set)

    def limits(self) -> dict[str, tuple[float, int]]:
        return {m.name: (m.evaluation.retention_hours * 3600.0, m.evaluation.max_samples)
                for m in self.config.models if m.evaluation is not None}

    async def start(self) -> None:
        """Listen on ``controller.sampler``. Raises OSError when the address is not free."""
        await self.sampler.start()

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(self.worker.run(stop), self.retention(stop))

    async def retention(self, stop: asyncio.Event) -> None:
        """Prune samples (age, max rows) and evaluations (``controller.retention_days``) at start and
        every min(60 s, ``controller.prune_interval_s``)."""
        loop = asyncio.get_running_loop()
        interval = min(60.0, self.config.controller.prune_interval_s)
        keep_s = self.config.controller.retention_days * 86400.0
        while not stop.is_set():
            try:
                pruned = await loop.run_in_executor(self.db, self.store.prune_samples, self.limits())
                for model, n in pruned.items():
                    self.metrics.pruned.labels(model).inc(n)
                await loop.run_in_executor(self.db, self.store.prune_evaluations, time.time() - keep_s)
            except sqlite3.Error:
                log.exception("pruning samples failed")
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass

    async def close(self) -> None:
        await self.sampler.close()
        self.worker.close()
        await self.worker.weights.close()
        self.db.shutdown(wait=True)
        self.store.close()


async def evaluation_task(service: Any, stop: asyncio.Event) -> None:
    """Controller task (``ControllerService.add_task``): runs ``service.evaluation``."""
    await service.evaluation.run(stop)


__all__ = ["EVAL_COLUMNS", "EvaluationMetrics", "EvaluationRow", "EvaluationService", "EvaluationStore",
           "EvaluationWorker", "DesiredCanaries", "REPLAY_HEADER", "ReplayResult", "Sample", "control_api_fetch",
           "evaluation_db_path",
           "evaluation_enabled", "evaluation_task", "extract_text", "fetch_evaluations", "pick_endpoint",
           "replay_body", "replay_once"]
