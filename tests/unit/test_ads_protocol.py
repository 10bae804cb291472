"""ADS protocol rules (ACK, NACK, stale and repeated nonces, clusters before routes) without Envoy.

The same paths run against the real Envoy in tests/integration; these pin the edge cases."""

from __future__ import annotations

import asyncio

from google.rpc import status_pb2

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from lockgate.config import config_from_text
from lockgate.xds.ads import AdsServer
from lockgate.xds.control import WeightService
from lockgate.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from lockgate.xds.store import WeightStore


def make(tmp_path):
    cfg = config_from_text(f"""
state_dir: {tmp_path}
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:1"]}}, v2: {{endpoints: ["127.0.0.1:2"]}}}}}}]
""")
    store = WeightStore(cfg.db_path)
    return cfg, store


def req(type_url, version="", nonce="", names=(), error=None, node=None):
    r = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=version, response_nonce=nonce,
                                       resource_names=list(names))
    if node:
        r.node.CopyFrom(base_pb2.Node(id=node))
    if error:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


def test_ack_nack_stale_and_repeat(tmp_path):
    async def run():
        cfg, store = make(tmp_path)
        svc = WeightService(cfg, store)
        ads = AdsServer(svc.cache, svc.registry)
        s = svc.registry.open("peer")
        (cds,) = await ads._on_request(s, req(CLUSTER_TYPE, node="e0"))
        assert s.node_id == "e0" and len(cds.resources) == 2
        # Routes asked for before clusters were ACKed: held back.
        assert await ads._on_request(s, req(LISTENER_TYPE)) == []
        out = await ads._on_request(s, req(CLUSTER_TYPE, cds.version_info, cds.nonce))
        assert [r.type_url for r in out] == [LISTENER_TYPE]  # released by the CDS ACK
        lds = out[0]
        (eds,) = await ads._on_request(s, req(ENDPOINT_TYPE, names=["chat.v1", "chat.v2"]))
        assert sorted(r.type_url for r in [eds]) == [ENDPOINT_TYPE] and len(eds.resources) == 2
        await ads._on_request(s, req(ENDPOINT_TYPE, eds.version_info, eds.nonce, ["chat.v1", "chat.v2"]))
        assert s.types[ENDPOINT_TYPE].acked_version == int(eds.version_info)
        # A repeat of the ACKed EDS nonce (Envoy does this after a CDS update) is answered.
        (again,) = await ads._on_request(s, req(ENDPOINT_TYPE, eds.version_info, eds.nonce, ["chat.v1", "chat.v2"]))
        assert again.nonce != eds.nonce
        await ads._on_request(s, req(LISTENER_TYPE, lds.version_info, lds.nonce))
        (rds,) = await ads._on_request(s, req(ROUTE_TYPE, names=["lockgate"]))
        await ads._on_request(s, req(ROUTE_TYPE, rds.version_info, rds.nonce, ["lockgate"]))
        # NACK of a newer version is recorded and the ACKed version stays.
        task = asyncio.ensure_future(svc.set_weight("chat", "v2", 500, actor="t", reason="t", timeout_s=2))
        await asyncio.sleep(0.05)
        (new_rds,) = ads._pending_sends(s)
        assert int(new_rds.version_info) > int(rds.version_info)
        assert await ads._on_request(s, req(ROUTE_TYPE, rds.version_info, "stale-nonce", ["lockgate"])) == []
        await ads._on_request(s, req(ROUTE_TYPE, rds.version_info, new_rds.nonce, ["lockgate"], error="bad weights"))
        resp = await task
        assert not resp.all_acked and resp.not_acked == ["e0 (nacked)"]
        assert s.types[ROUTE_TYPE].acked_version == int(rds.version_info)
        assert s.types[ROUTE_TYPE].nack_error == "bad weights"
        state = svc.model_state("chat")
        assert state.envoys[0].nack_error == "bad weights" and not state.envoys[0].acked
        store.close()

    asyncio.run(run())


def test_restart_serves_persisted_weights_with_a_higher_version(tmp_path):
    async def run():
        cfg, store = make(tmp_path)
        svc = WeightService(cfg, store)
        resp = await svc.set_weight("chat", "v2", 2500, actor="t", reason="t", timeout_s=0.1)
        assert resp.message == "no Envoy connected" and not resp.all_acked
        v1 = svc.cache.snapshot.version
        routes1 = svc.cache.snapshot.resources[ROUTE_TYPE]
        store.close()
        cfg, store2 = make(tmp_path)
        svc2 = WeightService(cfg, store2)
        assert svc2.weights["chat"].weight_bp == 2500 and svc2.weights["chat"].canary == "v2"
        assert svc2.cache.snapshot.version > v1
        assert svc2.cache.snapshot.resources[ROUTE_TYPE] == routes1
        changes = store2.changes("chat")
        assert changes[0]["to_bp"] == 2500 and changes[0]["actor"] == "t"
        store2.close()

    asyncio.run(run())
