"""The weight controller (desired weights → persisted → snapshot → ACK-tracked) and its gRPC API.

Over ~500 lines: one state machine — weights, versions and ACKs, across every xDS server of the
store (:meth:`WeightService.run_sync`) — and its thin gRPC shell; split, each half would reach into
the other's state.

``WeightService`` is the only writer of weights. A change is validated, persisted (the weight store,
:mod:`lockgate.xds.store`: SQLite or PostgreSQL) under a version the store allocates, turned into a new
routes snapshot, and then awaited: the call returns when every connected Envoy ACKed the new routes
version or the timeout passed, naming the Envoys that did not and the elapsed ms. Changes through one
server are serialised (one lock), and the store's transaction serialises them across servers.

**Several servers, one store** (high availability): each server polls the store every ``POLL_S``
(one indexed read) and serves what another saved; each records what its Envoys ACKed and a heartbeat;
"every Envoy ACKed" counts the Envoys connected to any live server (an Envoy connected to another
server counts once that server recorded its ACK of the new routes with the model's new weight).
When a server dies its Envoys reconnect to another (their bootstrap lists every server); until then
they are disconnected holders of what they last ACKed, so a revert is not complete without them.

A **rollback** (weight 0) is the one change served *before* it is saved: a full or failing disk must
never keep a revert from Envoy. If the save fails the response says ``persisted: false`` and a
background task retries the save every second; until it succeeds the controller keeps the rollout
``rolling_back`` and re-issues the rollback (so a restart that reloads the old weight is reverted
again). A rollback is complete only when no Envoy the server knows of still holds a canary weight
for the model: connected ones must ACK the new routes, and one that disconnected while holding a
weight keeps serving it (Envoy keeps its last config) until it reconnects and ACKs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import math
import os
import socket
import sqlite3
import time
from collections import OrderedDict

import grpc

from lockgate.config import LockgateConfig
from lockgate.grpc_auth import current_client
from lockgate.proto.v1 import control_pb2, control_pb2_grpc
from lockgate.xds.cache import STRAGGLER_FACTOR, STRAGGLER_GRACE_S, NodeRegistry, SnapshotCache
from lockgate.routing import TOTAL_WEIGHT_BP, CanaryWeight, Cohort
from lockgate.xds.resources import ENDPOINT_TYPE, ROUTE_TYPE, build_resources, endpoint_address
from lockgate.xds.store import NodeRecord, WeightConflict, WeightStore

log = logging.getLogger("lockgate.xds.control")
DEFAULT_TIMEOUT_S = 5.0
#: an Envoy with no ACK for this long no longer keeps a revert incomplete (a decommissioned host)
FORGET_NODE_AFTER_S = 24 * 3600.0


class WeightError(Exception):
    """A weight request that cannot be applied (unknown model/version, conflicting canary)."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        super().__init__(message)
        self.code = code


class StateMismatchError(Exception):
    """Persisted weights name a model or version the config no longer has."""


def validate_persisted(config: LockgateConfig, weights: dict[str, CanaryWeight]) -> None:
    """Refuse to serve persisted weights that the config cannot route (never guess live weights)."""
    problems = []
    for model_name, w in weights.items():
        try:
            model = config.model(model_name)
        except KeyError:
            if w.weight_bp:
                problems.append(f"model {model_name!r} has canary {w.canary} at {w.weight_bp / 100:g}% "
                                f"but is not in {config.source}")
            continue
        if w.canary is not None and w.canary not in model.versions and (w.weight_bp or w.cohorts):
            problems.append(f"model {model_name!r} has canary {w.canary!r} at {w.weight_bp / 100:g}%"
                            f"{' with cohorts' if w.cohorts else ''} but {config.source} has no such version")
    if problems:
        raise StateMismatchError("; ".join(problems) + f" (state: {config.db_path}). Restore the config, "
                                 "or roll back with the previous config first.")


#: how often an xDS server looks for changes made through another server of the same store (s) ...
POLL_S = 0.05
#: ... and while it waits for the ACKs of Envoys connected to another server
FAST_POLL_S = 0.01
#: each server's heartbeat in the store (s); a server whose heartbeat has not moved for
#: SERVER_DEAD_AFTER_S no longer vouches for its Envoys (they count as disconnected until they reconnect)
HEARTBEAT_S = 0.5
SERVER_DEAD_AFTER_S = 3.0


