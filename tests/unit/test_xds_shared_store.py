"""Two xDS servers on one weight store (high availability), driven through the real ADS protocol code
(AdsServer over in-process streams, no Envoy) and a real SQLite store shared by both.

* a weight saved through either server is served by both, under the same version;
* "every Envoy ACKed" counts the Envoys of both servers;
* a drill through one re-sends the routes on the other too;
* when a server stops (its heartbeat stops moving), a revert through the other is complete only once
  the Envoys that held the canary reconnected to it and ACKed weight 0.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from lockgate.config import config_from_text

from lockgate.xds import control
from lockgate.xds.ads import AdsServer
from lockgate.xds.control import WeightError, WeightService
from lockgate.xds.resources import ENDPOINT_TYPE, ROUTE_TYPE
from lockgate.xds.store import WeightStore
from tests.unit.test_ads_protocol import req
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)
from tests.unit.test_revert import connect, routes_weight


class Server:
    def __init__(self, cfg, name: str):
        self.store = WeightStore(cfg.db_path)
        self.svc = WeightService(cfg, self.store, server_id=name)
        self.ads = AdsServer(self.svc.cache, self.svc.registry)
        self.stop = asyncio.Event()
        self.task = asyncio.ensure_future(self.svc.run_sync(self.stop))

    async def close(self) -> None:
        self.stop.set()
        await self.task
        self.store.close()

    def kill(self) -> None:
        """As kill -9 would: no goodbye in the store, the heartbeat just stops."""
        self.task.cancel()
        self.store.close()


async def until(cond, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def keep_acking(ads: AdsServer, stream, stop: asyncio.Event) -> None:
    """An Envoy that applies and ACKs every update it gets."""
    names = {ENDPOINT_TYPE: ["chat.v1", "chat.v2"], ROUTE_TYPE: ["lockgate"]}
    while not stop.is_set() and stream.connected:
        for r in ads._pending_sends(stream):
            await ads._on_request(stream, req(r.type_url, r.version_info, r.nonce, names.get(r.type_url, ())))
        await asyncio.sleep(0.005)


@pytest.fixture(params=["sqlite", "postgresql"])
def cfg(request, tmp_path):
    """The fleet's config, its weight store on SQLite (a file both servers open) or PostgreSQL."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    return config_from_text(f"""
state_dir: {tmp_path}
{f"database: {url}" if url else ""}
xds_servers: [{{xds: "127.0.0.1:18000", control: "127.0.0.1:18010"}}, {{xds: "127.0.0.1:18100", control: "127.0.0.1:18110"}}]
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:1"]}}, v2: {{endpoints: ["127.0.0.1:2"]}},
          v3: {{endpoints: ["127.0.0.1:3"]}}}}}}]
""")


@pytest.fixture
def fast_death(monkeypatch):
    monkeypatch.setattr(control, "SERVER_DEAD_AFTER_S", 0.5)
    monkeypatch.setattr(control, "HEARTBEAT_S", 0.1)


def test_two_servers_serve_one_set_of_weights_and_count_each_others_envoys(cfg, fast_death):
    async def run():
        a, b = Server(cfg, "xds-a"), Server(cfg, "xds-b")
        e0 = await connect(a.ads, a.svc, "e0")
        e1 = await connect(b.ads, b.svc, "e1")
        stop = asyncio.Event()
        ackers = [asyncio.ensure_future(keep_acking(a.ads, e0, stop)),
                  asyncio.ensure_future(keep_acking(b.ads, e1, stop))]
        await until(lambda: "xds-b" in a.svc.live_servers and "xds-a" in b.svc.live_servers)
        await until(lambda: "e1" in a.svc.records and a.svc.records["e1"].connected)
        # a change through A: served by B too, under the same version; both Envoys counted
        resp = await a.svc.set_weight("chat", "v2", 1000, actor="t", reason="t", timeout_s=5)
        assert resp.all_acked, resp
        assert sorted(e.node_id for e in resp.model.envoys) == ["e0", "e1"]
        assert all(e.acked and e.acked_weight_bp == 1000 for e in resp.model.envoys), resp.model.envoys
        assert routes_weight(b.svc) == 1000 and routes_weight(a.svc) == 1000
        assert a.svc.cache.snapshot.type_versions[ROUTE_TYPE] == b.svc.cache.snapshot.type_versions[ROUTE_TYPE]
        # and through B: A serves it; GetWeights on either shows both Envoys at 20 %
        resp = await b.svc.set_weight("chat", "v2", 2000, actor="t", reason="t", timeout_s=5)
        assert resp.all_acked and routes_weight(a.svc) == 2000, resp
        await until(lambda: all(e.acked_weight_bp == 2000 for e in a.svc.model_state("chat").envoys))
        assert len(a.svc.model_state("chat").envoys) == 2
        v_before = b.svc.cache.snapshot.version
        # a drill through B re-sends the routes on A as well (both Envoys ACK the new routes version)
        resp = await b.svc.drill("chat", actor="t", timeout_s=5)
        assert resp.all_acked and b.svc.cache.snapshot.version > v_before, resp
        assert e0.types[ROUTE_TYPE].acked_version == a.svc.cache.snapshot.type_versions[ROUTE_TYPE]
        # versions only grow and agree: every save allocates the next one in the store
        assert a.svc.store.last_version() == b.svc.store.last_version()
        # B dies (no goodbye); e1 has not reconnected: a revert through A is not complete, naming e1 ...
        b.kill()
        await until(lambda: "xds-b" not in a.svc.live_servers)
        resp = await a.svc.rollback("chat", actor="t", reason="harm", timeout_s=1)
        assert not resp.all_acked and resp.persisted
        assert resp.not_acked == ["e1 (not connected to a live xDS server; last ACKed v2 at 20%)"], resp.not_acked
        # ... until e1 reconnects to A and ACKs weight 0 (what Envoy does when its stream fails over)
        e1a = await connect(a.ads, a.svc, "e1")
        assert routes_weight(a.svc) == 0
        resp = await a.svc.rollback("chat", actor="t", reason="retry", timeout_s=5)
        assert resp.all_acked and not resp.not_acked, resp
        assert e1a.types[ROUTE_TYPE].acked_version is not None
        stop.set()
        await asyncio.gather(*ackers)
        await a.close()

    asyncio.run(run())


def test_a_second_canary_is_refused_across_servers(cfg):
    async def run():
        a, b = Server(cfg, "xds-a"), Server(cfg, "xds-b")
        await a.svc.set_weight("chat", "v2", 1000, actor="t", reason="t", timeout_s=0.1)
        with pytest.raises(WeightError) as exc:
            await b.svc.set_weight("chat", "v3", 500, actor="t", reason="t", timeout_s=0.1)
        assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION and "already has canary 'v2'" in str(exc.value)
        resp = await b.svc.set_weight("chat", "v2", 3000, actor="t", reason="t", timeout_s=0.1)
        assert resp.model.weight_bp == 3000
        await until(lambda: a.svc.weights["chat"].weight_bp == 3000)
        await a.close()
        await b.close()

    asyncio.run(run())
