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

Kernel module: imports only other kernel modules (auth, grpc_auth, proto).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from lockgate.auth import AuthConfig
from lockgate.grpc_auth import aio_channel, dial_target, own_token, sync_channel
from lockgate.proto.v1 import control_pb2, control_pb2_grpc

if TYPE_CHECKING:
    import grpc

    from lockgate.config import Address, LockgateConfig

__all__ = ["ControlClient", "AsyncControlClient", "for_process"]


class ControlClient:
    """Blocking client of the control API at ``address`` (a wildcard bind is dialled on loopback).

    Raises ``OSError`` at construction when the ``auth.tls`` files cannot be read."""

    def __init__(self, address: "Address | str", auth: AuthConfig | None = None, token: str | None = None,
                 options: Iterable[tuple[str, Any]] | None = None):
        self.address = dial_target(address)
        self._channel: grpc.Channel = sync_channel(self.address, auth or AuthConfig(), token, options)
        self.stub = control_pb2_grpc.WeightControlStub(self._channel)

    def get_weights(self, model: str = "", deadline_s: float = 5.0) -> control_pb2.GetWeightsResponse:
        """Desired and ACKed weights of ``model`` (every model when empty)."""
        return self.stub.GetWeights(control_pb2.GetWeightsRequest(model=model), timeout=deadline_s)

    def set_weight(self, model: str, version: str, weight_bp: int, *, actor: str, reason: str, stage: str = "",
                   timeout_s: float = 5.0, deadline_s: float | None = None) -> control_pb2.SetWeightResponse:
        """Canary ``version`` of ``model`` to ``weight_bp`` basis points (0..10000); waits ``timeout_s`` for ACKs."""
        return self.stub.SetWeight(control_pb2.SetWeightRequest(
            model=model, version=version, weight_bp=weight_bp, timeout_s=timeout_s, actor=actor, reason=reason,
            stage=stage), timeout=timeout_s + 5 if deadline_s is None else deadline_s)

    def rollback(self, model: str, *, actor: str, reason: str, timeout_s: float = 5.0,
                 deadline_s: float | None = None) -> control_pb2.RollbackResponse:
        """Canary weight of ``model`` to 0 on every Envoy; waits ``timeout_s`` for ACKs."""
        return self.stub.Rollback(control_pb2.RollbackRequest(model=model, timeout_s=timeout_s, actor=actor,
                                                              reason=reason),
                                  timeout=timeout_s + 5 if deadline_s is None else deadline_s)

    def drill(self, model: str, *, actor: str, timeout_s: float = 5.0,
              deadline_s: float | None = None) -> control_pb2.DrillResponse:
        """Re-push ``model``'s routes unchanged and time each Envoy's ACK (no traffic moves)."""
        return self.stub.Drill(control_pb2.DrillRequest(model=model, timeout_s=timeout_s, actor=actor),
                               timeout=timeout_s + 5 if deadline_s is None else deadline_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncControlClient:
    """``grpc.aio`` client of the control API at ``address``; create it on the loop that uses it.

    ``wait_for_ready`` (weight moves, rollbacks, drills) makes a call wait for a control API that is
    restarting instead of failing at once, within its deadline. Raises ``OSError`` at construction
    when the ``auth.tls`` files cannot be read."""

    def __init__(self, address: "Address | str", auth: AuthConfig | None = None, token: str | None = None,
                 options: Iterable[tuple[str, Any]] | None = None):
        self.address = dial_target(address)
        self._channel: grpc.aio.Channel = aio_channel(self.address, auth or AuthConfig(), token, options)
        self.stub = control_pb2_grpc.WeightControlStub(self._channel)

    async def get_weights(self, model: str = "", deadline_s: float = 5.0) -> control_pb2.GetWeightsResponse:
        """Desired and ACKed weights of ``model`` (every model when empty)."""
        return await self.stub.GetWeights(control_pb2.GetWeightsRequest(model=model), timeout=deadline_s)

    async def set_weight(self, model: str, version: str, weight_bp: int, *, actor: str, reason: str,
                         stage: str = "", timeout_s: float = 5.0, deadline_s: float = 10.0,
                         wait_for_ready: bool = True) -> control_pb2.SetWeightResponse:
        """Canary ``version`` of ``model`` to ``weight_bp`` basis points (0..10000); waits ``timeout_s`` for ACKs."""
        return await self.stub.SetWeight(control_pb2.SetWeightRequest(
            model=model, version=version, weight_bp=weight_bp, timeout_s=timeout_s, actor=actor, reason=reason,
            stage=stage), timeout=deadline_s, wait_for_ready=wait_for_ready)

    async def rollback(self, model: str, *, actor: str, reason: str, timeout_s: float = 5.0,
                       deadline_s: float = 10.0, wait_for_ready: bool = True) -> control_pb2.RollbackResponse:
        """Canary weight of ``model`` to 0 on every Envoy; waits ``timeout_s`` for ACKs."""
        return await self.stub.Rollback(control_pb2.RollbackRequest(model=model, timeout_s=timeout_s, actor=actor,
                                                                    reason=reason),
                                        timeout=deadline_s, wait_for_ready=wait_for_ready)

    async def drill(self, model: str, *, actor: str, timeout_s: float = 5.0, deadline_s: float = 10.0,
                    wait_for_ready: bool = True) -> control_pb2.DrillResponse:
        """Re-push ``model``'s routes unchanged and time each Envoy's ACK (no traffic moves)."""
        return await self.stub.Drill(control_pb2.DrillRequest(model=model, timeout_s=timeout_s, actor=actor),
                                     timeout=deadline_s, wait_for_ready=wait_for_ready)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncControlClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def for_process(config: "LockgateConfig", who: str = "controller") -> AsyncControlClient:
    """The controller's client of ``config.control``, presenting the process's own token (raises
    :class:`lockgate.grpc_auth.NoTokenError` when ``auth.tokens`` is set and it has none)."""
    return AsyncControlClient(config.control, config.auth, own_token(config.auth, who))
