"""``lockgate extproc``: the ext_proc gRPC server beside each Envoy.

It is never on the routing decision (Envoy splits by hash policy, see :mod:`lockgate.xds.sticky`)
and Envoy runs it with ``failure_mode_allow``: if this process dies, requests flow, split and sticky.
Envoy sends it response headers (with attributes naming what it routed) and the response body in
STREAMED chunks; every message is answered "continue unchanged" (nothing is ever mutated, so the
client gets byte-identical responses), and the analysis runs after the answers except a body
chunk's feed (a buffer append or an incremental SSE parse), so streamed tokens are not held back.
Each response becomes one :class:`Observation`, shipped in batches to the controller
(:mod:`.shipper`). One exception to "never on the routing decision": a request carrying the QA
override headers sends its request headers here for the token check (:class:`QACheck`), which
removes the token header and tells Envoy (dynamic metadata) which version it may reach.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from lockgate import series
from lockgate.aio import keep_helper_threads_demoted, stop_on_signals
from lockgate.config import LockgateConfig, QAOverride
from lockgate.extproc.capture import ATTR_NS, ResponseCapture, analyzer_config, body_sampler
from lockgate.extproc.ledger import Ledger, claim_ended
from lockgate.extproc.outcomes import AccessLogReceiver
from lockgate.extproc.shipper import ObservationShipper
from lockgate.grpc_auth import own_token, warn_if_insecure
from lockgate.proto.v1 import observations_pb2 as obs_pb2
from lockgate.routing import QA_METADATA_KEY, QA_METADATA_NS, key_headers

log = logging.getLogger("lockgate.extproc")

_CONTINUE_RESPONSE_HEADERS = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
_CONTINUE_REQUEST_HEADERS = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
_CONTINUE_RESPONSE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
_CONTINUE_RESPONSE_TRAILERS = ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
_EOF = grpc.aio.EOF


def load_key_secret(state_dir: Path) -> bytes:
    """Secret for hashing sticky keys (shared by every ext_proc process on this state dir)."""
    path = state_dir / "user-key.secret"
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    return path.read_bytes()


class CaptureMetrics:
    """Prometheus series of what passed, by model/version/role (no per-user labels). The traffic
    series are :mod:`lockgate.series`'s definitions, the same the controller exports (replays excluded)."""

    def __init__(self, registry: CollectorRegistry):
        labels = list(series.TRAFFIC_LABELS)
        self.requests = series.REQUESTS.create(registry)
        self.latency = series.REQUEST_DURATION.create(registry)
        self.ttfb = series.TIME_TO_FIRST_BYTE.create(registry)
        self.tokens = series.OUTPUT_TOKENS.create(registry)
        self.refusals = series.REFUSALS.create(registry)
        self.classes = series.PREDICTED_CLASS.create(registry)
        self.parse_errors = Counter("lockgate_capture_parse_errors", "Bodies that could not be analysed",
                                    labels + ["error"], registry=registry)
        self.dropped = Counter("lockgate_observations_dropped", "Observations dropped (queue full or unsent)",
                               registry=registry)
        self.shipped = Counter("lockgate_observations_shipped", "Observations delivered to the controller",
                               registry=registry)
        self.queued = Gauge("lockgate_observations_queued", "Observations waiting for the controller",
                            registry=registry)
        self.unacked_at_exit = Counter("lockgate_ended_process_unacked_observations",
                                       "Observations ext_proc processes that died before this one left neither "
                                       "acknowledged nor dropped (read from their ledgers at this start; the "
                                       "controller counts the exact loss)", registry=registry)
        self.stream_outcomes = series.STREAM_OUTCOMES.create(registry)
        self.qa_checks = Counter("lockgate_qa_override_checks", "QA override tokens checked (accepted/refused)",
                                 ["result"], registry=registry)
        self._class_label = series.ClassLabels()
        self._children: dict[tuple, tuple] = {}

    def record(self, o: obs_pb2.Observation) -> None:
        lv = (o.model, o.version, o.role)
        if o.parse_error:
            self.parse_errors.labels(*lv, o.parse_error).inc()
        if o.replay:  # not traffic (lockgate.series)
            return
        key = (lv, o.status_code // 100)
        children = self._children.get(key)
        if children is None:  # label lookups once per (model, version, role, status class)
            children = self._children[key] = (
                self.requests.labels(*lv, series.status_class(o.status_code)), self.latency.labels(*lv),
                self.ttfb.labels(*lv), self.tokens.labels(*lv), self.refusals.labels(*lv))
        requests, latency, ttfb, tokens, refusals = children
        requests.inc()
        if o.HasField("duration_ms"):
            latency.observe(o.duration_ms / 1000)
        if o.HasField("ttfb_ms"):
            ttfb.observe(o.ttfb_ms / 1000)
        if o.HasField("output_tokens"):
            tokens.observe(o.output_tokens)
        if o.HasField("refusal") and o.refusal:
            refusals.inc()
        if o.predicted_class:
            self.classes.labels(*lv, self._class_label(o.model, o.predicted_class)).inc()


class ExtProcServer(ep_grpc.ExternalProcessorServicer):
    def __init__(self, config: LockgateConfig, shipper: ObservationShipper, metrics: CaptureMetrics):
        self.models = {m.name: m for m in config.models}
        self.analyzer_cfg = analyzer_config(config)
        self.key_secret = load_key_secret(config.state_dir)
        self.header_names = key_headers(config)
        self.sampler = body_sampler(config)  #: capture.retain_bodies; None = off
        self.shipper = shipper
        self.metrics = metrics
        self.qa = QACheck(config.qa_override, metrics) if config.qa_override is not None else None
        #: capture.mode observability: Envoy does not wait for (and ignores) answers to response messages,
        #: so none are sent; the QA check (request headers, its own waiting filter) is still answered
        self.observe = config.capture.mode == "observability"

    def _done(self, cap: ResponseCapture, end_of_stream: bool, owed: bool = False) -> None:
        obs = cap.finish(time.time(), end_of_stream)
        self.shipper.offer(obs, owed)
        self.metrics.record(obs)

    def _start(self, req: ep.ProcessingRequest, now: float) -> ResponseCapture | None:
        try:
            return ResponseCapture.start(req.response_headers, req.attributes.get(ATTR_NS), now, self.models,
                                         self.analyzer_cfg, self.key_secret, self.header_names, self.sampler)
        except Exception:  # never let capture break the stream
            log.exception("capture failed to start")
            return None

    async def Process(self, request_iterator, context):
        # The read/write API, not an async generator: measured ~1.2x less CPU per message on grpcio
        # 1.85 (bench/capture.py). Envoy waits for each answer, so the answer goes first where the
        # work is not cheap: response headers are answered, then read (~17 us); a body chunk is fed
        # first (a buffer append or an incremental SSE parse) so a cancelled write loses nothing.
        # The last answer goes out through _send_last and the observation is finished after the
        # handler returned. If the RPC is cancelled at an ``await`` (Envoy or the client went away
        # mid-body), ``finally`` completes the observation with what was fed.
        if self.observe:
            return await self._observe(context)
        cap: ResponseCapture | None = None
        ended = False  # end of stream seen (the body is complete)
        read, write = context.read, context.write
        try:
            while True:
                req = await read()
                if req is _EOF:
                    return
                which = req.WhichOneof("request")
                if which == "response_body":
                    body = req.response_body
                    if cap is not None:
                        cap.feed(body.body)
                    if not body.end_of_stream:
                        await write(_CONTINUE_RESPONSE_BODY)
                        continue
                    last = _CONTINUE_RESPONSE_BODY
                elif which == "response_headers":
                    now = time.time()
                    if not req.response_headers.end_of_stream:
                        try:
                            await write(_CONTINUE_RESPONSE_HEADERS)
                        finally:  # also when cancelled at the write: the body may still be fed or finished
                            cap = self._start(req, now)
                        continue
                    cap = self._start(req, now)  # a bodiless response (204, HEAD): headers are all
                    last = _CONTINUE_RESPONSE_HEADERS
                elif which == "response_trailers":
                    last = _CONTINUE_RESPONSE_TRAILERS
                elif which == "request_headers":  # only requests on a QA check route (qa_routes)
                    await write(self.qa.answer(req.request_headers) if self.qa is not None
                                else _CONTINUE_REQUEST_HEADERS)
                    continue
                else:
                    log.debug("unexpected ext_proc message %s", which)
                    continue
                # nothing more will come: answer, end the RPC ourselves (don't wait for Envoy), and
                # finish the observation once the handler has returned and the status is on its way
                ended = True
                if cap is not None:  # counted before Envoy has the last answer: if this process is killed
                    self.shipper.owe()  # from here on, the observation is counted lost, never silently
                await _send_last(write, last)
                if cap is not None:
                    asyncio.get_running_loop().call_soon(self._done, cap, True, True)
                    cap = None
                return
        finally:
            if cap is not None:  # cancelled at an await, or the stream ended mid-body
                self._done(cap, ended, ended)

    async def _observe(self, context) -> None:
        """``capture.mode: observability``: Envoy sends the response's messages without waiting, so nothing
        is answered but the QA check; the RPC is ended here at the last message (Envoy would otherwise keep
        the stream open up to ``capture.deferred_close_ms``). The clock is read when a message is read, as
        in inline mode, but here Envoy did not wait for it: a backlogged process reads late and the
        observation's ``ttfb_ms``/``duration_ms`` grow by that backlog (docs/observations.md)."""
        cap: ResponseCapture | None = None
        ended = False
        read = context.read
        try:
            while True:
                req = await read()
                if req is _EOF:
                    return
                which = req.WhichOneof("request")
                if which == "response_body":
                    body = req.response_body
                    if cap is not None:
                        cap.feed(body.body)
                    if not body.end_of_stream:
                        continue
                elif which == "response_headers":
                    cap = self._start(req, time.time())
                    if not req.response_headers.end_of_stream:
                        continue
                elif which == "request_headers":  # the QA check filter's stream: it waits for this answer
                    await context.write(self.qa.answer(req.request_headers) if self.qa is not None
                                        else _CONTINUE_REQUEST_HEADERS)
                    continue
                elif which != "response_trailers":
                    log.debug("unexpected ext_proc message %s", which)
                    continue
                ended = True
                if cap is not None:
                    self._done(cap, True)
                    cap = None
                return
        finally:
            if cap is not None:  # cancelled, or the stream ended mid-body
                self._done(cap, ended)


class QACheck:
    """The QA override's token check (see ``lockgate.xds.resources.qa_routes``).

    Envoy sends the request headers of a request carrying both QA headers (and of no other request).
    The answer always removes the token header and clears the route cache; when the token's sha256
    matches (constant-time compare) it also sets dynamic metadata ``lockgate.qa.version`` to the
    version header, which the ``<model>/qa/<version>`` routes match. The token itself never leaves
    this process: Envoy's configuration holds neither it nor its hash."""

    def __init__(self, qa: QAOverride, metrics: CaptureMetrics | None = None):
        self.token_header = qa.token_header
        self.version_header = qa.version_header
        self._digest = hashlib.sha256(qa.token.encode("utf-8")).digest()
        self._accepted = metrics.qa_checks.labels("accepted") if metrics is not None else None
        self._refused = metrics.qa_checks.labels("refused") if metrics is not None else None

    def answer(self, headers: ep.HttpHeaders) -> ep.ProcessingResponse:
        token = version = None
        for h in headers.headers.headers:
            if h.key == self.token_header:
                token = h.raw_value or h.value.encode("utf-8")
            elif h.key == self.version_header:
                version = (h.raw_value or h.value.encode("utf-8")).decode("utf-8", "replace")
        ok = token is not None and hmac.compare_digest(hashlib.sha256(token).digest(), self._digest)
        resp = ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=ep.CommonResponse(
            header_mutation=ep.HeaderMutation(remove_headers=[self.token_header]), clear_route_cache=True)))
        if ok and version:
            resp.dynamic_metadata.fields[QA_METADATA_NS].struct_value.fields[QA_METADATA_KEY].string_value = version
        counter = self._accepted if ok else self._refused
        if counter is not None:
            counter.inc()
        return resp


