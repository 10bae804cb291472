"""What people ask of rollouts: start one from a spec, pause, resume, abort, promote, and status.

:class:`RolloutActions` is the :class:`~lockgate.controller.ports.RolloutCommands` the HTTP API
(:mod:`lockgate.controller.api.rollouts`, ``lockgate rollout …``) calls. Every weight change goes
through the :class:`~.promoter.Promoter` under the rollout's lock (:meth:`.Promoter.lock`), so a manual
action and the loop never move one rollout's weights at the same time. The coroutines run on the
controller's event loop; failures are :class:`~.promoter.RolloutError` (with the HTTP status to answer)
or :class:`~.rollouts.RolloutConflict` (409).
"""

from __future__ import annotations

import asyncio
import logging
import time

from lockgate.config import ConfigError, LockgateConfig
from lockgate.controller.decide import analysis
from lockgate.controller.decide.evidence import stable_history, start_plan, status_plan, with_cohorts
from lockgate.controller.decide.gatekeeper import approvals_of
from lockgate.controller.decide.promoter import LEASE_TTL_S, Promoter, RolloutError, load_spec_of, rollout_json
from lockgate.controller.decide.rollouts import RolloutConflict, RolloutStore
from lockgate.controller.decide.spec import render_warning, spec_from_text
from lockgate.controller.decide.stages import stage_label
from lockgate.controller.ports import ObservationSource
from lockgate.routing import TOTAL_WEIGHT_BP

log = logging.getLogger("lockgate.controller.decide.actions")

#: A rollout spec posted to the controller is parsed on a worker thread, and refused if that takes longer.
SPEC_PARSE_TIMEOUT_S = 10.0
#: The manual actions on a model's active rollout.
ACTIONS = ("pause", "resume", "abort", "promote")
#: canary weight (basis points) of a rollout in a final or not-yet-started status
_STATUS_WEIGHT_BP = {"promoted": TOTAL_WEIGHT_BP, "rolled_back": 0, "aborted": 0, "pending": 0, "rolling_back": 0}


