"""``lockgate controller``: one asyncio process running the observation collector (gRPC), the HTTP API
(feedback, debugging, ``/metrics``) and retention pruning.

More work joins the same process as background tasks: ``serve(config, tasks=[fn, …])`` or
``service.add_task(name, fn)`` where ``fn(service, stop_event)`` is a coroutine function that runs until
``stop_event`` is set (the promotion loop, for example). A task that raises is logged and the process
stops with exit status 1 (a controller missing a part is worse than a restarted one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import time
from typing import Awaitable, Callable, Iterable

import grpc

from lockgate.aio import stop_on_signals
from lockgate.config import LockgateConfig
from lockgate.controller.ingest.collector import ControllerMetrics, ObservationCollectorServicer
from lockgate.controller.evaluate.evaluation import EvaluationService, evaluation_enabled, evaluation_task
from lockgate.controller.api.http import ControllerHTTP
from lockgate.controller.ingest.observations import ObservationStore
from lockgate.controller.ingest.samples import SampleStore, samples_path
from lockgate.grpc_auth import add_port, server_interceptors, warn_if_insecure
from lockgate.proto.v1 import observations_pb2_grpc as pb_grpc

log = logging.getLogger("lockgate.controller")

TaskFn = Callable[["ControllerService", asyncio.Event], Awaitable[None]]


class ControllerStartError(RuntimeError):
    """The controller could not start (port in use, unreadable state dir, ...)."""


class ControllerService:
    """The controller's parts: ``store``, ``metrics``, the gRPC ``server``, ``http``, and ``tasks``."""

    def __init__(self, config: LockgateConfig):
        self.config = config
        self.retention_s = config.controller.retention_days * 86400.0
        try:
            self.store = ObservationStore(config.observations_db_path)
        except (OSError, sqlite3.Error) as exc:
            raise ControllerStartError(f"cannot open the observation store {config.observations_db_path}: {exc}") \
                from None
        self.metrics = ControllerMetrics()
        self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="obs-writer")
        # retained response bodies (capture.retain_bodies); a store left from before is still pruned when off
        rb = config.capture.retain_bodies
        self.samples: SampleStore | None = None
        if rb is not None or samples_path(config.state_dir).exists():
            try:
                self.samples = SampleStore(samples_path(config.state_dir), max_count=rb.max_count if rb else None)
            except (OSError, sqlite3.Error) as exc:
                raise ControllerStartError(f"cannot open the response sample store: {exc}") from None
        self.collector = ObservationCollectorServicer(self.store, self.metrics, self.writer,
                                                      self.samples if rb else None, rb.roles if rb else None)
        self.server: grpc.aio.Server | None = None
        self.http: ControllerHTTP | None = None
        self.tasks: list[tuple[str, TaskFn]] = [("retention", prune_loop)]
        # response evaluation (docs/evaluation.md): only when a model has an `evaluation` section
        self.evaluation: EvaluationService | None = None
        if evaluation_enabled(config):
            try:
                self.evaluation = EvaluationService(config, self.metrics.registry)
            except Exception as exc:  # unreadable state dir, broken evaluator/similarity plug-in, ...
                raise ControllerStartError(f"cannot start evaluation: {exc}") from None
            self.tasks.append(("evaluation", evaluation_task))
        self.stop_event = asyncio.Event()

    def add_task(self, name: str, fn: TaskFn) -> None:
        self.tasks.append((name, fn))

    async def start(self) -> None:
        cc = self.config.controller
        warn_if_insecure(self.config, "lockgate controller")
        # auth.tokens: only configured clients (the ext_proc shippers) may report observations
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
                                      interceptors=server_interceptors(self.config.auth, "observations API"))
        pb_grpc.add_ObservationCollectorServicer_to_server(self.collector, self.server)
        try:
            port = add_port(self.server, str(cc.address), self.config.auth)
        except (RuntimeError, OSError) as exc:  # port in use, unreadable auth.tls files
            raise ControllerStartError(f"cannot listen on controller.address {cc.address}: {exc}") from None
        if port == 0:
            raise ControllerStartError(f"cannot listen on controller.address {cc.address}")
        try:
            self.http = ControllerHTTP(cc.http.host, cc.http.port, self.store, self.metrics, self.retention_s,
                                       samples=self.samples, auth=self.config.auth.registry())
        except OSError as exc:
            raise ControllerStartError(f"cannot listen on controller.http {cc.http}: {exc.strerror or exc}") from None
        await self.server.start()
        self.http.start()
        if self.evaluation is not None:
            try:
                await self.evaluation.start()
            except OSError as exc:
                raise ControllerStartError(f"cannot listen on controller.sampler {cc.sampler}: "
                                           f"{exc.strerror or exc}") from None

    async def run(self) -> int:
        """Run every background task until ``stop_event``; returns the exit status."""
        failed = False

        async def guarded(name: str, fn: TaskFn) -> None:
            nonlocal failed
            try:
                await fn(self, self.stop_event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("controller task %s failed; stopping", name)
                failed = True
                self.stop_event.set()

        running = [asyncio.create_task(guarded(n, fn), name=n) for n, fn in self.tasks]
        await self.stop_event.wait()
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        return 1 if failed else 0

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop(1.0)  # in-flight Reports finish (they are stored before the ack)
        if self.http is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.http.stop)
        if self.evaluation is not None:
            await self.evaluation.close()
        self.writer.shutdown(wait=True)
        self.store.close()
        if self.samples is not None:
            self.samples.close()


async def prune_loop(service: ControllerService, stop: asyncio.Event) -> None:
    """Delete observations older than ``controller.retention_days``, at start and every
    ``controller.prune_interval_s``. A failed prune is logged and retried next time."""
    loop = asyncio.get_running_loop()
    interval = service.config.controller.prune_interval_s
    while not stop.is_set():
        cutoff = time.time() - service.retention_s
        try:
            n = await loop.run_in_executor(service.writer, lambda: service.store.prune(cutoff))
            if n:
                service.metrics.pruned.inc(n)
                log.info("pruned %d observations older than %.1f days", n, service.retention_s / 86400)
        except Exception:
            log.exception("pruning observations failed")
        if service.samples is not None:
            try:
                await loop.run_in_executor(service.writer, lambda: service.samples.prune(cutoff))
            except Exception:
                log.exception("pruning response samples failed")
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


async def serve(config: LockgateConfig, stop: asyncio.Event | None = None, tasks: Iterable[tuple[str, TaskFn]] = (),
                ) -> int:
    """Run the controller until SIGTERM/SIGINT (or ``stop``). Prints ``ready controller=… http=…``."""
    service = ControllerService(config)
    if stop is not None:
        service.stop_event = stop
    for name, fn in tasks:
        service.add_task(name, fn)
    try:
        await service.start()
    except BaseException:
        await service.close()
        raise
    stop_on_signals(service.stop_event)
    cc = config.controller
    print(f"ready controller={cc.address} http={cc.http}"
          + (f" sampler={cc.sampler}" if service.evaluation is not None else ""), flush=True)
    try:
        return await service.run()
    finally:
        await service.close()
        log.info("controller stopped")


__all__ = ["ControllerService", "ControllerStartError", "prune_loop", "serve"]
