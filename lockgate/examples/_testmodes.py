"""Test-only response modes selected by the ``x-test-mode`` request header.

Only honoured when a server is started with ``--test-modes``.  Used by
lockgate's capture tests to exercise odd upstream responses.

Modes (headers ``x-test-size``, ``x-test-interval-ms``, ``x-test-events``
tune them):

``huge``       valid JSON chat.completion of exactly ``x-test-size`` bytes (default 5 MB)
``binary``     ``x-test-size`` random bytes (default 64 KiB), application/octet-stream
``malformed``  truncated JSON with content-type application/json
``gzip``       gzip-encoded JSON chat.completion, ``Content-Encoding: gzip``
``error``      HTTP 500 with a JSON error body
``slow-sse``   SSE chat stream, ``x-test-events`` (default 5) content chunks sent
               ``x-test-interval-ms`` (default 200) apart, then finish chunk and [DONE]
``cut-sse``    SSE chat stream that sends ``x-test-events`` (default 3) chunks
               ``x-test-interval-ms`` (default 20) apart and then closes the
               connection (no terminating chunk, no [DONE])
``reset-sse``  like ``cut-sse`` but resets the connection (TCP RST) instead
               of closing it, as a crashing model server would
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import OrderedDict
from typing import Optional

from starlette.requests import Request
from starlette.responses import Response

from ._server import (AbortStream, HTTPError, SSE_DONE, error_response, gzip_bytes, json_response, new_id,
                      sse_event, sse_response)

MODES = ("huge", "binary", "malformed", "gzip", "error", "slow-sse", "cut-sse", "reset-sse")

_PAD_WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod "
              "tempor incididunt ut labore et dolore magna aliqua ")
_huge_cache: "OrderedDict[tuple, bytes]" = OrderedDict()


def _int_header(req: Request, name: str, default: int) -> int:
    v = req.headers.get(name)
    if v is None:
        return default
    try:
        return int(v)
    except ValueError:
        raise HTTPError(400, f"bad {name} header")


def _completion(model: str, content: str) -> dict:
    return {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def huge_body(model: str, size: int) -> bytes:
    """A valid chat.completion JSON document of exactly ``size`` bytes (or
    the smallest possible document if ``size`` is smaller than that)."""
    key = (model, size)
    body = _huge_cache.get(key)
    if body is not None:
        return body
    base = json.dumps(_completion(model, ""), separators=(",", ":")).encode()
    marker = b'"content":""'
    i = base.index(marker) + len(marker) - 1  # position of the closing quote
    pad_len = max(0, size - len(base))
    reps = pad_len // len(_PAD_WORDS) + 1
    pad = (_PAD_WORDS * reps)[:pad_len].encode()
    body = base[:i] + pad + base[i:]
    _huge_cache[key] = body
    while len(_huge_cache) > 4:
        _huge_cache.popitem(last=False)
    return body


def _chunk(cid: str, created: int, model: str, delta: dict, finish: Optional[str]) -> bytes:
    return sse_event({
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    })


async def _sse(model: str, events: int, interval_s: float, cut: bool, reset: bool = False):
    cid = new_id("chatcmpl-")
    created = int(time.time())
    yield _chunk(cid, created, model, {"role": "assistant", "content": ""}, None)
    for i in range(events):
        if i:
            await asyncio.sleep(interval_s)
        yield _chunk(cid, created, model, {"content": f"event{i} "}, None)
    if cut:
        raise AbortStream(reset=reset)
    await asyncio.sleep(interval_s)
    yield _chunk(cid, created, model, {}, "stop")
    yield SSE_DONE


def test_mode_response(req: Request, model: str) -> Optional[Response]:
    """The response for the request's ``x-test-mode``, or None if the request does not ask for one."""
    mode = req.headers.get("x-test-mode")
    if not mode:
        return None
    mode = mode.strip().lower()
    if mode == "huge":
        return Response(huge_body(model, _int_header(req, "x-test-size", 5 * 1024 * 1024)),
                        media_type="application/json")
    if mode == "binary":
        n = _int_header(req, "x-test-size", 64 * 1024)
        return Response(os.urandom(max(0, n)), media_type="application/octet-stream")
    if mode == "malformed":
        full = json.dumps(_completion(model, "this body is cut short"), separators=(",", ":")).encode()
        return Response(full[: len(full) // 2], media_type="application/json")
    if mode == "gzip":
        full = json.dumps(_completion(model, "gzip encoded answer"), separators=(",", ":")).encode()
        return Response(gzip_bytes(full), headers={"content-encoding": "gzip"}, media_type="application/json")
    if mode == "error":
        return error_response(500, "injected test error", "server_error", "test_error")
    if mode == "slow-sse":
        return sse_response(req, _sse(model, _int_header(req, "x-test-events", 5),
                                      _int_header(req, "x-test-interval-ms", 200) / 1000.0, False))
    if mode == "cut-sse":
        return sse_response(req, _sse(model, _int_header(req, "x-test-events", 3),
                                      _int_header(req, "x-test-interval-ms", 20) / 1000.0, True))
    if mode == "reset-sse":
        return sse_response(req, _sse(model, _int_header(req, "x-test-events", 3),
                                      _int_header(req, "x-test-interval-ms", 20) / 1000.0, True, reset=True))
    return json_response({"error": {"message": f"unknown x-test-mode {mode!r}; known: {', '.join(MODES)}",
                                    "type": "invalid_request_error", "param": None, "code": "400"}}, 400)
