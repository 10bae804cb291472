"""An ADS client that behaves like an Envoy whose build rejects lockgate's routes: it ACKs clusters,
endpoints and listeners as Envoy does, and NACKs every route configuration (with an ``error_detail``,
as Envoy does when it cannot load one — e.g. an older Envoy that lacks a filter the routes configure).

    python -m tests.fake_ads --xds HOST:PORT --node NODE_ID [--token-file FILE]

Prints ``ready`` after its first route NACK, then ``nack <version>`` per NACK; runs until SIGTERM.
A real Envoy 1.40 cannot be made to reject routes that the other Envoys of the same fleet accept (the
xDS server sends every node the same snapshot, and nothing in a bootstrap changes how RDS is
validated), so the NACKing fleet member of ``tests/integration/test_hosts.py`` is this client.
"""

from __future__ import annotations

import argparse
import queue
import signal
import sys

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from lockgate.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, ROUTE_CONFIG_NAME

NACK_MESSAGE = "fake_ads: this Envoy build cannot load the route configuration (test NACK)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--xds", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--token-file")
    args = ap.parse_args()
    metadata = []
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            metadata.append(("authorization", f"Bearer {f.read().strip()}"))
    requests: queue.Queue = queue.Queue()
    node = base_pb2.Node(id=args.node, cluster="lockgate")

    def gen():
        while True:
            item = requests.get()
            if item is None:
                return
            yield item

    requests.put(discovery_pb2.DiscoveryRequest(type_url=CLUSTER_TYPE, node=node))
    requests.put(discovery_pb2.DiscoveryRequest(type_url=LISTENER_TYPE))
    channel = grpc.insecure_channel(args.xds)
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(gen(), metadata=metadata)
    signal.signal(signal.SIGTERM, lambda *_: (requests.put(None), call.cancel()))
    ready = False
    eds_names: list[str] = []
    rds_asked = False
    try:
        for resp in call:
            if resp.type_url == ROUTE_TYPE:
                requests.put(discovery_pb2.DiscoveryRequest(
                    type_url=ROUTE_TYPE, version_info="", resource_names=[ROUTE_CONFIG_NAME],
                    response_nonce=resp.nonce, error_detail=status_pb2.Status(code=3, message=NACK_MESSAGE)))
                print("ready" if not ready else f"nack {resp.version_info}", flush=True)
                ready = True
                continue
            names = []
            if resp.type_url == ENDPOINT_TYPE:
                names = eds_names
            requests.put(discovery_pb2.DiscoveryRequest(type_url=resp.type_url, version_info=resp.version_info,
                                                        resource_names=names, response_nonce=resp.nonce))
            if resp.type_url == CLUSTER_TYPE:
                from envoy.config.cluster.v3 import cluster_pb2

                new = []
                for a in resp.resources:
                    c = cluster_pb2.Cluster()
                    a.Unpack(c)
                    new.append(c.name)
                if sorted(new) != sorted(eds_names):
                    eds_names = sorted(new)
                    requests.put(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT_TYPE, resource_names=eds_names))
            elif resp.type_url == LISTENER_TYPE and not rds_asked:
                rds_asked = True
                requests.put(discovery_pb2.DiscoveryRequest(type_url=ROUTE_TYPE, resource_names=[ROUTE_CONFIG_NAME]))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            print(f"stream ended: {exc.code().name} {exc.details()}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
