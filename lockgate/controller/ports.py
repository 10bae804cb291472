"""What the controller's parts need from each other, as typed ports.

The composition root (:mod:`lockgate.controller.app`) builds every part and hands each one the ports
it needs as constructor arguments; no part reaches into another or sets attributes on it. A port
names the few calls a part makes, so a test can pass a small fake and a reader can see a part's
dependencies in its constructor.

==========================  =====================================  ===================================
port                        provided by                            used by
==========================  =====================================  ===================================
:class:`WeightReader`       :class:`lockgate.control_client         trouble checks (control API and
                            .AsyncControlClient`                   Envoy health)
:class:`WeightPusher`       the same client                        promotion loop, rollout actions
:class:`ObservationSource`  ``ingest.observations.ObservationStore``  promotion loop, rollout start
:class:`EventSink`          ``tell.notify.Notifier``               promotion loop (outcome events)
:class:`DropCounts`         the collector's per-source stats       trouble checks
:class:`ActiveRollouts`     ``decide.rollouts.RolloutStore``       trouble checks (alert context)
:class:`RolloutCommands`    ``decide.actions.RolloutActions``      ``api.rollouts`` (HTTP routes)
:data:`StoredCallback`      ``decide.promoter.Promoter.notify``    the collector (``on_stored``)
:data:`RowsCallback`        ``decide.live_evidence.LiveEvidence``  the collector (``on_rows``)
:data:`OutcomesCallback`    ``decide.live_evidence.LiveEvidence``  the collector (``on_outcomes``)
:data:`LabelsCallback`      ``decide.live_evidence.LiveEvidence``  the observation store (``on_labels``)
:class:`CheckCaller`        ``tell.checks.HttpCheckCaller``        promotion loop (steps' external checks)
==========================  =====================================  ===================================

Kernel imports only (this module sits below every controller package).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, TypedDict, runtime_checkable

import numpy as np

from lockgate.proto.v1 import control_pb2

__all__ = ["ActiveRollouts", "CheckAnswer", "CheckCaller", "DropCounts", "EventSink", "ObservationSource", "OutcomeEvent", "RolloutCommands",
           "RolloutView", "StoredCallback", "RowsCallback", "OutcomesCallback", "LabelsCallback", "WeightPusher", "WeightReader"]


@runtime_checkable
class WeightReader(Protocol):
    """Reads the live weights from the control API (the xDS server); never the xDS database file."""

    async def get_weights(self, model: str = "", deadline_s: float = 5.0) -> control_pb2.GetWeightsResponse:
        """Desired weight and each Envoy's ACKed one, for ``model`` (every model when empty).
        Raises ``grpc.aio.AioRpcError`` when the control API does not answer within ``deadline_s``."""
        ...


@runtime_checkable
class WeightPusher(WeightReader, Protocol):
    """Moves canary weights through the control API. Weights are basis points (0..10000 = 0..100 %);
    ``timeout_s`` is how long the xDS server waits for every Envoy's ACK, ``deadline_s`` the call's
    own deadline (seconds). gRPC errors are raised unchanged (``grpc.aio.AioRpcError``)."""

    async def set_weight(self, model: str, version: str, weight_bp: int, *, actor: str, reason: str,
                         stage: str = "", timeout_s: float = 5.0, deadline_s: float = 10.0,
                         wait_for_ready: bool = True, cohorts: Sequence[Any] = (),
                         mirror_ppm: int = 0) -> control_pb2.SetWeightResponse:
        """``cohorts`` (:class:`lockgate.routing.Cohort`) go to the canary whatever the weight; ``mirror_ppm``
        of the split's requests are mirrored to the canary (the shadow stage)."""
        ...

    async def rollback(self, model: str, *, actor: str, reason: str, timeout_s: float = 5.0,
                       deadline_s: float = 10.0, wait_for_ready: bool = True) -> control_pb2.RollbackResponse:
        """Canary weight to 0 on every Envoy; ``all_acked and persisted`` says the revert is complete."""
        ...

    async def drill(self, model: str, *, actor: str, timeout_s: float = 5.0, deadline_s: float = 10.0,
                    wait_for_ready: bool = True) -> control_pb2.DrillResponse:
        """Re-push the routes unchanged and time each Envoy's ACK (no traffic moves)."""
        ...

    async def eject_host(self, model: str, version: str, endpoint: str, *, actor: str, reason: str,
                         restore: bool = False, timeout_s: float = 5.0, deadline_s: float = 10.0,
                         wait_for_ready: bool = True) -> control_pb2.SetWeightResponse:
        """Take ``endpoint`` (``ip:port``) of the canary ``version`` out of rotation (EDS without it; or back:
        ``restore``); ``all_acked`` says every Envoy has the new endpoints (per-host gating)."""
        ...


