"""Alerts and model-registry feedback, wired to the promotion loop (``install(promoter)``).

Nothing here is on the rollback path. The promoter calls its ``listeners`` as background tasks *after*
the weights moved and the record was written; :meth:`Notifier.on_event` only turns the event into
outbox rows (in the notifier's own database thread) and wakes the delivery loop.

* **Outbox** (``<state_dir>/notify.db``, SQLite): one row per (alert, sink) and per registry update.
  Rows are delivered in order per channel (``alert:<sink name>`` or ``registry``), retried with bounded
  exponential backoff (the sink's / registry's ``retry`` policy), and given up after ``max_attempts`` or at
  once on a permanent error (HTTP 4xx other than 408/425/429, unknown MLflow version…). A controller
  restart picks up undelivered rows where they were.
* **Deployment log**: outcomes are appended to the rollout's ``rollout_events`` as kind ``alert`` /
  ``registry`` (``delivered``; ``retrying`` on the first failure; ``gave_up``) — never the sink URL.
* **Component trouble** (:class:`TroubleMonitor`, every :data:`CHECK_INTERVAL_S`), what the controller
  process can see: weight pushes not ACKed by every Envoy (``push_incomplete`` events), failed preflight
  drills, a rollback/abort push not confirmed by every Envoy, observations dropped by ext_proc sources
  (their reported ``dropped_total`` grew), the control API (xDS server) unreachable, and Envoys that are
  disconnected from it or NACKed the routes. Conditions with a clear end (control API, Envoys) send a
  ``resolved`` alert when they clear.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from lockgate.config import RetryPolicy
from lockgate.controller.tell.alerts import (Alert, DeliveryError, alert_from_event, backoff_delay,
                                        rollback_push_trouble, send_alert, trouble_alert)
from lockgate.controller.tell.registry import RegistryError, RegistryUpdate, make_registry, update_from_event
from lockgate.controller.decide.rollouts import RolloutStore

log = logging.getLogger("lockgate.controller.tell.notify")

CHECK_INTERVAL_S = 5.0          #: trouble checks
COOLDOWN_S = 600.0              #: one-shot trouble of the same key at most this often
CONTROL_FAILURES = 2            #: consecutive failed control-API probes before alerting
REFIRE_S = 1800.0               #: a firing condition is re-sent this often while it lasts
KEEP_DONE_S = 7 * 86400.0       #: delivered / given-up outbox rows are pruned after this

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    kind TEXT NOT NULL,
    rollout_id INTEGER,
    payload_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT,
    done_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(state, channel, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Item:
    id: int
    channel: str
    kind: str
    rollout_id: int | None
    payload: dict
    created_at: float
    attempts: int
    next_at: float
    state: str = "pending"
    last_error: str | None = None


_ITEM_COLS = "id, channel, kind, rollout_id, payload_json, created_at, attempts, next_at, state, last_error"


def _item(r: tuple) -> Item:
    return Item(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8], r[9])


class Outbox:
    """The durable queue. Not thread-safe: the notifier uses it from its one database thread."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=10, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def add(self, channel: str, kind: str, rollout_id: int | None, payload: dict, now: float | None = None) -> int:
        now = time.time() if now is None else now
        cur = self.db.execute("INSERT INTO outbox(channel, kind, rollout_id, payload_json, created_at, next_at) "
                              "VALUES (?,?,?,?,?,?)", (channel, kind, rollout_id, json.dumps(payload, default=str),
                                                       now, now))
        return int(cur.lastrowid)

    def heads(self, busy: frozenset[str] = frozenset()) -> list[Item]:
        """The oldest pending row of every channel (delivery is in order per channel)."""
        rows = self.db.execute(f"SELECT {_ITEM_COLS} FROM outbox WHERE id IN (SELECT MIN(id) FROM outbox "
                               f"WHERE state='pending' GROUP BY channel) ORDER BY id").fetchall()
        return [i for i in map(_item, rows) if i.channel not in busy]

    def due(self, now: float, busy: frozenset[str] = frozenset()) -> list[Item]:
        return [i for i in self.heads(busy) if i.next_at <= now]

    def next_at(self, busy: frozenset[str] = frozenset()) -> float | None:
        heads = self.heads(busy)
        return min((i.next_at for i in heads), default=None)

    def delivered(self, item_id: int, attempts: int, now: float) -> None:
        self.db.execute("UPDATE outbox SET state='delivered', attempts=?, done_at=?, last_error=NULL WHERE id=?",
                        (attempts, now, item_id))

    def retry(self, item_id: int, attempts: int, next_at: float, error: str) -> None:
        self.db.execute("UPDATE outbox SET attempts=?, next_at=?, last_error=? WHERE id=?",
                        (attempts, next_at, error[:2000], item_id))

    def failed(self, item_id: int, attempts: int, now: float, error: str) -> None:
        self.db.execute("UPDATE outbox SET state='failed', attempts=?, done_at=?, last_error=? WHERE id=?",
                        (attempts, now, error[:2000], item_id))

    def items(self, state: str | None = None) -> list[Item]:
        q = f"SELECT {_ITEM_COLS} FROM outbox" + (" WHERE state=?" if state else "") + " ORDER BY id"
        return [_item(r) for r in self.db.execute(q, (state,) if state else ())]

    def prune(self, before: float) -> int:
        return self.db.execute("DELETE FROM outbox WHERE state!='pending' AND done_at < ?", (before,)).rowcount

    def meta_get(self, key: str, default: Any = None) -> Any:
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(r[0]) if r else default

    def meta_set(self, key: str, value: Any) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (key, json.dumps(value)))


