"""Tests for lockgate.extproc.shipper.ObservationShipper against a real in-process gRPC collector.

Each test runs its own event loop (``asyncio.run``) with a ``grpc.aio`` server on 127.0.0.1 that
implements ``ObservationCollector`` and records every ``ObservationBatch`` it accepts. The collector
can be told to answer UNAVAILABLE, to hang, or be stopped and started again on the same port.
Timing bounds are generous (seconds) — they only separate "promptly" from "after 5 s".
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import grpc

from lockgate.extproc.shipper import ObservationShipper
from lockgate.proto.v1 import observations_pb2 as obs_pb2
from lockgate.proto.v1 import observations_pb2_grpc as obs_grpc


# ---------------------------------------------------------------------------------------------
# Collector server
# ---------------------------------------------------------------------------------------------


class Collector(obs_grpc.ObservationCollectorServicer):
    """Records accepted batches; ``mode`` is "ok", "unavailable" (abort UNAVAILABLE) or "hang"."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.attempts = 0  # every call, accepted or not
        self.batches: list[tuple[float, obs_pb2.ObservationBatch]] = []  # (monotonic, batch)
        self.release = asyncio.Event()  # ends "hang"

    async def Report(self, request, context):
        self.attempts += 1
        if self.mode == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "collector told to fail")
        if self.mode == "hang":
            await self.release.wait()
        self.batches.append((time.monotonic(), request))
        return obs_pb2.ReportAck(stored=len(request.observations))

    def ids(self) -> list[str]:
        return [o.request_id for _, b in self.batches for o in b.observations]


