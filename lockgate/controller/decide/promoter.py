"""The promotion loop: the imperative shell around the stage machine.

Runs as a task of the controller process (:mod:`lockgate.controller.app` builds it). For every active
rollout it holds the lease of, it evaluates the locked spec on the stored observations
(incrementally, :class:`.live_evidence.LiveEvidence`, or the full path :func:`.evidence.judge`, in a
worker thread), asks :func:`.stages.decide` what to do, moves weights
through the control API (a :class:`~lockgate.controller.ports.WeightPusher`), and records every
evaluation and transition (:mod:`.rollouts`). Evaluations run every ``analysis_interval_s`` (the clock:
stage durations, ``max_duration``) and as soon as new observations of the model are stored
(:meth:`Promoter.notify` wakes the loop at once; looks of one rollout are spaced by
``max(MIN_SPACING_S, 2 x the last look's cost)``, and a deferred look runs when the spacing allows, not
at the next poll): the batch that carries the crossing evidence triggers the rollback.

Outcome events go to the :class:`~lockgate.controller.ports.EventSink` s it was built with (alerts and
registry feedback), as background tasks after the weights moved and the record was written. Starting a
rollout and the manual actions (pause, resume, abort, promote) are :mod:`.actions`; the HTTP routes are
:mod:`lockgate.controller.api.rollouts`.
Long: one rollout's look, moves and reverts share its lock; the gates and the capacity rule are their own modules.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Any, Sequence

import grpc

from lockgate.config import LockgateConfig
from lockgate.controller.decide.capacity_watch import CapacityWatch
from lockgate.controller.decide.evidence import EVAL_COLUMNS, judge  # noqa: F401  (EVAL_COLUMNS: bench imports it here)
from lockgate.controller.decide.gatekeeper import GateKeeper
from lockgate.controller.decide.gates import gates_json
from lockgate.controller.decide.host_watch import HostWatch, WithoutHosts
from lockgate.controller.decide.leases import LEASE_RENEW_S, LEASE_TTL_S, Driving, holds_lease, keep_leases
from lockgate.controller.decide.live_evidence import LiveEvidence
from lockgate.controller.decide.rollout_series import RolloutSeries
from lockgate.controller.decide.rollouts import Rollout, RolloutConflict, RolloutStore
from lockgate.controller.decide.shadow import ShadowStage, in_shadow
from lockgate.controller.decide.spec import RolloutSpec, spec_from_text
from lockgate.controller.decide.stages import StageDecision, StageState, decide, stage_label
from lockgate.controller.ports import CheckCaller, EventSink, ObservationSource, OutcomeEvent, WeightPusher
from lockgate.proto.v1 import control_pb2

log = logging.getLogger("lockgate.controller.decide.promoter")

MIN_SPACING_S = 0.02       #: data-triggered looks of one rollout at least this far apart (and 2x their cost)
LAST_EVAL_REFRESH_S = 1.0  #: a data-triggered look that changes nothing rewrites last_eval at most this often
REVERT_BACKOFF_S = 0.5     #: first retry of an incomplete revert; doubles per attempt ...
REVERT_BACKOFF_MAX_S = 10.0  #: ... up to this


class RolloutError(Exception):
    """A rollout request that cannot be honoured; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, detail: Any = None):
        super().__init__(message)
        self.status = status
        self.detail = detail


def load_spec_of(rollout: Rollout, config: LockgateConfig) -> RolloutSpec:
    """The spec a rollout was started with (its locked text), parsed against ``config``."""
    return spec_from_text(rollout.spec_text, rollout.spec_source, config)


