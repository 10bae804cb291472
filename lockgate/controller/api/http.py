"""The controller's HTTP API on ``controller.http``.

* ``GET /metrics`` — Prometheus text format (the controller's registry).
* ``GET /healthz`` — ``ok``.
* ``POST /v1/feedback`` — one feedback object or a list of them (see ``docs/observations.md``)::

      {"request_id": "…", "true_class": "spam", "thumbs": "up", "task_success": true, "evaluator_score": 0.8}

  Each is joined to the stored observation by request id (lockgate's, from the response header
  ``x-lockgate-request-id``) or by ``client_request_id`` (the request's own ``x-request-id``; 409 when
  several observations carry it), with the arrival time. One object:
  200 ``{"stored": 1, …}``; 404 unknown request id; 410 expired (older than the retention or pruned);
  400 malformed (naming the field). A list is validated whole first (any malformed item → 400, nothing
  stored), then every known id is stored: 200 if all were, else 207 with a per-item ``results`` list.
  An unknown id is re-checked for a short grace period (``unknown_grace_s``) before 404, since
  observations reach the controller in batches shortly after the response.
* ``GET /v1/observations/{request_id}`` — the stored observation(s) and labels, for debugging; with
  ``body_sample`` when the response body was retained (``capture.retain_bodies``).
* ``GET /openapi.json`` — the OpenAPI 3.1 description of every route, generated from the route table
  (:mod:`.openapi`), so it lists exactly the routes that exist.
* Routes added by other parts of the controller (:meth:`ControllerHTTP.add_route`: the rollout API).

The server (stdlib only): an asyncio front end on its own thread and event loop reads and bounds every
request — the head within ``head_timeout_s`` and ``max_head_bytes`` (an idle kept-alive connection waits
at most ``keepalive_timeout_s`` for its next request), the body within ``body_timeout_s`` and
``max_body_bytes`` (413 before reading it), at most ``max_connections`` at once (503 beyond) — and
only a complete request is handed to a bounded pool of
``workers`` threads that run the handlers (SQLite, the rollout API's calls into the controller's loop).
A stalled upload costs a socket, never a thread; the controller's own event loop never serves HTTP.

With ``auth`` (a :class:`~lockgate.auth.TokenRegistry` with tokens configured) every request needs
``authorization: Bearer <token>`` (401 otherwise, before the body is read); the client's configured
name is passed to the routes as the actor. Every refusal is a one-line JSON ``{"error": …}``;
handlers never raise into the server (an unexpected error is a 500 JSON answer without details, logged).

The bounded front end is :mod:`.front`; feedback validation is :mod:`.feedback`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
import urllib.parse
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from lockgate.auth import TokenRegistry
from lockgate.controller.ingest.collector import ControllerMetrics
from lockgate.controller.ingest.export import record_to_json
from lockgate.controller.ingest.observations import ObservationStore
from lockgate.controller.ingest.samples import sample_json
from lockgate.controller.api.feedback import FEEDBACK_SCHEMA, ClientRequestId, FeedbackError, parse_feedback
from lockgate.controller.api.front import Connection, HttpLimits, Listening, Refused, RequestHead, json_body, parse_head
from lockgate.controller.api.openapi import RouteDoc, build_openapi, doc_for

log = logging.getLogger("lockgate.controller.http")


class ControllerHTTP:
    """The HTTP API; ``start()`` serves in a background thread, ``stop()`` shuts down.

    The listening socket is bound by the constructor (an address in use raises ``OSError`` there)."""

    def __init__(self, host: str, port: int, store: ObservationStore, metrics: ControllerMetrics,
                 retention_s: float, unknown_grace_s: float = 2.0, samples: Any = None,
                 auth: TokenRegistry | None = None, limits: HttpLimits | None = None):
        self.store = store
        self.samples = samples  #: SampleStore (capture.retain_bodies) or None
        self.metrics = metrics
        self.retention_s = retention_s
        self.unknown_grace_s = unknown_grace_s
        self.auth = auth if auth is not None and auth.enabled else None
        self.limits = limits or HttpLimits()
        #: callables returning None (take feedback) or why this controller refuses it now: a standby of
        #: several controllers answers 503, so the label reaches the driving controller's live evidence
        self.accept_checks: list = []
        #: (method, path prefix) → fn(path, query: dict, body: bytes, client: str | None) -> (status, JSON
        #: object); added by other parts of the controller (e.g. the rollout API), checked before the
        #: built-in 404. ``client`` is the authenticated client's name (None when auth is off).
        self.routes: dict[tuple[str, str], Any] = {}
        #: (method, path prefix) → its OpenAPI description (every route has one)
        self.route_docs: dict[tuple[str, str], RouteDoc] = {}
        self._builtin_routes()
        self._http_metrics(metrics)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.create_server((host, port), family=family, backlog=128)
        self.server = Listening(self.sock)  # ``server_address`` and ``server_close()``, as before
        self.thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._conns: set[asyncio.Task] = set()
        self._ready = threading.Event()

    def _http_metrics(self, metrics: ControllerMetrics) -> None:
        r = metrics.registry
        try:
            self.m_rejected = Counter("lockgate_controller_http_rejected", "HTTP requests refused before a handler "
                                      "ran, by reason", ["reason"], registry=r)
            self.m_conns = Gauge("lockgate_controller_http_connections", "Open HTTP connections", registry=r)
        except ValueError:  # a second server on the same registry (tests): share the first one's
            self.m_rejected = r._names_to_collectors["lockgate_controller_http_rejected"]  # noqa: SLF001
            self.m_conns = r._names_to_collectors["lockgate_controller_http_connections"]  # noqa: SLF001

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def start(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.limits.workers, thread_name_prefix="controller-http")
        self.thread = threading.Thread(target=self._run, name="controller-http", daemon=True)
        self.thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=self.sock, limit=self.limits.max_head_bytes)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for t in list(self._conns):
                t.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)

    def stop(self) -> None:
        if self._loop is not None and self.thread is not None and self.thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # loop already closed
                pass
            self.thread.join(5)
        self.server.server_close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def add_route(self, method: str, prefix: str, fn, doc: RouteDoc | str | None = None) -> None:
        """Serve ``method`` (GET or POST; HEAD is answered like GET) on ``prefix`` and every path below it
        by ``fn(path, query, body, client) -> (status, JSON object)`` (or ``(status, bytes, content type)``).
        ``doc`` describes it in ``/openapi.json``: a :class:`RouteDoc`, a one-line summary, or None (the
        first line of ``fn``'s docstring)."""
        self.routes[(method, prefix)] = fn
        self.route_docs[(method, prefix)] = doc_for(method, prefix, fn, doc)

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of the routes registered now."""
        try:
            from importlib.metadata import version
            ver = version("lockgate")
        except Exception:  # not installed (run from a checkout)
            ver = "0"
        return build_openapi([(m, p, d) for (m, p), d in self.route_docs.items()], self.auth is not None, ver)

    def _builtin_routes(self) -> None:
        error = {404: "no such endpoint"}
        self.add_route("GET", "/metrics", lambda *_: (200, generate_latest(self.metrics.registry),
                                                      CONTENT_TYPE_LATEST),
                       RouteDoc("the controller's metrics (Prometheus text format)",
                                responses={200: "Prometheus text exposition"}, content_type=CONTENT_TYPE_LATEST))
        self.add_route("GET", "/healthz", lambda *_: (200, b"ok\n", "text/plain"),
                       RouteDoc("liveness: answers ok", responses={200: "ok"}, content_type="text/plain"))
        self.add_route("GET", "/openapi.json", lambda *_: (200, self.openapi()),
                       RouteDoc("this description of the API (OpenAPI 3.1)", responses={200: "the OpenAPI document"}))
        self.add_route("GET", "/v1/observations", self._observation_route, RouteDoc(
            "the stored observation(s) and labels of one request, for debugging",
            "With ``body_sample`` when the response body was retained (capture.retain_bodies).",
            paths=("/v1/observations/{request_id}",),
            responses={200: "the observations", **error, 410: "expired: older than the retention, pruned"}))
        self.add_route("POST", "/v1/feedback", lambda path, query, body, client: self.feedback(body), RouteDoc(
            "feedback labels joined to stored observations by request id",
            "One object or a list (validated whole first). Each item names its observation by request_id "
            "(lockgate's, the x-lockgate-request-id response header) or client_request_id (the request's "
            "x-request-id) and gives at least one label. See docs/observations.md.",
            request_schema=FEEDBACK_SCHEMA,
            responses={200: "stored (every item)", 207: "some items stored: per-item results",
                       400: "malformed, naming the field", 404: "unknown request id",
                       409: "ambiguous client_request_id", 410: "expired request id"}))

    def _observation_route(self, path: str, query: dict, body: bytes, client: str | None) -> tuple[int, Any]:
        rid = path[len("/v1/observations/"):] if path.startswith("/v1/observations/") else ""
        if not rid:
            return 404, {"error": f"no such endpoint {path}"}
        return self.observation(urllib.parse.unquote(rid, errors="replace"))

    def route(self, method: str, path: str):
        best = None
        for (m, prefix), fn in self.routes.items():
            if m == method and (path == prefix or path.startswith(prefix.rstrip("/") + "/")):
                if best is None or len(prefix) > len(best[0]):
                    best = (prefix, fn)
        return best[1] if best else None

    # ----- the connection (on the HTTP thread's event loop) -----
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= self.limits.max_connections:
            self.m_rejected.labels("too_many_connections").inc()
            over = Connection(reader, writer, self.limits)
            try:
                await over.send(503, {"error": f"too many connections (at most {self.limits.max_connections}); "
                                               "retry later"}, close=True)
                await over.linger(0.5)  # so the client reads the 503 rather than a reset
            except Exception:
                pass
            finally:
                writer.close()
            return
        task = asyncio.current_task()
        self._conns.add(task)
        self.m_conns.inc()
        conn = Connection(reader, writer, self.limits)
        try:
            while await self._one_request(conn):
                pass
        except (ConnectionError, asyncio.CancelledError, TimeoutError, OSError):
            pass
        except Exception:  # never let one connection's surprise reach the loop
            log.exception("HTTP connection from %s failed", conn.peer)
        finally:
            self._conns.discard(task)
            self.m_conns.dec()
            writer.close()

    async def _one_request(self, conn: Connection) -> bool:
        """Read, check, run and answer one request; False when the connection is to be closed."""
        lim = self.limits
        try:
            head = await conn.read_head()
        except Refused as exc:
            self.m_rejected.labels(exc.reason).inc()
            await conn.send(exc.status, {"error": exc.message}, close=True)
            return False
        if head is None:
            return False
        try:
            req = parse_head(head, lim)
        except Refused as exc:
            self.m_rejected.labels(exc.reason).inc()
            await conn.send(exc.status, {"error": exc.message}, close=True)
            return False
        conn.head_only = req.method == "HEAD"
        keep = req.keep_alive
        refusal = self._precheck(req)
        if refusal is not None:
            status, reason, message = refusal
            self.m_rejected.labels(reason).inc()
            # the body was not read: the connection cannot carry another request
            await conn.send(status, {"error": message}, close=True,
                            extra=(("WWW-Authenticate", 'Bearer realm="lockgate"'),) if status == 401 else ())
            if req.length or "transfer-encoding" in req.headers:
                await conn.linger()  # let a client still sending its body read the answer (not a reset)
            return False
        if req.length:
            if req.headers.get("expect", "").lower() == "100-continue":
                await conn.write_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                req.body = await conn.read_body(req.length)
            except Refused as exc:
                self.m_rejected.labels(exc.reason).inc()
                await conn.send(exc.status, {"error": exc.message}, close=True)
                return False
        loop = asyncio.get_running_loop()
        try:
            status, body, ctype = await asyncio.wait_for(loop.run_in_executor(self._pool, self._handle, req),
                                                         lim.handler_timeout_s)
        except asyncio.TimeoutError:
            log.error("%s %s: no answer within %.0f s", req.method, req.path, lim.handler_timeout_s)
            status, body, ctype = 503, json_body({"error": f"no answer within {lim.handler_timeout_s:g} s; "
                                                            "the controller is busy, retry later"}), "application/json"
            keep = False
        await conn.send_bytes(status, body, ctype, close=not keep)
        conn.answered = True
        return keep

    def _precheck(self, req: RequestHead) -> tuple[int, str, str] | None:
        """Refusals decided from the head alone (before reading the body): (status, reason, message)."""
        lim = self.limits
        if self.auth is not None:
            authz = req.headers.get("authorization")
            client = self.auth.authenticate(authz)
            if client is None:
                log.warning("HTTP %s %s from %s: %s", req.method, req.path, req.peer,
                            "no authorization header" if not authz else "unknown or malformed bearer token")
                if not authz:
                    return 401, "unauthenticated", ("authentication required: send 'authorization: Bearer <token>' "
                                                    "(the lockgate CLI reads $LOCKGATE_TOKEN or auth.token_file)")
                return 401, "unauthenticated", "invalid token: 'authorization: Bearer <token>' with a configured token"
            req.client = client
        if req.method not in ("GET", "HEAD", "POST"):
            return 405, "method", f"method {req.method} not allowed (GET, HEAD or POST)"
        if "transfer-encoding" in req.headers:
            return 411, "chunked", "send a Content-Length (chunked bodies are not accepted)"
        if req.length is None:
            if req.method == "POST":
                return 411, "no_length", "Content-Length required"
            req.length = 0
        if req.length > lim.max_body_bytes:
            return 413, "too_large", (f"body of {req.length} bytes is larger than the limit of "
                                      f"{lim.max_body_bytes} bytes")
        return None

    # ----- the handlers (on the worker pool) -----
    def _handle(self, req: RequestHead) -> tuple[int, bytes, str]:
        try:
            return self._dispatch(req)
        except Exception as exc:  # a bug, not the client's fault: 500 without details, logged
            log.exception("%s %s failed", req.method, req.path)
            return 500, json_body({"error": f"internal error ({type(exc).__name__}); see the controller's log"}), \
                "application/json"

    def _dispatch(self, req: RequestHead) -> tuple[int, bytes, str]:
        """The route table: the longest matching prefix for the method; 405 when only the other method
        has a route there, else 404."""
        path = req.path
        method = "GET" if req.method in ("GET", "HEAD") else "POST"
        if (fn := self.route(method, path)) is not None:
            answer = fn(path, req.query, req.body if method == "POST" else b"", req.client)
            return answer if len(answer) == 3 else self._json(*answer)
        if method == "GET":
            if self.route("POST", path) is not None:
                return self._json(405, {"error": "use POST"})
            return self._json(404, {"error": f"no such endpoint {path}"})
        if self.route("GET", path) is not None:
            return self._json(405, {"error": f"no POST endpoint {path}"})
        return self._json(404, {"error": f"no POST endpoint {path}"})

    @staticmethod
    def _json(status: int, obj: Any) -> tuple[int, bytes, str]:
        return status, json_body(obj), "application/json"

    # ----- handlers' logic (no HTTP here) -----
    def feedback(self, body: bytes) -> tuple[int, dict[str, Any]]:
        for check in self.accept_checks:
            if (why := check()) is not None:
                return 503, {"error": f"{why}; post feedback to the driving controller", "retry": True}
        try:
            items, was_list = parse_feedback(body)
        except FeedbackError as exc:
            self.metrics.feedback.labels("-", "malformed").inc()
            return 400, {"error": str(exc), "field": exc.field}
        deadline = time.monotonic() + self.unknown_grace_s
        resolved = self._resolve_client_ids(items, deadline)  # client_request_id -> [request ids]

        def target(key: str) -> str:  # the lockgate request id an item's labels go to
            found = resolved.get(key) if isinstance(key, ClientRequestId) else None
            return found[0] if found is not None and len(found) == 1 else key

        ids = [target(rid) for rid, _ in items if not isinstance(target(rid), ClientRequestId)]
        status = self.store.lookup_status(ids, retention_s=self.retention_s)
        while any(s == "unknown" for s in status.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
            unknown = [rid for rid, s in status.items() if s == "unknown"]
            status.update(self.store.lookup_status(unknown, retention_s=self.retention_s))
        for key, found in resolved.items():
            if len(found) != 1:
                status[key] = "ambiguous" if found else "unknown"
        flat = [(target(rid), kind, value) for rid, labels in items if status[target(rid)] == "stored"
                for kind, value in labels]
        if flat:
            final = self.store.add_labels(flat, retention_s=self.retention_s)
            for r in final:  # pruned between the lookup and the write
                if r.status != "stored":
                    status[r.request_id] = r.status
        results = []
        for key, labels in items:
            rid = target(key)
            s = status[rid]
            for kind, _ in labels:
                self.metrics.feedback.labels(kind, s).inc()
            if isinstance(key, ClientRequestId) and s == "ambiguous":
                results.append({"client_request_id": key, "status": 409,
                                "error": f"ambiguous client_request_id {key!r}: {len(resolved[key])} observations "
                                         "carry it (the client reused its x-request-id); post with request_id "
                                         "(the x-lockgate-request-id response header)"})
            elif isinstance(key, ClientRequestId) and s == "unknown":
                results.append({"client_request_id": key, "status": 404,
                                "error": f"unknown client_request_id {key!r}: no observation carries it"})
            elif s == "stored":
                results.append({"request_id": rid, "status": 200, "stored": [k for k, _ in labels]})
            elif s == "expired":
                results.append({"request_id": rid, "status": 410,
                                "error": f"expired request_id {rid!r}: its observation is older than the "
                                         f"retention ({self.retention_s / 86400:g} days) and was pruned"})
            else:
                results.append({"request_id": rid, "status": 404,
                                "error": f"unknown request_id {rid!r}: no observation with this id"})
        stored = sum(1 for r in results if r["status"] == 200)
        if not was_list:
            r = results[0]
            if r["status"] != 200:
                return r["status"], {k: v for k, v in r.items() if k != "status"}
            return 200, {"stored": 1, "request_id": r["request_id"], "labels": r["stored"]}
        return (200 if stored == len(results) else 207), {"stored": stored, "results": results}

    def _resolve_client_ids(self, items: list, deadline: float) -> dict[str, list[str]]:
        """``client_request_id -> [request ids]`` for the items keyed by one; an id not found yet is
        re-checked until ``deadline`` (its observation may still be on its way)."""
        keys = [rid for rid, _ in items if isinstance(rid, ClientRequestId)]
        if not keys:
            return {}
        found = self.store.resolve_client_ids(keys)
        while any(not v for v in found.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
            found.update(self.store.resolve_client_ids([k for k, v in found.items() if not v]))
        return {ClientRequestId(k): v for k, v in found.items()}

    def observation(self, request_id: str) -> tuple[int, dict[str, Any]]:
        rows = self.store.get(request_id)
        if not rows:
            st = self.store.lookup_status([request_id])[request_id]
            if st == "expired":
                return 410, {"error": f"expired request_id {request_id!r}: pruned by retention"}
            return 404, {"error": f"unknown request_id {request_id!r}"}
        out = {"request_id": request_id,
               "observations": [{**record_to_json(r), "source": r.get("source"), "received_ts": r["received_ts"]}
                                for r in rows]}
        sample = self.samples.get(request_id) if self.samples is not None else None
        if sample is not None:
            out["body_sample"] = sample_json(sample)
        return 200, out


__all__ = ["ControllerHTTP", "FeedbackError", "HttpLimits", "parse_feedback"]