def _wall(monotonic_ts: float) -> float:
    return time.time() - (time.monotonic() - monotonic_ts)


class WeightService:
    """The weights of one fleet, served by this xDS server (and by any other server of the same store).

    ``server_id`` names this server in the store (default ``host:pid``); ``address`` is shown to the others.
    :meth:`run_sync` (a task of ``lockgate xds``) keeps it in step with the other servers."""

    def __init__(self, config: LockgateConfig, store: WeightStore, server_id: str | None = None, address: str = ""):
        self.config = config
        self.store = store
        self.server_id = server_id or f"{socket.gethostname()}:{os.getpid()}"
        self.address = address
        self.started_at = time.time()
        persisted = store.load()
        validate_persisted(config, persisted)
        self.weights: dict[str, CanaryWeight] = self._routable(persisted)
        version = store.next_version()
        #: the newest store version this server's weights include
        self.db_version = version
        self.db_forced = store.versions()[1]
        self.cache = SnapshotCache(build_resources(config, self.weights), version)
        self.registry = NodeRegistry()
        #: routes version → weights it carried (bounded), to report what each Envoy has live.
        self.routes_history: OrderedDict[int, dict[str, CanaryWeight]] = OrderedDict(
            {version: dict(self.weights)})
        self._lock = asyncio.Lock()
        #: every Envoy the store knows (also those of other servers, and of earlier runs of this one).
        #: One that is connected to no live server still serves the routes it last ACKed (Envoy keeps its config).
        try:
            self.records: dict[str, NodeRecord] = store.nodes()
        except sqlite3.Error:
            self.records = {}
        #: other servers of the store whose heartbeat moves, and (heartbeat, monotonic time it last moved)
        self.live_servers: set[str] = set()
        self._heartbeats: dict[str, tuple[float, float]] = {}
        self.registry.ack_listeners.append(self._on_ack)
        self.registry.node_listeners.append(self._on_node)
        self._dirty: dict[str, tuple] = {}  #: node id → its row, not yet written to the store
        self._flusher: asyncio.Task | None = None
        self._remote_waits = 0
        self._poke = asyncio.Event()
        #: model → (weight, previous, actor, reason, version) served but not yet saved (rollbacks only)
        self.unsaved: dict[str, tuple[CanaryWeight, CanaryWeight, str, str, int]] = {}
        self._saver: asyncio.Task | None = None
        #: every store call once serving starts runs here, one at a time and in order, off the event loop
        #: (a durable commit takes milliseconds; the streams keep sending and taking ACKs meanwhile)
        self._disk = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="xds-store")

    async def _db(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._disk, functools.partial(fn, *args, **kwargs))

    def _routable(self, stored: dict[str, CanaryWeight]) -> dict[str, CanaryWeight]:
        weights = {m.name: stored.get(m.name, CanaryWeight(None, 0)) for m in self.config.models}
        for name, w in weights.items():
            if w.canary is not None and w.canary not in self.config.model(name).versions:
                weights[name] = CanaryWeight(None, 0)  # weight-0 canary removed from config
        return weights

    # ----- what each Envoy holds: recorded in the store for every server to see
    def _on_ack(self, stream, type_url: str) -> None:
        if type_url == ROUTE_TYPE and stream.node_id:
            self._record(stream)

    def _on_node(self, stream) -> None:
        self._record(stream)

    def _record(self, stream) -> None:
        """Remember (and write, in the background) what this Envoy holds: a failing store never blocks an ACK."""
        rt = stream.types[ROUTE_TYPE]
        known = self.records.get(stream.node_id)
        acked = self.routes_history.get(rt.acked_version) if rt.acked_version is not None else None
        if acked is not None:
            weights = {m: (w.canary, w.weight_bp) for m, w in acked.items()}
            acked_at = _wall(rt.acked_at)
        else:  # not ACKed on this stream yet: it still holds what it last ACKed (anywhere)
            weights = known.weights if known else {}
            acked_at = known.acked_at if known else None
        routes_version = rt.acked_version if rt.acked_version is not None else None
        rec = NodeRecord(stream.node_id, self.server_id, stream.connected, routes_version, weights, acked_at,
                         rt.nack_version, rt.nack_error, time.time())
        if stream.connected or known is None or known.server == self.server_id:
            self.records[stream.node_id] = rec
        self._dirty[stream.node_id] = (stream.node_id, stream.connected, routes_version, weights, acked_at,
                                       rt.nack_version, rt.nack_error)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())

    async def flush(self) -> None:
        """Wait until what the Envoys hold is written (the node records queued so far)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        while self._dirty:
            rows, self._dirty = self._dirty, {}
            try:
                await self._db(self.store.save_nodes, self.server_id, list(rows.values()))
            except sqlite3.Error as exc:
                log.error("cannot record what %d Envoy(s) hold (%s); retrying", len(rows), exc)
                for node, row in rows.items():
                    self._dirty.setdefault(node, row)
                await asyncio.sleep(1.0)
            else:
                self._poke.set()

    def _remote_live(self, rec: NodeRecord | None) -> bool:
        """Whether ``rec`` is an Envoy connected to another server that is alive."""
        return rec is not None and rec.server != self.server_id and rec.connected and rec.server in self.live_servers

    def not_reconnected_holders(self, model_name: str) -> list[str]:
        """Envoys connected to no live xDS server (none since this one started, or their server died) whose
        last ACKed routes gave ``model_name`` a canary weight (forgotten after ``FORGET_NODE_AFTER_S``)."""
        local = self.registry.latest_by_node()
        now = time.time()
        out = []
        for node_id, rec in sorted(self.records.items()):
            if node_id in local or self._remote_live(rec):
                continue
            canary, bp = rec.weights.get(model_name, (None, 0))
            if bp > 0 and now - (rec.acked_at or rec.updated_at) < FORGET_NODE_AFTER_S:
                out.append(f"{node_id} (not connected to a live xDS server; last ACKed {canary} at "
                           f"{bp / 100:g}%)")
        return out

    # ----- keeping in step with the other servers of the store
    async def run_sync(self, stop: asyncio.Event) -> None:
        """Until ``stop``: heartbeat, pick up weights saved through other servers (re-serving them), and
        read what their Envoys hold (only with ``xds_servers``). Store errors are logged and retried; serving
        never stops."""
        next_beat = 0.0
        failing = False
        peers = len(self.config.xds_fleet()) > 1  # one xDS server (no xds_servers): no heartbeat to write
        while not stop.is_set():
            try:
                if peers and time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + HEARTBEAT_S
                    await self._db(self.store.heartbeat, self.server_id, self.address, self.started_at)
                    self._read_servers(await self._db(self.store.servers))
                await self.catch_up()
                if self.live_servers or self._remote_waits:
                    self.records = {**(await self._db(self.store.nodes)), **{n: r for n, r in self.records.items()
                                                             if n in self._dirty}}
                    await self.registry.notify()
                if failing:
                    log.info("weight store readable again")
                failing = False
            except sqlite3.Error as exc:
                (log.debug if failing else log.error)("weight store: %s (serving the last known weights)", exc)
                failing = True
            self._poke.clear()
            try:
                await asyncio.wait_for(self._poke.wait(), FAST_POLL_S if self._remote_waits else POLL_S)
            except asyncio.TimeoutError:
                pass
        with contextlib.suppress(sqlite3.Error):
            self._dirty.update({s.node_id: (s.node_id, False, None, {}, None, None, "")
                                for s in self.registry.connected()})
            await self._db(self.store.save_nodes, self.server_id, list(self._dirty.values()))
            await self._db(self.store.forget_server, self.server_id)
        self._disk.shutdown(wait=True)

    def _read_servers(self, servers: dict[str, tuple[str, float]]) -> None:
        now = time.monotonic()
        live = set()
        for server, (_address, beat) in servers.items():
            if server == self.server_id:
                continue
            seen = self._heartbeats.get(server)
            if seen is None:  # first sight: a heartbeat long past (on any sane clock) is a dead server's
                moved_at = now if time.time() - beat < SERVER_DEAD_AFTER_S + 30 else -math.inf
                self._heartbeats[server] = (beat, moved_at)
            elif beat != seen[0]:
                self._heartbeats[server] = (beat, now)
            if now - self._heartbeats[server][1] < SERVER_DEAD_AFTER_S:
                live.add(server)
        if live != self.live_servers:
            log.info("other xDS servers alive: %s", ", ".join(sorted(live)) or "none")
        self.live_servers = live

    async def catch_up(self) -> None:
        """Serve what other servers saved since this one last looked (cheap when nothing changed)."""
        version, forced = await self._db(self.store.versions)
        if version <= self.db_version:
            return
        async with self._lock:
            await self._reload()

    async def _reload(self) -> None:
        """Under the lock: the store's weights (rollbacks served but not yet saved stay served)."""
        version, forced = await self._db(self.store.versions)
        if version <= self.db_version:
            return
        stored = await self._db(self.store.load)
        try:
            validate_persisted(self.config, stored)
        except StateMismatchError as exc:  # another server runs another config: keep serving ours
            log.error("weights saved through another xDS server cannot be routed here: %s", exc)
            stored = {m: w for m, w in stored.items() if m in self.weights and (
                w.canary is None or w.canary in self.config.model(m).versions)}
            stored = {**self.weights, **stored}
        weights = self._routable(stored)
        for model_name, (w, *_rest) in self.unsaved.items():
            weights[model_name] = w
        force = forced > self.db_version
        self.db_version, self.db_forced = version, forced
        if weights == self.weights and not force:
            return
        await self._serve(weights, max(version, self.cache.snapshot.version + 1), force)
        log.info("weights changed through another xDS server: now at version %d", version)

    async def _serve(self, weights: dict[str, CanaryWeight], version: int, force: bool = False) -> int:
        """Hand ``weights`` to every stream under ``version``; returns the routes' version."""
        self.weights = weights
        self.routes_history[version] = dict(weights)
        while len(self.routes_history) > 256:
            self.routes_history.popitem(last=False)
        snap = await self.cache.set(build_resources(self.config, weights), version,
                                    force_types=frozenset({ROUTE_TYPE}) if force else frozenset())
        return snap.type_versions[ROUTE_TYPE]

    async def _wait_remote(self, model_name: str, want: CanaryWeight | None, version: int, timeout_s: float,
                           pushed_at: float) -> dict[str, tuple[str, float]]:
        """Wait until every Envoy connected to another live server ACKed routes ``version`` (and, for a
        weight change, the model's new weight): node → (outcome, ack ms). Same straggler rule as
        :meth:`NodeRegistry.wait_for`."""
        local = {s.node_id for s in self.registry.connected()}
        targets = [n for n, rec in self.records.items() if n not in local and self._remote_live(rec)]
        if not targets:
            return {}
        self._remote_waits += 1
        self._poke.set()
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        answered: dict[str, float] = {}

        def outcome(node: str) -> tuple[str, float] | None:
            rec = self.records.get(node)
            if not self._remote_live(rec):
                if node in {s.node_id for s in self.registry.connected()}:  # it moved to this server
                    return ("acked", 0.0) if self._local_acked(node, version) else None
                return "disconnected", 0.0
            assert rec is not None
            if rec.routes_version is not None and rec.routes_version >= version and (
                    want is None or rec.weights.get(model_name) == (want.canary, want.weight_bp)):
                return "acked", max(0.0, ((rec.acked_at or pushed_at) - pushed_at) * 1000)
            if rec.nack_version is not None and rec.nack_version >= version:
                return "nacked", 0.0
            return None

        try:
            while True:
                now = time.monotonic()
                results = {n: outcome(n) for n in targets}
                for n, r in results.items():
                    if r is not None:
                        answered.setdefault(n, now)
                pending = [n for n, r in results.items() if r is None]
                if not pending:
                    return results  # type: ignore[return-value]
                limit = deadline
                if answered and len(pending) < len(results):
                    slowest = max(answered.values()) - t0
                    limit = min(deadline, max(answered.values()) + max(STRAGGLER_GRACE_S, STRAGGLER_FACTOR * slowest))
                if now >= limit:
                    return {n: r or ("timeout", 0.0) for n, r in results.items()}
                async with self.registry._cond:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.registry._cond.wait(), limit - now)
        finally:
            self._remote_waits -= 1

    def _local_acked(self, node: str, version: int) -> bool:
        s = self.registry.latest_by_node().get(node)
        return bool(s and s.types[ROUTE_TYPE].acked_version is not None
                    and s.types[ROUTE_TYPE].acked_version >= version)

    # ----- persistence of served-first rollbacks -----
    async def _save_unsaved(self) -> bool:
        """Save every served-but-unsaved rollback; True when none is left. Under the lock (saves stay in order)."""
        for model_name, (w, prev, actor, reason, version) in list(self.unsaved.items()):
            if self.weights.get(model_name) != w:
                self.unsaved.pop(model_name, None)  # superseded by a later (saved) change
                continue
            try:
                saved, _previous, stored = await self._db(self.store.save, model_name, w, actor, reason,
                                                          at_least=version)
            except (sqlite3.Error, WeightConflict) as exc:
                log.error("%s: rollback still not saved (%s); retrying", model_name, exc)
                return False
            log.info("%s: rollback saved (version %d)", model_name, saved)
            self.unsaved.pop(model_name, None)
            if saved == version and saved == self.db_version + 1 and self._routable(stored) == {
                    **self.weights, **{m: u[0] for m, u in self.unsaved.items()}}:
                self.db_version = saved  # nothing else changed in between: no reload needed
        return True

    async def _save_until_done(self) -> None:
        while True:
            async with self._lock:
                if await self._save_unsaved():
                    return
            await asyncio.sleep(1.0)

    def _schedule_save(self) -> None:
        if self._saver is None or self._saver.done():
            self._saver = asyncio.ensure_future(self._save_until_done())

    # ----- reads -----
    def model_state(self, name: str) -> control_pb2.ModelWeights:
        model = self.config.model(name)
        w = self.weights[name]
        snap = self.cache.snapshot
        out = control_pb2.ModelWeights(model=name, stable=model.stable, canary=w.canary or "", weight_bp=w.weight_bp,
                                       stage=w.stage,
                                       cohorts=[control_pb2.Cohort(name=c.name, kind=c.kind, key=c.key, value=c.value)
                                                for c in w.cohorts],
                                       ejected=list(w.ejected), mirror_ppm=w.mirror_ppm,
                                       versions=list(model.versions),
                                       xds_version=str(snap.type_versions[ROUTE_TYPE]))
        local = self.registry.latest_by_node()
        remote = {n: r for n, r in self.records.items() if self._remote_live(r)}
        for node_id in sorted(set(local) | set(remote)):
            stream = local.get(node_id)
            if stream is None or (not stream.connected and node_id in remote):
                out.envoys.append(self._remote_state(name, remote[node_id], snap.type_versions[ROUTE_TYPE]))
                continue
            rt = stream.types[ROUTE_TYPE]
            state = control_pb2.EnvoyRouteState(node_id=node_id, connected=stream.connected)
            if rt.acked_version is not None:
                state.acked_version = str(rt.acked_version)
                live = self.routes_history.get(rt.acked_version, {}).get(name)
                if live is not None:
                    state.acked_weight_bp = live.weight_bp
                    state.acked_canary = live.canary or ""
            if rt.nack_version is not None:
                state.nack_version = str(rt.nack_version)
                state.nack_error = rt.nack_error
            state.acked = rt.acked_version == snap.type_versions[ROUTE_TYPE]
            out.envoys.append(state)
        return out

    @staticmethod
    def _remote_state(name: str, rec: NodeRecord, routes_version: int) -> control_pb2.EnvoyRouteState:
        """An Envoy connected to another xDS server of the store, as that server recorded it."""
        state = control_pb2.EnvoyRouteState(node_id=rec.node_id, connected=True)
        if rec.routes_version is not None:
            state.acked_version = str(rec.routes_version)
            canary, bp = rec.weights.get(name, (None, 0))
            state.acked_weight_bp = bp
            state.acked_canary = canary or ""
        if rec.nack_version is not None:
            state.nack_version = str(rec.nack_version)
            state.nack_error = rec.nack_error
        state.acked = rec.routes_version is not None and rec.routes_version >= routes_version
        return state

    def _model(self, name: str):
        try:
            return self.config.model(name)
        except KeyError:
            known = ", ".join(m.name for m in self.config.models)
            raise WeightError(f"unknown model {name!r} (known: {known})", grpc.StatusCode.NOT_FOUND) from None

    # ----- writes -----
    async def set_weight(self, model_name: str, version: str, weight_bp: int, *, actor: str, reason: str,
                         timeout_s: float = DEFAULT_TIMEOUT_S, stage: str = "",
                         cohorts: tuple[Cohort, ...] = (), mirror_ppm: int = 0) -> control_pb2.SetWeightResponse:
        model = self._model(model_name)
        if version not in model.versions:
            raise WeightError(f"model {model_name!r} has no version {version!r} "
                              f"(versions: {', '.join(model.versions)})", grpc.StatusCode.NOT_FOUND)
        if version == model.stable:
            raise WeightError(f"{version!r} is the stable version of {model_name!r}; choose a canary version")
        if not 0 <= weight_bp <= TOTAL_WEIGHT_BP:
            raise WeightError(f"weight must be 0..{TOTAL_WEIGHT_BP} basis points (0-100 %), got {weight_bp}")
        async with self._lock:
            await self._fresh()
            current = self.weights[model_name]
            if current.canary not in (None, version) and (current.weight_bp > 0 or current.cohorts):
                raise WeightError(
                    f"model {model_name!r} already has canary {current.canary!r} at {current.weight_bp / 100:g}%"
                    f"{' with cohorts' if current.cohorts else ''}; roll it back first",
                    grpc.StatusCode.FAILED_PRECONDITION)
            try:  # hosts ejected from this canary stay out while it stays the canary
                new = CanaryWeight(version, weight_bp, stage, tuple(cohorts), mirror_ppm=mirror_ppm,
                                   ejected=current.ejected if current.canary == version else ())
            except ValueError as exc:
                raise WeightError(str(exc)) from None
            return await self._apply(model_name, new, actor, reason, timeout_s)

    async def eject_host(self, model_name: str, version: str, endpoint: str, *, actor: str, reason: str,
                         restore: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> control_pb2.SetWeightResponse:
        """Take ``endpoint`` (``ip:port``) of the canary ``version`` out of rotation (its EDS without it), or
        put it back (``restore``); saved before it is served; answers once every connected Envoy ACKed the
        new endpoints. The last endpoint of a version is never taken out."""
        model = self._model(model_name)
        if version not in model.versions:
            raise WeightError(f"model {model_name!r} has no version {version!r}", grpc.StatusCode.NOT_FOUND)
        known = [endpoint_address(ep) for ep in model.versions[version].endpoints]
        if endpoint not in known:
            raise WeightError(f"version {version!r} of {model_name!r} has no endpoint {endpoint!r} "
                              f"(endpoints: {', '.join(known)})", grpc.StatusCode.NOT_FOUND)
        async with self._lock:
            await self._fresh()
            current = self.weights[model_name]
            if current.canary != version:
                raise WeightError(f"{version!r} is not the canary of {model_name!r} (canary: {current.canary!r}); "
                                  "only a canary's hosts are ejected", grpc.StatusCode.FAILED_PRECONDITION)
            out = tuple(e for e in current.ejected if e != endpoint) if restore else (
                current.ejected if endpoint in current.ejected else current.ejected + (endpoint,))
            if len(set(known) - set(out)) < 1:
                raise WeightError(f"{endpoint} is the last endpoint of {model_name} {version} in rotation; "
                                  "it is never ejected", grpc.StatusCode.FAILED_PRECONDITION)
            new = dataclasses.replace(current, ejected=out)
            return await self._apply(model_name, new, actor, reason, timeout_s, endpoints=True)

    async def rollback(self, model_name: str, *, actor: str, reason: str,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> control_pb2.SetWeightResponse:
        self._model(model_name)
        async with self._lock:
            await self._fresh()
            current = self.weights[model_name]
            return await self._apply(model_name, CanaryWeight(current.canary, 0, current.stage), actor, reason,
                                     timeout_s)

    async def drill(self, model_name: str, *, actor: str, timeout_s: float = DEFAULT_TIMEOUT_S
                    ) -> control_pb2.SetWeightResponse:
        """Re-send identical routes under a new version and time the ACKs; no traffic moves."""
        self._model(model_name)
        async with self._lock:
            await self._fresh()
            current = self.weights[model_name]
            return await self._apply(model_name, current, actor, "drill", timeout_s, force=True)

    def _floor(self) -> int:
        """The least version the next change may have (above everything served or seen in the store)."""
        return max(self.cache.snapshot.version, self.db_version) + 1

    async def _fresh(self) -> None:
        """Under the lock, before a change: what was saved through another server first."""
        try:
            await self._reload()
        except sqlite3.Error as exc:
            log.error("cannot read the weight store before a change (%s); using the last known weights", exc)

    async def _apply(self, model_name: str, new: CanaryWeight, actor: str, reason: str, timeout_s: float,
                     force: bool = False, endpoints: bool = False) -> control_pb2.SetWeightResponse:
        """``endpoints``: the change is in EDS (an ejection): wait for the endpoints' ACKs, not the routes'."""
        previous = self.weights[model_name]
        weights = dict(self.weights)
        weights[model_name] = new
        # a revert never waits on the disk (a shadow stage, weight 0 with a mirror, is no revert)
        serve_first = new.weight_bp == 0 and not new.mirror_ppm and not force
        persisted = True
        try:
            if force:
                version = await self._db(self.store.next_version, at_least=self._floor(), forced=True)
            elif serve_first:
                version = self._floor()  # provisional: the save allocates it (or a later one)
                self.unsaved[model_name] = (new, previous, actor, reason, version)
            else:  # durable before served
                version, _stored_previous, stored = await self._db(self.store.save, model_name, new, actor, reason,
                                                                   at_least=self._floor())
                weights = self._routable(stored)
                for other, (w, *_rest) in self.unsaved.items():
                    weights[other] = w
                weights[model_name] = new
        except WeightConflict as exc:
            raise WeightError(str(exc), grpc.StatusCode.FAILED_PRECONDITION) from None
        except sqlite3.Error as exc:
            raise WeightError(f"cannot save the new weight in {self.config.db_path} ({exc}); nothing changed",
                              grpc.StatusCode.UNAVAILABLE) from None
        if not serve_first:
            self.db_version = max(self.db_version, version)
        t0 = time.monotonic()
        pushed_at = time.time()
        routes_version = await self._serve(weights, version, force)
        if serve_first:
            persisted = await self._save_unsaved()  # the streams send the routes meanwhile
            if not persisted:
                self._schedule_save()
        ack_type = ENDPOINT_TYPE if endpoints else ROUTE_TYPE
        if endpoints:  # EDS ACKs are tracked on the server an Envoy is connected to only
            results = await self.registry.wait_for(ENDPOINT_TYPE, self.cache.snapshot.type_versions[ENDPOINT_TYPE],
                                                   timeout_s)
            local = {st.node_id for st in self.registry.connected()}
            remote = {n: ("not verified: its endpoint ACKs are not shared", 0.0) for n, rec in self.records.items()
                      if n not in local and self._remote_live(rec)}
        else:
            results, remote = await asyncio.gather(
                self.registry.wait_for(ROUTE_TYPE, routes_version, timeout_s),
                self._wait_remote(model_name, None if force else new, routes_version, timeout_s, pushed_at))
        elapsed_ms = (time.monotonic() - t0) * 1000
        state = self.model_state(model_name)
        not_acked = []
        for sid, outcome in results.items():
            stream = self.registry.streams.get(sid)
            node = stream.node_id if stream else str(sid)
            if node in remote:  # it moved to another server meanwhile: that one's answer counts
                continue
            for env in state.envoys:
                if env.node_id == node and stream is not None and outcome == "acked":
                    env.ack_ms = max(0.0, (stream.types[ack_type].acked_at - t0) * 1000)
            if outcome != "acked":
                not_acked.append(f"{node} ({outcome})")
        for node, (outcome, ack_ms) in sorted(remote.items()):
            for env in state.envoys:
                if env.node_id == node and outcome == "acked":
                    env.ack_ms = ack_ms
            if outcome != "acked":
                rec = self.records.get(node)
                not_acked.append(f"{node} ({outcome}, on xDS server {rec.server if rec else '?'})")
        if new.weight_bp == 0:
            # An Envoy that disconnected while holding a canary weight keeps serving it.
            for env in state.envoys:
                if not env.connected and env.acked_weight_bp > 0:
                    not_acked.append(f"{env.node_id} (disconnected, last ACKed {env.acked_canary} at "
                                     f"{env.acked_weight_bp / 100:g}%)")
            not_acked.extend(self.not_reconnected_holders(model_name))
        answered = len(results) + len(remote)
        all_acked = bool(answered) and not not_acked
        ack_times = [env.ack_ms for env in state.envoys if env.ack_ms]
        if all_acked and ack_times:
            elapsed_ms = max(ack_times)  # push → last ACK
        log.info("%s: %s %s → %s %.2f%% (%s) by %s; %d/%d Envoys ACKed in %.1f ms", model_name,
                 previous.canary, previous.weight_bp / 100, new.canary, new.weight_bp / 100, reason, actor,
                 answered - len(not_acked), answered, elapsed_ms)
        return control_pb2.SetWeightResponse(
            model=state, all_acked=all_acked, elapsed_ms=elapsed_ms, previous_weight_bp=previous.weight_bp,
            pushed_at=pushed_at, not_acked=not_acked, persisted=persisted,
            message="; ".join(m for m in (
                "no Envoy connected" if not answered else "",
                "" if persisted else f"served but not yet saved in {self.config.db_path} (retrying)") if m))


class ControlServer(control_pb2_grpc.WeightControlServicer):
    """gRPC shell around :class:`WeightService`.

    The actor recorded with a change is the authenticated client's name (``auth.tokens``, checked by
    :class:`lockgate.grpc_auth.AuthInterceptor` before any method runs); the request's ``actor`` field
    is then only a claim: kept in the reason when it differs, never recorded as the actor. Without
    ``auth.tokens`` (loopback only) the field is all there is.
    """

    def __init__(self, service: WeightService):
        self.service = service

    async def _guard(self, context, coro):
        try:
            return await coro
        except WeightError as exc:
            await context.abort(exc.code, str(exc))

    @staticmethod
    def _who(request, reason: str) -> tuple[str, str]:
        """(actor, reason) to record for a change request."""
        claimed = request.actor
        client = current_client()
        if client is None:
            return claimed or "unknown", reason
        if claimed and claimed != client:
            reason = f"{reason} (claimed actor: {claimed[:100]})"
        return client, reason

    async def GetWeights(self, request, context):
        names = [request.model] if request.model else [m.name for m in self.service.config.models]
        out = control_pb2.GetWeightsResponse()
        for name in names:
            try:
                self.service._model(name)
            except WeightError as exc:
                await context.abort(exc.code, str(exc))
            out.models.append(self.service.model_state(name))
        return out

    async def SetWeight(self, request, context):
        actor, reason = self._who(request, request.reason or "set-weight")
        try:
            cohorts = tuple(Cohort(c.name, c.kind, c.key, c.value) for c in request.cohorts)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return await self._guard(context, self.service.set_weight(
            request.model, request.version, request.weight_bp, actor=actor,
            reason=reason, timeout_s=request.timeout_s or DEFAULT_TIMEOUT_S,
            stage=request.stage, cohorts=cohorts, mirror_ppm=request.mirror_ppm))

    async def Rollback(self, request, context):
        actor, reason = self._who(request, request.reason or "rollback")
        return await self._guard(context, self.service.rollback(
            request.model, actor=actor, reason=reason, timeout_s=request.timeout_s or DEFAULT_TIMEOUT_S))

    async def EjectHost(self, request, context):
        actor, reason = self._who(request, request.reason or ("restore host" if request.restore else "eject host"))
        return await self._guard(context, self.service.eject_host(
            request.model, request.version, request.endpoint, actor=actor, reason=reason, restore=request.restore,
            timeout_s=request.timeout_s or DEFAULT_TIMEOUT_S))

    async def Drill(self, request, context):
        actor, _ = self._who(request, "drill")
        return await self._guard(context, self.service.drill(
            request.model, actor=actor, timeout_s=request.timeout_s or DEFAULT_TIMEOUT_S))
