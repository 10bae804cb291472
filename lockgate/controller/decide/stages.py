"""The rollout stage machine, as a pure function.

States: ``pending`` → ``running`` (stage k = 0 … len(steps)-1) → ``promoted`` | ``rolled_back`` |
``aborted`` | ``inconclusive``; ``paused`` holds a running rollout where it is (harm still rolls
back: pausing never disables the safety net); ``rolling_back`` is a rollback or abort not yet on every
Envoy (see ``rollouts.ACTIVE_STATUSES``, the one list of the statuses that still need the controller).

:func:`decide` maps (spec, current state, judgement, clock, canary samples in this stage) to one
:class:`StageDecision`. Rules, in order:

1. any gating metric shows harm → ``rollback`` (at once, whatever the stage's minimums);
2. paused → ``hold``;
3. the stage's minimum duration or minimum canary samples not met → ``hold``;
4. not the last stage → ``advance`` to the next stage's weight (no harm is enough to ramp);
5. last stage → ``promote`` to 100 % when every gating metric shows non-inferiority (or, with
   ``require_non_inferiority: false``, when none shows harm);
6. 4 and 5 only when the step's gates are open (:mod:`.gates`: its approval given, each external
   check's latest answer a fresh pass); otherwise ``hold`` saying what is missing, with the checks
   to call now in ``due_checks`` (gates never override 1: harm rolls back while waiting);
6b. 4 and 5 only when the canary's hosts can take the next weight (:mod:`.capacity`, a spec with
   ``capacity:``); otherwise ``hold`` with the projection in the reason (``capacity_hold``);
7. the rollout's ``max_duration`` used up without 4/5 → ``inconclusive`` (held at its weight for a
   human; never promoted silently); otherwise ``hold`` collecting evidence.

``gates=None`` leaves the steps' gates out (offline replay, which has no approvals or checks to
replay); the promotion loop always passes a :class:`~.gates.GateInputs`. ``capacity=None`` leaves the
capacity rule out (no ``capacity:`` in the spec, or the replay).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lockgate.controller.decide.capacity import CapacityVerdict
from lockgate.controller.decide.gates import GateInputs, GateVerdict, open_gates
from lockgate.controller.decide.spec import RolloutSpec
from lockgate.controller.stats import Judgement
from lockgate.routing import TOTAL_WEIGHT_BP


@dataclass(frozen=True)
class StageState:
    status: str          #: pending | running | paused | promoted | rolled_back | aborted | inconclusive
    stage: int           #: index into spec.steps (meaningful while running/paused)
    started_at: float    #: epoch s, rollout start
    stage_started_at: float


@dataclass(frozen=True)
class StageDecision:
    action: str          #: hold | advance | promote | rollback | inconclusive
    stage: int           #: stage index after the decision (len(steps) after promotion)
    weight_bp: int       #: canary weight after the decision
    reasons: tuple[str, ...] = field(default_factory=tuple)
    due_checks: tuple[str, ...] = ()  #: external checks of the step to call now (see :mod:`.gates`)
    awaiting_approval: bool = False   #: the step's own conditions are met; its approval is missing
    capacity_hold: bool = False       #: held because the canary's hosts cannot take the next weight

    @property
    def moves_weight(self) -> bool:
        return self.action in ("advance", "promote", "rollback")


def stage_label(spec: RolloutSpec, stage: int) -> str:
    if stage >= len(spec.steps):
        return "100%"
    return f"stage {stage + 1}/{len(spec.steps)} ({spec.steps[stage].weight_bp / 100:g}%)"


def decide(spec: RolloutSpec, state: StageState, judgement: Judgement, now: float,
           canary_samples_in_stage: int, gates: GateInputs | None = None,
           capacity: CapacityVerdict | None = None) -> StageDecision:
    if state.status not in ("running", "paused"):
        raise ValueError(f"decide() needs a running or paused rollout, not {state.status}")
    step = spec.steps[state.stage]
    current_bp = step.weight_bp
    if judgement.decision == "rollback":
        return StageDecision("rollback", state.stage, 0,
                             ("harm shown: " + "; ".join(r for r in judgement.reasons if not r.startswith("(")),))
    if state.status == "paused":
        return StageDecision("hold", state.stage, current_bp, ("paused by an operator (harm still rolls back)",))
    in_stage = now - state.stage_started_at
    waiting = []
    if in_stage < step.min_duration_s:
        waiting.append(f"minimum duration: {in_stage:.0f} of {step.min_duration_s:.0f} s")
    if canary_samples_in_stage < step.min_canary_samples:
        waiting.append(f"minimum canary samples: {canary_samples_in_stage} of {step.min_canary_samples}")
    overdue = now - state.started_at >= spec.promotion.max_duration_s
    last = state.stage == len(spec.steps) - 1
    gate = GateVerdict(open=True)
    capacity_hold = False
    if not waiting:
        promotable = judgement.decision == "promote" or (not spec.promotion.require_non_inferiority and
                                                         judgement.decision == "continue")
        if gates is not None and step.gated and (not last or promotable):
            gate = open_gates(step, stage_label(spec, state.stage), spec.model, gates, now)
        if not gate.open:
            waiting.extend(gate.waiting)
        if capacity is not None and not capacity.fits and (not last or promotable):
            waiting.append(capacity.reason)
            capacity_hold = True
        if waiting:
            pass
        elif not last:
            nxt = spec.steps[state.stage + 1]
            return StageDecision("advance", state.stage + 1, nxt.weight_bp,
                                 (f"{stage_label(spec, state.stage)} done, no gating metric shows harm; "
                                  f"advancing to {nxt.weight_bp / 100:g}%",) + gate.passed
                                 + ((capacity.reason,) if capacity is not None else ()))
        elif promotable:
            why = ("every gating metric shown within its allowed change" if judgement.decision == "promote"
                   else "no gating metric shows harm (non-inferiority not required by the spec)")
            return StageDecision("promote", len(spec.steps), TOTAL_WEIGHT_BP,
                                 (f"promoting to 100%: {why}",) + gate.passed
                                 + ((capacity.reason,) if capacity is not None else ()))
        else:
            waiting.append("promotion needs every gating metric shown within its allowed change: "
                           + "; ".join(v.metric for v in judgement.verdicts if v.gating and v.verdict != "pass")
                           + " not yet")
    if overdue:
        return StageDecision("inconclusive", state.stage, current_bp,
                             (f"max duration {spec.promotion.max_duration_s:.0f} s reached without evidence for "
                              f"promotion; holding at {current_bp / 100:g}% for a human",) + tuple(waiting))
    return StageDecision("hold", state.stage, current_bp, tuple(waiting) or ("collecting evidence",),
                         due_checks=gate.due, awaiting_approval=gate.awaiting_approval, capacity_hold=capacity_hold)
