"""Component trouble: what the controller process can see going wrong, raised as ``trouble`` alerts.

Checked every :data:`CHECK_INTERVAL_S` by :class:`TroubleMonitor`: weight pushes not ACKed by every
Envoy (``push_incomplete`` events), failed preflight drills, a revert not confirmed by every Envoy
(``revert_incomplete``), a weight changed outside a rollout (``weight_drift``), observations dropped by
ext_proc sources (their reported ``dropped_total`` grew), the control API (xDS server) unreachable, and
Envoys that are disconnected from it, NACKed the routes, or stay connected without ACKing the current
routes for :data:`OUT_OF_SYNC_S` (a stalled Envoy, or one cut off by a network partition the TCP
connection has not noticed: it keeps serving the weights it last ACKed). Conditions with a clear end
(control API, Envoys) send a ``resolved`` alert when they clear. One-shot trouble of the same key is sent at most
every :data:`COOLDOWN_S`; a firing control-API condition is re-sent every :data:`REFIRE_S`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from lockgate.controller.ports import ActiveRollouts, DropCounts, WeightReader
from lockgate.controller.tell.alerts import trouble_alert
from lockgate.controller.tell.notify import Notifier

log = logging.getLogger("lockgate.controller.tell.trouble")

CHECK_INTERVAL_S = 5.0          #: trouble checks
COOLDOWN_S = 600.0              #: one-shot trouble of the same key at most this often
CONTROL_FAILURES = 2            #: consecutive failed control-API probes before alerting
REFIRE_S = 1800.0               #: a firing condition is re-sent this often while it lasts
OUT_OF_SYNC_S = 10.0            #: a connected Envoy without an ACK of the current routes this long is trouble


#: deployment-log events that may raise a trouble alert
TROUBLE_EVENT_KINDS = ("push_incomplete", "drill", "revert_incomplete", "weight_drift")


class TroubleMonitor:
    """Component trouble the controller process can detect (see the module docstring).

    ``notifier`` queues the alerts and lends its database thread, outbox (cursors in its ``meta`` table)
    and deployment-log connection; ``weights`` is probed for the control API and the Envoys behind it;
    ``drops`` (None: not checked) gives the ext_proc sources' dropped totals; ``rollouts`` names the
    active rollouts in an alert's text. Run by :meth:`Notifier.run` (``alongside``)."""

    def __init__(self, notifier: Notifier, weights: WeightReader, drops: DropCounts | None,
                 rollouts: ActiveRollouts, interval_s: float = CHECK_INTERVAL_S):
        self.n = notifier
        self.weights = weights
        self.drops = drops
        self.rollouts = rollouts
        self.interval_s = interval_s
        self._last_fired: dict[str, float] = {}
        self._control_failures = 0
        self._control_down_since: float | None = None
        self._control_firing_sent: float | None = None
        self._envoy_problems: dict[str, str] = {}
        #: node → (routes version it has not ACKed, since when): connected Envoys out of sync, not yet alerted
        self._out_of_sync: dict[str, tuple[str, float]] = {}
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
        cursor = n.outbox.meta_get("event_cursor")
        if cursor is None:
            n.outbox.meta_set("event_cursor", n.log_store.last_event_id())
            return []
        events, nxt = n.log_store.events_after(int(cursor), TROUBLE_EVENT_KINDS)
        n.outbox.meta_set("event_cursor", nxt)
        return events

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
        if self.drops is None:
            return
        current = dict(self.drops.dropped_totals())
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
            active = self.rollouts.active()
        except Exception:
            return []
        return [f"Active: rollout #{r.id} {r.model} {r.canary} ({r.status}, stage {r.stage + 1})" for r in active]

    # ----- the control API and the Envoys behind it -----
    async def check_control(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        addr = str(self.n.config.control)
        try:
            resp = await self.weights.get_weights(deadline_s=2.0)
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
        behind: set[str] = set()
        for m in resp.models:
            for e in m.envoys:
                what = None
                if not e.connected:
                    what = "disconnected from the xDS server"
                elif e.nack_version and e.nack_version == m.xds_version:
                    what = f"NACKed routes {e.nack_version}: {e.nack_error[:300]}"
                elif not e.acked:
                    behind.add(e.node_id)
                    version, since = self._out_of_sync.get(e.node_id, ("", now))
                    if version != m.xds_version:
                        since = now  # a newer push restarts the clock
                    self._out_of_sync[e.node_id] = (m.xds_version, since)
                    if e.node_id in self._envoy_problems:
                        what = self._envoy_problems[e.node_id]  # in trouble until it is in sync again
                    elif now - since >= OUT_OF_SYNC_S:
                        live = (f"canary {e.acked_canary} at {e.acked_weight_bp / 100:g}%" if e.acked_canary
                                else "no canary") if e.acked_version else "no routes"
                        what = (f"connected but has not ACKed routes {m.xds_version} for {OUT_OF_SYNC_S:.0f} s or "
                                f"more (it ACKed {e.acked_version or 'nothing'}: {live} for {m.model}); stalled or "
                                f"cut off from the xDS server")
                if what and e.node_id not in problems:
                    problems[e.node_id] = (what, m.model)
        for node in [n for n in self._out_of_sync if n not in behind]:
            del self._out_of_sync[node]
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
        """Every check every ``interval_s`` until ``stop``; a failing check is logged and retried next time."""
        while not stop.is_set():
            for check in (self.check_log_events, self.check_drops, self.check_control):
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


__all__ = ["CHECK_INTERVAL_S", "COOLDOWN_S", "CONTROL_FAILURES", "OUT_OF_SYNC_S", "REFIRE_S", "TroubleMonitor"]
