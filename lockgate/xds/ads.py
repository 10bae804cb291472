"""Aggregated Discovery Service, State of the World: streams the cache's snapshot to each Envoy.

All protocol rules live here (ACK/NACK, nonces, ordering), as Envoy 1.40 behaves (checked by the
integration tests; Envoy's xDS protocol: https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol):

* the node id arrives only on a stream's first request: kept per stream;
* ACK = request echoing our latest nonce with no ``error_detail``; NACK = same nonce with an error
  (Envoy keeps its old config); requests with an older nonce are stale and ignored — except a
  repeat of the nonce the stream already ACKed (Envoy re-requests EDS that way after a CDS update
  and waits ~15 s if nobody answers), which is answered with the current resources;
* listeners and routes are held back while the stream has not ACKed the current clusters, so a
  route never names a cluster Envoy does not have yet;
* CDS and LDS are wildcard: every response carries all resources of the type.

With ``auth.tokens`` a stream reaches this servicer only after :class:`lockgate.grpc_auth.AuthInterceptor`
accepted its bearer token (an unauthenticated stream is closed ``UNAUTHENTICATED`` with no response).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator

from google.protobuf import any_pb2

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from lockgate.grpc_auth import current_client
from lockgate.xds.cache import NodeRegistry, SnapshotCache, StreamState
from lockgate.xds.resources import CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE, TYPE_ORDER, WILDCARD_TYPES

log = logging.getLogger("lockgate.xds.ads")


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache, registry: NodeRegistry):
        self.cache = cache
        self.registry = registry

    async def StreamAggregatedResources(self, request_iterator, context) -> AsyncIterator[
            discovery_pb2.DiscoveryResponse]:
        stream = self.registry.open(context.peer())
        client = current_client()
        if client is not None:
            log.info("ADS stream %s from %s authenticated as client %s", stream.stream_id, stream.peer, client)
        events: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    events.put_nowait(("req", req))
            except Exception as exc:  # stream broken
                log.debug("stream %s read ended: %s", stream.stream_id, exc)
            events.put_nowait(("eof", None))

        async def watch() -> None:
            seen = self.cache.snapshot.version
            while True:
                snap = await self.cache.changed(seen)
                seen = snap.version
                events.put_nowait(("change", snap.version))

        reader = asyncio.ensure_future(read())
        watcher = asyncio.ensure_future(watch())
        try:
            while True:
                kind, req = await events.get()
                if kind == "eof":
                    break
                if kind == "req":
                    responses = await self._on_request(stream, req)
                else:
                    responses = self._pending_sends(stream)
                for resp in responses:
                    yield resp
        finally:
            reader.cancel()
            watcher.cancel()
            await self.registry.close(stream)
            log.info("envoy %s (stream %s) disconnected", stream.node_id, stream.stream_id)

    async def _on_request(self, stream: StreamState, req: discovery_pb2.DiscoveryRequest) -> list:
        if req.node.id and not stream.node_id:
            stream.node_id = req.node.id
            stream.cluster = req.node.cluster
            log.info("envoy %s connected (stream %s, %s)", stream.node_id, stream.stream_id, stream.peer)
            self.registry.node_changed(stream)
        type_url = req.type_url
        ts = stream.types.get(type_url)
        if ts is None:
            log.warning("envoy %s asked for unsupported type %s", stream.node_id, type_url)
            return []
        names = set(req.resource_names)
        out = []
        if not req.response_nonce:
            # First request for this type on this stream (or after a control-plane restart).
            ts.subscribed = names
            out.append(self._response(stream, type_url, force=True))
        elif req.response_nonce != ts.sent_nonce:
            if req.response_nonce == ts.acked_nonce:  # repeat of an ACKed nonce: answer it
                ts.subscribed = names
                out.append(self._response(stream, type_url, force=True))
            # else: stale nonce, a newer response is in flight; ignore.
        elif req.HasField("error_detail"):
            ts.nack_version = ts.sent_version
            ts.nack_error = req.error_detail.message
            ts.nack_at = time.monotonic()
            log.error("envoy %s NACKed %s version %s: %s", stream.node_id, type_url.rsplit(".", 1)[-1],
                      ts.sent_version, ts.nack_error)
            self.registry.node_changed(stream)
            await self.registry.notify()
        elif req.response_nonce == ts.acked_nonce:
            ts.subscribed = names
            out.append(self._response(stream, type_url, force=True))
        else:
            ts.acked_version = ts.sent_version
            ts.acked_nonce = req.response_nonce
            ts.acked_at = time.monotonic()
            for listener in self.registry.ack_listeners:
                listener(stream, type_url)
            await self.registry.notify()
            if type_url not in WILDCARD_TYPES and names != ts.subscribed:
                ts.subscribed = names
                out.append(self._response(stream, type_url, force=True))
        out.extend(self._pending_sends(stream))
        return [r for r in out if r is not None]

    def _clusters_current(self, stream: StreamState) -> bool:
        cds = stream.types[CLUSTER_TYPE]
        want = self.cache.snapshot.type_versions[CLUSTER_TYPE]
        return cds.subscribed is None or (cds.acked_version is not None and cds.acked_version >= want)

    def _pending_sends(self, stream: StreamState) -> list:
        """Responses for every subscribed type whose snapshot version this stream has not been sent."""
        snap = self.cache.snapshot
        out = []
        for type_url in TYPE_ORDER:
            ts = stream.types[type_url]
            if ts.subscribed is None or ts.sent_version == snap.type_versions[type_url]:
                continue
            resp = self._response(stream, type_url)
            if resp is not None:
                out.append(resp)
        return out

    def _response(self, stream: StreamState, type_url: str, force: bool = False):
        snap = self.cache.snapshot
        ts = stream.types[type_url]
        if type_url in (LISTENER_TYPE, ROUTE_TYPE) and not self._clusters_current(stream):
            ts.sent_version = None  # sent once the clusters are ACKed (see _pending_sends)
            return None
        version = snap.type_versions[type_url]
        if not force and ts.sent_version == version:
            return None
        named = snap.resources[type_url]
        if type_url in WILDCARD_TYPES or not ts.subscribed:
            selected = named.values() if type_url in WILDCARD_TYPES else []
        else:
            selected = [named[n] for n in sorted(ts.subscribed) if n in named]
        resources = []
        for msg in selected:
            a = any_pb2.Any()
            a.Pack(msg)
            resources.append(a)
        nonce = uuid.uuid4().hex[:16]
        ts.sent_version = version
        ts.sent_nonce = nonce
        ts.sent_at = time.monotonic()
        return discovery_pb2.DiscoveryResponse(version_info=str(version), resources=resources, type_url=type_url,
                                               nonce=nonce)
