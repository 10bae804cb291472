"""The imperative shell of capacity-aware ramps (:mod:`.capacity`): the traffic rates read from the
stored observations, and the deployment log's ``capacity_hold`` / ``capacity_clear`` events.

:class:`CapacityWatch` is built by the :class:`~.promoter.Promoter`. At each look of a rollout whose
spec has ``capacity:``, :meth:`CapacityWatch.verdict` (called in a worker thread) reads the model's
observations of the last ``window_s`` seconds (version, output tokens, latency; re-read at most every
:data:`REFRESH_S` seconds per rollout, so data-triggered looks cost nothing extra; with ``latency_rise``
also the canary's latencies of the rollout's first ``window_s`` seconds, read once), counts the
canary's hosts in lockgate.yaml and asks :func:`.capacity.judge_capacity`. After the decision,
:meth:`CapacityWatch.after` writes ``capacity_hold`` to the log when a stage starts being held by the
rule and ``capacity_clear`` when it no longer is (once per change of state, with the numbers); the first
hold of a stage is also an outcome event (``capacity_hold``: an alert to the sinks subscribed to it,
by default all).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from lockgate.controller.decide.capacity import CapacityVerdict, LoadInputs, capacity_json, judge_capacity
from lockgate.controller.decide.rollouts import Rollout, RolloutStore
from lockgate.controller.decide.spec import RolloutSpec
from lockgate.controller.decide.spec.capacity import canary_hosts
from lockgate.controller.decide.stages import StageDecision
from lockgate.controller.ports import ObservationSource

log = logging.getLogger("lockgate.controller.decide.capacity_watch")

REFRESH_S = 2.0  #: the window's rates of one rollout are re-read at most this often

__all__ = ["CapacityWatch", "REFRESH_S", "read_load", "start_latency"]


def _p50(latency: np.ndarray) -> tuple[float | None, int]:
    known = latency[np.isfinite(latency)]
    return (float(np.median(known)) if len(known) else None), int(len(known))


def start_latency(observations: ObservationSource, model: str, canary: str, started_at: float,
                  window_s: float) -> tuple[float | None, int]:
    """The canary's p50 latency (and its count) in the first ``window_s`` seconds of the rollout."""
    cols = observations.fetch(model, started_at, started_at + window_s, [canary], columns=("latency_ms",))
    return _p50(np.asarray(cols["latency_ms"], dtype=float))


def read_load(observations: ObservationSource, model: str, canary: str, hosts: int, window_s: float,
              now: float, start: tuple[float | None, int] = (None, 0)) -> LoadInputs:
    """The model's traffic in ``[now - window_s, now)`` from the store (see :class:`.capacity.LoadInputs`);
    ``start``: the canary's p50 latency at the start of the rollout (:func:`start_latency`), for the
    observed mode."""
    cols = observations.fetch(model, now - window_s, now, columns=("version", "output_tokens", "latency_ms"))
    version = cols["version"]
    tokens = np.asarray(cols["output_tokens"], dtype=float)
    canary_rows = version == canary
    counted = np.isfinite(tokens)
    p50, n = _p50(np.asarray(cols["latency_ms"], dtype=float)[canary_rows])
    return LoadInputs(window_s=window_s, hosts=hosts, requests=int(len(version)),
                      canary_requests=int(np.count_nonzero(canary_rows)),
                      tokens=float(tokens[counted].sum()), token_responses=int(np.count_nonzero(counted)),
                      canary_tokens=float(tokens[counted & canary_rows].sum()),
                      canary_token_responses=int(np.count_nonzero(counted & canary_rows)),
                      canary_p50_ms=p50, canary_latency_n=n, start_p50_ms=start[0], start_latency_n=start[1])


