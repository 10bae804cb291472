"""The weight controller (desired weights → persisted → snapshot → ACK-tracked) and its gRPC API.

``WeightService`` is the only writer of weights. A change is validated, persisted in SQLite, turned
into a new routes snapshot, and then awaited: the call returns when every connected Envoy ACKed the
new routes version or the timeout passed, naming the Envoys that did not and the elapsed ms.
Changes to one fleet are serialised (one lock), so versions and ACKs are unambiguous.

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
import logging
import sqlite3
import time
from collections import OrderedDict

import grpc

from lockgate.config import LockgateConfig
from lockgate.grpc_auth import current_client
from lockgate.proto.v1 import control_pb2, control_pb2_grpc
from lockgate.xds.cache import NodeRegistry, SnapshotCache
from lockgate.routing import TOTAL_WEIGHT_BP, CanaryWeight
from lockgate.xds.resources import ROUTE_TYPE, build_resources
from lockgate.xds.store import WeightStore

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
        if w.canary is not None and w.canary not in model.versions and w.weight_bp:
            problems.append(f"model {model_name!r} has canary {w.canary!r} at {w.weight_bp / 100:g}% but "
                            f"{config.source} has no such version")
    if problems:
        raise StateMismatchError("; ".join(problems) + f" (state: {config.db_path}). Restore the config, "
                                 "or roll back with the previous config first.")


class WeightService:
    def __init__(self, config: LockgateConfig, store: WeightStore):
        self.config = config
        self.store = store
        persisted = store.load()
        validate_persisted(config, persisted)
        self.weights: dict[str, CanaryWeight] = {
            m.name: persisted.get(m.name, CanaryWeight(None, 0)) for m in config.models}
        for name, w in self.weights.items():
            if w.canary is not None and w.canary not in config.model(name).versions:
                self.weights[name] = CanaryWeight(None, 0)  # weight-0 canary removed from config
        version = store.last_version() + 1
        store.save_version(version)
        self.cache = SnapshotCache(build_resources(config, self.weights), version)
        self.registry = NodeRegistry()
        #: routes version → weights it carried (bounded), to report what each Envoy has live.
        self.routes_history: OrderedDict[int, dict[str, CanaryWeight]] = OrderedDict(
            {version: dict(self.weights)})
        self._lock = asyncio.Lock()
        #: Envoys seen before (also by an earlier run of this server) → (last ACK time, {model: (canary, bp)}).
        #: One that has not reconnected since still serves the routes it last ACKed (Envoy keeps its config).
        try:
            self.known_nodes = store.load_nodes()
        except sqlite3.Error:
            self.known_nodes = {}
        self.registry.ack_listeners.append(self._on_ack)
        #: model → (weight, previous, actor, reason, version) served but not yet saved (rollbacks only)
        self.unsaved: dict[str, tuple[CanaryWeight, CanaryWeight, str, str, int]] = {}
        self._saver: asyncio.Task | None = None

    def _on_ack(self, stream, type_url: str) -> None:
        """Record the weights an Envoy just ACKed (best effort: a failing disk never blocks an ACK)."""
        if type_url != ROUTE_TYPE or not stream.node_id:
            return
        acked = self.routes_history.get(stream.types[ROUTE_TYPE].acked_version)
        if acked is None:
            return
        weights = {m: (w.canary, w.weight_bp) for m, w in acked.items()}
        if self.known_nodes.get(stream.node_id, (0.0, None))[1] == weights:
            self.known_nodes[stream.node_id] = (time.time(), weights)
            return
        self.known_nodes[stream.node_id] = (time.time(), weights)
        try:
            self.store.save_node(stream.node_id, weights)
        except sqlite3.Error as exc:
            log.error("cannot record what %s ACKed: %s", stream.node_id, exc)

    def not_reconnected_holders(self, model_name: str) -> list[str]:
        """Envoys this server has not seen since it started whose last ACKed routes gave ``model_name`` a
        canary weight (forgotten after ``FORGET_NODE_AFTER_S`` without an ACK)."""
        seen = set(self.registry.latest_by_node())
        now = time.time()
        out = []
        for node_id, (ts, weights) in sorted(self.known_nodes.items()):
            canary, bp = weights.get(model_name, (None, 0))
            if node_id not in seen and bp > 0 and now - ts < FORGET_NODE_AFTER_S:
                out.append(f"{node_id} (not reconnected since the xDS server started; last ACKed {canary} at "
                           f"{bp / 100:g}%)")
        return out

    # ----- persistence of served-first rollbacks -----
    def _try_save_unsaved(self) -> bool:
        """Save every served-but-unsaved rollback; True when none is left."""
        for model_name, (w, prev, actor, reason, version) in list(self.unsaved.items()):
            if self.weights.get(model_name) != w:
                self.unsaved.pop(model_name, None)  # superseded by a later (saved) change
                continue
            try:
                self.store.save(model_name, w, prev, actor, reason, version)
            except sqlite3.Error as exc:
                log.error("%s: rollback still not saved (%s); retrying", model_name, exc)
                return False
            log.info("%s: rollback saved (version %d)", model_name, version)
            self.unsaved.pop(model_name, None)
        return True

    async def _save_until_done(self) -> None:
        while not self._try_save_unsaved():
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
                                       versions=list(model.versions),
                                       xds_version=str(snap.type_versions[ROUTE_TYPE]))
        for node_id, stream in sorted(self.registry.latest_by_node().items()):
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

    def _model(self, name: str):
        try:
            return self.config.model(name)
        except KeyError:
            known = ", ".join(m.name for m in self.config.models)
            raise WeightError(f"unknown model {name!r} (known: {known})", grpc.StatusCode.NOT_FOUND) from None

    # ----- writes -----
    async def set_weight(self, model_name: str, version: str, weight_bp: int, *, actor: str, reason: str,
                         timeout_s: float = DEFAULT_TIMEOUT_S, stage: str = "") -> control_pb2.SetWeightResponse:
        model = self._model(model_name)
        if version not in model.versions:
            raise WeightError(f"model {model_name!r} has no version {version!r} "
                              f"(versions: {', '.join(model.versions)})", grpc.StatusCode.NOT_FOUND)
        if version == model.stable:
            raise WeightError(f"{version!r} is the stable version of {model_name!r}; choose a canary version")
        if not 0 <= weight_bp <= TOTAL_WEIGHT_BP:
            raise WeightError(f"weight must be 0..{TOTAL_WEIGHT_BP} basis points (0-100 %), got {weight_bp}")
        async with self._lock:
            current = self.weights[model_name]
            if current.canary not in (None, version) and current.weight_bp > 0:
                raise WeightError(
                    f"model {model_name!r} already has canary {current.canary!r} at {current.weight_bp / 100:g}%; "
                    f"roll it back first", grpc.StatusCode.FAILED_PRECONDITION)
            return await self._apply(model_name, CanaryWeight(version, weight_bp, stage), actor, reason, timeout_s)

    async def rollback(self, model_name: str, *, actor: str, reason: str,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> control_pb2.SetWeightResponse:
        self._model(model_name)
        async with self._lock:
            current = self.weights[model_name]
            return await self._apply(model_name, CanaryWeight(current.canary, 0, current.stage), actor, reason,
                                     timeout_s)

    async def drill(self, model_name: str, *, actor: str, timeout_s: float = DEFAULT_TIMEOUT_S
                    ) -> control_pb2.SetWeightResponse:
        """Re-send identical routes under a new version and time the ACKs; no traffic moves."""
        self._model(model_name)
        async with self._lock:
            current = self.weights[model_name]
            return await self._apply(model_name, current, actor, "drill", timeout_s, force=True)

    async def _apply(self, model_name: str, new: CanaryWeight, actor: str, reason: str, timeout_s: float,
                     force: bool = False) -> control_pb2.SetWeightResponse:
        previous = self.weights[model_name]
        weights = dict(self.weights)
        weights[model_name] = new
        version = self.cache.snapshot.version + 1
        serve_first = new.weight_bp == 0 and not force  # a revert never waits on the disk
        persisted = True
        try:
            if force:
                self.store.save_version(version)
            elif serve_first:
                self.unsaved[model_name] = (new, previous, actor, reason, version)
            else:
                self.store.save(model_name, new, previous, actor, reason, version)  # durable before served
        except sqlite3.Error as exc:
            raise WeightError(f"cannot save the new weight in {self.config.db_path} ({exc}); nothing changed",
                              grpc.StatusCode.UNAVAILABLE) from None
        self.weights = weights
        self.routes_history[version] = dict(weights)
        while len(self.routes_history) > 256:
            self.routes_history.popitem(last=False)
        t0 = time.monotonic()
        pushed_at = time.time()
        snap = await self.cache.set(build_resources(self.config, weights), version,
                                    force_types=frozenset({ROUTE_TYPE}) if force else frozenset())
        routes_version = snap.type_versions[ROUTE_TYPE]
        if serve_first:
            persisted = self._try_save_unsaved()  # right after the routes were handed to the streams
            if not persisted:
                self._schedule_save()
        results = await self.registry.wait_for(ROUTE_TYPE, routes_version, timeout_s)
        elapsed_ms = (time.monotonic() - t0) * 1000
        state = self.model_state(model_name)
        not_acked = []
        for sid, outcome in results.items():
            stream = self.registry.streams.get(sid)
            node = stream.node_id if stream else str(sid)
            for env in state.envoys:
                if env.node_id == node and stream is not None and outcome == "acked":
                    env.ack_ms = max(0.0, (stream.types[ROUTE_TYPE].acked_at - t0) * 1000)
            if outcome != "acked":
                not_acked.append(f"{node} ({outcome})")
        if new.weight_bp == 0:
            # An Envoy that disconnected while holding a canary weight keeps serving it.
            for env in state.envoys:
                if not env.connected and env.acked_weight_bp > 0:
                    not_acked.append(f"{env.node_id} (disconnected, last ACKed {env.acked_canary} at "
                                     f"{env.acked_weight_bp / 100:g}%)")
            not_acked.extend(self.not_reconnected_holders(model_name))
        all_acked = bool(results) and not not_acked
        ack_times = [env.ack_ms for env in state.envoys if env.ack_ms]
        if all_acked and ack_times:
            elapsed_ms = max(ack_times)  # push → last ACK
        log.info("%s: %s %s → %s %.2f%% (%s) by %s; %d/%d Envoys ACKed in %.1f ms", model_name,
                 previous.canary, previous.weight_bp / 100, new.canary, new.weight_bp / 100, reason, actor,
                 len(results) - len(not_acked), len(results), elapsed_ms)
        return control_pb2.SetWeightResponse(
            model=state, all_acked=all_acked, elapsed_ms=elapsed_ms, previous_weight_bp=previous.weight_bp,
            pushed_at=pushed_at, not_acked=not_acked, persisted=persisted,
            message="; ".join(m for m in (
                "no Envoy connected" if not results else "",
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
        return await self._guard(context, self.service.set_weight(
            request.model, request.version, request.weight_bp, actor=actor,
            reason=reason, timeout_s=request.timeout_s or DEFAULT_TIMEOUT_S,
            stage=request.stage))

    async def Rollback(self, request, context):
        actor, reason = self._who(request, request.reason or "rollback")
        return await self._guard(context, self.service.rollback(
            request.model, actor=actor, reason=reason, timeout_s=request.timeout_s or DEFAULT_TIMEOUT_S))

    async def Drill(self, request, context):
        actor, _ = self._who(request, "drill")
        return await self._guard(context, self.service.drill(
            request.model, actor=actor, timeout_s=request.timeout_s or DEFAULT_TIMEOUT_S))
