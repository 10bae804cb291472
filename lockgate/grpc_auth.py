"""Who may call lockgate's gRPC APIs, and over what: bearer tokens and optional (m)TLS.

One server interceptor (:class:`AuthInterceptor`) guards every gRPC API lockgate serves — the weight
control API, the observations API (controller) and ADS (Envoys) — when ``auth.tokens`` is set: a
call without ``authorization: Bearer <token>`` metadata matching a configured client is answered
``UNAUTHENTICATED`` before the servicer runs (an ADS stream gets no resource at all). The
authenticated client's *name* is available to the servicer as :func:`current_client`; the weight
control API records it as the actor, never the ``actor`` a caller writes into its request.

With ``auth.tls.cert``/``key`` the servers listen with TLS, and with ``auth.tls.client_ca`` they
require a client certificate signed by that CA (mTLS). lockgate's own clients (promoter and notifier
→ control API, ext_proc shipper → observations API, CLI → control API) get matching channels from
:func:`aio_channel` / :func:`sync_channel`: they send their token (``auth.token_file`` or
``$LOCKGATE_TOKEN``), trust ``tls.client_ca`` (or, without one, the self-signed ``tls.cert``) and
present ``tls.cert``/``key`` as their client certificate when the servers require one.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import sys
import time
from collections import namedtuple
from typing import TYPE_CHECKING, Any, Iterable

import grpc

from lockgate.auth import AuthConfig, TokenRegistry, bearer, is_loopback_host

if TYPE_CHECKING:
    from lockgate.config import Address, LockgateConfig

log = logging.getLogger("lockgate.auth")

__all__ = ["AuthInterceptor", "current_client", "server_interceptors", "add_port", "server_credentials",
           "channel_credentials", "aio_channel", "sync_channel", "own_token", "dial_target", "insecure_binds",
           "warn_if_insecure", "UNAUTHENTICATED_HINT", "NoTokenError"]

_CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("lockgate_grpc_client", default=None)

UNAUTHENTICATED_HINT = ("send gRPC metadata 'authorization: Bearer <token>' with a token whose sha256 is listed "
                        "in auth.tokens (the CLI reads $LOCKGATE_TOKEN or auth.token_file)")


def current_client() -> str | None:
    """Name of the client that authenticated the RPC being served (None when auth is off)."""
    return _CLIENT.get()


class NoTokenError(RuntimeError):
    """auth.tokens is set but this lockgate process has no token of its own to present."""


# ---------------------------------------------------------------------------------------------- server
class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC whose ``authorization`` metadata is not a configured client's bearer token.

    The check runs before the method's handler: a refused call never reaches the servicer (a refused
    request body is not even parsed), and the answer is ``UNAUTHENTICATED`` with a message saying
    what is missing. Accepted calls run with :func:`current_client` set to the client's name.
    """

    def __init__(self, registry: TokenRegistry, api: str):
        self.registry = registry
        self.api = api
        self.refused = 0
        self._last_log: dict[str, float] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        authorization = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode("latin-1")
                break
        name = self.registry.authenticate(authorization)
        if name is None:
            why = "no 'authorization' metadata" if authorization is None else "unknown or malformed bearer token"
            return self._deny(handler, handler_call_details.method, why)
        return _bind(handler, name)

    def _deny(self, handler, method: str, why: str):
        message = f"lockgate {self.api}: {why}; {UNAUTHENTICATED_HINT}"

        async def deny(_request, context):
            self.refused += 1
            peer = context.peer()
            now = time.monotonic()
            if now - self._last_log.get(peer, -1e9) > 10.0:  # a client retrying in a loop is logged every 10 s
                self._last_log[peer] = now
                if len(self._last_log) > 1024:
                    self._last_log.clear()
                log.warning("%s: refused %s from %s: %s", self.api, method, peer, why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # No request deserializer: a refused request body is never parsed.
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, None, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny, None, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, None, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(deny, None, handler.response_serializer)


def _wrap(behavior, name: str):
    if inspect.isasyncgenfunction(behavior):
        async def gen(request, context):
            _CLIENT.set(name)
            async for item in behavior(request, context):
                yield item
        return gen

    async def call(request, context):
        _CLIENT.set(name)
        return await behavior(request, context)
    return call


def _bind(handler, name: str):
    """The same handler, run with :func:`current_client` = ``name`` (each RPC runs in its own task)."""
    for kind, factory in (("unary_unary", grpc.unary_unary_rpc_method_handler),
                          ("unary_stream", grpc.unary_stream_rpc_method_handler),
                          ("stream_unary", grpc.stream_unary_rpc_method_handler),
                          ("stream_stream", grpc.stream_stream_rpc_method_handler)):
        behavior = getattr(handler, kind)
        if behavior is not None:
            return factory(_wrap(behavior, name), handler.request_deserializer, handler.response_serializer)
    return handler


def server_interceptors(auth: AuthConfig, api: str) -> list[grpc.aio.ServerInterceptor]:
    """``[AuthInterceptor]`` when ``auth.tokens`` is set, else ``[]``; pass to ``grpc.aio.server``."""
    return [AuthInterceptor(auth.registry(), api)] if auth.enabled else []


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(auth: AuthConfig) -> grpc.ServerCredentials | None:
    """TLS server credentials from ``auth.tls`` (client certificates required with ``client_ca``), or None."""
    if not auth.tls_cert or not auth.tls_key:
        return None
    ca = _read(auth.tls_client_ca) if auth.tls_client_ca else None
    return grpc.ssl_server_credentials([(_read(auth.tls_key), _read(auth.tls_cert))], root_certificates=ca,
                                       require_client_auth=ca is not None)


def add_port(server: grpc.aio.Server, address: str, auth: AuthConfig) -> int:
    """Listen on ``address``: with TLS (and mTLS) when ``auth.tls`` is configured, else plaintext."""
    creds = server_credentials(auth)
    if creds is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, creds)