class CapacityWatch:
    """The capacity rule of the rollouts' current stages (see the module docstring)."""

    def __init__(self, observations: ObservationSource, rollouts: RolloutStore, config: Any,
                 emit: Callable[[str, int, dict], None] | None = None):
        self.observations = observations
        #: the promoter's outcome events: the first capacity hold of a stage is a ``capacity_hold`` alert
        self.emit = emit
        self._alerted: set[tuple[int, int]] = set()  #: (rollout id, stage) whose hold was alerted
        self.rollouts = rollouts
        self.config = config
        self._lock = threading.Lock()
        self._loads: dict[int, tuple[float, LoadInputs]] = {}  #: rollout id → (read at, load)
        self._start: dict[int, tuple[float | None, int]] = {}  #: rollout id → its canary p50 at the start
        self._state: dict[tuple[int, int], bool] = {}  #: (rollout id, stage) → held by capacity at the last look

    def verdict(self, rollout: Rollout, spec: RolloutSpec, now: float) -> CapacityVerdict | None:
        """The rule's verdict for leaving the current stage (None: no ``capacity:`` or no next step).
        Blocking (reads the store): call it in a worker thread."""
        cap = spec.capacity
        if cap is None or rollout.stage >= len(spec.steps):
            return None
        with self._lock:
            cached = self._loads.get(rollout.id)
        if cached is not None and 0 <= now - cached[0] < REFRESH_S:
            load = cached[1]
        else:
            hosts = canary_hosts(self.config, rollout.model, rollout.canary)
            try:
                start = self._start.get(rollout.id, (None, 0))
                if cap.latency_rise is not None and rollout.id not in self._start:
                    start = start_latency(self.observations, rollout.model, rollout.canary, rollout.started_at,
                                          cap.window_s)
                    if now >= rollout.started_at + cap.window_s:  # the start window is complete: read once
                        self._start[rollout.id] = start
                load = read_load(self.observations, rollout.model, rollout.canary, hosts, cap.window_s, now, start)
            except Exception as exc:  # never stop a look (harm must still roll back): hold, saying why
                log.exception("rollout #%d: capacity: traffic rates not read", rollout.id)
                return CapacityVerdict(False, f"capacity: holding: the traffic rates could not be read "
                                              f"({type(exc).__name__}: {exc})", {"stage": rollout.stage})
            with self._lock:
                self._loads[rollout.id] = (now, load)
        return judge_capacity(spec, rollout.stage, load)

    def after(self, rollout: Rollout, spec: RolloutSpec, decision: StageDecision,
              verdict: CapacityVerdict | None) -> dict | None:
        """Log a change of the capacity hold of this stage; the status block (None: no rule)."""
        if verdict is None:
            return None
        held = decision.action == "hold" and decision.capacity_hold
        key = (rollout.id, rollout.stage)
        before = self._state.get(key)
        if before is None:  # first look at this stage here (maybe after a restart): what the log says
            before = self._logged_state(rollout)
        if held != before:
            self._state[key] = held
            if held or before:
                kind = "capacity_hold" if held else "capacity_clear"
                log.info("rollout #%d %s: %s", rollout.id, rollout.model, verdict.reason)
                detail = {"reasons": [verdict.reason], **capacity_json(verdict, held)}
                try:
                    self.rollouts.event(rollout.id, kind, "controller", detail, rollout.stage)
                except Exception as exc:  # the log is not on the rollback path: never stop a look for it
                    log.error("rollout #%d: %s not written to the deployment log: %s", rollout.id, kind, exc)
                if held and key not in self._alerted:  # an alert once per stage, however often it flips
                    self._alerted.add(key)
                    if self.emit is not None:
                        self.emit("capacity_hold", rollout.id, detail)
        else:
            self._state[key] = held
        return capacity_json(verdict, held)

    def _logged_state(self, rollout: Rollout) -> bool:
        try:
            events = self.rollouts.events(rollout.id)
        except Exception:
            return False
        last = None
        for e in events:
            if e["kind"] in ("capacity_hold", "capacity_clear") and e["stage"] == rollout.stage:
                last = e["kind"]
                if last == "capacity_hold":  # alerted then (by this controller or the one before it)
                    self._alerted.add((rollout.id, rollout.stage))
        return last == "capacity_hold"
