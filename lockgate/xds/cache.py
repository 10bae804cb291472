"""Versioned snapshot of everything lockgate serves, plus what each Envoy stream has ACKed.

Like go-control-plane: the cache holds one versioned snapshot (all Envoys of a lockgate fleet get
the same config); ADS streams only read it and report ACK/NACK here. Versions are integers that
only grow (the last one is persisted, see :mod:`lockgate.xds.store`); each resource type carries
the version at which its content last changed, so a weight change re-sends routes only.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from google.protobuf.message import Message

from lockgate.xds.resources import TYPE_ORDER


@dataclass(frozen=True)
class Snapshot:
    version: int
    resources: dict[str, dict[str, Message]]
    type_versions: dict[str, int]
    created_at: float  #: epoch seconds


class SnapshotCache:
    """Holds the current snapshot; ``await changed(v)`` wakes when a snapshot newer than v exists."""

    def __init__(self, resources: dict[str, dict[str, Message]], version: int):
        self._snapshot = Snapshot(version, resources, {t: version for t in resources}, time.time())
        self._cond = asyncio.Condition()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def set(self, resources: dict[str, dict[str, Message]], version: int | None = None,
                  force_types: frozenset[str] = frozenset()) -> Snapshot:
        """Install new resources; types whose content changed (or in ``force_types``) get the new version."""
        old = self._snapshot
        new_version = version if version is not None else old.version + 1
        if new_version <= old.version:
            raise ValueError(f"snapshot version must grow: {new_version} <= {old.version}")
        type_versions = {}
        for type_url, named in resources.items():
            same = (type_url not in force_types and type_url in old.resources
                    and _fingerprint(old.resources[type_url]) == _fingerprint(named))
            type_versions[type_url] = old.type_versions[type_url] if same else new_version
        self._snapshot = Snapshot(new_version, resources, type_versions, time.time())
        async with self._cond:
            self._cond.notify_all()
        return self._snapshot

    async def changed(self, after_version: int) -> Snapshot:
        async with self._cond:
            await self._cond.wait_for(lambda: self._snapshot.version > after_version)
        return self._snapshot


def _fingerprint(named: dict[str, Message]) -> tuple[tuple[str, bytes], ...]:
    return tuple(sorted((name, msg.SerializeToString(deterministic=True)) for name, msg in named.items()))


@dataclass
class TypeState:
    """One resource type on one ADS stream."""

    subscribed: set[str] | None = None  #: names Envoy asked for (None: never asked for this type)
    sent_version: int | None = None
    sent_nonce: str = ""
    sent_at: float = 0.0                #: monotonic seconds of the last send
    acked_version: int | None = None
    acked_nonce: str = ""
    acked_at: float = 0.0               #: monotonic seconds
    nack_version: int | None = None
    nack_error: str = ""
    nack_at: float = 0.0


@dataclass
class StreamState:
    """One connected Envoy (one ADS stream)."""

    stream_id: int
    peer: str
    node_id: str = ""
    cluster: str = ""
    connected: bool = True
    connected_at: float = field(default_factory=time.time)
    types: dict[str, TypeState] = field(default_factory=lambda: {t: TypeState() for t in TYPE_ORDER})


#: Once every other stream answered a push, a straggler gets this long (s) at least ...
STRAGGLER_GRACE_S = 0.25
#: ... or this many times the slowest answer, whichever is longer, before it is reported as not ACKed.
STRAGGLER_FACTOR = 4.0


class NodeRegistry:
    """Every ADS stream's state; ``wait_for`` lets the control API await ACKs of a version."""

    def __init__(self) -> None:
        self.streams: dict[int, StreamState] = {}
        #: called with (stream, type_url) after every ACK (the weight service records who holds what)
        self.ack_listeners: list = []
        #: called with (stream,) when a stream names its node, NACKs, or closes
        self.node_listeners: list = []
        self._ids = itertools.count(1)
        self._cond = asyncio.Condition()

    def open(self, peer: str) -> StreamState:
        state = StreamState(next(self._ids), peer)
        self.streams[state.stream_id] = state
        return state

    def node_changed(self, state: StreamState) -> None:
        for listener in self.node_listeners:
            listener(state)

    async def close(self, state: StreamState) -> None:
        state.connected = False
        if state.node_id:
            self.node_changed(state)
        # Keep the last disconnected stream of a node for reporting; drop older duplicates.
        for sid, other in list(self.streams.items()):
            if sid != state.stream_id and not other.connected and other.node_id == state.node_id:
                del self.streams[sid]
        await self.notify()

    async def notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    def connected(self) -> list[StreamState]:
        return [s for s in self.streams.values() if s.connected and s.node_id]

    def latest_by_node(self) -> dict[str, StreamState]:
        """One stream per node id: the connected one if any, else the most recent."""
        out: dict[str, StreamState] = {}
        for s in sorted(self.streams.values(), key=lambda s: (s.connected, s.stream_id)):
            if s.node_id:
                out[s.node_id] = s
        return out

    async def wait_for(self, type_url: str, version: int, timeout_s: float) -> dict[int, str]:
        """Wait until every connected stream subscribed to ``type_url`` ACKed ≥ ``version``.

        Returns stream id → ``"acked"`` / ``"nacked"`` / ``"timeout"`` / ``"disconnected"`` for the
        streams that were connected when called.

        One unresponsive stream (a stalled Envoy, or a client that never ACKs) must not hold the
        call for the others: once every other stream has answered, the stragglers get a grace of
        ``max(STRAGGLER_GRACE_S, STRAGGLER_FACTOR x`` the slowest answer so far``)`` and are then
        reported as ``"timeout"``. With one stream only (or none answering) the full ``timeout_s``
        applies.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        targets = [s for s in self.connected() if s.types[type_url].subscribed is not None]
        answered_at: dict[int, float] = {}

        def outcome(s: StreamState) -> str | None:
            ts = s.types[type_url]
            if ts.acked_version is not None and ts.acked_version >= version:
                return "acked"
            if ts.nack_version is not None and ts.nack_version >= version:
                return "nacked"
            if not s.connected:
                return "disconnected"
            return None

        async with self._cond:
            while True:
                now = time.monotonic()
                results = {s.stream_id: outcome(s) for s in targets}
                for sid, r in results.items():
                    if r is not None:
                        answered_at.setdefault(sid, now)
                pending = [sid for sid, r in results.items() if r is None]
                if not pending:
                    return results  # type: ignore[return-value]
                limit = deadline
                if answered_at and len(pending) < len(results):
                    slowest = max(answered_at.values()) - t0
                    limit = min(deadline, max(answered_at.values())
                                + max(STRAGGLER_GRACE_S, STRAGGLER_FACTOR * slowest))
                remaining = limit - now
                if remaining <= 0:
                    return {sid: r or "timeout" for sid, r in results.items()}
                try:
                    await asyncio.wait_for(self._cond.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