class RolloutActions:
    """Start, manual actions and status of rollouts (see the module docstring)."""

    def __init__(self, config: LockgateConfig, rollouts: RolloutStore, promoter: Promoter,
                 observations: ObservationSource):
        self.config = config
        self.rollouts = rollouts
        self.promoter = promoter
        self.observations = observations

    async def start(self, spec_text: str, source: str, actor: str) -> dict:
        """Validate the spec, derive ``allowed: auto`` from the stable version's recent traffic, plan the
        ramp, record the rollout (pending) and begin it (drill, first stage's weight)."""
        try:  # parsed on a worker thread: a hostile or huge spec never holds the event loop
            spec = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                None, spec_from_text, spec_text, source, self.config), SPEC_PARSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RolloutError(f"invalid rollout spec: not parsed within {SPEC_PARSE_TIMEOUT_S:g} s", 400) from None
        except ConfigError as exc:
            raise RolloutError("invalid rollout spec", 400, [p.render(exc.source) for p in exc.problems]) from None
        model = self.config.model(spec.model)
        self._take_lease(spec.model)  # refused when another controller drives the model
        now = time.time()
        history = stable_history(self.observations, self.config, spec.model, now)
        try:
            auto = analysis.resolve_auto(spec, history, now)
        except ValueError as exc:
            raise RolloutError(f"cannot derive allowed: auto: {exc}", 400) from None
        auto_json = {k: {"value": a.value, "derivation": a.derivation} for k, a in auto.items()}
        plan = await asyncio.get_running_loop().run_in_executor(None, start_plan, spec, history, auto, now)
        warnings = [render_warning(p, spec.source) for p in spec.warnings] + list(plan.warnings)
        try:
            self._take_lease(spec.model)  # again, just before the row exists: no other controller begins it
            rollout = self.rollouts.create(model=spec.model, canary=spec.canary, baseline=model.stable,
                                           spec_text=spec_text, spec_source=source, spec_hash=spec.sha256,
                                           created_by=actor, auto=auto_json)
        except RolloutConflict as exc:
            raise RolloutError(str(exc), 409) from None
        plan_json = plan.to_dict()
        if warnings or plan.metrics:
            self.rollouts.event(rollout.id, "warnings", actor, {"warnings": warnings, "plan": plan_json})
        self.rollouts.acquire(spec.model, LEASE_TTL_S)
        started = await self.promoter.begin(rollout)
        return {"rollout": rollout_json(self.rollouts.get(rollout.id)), "warnings": warnings, "plan": plan_json,
                "start": started}

    def _take_lease(self, model: str) -> None:
        """Hold ``model``'s lease (so this controller begins and drives the rollout), or raise 409 naming the
        controller that holds it."""
        if not self.rollouts.acquire(model, LEASE_TTL_S):
            owner = self.rollouts.lease_owner(model)
            raise RolloutError(f"model {model!r} is driven by another controller ({owner[0] if owner else '?'}); "
                               "start it there", 409)

    async def action(self, model: str, action: str, actor: str) -> dict:
        """``pause`` | ``resume`` | ``abort`` | ``promote`` the active rollout of ``model`` (by ``actor``)."""
        active = self.rollouts.active(model)
        if not active:
            raise RolloutError(f"model {model!r} has no active rollout", 404)
        rollout = active[0]
        promoter = self.promoter
        if action == "pause":
            r = self.rollouts.transition(rollout.id, expect=("running",), status="paused", kind="paused", actor=actor)
        elif action == "resume":
            if rollout.status != "paused":
                raise RolloutConflict(f"rollout #{rollout.id} is {rollout.status}, not paused")
            spec = load_spec_of(rollout, self.config)
            want = spec.steps[min(rollout.stage, len(spec.steps) - 1)].weight_bp
            resp = await promoter.push(model, rollout.canary, want, f"#{rollout.id}:stage-{rollout.stage + 1}",
                                       f"resumed by {actor}",  # re-applies the stage weight (after a drift)
                                       spec.cohorts_at(min(rollout.stage, len(spec.steps) - 1)))
            if not resp.all_acked:
                raise RolloutError(f"resume: stage weight {want / 100:g}% not ACKed by "
                                   f"{', '.join(resp.not_acked) or resp.message}; still paused", 502)
            r = self.rollouts.transition(rollout.id, expect=("paused",), status="running", kind="resumed",
                                         actor=actor)
        elif action == "abort":
            final = "aborted"
            if rollout.status == "rolling_back":  # a revert in progress: push again now, keep its outcome
                pending = self.rollouts.last_event(rollout.id, "rolling_back") or {"detail": {}}
                final = pending["detail"].get("final", "aborted")
            async with promoter.lock(rollout.id):
                current = self.rollouts.get(rollout.id) or rollout
                timings = await promoter.revert(current, None, None, None, time.time(), actor, final,
                                                f"aborted by {actor}")
            return {"rollout": rollout_json(self.rollouts.get(rollout.id)), "timings": timings,
                    "complete": timings["complete"]}
        elif action == "promote":
            resp = await promoter.push(model, rollout.canary, TOTAL_WEIGHT_BP, f"#{rollout.id}:promoted",
                                       f"manual promote by {actor}")
            if not resp.all_acked:
                raise RolloutError(f"promotion push not ACKed by {', '.join(resp.not_acked) or resp.message}", 502)
            spec = load_spec_of(rollout, self.config)
            r = self.rollouts.transition(rollout.id, expect=("running", "paused", "inconclusive"), status="promoted",
                                         stage=len(spec.steps), kind="promoted", actor=actor, weight_bp=TOTAL_WEIGHT_BP,
                                         detail={"reasons": [f"manual promotion by {actor} (not by evidence)"]})
            promoter.emit("promoted", rollout.id, {"reasons": [f"manual promotion by {actor} (not by evidence)"]})
        else:
            raise RolloutError(f"unknown action {action!r}", 400)
        return {"rollout": rollout_json(r)}

    async def approve(self, model: str, stage: int | None, actor: str, authenticated: bool,
                      note: str = "") -> dict:
        """Approve leaving ``stage`` (1-based; None: the current stage) of ``model``'s active rollout, as
        ``actor`` (the authenticated client's name, or what an unauthenticated caller said: ``authenticated``
        tells which). Recorded in the deployment log (``approved``); the promotion loop advances on its next
        look if the stage's other conditions and checks hold — an approval never overrides a gate.
        A later stage may be approved in advance; an earlier one, or one that needs no approval, may not."""
        active = self.rollouts.active(model)
        if not active:
            raise RolloutError(f"model {model!r} has no active rollout", 404)
        async with self.promoter.lock(active[0].id):
            rollout = self.rollouts.get(active[0].id) or active[0]
            if rollout.status not in ("pending", "running", "paused"):
                raise RolloutConflict(f"rollout #{rollout.id} is {rollout.status}: nothing to approve")
            spec = load_spec_of(rollout, self.config)
            n = len(spec.steps)
            needing = [i + 1 for i, s in enumerate(spec.steps) if s.approval]
            k = rollout.stage if stage is None else stage - 1
            if not 0 <= k < n:
                raise RolloutError(f"stage {stage}: rollout #{rollout.id} has stages 1 to {n}", 400)
            if not spec.steps[k].approval:
                which = (f"stages that need one: {', '.join(map(str, needing))}" if needing
                         else "no stage of its spec needs one")
                raise RolloutConflict(f"rollout #{rollout.id}: {stage_label(spec, k)} needs no approval ({which})")
            if k < rollout.stage:
                raise RolloutConflict(f"rollout #{rollout.id} is past {stage_label(spec, k)} already (at "
                                      f"{stage_label(spec, rollout.stage)})")
            label = stage_label(spec, k)
            prior = approvals_of(self.rollouts.events(rollout.id)).get(k)
            if prior is not None:
                return {"rollout": rollout_json(rollout), "stage": k + 1, "label": label, "already": True,
                        "approved_by": prior.actor, "approved_at": prior.at, "authenticated": prior.authenticated}
            who = actor if authenticated else f"{actor} (unauthenticated)"
            leaving = "the promotion to 100%" if k == n - 1 else f"the move to {spec.steps[k + 1].weight_bp / 100:g}%"
            detail = {"reasons": [f"{label} approved by {who}: {leaving} may go ahead once the stage's other "
                                  "conditions hold"], "approved_stage": k + 1, "authenticated": authenticated}
            if note:
                detail["note"] = note
            self.rollouts.event(rollout.id, "approved", actor, detail, stage=k)
        log.info("rollout #%d %s: %s approved by %s", rollout.id, model, label, who)
        self.promoter.notify({model})  # the next look may advance at once
        return {"rollout": rollout_json(self.rollouts.get(rollout.id)), "stage": k + 1, "label": label,
                "already": False, "approved_by": actor, "approved_at": time.time(), "authenticated": authenticated}

    def status(self, model: str | None = None) -> list[dict]:
        """The latest rollout of ``model`` (or of every configured model): record, last evaluation, stage,
        weight (basis points), plan and last outcome, as JSON."""
        models = [model] if model else [m.name for m in self.config.models]
        out = []
        for name in models:
            r = self.rollouts.latest(name)
            if r is None:
                continue
            d = rollout_json(r, with_eval=True)
            try:
                spec = load_spec_of(r, self.config)
            except ConfigError:
                spec = None
                d["weight_bp"] = None  # config changed since the rollout started
            else:
                d["stages"] = len(spec.steps)
                d["stage_label"] = stage_label(spec, r.stage)
                d["weight_bp"] = _STATUS_WEIGHT_BP.get(r.status,
                                                       spec.steps[min(r.stage, len(spec.steps) - 1)].weight_bp)
            d["plan"] = status_plan(spec, r, time.time()) if spec is not None else None
            if spec is not None and spec.cohorts:  # apart from the gates' sample (evidence.cohort_stats)
                d["cohorts"] = with_cohorts({}, self.observations, r, spec).get("cohorts")
            events = self.rollouts.events(r.id)
            outcome = [e for e in events if e["kind"] in ("promoted", "rolled_back", "aborted", "inconclusive")]
            d["outcome"] = outcome[-1] if outcome else None
            #: per-host gating: each ejection (with its numbers), incomplete ejection and held rollback
            d["hosts"] = [e for e in events if e["kind"] in ("host_ejected", "host_eject_incomplete", "host_suspect")]
            d["approvals"] = [{"stage": k + 1, "approved_by": a.actor, "approved_at": a.at,
                               "authenticated": a.authenticated} for k, a in sorted(approvals_of(events).items())]
            out.append(d)
        return out


__all__ = ["ACTIONS", "RolloutActions", "SPEC_PARSE_TIMEOUT_S"]
