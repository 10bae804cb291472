"""The imperative shell of the steps' gates (:mod:`.gates`): what the promotion loop knows of them and the
calls of the external checks.

:class:`GateKeeper` is built by the :class:`~.promoter.Promoter` with the ``CheckCaller`` port that
``app.py`` gives it. At each look of a rollout whose current step has gates, :meth:`GateKeeper.inputs`
reads the stage's approval (and since when it has waited for one) from the deployment log and adds the
latest answer of each check; after the decision, :meth:`GateKeeper.after` writes ``awaiting_approval``
to the log once per stage and starts the checks the decision says are due, each as a background task
(a check that takes its whole timeout never delays a look, so harm still rolls back while it runs).
A check's answer is judged (:func:`.gates.judge_answer`), written to the log when its state changes
(``check`` events: pass, fail, timeout, unreachable, with the start of the answer) and wakes the loop.
The first wait for an approval is also an outcome event (``awaiting_approval``: an alert to the sinks
subscribed to it, by default all).
Results live in memory: a restarted controller calls the checks again; approvals are in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Callable

from lockgate.controller.decide.gates import (
    Approval,
    CheckResult,
    GateInputs,
    check_request_body,
    judge_answer,
    shown_url,
)
from lockgate.controller.decide.rollouts import Rollout, RolloutStore
from lockgate.controller.decide.spec import RolloutSpec
from lockgate.controller.decide.spec.model import GateCheck
from lockgate.controller.decide.stages import StageDecision, stage_label
from lockgate.controller.ports import CheckAnswer, CheckCaller

log = logging.getLogger("lockgate.controller.decide.gatekeeper")

__all__ = ["GateKeeper", "approvals_of"]


def approvals_of(events: list[dict]) -> dict[int, Approval]:
    """Stage index → its first approval, from a rollout's deployment log (``approved`` events)."""
    out: dict[int, Approval] = {}
    for e in events:
        if e["kind"] == "approved" and e["stage"] is not None and e["stage"] not in out:
            out[e["stage"]] = Approval(e["actor"], e["ts"], bool(e["detail"].get("authenticated")))
    return out


class GateKeeper:
    """Approvals and external checks of the rollouts' current steps (see the module docstring).
    ``wake(models)`` is called when a check's answer arrives (the promoter's ``notify``)."""

    def __init__(self, rollouts: RolloutStore, caller: CheckCaller | None, wake: Callable[[set[str]], None],
                 emit: Callable[[str, int, dict], None] | None = None):
        self.rollouts = rollouts
        self.caller = caller
        self.wake = wake
        #: the promoter's outcome events (alerts): ``awaiting_approval`` tells the approvers
        self.emit = emit
        self._results: dict[tuple[int, int, str], CheckResult] = {}
        self._running: dict[tuple[int, int, str], asyncio.Task] = {}
        self._awaiting: dict[tuple[int, int], float] = {}

    def inputs(self, rollout: Rollout, spec: RolloutSpec) -> GateInputs:
        """The current stage's gates (empty when its step has none: no log read)."""
        stage = rollout.stage
        if stage >= len(spec.steps) or not spec.steps[stage].gated:
            return GateInputs()
        step = spec.steps[stage]
        approval = None
        since = self._awaiting.get((rollout.id, stage))
        if step.approval:
            events = self.rollouts.events(rollout.id)
            approval = approvals_of(events).get(stage)
            if since is None:
                since = next((e["ts"] for e in events if e["kind"] == "awaiting_approval" and e["stage"] == stage),
                             None)
                if since is not None:
                    self._awaiting[(rollout.id, stage)] = since
        checks = {c.name: r for c in step.checks if (r := self._results.get((rollout.id, stage, c.name))) is not None}
        running = frozenset(c.name for c in step.checks if (rollout.id, stage, c.name) in self._running)
        return GateInputs(approval=approval, checks=checks, running=running, awaiting_since=since)

    def after(self, rollout: Rollout, spec: RolloutSpec, decision: StageDecision, gates: GateInputs,
              now: float) -> GateInputs:
        """Log the first wait for an approval of this stage; start the checks that are due. Returns
        ``gates`` as they are now (the wait's start, the checks being called), for the status."""
        stage = rollout.stage
        if decision.awaiting_approval and (rollout.id, stage) not in self._awaiting:
            self._awaiting[(rollout.id, stage)] = now
            label = stage_label(spec, stage)
            detail = {"reasons": [f"{label} is done and waits for an approval (lockgate rollout approve "
                                  f"{rollout.model})"]}
            self._event(rollout, "awaiting_approval", stage, detail)
            if self.emit is not None:
                self.emit("awaiting_approval", rollout.id, detail)
        if decision.action == "hold" and stage < len(spec.steps):
            checks = {c.name: c for c in spec.steps[stage].checks}
            for name in decision.due_checks:
                key = (rollout.id, stage, name)
                if name in checks and key not in self._running:
                    task = asyncio.ensure_future(self._call(rollout, spec, stage, checks[name]))
                    self._running[key] = task
                    task.add_done_callback(lambda _t, key=key: self._running.pop(key, None))
        if stage >= len(spec.steps) or not spec.steps[stage].gated:
            return gates
        running = frozenset(c.name for c in spec.steps[stage].checks if (rollout.id, stage, c.name) in self._running)
        return replace(gates, running=running, awaiting_since=self._awaiting.get((rollout.id, stage)))

    async def _call(self, rollout: Rollout, spec: RolloutSpec, stage: int, check: GateCheck) -> None:
        body = (check_request_body(rollout.id, rollout.model, rollout.canary, rollout.baseline, spec, stage, check)
                if check.method == "POST" else None)
        try:
            if self.caller is None:
                answer = CheckAnswer(None, error="no HTTP check client in this controller")
            else:
                answer = await self.caller.call(check.method, check.url, body=body, timeout_s=check.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the port never raises; if it does, the check holds like an unreachable one
            log.exception("rollout #%d: check %s failed to run", rollout.id, check.name)
            answer = CheckAnswer(None, error=f"{type(exc).__name__}: {exc}")
        result = judge_answer(check, answer, time.time())
        key = (rollout.id, stage, check.name)
        previous = self._results.get(key)
        self._results[key] = result
        if previous is None or previous.state != result.state:
            log.info("rollout #%d %s: %s", rollout.id, rollout.model, result.reason)
            self._event(rollout, "check", stage, {"reasons": [result.reason], **result.to_json(),
                                                  "url": shown_url(check.url), "expect": check.describe_expect()})
        self.wake({rollout.model})

    def _event(self, rollout: Rollout, kind: str, stage: int, detail: dict) -> None:
        try:
            self.rollouts.event(rollout.id, kind, "controller", detail, stage)
        except Exception as exc:  # the log is not on the rollback path: never stop a look for it
            log.error("rollout #%d: %s not written to the deployment log: %s", rollout.id, kind, exc)

    def forget(self, rollout_id: int) -> None:
        """A rollout ended: cancel its running checks and drop what is known of it."""
        for key in [k for k in self._running if k[0] == rollout_id]:
            self._running[key].cancel()
        for d in (self._results, self._awaiting):
            for key in [k for k in d if k[0] == rollout_id]:
                d.pop(key, None)
