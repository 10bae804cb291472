"""The controller HTTP API's front end: an asyncio server that bounds every request before a handler sees it.

The head must arrive within ``head_timeout_s`` and ``max_head_bytes``, the body within
``body_timeout_s`` and ``max_body_bytes`` (413 before reading it); an idle kept-alive connection waits
at most ``keepalive_timeout_s``; at most ``max_connections`` at once (503 beyond). Only a complete
request reaches :class:`~lockgate.controller.api.http.ControllerHTTP`'s handlers. Each answer is
written in one ``send`` (status line, headers and body together). Stdlib only (docs/architecture.md,
"Choices", on why not aiohttp).
"""

from __future__ import annotations

import asyncio
import http
import json
import re
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any


MAX_BODY = 8 * 1024 * 1024  #: default max_body_bytes (bytes)


@dataclass(frozen=True)
class HttpLimits:
    """What one client may cost the controller's HTTP API (see docs/operations.md, "Inputs and limits")."""


    #: request line + headers (on a new connection: from its accept)
    head_timeout_s: float = 10.0
    #: how long a kept-alive connection may wait, idle, for its next request (only after an answered request,
    #: which with auth means an authenticated one); its head then has head_timeout_s like any other
    keepalive_timeout_s: float = 60.0
    #: the whole body, from the end of the head
    body_timeout_s: float = 30.0
    #: writing the answer (a client that does not read it is dropped)
    write_timeout_s: float = 30.0
    #: a handler's answer (the rollout API waits up to 60 s for the controller's loop)
    handler_timeout_s: float = 120.0
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    max_body_bytes: int = MAX_BODY
    max_connections: int = 256
    workers: int = 16


class Listening:
    """What the stdlib server offered callers: ``server_address`` and ``server_close()``."""


    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.server_address = sock.getsockname()


    def server_close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Refused(Exception):
    """A request refused by the front end: HTTP ``status``, a metric ``reason`` and a one-line ``message``."""


    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass
class RequestHead:
    method: str
    target: str
    path: str
    query: dict[str, str]
    version: str
    headers: dict[str, str]
    length: int | None
    keep_alive: bool
    peer: str = "?"
    body: bytes = b""
    client: str | None = None


_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


_METHOD = re.compile(r"^[A-Z]{1,20}$")


def parse_head(head: bytes, lim: HttpLimits) -> RequestHead:
    """Request line and headers (strict: one Content-Length, no folding, ASCII target) → :class:`RequestHead`."""
    lines = head.split(b"\n")
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise Refused(400, "bad_request_line", "malformed request line (want: METHOD /path HTTP/1.1)")
    method_b, target_b, version_b = parts
    try:
        method, target, version = method_b.decode("ascii"), target_b.decode("ascii"), version_b.decode("ascii")
    except UnicodeDecodeError:
        raise Refused(400, "bad_request_line", "request line is not ASCII (percent-encode the path)") from None
    if not _METHOD.match(method):
        raise Refused(400, "bad_request_line", f"malformed method {method[:20]!r}")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise Refused(505 if version.startswith("HTTP/") else 400, "bad_version",
                       f"HTTP version {version[:20]!r} not supported (HTTP/1.1 or HTTP/1.0)")
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise Refused(400, "bad_target", "the request target must be an absolute path such as /v1/feedback")
    headers: dict[str, str] = {}
    lengths: set[str] = set()
    if len(lines) - 1 > lim.max_headers:
        raise Refused(431, "too_many_headers", f"more than {lim.max_headers} header lines")
    for i, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            raise Refused(400, "bad_header", f"header line {i}: folded header lines are not accepted")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise Refused(400, "bad_header", f"header line {i}: malformed (want 'Name: value')")
        key = name.decode("ascii").lower()
        val = value.strip(b" \t").decode("latin-1")
        if key == "content-length":
            lengths.update(v.strip() for v in val.split(","))
        headers[key] = f"{headers[key]}, {val}" if key in headers else val
    length = None
    if lengths:
        if len(lengths) != 1:
            raise Refused(400, "bad_length", "conflicting Content-Length headers")
        (raw,) = lengths
        if not raw.isdigit() or not raw.isascii() or len(raw) > 18:
            raise Refused(400, "bad_length", f"Content-Length must be a number of bytes, got {raw[:40]!r}")
        length = int(raw)
    conn_tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep = ("close" not in conn_tokens) if version == "HTTP/1.1" else ("keep-alive" in conn_tokens)
    split = urllib.parse.urlsplit(target)
    try:
        query = dict(urllib.parse.parse_qsl(split.query, max_num_fields=64, errors="replace"))
    except ValueError:
        raise Refused(400, "bad_query", "too many query parameters (at most 64)") from None
    return RequestHead(method, target, split.path, query, version, headers, length, keep)


