"""Minimal asyncio HTTP/1.1 server shared by the example model servers.

Stdlib only.  Supports:

* keep-alive (HTTP/1.1 default; ``Connection: close`` honoured; HTTP/1.0
  keep-alive only on request) and pipelined requests (handled in order);
* request bodies with ``Content-Length`` or ``Transfer-Encoding: chunked``
  and ``Expect: 100-continue``;
* ``Content-Length`` responses (:class:`Response`) and chunked streaming
  responses (:class:`StreamResponse`), each chunk written to the socket as it
  is produced; a stream generator may raise :class:`AbortStream` to close the
  connection mid-body without the terminating zero-length chunk;
* an optional per-request log (one JSON line per request, appended with a
  single ``os.write`` so it is visible to readers immediately);
* SIGTERM/SIGINT -> close listener, cancel in-flight connections, exit 0;
* a ``ready <port>`` line on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import os
import random
import signal
import socket
import struct
import sys
import time
import traceback
import uuid
from http import HTTPStatus
from typing import AsyncIterator, Awaitable, Callable, Dict, Optional, Union

__all__ = [
    "AbortStream",
    "HTTPServer",
    "HTTPError",
    "Request",
    "RequestLog",
    "Response",
    "StreamResponse",
    "add_common_args",
    "error_response",
    "json_response",
    "lognormal_ms",
    "parse_class_floats",
    "request_rng",
    "run_server",
    "sse_event",
    "SSE_DONE",
]

MAX_HEADER_BYTES = 1 << 20
MAX_BODY_BYTES = 256 << 20

_REASONS = {s.value: s.phrase for s in HTTPStatus}


# ---------------------------------------------------------------------------
# Request / response objects
# ---------------------------------------------------------------------------


class Request:
    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "arrival")

    def __init__(self, method: str, target: str, version: str, headers: Dict[str, str],
                 body: bytes, arrival: float) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers  # lower-cased names; repeated headers joined with ", "
        self.body = body
        self.arrival = arrival

    def json(self):
        """Parse the body as JSON; raises HTTPError(400) on failure."""
        try:
            return json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"invalid JSON body: {e}", "invalid_request_error")


class Response:
    """A complete response sent with Content-Length."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int = 200, body: bytes = b"",
                 content_type: Optional[str] = "application/json",
                 headers: Optional[Dict[str, str]] = None) -> None:
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        if content_type is not None:
            self.headers.setdefault("content-type", content_type)


class StreamResponse:
    """A response whose body is produced by an async iterator of bytes and
    sent with ``Transfer-Encoding: chunked`` (one HTTP chunk per item)."""

    __slots__ = ("status", "body_iter", "headers")

    def __init__(self, body_iter: AsyncIterator[bytes], status: int = 200,
                 content_type: str = "text/event-stream",
                 headers: Optional[Dict[str, str]] = None) -> None:
        self.status = status
        self.body_iter = body_iter
        self.headers = dict(headers or {})
        self.headers.setdefault("content-type", content_type)
        if content_type.startswith("text/event-stream"):
            self.headers.setdefault("cache-control", "no-cache")


class AbortStream(Exception):
    """Raise inside a StreamResponse iterator to close the connection
    mid-stream (no terminating chunk is written).  ``reset=True`` resets it
    instead (TCP RST: ``SO_LINGER`` 0), as a crashing server would."""

    def __init__(self, reset: bool = False) -> None:
        super().__init__("stream aborted")
        self.reset = reset


class HTTPError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_response(obj, status: int = 200, headers: Optional[Dict[str, str]] = None) -> Response:
    return Response(status, _dumps(obj), "application/json", headers)


def error_response(status: int, message: str, err_type: str = "server_error",
                   code: Optional[str] = None) -> Response:
    """OpenAI-style JSON error body."""
    return json_response(
        {"error": {"message": message, "type": err_type, "param": None,
                   "code": code if code is not None else str(status)}},
        status,
    )


def sse_event(obj) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# ---------------------------------------------------------------------------
# Request log
# ---------------------------------------------------------------------------


