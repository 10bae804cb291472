"""How alerts (and registry updates) travel: a small asyncio HTTP/1.1 client, which answers are worth
retrying, the bounded exponential backoff between tries, and the ISO 8601 time used on the wire.

:func:`http_request` runs on asyncio streams (no threads), so a receiver that hangs is cut off by its
timeout and can be cancelled at shutdown. Queuing, persistence and the retry loop itself live in
:mod:`lockgate.controller.tell.notify`; the policy numbers come from :class:`lockgate.config.RetryPolicy`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import ssl
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from lockgate.config import RetryPolicy

MAX_RESPONSE = 4 * 1024 * 1024  #: bytes of a response body read at most


# ---------------------------------------------------------------------------------------------- delivery errors
class DeliveryError(Exception):
    """A delivery attempt failed. ``retryable`` False: trying again cannot help (e.g. HTTP 400)."""

    def __init__(self, message: str, retryable: bool = True, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status


def classify_status(status: int) -> str:
    """``ok`` (2xx), ``retry`` (5xx, 408, 425, 429, and anything odd), or ``permanent`` (other 4xx)."""
    if 200 <= status < 300:
        return "ok"
    if status in (408, 425, 429) or status >= 500 or status < 200 or 300 <= status < 400:
        return "retry"
    return "permanent"


def backoff_delay(attempt: int, policy: RetryPolicy, jitter: float = 0.1, rnd: random.Random | None = None) -> float:
    """Delay before try ``attempt + 1`` after ``attempt`` failed tries (attempt ≥ 1):
    ``initial × 2^(attempt-1)`` capped at ``max_backoff_s``, minus up to ``jitter`` of it (so retries of
    many items spread out). Never above ``max_backoff_s``, never below ``(1 - jitter) × initial``."""
    if attempt < 1:
        return 0.0
    base = policy.initial_backoff_s * (2.0 ** min(attempt - 1, 60))
    base = min(base, policy.max_backoff_s)
    r = (rnd or random).random() if jitter > 0 else 0.0
    return base * (1.0 - jitter * r)


def total_retry_window(policy: RetryPolicy) -> float:
    """Longest time from the first try to giving up (no jitter)."""
    return sum(backoff_delay(a, policy, jitter=0.0) for a in range(1, policy.max_attempts))


# ---------------------------------------------------------------------------------------------- HTTP client
@dataclass
class HTTPResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8") or "null")


async def http_request(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                       timeout: float = 5.0) -> HTTPResult:
    """One HTTP/1.1 request (``Connection: close``) on asyncio streams, bounded by ``timeout`` as a whole.

    Raises :class:`DeliveryError` (retryable) on connection problems and timeouts; any HTTP status is
    returned (the caller decides with :func:`classify_status`). Credentials in the URL become basic auth.
    Proxies are not used."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeliveryError(f"not an http(s) URL: {parts.scheme}://{parts.hostname}", retryable=False)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if parts.port:
        host_header += f":{parts.port}"
    hdrs = {"Host": host_header, "User-Agent": "lockgate-controller", "Accept": "application/json",
            "Connection": "close"}
    if parts.username is not None:
        cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        hdrs["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
    if body is not None:
        hdrs["Content-Type"] = "application/json"
        hdrs["Content-Length"] = str(len(body))
    hdrs.update(headers or {})

    async def go() -> HTTPResult:
        ctx = ssl.create_default_context() if https else None
        reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=ctx,
                                                       server_hostname=parts.hostname if https else None)
        try:
            head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
            writer.write(head.encode("latin-1") + (body or b""))
            await writer.drain()
            line = await reader.readline()
            bits = line.decode("latin-1").split(None, 2)
            if len(bits) < 2 or not bits[0].startswith("HTTP/") or not bits[1].isdigit():
                raise DeliveryError(f"not an HTTP response: {line[:80]!r}")
            status = int(bits[1])
            rh: dict[str, str] = {}
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                rh[k.strip().lower()] = v.strip()
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                data = b""
            elif "chunked" in rh.get("transfer-encoding", "").lower():
                chunks = []
                size = 0
                while True:
                    n = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                    if n == 0:
                        break
                    size += n
                    if size > MAX_RESPONSE:
                        raise DeliveryError("response too large")
                    chunks.append(await reader.readexactly(n))
                    await reader.readline()
                data = b"".join(chunks)
            elif "content-length" in rh:
                data = await reader.readexactly(min(int(rh["content-length"]), MAX_RESPONSE))
            else:
                data = await reader.read(MAX_RESPONSE)
            return HTTPResult(status, rh, data)
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (asyncio.TimeoutError, OSError, ssl.SSLError):
                pass

    try:
        return await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        raise DeliveryError(f"no answer within {timeout:g} s") from None
    except (OSError, asyncio.IncompleteReadError, ValueError, ssl.SSLError) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from None



def iso(ts: float) -> str:
    """``ts`` (seconds since the epoch) as ISO 8601 UTC with milliseconds: ``2026-01-02T03:04:05.678Z``."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


__all__ = ["MAX_RESPONSE", "DeliveryError", "HTTPResult", "backoff_delay", "classify_status", "http_request", "iso",
           "total_retry_window"]