# ---------------------------------------------------------------------------------------------- client
def own_token(auth: AuthConfig, who: str = "this process") -> str | None:
    """The token a lockgate process presents: None when auth is off; raises :class:`NoTokenError`
    when ``auth.tokens`` is set and neither ``auth.token_file`` nor ``$LOCKGATE_TOKEN`` gives one."""
    if not auth.enabled:
        return None
    try:
        token = auth.own_token()
    except OSError as exc:
        raise NoTokenError(f"{who}: cannot read auth.token_file {auth.token_file}: {exc.strerror or exc}") from None
    if not token:
        raise NoTokenError(f"{who}: auth.tokens is set, so lockgate's own processes need a token: set "
                           f"auth.token_file (or $LOCKGATE_TOKEN) to a token whose sha256 is in auth.tokens")
    return token


def channel_credentials(auth: AuthConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials matching :func:`server_credentials` (None when the servers are plaintext).

    Trusts ``tls.client_ca`` (one CA for the deployment) or, without one, ``tls.cert`` itself (a
    self-signed certificate); presents ``tls.cert``/``key`` as client certificate when mTLS is on."""
    if not auth.tls_cert or not auth.tls_key:
        return None
    root = _read(auth.tls_client_ca) if auth.tls_client_ca else _read(auth.tls_cert)
    if auth.tls_client_ca:
        return grpc.ssl_channel_credentials(root, _read(auth.tls_key), _read(auth.tls_cert))
    return grpc.ssl_channel_credentials(root)


def dial_target(address: "Address | str") -> str:
    """``host:port`` to connect to: a wildcard bind (0.0.0.0, ::) is reached on loopback."""
    text = str(address)
    host, _, port = text.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"{host}:{port}"


_SyncDetails = namedtuple("_SyncDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                           "compression"))


class _SyncCallDetails(_SyncDetails, grpc.ClientCallDetails):
    pass


def _with_token(metadata, header: str):
    items = [(k, v) for k, v in (metadata or ()) if k != "authorization"]
    items.append(("authorization", header))
    return items


class _SyncBearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self.header = bearer(token)

    def _details(self, d):
        return _SyncCallDetails(d.method, d.timeout, _with_token(d.metadata, self.header), d.credentials,
                                getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_unary_stream(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_stream_unary(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)

    def intercept_stream_stream(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)


class _AioBearer:
    def __init__(self, token: str):
        self.header = bearer(token)

    def _details(self, d):
        return d._replace(metadata=grpc.aio.Metadata(*_with_token(d.metadata, self.header)))


# grpc.aio sorts a channel's interceptors by type with an if/elif chain: one class per kind of call.
class _AioBearerUU(_AioBearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, d, request):
        return await continuation(self._details(d), request)


class _AioBearerUS(_AioBearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, d, request):
        return await continuation(self._details(d), request)


class _AioBearerSU(_AioBearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, d, request_iterator):
        return await continuation(self._details(d), request_iterator)


class _AioBearerSS(_AioBearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, d, request_iterator):
        return await continuation(self._details(d), request_iterator)


def aio_channel(address: "Address | str", auth: AuthConfig, token: str | None,
                options: Iterable[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to a lockgate API: TLS per ``auth.tls``, ``token`` sent on every call."""
    target = dial_target(address)
    creds = channel_credentials(auth)
    interceptors = [cls(token) for cls in (_AioBearerUU, _AioBearerUS, _AioBearerSU, _AioBearerSS)] \
        if token else None
    if creds is None:
        return grpc.aio.insecure_channel(target, options=list(options or ()), interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=list(options or ()), interceptors=interceptors)


def sync_channel(address: "Address | str", auth: AuthConfig, token: str | None,
                 options: Iterable[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A blocking channel to a lockgate API: TLS per ``auth.tls``, ``token`` sent on every call."""
    target = dial_target(address)
    creds = channel_credentials(auth)
    channel = (grpc.insecure_channel(target, options=list(options or ())) if creds is None
               else grpc.secure_channel(target, creds, options=list(options or ())))
    return grpc.intercept_channel(channel, _SyncBearer(token)) if token else channel


# ---------------------------------------------------------------------------------------------- binds
def insecure_binds(config: "LockgateConfig") -> list[tuple[str, str]]:
    """(field, address) of every address a lockgate process or Envoy's admin listens on off loopback
    (Envoy's traffic ``listener`` is meant to be reachable and is not listed)."""
    out = []
    cc = config.controller
    pairs = [("admin.address", config.admin), ("xds.address", config.xds), ("control.address", config.control),
             ("extproc.address", config.extproc), ("extproc_metrics.address", config.extproc_metrics),
             ("controller.address", cc.address), ("controller.http", cc.http)]
    if any(m.evaluation for m in config.models):
        pairs.append(("controller.sampler", cc.sampler))
    for label, addr in pairs:
        if not is_loopback_host(addr.host):
            out.append((label, str(addr)))
    return out


def warn_if_insecure(config: "LockgateConfig", process: str, out=None) -> list[str]:
    """Loud startup warning (log + stderr) when ``auth.insecure`` lets this fleet listen off loopback
    with nothing to authenticate callers. Returns the warning lines (empty when there is nothing to say)."""
    auth = config.auth
    exposed = insecure_binds(config)
    lines: list[str] = []
    if not exposed:
        return lines
    if not auth.enabled:
        lines.append(f"WARNING ({process}): auth.insecure is true and no auth.tokens are configured, yet "
                     + ", ".join(f"{label} {addr}" for label, addr in exposed)
                     + " listen off loopback: anyone who reaches them can call them (change weights, forge "
                       "observations, read the routes)")
    admin = [addr for label, addr in exposed if label == "admin.address"]
    if admin:
        lines.append(f"WARNING ({process}): Envoy's admin {admin[0]} is off loopback (auth.insecure): anyone "
                     "who reaches it can read /config_dump and stop Envoy")
    for line in lines:
        log.warning("%s", line)
        print(line, file=out or sys.stderr, flush=True)
    return lines
