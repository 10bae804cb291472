"""``lockgate xds``: the ADS server and the weight control API in one asyncio process.

Several may share one weight store (high availability): each serves every weight saved through any
of them, and counts the Envoys of all of them (:meth:`lockgate.xds.control.WeightService.run_sync`)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from envoy.service.discovery.v3 import ads_pb2_grpc

from lockgate.aio import stop_on_signals
from lockgate.config import LockgateConfig
from lockgate.grpc_auth import add_port, server_interceptors, warn_if_insecure
from lockgate.proto.v1 import control_pb2_grpc
from lockgate.xds.ads import AdsServer
from lockgate.xds.control import ControlServer, WeightService
from lockgate.xds.store import WeightStore

log = logging.getLogger("lockgate.xds")

GRPC_OPTIONS = [("grpc.keepalive_time_ms", 30000), ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.keepalive_permit_without_calls", 1)]


async def serve(config: LockgateConfig, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT). Weights are loaded before the first answer.

    With ``auth.tokens`` both APIs refuse callers without a configured bearer token (an Envoy too:
    its bootstrap sends one, see :mod:`lockgate.envoy_proc`); ``auth.tls`` puts both behind (m)TLS."""
    warn_if_insecure(config, "lockgate xds")
    store = WeightStore(config.db_path)
    service = WeightService(config, store, address=f"xds={config.xds} control={config.control}")
    xds_server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=server_interceptors(config.auth, "ADS"))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AdsServer(service.cache, service.registry),
                                                                  xds_server)
    add_port(xds_server, str(config.xds), config.auth)
    control_server = grpc.aio.server(interceptors=server_interceptors(config.auth, "control API"))
    control_pb2_grpc.add_WeightControlServicer_to_server(ControlServer(service), control_server)
    add_port(control_server, str(config.control), config.auth)
    await xds_server.start()
    await control_server.start()
    stop = stop_on_signals(stop or asyncio.Event())
    log.info("xDS on %s, control API on %s, routes version %s, state %s, auth %s", config.xds, config.control,
             service.cache.snapshot.version, config.db_path,
             "off" if not config.auth.enabled else f"on ({len(config.auth.tokens)} clients)")
    print(f"ready xds={config.xds} control={config.control}", flush=True)
    if ready is not None:
        ready.set()
    sync_stop = asyncio.Event()
    sync = asyncio.ensure_future(service.run_sync(sync_stop))  # in step with other servers of the store
    await stop.wait()
    await control_server.stop(0.5)
    await xds_server.stop(0.5)
    sync_stop.set()
    await sync
    store.close()