class Promoter:
    """Drives every active rollout this controller holds the lease of (see the module docstring).

    ``weights`` moves traffic, ``observations`` is read for the evidence, ``rollouts`` is the rollout
    store (shared with :class:`.actions.RolloutActions`), ``sinks`` receive outcome events. Runs on one
    event loop; :meth:`notify` is the collector's ``on_stored`` callback."""

    def __init__(self, config: LockgateConfig, rollouts: RolloutStore, weights: WeightPusher,
                 observations: ObservationSource, sinks: Sequence[EventSink] = (),
                 evidence: LiveEvidence | None = None, series: RolloutSeries | None = None,
                 checks: CheckCaller | None = None):
        self.config = config
        #: the steps' approvals and external checks (``checks`` calls them; None: every check holds)
        self.gatekeeper = GateKeeper(rollouts, checks, self.notify, self.emit)
        #: per-host gating: the canary's hosts against each other, ejections, the version judged without them
        self.hosts = HostWatch(observations, rollouts, weights, config, self.emit)
        #: the spec's capacity rule: traffic rates from the store, capacity_hold / capacity_clear in the log
        self.capacity = CapacityWatch(observations, rollouts, config, self.emit)
        #: the spec's shadow stage (decide/shadow.py): mirrored requests, paired answers, while still pending
        self.shadow = ShadowStage()
        #: the rollout state on /metrics (None: not exported), told of every look and outcome
        self.series = series
        #: the incremental evidence (None: every look re-reads the store, :func:`.evidence.judge`)
        self.evidence = evidence
        self._refreshed: dict[int, float] = {}  #: rollout id → when last_eval was last written
        self.rollouts = rollouts
        self.weights = weights
        self.observations = observations
        self.sinks: tuple[EventSink, ...] = tuple(sinks)
        self._wake = asyncio.Event()
        self._dirty: set[str] = set()
        self._locks: dict[int, asyncio.Lock] = {}
        self._background: set[asyncio.Task] = set()
        self._revert_attempts: dict[int, int] = {}  #: rollout id → Rollback calls so far (incomplete revert)
        self._revert_next: dict[int, float] = {}  #: rollout id → earliest next retry (epoch s)
        #: rollout id → (time, (action, verdicts)) of the last evaluation written to the history
        self._recorded: dict[int, tuple[float, Any]] = {}
        self._pushed: dict[int, int] = {}  #: rollout id → weight of its last move's push (maybe not ACKed yet)
        self.driving = Driving()  #: which rollouts this controller drives, which another does (leases.py)
        #: rollout id → (final status, reason, actor, detected_at) of a revert not yet written down
        self._unrecorded: dict[int, tuple[str, str, str, float]] = {}

    def lock(self, rollout_id: int) -> asyncio.Lock:
        """The lock every change of one rollout's weights and record is made under."""
        return self._locks.setdefault(rollout_id, asyncio.Lock())

    def _evaluate(self, rollout: Rollout, spec: RolloutSpec, now: float, without: tuple[str, ...] = ()
                  ) -> tuple[Any, dict, int]:
        if without:  # ejected hosts: their canary rows left out (the full path; the incremental one keeps every row)
            return judge(WithoutHosts(self.observations, rollout.canary, without), self.config, rollout, spec, now)
        if self.evidence is not None:
            try:
                out = self.evidence.judge(rollout, spec, now)
            except Exception:  # never let the fast path stop a decision: rebuild it, judge the slow way
                log.exception("rollout #%d: incremental evidence failed; full recomputation", rollout.id)
                self.evidence.retain(())
                out = None
            if out is not None:
                return out
        return judge(self.observations, self.config, rollout, spec, now)

    async def evaluate_and_act(self, rollout: Rollout, now: float | None = None) -> StageDecision | None:
        lock = self.lock(rollout.id)
        async with lock:
            rollout = self.rollouts.get(rollout.id)
            if rollout is None or rollout.status not in ("running", "paused"):
                return None
            spec = load_spec_of(rollout, self.config)
            now = time.time() if now is None else now
            if rollout.status == "running":
                rollout = await self._pause_on_weight_drift(rollout, spec)
            loop = asyncio.get_running_loop()
            ejected = await self.hosts.step(rollout, now, act=rollout.status == "running")
            judgement, summary, in_stage = await loop.run_in_executor(None, self._evaluate, rollout, spec, now, ejected)
            if (hosts_now := self.hosts.summary(rollout, ejected)) is not None:
                summary["hosts"] = hosts_now
            detected_at = time.time()
            gates = self.gatekeeper.inputs(rollout, spec)
            capacity = (await loop.run_in_executor(None, self.capacity.verdict, rollout, spec, now)
                        if spec.capacity is not None and rollout.status == "running" else None)
            decision = decide(spec, StageState(rollout.status, rollout.stage, rollout.started_at,
                                               rollout.stage_started_at), judgement, now, in_stage, gates, capacity)
            if decision.action == "rollback" and (sus := self.hosts.suspect(rollout)) is not None:
                # rolled back only when the harm is not one host's: the version without the suspect must fail too
                alone, _s, _n = await loop.run_in_executor(None, self._evaluate, rollout, spec, now,
                                                           (*ejected, sus.host))
                if alone.decision != "rollback":
                    decision = StageDecision("hold", rollout.stage,
                                             spec.steps[min(rollout.stage, len(spec.steps) - 1)].weight_bp,
                                             (self.hosts.held(rollout, sus),))
            summary["stage_decision"] = {"action": decision.action, "reasons": list(decision.reasons)}
            if decision.action != "rollback":
                gates = self.gatekeeper.after(rollout, spec, decision, gates, now)
            if (gates_now := gates_json(spec, rollout.stage, gates)) is not None:
                summary["gates"] = gates_now
            if decision.action != "rollback" and (capacity_now := self.capacity.after(rollout, spec, decision,
                                                                                      capacity)) is not None:
                summary["capacity"] = capacity_now
            if self.series is not None:
                self.series.looked(rollout, spec, decision, summary, now)
            if decision.action == "rollback":
                await self.revert(rollout, spec, decision, summary, detected_at, actor="controller")
            else:
                # The evaluation history keeps one row per analysis interval (and every row whose
                # verdicts or action changed); data-triggered looks in between only refresh last_eval.
                shape = (decision.action, tuple((v["metric"], v["verdict"]) for v in summary["verdicts"]))
                keep = keep_in_history(now, shape, self._recorded.get(rollout.id), spec.analysis_interval_s)
                if keep:
                    self._recorded[rollout.id] = (now, shape)
                if keep or now - self._refreshed.get(rollout.id, 0.0) >= LAST_EVAL_REFRESH_S:
                    self._refreshed[rollout.id] = now
                    self.rollouts.record_evaluation(rollout.id, now, rollout.stage,
                                                    spec.steps[rollout.stage].weight_bp, summary, history=keep)
                if decision.action in ("advance", "promote") and holds_lease(self.rollouts, rollout.model):
                    await self._move(rollout, spec, decision, summary)
                elif decision.action == "inconclusive":
                    self.rollouts.transition(rollout.id, expect=("running",), status="inconclusive",
                                             kind="inconclusive", actor="controller",
                                             weight_bp=decision.weight_bp,
                                             detail={"reasons": list(decision.reasons), "verdicts": summary["verdicts"]})
                    log.warning("rollout #%d %s inconclusive: %s", rollout.id, rollout.model, decision.reasons)
                    self.emit("inconclusive", rollout.id, {"reasons": list(decision.reasons),
                                                           "verdicts": summary["verdicts"]})
            return decision

    async def _pause_on_weight_drift(self, rollout: Rollout, spec: RolloutSpec) -> Rollout:
        """A weight someone else set (``lockgate set-weight`` during a rollout) is never silently
        ignored: the rollout pauses where it is (harm still rolls back), says what it found and
        alerts; ``rollout resume`` re-applies the stage's weight, ``abort`` reverts."""
        resp = await self.weights.get_weights(rollout.model, deadline_s=5.0)
        live = resp.models[0] if resp.models else None
        want = spec.steps[min(rollout.stage, len(spec.steps) - 1)].weight_bp
        pushed = self._pushed.get(rollout.id)  # a move whose push is not yet ACKed everywhere is no drift
        if live is None or (live.canary == rollout.canary and live.weight_bp in (want, pushed)):
            return rollout
        if live.canary == rollout.canary and live.stage in (f"#{rollout.id}:stage-{rollout.stage + 2}",
                                                            f"#{rollout.id}:promoted"):
            # this rollout's next move, pushed by a controller that stopped before recording it (a failover):
            # no drift; the look decides the move again (pushing the same weight) and records it once
            self._pushed[rollout.id] = live.weight_bp
            return rollout
        found = f"{live.canary or 'no canary'} at {live.weight_bp / 100:g}%"
        detail = {"reasons": [f"the live weight is {found}, not this rollout's {rollout.canary} at {want / 100:g}% "
                              f"(changed outside the rollout); paused: resume re-applies {want / 100:g}%, "
                              f"abort reverts"],
                  "live_canary": live.canary, "live_bp": live.weight_bp, "stage_bp": want}
        log.warning("rollout #%d %s: weight drift: %s", rollout.id, rollout.model, detail["reasons"][0])
        return self.rollouts.transition(rollout.id, expect=("running",), status="paused", kind="weight_drift",
                                        actor="controller", weight_bp=live.weight_bp, detail=detail)

    async def push(self, model: str, version: str, weight_bp: int, stage: str, reason: str, cohorts: tuple = ()
                   ) -> control_pb2.SetWeightResponse:  # cohorts: the spec's active at that stage (cohorts_at)
        return await self.weights.set_weight(model, version, weight_bp, actor="controller", reason=reason, stage=stage,
                                             timeout_s=5.0, deadline_s=10.0, **({"cohorts": cohorts} if cohorts else {}))

    async def _move(self, rollout: Rollout, spec: RolloutSpec, decision: StageDecision, summary: dict) -> None:
        label = "promoted" if decision.action == "promote" else f"stage-{decision.stage + 1}"
        current = self.rollouts.get(rollout.id)  # another controller may have aborted it meanwhile
        if current is None or current.status != "running" or current.stage != rollout.stage:
            return
        self._pushed[rollout.id] = decision.weight_bp
        resp = await self.push(rollout.model, rollout.canary, decision.weight_bp, f"#{rollout.id}:{label}",
                                "; ".join(decision.reasons), spec.cohorts_at(decision.stage))
        if not resp.all_acked:
            self.rollouts.event(rollout.id, "push_incomplete", "controller",
                                {"wanted_bp": decision.weight_bp, "not_acked": list(resp.not_acked),
                                 "message": resp.message}, rollout.stage)
            log.error("rollout #%d: weight push not ACKed by %s; will retry", rollout.id, list(resp.not_acked))
            return
        detail = {"reasons": list(decision.reasons), "ack_ms": resp.elapsed_ms, **spec.cohort_detail(decision.stage),
                  "verdicts": summary["verdicts"], "alpha_statement": summary.get("alpha_statement")}
        if decision.action == "promote":
            self.rollouts.transition(rollout.id, expect=("running",), status="promoted", stage=decision.stage,
                                     kind="promoted", actor="controller", weight_bp=decision.weight_bp, detail=detail)
            log.info("rollout #%d %s %s promoted to 100%%", rollout.id, rollout.model, rollout.canary)
            self.emit("promoted", rollout.id, detail)
        else:
            self.rollouts.transition(rollout.id, expect=("running",), status="running", stage=decision.stage,
                                     kind="advanced", actor="controller", weight_bp=decision.weight_bp, detail=detail)
            log.info("rollout #%d %s advanced to %s", rollout.id, rollout.model, stage_label(spec, decision.stage))
            self.emit("advanced", rollout.id, detail)

    async def revert(self, rollout: Rollout, spec: RolloutSpec | None, decision: StageDecision | None,
                        summary: dict | None, detected_at: float, actor: str, final_status: str = "rolled_back",
                        reason: str | None = None) -> dict:
        """Weights to 0 first (nothing waits on bookkeeping), then the record with the three timestamps.

        The rollout reaches ``final_status`` only when the revert is complete: every Envoy the xDS
        server knows of ACKed weight 0 and the xDS server saved it. Otherwise it is ``rolling_back``
        (alerted, in the log with who is missing) and the loop re-issues the rollback with back-off
        (:meth:`_retry_revert`) until it is complete.
        """
        why = reason or "; ".join(decision.reasons if decision else ())
        timings = await self._revert_once(rollout, detected_at, actor, why)
        # The intent is kept in memory until it is recorded: if the state directory cannot be written
        # (a full disk), the loop re-issues it (weights first) instead of forgetting the revert.
        self._unrecorded[rollout.id] = (final_status, why, actor, detected_at)
        try:
            self._record_revert(rollout, spec, summary, timings, why, actor, final_status)
        except sqlite3.Error as exc:
            log.error("rollout #%d %s: revert %s but not recorded (%s); will retry", rollout.id, rollout.model,
                      "complete" if timings["complete"] else "incomplete", exc)
            timings["record_error"] = str(exc)
            return timings
        self._unrecorded.pop(rollout.id, None)
        return timings

    def _record_revert(self, rollout: Rollout, spec: RolloutSpec | None, summary: dict | None, timings: dict,
                       why: str, actor: str, final_status: str) -> None:
        if summary is not None:
            self.rollouts.record_evaluation(rollout.id, time.time(), rollout.stage,
                                            spec.steps[rollout.stage].weight_bp if spec else 0, summary)
        detail: dict[str, Any] = {"reasons": [why], "timings": timings}
        if summary is not None:
            detail["verdicts"] = summary["verdicts"]
        if timings["complete"]:
            self.rollouts.transition(rollout.id, expect=("pending", "running", "paused", "rolling_back"),
                                     status=final_status, kind=final_status, actor=actor, weight_bp=0, detail=detail)
            log.warning("rollout #%d %s %s: %s (%s)", rollout.id, rollout.model, final_status, why, timings)
            self.emit(final_status, rollout.id, detail)
        else:
            detail["final"] = final_status
            if rollout.status != "rolling_back":
                self.rollouts.transition(rollout.id, expect=("pending", "running", "paused"), status="rolling_back",
                                         kind="rolling_back", actor=actor, weight_bp=0, detail=detail)
                if self.series is not None:  # an abort not yet on every Envoy shows as rolling_back at once
                    self.series.outcome("rolling_back", self.rollouts.get(rollout.id), detail)
            self.rollouts.event(rollout.id, "revert_incomplete", actor,
                                {"final": final_status, "not_acked": timings.get("not_acked", []),
                                 "message": timings.get("error") or timings.get("message", ""),
                                 "persisted": timings.get("persisted", False), "attempt": timings["attempt"]},
                                rollout.stage, 0)
            log.error("rollout #%d %s: revert to weight 0 not complete (%s); rolling_back, will retry",
                      rollout.id, rollout.model, timings.get("error") or timings.get("not_acked"))

    async def _revert_once(self, rollout: Rollout, detected_at: float, actor: str, why: str) -> dict:
        """One Rollback call to the xDS server; ``complete`` says whether every Envoy has weight 0, saved."""
        attempt = self._revert_attempts.get(rollout.id, 0) + 1
        self._revert_attempts[rollout.id] = attempt
        try:
            resp = await self.weights.rollback(rollout.model, actor=actor, reason=why[:500], timeout_s=5.0,
                                               deadline_s=10.0)
            envoys = [{"node_id": e.node_id, "acked": e.acked, "ack_ms": e.ack_ms, "connected": e.connected,
                       "acked_weight_bp": e.acked_weight_bp} for e in resp.model.envoys]
            complete = bool(resp.all_acked and resp.persisted)
            timings = {"detected_at": detected_at, "pushed_at": resp.pushed_at,
                       "acked_at": resp.pushed_at + resp.elapsed_ms / 1000 if resp.all_acked else None,
                       "push_to_ack_ms": resp.elapsed_ms, "all_acked": resp.all_acked, "persisted": resp.persisted,
                       "envoys": envoys, "not_acked": list(resp.not_acked), "message": resp.message}
        except grpc.aio.AioRpcError as exc:
            complete = False
            timings = {"detected_at": detected_at, "error": f"control API: {exc.code().name}: {exc.details()}"}
            log.error("rollout #%d: rollback push failed: %s", rollout.id, timings["error"])
        timings.update(complete=complete, attempt=attempt)
        if complete:
            self._revert_attempts.pop(rollout.id, None)
        return timings

    async def _retry_revert(self, rollout: Rollout, now: float) -> None:
        """Re-issue a revert that is not done when its back-off has passed: a ``rolling_back`` rollout
        (intent from its ``rolling_back`` event), or one whose revert could not be recorded (intent kept
        in memory, whatever the stored status says)."""
        due = self._revert_next.get(rollout.id, 0.0)
        if now < due:
            return
        if rollout.id in self._unrecorded:
            final, why, actor, detected = self._unrecorded[rollout.id]
        else:
            pending = self.rollouts.last_event(rollout.id, "rolling_back") or {"detail": {}}
            final = pending["detail"].get("final", "rolled_back")
            why = "; ".join(pending["detail"].get("reasons") or ["revert retried"])
            actor, detected = "controller", pending.get("ts", now)
        attempt = self._revert_attempts.get(rollout.id, 0)
        self._revert_next[rollout.id] = now + min(REVERT_BACKOFF_MAX_S, REVERT_BACKOFF_S * 2 ** min(attempt, 8))
        async with self.lock(rollout.id):
            current = self.rollouts.get(rollout.id)
            if current is None or (current.status != "rolling_back" and rollout.id not in self._unrecorded):
                return
            timings = await self.revert(current, None, None, None, detected, actor, final, why)
        if timings["complete"]:
            self._revert_next.pop(rollout.id, None)

    def emit(self, kind: str, rollout_id: int, detail: dict) -> None:
        """Tell the sinks about an outcome, in the background (never awaited by the caller)."""
        rollout = self.rollouts.get(rollout_id) if self.sinks or self.series is not None else None
        if self.series is not None:
            self.series.outcome(kind, rollout, detail)
        if not self.sinks:
            return
        event: OutcomeEvent = {"kind": kind, "rollout": rollout_json(rollout),
                               "detail": detail, "ts": time.time()}
        for sink in self.sinks:
            async def run(sink=sink):
                try:
                    await sink.on_event(event)
                except Exception:
                    log.exception("rollout event sink %r failed on %s", sink, kind)
            task = asyncio.ensure_future(run())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ loop
    def notify(self, models: set[str]) -> None:
        """Collector callback: new observations stored for ``models``."""
        self._dirty |= models
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """The loop, until ``stop`` is set (one broken rollout never stops it)."""
        last: dict[int, float] = {}
        cost: dict[int, float] = {}  #: seconds the last evaluation of each rollout took
        deferred = 0.0  #: the earliest time a deferred data-triggered look may run
        renewer = asyncio.ensure_future(keep_leases(self.rollouts, stop))  # one driver per model
        await self._loop(stop, last, cost, deferred)
        renewer.cancel()

    async def _loop(self, stop: asyncio.Event, last: dict[int, float], cost: dict[int, float], deferred: float
                    ) -> None:
        while not stop.is_set():
            wait = 0.5 if deferred <= 0 else min(0.5, max(0.0, deferred - time.time()))
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            deferred = 0.0
            active = self.rollouts.active()
            self.driving.retain(r.id for r in active)
            if self.evidence is not None:
                self.evidence.retain(r.id for r in active if r.status in ("running", "paused")
                                     and r.id not in self.driving.others)
            for rollout in active:
                try:
                    mine = self.rollouts.acquire(rollout.model, LEASE_TTL_S)
                except sqlite3.Error as exc:  # cannot renew (full disk): keep driving what is ours
                    owner = self.rollouts.lease_owner(rollout.model)
                    mine = owner is not None and owner[0] == self.rollouts.owner
                    log.error("lease of %s not renewed (%s); %s", rollout.model, exc,
                              "still ours" if mine else "not ours")
                if not mine:
                    self._pushed.pop(rollout.id, None)  # another controller drives it (no evidence kept here)
                    self.driving.theirs(rollout.id)
                    continue
                if self.driving.mine(rollout.id):  # taken over: the other controller's lease ran out (or it is gone)
                    self.rollouts.event(rollout.id, "takeover", self.rollouts.owner, {}, rollout.stage)
                if rollout.id in self._unrecorded or rollout.status == "rolling_back":
                    try:
                        await self._retry_revert(rollout, time.time())
                    except RolloutConflict as exc:
                        log.info("rollout #%d changed while reverting: %s", rollout.id, exc)
                    except Exception:  # keep retrying the others
                        log.exception("rollout #%d: revert retry failed; will retry", rollout.id)
                    continue
                if rollout.status == "pending":
                    try:
                        await self.begin(rollout)
                    except (RolloutConflict, RolloutError) as exc:
                        log.info("rollout #%d start: %s", rollout.id, exc)
                    except grpc.aio.AioRpcError as exc:
                        log.error("rollout #%d: control API unreachable (%s); will retry", rollout.id,
                                  exc.code().name)
                    continue
                spec = load_spec_of(rollout, self.config)
                now = time.time()
                since = now - last.get(rollout.id, 0.0)
                # Data-triggered looks at most every MIN_SPACING_S, and never more than half the time (a
                # full recomputation of 1M observations takes seconds; an incremental look milliseconds).
                spacing = max(MIN_SPACING_S, 2 * cost.get(rollout.id, 0.0))
                due = since >= spec.analysis_interval_s or (rollout.model in dirty and since >= spacing)
                if not due:
                    if rollout.model in dirty:
                        self._dirty.add(rollout.model)  # look again once the spacing allows
                        at = now + spacing - since
                        deferred = at if deferred <= 0 else min(deferred, at)
                    continue
                last[rollout.id] = now
                try:
                    await self.evaluate_and_act(rollout)
                    cost[rollout.id] = time.time() - now
                except RolloutConflict as exc:
                    log.info("rollout #%d changed while evaluating: %s", rollout.id, exc)
                except grpc.aio.AioRpcError as exc:
                    log.error("rollout #%d: control API unreachable (%s); weights unchanged, will retry",
                              rollout.id, exc.code().name)
                except Exception:  # one broken rollout must not stop the others (or the safety net)
                    log.exception("rollout #%d: evaluation failed; will retry", rollout.id)

    async def begin(self, rollout: Rollout) -> dict:
        """pending → running: optional drill, then the first stage's weight (once, under the rollout's lock)."""
        async with self.lock(rollout.id):
            current = self.rollouts.get(rollout.id)
            if current is None or current.status != "pending":
                return {"already": current.status if current else "gone"}
            return await self._begin_locked(current)

    async def _begin_locked(self, rollout: Rollout) -> dict:
        spec = load_spec_of(rollout, self.config)
        out: dict[str, Any] = {}
        if in_shadow(spec, self.rollouts, rollout.id):  # the shadow stage first (decide/shadow.py): still pending
            held = await self.shadow.step(self, rollout, spec)
            if held is not None:
                return held
            out["shadow"] = "passed"
        if spec.promotion.preflight == "drill":
            drill = await self.weights.drill(rollout.model, actor=f"rollout#{rollout.id}", timeout_s=5.0,
                                             deadline_s=10.0)
            out["drill"] = {"all_acked": drill.all_acked, "elapsed_ms": drill.elapsed_ms,
                            "envoys": [{"node_id": e.node_id, "ack_ms": e.ack_ms, "acked": e.acked}
                                       for e in drill.model.envoys], "not_acked": list(drill.not_acked)}
            self.rollouts.event(rollout.id, "drill", "controller", out["drill"])
            if not drill.all_acked:
                self.rollouts.transition(rollout.id, expect=("pending",), status="aborted", kind="aborted",
                                         actor="controller", weight_bp=0,
                                         detail={"reasons": ["preflight drill failed: not every Envoy ACKed "
                                                             f"({', '.join(drill.not_acked) or drill.message})"]})
                raise RolloutError("preflight drill failed: not every Envoy ACKed the route re-push "
                                   f"({', '.join(drill.not_acked) or drill.message}); rollout aborted", 409, out)
        first = spec.steps[0]
        resp = await self.push(rollout.model, rollout.canary, first.weight_bp, f"#{rollout.id}:stage-1",
                                f"rollout #{rollout.id} start", spec.cohorts_at(0))
        if not resp.all_acked:
            self.rollouts.event(rollout.id, "push_incomplete", "controller",
                                {"wanted_bp": first.weight_bp, "not_acked": list(resp.not_acked),
                                 "message": resp.message}, 0)
            out["push"] = {"all_acked": False, "not_acked": list(resp.not_acked), "message": resp.message}
            return out  # stays pending; the loop retries
        started = self.rollouts.transition(rollout.id, expect=("pending",), status="running", stage=0, kind="started",
                                           actor="controller", weight_bp=first.weight_bp, detail={**spec.cohort_detail(0),
                                           "ack_ms": resp.elapsed_ms, "spec_hash": rollout.spec_hash})
        if self.series is not None:
            self.series.outcome("started", started, {}, spec)
        out["push"] = {"all_acked": True, "elapsed_ms": resp.elapsed_ms}
        return out


