"""The one client of the weight control API (the xDS server's ``WeightControl`` gRPC service).

Two flavours over the same channels (:func:`lockgate.grpc_auth.sync_channel` / :func:`aio_channel`,
so TLS per ``auth.tls`` and the bearer token on every call):

* :class:`ControlClient` — blocking, for the CLI (``lockgate weights|set-weight|rollback|drill``) and
  for code running on worker threads.
* :class:`AsyncControlClient` — ``grpc.aio``, for the controller's event loop (promotion loop,
  trouble checks, anything that needs the live weights).

Both expose the four RPCs as methods taking plain arguments and returning the protobuf response;
gRPC errors are raised unchanged (``grpc.RpcError`` / ``grpc.aio.AioRpcError``) so callers decide
what an unreachable control API means for them. ``timeout_s`` is what the xDS server waits for
Envoy ACKs; ``deadline_s`` is the RPC's own deadline (seconds, both).

:func:`for_process` builds the controller's client: the token is the process's own
(``auth.token_file`` / ``$LOCKGATE_TOKEN``, :func:`lockgate.grpc_auth.own_token`).

**Several xDS servers** (``xds_servers``, high availability): a client given several addresses calls
the one that answered last and, when it is unreachable (``UNAVAILABLE``), the next; every call is
safe to repeat on another server (they share one weight store: setting the same weight twice moves
nobody). A single address behaves as before (the async client waits for a restarting server within
the deadline).

Kernel module: imports only other kernel modules (auth, grpc_auth, proto).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import grpc as _grpc

from lockgate.auth import AuthConfig
from lockgate.grpc_auth import aio_channel, dial_target, own_token, sync_channel
from lockgate.proto.v1 import control_pb2, control_pb2_grpc

if TYPE_CHECKING:
    import grpc

    from lockgate.config import Address, LockgateConfig

__all__ = ["ControlClient", "AsyncControlClient", "for_process"]


def _addresses(address: "Address | str | Sequence[Address | str]") -> list[str]:
    items = [address] if isinstance(address, str) or not isinstance(address, (list, tuple)) else list(address)
    if not items:
        raise ValueError("no control API address")
    return [dial_target(a) for a in items]


def cohort_messages(cohorts: Sequence[Any]) -> list[control_pb2.Cohort]:
    """Cohorts (anything with ``name``, ``kind``, ``key``, ``value``: :class:`lockgate.routing.Cohort`) as
    the control API's messages."""
    return [control_pb2.Cohort(name=c.name, kind=c.kind, key=c.key, value=c.value) for c in cohorts]


class _Servers:
    """The control APIs a client may call: one channel and stub per address, and which one answered last."""

    def __init__(self, address: "Address | str | Sequence[Address | str]", channel: Any, auth: AuthConfig | None,
                 token: str | None, options: Iterable[tuple[str, Any]] | None):
        self.addresses = _addresses(address)
        self._channels = [channel(a, auth or AuthConfig(), token, options) for a in self.addresses]
        self._stubs = [control_pb2_grpc.WeightControlStub(c) for c in self._channels]
        self._current = 0

    @property
    def address(self) -> str:
        """The address in use (the last one that answered)."""
        return self.addresses[self._current]

    @property
    def stub(self) -> control_pb2_grpc.WeightControlStub:
        return self._stubs[self._current]