@runtime_checkable
class ObservationSource(Protocol):
    """Stored observations of one model in a time window, columnar (one NumPy array per column; see
    ``lockgate.controller.ingest.schema``). Thread-safe: the promoter reads from worker threads."""

    def fetch(self, model: str, since_ts: float | None = None, until_ts: float | None = None,
              versions: Sequence[str] | None = None, *, columns: Sequence[str] | None = None
              ) -> dict[str, np.ndarray]:
        """Rows of ``model`` with ``since_ts <= ts < until_ts`` (epoch s) of ``versions``, ordered by ts.
        (The store also takes ``cohort=NAME``: only that cohort's rows, read by :func:`.evidence.cohort_stats`.)"""
        ...


class OutcomeEvent(TypedDict):
    """What the promotion loop tells its sinks after the weights moved and the record was written."""

    kind: str               #: rolled_back | promoted | inconclusive | aborted | advanced
    rollout: dict[str, Any]  #: the rollout as JSON (``decide.promoter.rollout_json``)
    detail: dict[str, Any]   #: reasons, verdicts, timings … (what the transition recorded)
    ts: float                #: epoch s


@runtime_checkable
class EventSink(Protocol):
    """Receives outcome events. Called as a background task: nothing a sink does can delay a rollback;
    a sink must not raise (the loop logs it if it does)."""

    async def on_event(self, event: OutcomeEvent) -> None:
        ...


@runtime_checkable
class DropCounts(Protocol):
    """Observations each ext_proc source says it dropped before sending (its last reported total)."""

    def dropped_totals(self) -> Mapping[str, int]:
        """A snapshot: source name → dropped observations since that source started."""
        ...


class RolloutView(Protocol):
    """The fields of a rollout a reader outside ``decide`` uses."""

    id: int
    model: str
    canary: str
    status: str
    stage: int  #: 0-based


@runtime_checkable
class ActiveRollouts(Protocol):
    def active(self, model: str | None = None) -> Sequence[RolloutView]:
        """Rollouts not yet finished (pending, running, paused, rolling_back …), of ``model`` or all."""
        ...


@runtime_checkable
class RolloutCommands(Protocol):
    """What the HTTP API asks of the rollout machinery (``lockgate rollout …``). The coroutines run on
    the controller's event loop; failures are ``decide.actions.RolloutError`` (with an HTTP status) or
    ``decide.rollouts.RolloutConflict`` (409)."""

    async def start(self, spec_text: str, source: str, actor: str) -> dict[str, Any]:
        """Create a rollout from a spec's YAML text and begin it; the rollout, warnings and plan as JSON."""
        ...

    async def action(self, model: str, action: str, actor: str) -> dict[str, Any]:
        """``pause`` | ``resume`` | ``abort`` | ``promote`` the active rollout of ``model``."""
        ...

    def status(self, model: str | None = None) -> list[dict[str, Any]]:
        """The latest rollout of ``model`` (or of every model) with its last evaluation and plan."""
        ...

    async def approve(self, model: str, stage: int | None, actor: str, authenticated: bool,
                      note: str = "") -> dict[str, Any]:
        """Approve leaving ``stage`` (1-based; None: the current one) of the active rollout of ``model``."""
        ...


@dataclass(frozen=True)
class CheckAnswer:
    """The answer to one call of a rollout step's external check (``steps[].checks``): the HTTP status and
    the start of the body, or no status with ``timed_out`` (no answer within the check's timeout) or an
    ``error`` (unreachable, not HTTP)."""

    status: int | None
    body: bytes = b""
    elapsed_ms: float = 0.0
    error: str | None = None
    timed_out: bool = False


@runtime_checkable
class CheckCaller(Protocol):
    """Calls a step's external check over HTTP. Never raises: a failure is in the answer."""

    async def call(self, method: str, url: str, *, body: bytes | None, timeout_s: float) -> CheckAnswer:
        """One request; gives up after ``timeout_s`` seconds (``timed_out``)."""
        ...


#: The collector calls this with the models whose new observations it just stored (on its event loop).
StoredCallback = Callable[[set[str]], None]

#: The collector calls this on its writer thread right after a slice is durable: the slice's proto
#: ``Observation``s, the indexes of those stored now (not duplicates), the source and the received time.
RowsCallback = Callable[[Sequence[Any], Sequence[int], str, float], None]

#: The collector calls this with new stream outcomes ``(request_id, error_kind)`` once stored.
OutcomesCallback = Callable[[Sequence[tuple[str, str]]], None]

#: The observation store calls this with the labels it wrote: ``(request_id, kind, stored value, arrival ts)``.
LabelsCallback = Callable[[Sequence[tuple[str, str, Any, float]]], None]
