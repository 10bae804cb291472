"""The controller's HTTP API on ``controller.http`` (stdlib ``ThreadingHTTPServer``, one thread per request).

* ``GET /metrics`` — Prometheus text format (the controller's registry).
* ``GET /healthz`` — ``ok``.
* ``POST /v1/feedback`` — one feedback object or a list of them (see ``docs/observations.md``)::

      {"request_id": "…", "true_class": "spam", "thumbs": "up", "task_success": true, "evaluator_score": 0.8}

  Each is joined to the stored observation by request id, with the arrival time. One object:
  200 ``{"stored": 1, …}``; 404 unknown request id; 410 expired (older than the retention or pruned);
  400 malformed (naming the field). A list is validated whole first (any malformed item → 400, nothing
  stored), then every known id is stored: 200 if all were, else 207 with a per-item ``results`` list.
  An unknown id is re-checked for a short grace period (``unknown_grace_s``) before 404, since
  observations reach the controller in batches shortly after the response.
* ``GET /v1/observations/{request_id}`` — the stored observation(s) and labels, for debugging; with
  ``body_sample`` when the response body was retained (``capture.retain_bodies``).

Handlers never raise into the server: any unexpected error is a 500 JSON answer, logged.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lockgate.controller.collector import ControllerMetrics
from lockgate.controller.export import record_to_json
from lockgate.controller.observations import LABEL_KINDS, ObservationStore
from lockgate.controller.samples import sample_json

log = logging.getLogger("lockgate.controller.http")

MAX_BODY = 8 * 1024 * 1024
MAX_ITEMS = 10000
MAX_ID_LEN = 512
MAX_CLASS_LEN = 1024


class FeedbackError(ValueError):
    """A malformed feedback body; ``field`` names the offending field path."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_feedback(body: bytes) -> tuple[list[tuple[str, list[tuple[str, Any]]]], bool]:
    """Validate a feedback body → ``([(request_id, [(kind, value), …]), …], was_list)``.

    Raises :class:`FeedbackError` naming the field (``[3].thumbs``, ``request_id``, …)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise FeedbackError("<body>", "is not UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise FeedbackError("<body>", f"invalid JSON: {exc}") from None
    was_list = isinstance(data, list)
    items = data if was_list else [data]
    if was_list and not items:
        raise FeedbackError("<body>", "empty list")
    if len(items) > MAX_ITEMS:
        raise FeedbackError("<body>", f"at most {MAX_ITEMS} items per request, got {len(items)}")
    out = []
    for i, item in enumerate(items):
        prefix = f"[{i}]." if was_list else ""
        if not isinstance(item, dict):
            raise FeedbackError(f"[{i}]" if was_list else "<body>", "must be a JSON object")
        for key in item:
            if key != "request_id" and key not in LABEL_KINDS:
                raise FeedbackError(prefix + str(key),
                                    f"unknown field (known: request_id, {', '.join(LABEL_KINDS)})")
        rid = item.get("request_id")
        if not isinstance(rid, str) or not rid.strip():
            raise FeedbackError(prefix + "request_id", "is required (a non-empty string)")
        if len(rid) > MAX_ID_LEN:
            raise FeedbackError(prefix + "request_id", f"longer than {MAX_ID_LEN} characters")
        labels: list[tuple[str, Any]] = []
        for kind in LABEL_KINDS:
            if kind not in item:
                continue
            v = item[kind]
            name = prefix + kind
            if kind == "true_class":
                if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
                    raise FeedbackError(name, f"must be a non-empty string, got {json.dumps(v)}")
                v = str(v)
                if len(v) > MAX_CLASS_LEN:
                    raise FeedbackError(name, f"longer than {MAX_CLASS_LEN} characters")
            elif kind == "thumbs":
                if v not in ("up", "down"):
                    raise FeedbackError(name, f'must be "up" or "down", got {json.dumps(v)}')
            elif kind == "task_success":
                if not isinstance(v, bool):
                    raise FeedbackError(name, f"must be true or false, got {json.dumps(v)}")
            else:  # evaluator_score
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise FeedbackError(name, f"must be a finite number, got {json.dumps(v)}")
                v = float(v)
            labels.append((kind, v))
        if not labels:
            raise FeedbackError(prefix + "request_id", f"no feedback given (set one of {', '.join(LABEL_KINDS)})")
        out.append((rid, labels))
    return out, was_list


class ControllerHTTP:
    """The HTTP API; ``start()`` serves in a background thread, ``stop()`` shuts down."""

    def __init__(self, host: str, port: int, store: ObservationStore, metrics: ControllerMetrics,
                 retention_s: float, unknown_grace_s: float = 2.0, samples: Any = None):
        self.store = store
        self.samples = samples  #: SampleStore (capture.retain_bodies) or None
        self.metrics = metrics
        self.retention_s = retention_s
        self.unknown_grace_s = unknown_grace_s
        #: (method, path prefix) → fn(path, query: dict, body: bytes) -> (status, JSON object); added by
        #: other parts of the controller (e.g. the rollout API), checked before the built-in 404.
        self.routes: dict[tuple[str, str], Any] = {}
        api = self

        class Handler(_Handler):
            pass

        Handler.api = api
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def start(self) -> None:
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="controller-http", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.thread is not None:
            self.thread.join(5)

    def add_route(self, method: str, prefix: str, fn) -> None:
        self.routes[(method, prefix)] = fn

    def route(self, method: str, path: str):
        best = None
        for (m, prefix), fn in self.routes.items():
            if m == method and (path == prefix or path.startswith(prefix.rstrip("/") + "/")):
                if best is None or len(prefix) > len(best[0]):
                    best = (prefix, fn)
        return best[1] if best else None

    # ----- handlers' logic (no HTTP here) -----
    def feedback(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            items, was_list = parse_feedback(body)
        except FeedbackError as exc:
            self.metrics.feedback.labels("-", "malformed").inc()
            return 400, {"error": str(exc), "field": exc.field}
        ids = [rid for rid, _ in items]
        status = self.store.lookup_status(ids, retention_s=self.retention_s)
        deadline = time.monotonic() + self.unknown_grace_s
        while any(s == "unknown" for s in status.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
            unknown = [rid for rid, s in status.items() if s == "unknown"]
            status.update(self.store.lookup_status(unknown, retention_s=self.retention_s))
        flat = [(rid, kind, value) for rid, labels in items if status[rid] == "stored" for kind, value in labels]
        if flat:
            final = self.store.add_labels(flat, retention_s=self.retention_s)
            for r in final:  # pruned between the lookup and the write
                if r.status != "stored":
                    status[r.request_id] = r.status
        results = []
        for rid, labels in items:
            s = status[rid]
            for kind, _ in labels:
                self.metrics.feedback.labels(kind, s).inc()
            if s == "stored":
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
                return r["status"], {"error": r["error"], "request_id": r["request_id"]}
            return 200, {"stored": 1, "request_id": r["request_id"], "labels": r["stored"]}
        return (200 if stored == len(results) else 207), {"stored": stored, "results": results}

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


class _Handler(BaseHTTPRequestHandler):
    api: ControllerHTTP
    server_version = "lockgate-controller"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, (json.dumps(obj, separators=(",", ":")) + "\n").encode(), "application/json")

    def _guard(self, fn) -> None:
        try:
            fn()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # never crash the server: answer 500 and log
            log.exception("%s %s failed", self.command, self.path)
            try:
                self._json(500, {"error": f"internal error: {type(exc).__name__}"})
            except Exception:
                pass

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_HEAD(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def _path(self) -> str:
        return urllib.parse.urlsplit(self.path).path

    def _get(self) -> None:
        path = self._path()
        if path == "/metrics":
            self._send(200, generate_latest(self.api.metrics.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        elif path.startswith("/v1/observations/") and len(path) > len("/v1/observations/"):
            rid = urllib.parse.unquote(path[len("/v1/observations/"):])
            self._json(*self.api.observation(rid))
        elif path == "/v1/feedback":
            self._json(405, {"error": "use POST"})
        elif (fn := self.api.route("GET", path)) is not None:
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
            self._json(*fn(path, query, b""))
        else:
            self._json(404, {"error": f"no such endpoint {path}"})

    def _post(self) -> None:
        path = self._path()
        extra = self.api.route("POST", path) if path != "/v1/feedback" else None
        if path != "/v1/feedback" and extra is None:
            self._discard_body()
            self._json(404 if not path.startswith("/v1/observations/") and path != "/metrics" else 405,
                       {"error": f"no POST endpoint {path}"})
            return
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            self._json(411, {"error": "send a Content-Length (chunked bodies are not accepted)"})
            return
        raw_len = self.headers.get("Content-Length")
        try:
            length = int(raw_len) if raw_len is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._json(411, {"error": "Content-Length required"})
            return
        if length > MAX_BODY:
            self.close_connection = True
            self._json(413, {"error": f"body larger than {MAX_BODY} bytes"})
            return
        body = self.rfile.read(length)
        if extra is not None:
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
            self._json(*extra(path, query, body))
            return
        self._json(*self.api.feedback(body))

    def _discard_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= MAX_BODY:
            self.rfile.read(length)
        elif length:
            self.close_connection = True


__all__ = ["ControllerHTTP", "FeedbackError", "parse_feedback"]
