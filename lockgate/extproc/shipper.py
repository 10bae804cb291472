"""Observations from the ext_proc process to the controller: bounded, batched, never silent.

``offer`` never blocks the response path: it appends to a bounded in-memory queue, and when the
queue is full the observation is dropped and counted (exported on /metrics and reported to the
controller in every batch as ``dropped_total``). A background task sends batches over gRPC
(``ObservationCollector.Report``); a failed batch is kept and retried with back-off, so a
controller restart loses nothing as long as the queue has room.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time

import grpc

from lockgate.proto.v1 import observations_pb2 as obs_pb2
from lockgate.proto.v1 import observations_pb2_grpc as obs_grpc

log = logging.getLogger("lockgate.extproc.shipper")


class ObservationShipper:
    def __init__(self, address: str, queue_size: int, batch_size: int, flush_interval_s: float,
                 on_drop=None, on_sent=None):
        self.address = address
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.source = f"{socket.gethostname()}:{os.getpid()}"
        self.queue: collections.deque[obs_pb2.Observation] = collections.deque()
        self.dropped_total = 0
        self.sent_total = 0
        self._on_drop = on_drop or (lambda n: None)
        self._on_sent = on_sent or (lambda n: None)
        self._wake = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    def offer(self, observation: obs_pb2.Observation) -> bool:
        """Queue one observation; False (and counted) when the queue is full. Never blocks."""
        if len(self.queue) >= self.queue_size:
            self.dropped_total += 1
            self._on_drop(1)
            return False
        queue = self.queue
        queue.append(observation)
        if len(queue) == 1 or len(queue) >= self.batch_size:
            self._wake.set()
        return True

    def start(self) -> None:
        # gRPC's own reconnect back-off grows to 120 s by default: cap it near the retry back-off
        # below, so a controller that comes back is reached within seconds, not minutes.
        self._channel = grpc.aio.insecure_channel(self.address, options=[
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5000)])
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        assert self._channel is not None
        stub = obs_grpc.ObservationCollectorStub(self._channel)
        backoff = 0.1
        last_warning = 0.0
        while True:
            # Idle until the first observation; then collect for flush_interval_s (or until a full
            # batch) and send. Small steady batches: sending whatever arrived during the last call
            # costs a gRPC call every few responses, and big batches hit the controller in bursts
            # that stall an Envoy sharing its CPU (both measured in bench/capture.py: ceiling
            # ~2,900 rps sending at once, ~2,700 with 0.2 s batches, ~3,600 with 5-25 ms).
            if not self.queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()  # offer() sets it for the first queued observation
                continue
            if len(self.queue) < self.batch_size and not self._closing:
                self._wake.clear()
                try:  # offer() sets it when a batch is full, close() to flush now
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
                except asyncio.TimeoutError:
                    pass
            n = min(self.batch_size, len(self.queue))
            batch = obs_pb2.ObservationBatch(source=self.source, dropped_total=self.dropped_total)
            batch.observations.extend(self.queue[i] for i in range(n))
            try:
                await stub.Report(batch, timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                if self._closing:
                    return
                now = time.monotonic()
                if now - last_warning > 30:
                    last_warning = now
                    log.warning("controller %s unreachable (%s); %d observations queued, retrying",
                                self.address, exc.code().name, len(self.queue))
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            if backoff > 0.1:
                log.info("controller %s reachable again", self.address)
            backoff = 0.1
            last_warning = 0.0
            for _ in range(n):
                self.queue.popleft()
            self.sent_total += n
            self._on_sent(n)

    async def close(self, timeout_s: float = 2.0) -> None:
        """Flush what is queued (up to ``timeout_s``), then stop; what is left is counted as dropped."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        if self.queue:
            self.dropped_total += len(self.queue)
            self._on_drop(len(self.queue))
            log.warning("dropped %d unsent observations at shutdown", len(self.queue))
            self.queue.clear()
        if self._channel is not None:
            await self._channel.close()
