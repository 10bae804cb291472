"""The sampler: an HTTP/1.1 server on ``controller.sampler`` receiving the requests Envoy mirrors
(``request_mirror_policies`` on the sticky routes of models with ``evaluation``; docs/evaluation.md).

Envoy sends the mirror fire-and-forget and ignores its response; the sampler reads the request,
answers ``204`` at once (whatever the method or path) and stores, off the event loop, one sample:
request id (``x-lockgate-request-id``, the same as the original request's and its observation's; a
mirror without it, configured by hand, falls back to ``x-request-id``), model,
time, method, path, ``content-type``, ``accept``, the model's ``replay_headers`` and the body (at most the model's
``max_body_bytes``; a larger body is not stored, since a cut body cannot be replayed).

The model is the one named by the ``x-lockgate-sample-model`` header Envoy adds to the mirror only;
without it (a mirror configured by hand), the first model of the config whose match (path prefix,
header) fits — the rules of the routes. A model without ``evaluation`` is never stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import time
from typing import Callable

from lockgate.config import LockgateConfig, Model
from lockgate.controller.evaluate.store import EvaluationMetrics, EvaluationStore, Sample
from lockgate.routing import REQUEST_ID_HEADER, SAMPLE_CANARY_HEADER, SAMPLE_MODEL_HEADER

log = logging.getLogger("lockgate.controller.evaluate.sampler")

MAX_HEADER_BYTES = 64 * 1024
#: a body larger than this closes the connection (it is read and dropped up to here)
MAX_READ_BYTES = 64 << 20
#: stores waiting for the database beyond this are dropped (counted ``overloaded``)
MAX_PENDING_STORES = 1000
IDLE_TIMEOUT_S = 300.0
_RESPONSE = b"HTTP/1.1 204 No Content\r\nserver: lockgate-sampler\r\n\r\n"
_RESPONSE_CLOSE = b"HTTP/1.1 204 No Content\r\nserver: lockgate-sampler\r\nconnection: close\r\n\r\n"
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class BadRequest(Exception):
    pass


def match_model(config: LockgateConfig, path: str, headers: dict[str, str]) -> Model | None:
    """The model a request belongs to: ``x-lockgate-sample-model`` if it names a configured model,
    else the first model (config order) whose path prefix and header match — as the routes do."""
    named = headers.get(SAMPLE_MODEL_HEADER)
    if named:
        for m in config.models:
            if m.name == named:
                return m
    for m in config.models:
        if not path.startswith(m.match.path_prefix):
            continue
        if m.match.header_name and headers.get(m.match.header_name) != (m.match.header_value or ""):
            continue
        return m
    return None


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], keep: int) -> tuple[bytes, bool]:
    """Read the whole body (Content-Length or chunked); returns (first ``keep`` bytes, cut?). Raises
    BadRequest for malformed framing or a body over MAX_READ_BYTES."""
    parts: list[bytes] = []
    kept = 0
    total = 0

    def add(data: bytes) -> None:
        nonlocal kept, total
        total += len(data)
        if total > MAX_READ_BYTES:
            raise BadRequest("body too large")
        if kept < keep:
            parts.append(data[:keep - kept])
            kept += min(len(data), keep - kept)

    te = headers.get("transfer-encoding", "").lower()
    if te:
        if te.split(",")[-1].strip() != "chunked":
            raise BadRequest("unsupported transfer-encoding")
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest("bad chunk size") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            remaining = size
            while remaining:
                data = await reader.readexactly(min(remaining, 65536))
                remaining -= len(data)
                add(data)
            await reader.readexactly(2)
    elif "content-length" in headers:
        try:
            n = int(headers["content-length"])
        except ValueError:
            raise BadRequest("bad content-length") from None
        if n < 0 or n > MAX_READ_BYTES:
            raise BadRequest("bad content-length")
        while n:
            data = await reader.readexactly(min(n, 65536))
            n -= len(data)
            add(data)
    return b"".join(parts), total > keep


class SamplerServer:
    def __init__(self, config: LockgateConfig, store: EvaluationStore, metrics: EvaluationMetrics,
                 db: concurrent.futures.Executor, on_stored: Callable[[], None] | None = None):
        self.config = config
        self.store = store
        self.metrics = metrics
        self.db = db
        self.on_stored = on_stored
        self.server: asyncio.base_events.Server | None = None
        self._pending: set[asyncio.Future] = set()
        self._conns: set[asyncio.Task] = set()
        self.address = config.controller.sampler

    async def start(self) -> None:
        a = self.config.controller.sampler
        self.server = await asyncio.start_server(self._handle, a.host, a.port, limit=MAX_HEADER_BYTES,
                                                 reuse_address=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for t in list(self._conns):
                t.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self.server.wait_closed()
        if self._pending:  # stores already handed to the database thread finish
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_S)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                        ConnectionError):
                    return
                try:
                    keep_alive = await self._request(head, reader, writer)
                except BadRequest as exc:
                    self.metrics.dropped.labels("bad_request").inc()
                    log.debug("bad mirrored request: %s", exc)
                    writer.write(_BAD_REQUEST)
                    await writer.drain()
                    return
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                if not keep_alive:
                    return
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - one bad connection never stops the sampler
            log.exception("sampler connection failed")
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()

    async def _request(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(f"bad request line {lines[0][:80]!r}")
        method, path, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name[-1] in " \t":
                raise BadRequest("malformed header line")
            name = name.lower()
            value = value.strip()
            headers[name] = headers[name] + "," + value if name in headers else value
        model = match_model(self.config, path, headers)
        ev = model.evaluation if model is not None else None
        keep = ev.max_body_bytes if ev is not None else 0
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body, cut = await _read_body(reader, headers, keep)
        conn = headers.get("connection", "").lower()
        keep_alive = "keep-alive" in conn if version == "HTTP/1.0" else "close" not in conn
        writer.write(_RESPONSE if keep_alive else _RESPONSE_CLOSE)
        await writer.drain()
        # stored after the answer: Envoy never waits for the database
        if model is None or ev is None:
            self.metrics.dropped.labels("no_model" if model is None else "not_enabled").inc()
            return keep_alive
        rid = headers.get(REQUEST_ID_HEADER) or headers.get("x-request-id", "")
        if not rid or len(rid) > 512:
            self.metrics.dropped.labels("no_request_id").inc()
            return keep_alive
        if cut:
            self.metrics.dropped.labels("too_large").inc()
            return keep_alive
        if len(self._pending) >= MAX_PENDING_STORES:
            self.metrics.dropped.labels("overloaded").inc()
            return keep_alive
        extra = {h: headers[h] for h in ev.replay_headers if h in headers}
        sample = Sample(rid, model.name, time.time(), method, path, headers.get("content-type"),
                        headers.get("accept"), body, headers.get(SAMPLE_CANARY_HEADER) or None, None, extra or None)
        fut = asyncio.get_running_loop().run_in_executor(
            self.db, self.store.insert_sample, sample, ev.retention_hours * 3600.0, ev.max_samples)
        self._pending.add(fut)
        fut.add_done_callback(lambda f, m=model.name: self._stored(f, m))
        return keep_alive

    def _stored(self, fut: asyncio.Future, model: str) -> None:
        self._pending.discard(fut)
        if fut.cancelled():
            self.metrics.dropped.labels("store_failed").inc()
            return
        exc = fut.exception()
        if exc is not None:
            self.metrics.dropped.labels("store_failed").inc()
            if isinstance(exc, sqlite3.Error):
                log.warning("storing a sample failed: %s", exc)
            else:
                log.error("storing a sample failed", exc_info=exc)
            return
        stored, pruned = fut.result()
        if stored:
            self.metrics.stored.labels(model).inc()
            if self.on_stored is not None:
                self.on_stored()
        else:
            self.metrics.dropped.labels("duplicate").inc()
        if pruned:
            self.metrics.pruned.labels(model).inc(pruned)


__all__ = ["SamplerServer", "match_model"]
