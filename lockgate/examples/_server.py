"""What the example model servers share: a FastAPI app served by uvicorn (the stack of vLLM's OpenAI
server), OpenAI-style errors, SSE helpers, the per-request RNG and log, and the command-line flags.

Independent of lockgate (imports nothing from it). The contract every example server keeps:

* ``ready <port>`` on stdout once listening (``--port 0`` picks a free port);
* every response carries ``x-model-version: <version>``; errors are OpenAI-style JSON bodies
  (``{"error": {"message", "type", "param", "code"}}``): 400 bad request, 404 unknown path, 405 wrong
  method, 500 unhandled;
* keep-alive connections stay open until the client closes them (a proxy such as Envoy reuses them;
  a server that closes idle connections races the proxy's next request);
* a stream may end without its terminating chunk (:class:`AbortStream`), or with a TCP RST
  (``reset=True``), as a crashing model server would;
* ``--log-requests FILE``: one JSON line per request, written when the request arrives (not ``/healthz``
  nor ``/metrics`` unless ``--log-health``);
* ``GET /metrics``: vLLM-style Prometheus series (``vllm_metrics.py``), labelled with ``version``;
* SIGTERM/SIGINT: stop listening, give in-flight requests 1 s, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import logging
import math
import os
import random
import signal
import socket
import struct
import sys
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ALL_METHODS", "AbortStream", "HTTPError", "RequestLog", "RngSource", "SSE_DONE", "add_common_args",
           "error_response", "gzip_bytes", "json_response", "lognormal_ms", "new_app", "new_id",
           "parse_class_floats", "read_json", "run_server", "sse_event", "sse_response"]

#: a route that answers whatever the method (``/healthz``, ``/v1/models``)
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
#: seconds an idle kept-alive connection stays open (the proxy closes it first: Envoy's default is 1 h)
KEEP_ALIVE_S = 3600
#: seconds in-flight requests get after SIGTERM/SIGINT before they are cancelled
GRACEFUL_S = 1


# ----------------------------------------------------------------------------------- errors, bodies
class HTTPError(Exception):
    """Raise in a handler: answered as an OpenAI-style error with ``status``."""

    def __init__(self, status: int, message: str, err_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type


class AbortStream(Exception):
    """Raise inside an :func:`sse_response` iterator to close the connection mid-stream (no terminating
    chunk). ``reset=True`` resets it instead (TCP RST: ``SO_LINGER`` 0), as a crashing server would."""

    def __init__(self, reset: bool = False) -> None:
        super().__init__("stream aborted")
        self.reset = reset


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_response(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(_dumps(obj), status, headers=dict(headers or {}), media_type="application/json")


def error_response(status: int, message: str, err_type: str = "server_error", code: str | None = None) -> Response:
    """OpenAI-style JSON error body."""
    return json_response({"error": {"message": message, "type": err_type, "param": None,
                                    "code": code if code is not None else str(status)}}, status)


def sse_event(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_response(request: Request, events: AsyncIterator[bytes], status: int = 200) -> StreamingResponse:
    """A ``text/event-stream`` response, each item of ``events`` one HTTP chunk written as it is produced.
    An :class:`AbortStream` from ``events`` cuts the connection (``reset``: with a TCP RST)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in events:
                if chunk:
                    yield chunk
        except AbortStream as exc:
            if exc.reset:
                _reset_on_close(request)
            raise
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    return StreamingResponse(body(), status, headers={"content-type": "text/event-stream",
                                                      "cache-control": "no-cache"})


async def read_json(request: Request) -> Any:
    """The request body as JSON (an empty body is ``null``); HTTPError(400) if it is not JSON."""
    body = await request.body()
    try:
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"invalid JSON body: {e}", "invalid_request_error")


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=5, mtime=0)


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


# ----------------------------------------------------------------------------------- connections
#: open connections by peer address (the ASGI scope's ``client``) → transport, to reset a stream's socket
_TRANSPORTS: dict[tuple[str, int], asyncio.BaseTransport] = {}


