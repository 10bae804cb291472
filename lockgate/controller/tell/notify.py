"""Alerts and model-registry feedback: the notifier (an :class:`~lockgate.controller.ports.EventSink`
of the promotion loop) and its delivery.

Nothing here is on the rollback path. The promotion loop calls :meth:`Notifier.on_event` as a background
task *after* the weights moved and the record was written; it only turns the event into outbox rows (in
the notifier's own database thread) and wakes the delivery loop.

* **Outbox** (:mod:`.outbox`, ``<state_dir>/notify.db``): one row per (alert, sink) and per registry
  update. Rows are delivered in order per channel (``alert:<sink name>`` or ``registry``), retried with
  bounded exponential backoff (the sink's / registry's ``retry`` policy), and given up after
  ``max_attempts`` or at once on a permanent error (HTTP 4xx other than 408/425/429, unknown MLflow
  version…). A controller restart picks up undelivered rows where they were.
* **Deployment log**: outcomes are appended to the rollout's ``rollout_events`` as kind ``alert`` /
  ``registry`` (``delivered``; ``retrying`` on the first failure; ``gave_up``) — never the sink URL.
* **Component trouble** is detected by :mod:`.trouble` and queued here (:meth:`Notifier.raise_trouble`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from lockgate.config import LockgateConfig, RetryPolicy
from lockgate.controller.decide.rollouts import RolloutStore
from lockgate.controller.ports import OutcomeEvent
from lockgate.controller.tell.alerts import (Alert, DeliveryError, alert_from_event, backoff_delay,
                                             rollback_push_trouble, send_alert)
from lockgate.controller.tell.outbox import Item, Outbox
from lockgate.controller.tell.registry import RegistryError, RegistryUpdate, make_registry, update_from_event

log = logging.getLogger("lockgate.controller.tell.notify")

KEEP_DONE_S = 7 * 86400.0       #: delivered / given-up outbox rows are pruned after this
T = TypeVar("T")


class Notifier:
    """Turns outcome events and trouble into outbox rows and delivers them (see the module docstring)."""

    def __init__(self, config: LockgateConfig):
        self.config = config
        self.sinks = {f"alert:{s.name}": s for s in self.config.alerts}
        self.registry = make_registry(self.config)
        self.registry_retry: RetryPolicy = self.config.registry.retry
        self.generator_url = f"http://{self.config.controller.http}/v1/rollouts?model={{model}}"
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="notify-db")
        self.outbox: Outbox | None = None
        self.log_store: RolloutStore | None = None
        self._wake = asyncio.Event()
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    # ----- the database thread -----
    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the notifier's one database thread (the outbox is not thread-safe)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self) -> None:
        """Open the outbox and the deployment log (idempotent); ``run`` and ``on_event`` open on first use."""
        await self.db(self._open)

    def _open(self) -> None:
        if self.outbox is not None:
            return
        self.outbox = Outbox(self.config.store("notify.db"))
        self.log_store = RolloutStore(self.config.store("rollouts.db"))
        self.outbox.prune(time.time() - KEEP_DONE_S)

    def _close(self) -> None:
        if self.outbox is not None:
            self.outbox.close()
        if self.log_store is not None:
            self.log_store.close()

    def _weight_at(self, rollout_id: int | None) -> int | None:
        """The canary weight in force just before the latest outcome (last started/advanced/promoted event)."""
        if rollout_id is None or self.log_store is None:
            return None
        for e in reversed(self.log_store.events(rollout_id)):
            if e["kind"] in ("started", "advanced", "promoted") and e["weight_bp"] is not None:
                return int(e["weight_bp"])
        return None

    def _log_event(self, rollout_id: int | None, kind: str, detail: dict) -> None:
        if rollout_id is None or self.log_store is None:
            return
        try:
            self.log_store.event(int(rollout_id), kind, "notifier", detail)
        except sqlite3.Error:
            log.exception("cannot record %s event for rollout #%s", kind, rollout_id)

    def _enqueue_event(self, event: dict) -> int:
        assert self.outbox is not None
        kind = event.get("kind", "")
        rid = (event.get("rollout") or {}).get("id")
        n = 0
        alert = alert_from_event(event, self._weight_at(rid))
        trouble = rollback_push_trouble(alert)
        for channel, sink in self.sinks.items():
            if kind in sink.on:
                self.outbox.add(channel, kind, rid, alert.to_dict())
                n += 1
            if trouble is not None and "trouble" in sink.on:
                self.outbox.add(channel, "trouble", rid, trouble.to_dict())
                n += 1
        update = update_from_event(event)
        if update is not None:
            self.outbox.add("registry", update.status, rid, update.to_dict())
            n += 1
        return n

    def enqueue_alert(self, alert: Alert) -> int:
        """Queue ``alert`` for every sink subscribed to its kind (database thread)."""
        assert self.outbox is not None
        n = 0
        for channel, sink in self.sinks.items():
            if alert.kind in sink.on:
                self.outbox.add(channel, alert.kind, alert.rollout_id, alert.to_dict())
                n += 1
        return n

    # ----- the event sink -----
    async def on_event(self, event: OutcomeEvent) -> None:
        """:class:`~lockgate.controller.ports.EventSink` of the promotion loop (called as a background task):
        queue alerts and the registry update; never raises."""
        try:
            if self.outbox is None:
                await self.db(self._open)
            n = await self.db(self._enqueue_event, event)
        except Exception:
            log.exception("cannot queue notifications for %s", event.get("kind"))
            return
        if n:
            self._wake.set()

    async def raise_trouble(self, alert: Alert) -> None:
        """Queue a trouble (or resolved) alert for the sinks subscribed to ``trouble``, and log it."""
        if await self.db(self.enqueue_alert, alert):
            self._wake.set()
        (log.info if alert.status == "resolved" else log.warning)("trouble (%s): %s", alert.status, alert.title)

    # ----- delivery -----
    def _policy(self, channel: str) -> RetryPolicy:
        sink = self.sinks.get(channel)
        return sink.retry if sink is not None else self.registry_retry

    async def _attempt(self, item: Item) -> dict:
        if item.channel == "registry":
            update = RegistryUpdate.from_dict(item.payload)
            timeout = max(30.0, self.config.registry.timeout_s * 20)
            return await asyncio.wait_for(self.registry.report(update), timeout)
        sink = self.sinks.get(item.channel)
        if sink is None:
            raise DeliveryError(f"{item.channel} is no longer configured", retryable=False)
        return await send_alert(sink, Alert.from_dict(item.payload), self.generator_url)

    def _what(self, item: Item) -> dict:
        if item.channel == "registry":
            p = item.payload
            return {"registry": self.registry.describe(), "status": p.get("status"), "model": p.get("model"),
                    "version": p.get("version")}
        sink = self.sinks.get(item.channel)
        return {"sink": item.channel.partition(":")[2], "sink_type": sink.type if sink else "?",
                "alert": item.kind, "title": item.payload.get("title")}

    def _record(self, item: Item, outcome: str, attempts: int, now: float, detail: dict) -> None:
        assert self.outbox is not None
        kind = "registry" if item.channel == "registry" else "alert"
        info = {**self._what(item), "outcome": outcome, "attempts": attempts,
                "queued_s": round(now - item.created_at, 3), **detail}
        if outcome == "delivered":
            self.outbox.delivered(item.id, attempts, now)
        elif outcome == "retrying":
            self.outbox.retry(item.id, attempts, detail["next_at"], detail.get("error", ""))
        else:
            self.outbox.failed(item.id, attempts, now, detail.get("error", ""))
        if outcome != "retrying" or attempts == 1:
            self._log_event(item.rollout_id, kind, info)

    async def _deliver(self, item: Item) -> None:
        attempts = item.attempts + 1
        what = f"{item.channel} {item.kind} (outbox #{item.id}, try {attempts})"
        try:
            try:
                result = await self._attempt(item)
            except (DeliveryError, RegistryError) as exc:
                retryable, error = exc.retryable, str(exc)
            except asyncio.TimeoutError:
                retryable, error = True, "timed out"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in an adapter must not stop the others
                log.exception("%s failed", what)
                retryable, error = True, f"{type(exc).__name__}: {exc}"
            else:
                log.info("%s delivered", what)
                await self.db(self._record, item, "delivered", attempts, time.time(), {"result": result})
                return
            policy = self._policy(item.channel)
            now = time.time()
            if retryable and attempts < policy.max_attempts:
                delay = backoff_delay(attempts, policy)
                log.warning("%s failed: %s; retrying in %.1f s", what, error, delay)
                await self.db(self._record, item, "retrying", attempts, now,
                              {"error": error, "next_at": now + delay, "next_in_s": round(delay, 3)})
            else:
                why = "permanent error" if not retryable else f"{attempts} attempts"
                log.error("%s: giving up (%s): %s", what, why, error)
                await self.db(self._record, item, "gave_up", attempts, now, {"error": error, "why": why})
        finally:
            self._busy.discard(item.channel)
            self._wake.set()

    async def run(self, stop: asyncio.Event,
                  alongside: Sequence[Callable[[asyncio.Event], Awaitable[None]]] = ()) -> None:
        """Deliver due outbox rows until ``stop``, then close the outbox and the registry client.

        ``alongside`` (the trouble checks, which use this notifier's database thread) run from when the
        outbox is open until the delivery loop ends, and are cancelled before anything is closed."""
        if self.outbox is None:
            await self.db(self._open)
        monitors = [asyncio.ensure_future(fn(stop)) for fn in alongside]
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                self._wake.clear()
                busy = frozenset(self._busy)
                try:
                    due = await self.db(self.outbox.due, time.time(), busy)  # type: ignore[union-attr]
                except sqlite3.Error:
                    log.exception("notifier outbox unreadable; retrying")
                    due = []
                for item in due:
                    self._busy.add(item.channel)
                    task = asyncio.ensure_future(self._deliver(item))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                try:
                    nxt = await self.db(self.outbox.next_at, frozenset(self._busy))  # type: ignore[union-attr]
                except sqlite3.Error:
                    nxt = None
                wait = 1.0 if nxt is None else min(1.0, max(0.02, nxt - time.time()))
                waker = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({waker, stopper}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
        finally:
            stopper.cancel()
            for t in [*monitors, *self._tasks]:
                t.cancel()
            await asyncio.gather(*monitors, *self._tasks, return_exceptions=True)
            try:
                await self.registry.close()
            finally:
                await self.db(self._close)
                self._pool.shutdown(wait=False)


__all__ = ["KEEP_DONE_S", "Notifier"]
