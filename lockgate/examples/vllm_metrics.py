"""vLLM-style Prometheus metrics of the example model servers, served on ``GET /metrics``.

The series a vLLM OpenAI server exports (names and labels as vLLM spells them), so rollout metrics read
from Prometheus (a ``prometheus:`` block in a rollout spec) can be tried against the examples:

* ``vllm:e2e_request_latency_seconds`` (histogram): request duration, first request byte to last
  response byte (streams: to the end of the stream);
* ``vllm:request_success_total{finished_reason}`` (counter): answered requests by finish reason
  (``stop``, ``length``, ``content_filter``);
* ``vllm:generation_tokens_total`` (counter): output tokens;
* ``vllm:num_requests_running`` (gauge): requests in flight;
* ``http_requests_total{handler, method, status}`` (counter; ``status`` is ``2xx``/``4xx``/``5xx``, as
  vLLM's HTTP instrumentation reports it).

Every series carries ``model_name`` and — unlike vLLM — ``version`` (the server's ``--version``), so a
PromQL query selects an arm with ``{version="v2"}`` without relabelling the scrape target. Each server
process has its own registry (no process-wide default registry, no Python runtime series).

Independent of lockgate (imports nothing from it), like every example.
"""

from __future__ import annotations

import time
from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["LATENCY_BUCKETS", "MetricsMiddleware", "VllmMetrics", "current", "finished"]

#: bucket bounds of the latency histogram, seconds (vLLM's request-latency bounds, with finer ones below 0.3 s
#: for the examples' millisecond latencies)
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0,
                   2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
_SKIP = ("/metrics", "/healthz")


class VllmMetrics:
    """The series of one server process (its own registry)."""

    def __init__(self, model_name: str, version: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name, "version": version}
        self.labels = labels
        names = list(labels)
        r = self.registry
        self.latency = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                                 names, buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                names + ["finished_reason"], registry=r)
        self.tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", names,
                              registry=r).labels(**labels)
        self.running = Gauge("vllm:num_requests_running", "Number of requests currently running.", names,
                             registry=r).labels(**labels)
        self._http = Counter("http_requests", "Total number of requests by method, status and handler.",
                             names + ["handler", "method", "status"], registry=r)

    def success(self, finished_reason: str, tokens: int = 0) -> None:
        self._success.labels(**self.labels, finished_reason=finished_reason).inc()
        if tokens > 0:
            self.tokens.inc(tokens)

    def http(self, handler: str, method: str, status: int) -> None:
        self._http.labels(**self.labels, handler=handler, method=method, status=f"{status // 100}xx").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_current: Optional[VllmMetrics] = None


def current() -> Optional[VllmMetrics]:
    """This process's metrics (None before :class:`MetricsMiddleware` is made)."""
    return _current


def finished(reason: str, tokens: int = 0) -> None:
    """A request answered with ``finish_reason`` ``reason`` and ``tokens`` output tokens."""
    if _current is not None:
        _current.success(reason, tokens)


class MetricsMiddleware:
    """ASGI middleware: answers ``GET /metrics`` and times every other request (but ``/healthz``)."""

    def __init__(self, app: ASGIApp, model_name: str, version: str) -> None:
        global _current
        self.app = app
        self.metrics = _current = VllmMetrics(model_name, version)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path == "/metrics" and scope.get("method") in ("GET", "HEAD"):
            body = self.metrics.exposition()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})
            return
        if path in _SKIP:
            return await self.app(scope, receive, send)
        m = self.metrics
        start = time.perf_counter()
        status = 500
        done = False
        m.running.inc()

        async def timed_send(message: Message) -> None:
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not done:
                done = True
                m.latency.observe(time.perf_counter() - start)
                m.http(path, scope.get("method", ""), status)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            m.running.dec()
            if not done:  # the response never finished (client gone, stream cut): counted, not timed
                m.http(path, scope.get("method", ""), status)