class Notifier:
    """Turns outcome events and trouble into outbox rows and delivers them (see the module docstring)."""

    def __init__(self, promoter, check_interval_s: float = CHECK_INTERVAL_S):
        self.promoter = promoter
        self.config = promoter.config
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
        self.trouble = TroubleMonitor(self, check_interval_s)

    # ----- the database thread -----
    async def db(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _open(self) -> None:
        if self.outbox is not None:
            return
        state = self.config.state_dir
        self.outbox = Outbox(state / "notify.db")
        self.log_store = RolloutStore(state / "rollouts.db")
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

    # ----- the listener -----
    async def on_event(self, event: dict) -> None:
        """Promoter listener (a background task): queue alerts and the registry update; never raises."""
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

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver due outbox rows until ``stop``; runs the trouble monitor alongside."""
        if self.outbox is None:
            await self.db(self._open)
        monitor = asyncio.ensure_future(self.trouble.run(stop))
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
            monitor.cancel()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(monitor, *self._tasks, return_exceptions=True)
            try:
                await self.registry.close()
            finally:
                await self.db(self._close)
                self._pool.shutdown(wait=False)


class TroubleMonitor:
    """Component trouble the controller process can detect (see the module docstring)."""

    def __init__(self, notifier: Notifier, interval_s: float = CHECK_INTERVAL_S):
        self.n = notifier
        self.interval_s = interval_s
        self._last_fired: dict[str, float] = {}
        self._control_failures = 0
        self._control_down_since: float | None = None
        self._control_firing_sent: float | None = None
        self._envoy_problems: dict[str, str] = {}
        self._dropped_seen: dict[str, int] | None = None
        self._dropped_pending: dict[str, int] = {}

    def _cooled(self, key: str, now: float, cooldown: float = COOLDOWN_S) -> bool:
        last = self._last_fired.get(key)
        if last is not None and now - last < cooldown:
            return False
        self._last_fired[key] = now
        return True

    # ----- deployment-log events (push_incomplete, failed drills) -----
    def _new_log_events(self) -> list[dict]:
        """New push_incomplete / drill events since the last look (cursor kept in the outbox database)."""
        n = self.n
        assert n.outbox is not None and n.log_store is not None
        db = n.log_store._db
        cursor = n.outbox.meta_get("event_cursor")
        if cursor is None:
            row = db.execute("SELECT COALESCE(MAX(id), 0) FROM rollout_events").fetchone()
            n.outbox.meta_set("event_cursor", row[0])
            return []
        rows = db.execute("SELECT e.id, e.rollout_id, e.ts, e.kind, e.stage, e.detail_json, r.model, r.canary "
                          "FROM rollout_events e JOIN rollouts r ON r.id = e.rollout_id WHERE e.id > ? "
                          "AND e.kind IN ('push_incomplete', 'drill', 'revert_incomplete', 'weight_drift') ORDER BY e.id LIMIT 500", (cursor,)).fetchall()
        last = db.execute("SELECT COALESCE(MAX(id), 0) FROM rollout_events").fetchone()[0]
        n.outbox.meta_set("event_cursor", max(last, cursor))
        return [{"id": r[0], "rollout_id": r[1], "ts": r[2], "kind": r[3], "stage": r[4], "detail": json.loads(r[5]),
                 "model": r[6], "canary": r[7]} for r in rows]

    async def check_log_events(self) -> None:
        for e in await self.n.db(self._new_log_events):
            d = e["detail"]
            if e["kind"] == "drill" and d.get("all_acked", True):
                continue
            comp = {"push_incomplete": "push", "revert_incomplete": "revert",
                    "weight_drift": "weights"}.get(e["kind"], "drill")
            key = f"trouble:{comp}:{e['model']}:{e['rollout_id']}"
            if not self._cooled(key, time.time()):
                continue
            missing = ", ".join(d.get("not_acked") or []) or "some Envoys"
            severity = "warning"
            if comp == "weights":
                title = (f"{e['model']}: weight changed outside rollout #{e['rollout_id']} "
                         f"({e['canary']} at {d.get('live_bp', 0) / 100:g}% instead of {d.get('stage_bp', 0) / 100:g}%);"
                         f" rollout paused")
                lines = list(d.get("reasons") or []) + [
                    "Harm still rolls back while paused. `lockgate rollout resume` re-applies the stage weight; "
                    "`lockgate rollout abort` reverts to the baseline."]
            elif comp == "revert":
                severity = "critical"  # the canary may still be serving
                title = (f"{e['model']}: revert of {e['canary']} (rollout #{e['rollout_id']}) NOT complete: "
                         f"{d.get('message') or ('not ACKed by ' + missing)}")
                lines = [f"Wanted: {d.get('final', 'rolled_back')}, weight 0 on every Envoy, saved by the xDS server "
                         f"(saved: {'yes' if d.get('persisted') else 'no'}; attempt {d.get('attempt', '?')}).",
                         "The canary may still be serving. The rollout stays rolling_back and the controller "
                         "re-pushes weight 0 with back-off until every Envoy ACKs it; check the xDS server "
                         "(lockgate status, its disk) and those Envoys."]
            elif comp == "push":
                title = (f"{e['model']}: weight push to {d.get('wanted_bp', 0) / 100:g}% for {e['canary']} "
                         f"(rollout #{e['rollout_id']}) not ACKed by {missing}")
                lines = [f"xDS answer: {d.get('message') or 'timeout waiting for ACKs'}",
                         "The rollout stays where it was and the controller retries the push; "
                         "check those Envoys' xDS connection (lockgate status)."]
            else:
                title = (f"{e['model']}: preflight drill for {e['canary']} (rollout #{e['rollout_id']}) not ACKed "
                         f"by {missing}; rollout aborted before any traffic moved")
                slow = [f"{x['node_id']}: {'ACKed in %.0f ms' % x['ack_ms'] if x.get('acked') else 'no ACK'}"
                        for x in d.get("envoys") or []]
                lines = [f"Drill took {float(d.get('elapsed_ms') or 0):.0f} ms"] + slow
            await self.n.raise_trouble(trouble_alert(comp, title, lines, severity=severity, model=e["model"],
                                                     canary=e["canary"], rollout_id=e["rollout_id"], key=key,
                                                     ts=e["ts"]))

    # ----- observations dropped by ext_proc -----
    def _drop_state(self, seen: dict[str, int] | None = None) -> dict[str, int]:
        assert self.n.outbox is not None
        if seen is not None:
            self.n.outbox.meta_set("dropped_seen", seen)
            return seen
        return dict(self.n.outbox.meta_get("dropped_seen", {}))

    async def check_drops(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        sources = getattr(getattr(self.n.promoter.service, "metrics", None), "sources", None)
        if sources is None:
            return
        with sources._lock:
            current = dict(sources.dropped)
        if self._dropped_seen is None:
            self._dropped_seen = await self.n.db(self._drop_state)
        changed = False
        for source, total in current.items():
            before = self._dropped_seen.get(source, 0)
            if total > before:
                self._dropped_pending[source] = self._dropped_pending.get(source, 0) + (total - before)
                self._dropped_seen[source] = total
                changed = True
        if changed:
            await self.n.db(self._drop_state, dict(self._dropped_seen))
        for source, count in list(self._dropped_pending.items()):
            key = f"trouble:observations:{source}"
            if not self._cooled(key, now):
                continue
            del self._dropped_pending[source]
            active = self._active_text()
            await self.n.raise_trouble(trouble_alert(
                "observations", f"ext_proc {source} dropped {count:,} observations "
                                f"({current.get(source, 0):,} in all since it started)",
                ["Those requests are missing from the rollout evidence (its send queue was full, or the controller "
                 "was unreachable at its shutdown). Check the controller's reachability and capture.queue_size.",
                 *active], key=key, ts=now))

    def _active_text(self) -> list[str]:
        try:
            active = self.n.promoter.rollouts.active()
        except Exception:
            return []
        return [f"Active: rollout #{r.id} {r.model} {r.canary} ({r.status}, stage {r.stage + 1})" for r in active]

    # ----- the control API and the Envoys behind it -----
    async def check_control(self, control, now: float | None = None) -> None:
        now = time.time() if now is None else now
        addr = str(self.n.config.control)
        try:
            resp = await control.get_weights(deadline_s=2.0)
        except grpc.aio.AioRpcError as exc:
            self._control_failures += 1
            if self._control_down_since is None:
                self._control_down_since = now
            if self._control_failures >= CONTROL_FAILURES and (
                    self._control_firing_sent is None or now - self._control_firing_sent >= REFIRE_S):
                self._control_firing_sent = now
                down = now - self._control_down_since
                await self.n.raise_trouble(trouble_alert(
                    "control_api", f"control API (xDS server) {addr} unreachable for {down:.0f} s: "
                                   f"{exc.code().name}", [
                        f"{self._control_failures} consecutive probes failed ({exc.details() or 'no details'}).",
                        "While it is down no weight can move: a rollback the controller decides cannot be pushed "
                        "(Envoys keep the last routes they ACKed).", *self._active_text()],
                    severity="critical", key="trouble:control_api", ts=now))
            return
        if self._control_firing_sent is not None:
            down = now - (self._control_down_since or now)
            await self.n.raise_trouble(trouble_alert(
                "control_api", f"control API (xDS server) {addr} reachable again after {down:.0f} s",
                ["Weight pushes and rollbacks work again."], severity="critical", key="trouble:control_api",
                resolved=True, ts=now))
        self._control_failures = 0
        self._control_down_since = None
        self._control_firing_sent = None
        await self._check_envoys(resp, now)

    async def _check_envoys(self, resp, now: float) -> None:
        problems: dict[str, tuple[str, str]] = {}
        for m in resp.models:
            for e in m.envoys:
                what = None
                if not e.connected:
                    what = "disconnected from the xDS server"
                elif e.nack_version and e.nack_version == m.xds_version:
                    what = f"NACKed routes {e.nack_version}: {e.nack_error[:300]}"
                if what:
                    problems[e.node_id] = (what, m.model)
        for node, (what, model) in problems.items():
            if self._envoy_problems.get(node) != what:
                self._envoy_problems[node] = what
                await self.n.raise_trouble(trouble_alert(
                    "envoy", f"Envoy {node} {what}",
                    [f"Its weights for {model} and every other model stay as last ACKed until it is back."],
                    key=f"trouble:envoy:{node}", ts=now))
        for node in [n for n in self._envoy_problems if n not in problems]:
            del self._envoy_problems[node]
            await self.n.raise_trouble(trouble_alert("envoy", f"Envoy {node} back in sync with the xDS server",
                                                     key=f"trouble:envoy:{node}", resolved=True, ts=now))

    async def run(self, stop: asyncio.Event) -> None:
        from lockgate.control_client import for_process

        control = for_process(self.n.config, "controller (trouble checks)")
        try:
            while not stop.is_set():
                for check in (self.check_log_events, self.check_drops, lambda: self.check_control(control)):
                    try:
                        await check()
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("trouble check failed")
                try:
                    await asyncio.wait_for(stop.wait(), self.interval_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            await control.close()


def install(promoter) -> Notifier:
    """Subscribe alerts and registry feedback to ``promoter``'s outcome events and start delivering
    (until the controller's stop event). Called from ``promotion_task``."""
    notifier = Notifier(promoter)
    promoter.listeners.append(notifier.on_event)
    promoter.notifier = notifier
    stop = getattr(promoter.service, "stop_event", None) or asyncio.Event()
    task = asyncio.ensure_future(notifier.run(stop))
    promoter._background.add(task)
    task.add_done_callback(promoter._background.discard)
    return notifier


__all__ = ["Item", "Notifier", "Outbox", "TroubleMonitor", "install"]