class RequestLog:
    """Appends one JSON line per request.  Each line is written with a single
    ``os.write`` on an O_APPEND descriptor: no user-space buffer to flush, and
    lines from concurrent writers never interleave."""

    def __init__(self, path: str, version: str) -> None:
        self.version = version
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, req: Request) -> None:
        h = req.headers
        line = json.dumps({
            "t": req.arrival,
            "version": self.version,
            "path": req.path,
            "user": h.get("x-user-id"),
            "request_id": h.get("x-request-id"),
        }, separators=(",", ":")) + "\n"
        try:
            os.write(self.fd, line.encode())
        except OSError as e:  # never let logging break serving
            print(f"request log write failed: {e}", file=sys.stderr)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Union[Response, StreamResponse]]]


class HTTPServer:
    def __init__(self, handler: Handler, *, extra_headers: Optional[Dict[str, str]] = None,
                 request_log: Optional[RequestLog] = None, log_health: bool = False) -> None:
        self.handler = handler
        self.extra_headers = dict(extra_headers or {})
        self.request_log = request_log
        self.log_health = log_health
        self._server: Optional[asyncio.base_events.Server] = None
        self._conns: set = set()
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.extra_headers.items())
        self._extra_raw = extra.encode("latin-1")

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(
            self._on_conn, host, port, limit=MAX_HEADER_BYTES, backlog=1024,
            reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2.0)
        if self.request_log is not None:
            self.request_log.close()

    # -- per connection -----------------------------------------------------

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            await self._serve_conn(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:  # pragma: no cover - defensive
            traceback.print_exc()
        finally:
            self._conns.discard(task)
            try:
                writer.close()
            except Exception:
                pass

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # clean EOF between requests
            except asyncio.LimitOverrunError:
                await self._send(writer, error_response(431, "request header too large",
                                                        "invalid_request_error"), False, "GET")
                return
            arrival = time.time()
            try:
                req, keep_alive = await self._parse(head, reader, writer, arrival)
            except HTTPError as e:
                await self._send(writer, error_response(e.status, e.message, e.err_type), False, "GET")
                return

            if self.request_log is not None and (self.log_health or req.path != "/healthz"):
                self.request_log.write(req)

            try:
                resp = await self.handler(req)
            except HTTPError as e:
                resp = error_response(e.status, e.message, e.err_type)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                traceback.print_exc()
                resp = error_response(500, f"unhandled server error: {e!r}")

            if not await self._send(writer, resp, keep_alive, req.method):
                return
            if not keep_alive:
                return

    async def _parse(self, head: bytes, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, arrival: float):
        try:
            text = head.decode("latin-1")
        except Exception:  # pragma: no cover
            raise HTTPError(400, "bad request encoding")
        lines = text.split("\r\n")
        # tolerate stray CRLFs before the request line (RFC 9112 2.2)
        while lines and lines[0] == "":
            lines.pop(0)
        if not lines:
            raise HTTPError(400, "empty request")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HTTPError(400, "malformed request line")
        method, target, version = parts
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name[-1] in " \t":
                raise HTTPError(400, "malformed header line")
            name = name.lower()
            value = value.strip()
            if name in headers:
                headers[name] = headers[name] + ", " + value
            else:
                headers[name] = value

        conn = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            keep_alive = "keep-alive" in conn
        else:
            keep_alive = "close" not in conn

        te = headers.get("transfer-encoding", "").lower()
        cl = headers.get("content-length")
        body = b""
        if te or cl:
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if te:
                if te.split(",")[-1].strip() != "chunked":
                    raise HTTPError(501, "unsupported transfer-encoding")
                body = await self._read_chunked(reader)
            else:
                try:
                    n = int(cl)
                except ValueError:
                    raise HTTPError(400, "bad content-length")
                if n < 0 or n > MAX_BODY_BYTES:
                    raise HTTPError(413, "body too large")
                if n:
                    body = await reader.readexactly(n)
        return Request(method, target, version, headers, body, arrival), keep_alive

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        parts = []
        total = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            size_s = line.split(b";", 1)[0].strip()
            try:
                size = int(size_s, 16)
            except ValueError:
                raise HTTPError(400, "bad chunk size")
            if size == 0:
                # trailers until empty line
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                raise HTTPError(413, "body too large")
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    def _head(self, status: int, headers: Dict[str, str], keep_alive: bool) -> bytes:
        out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
        for k, v in headers.items():
            out.append(f"{k}: {v}\r\n")
        if not keep_alive:
            out.append("connection: close\r\n")
        return "".join(out).encode("latin-1") + self._extra_raw + b"\r\n"

    async def _send(self, writer: asyncio.StreamWriter, resp, keep_alive: bool, method: str) -> bool:
        """Write a response.  Returns False if the connection must be closed."""
        if isinstance(resp, Response):
            headers = resp.headers
            headers["content-length"] = str(len(resp.body))
            head = self._head(resp.status, headers, keep_alive)
            if method == "HEAD":
                writer.write(head)
            elif len(resp.body) < 65536:
                writer.write(head + resp.body)
            else:
                writer.write(head)
                writer.write(resp.body)
            await writer.drain()
            return True

        # streaming, chunked
        headers = resp.headers
        headers["transfer-encoding"] = "chunked"
        writer.write(self._head(resp.status, headers, keep_alive))
        await writer.drain()
        it = resp.body_iter
        try:
            async for chunk in it:
                if chunk:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
        except AbortStream as exc:
            await writer.drain()
            if exc.reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    pass
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


# ---------------------------------------------------------------------------
# Helpers shared by the example servers
# ---------------------------------------------------------------------------


def lognormal_ms(rng: random.Random, mean_ms: float, sd_ms: float) -> float:
    """Sample a positive duration (ms) with the given mean and standard
    deviation from a lognormal distribution (constant when sd is 0)."""
    if mean_ms <= 0:
        return 0.0
    if sd_ms <= 0:
        return float(mean_ms)
    sigma2 = math.log(1.0 + (sd_ms * sd_ms) / (mean_ms * mean_ms))
    mu = math.log(mean_ms) - sigma2 / 2.0
    return rng.lognormvariate(mu, math.sqrt(sigma2))


class RngSource:
    """Per-request RNGs.  With header ``x-request-seed`` the RNG depends only
    on (--seed, header value), so the same request gets the same answer from
    every server started with the same --seed (and the same "random" draws,
    so e.g. a higher --refusal-rate refuses a superset of requests)."""

    def __init__(self, seed: Optional[int]) -> None:
        self.seed = seed
        self._root = random.Random(seed)

    def for_request(self, req: Request) -> random.Random:
        rs = req.headers.get("x-request-seed")
        if rs is not None:
            return random.Random(f"{self.seed}:{rs}")
        return random.Random(self._root.getrandbits(64))


def request_rng(source: RngSource, req: Request) -> random.Random:
    return source.for_request(req)


def parse_class_floats(spec: Optional[str], classes, default: float, what: str) -> Dict[str, float]:
    """Parse ``a=0.9,b=0.8`` (named), ``0.9,0.8,...`` (positional, one per
    class) or a single number (all classes)."""
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
        v = float(items[0])
        out = {c: v for c in classes}
    elif len(items) == len(classes):
        out = {c: float(v) for c, v in zip(classes, items)}
    else:
        raise SystemExit(f"{what}: expected name=value pairs, one value, or {len(classes)} values")
    return out


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=5, mtime=0)


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
    p.add_argument("--log-health", action="store_true", help="also log GET /healthz requests (off by default)")
    p.add_argument("--test-modes", action="store_true",
                   help="honour the x-test-mode request header (test-only behaviours)")


def run_server(handler: Handler, args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (0)."""
    log = RequestLog(args.log_requests, args.version) if args.log_requests else None
    server = HTTPServer(handler, extra_headers={"x-model-version": args.version},
                        request_log=log, log_health=getattr(args, "log_health", False))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        port = await server.start(args.host, args.port)
        sys.stdout.write(f"ready {port}\n")
        sys.stdout.flush()
        await stop.wait()
        await server.close()

    asyncio.run(main())
    return 0