def keep_in_history(now: float, shape: Any, last: tuple[float, Any] | None, interval_s: float) -> bool:
    """Whether an evaluation goes into the rollout's evaluation history.

    ``shape`` is ``(action, ((metric, verdict), …))``; ``last`` the time and shape of the last row
    kept. Kept: the first, any that moves the rollout (not ``hold``), any whose verdicts changed, and
    otherwise one per ``analysis_interval_s`` — data-triggered looks (up to one a second) only
    refresh the rollout's latest evaluation, so the table grows with the spec's interval, not the load.
    """
    if last is None:
        return True
    last_at, last_shape = last
    return shape[0] != "hold" or shape != last_shape or now - last_at >= interval_s


def rollout_json(r: Rollout | None, with_eval: bool = False) -> dict:
    if r is None:
        return {}
    d = {"id": r.id, "model": r.model, "canary": r.canary, "baseline": r.baseline, "status": r.status,
         "stage": r.stage, "started_at": r.started_at, "stage_started_at": r.stage_started_at,
         "ended_at": r.ended_at, "spec_hash": r.spec_hash, "spec_source": r.spec_source, "created_by": r.created_by,
         "auto": r.auto}
    if with_eval:
        d["last_eval"] = r.last_eval
        d["last_eval_at"] = r.last_eval_at
    return d


__all__ = ["LAST_EVAL_REFRESH_S", "LEASE_RENEW_S", "LEASE_TTL_S", "MIN_SPACING_S", "Promoter", "RolloutError", "keep_in_history", "load_spec_of",
           "rollout_json"]