class Connection:
    """One client connection: buffered reads under deadlines, whole-response writes."""


    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: HttpLimits):
        self.reader, self.writer, self.limits = reader, writer, limits
        self.buf = bytearray()
        self.head_only = False
        self.answered = False  #: a request was answered on this connection (it is kept alive)
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


    async def _fill(self, deadline: float) -> bool:
        """Read more into ``buf`` before ``deadline``; False at end of stream; TimeoutError after it."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        data = await asyncio.wait_for(self.reader.read(65536), remaining)
        if not data:
            return False
        self.buf += data
        return True


    async def read_head(self) -> bytes | None:
        """The request head (without the blank line), or None: closed or idle with nothing sent."""
        lim = self.limits
        loop = asyncio.get_running_loop()
        if self.answered and not self.buf:  # kept alive: wait for the next request's first bytes
            try:
                if not await self._fill(loop.time() + lim.keepalive_timeout_s):
                    return None
            except TimeoutError:
                return None  # idle too long: close quietly
        deadline = loop.time() + lim.head_timeout_s
        while True:
            while self.buf[:1] in (b"\r", b"\n"):  # blank lines before a request are allowed
                del self.buf[:1]
            end = self.buf.find(b"\n\r\n")
            end2 = self.buf.find(b"\n\n")
            if end >= 0 and (end2 < 0 or end < end2):
                head, rest = bytes(self.buf[:end]), end + 3
            elif end2 >= 0:
                head, rest = bytes(self.buf[:end2]), end2 + 2
            else:
                head = None
            if head is not None:
                if len(head) > lim.max_head_bytes:
                    raise Refused(431, "head_too_large", f"request head larger than {lim.max_head_bytes} bytes")
                del self.buf[:rest]
                return head
            if len(self.buf) > lim.max_head_bytes:
                raise Refused(431, "head_too_large", f"request head larger than {lim.max_head_bytes} bytes")
            try:
                more = await self._fill(deadline)
            except TimeoutError:
                if not self.buf:
                    return None  # an idle kept-alive connection: close it quietly
                raise Refused(408, "head_timeout", f"request head not complete within "
                                                    f"{lim.head_timeout_s:g} s") from None
            if not more:
                if self.buf:
                    raise Refused(400, "short_head", "connection closed in the middle of the request head")
                return None


    async def read_body(self, length: int) -> bytes:
        lim = self.limits
        deadline = asyncio.get_running_loop().time() + lim.body_timeout_s
        while len(self.buf) < length:
            try:
                more = await self._fill(deadline)
            except TimeoutError:
                raise Refused(408, "body_timeout", f"body not received within {lim.body_timeout_s:g} s "
                                                    f"(got {len(self.buf)} of {length} bytes)") from None
            if not more:
                raise Refused(400, "short_body", f"body shorter than its Content-Length (got {len(self.buf)} "
                                                  f"of {length} bytes before the client stopped sending)")
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return body


    async def linger(self, seconds: float = 2.0) -> None:
        """After answering without reading the body: stop writing, then read and discard what the client still
        sends (up to ``seconds`` and twice the body limit), so it can read the answer instead of a reset."""
        try:
            self.writer.write_eof()
        except (OSError, RuntimeError):
            return
        loop = asyncio.get_running_loop()
        deadline, budget = loop.time() + seconds, 2 * self.limits.max_body_bytes
        self.buf.clear()
        try:
            while budget > 0 and (remaining := deadline - loop.time()) > 0:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
                if not data:
                    return
                budget -= len(data)
        except (TimeoutError, asyncio.TimeoutError, ConnectionError, OSError):
            return


    async def write_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), self.limits.write_timeout_s)


    async def send(self, status: int, obj: Any, close: bool = False, extra: tuple = ()) -> None:
        await self.send_bytes(status, json_body(obj), "application/json", close, extra)


    async def send_bytes(self, status: int, body: bytes, ctype: str, close: bool = False, extra: tuple = ()) -> None:
        try:
            await self.write_raw(response_bytes(status, body, ctype, close, self.head_only, extra))
        except (ConnectionError, OSError):
            pass


def json_body(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def response_bytes(status: int, body: bytes, ctype: str, close: bool, head_only: bool, extra: tuple = ()) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Status"
    lines = [f"HTTP/1.1 {status} {phrase}", "Server: lockgate-controller", f"Content-Type: {ctype}",
             f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    lines.extend(f"{k}: {v}" for k, v in extra)
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if head_only else out + body
