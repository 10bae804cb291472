"""Evaluation of sampled requests: out-of-band replays, scoring, and the evaluation service (docs/evaluation.md).

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

The store (``state_dir/evaluation.db``) and metrics are in :mod:`lockgate.controller.evaluate.store`
(re-exported here); :class:`EvaluationService` puts store, sampler, worker and retention together.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import logging
import sqlite3
import time
import zlib
from dataclasses import dataclass
from typing import Sequence

from prometheus_client import CollectorRegistry

from lockgate.config import Address, LockgateConfig, Model
from lockgate.controller.evaluate.canaries import DesiredCanaries, control_api_fetch
from lockgate.controller.evaluate.sampler import SamplerServer
from lockgate.controller.evaluate.store import (EVAL_COLUMNS, EvaluationMetrics, EvaluationRow, EvaluationStore,
                                                Sample, evaluation_db_path, evaluation_enabled, fetch_evaluations)
from lockgate.controller.evaluate.evaluators import Evaluator, make_evaluator, run_score
from lockgate.controller.evaluate.similarity import Similarity, make_similarity, safe_compare
from lockgate.controller.evaluate.texts import extract_prompt, extract_text, replay_body
from lockgate.routing import REPLAY_HEADER

log = logging.getLogger("lockgate.controller.evaluate.evaluation")

#: most response bytes read from a replay
MAX_REPLAY_RESPONSE = 8 << 20

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


__all__ = ["EVAL_COLUMNS", "EvaluationMetrics", "EvaluationRow", "EvaluationService", "EvaluationStore",
           "EvaluationWorker", "DesiredCanaries", "REPLAY_HEADER", "ReplayResult", "Sample", "control_api_fetch",
           "evaluation_db_path",
           "evaluation_enabled", "extract_text", "fetch_evaluations", "pick_endpoint",
           "replay_body", "replay_once"]