async def _send_last(write, answer: ep.ProcessingResponse) -> None:
    """Start sending the stream's last answer and return without waiting for the send to complete.

    grpc.aio sends an RPC's final status only after the handler returns. Awaiting the last write
    first costs a completion round trip through gRPC's poller thread and the event loop; meanwhile
    Envoy, which has its answer, resets the stream, the status batch then fails on the cancelled
    call and grpcio leaks its op array (grpc/grpc#43360): ~30 B of RSS per response, measured.
    Started here, the status follows the message at once (RSS flat over 300k responses, and Envoy
    sees the RPC end first on ~2/3 of streams instead of ~1/6). One loop turn (``sleep(0)``; tasks
    run in the order scheduled) lets the write task start its send batch before the handler returns,
    so the message still precedes the status. A failed send (the RPC was cancelled) is retrieved
    and dropped: Envoy goes on without the answer (``failure_mode_allow``)."""
    task = asyncio.ensure_future(write(answer))
    task.add_done_callback(_retrieve)
    await asyncio.sleep(0)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("last ext_proc answer not sent: %r", task.exception())


async def serve(config: LockgateConfig, stop: asyncio.Event | None = None, index: int = 0,
                demote_threads: bool = False) -> None:
    """Serve ext_proc process ``index`` (of ``config.extproc_processes``) until SIGTERM/SIGINT.

    ``demote_threads``: this process is the ext_proc alone (``lockgate extproc``): put gRPC's helper
    threads under SCHED_BATCH so they stop preempting the event loop (:func:`demote_helper_threads`)."""
    warn_if_insecure(config, f"lockgate extproc {index}")
    registry = CollectorRegistry()
    metrics = CaptureMetrics(registry)
    cap = config.capture
    # auth.tokens: the controller's observations API knows this process by lockgate's own token
    shipper = ObservationShipper([str(a) for a in config.collector_addresses()], cap.queue_size, cap.batch_size,
                                 cap.flush_interval_s, on_drop=metrics.dropped.inc, on_sent=metrics.shipped.inc,
                                 auth=config.auth, token=own_token(config.auth, "ext_proc"))
    metrics.queued.set_function(lambda: len(shipper.queue))
    # what this process captures is counted in a file that outlives a SIGKILL; the ledgers of ext_proc
    # processes that died before delivering everything are claimed and reported (lockgate/extproc/ledger.py)
    ledger_dir = config.state_dir / "extproc-ledgers"
    shipper.ledger = Ledger(ledger_dir, shipper.source)
    shipper.ended = claim_ended(ledger_dir, own=shipper.ledger.path)
    for c in shipper.ended:
        k = c.counts
        log.warning("ext_proc %s (pid %d) ended before its controller acknowledged everything: captured %d, "
                    "acknowledged %d, dropped %d; reporting it (up to %d observations lost)", k.source, k.pid,
                    k.captured, k.acked, k.dropped, k.unacked)
        metrics.unacked_at_exit.inc(k.unacked)
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(ExtProcServer(config, shipper, metrics), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(
        AccessLogReceiver({m.name: m for m in config.models}, shipper,
                          lambda o: metrics.stream_outcomes.labels(o.model, o.version, o.role, o.error_kind).inc()),
        server)
    address = config.extproc_addresses()[index]
    metrics_address = config.extproc_metrics_address(index)
    server.add_insecure_port(str(address))
    await server.start()
    shipper.start()
    start_http_server(metrics_address.port, addr=metrics_address.host, registry=registry)
    demoter = asyncio.ensure_future(keep_helper_threads_demoted()) if demote_threads else None
    stop = stop_on_signals(stop or asyncio.Event())
    print(f"ready extproc={address} metrics={metrics_address} "
          f"controller={config.controller.address}", flush=True)
    await stop.wait()
    if demoter is not None:
        demoter.cancel()
    await server.stop(0.5)
    await shipper.close()
