"""A revert you can trust (xDS side): served before it is saved, complete only when no Envoy holds the
canary, and never held hostage by one silent stream.

Driven through the real ADS protocol code (AdsServer over in-process streams, no Envoy), a real SQLite
weight store, and — for the full disk — a real tmpfs mounted by the test (root only; skipped otherwise).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from lockgate.config import config_from_text
from lockgate.xds.ads import AdsServer
from lockgate.xds.control import WeightError, WeightService
from lockgate.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from lockgate.xds.store import WeightStore
from tests.unit.test_ads_protocol import req


def make(state_dir: Path):
    cfg = config_from_text(f"""
state_dir: {state_dir}
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:1"]}}, v2: {{endpoints: ["127.0.0.1:2"]}}}}}}]
""")
    return cfg, WeightStore(cfg.db_path)


async def connect(ads: AdsServer, svc: WeightService, node: str):
    """An Envoy-like stream that subscribes to everything and ACKs up to its first routes."""
    s = svc.registry.open(node)
    (cds,) = await ads._on_request(s, req(CLUSTER_TYPE, node=node))
    assert await ads._on_request(s, req(LISTENER_TYPE)) == []  # held back until the clusters are ACKed
    (lds,) = await ads._on_request(s, req(CLUSTER_TYPE, cds.version_info, cds.nonce))
    (eds,) = await ads._on_request(s, req(ENDPOINT_TYPE, names=["chat.v1", "chat.v2"]))
    await ads._on_request(s, req(ENDPOINT_TYPE, eds.version_info, eds.nonce, ["chat.v1", "chat.v2"]))
    await ads._on_request(s, req(LISTENER_TYPE, lds.version_info, lds.nonce))
    (rds,) = await ads._on_request(s, req(ROUTE_TYPE, names=["lockgate"]))
    await ads._on_request(s, req(ROUTE_TYPE, rds.version_info, rds.nonce, ["lockgate"]))
    return s


async def ack_routes(ads: AdsServer, s) -> None:
    """ACK every pending update on the stream, in order, until a routes update was ACKed (what Envoy
    does when it applies them; clusters first, since routes wait for the clusters' ACK)."""
    names = {ENDPOINT_TYPE: ["chat.v1", "chat.v2"], ROUTE_TYPE: ["lockgate"]}
    for _ in range(200):
        sends = ads._pending_sends(s)
        for r in sends:
            await ads._on_request(s, req(r.type_url, r.version_info, r.nonce, names.get(r.type_url, ())))
        if any(r.type_url == ROUTE_TYPE for r in sends):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no routes update was sent")


def routes_weight(svc: WeightService, version: str = "chat.v2") -> int:
    """The canary weight in the routes the server hands to Envoys (the served snapshot)."""
    weights = []
    for rc in svc.cache.snapshot.resources[ROUTE_TYPE].values():
        for vh in rc.virtual_hosts:
            for route in vh.routes:
                for c in route.route.weighted_clusters.clusters:
                    if c.name == version:
                        weights.append(c.weight.value)
    assert weights, "no weighted route for the canary"
    return max(weights)


def test_a_silent_stream_does_not_hold_the_others():
    """One stream that never answers: the push returns once the others ACKed, naming it."""
    async def run(tmp: Path):
        cfg, store = make(tmp)
        svc = WeightService(cfg, store)
        ads = AdsServer(svc.cache, svc.registry)
        good = await connect(ads, svc, "e0")
        await connect(ads, svc, "silent")
        t0 = time.monotonic()
        task = asyncio.ensure_future(svc.set_weight("chat", "v2", 2000, actor="t", reason="t", timeout_s=30))
        await ack_routes(ads, good)
        resp = await task
        took = time.monotonic() - t0
        assert not resp.all_acked and resp.not_acked == ["silent (timeout)"]
        assert took < 10, took  # far less than the 30 s timeout: the silent one did not hold the call
        store.close()

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(run(Path(d)))


def test_rollback_is_not_complete_while_a_disconnected_envoy_holds_the_canary(tmp_path):
    """Envoy keeps its last routes when its xDS stream drops: it still serves the canary."""
    async def run():
        cfg, store = make(tmp_path)
        svc = WeightService(cfg, store)
        ads = AdsServer(svc.cache, svc.registry)
        e0 = await connect(ads, svc, "e0")
        e1 = await connect(ads, svc, "e1")
        task = asyncio.ensure_future(svc.set_weight("chat", "v2", 2000, actor="t", reason="t", timeout_s=5))
        await ack_routes(ads, e0)
        await ack_routes(ads, e1)
        assert (await task).all_acked
        await svc.registry.close(e1)  # e1's stream drops while it holds 20 %
        task = asyncio.ensure_future(svc.rollback("chat", actor="t", reason="bad canary", timeout_s=5))
        await ack_routes(ads, e0)
        resp = await task
        assert not resp.all_acked and resp.persisted
        assert resp.not_acked == ["e1 (disconnected, last ACKed v2 at 20%)"]
        # e1 comes back: it gets weight 0 at once; the next rollback (the controller's retry) is complete
        e1b = await connect(ads, svc, "e1")
        assert routes_weight(svc) == 0
        # (same routes as served: nothing new to push, both already ACKed them)
        resp = await svc.rollback("chat", actor="t", reason="retry", timeout_s=5)
        assert resp.all_acked and resp.persisted and not resp.not_acked
        store.close()

    asyncio.run(run())


@pytest.fixture
def tiny_disk(tmp_path):
    """An 8 MiB tmpfs for the state directory (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs (a real full disk)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Fill the file system to the last byte; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_full_disk_a_rollback_is_served_first_and_saved_when_it_can(tiny_disk):
    async def run():
        cfg, store = make(tiny_disk / "state")
        svc = WeightService(cfg, store)
        ads = AdsServer(svc.cache, svc.registry)
        e0 = await connect(ads, svc, "e0")
        task = asyncio.ensure_future(svc.set_weight("chat", "v2", 2000, actor="t", reason="t", timeout_s=5))
        await ack_routes(ads, e0)
        assert (await task).all_acked and routes_weight(svc) == 2000
        await svc.flush()  # the ACK's node record is written on the store's thread: let it finish first
        with store._lock:  # no WAL pages left to reuse: a write needs space
            store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        filler = fill(tiny_disk)
        # Raising a weight must be saved before it is served: refused, nothing changes.
        with pytest.raises(WeightError) as exc:
            await svc.set_weight("chat", "v2", 5000, actor="t", reason="t", timeout_s=2)
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE and "nothing changed" in str(exc.value)
        assert routes_weight(svc) == 2000
        # A rollback is served first: every Envoy gets weight 0 although it cannot be saved.
        task = asyncio.ensure_future(svc.rollback("chat", actor="t", reason="harm", timeout_s=5))
        await ack_routes(ads, e0)
        resp = await task
        assert routes_weight(svc) == 0 and resp.all_acked
        assert not resp.persisted and "not yet saved" in resp.message
        assert WeightStore(cfg.db_path).load()["chat"].weight_bp == 2000  # the disk still says 20 %
        # Space comes back: the background saver persists it; a restarted server serves 0.
        filler.unlink()
        for _ in range(100):
            if not svc.unsaved:
                break
            await asyncio.sleep(0.1)
        assert not svc.unsaved
        assert WeightStore(cfg.db_path).load()["chat"].weight_bp == 0
        restarted = WeightService(cfg, WeightStore(cfg.db_path))
        assert routes_weight(restarted) == 0
        store.close()

    asyncio.run(run())


def test_after_an_xds_restart_a_revert_waits_for_the_envoys_that_held_the_canary(tmp_path):
    """A restarted xDS server knows (from its store) which Envoys last ACKed a canary weight: until each
    has reconnected and ACKed weight 0, the revert is not complete (Envoy keeps its last routes)."""
    async def run():
        cfg, store = make(tmp_path)
        svc = WeightService(cfg, store)
        ads = AdsServer(svc.cache, svc.registry)
        e0 = await connect(ads, svc, "e0")
        task = asyncio.ensure_future(svc.set_weight("chat", "v2", 1000, actor="t", reason="t", timeout_s=5))
        await ack_routes(ads, e0)
        assert (await task).all_acked
        await svc.flush()  # what e0 holds is written (in the background, off the event loop)
        store.close()
        # the xDS server restarts; e0 has not reconnected yet (it keeps serving 10 %)
        store2 = WeightStore(cfg.db_path)
        svc2 = WeightService(cfg, store2)
        ads2 = AdsServer(svc2.cache, svc2.registry)
        resp = await svc2.rollback("chat", actor="t", reason="abort", timeout_s=0.5)
        assert not resp.all_acked
        assert resp.not_acked == ["e0 (not connected to a live xDS server; last ACKed v2 at 10%)"]
        await connect(ads2, svc2, "e0")  # it reconnects and ACKs the current routes (weight 0)
        resp = await svc2.rollback("chat", actor="t", reason="retry", timeout_s=5)
        assert resp.all_acked and resp.persisted and not resp.not_acked
        store2.close()

    asyncio.run(run())