class ControlClient(_Servers):
    """Blocking client of the control API at ``address`` (a wildcard bind is dialled on loopback), or at
    the first reachable of several addresses (see the module docstring).

    Raises ``OSError`` at construction when the ``auth.tls`` files cannot be read."""

    def __init__(self, address: "Address | str | Sequence[Address | str]", auth: AuthConfig | None = None,
                 token: str | None = None, options: Iterable[tuple[str, Any]] | None = None):
        super().__init__(address, sync_channel, auth, token, options)

    def _call(self, method: str, request, timeout: float):
        for i in range(len(self._stubs)):
            k = (self._current + i) % len(self._stubs)
            try:
                out = getattr(self._stubs[k], method)(request, timeout=timeout)
            except _grpc.RpcError as exc:
                if exc.code() != _grpc.StatusCode.UNAVAILABLE or i == len(self._stubs) - 1:
                    raise
                continue
            self._current = k
            return out
        raise AssertionError("unreachable")

    def get_weights(self, model: str = "", deadline_s: float = 5.0) -> control_pb2.GetWeightsResponse:
        """Desired and ACKed weights of ``model`` (every model when empty)."""
        return self._call("GetWeights", control_pb2.GetWeightsRequest(model=model), deadline_s)

    def set_weight(self, model: str, version: str, weight_bp: int, *, actor: str, reason: str, stage: str = "",
                   timeout_s: float = 5.0, deadline_s: float | None = None,
                   cohorts: Sequence[Any] = (), mirror_ppm: int = 0) -> control_pb2.SetWeightResponse:
        """Canary ``version`` of ``model`` to ``weight_bp`` basis points (0..10000); waits ``timeout_s`` for ACKs.
        ``cohorts`` (:class:`lockgate.routing.Cohort`) go to the canary whatever the weight; ``mirror_ppm``
        of the split's requests are mirrored to the canary (the shadow stage)."""
        return self._call("SetWeight", control_pb2.SetWeightRequest(
            model=model, version=version, weight_bp=weight_bp, timeout_s=timeout_s, actor=actor, reason=reason,
            stage=stage, cohorts=cohort_messages(cohorts), mirror_ppm=mirror_ppm), timeout_s + 5 if deadline_s is None else deadline_s)

    def rollback(self, model: str, *, actor: str, reason: str, timeout_s: float = 5.0,
                 deadline_s: float | None = None) -> control_pb2.RollbackResponse:
        """Canary weight of ``model`` to 0 on every Envoy; waits ``timeout_s`` for ACKs."""
        return self._call("Rollback", control_pb2.RollbackRequest(model=model, timeout_s=timeout_s, actor=actor,
                                                                  reason=reason),
                          timeout_s + 5 if deadline_s is None else deadline_s)

    def eject_host(self, model: str, version: str, endpoint: str, *, actor: str, reason: str, restore: bool = False,
                   timeout_s: float = 5.0, deadline_s: float | None = None) -> control_pb2.SetWeightResponse:
        """Take ``endpoint`` (``ip:port``) of the canary ``version`` out of rotation (or back: ``restore``)."""
        return self._call("EjectHost", control_pb2.EjectHostRequest(
            model=model, version=version, endpoint=endpoint, timeout_s=timeout_s, actor=actor, reason=reason,
            restore=restore), timeout_s + 5 if deadline_s is None else deadline_s)

    def drill(self, model: str, *, actor: str, timeout_s: float = 5.0,
              deadline_s: float | None = None) -> control_pb2.DrillResponse:
        """Re-push ``model``'s routes unchanged and time each Envoy's ACK (no traffic moves)."""
        return self._call("Drill", control_pb2.DrillRequest(model=model, timeout_s=timeout_s, actor=actor),
                          timeout_s + 5 if deadline_s is None else deadline_s)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncControlClient(_Servers):
    """``grpc.aio`` client of the control API at ``address`` (or at the first reachable of several, see the
    module docstring); create it on the loop that uses it.

    ``wait_for_ready`` (weight moves, rollbacks, drills) makes a call wait for a control API that is
    restarting instead of failing at once, within its deadline; with several addresses the call moves
    on to the next server instead, going round them until the deadline. Raises ``OSError`` at
    construction when the ``auth.tls`` files cannot be read."""

    #: between rounds over every address, all unreachable (s)
    ROUND_PAUSE_S = 0.1

    def __init__(self, address: "Address | str | Sequence[Address | str]", auth: AuthConfig | None = None,
                 token: str | None = None, options: Iterable[tuple[str, Any]] | None = None):
        super().__init__(address, aio_channel, auth, token, options)

    async def _call(self, method: str, request, timeout: float, wait_for_ready: bool | None = None):
        if len(self._stubs) == 1:
            return await getattr(self._stubs[0], method)(request, timeout=timeout, wait_for_ready=wait_for_ready)
        deadline = time.monotonic() + timeout
        last: _grpc.aio.AioRpcError | None = None
        while True:
            for i in range(len(self._stubs)):
                k = (self._current + i) % len(self._stubs)
                left = deadline - time.monotonic()
                try:
                    out = await getattr(self._stubs[k], method)(request, timeout=max(0.001, left),
                                                                  wait_for_ready=False)
                except _grpc.aio.AioRpcError as exc:
                    if exc.code() != _grpc.StatusCode.UNAVAILABLE or deadline - time.monotonic() <= 0:
                        raise
                    last = exc
                    continue
                self._current = k
                return out
            if not wait_for_ready or deadline - time.monotonic() <= self.ROUND_PAUSE_S:
                assert last is not None
                raise last  # every server unreachable: the last one's error
            await asyncio.sleep(self.ROUND_PAUSE_S)

    async def get_weights(self, model: str = "", deadline_s: float = 5.0) -> control_pb2.GetWeightsResponse:
        """Desired and ACKed weights of ``model`` (every model when empty)."""
        return await self._call("GetWeights", control_pb2.GetWeightsRequest(model=model), deadline_s)

    async def set_weight(self, model: str, version: str, weight_bp: int, *, actor: str, reason: str,
                         stage: str = "", timeout_s: float = 5.0, deadline_s: float = 10.0,
                         wait_for_ready: bool = True, cohorts: Sequence[Any] = (),
                         mirror_ppm: int = 0) -> control_pb2.SetWeightResponse:
        """Canary ``version`` of ``model`` to ``weight_bp`` basis points (0..10000); waits ``timeout_s`` for ACKs.
        ``cohorts`` (:class:`lockgate.routing.Cohort`) go to the canary whatever the weight."""
        return await self._call("SetWeight", control_pb2.SetWeightRequest(
            model=model, version=version, weight_bp=weight_bp, timeout_s=timeout_s, actor=actor, reason=reason,
            stage=stage, cohorts=cohort_messages(cohorts), mirror_ppm=mirror_ppm), deadline_s, wait_for_ready)

    async def rollback(self, model: str, *, actor: str, reason: str, timeout_s: float = 5.0,
                       deadline_s: float = 10.0, wait_for_ready: bool = True) -> control_pb2.RollbackResponse:
        """Canary weight of ``model`` to 0 on every Envoy; waits ``timeout_s`` for ACKs."""
        return await self._call("Rollback", control_pb2.RollbackRequest(model=model, timeout_s=timeout_s,
                                                                         actor=actor, reason=reason),
                                deadline_s, wait_for_ready)

    async def eject_host(self, model: str, version: str, endpoint: str, *, actor: str, reason: str,
                         restore: bool = False, timeout_s: float = 5.0, deadline_s: float = 10.0,
                         wait_for_ready: bool = True) -> control_pb2.SetWeightResponse:
        """Take ``endpoint`` (``ip:port``) of the canary ``version`` out of rotation (or back: ``restore``)."""
        return await self._call("EjectHost", control_pb2.EjectHostRequest(
            model=model, version=version, endpoint=endpoint, timeout_s=timeout_s, actor=actor, reason=reason,
            restore=restore), deadline_s, wait_for_ready)

    async def drill(self, model: str, *, actor: str, timeout_s: float = 5.0, deadline_s: float = 10.0,
                    wait_for_ready: bool = True) -> control_pb2.DrillResponse:
        """Re-push ``model``'s routes unchanged and time each Envoy's ACK (no traffic moves)."""
        return await self._call("Drill", control_pb2.DrillRequest(model=model, timeout_s=timeout_s, actor=actor),
                                deadline_s, wait_for_ready)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> "AsyncControlClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def for_process(config: "LockgateConfig", who: str = "controller") -> AsyncControlClient:
    """The controller's client of every control API (``xds_servers``, else ``config.control``), presenting
    the process's own token (raises :class:`lockgate.grpc_auth.NoTokenError` when ``auth.tokens`` is set
    and it has none)."""
    return AsyncControlClient(config.control_addresses(), config.auth, own_token(config.auth, who))