def _tracked_protocol() -> type:
    """uvicorn's HTTP protocol (httptools if installed, else h11) remembering each connection's transport."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class TrackedProtocol(Base):  # type: ignore[misc, valid-type]
        _peer: tuple[str, int] | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # uvicorn writes a response's head and body separately: without TCP_NODELAY, Nagle's algorithm
            # holds the body until the client's delayed ACK (~40 ms per request on Linux). asyncio sets it
            # only on sockets whose proto is IPPROTO_TCP, which a socket bound by hand is not.
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and len(peer) >= 2:
                self._peer = (str(peer[0]), int(peer[1]))
                _TRANSPORTS[self._peer] = transport

        def connection_lost(self, exc: Exception | None) -> None:
            if self._peer is not None:
                _TRANSPORTS.pop(self._peer, None)
            super().connection_lost(exc)

    return TrackedProtocol


def _reset_on_close(request: Request) -> None:
    """Make the closing of this request's connection a TCP RST (``SO_LINGER`` on, 0 s)."""
    client = request.client
    transport = _TRANSPORTS.get((client.host, client.port)) if client else None
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _QuietAbort(logging.Filter):
    """uvicorn logs an exception that ends a started response; an intended cut is not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, AbortStream):
                return False
            inner = getattr(exc, "exceptions", None)  # an ExceptionGroup from a task group
            exc = next((e for e in inner if isinstance(e, Exception)), None) if inner else None
        return True


# ----------------------------------------------------------------------------------- request log
class RequestLog:
    """Appends one JSON line per request ``{t, version, path, user, request_id}``. Each line is one
    ``os.write`` on an O_APPEND descriptor: visible to readers at once, never interleaved."""

    def __init__(self, path: str, version: str) -> None:
        self.version = version
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, t: float, path: str, headers: Mapping[str, str]) -> None:
        line = json.dumps({"t": t, "version": self.version, "path": path, "user": headers.get("x-user-id"),
                           "request_id": headers.get("x-request-id")}, separators=(",", ":")) + "\n"
        try:
            os.write(self.fd, line.encode())
        except OSError as e:  # never let logging break serving
            print(f"request log write failed: {e}", file=sys.stderr)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _ModelVersion:
    """ASGI middleware: ``x-model-version`` on every response; the request log at arrival."""

    def __init__(self, app: ASGIApp, version: str, request_log: RequestLog | None, log_health: bool) -> None:
        self.app = app
        self.header = (b"x-model-version", version.encode("latin-1"))
        self.request_log = request_log
        self.log_health = log_health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.request_log is not None and (self.log_health or scope["path"] not in ("/healthz", "/metrics")):
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            self.request_log.write(time.time(), scope["path"], headers)

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)

        await self.app(scope, receive, send_with_version)


# ----------------------------------------------------------------------------------- the app
def new_app(title: str) -> FastAPI:
    """A FastAPI app answering errors OpenAI-style (no docs routes: the servers expose only their API)."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPError)
    async def _http_error(_request: Request, exc: HTTPError) -> Response:
        return error_response(exc.status, exc.message, exc.err_type)

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(404, f"no route for {request.url.path}", "invalid_request_error", "not_found")
        if exc.status_code == 405:
            return error_response(405, "method not allowed", "invalid_request_error")
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> Response:
        return error_response(400, str(exc.errors()), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unhandled(_request: Request, exc: Exception) -> Response:
        return error_response(500, f"unhandled server error: {exc!r}")

    return app


class _Server(uvicorn.Server):
    """uvicorn's server, except that a signal ends it with status 0 (uvicorn re-raises the signal)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        self.should_exit = True


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (as ``uvicorn --loop auto`` chooses), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_server(app: FastAPI, args: argparse.Namespace) -> int:
    """Serve ``app`` on ``args.host:args.port`` until SIGTERM/SIGINT; prints ``ready <port>``; returns 0."""
    log = RequestLog(args.log_requests, args.version) if args.log_requests else None
    # GET /metrics: vLLM-style series (lazy import: prometheus_client only where a server runs); inside
    # _ModelVersion, so its answers carry x-model-version like every other
    from .vllm_metrics import MetricsMiddleware

    metered = MetricsMiddleware(app, getattr(args, "model_name", "model"), args.version)
    wrapped = _ModelVersion(metered, args.version, log, getattr(args, "log_health", False))
    logging.getLogger("uvicorn.error").addFilter(_QuietAbort())
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    config = uvicorn.Config(wrapped, http=_tracked_protocol(), lifespan="off", log_level="warning",
                            access_log=False, server_header=False, timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=GRACEFUL_S, backlog=1024)
    server = _Server(config)

    async def main() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if serving.done():
                return await serving
            await asyncio.sleep(0.01)
        sys.stdout.write(f"ready {sock.getsockname()[1]}\n")
        sys.stdout.flush()
        await serving

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(main())
    finally:
        if log is not None:
            log.close()
    return 0


# ----------------------------------------------------------------------------------- shared behaviour
def lognormal_ms(rng: random.Random, mean_ms: float, sd_ms: float) -> float:
    """A positive duration (ms) with the given mean and standard deviation, lognormal (constant when sd is 0)."""
    if mean_ms <= 0:
        return 0.0
    if sd_ms <= 0:
        return float(mean_ms)
    sigma2 = math.log(1.0 + (sd_ms * sd_ms) / (mean_ms * mean_ms))
    mu = math.log(mean_ms) - sigma2 / 2.0
    return rng.lognormvariate(mu, math.sqrt(sigma2))


class RngSource:
    """Per-request RNGs. With header ``x-request-seed`` the RNG depends only on (--seed, header value),
    so the same request gets the same answer from every server started with the same --seed (and the
    same "random" draws, so e.g. a higher --refusal-rate refuses a superset of requests)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._root = random.Random(seed)

    def for_request(self, headers: Mapping[str, str]) -> random.Random:
        rs = headers.get("x-request-seed")
        if rs is not None:
            return random.Random(f"{self.seed}:{rs}")
        return random.Random(self._root.getrandbits(64))


def parse_class_floats(spec: str | None, classes: list[str], default: float, what: str) -> dict[str, float]:
    """Parse ``a=0.9,b=0.8`` (named), ``0.9,0.8,...`` (positional, one per class) or one number (all)."""
    out = {c: default for c in classes}
    if not spec:
        return out
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if all("=" in s for s in items):
        for s in items:
            k, _, v = s.partition("=")
            k = k.strip()
            if k not in out:
                raise SystemExit(f"{what}: unknown class {k!r} (classes: {','.join(classes)})")
            out[k] = float(v)
    elif len(items) == 1:
        out = {c: float(items[0]) for c in classes}
    elif len(items) == len(classes):
        out = {c: float(v) for c, v in zip(classes, items)}
    else:
        raise SystemExit(f"{what}: expected name=value pairs, one value, or {len(classes)} values")
    return out


def add_common_args(p: argparse.ArgumentParser, *, default_model: str) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=18001, help="listen port; 0 picks a free port")
    p.add_argument("--version", default="v1", help="model version tag (response model field and x-model-version header)")
    p.add_argument("--model-name", default=default_model,
                   help=f"model name used when the request does not name one (default {default_model})")
    p.add_argument("--seed", type=int, default=None, help="RNG seed")
    p.add_argument("--latency-ms", type=float, default=20.0, help="mean response latency (ms)")
    p.add_argument("--latency-jitter-ms", type=float, default=5.0, help="latency standard deviation (ms, lognormal)")
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered with HTTP 500")
    p.add_argument("--log-requests", metavar="FILE", default=None,
                   help="append one JSON line per request: {t, version, path, user, request_id}")
    p.add_argument("--log-health", action="store_true", help="also log GET /healthz and /metrics requests (off by default)")
    p.add_argument("--test-modes", action="store_true",
                   help="honour the x-test-mode request header (test-only behaviours)")
