"""``lockgate extproc``: the ext_proc gRPC server beside each Envoy.

It is never on the routing decision (Envoy splits by hash policy, see :mod:`lockgate.extproc.keys`),
and Envoy runs it with ``failure_mode_allow``: if this process dies, requests flow, split and sticky.
Per response it reads what Envoy actually routed (``xds.cluster_name`` and ``xds.route_name``
response attributes) and counts it; it never mutates a request or a response.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from prometheus_client import CollectorRegistry, Counter, start_http_server

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from lockgate.config import LockgateConfig
from lockgate.xds.resources import parse_cluster_name

log = logging.getLogger("lockgate.extproc")
ATTR_NS = "envoy.filters.http.ext_proc"

_CONTINUE_RESPONSE_HEADERS = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
_CONTINUE_REQUEST_HEADERS = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
_CONTINUE_RESPONSE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())


class RoutedCounter:
    """Responses per (model, version, role, path): what Envoy routed, as Prometheus counters."""

    def __init__(self, config: LockgateConfig, registry: CollectorRegistry):
        self.stable = {m.name: m.stable for m in config.models}
        self.counter = Counter("lockgate_routed_responses", "Responses by the model version Envoy routed to",
                               ["model", "version", "role", "path"], registry=registry)

    def record(self, cluster_name: str, route_name: str) -> tuple[str, str, str] | None:
        parsed = parse_cluster_name(cluster_name)
        if parsed is None:
            return None
        model, version = parsed
        role = "baseline" if self.stable.get(model) == version else "canary"
        path = "qa" if "/qa/" in route_name else "sticky"
        self.counter.labels(model, version, role, path).inc()
        return model, version, role


class ExtProcServer(ep_grpc.ExternalProcessorServicer):
    def __init__(self, config: LockgateConfig, registry: CollectorRegistry):
        self.routed = RoutedCounter(config, registry)

    async def Process(self, request_iterator, context):
        async for req in request_iterator:
            which = req.WhichOneof("request")
            if which == "response_headers":
                attrs = req.attributes.get(ATTR_NS)
                if attrs is not None:
                    fields = attrs.fields
                    self.routed.record(fields["xds.cluster_name"].string_value if "xds.cluster_name" in fields
                                       else "", fields["xds.route_name"].string_value if "xds.route_name" in fields
                                       else "")
                yield _CONTINUE_RESPONSE_HEADERS
            elif which == "request_headers":
                yield _CONTINUE_REQUEST_HEADERS
            elif which == "response_body":
                yield _CONTINUE_RESPONSE_BODY
            else:  # trailers / request body: not requested by lockgate's processing mode
                log.debug("unexpected ext_proc message %s", which)


async def serve(config: LockgateConfig, stop: asyncio.Event | None = None) -> None:
    registry = CollectorRegistry()
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(ExtProcServer(config, registry), server)
    server.add_insecure_port(str(config.extproc))
    await server.start()
    start_http_server(config.extproc_metrics.port, addr=config.extproc_metrics.host, registry=registry)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    print(f"ready extproc={config.extproc} metrics={config.extproc_metrics}", flush=True)
    await stop.wait()
    await server.stop(0.5)
