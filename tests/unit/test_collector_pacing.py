"""The controller's ObservationCollector stores a batch in paced slices (one transaction each).

A real in-process ``grpc.aio`` server runs :class:`ObservationCollectorServicer` over a real SQLite
:class:`ObservationStore` in a temp dir; the store is subclassed only to count (and once, to fail)
its ``insert`` calls.
"""

from __future__ import annotations

import asyncio
import sqlite3

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockgate.controller.ingest.collector import ControllerMetrics, ObservationCollectorServicer, slice_bounds
from lockgate.controller.ingest.observations import ObservationStore
from lockgate.proto.v1 import observations_pb2 as pb
from lockgate.proto.v1 import observations_pb2_grpc as pb_grpc


@given(st.integers(0, 5000), st.integers(1, 50), st.integers(1, 20))
def test_slice_bounds_cover_the_batch_in_order(n, min_slice, max_slices):
    bounds = slice_bounds(n, min_slice, max_slices)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
    assert len(bounds) <= max_slices
    assert all(b - a >= min_slice for a, b in bounds[:-1])


def test_slice_bounds_examples():
    assert slice_bounds(0) == []
    assert slice_bounds(3) == [(0, 3)]
    assert slice_bounds(12) == [(0, 5), (5, 10), (10, 12)]
    assert len(slice_bounds(500)) == 10 and slice_bounds(500)[0] == (0, 50)


class CountingStore(ObservationStore):
    """The real store; counts inserts and can fail the ``fail_on``-th one (1-based), once."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.inserts: list[int] = []
        self.durable: list[bool] = []
        self.fail_on: int | None = None

    def insert(self, observations, source="", received_ts=None, *, durable=True):
        observations = list(observations)
        self.inserts.append(len(observations))
        self.durable.append(durable)
        if self.fail_on is not None and len(self.inserts) == self.fail_on:
            self.fail_on = None
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return super().insert(observations, source, received_ts, durable=durable)


def mk(i: int) -> pb.Observation:
    return pb.Observation(request_id=f"req-{i}", ts=1_700_000_000.0 + i, model="chat", version="v2",
                          role="canary", weight_bp=500, status_code=200, duration_ms=12.5)


async def _serve(store, **kw):
    metrics = ControllerMetrics()
    servicer = ObservationCollectorServicer(store, metrics, **kw)
    server = grpc.aio.server()
    pb_grpc.add_ObservationCollectorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, servicer, metrics


def _stored(metrics: ControllerMetrics) -> float:
    return metrics.registry.get_sample_value("lockgate_controller_observations_stored_total",
                                             {"model": "chat", "version": "v2", "role": "canary"}) or 0.0


def test_a_batch_is_stored_in_slices_and_acked_once_all_are_durable(tmp_path):
    async def main():
        store = CountingStore(tmp_path / "obs.db")
        server, port, servicer, metrics = await _serve(store)
        notified: list[set] = []
        servicer.on_stored.append(notified.append)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                ack = await pb_grpc.ObservationCollectorStub(ch).Report(
                    pb.ObservationBatch(source="t:1", observations=[mk(i) for i in range(37)]), timeout=10)
        finally:
            await server.stop(None)
        assert (ack.stored, ack.duplicates, ack.rejected) == (37, 0, 0)
        assert store.inserts == [5, 5, 5, 5, 5, 5, 5, 2]  # one transaction per slice
        assert store.durable == [False] * 7 + [True]  # one fsync per batch, before the ack
        assert store.count("chat") == 37  # every slice durable before the ack
        assert _stored(metrics) == 37
        assert notified == [{"chat"}]  # the promotion loop is told once per batch
        store.close()

    asyncio.run(main())


def test_a_failed_slice_answers_unavailable_and_the_retry_stores_the_rest_once(tmp_path):
    async def main():
        store = CountingStore(tmp_path / "obs.db")
        store.fail_on = 3
        server, port, servicer, metrics = await _serve(store)
        batch = pb.ObservationBatch(source="t:1", observations=[mk(i) for i in range(23)])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.ObservationCollectorStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Report(batch, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "injected" in err.value.details()
                assert store.count("chat") == 10  # the two slices before the failure
                ack = await stub.Report(batch, timeout=10)  # the sender retries the whole batch
        finally:
            await server.stop(None)
        assert (ack.stored, ack.duplicates) == (23, 10)
        assert store.count("chat") == 23
        assert _stored(metrics) == 23  # counted once
        failed = metrics.registry.get_sample_value("lockgate_controller_observations_failed_total",
                                                   {"model": "chat", "version": "v2", "role": "canary"})
        assert failed == 5
        assert metrics.registry.get_sample_value("lockgate_controller_report_batches_total",
                                                 {"result": "error"}) == 1
        store.close()

    asyncio.run(main())


def test_duty_must_be_a_fraction(tmp_path):
    store = ObservationStore(tmp_path / "obs.db")
    with pytest.raises(ValueError, match="duty"):
        ObservationCollectorServicer(store, ControllerMetrics(), duty=0)
    store.close()


def test_a_deferred_commit_is_synced_by_the_next_durable_one(tmp_path):
    """``durable=False`` commits at synchronous=NORMAL (no fsync); every other write is at FULL."""
    store = ObservationStore(tmp_path / "obs.db")

    def sync_level() -> int:
        return store._db.execute("PRAGMA synchronous").fetchone()[0]

    assert sync_level() == 2  # FULL
    store.insert([mk(1)], durable=False)
    assert sync_level() == 1  # NORMAL
    store.add_labels([("req-1", "thumbs", "up")])  # feedback is always durable
    assert sync_level() == 2
    store.insert([mk(2)], durable=False)
    store.insert([mk(3)])
    assert sync_level() == 2
    assert store.count("chat") == 3
    store.close()