class CollectorServer:
    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> int:
        self.server = grpc.aio.server()
        obs_grpc.add_ObservationCollectorServicer_to_server(self.collector, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        assert self.port > 0 and (port == 0 or self.port == port)
        await self.server.start()
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.collector.release.set()
            await self.server.stop(grace=None)
            self.server = None


def reserve_port() -> int:
    """A free port nobody listens on (yet): connections to it are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def obs(i: int) -> obs_pb2.Observation:
    return obs_pb2.Observation(request_id=f"r{i}", model="m", version="v1")


async def wait_until(pred, timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(step)
    return pred()


class Recorder:
    """on_drop / on_sent callbacks that remember their arguments."""

    def __init__(self) -> None:
        self.drops: list[int] = []
        self.sent: list[int] = []

    def make(self, address: str, **kw) -> ObservationShipper:
        return ObservationShipper(address, on_drop=self.drops.append, on_sent=self.sent.append, **kw)


@contextlib.asynccontextmanager
async def shipping(port: int, **kw):
    """A started shipper to 127.0.0.1:``port`` with its Recorder; closed on exit."""
    rec = Recorder()
    sh = rec.make(f"127.0.0.1:{port}", **kw)
    sh.start()
    try:
        yield sh, rec
    finally:
        await sh.close()


def run(scenario):
    """Run ``scenario(collector, server)`` on a fresh loop; the server is always stopped."""

    async def main():
        collector = Collector()
        server = CollectorServer(collector)
        try:
            return await scenario(collector, server)
        finally:
            await server.stop()

    return asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# 1. A full batch goes at once
# ---------------------------------------------------------------------------------------------


def test_full_batch_is_sent_at_once_not_after_flush_interval():
    async def scenario(collector, server):
        port = await server.start()
        async with shipping(port, queue_size=100, batch_size=5, flush_interval_s=5.0) as (sh, rec):
            t0 = time.monotonic()
            assert all(sh.offer(obs(i)) for i in range(5))
            assert await wait_until(lambda: collector.batches, 2.0), "full batch not sent promptly"
            assert collector.batches[0][0] - t0 < 2.0  # flush interval is 5 s
            await asyncio.sleep(0.1)
            assert len(collector.batches) == 1
            batch = collector.batches[0][1]
            assert [o.request_id for o in batch.observations] == [f"r{i}" for i in range(5)]
            assert batch.observations[0].model == "m" and batch.observations[0].version == "v1"
            assert batch.dropped_total == 0
            assert batch.source == sh.source and batch.source
            assert sh.sent_total == 5 and rec.sent == [5] and not sh.queue

    run(scenario)


def test_batch_filling_up_during_flush_wait_is_sent_at_once():
    """The first observation starts the flush wait; the one that fills the batch ends it."""

    async def scenario(collector, server):
        port = await server.start()
        async with shipping(port, queue_size=100, batch_size=5, flush_interval_s=5.0) as (sh, rec):
            assert sh.offer(obs(0))
            await asyncio.sleep(0.2)  # the shipper is now inside its 5 s flush wait
            assert collector.attempts == 0
            t0 = time.monotonic()
            assert all(sh.offer(obs(i)) for i in range(1, 5))
            assert await wait_until(lambda: collector.batches, 2.0), "full batch not sent promptly"
            assert collector.batches[0][0] - t0 < 2.0
            assert collector.ids() == [f"r{i}" for i in range(5)]
            assert len(collector.batches) == 1

    run(scenario)


# ---------------------------------------------------------------------------------------------
# 2. A partial batch goes after the flush interval
# ---------------------------------------------------------------------------------------------


def test_partial_batch_is_sent_after_flush_interval():
    async def scenario(collector, server):
        port = await server.start()
        async with shipping(port, queue_size=1000, batch_size=500, flush_interval_s=0.05) as (sh, rec):
            t0 = time.monotonic()
            assert all(sh.offer(obs(i)) for i in range(3))
            assert await wait_until(lambda: collector.batches, 2.0), "partial batch never flushed"
            # Loose lower bound only (noise makes it later, never earlier): not sent on first offer.
            assert collector.batches[0][0] - t0 >= 0.04
            await asyncio.sleep(0.2)
            assert len(collector.batches) == 1, "3 observations split over several batches"
            assert collector.ids() == ["r0", "r1", "r2"]
            assert sh.sent_total == 3 and rec.sent == [3]

    run(scenario)


# ---------------------------------------------------------------------------------------------
# 3. Nothing is sent while idle
# ---------------------------------------------------------------------------------------------


def test_no_calls_while_idle_before_and_after_a_batch():
    async def scenario(collector, server):
        port = await server.start()
        async with shipping(port, queue_size=100, batch_size=10, flush_interval_s=0.05) as (sh, rec):
            await asyncio.sleep(0.3)
            assert collector.attempts == 0, "shipper called the collector with nothing queued"
            sh.offer(obs(0))
            assert await wait_until(lambda: collector.batches, 2.0)
            await asyncio.sleep(0.3)
            assert collector.attempts == 1, "shipper kept calling after the queue emptied"
            assert all(len(b.observations) > 0 for _, b in collector.batches)

    run(scenario)


# ---------------------------------------------------------------------------------------------
# 4. queue_size bound, drops counted and reported
# ---------------------------------------------------------------------------------------------


def test_queue_bound_drops_excess_and_reports_dropped_total():
    async def scenario(collector, server):
        port = await server.start()
        collector.mode = "unavailable"
        async with shipping(port, queue_size=3, batch_size=10, flush_interval_s=0.02) as (sh, rec):
            accepted = [sh.offer(obs(i)) for i in range(5)]
            assert accepted == [True, True, True, False, False]
            assert sh.dropped_total == 2 and rec.drops == [1, 1]
            assert len(sh.queue) == 3
            assert await wait_until(lambda: collector.attempts >= 1, 2.0)  # really failing
            assert collector.batches == [] and sh.sent_total == 0
            assert sh.offer(obs(99)) is False and sh.dropped_total == 3  # still full while failing

            collector.mode = "ok"
            assert await wait_until(lambda: collector.batches, 5.0), "never retried"
            batch = collector.batches[0][1]
            assert [o.request_id for o in batch.observations] == ["r0", "r1", "r2"]
            assert batch.dropped_total == 3
            # the collector records the batch before its ack reaches the sender thread
            assert await wait_until(lambda: sh.sent_total == 3, 5.0)
            assert rec.sent == [3] and not sh.queue
            assert sh.offer(obs(5)) is True  # room again

    run(scenario)


# ---------------------------------------------------------------------------------------------
# 5. Controller down, then up: everything delivered once, in order
# ---------------------------------------------------------------------------------------------


def test_observations_offered_while_controller_down_are_delivered_when_it_comes_up():
    async def scenario(collector, server):
        port = reserve_port()  # nothing listens yet
        async with shipping(port, queue_size=100, batch_size=4, flush_interval_s=0.02) as (sh, rec):
            for i in range(6):
                assert sh.offer(obs(i))
            await asyncio.sleep(0.3)  # several failed attempts + back-off
            for i in range(6, 10):
                assert sh.offer(obs(i))
            assert sh.sent_total == 0 and len(sh.queue) == 10 and sh.dropped_total == 0

            await server.start(port)
            assert await wait_until(lambda: len(collector.ids()) >= 10, 8.0), (
                f"delivered {collector.ids()} after the controller came up")
            await asyncio.sleep(0.2)  # would catch a late duplicate
            assert collector.ids() == [f"r{i}" for i in range(10)]
            assert all(len(b.observations) <= 4 for _, b in collector.batches)
            assert all(b.dropped_total == 0 for _, b in collector.batches)
            assert sh.sent_total == 10 and sum(rec.sent) == 10 and rec.drops == []

    run(scenario)


def test_controller_restart_loses_and_duplicates_nothing():
    async def scenario(collector, server):
        port = await server.start()
        async with shipping(port, queue_size=100, batch_size=4, flush_interval_s=0.02) as (sh, rec):
            sh.offer(obs(0))
            sh.offer(obs(1))
            assert await wait_until(lambda: len(collector.ids()) == 2, 2.0)
            await server.stop()
            for i in range(2, 7):
                assert sh.offer(obs(i))
            await asyncio.sleep(0.2)
            assert len(collector.ids()) == 2
            await server.start(port)
            assert await wait_until(lambda: len(collector.ids()) >= 7, 8.0)
            await asyncio.sleep(0.2)
            assert collector.ids() == [f"r{i}" for i in range(7)]
            assert sh.dropped_total == 0 and sh.sent_total == 7

    run(scenario)


# ---------------------------------------------------------------------------------------------
# 6. close(): flushes, and counts what it cannot send
# ---------------------------------------------------------------------------------------------


def test_close_flushes_queued_observations_without_waiting_for_flush_interval():
    async def scenario(collector, server):
        port = await server.start()
        rec = Recorder()
        sh = rec.make(f"127.0.0.1:{port}", queue_size=100, batch_size=500, flush_interval_s=5.0)
        sh.start()
        for i in range(3):
            sh.offer(obs(i))
        await asyncio.sleep(0.05)  # the shipper is inside its 5 s flush wait
        t0 = time.monotonic()
        await sh.close(timeout_s=2.0)
        assert time.monotonic() - t0 < 2.0
        assert collector.ids() == ["r0", "r1", "r2"]
        assert sh.sent_total == 3 and sh.dropped_total == 0 and rec.drops == []
        assert not sh._thread.is_alive()

    run(scenario)


def test_close_counts_unsendable_observations_as_dropped_when_controller_fails():
    async def scenario(collector, server):
        port = await server.start()
        collector.mode = "unavailable"
        rec = Recorder()
        sh = rec.make(f"127.0.0.1:{port}", queue_size=100, batch_size=500, flush_interval_s=5.0)
        sh.start()
        for i in range(4):
            sh.offer(obs(i))
        t0 = time.monotonic()
        await sh.close(timeout_s=1.0)
        assert time.monotonic() - t0 < 3.0
        assert collector.batches == []
        assert sh.dropped_total == 4 and rec.drops == [4]
        assert not sh.queue and sh.sent_total == 0
        assert not sh._thread.is_alive()

    run(scenario)


def test_close_gives_up_after_timeout_when_controller_hangs():
    async def scenario(collector, server):
        port = await server.start()
        collector.mode = "hang"
        rec = Recorder()
        sh = rec.make(f"127.0.0.1:{port}", queue_size=100, batch_size=500, flush_interval_s=5.0)
        sh.start()
        for i in range(2):
            sh.offer(obs(i))
        t0 = time.monotonic()
        await sh.close(timeout_s=0.3)
        elapsed = time.monotonic() - t0
        assert 0.25 <= elapsed < 3.0  # waited for the timeout, not for the 5 s RPC deadline
        assert collector.attempts == 1  # the flush was attempted
        assert sh.dropped_total == 2 and rec.drops == [2]
        assert not sh.queue and sh.sent_total == 0
        await asyncio.sleep(0)
        assert not sh._thread.is_alive()

    run(scenario)
