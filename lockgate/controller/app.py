"""``lockgate controller``: the one composition root of the controller process.

:class:`Controller` builds every part from the config and wires them through the typed ports of
:mod:`lockgate.controller.ports`, as constructor arguments — no part creates, finds or sets attributes
on another:

* **ingest** — the observation store (an ``ObservationSource``), the gRPC observation collector, the
  retained response samples, and the Envoy ext_proc counter watch;
* **evaluate** — response evaluation (only when a model has an ``evaluation`` section);
* **decide** — the rollout store, the promotion loop (:class:`~.decide.promoter.Promoter`: a
  ``WeightPusher`` to move traffic, the store to read, the notifier as ``EventSink``) and the rollout
  actions (:class:`~.decide.actions.RolloutActions`, the ``RolloutCommands`` of the HTTP API);
* **tell** — the notifier (alerts and registry feedback) and the trouble monitor (a ``WeightReader``
  to probe, the collector's ``DropCounts``, the rollout store as ``ActiveRollouts``);
* **api** — the HTTP API (feedback, debugging, ``/metrics``) with the rollout routes.

It then runs the background tasks (:class:`Task`), each given only what it needs, until SIGTERM/SIGINT
or ``stop``. A critical task that raises is logged and the process stops with exit status 1 (a
controller missing a part is worse than a restarted one); the notifications task is not critical
(nothing there is on the rollback path).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc
from prometheus_client import Counter

from lockgate.aio import stop_on_signals
from lockgate.config import LockgateConfig
from lockgate.control_client import AsyncControlClient, for_process
from lockgate.controller.api.http import ControllerHTTP
from lockgate.controller.api.rollouts import register_routes
from lockgate.controller.decide.actions import RolloutActions
from lockgate.controller.decide.live_evidence import LiveEvidence
from lockgate.controller.decide.promoter import Promoter
from lockgate.controller.decide.rollout_series import RolloutSeries
from lockgate.controller.decide.leases import NOTIFICATIONS_LEASE, once_leased
from lockgate.controller.decide.rollouts import RolloutStore
from lockgate.controller.evaluate.evaluation import EvaluationService, evaluation_enabled
from lockgate.controller.ingest.collector import ControllerMetrics, ObservationCollectorServicer
from lockgate.controller.ingest.envoy_watch import watch_envoy
from lockgate.controller.ingest.observations import ObservationStore
from lockgate.controller.ingest.samples import FILENAME as SAMPLES_FILE, SampleStore
from lockgate.controller.tell.checks import HttpCheckCaller
from lockgate.controller.tell.notify import Notifier
from lockgate.controller.tell.trouble import TroubleMonitor
from lockgate.database import exists as store_exists
from lockgate.grpc_auth import add_port, server_interceptors, warn_if_insecure
from lockgate.proto.v1 import observations_pb2_grpc as pb_grpc

log = logging.getLogger("lockgate.controller")


class ControllerStartError(RuntimeError):
    """The controller could not start (port in use, unreadable state dir, ...)."""


@dataclass(frozen=True)
class Task:
    """A background task: ``run(stop)`` returns once ``stop`` is set."""

    name: str
    run: Callable[[asyncio.Event], Awaitable[None]]
    critical: bool = True  #: a failure stops the controller (exit 1); else it is logged and the rest runs on


class Controller:
    """The controller's parts, built from ``config`` and wired (see the module docstring).

    Construct it on the event loop that will run it (the control API clients are ``grpc.aio``).
    Raises :class:`ControllerStartError` when a store cannot be opened, and
    :class:`lockgate.grpc_auth.NoTokenError` when ``auth.tokens`` is set and the controller has no token."""

    def __init__(self, config: LockgateConfig):
        self.config = config
        cc = config.controller
        self.retention_s = cc.retention_days * 86400.0
        # ----- ingest
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
        if rb is not None or store_exists(config.store(SAMPLES_FILE)):
            try:
                self.samples = SampleStore(config.store(SAMPLES_FILE), max_count=rb.max_count if rb else None)
            except (OSError, sqlite3.Error) as exc:
                raise ControllerStartError(f"cannot open the response sample store: {exc}") from None
        self.collector = ObservationCollectorServicer(self.store, self.metrics, self.writer,
                                                      self.samples if rb else None, rb.roles if rb else None)
        # ----- evaluate: only when a model has an `evaluation` section (docs/evaluation.md)
        self.evaluation: EvaluationService | None = None
        if evaluation_enabled(config):
            try:
                self.evaluation = EvaluationService(config, self.metrics.registry)
            except Exception as exc:  # unreadable state dir, broken evaluator/similarity plug-in, ...
                raise ControllerStartError(f"cannot start evaluation: {exc}") from None
        # ----- decide and tell
        try:
            self.rollouts = RolloutStore(config.store("rollouts.db"))
        except (OSError, sqlite3.Error) as exc:
            raise ControllerStartError(f"cannot open the rollout store: {exc}") from None
        # one control API client per user, as before: the trouble probes never queue behind a push
        self.weights: AsyncControlClient = for_process(config, "controller")
        self.probe_weights: AsyncControlClient = for_process(config, "controller (trouble checks)")
        self.notifier = Notifier(config)
        # incremental evidence: every stored row, outcome and label is folded into the running rollouts'
        # sums, so a look costs O(users), not O(rows) (decide/accumulator.py)
        self.evidence = LiveEvidence(self.store, has_evaluation=lambda model: config.model(model).evaluation
                                     is not None)
        # rollout state (stage, weight, verdicts, rollbacks, promotions) on /metrics, told by the promoter
        self.rollout_series = RolloutSeries(self.metrics.registry, [m.name for m in config.models])
        self.promoter = Promoter(config, self.rollouts, self.weights, self.store, sinks=[self.notifier],
                                 evidence=self.evidence, series=self.rollout_series, checks=HttpCheckCaller())
        self.actions = RolloutActions(config, self.rollouts, self.promoter, self.store)
        self.trouble = TroubleMonitor(self.notifier, self.probe_weights, self.metrics.sources, self.rollouts)
        # new observations wake the promotion loop (a breach rolls back when the evidence arrives)
        self.collector.on_rows.append(self.evidence.observations_stored)
        self.collector.on_outcomes.append(self.evidence.outcomes_stored)
        self.store.on_labels.append(self.evidence.labels_stored)
        self.collector.on_stored.append(self.promoter.notify)
        # of several controllers, the standby refuses observations: every ext_proc sends them to the driver
        self.collector.accept_checks.append(self.promoter.driving.standby_reason)
        # ----- servers, started by start()
        self.server: grpc.aio.Server | None = None
        self.http: ControllerHTTP | None = None
        # ----- background tasks
        self.tasks: list[Task] = [
            Task("retention", functools.partial(prune_loop, self.store, self.samples, self.writer,
                                                self.metrics.pruned, self.retention_s, cc.prune_interval_s))]
        if self.evaluation is not None:
            self.tasks.append(Task("evaluation", self.evaluation.run))
        self.tasks += [
            Task("promotion", self.promoter.run),
            # of several controllers on one database, the one holding the lease delivers and checks (decide/leases.py)
            Task("notifications", functools.partial(once_leased, self.rollouts, NOTIFICATIONS_LEASE, functools.partial(
                _notifications, self.notifier, self.trouble)), critical=False),
            Task("envoy-watch", functools.partial(watch_envoy, config.admin, self.metrics.registry)),
        ]
        self.stop_event = asyncio.Event()

    async def start(self) -> None:
        """Listen: the observations API (gRPC), the HTTP API with the rollout routes, the sampler."""
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
        register_routes(self.http, self.actions, asyncio.get_running_loop(),
                        frozenset(m.name for m in self.config.models))
        self.http.accept_checks.append(self.promoter.driving.standby_reason)  # feedback too goes to the driver
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

        async def guarded(task: Task) -> None:
            nonlocal failed
            try:
                await task.run(self.stop_event)
            except asyncio.CancelledError:
                raise
            except Exception:
                if not task.critical:
                    log.exception("controller task %s failed; the others run on", task.name)
                    return
                log.exception("controller task %s failed; stopping", task.name)
                failed = True
                self.stop_event.set()

        running = [asyncio.create_task(guarded(t), name=t.name) for t in self.tasks]
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
        for client in (self.weights, self.probe_weights):
            await client.close()
        self.writer.shutdown(wait=True)
        self.store.close()
        if self.samples is not None:
            self.samples.close()
        self.rollouts.close()


async def _notifications(notifier: Notifier, trouble: TroubleMonitor, stop: asyncio.Event) -> None:
    """Deliver alerts and registry updates; the trouble checks run alongside (on the notifier's database
    thread, so they end before it closes)."""
    await notifier.run(stop, alongside=(trouble.run,))


async def prune_loop(store: ObservationStore, samples: SampleStore | None, writer: concurrent.futures.Executor,
                     pruned: Counter, retention_s: float, interval_s: float, stop: asyncio.Event) -> None:
    """Delete observations (and retained samples) older than ``retention_s`` seconds, at start and every
    ``interval_s``, on the ``writer`` thread; ``pruned`` counts the observations deleted. A failed prune
    is logged and retried next time."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        cutoff = time.time() - retention_s
        try:
            n = await loop.run_in_executor(writer, lambda: store.prune(cutoff))
            if n:
                pruned.inc(n)
                log.info("pruned %d observations older than %.1f days", n, retention_s / 86400)
        except Exception:
            log.exception("pruning observations failed")
        if samples is not None:
            try:
                await loop.run_in_executor(writer, lambda: samples.prune(cutoff))
            except Exception:
                log.exception("pruning response samples failed")
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except asyncio.TimeoutError:
            pass


async def serve(config: LockgateConfig, stop: asyncio.Event | None = None) -> int:
    """Run the controller until SIGTERM/SIGINT (or ``stop``). Prints ``ready controller=… http=…``."""
    controller = Controller(config)
    if stop is not None:
        controller.stop_event = stop
    try:
        await controller.start()
    except BaseException:
        await controller.close()
        raise
    stop_on_signals(controller.stop_event)
    cc = config.controller
    print(f"ready controller={cc.address} http={cc.http}"
          + (f" sampler={cc.sampler}" if controller.evaluation is not None else ""), flush=True)
    try:
        return await controller.run()
    finally:
        await controller.close()
        log.info("controller stopped")


__all__ = ["Controller", "ControllerStartError", "Task", "prune_loop", "serve"]
