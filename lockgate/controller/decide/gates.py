"""The approval and external gates of a step, as pure functions (no I/O, no clock).

A step of the spec may say that leaving it — the next stage, or the promotion after the last step —
also needs

* an **approval** (``approval: {required: true}``): someone ran ``lockgate rollout approve MODEL``;
  the deployment log names who (the authenticated client's name when the API requires tokens);
* **external checks** (``checks: [...]``): HTTP endpoints the controller calls (a load test's result,
  an offline evaluation suite, a change window) that must give the expected answer.

Gates only ever *hold*: they are asked once the stage's own conditions (minimum duration and samples,
no harm shown, and for the last step the promotion evidence) are met, and an approval never overrides
a failing metric (harm rolls back whatever the gates say). A check that answers anything else than
what the spec expects, answers too late or cannot be reached holds the rollout with the reason and the
start of its answer.

:func:`judge_answer` turns one HTTP answer (:class:`~lockgate.controller.ports.CheckAnswer`) into a
:class:`CheckResult`; :func:`open_gates` says whether a step's gates are open and, if not, why and which
checks to call now; :func:`gates_json` is what ``rollout status``, the log and the report show. The
calls themselves are made by :mod:`.gatekeeper` through the ``CheckCaller`` port.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Mapping

from lockgate.controller.decide.spec import RolloutSpec
from lockgate.controller.decide.spec.model import GateCheck, Step
from lockgate.controller.ports import CheckAnswer

#: characters of a check's answer kept in reasons, the log and the report
ANSWER_EXCERPT = 200

__all__ = ["ANSWER_EXCERPT", "Approval", "CheckResult", "GateInputs", "GateVerdict", "check_request_body",
           "excerpt", "fmt_utc", "gates_json", "judge_answer", "open_gates", "shown_url"]


def shown_url(url: str) -> str:
    """``url`` as status, the log and the report show it: credentials in it (``user:pass@``) replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def fmt_utc(ts: float) -> str:
    """``2026-12-08T01:02:03Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def excerpt(body: bytes, n: int = ANSWER_EXCERPT) -> str:
    """The start of an answer as one line of text (whitespace collapsed, ``…`` when cut)."""
    text = " ".join(body[: n * 4].decode("utf-8", errors="replace").split())
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass(frozen=True)
class CheckResult:
    """One call of a check: ``state`` ``pass`` | ``fail`` (an answer, not the expected one) | ``timeout``
    | ``unreachable`` (no HTTP answer); ``reason`` one line with the answer's start; ``at`` when it
    came (epoch s)."""

    name: str
    state: str
    reason: str
    at: float
    elapsed_ms: float
    status: int | None = None
    answer: str = ""

    @property
    def passed(self) -> bool:
        return self.state == "pass"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "reason": self.reason, "at": self.at,
                "elapsed_ms": round(self.elapsed_ms, 1), "status": self.status, "answer": self.answer}


@dataclass(frozen=True)
class Approval:
    """An approval of one stage (from the deployment log's ``approved`` event)."""

    actor: str
    at: float
    authenticated: bool


@dataclass(frozen=True)
class GateInputs:
    """What the controller knows of the current stage's gates at a look: its approval (None: none yet),
    the latest result of each check (missing: never called at this stage), the checks being called now,
    and since when the stage has been waiting for its approval (None: not yet)."""

    approval: Approval | None = None
    checks: Mapping[str, CheckResult] = field(default_factory=dict)
    running: frozenset[str] = frozenset()
    awaiting_since: float | None = None


@dataclass(frozen=True)
class GateVerdict:
    """``open``: the step may be left. ``waiting``: why not (one line per gate); ``passed``: what opened
    (for the advance's reasons); ``due``: checks to call now; ``awaiting_approval``: the step's own
    conditions are met and only people (or checks) are missing."""

    open: bool
    waiting: tuple[str, ...] = ()
    passed: tuple[str, ...] = ()
    due: tuple[str, ...] = ()
    awaiting_approval: bool = False


def _field(data: Any, path: str) -> tuple[bool, Any]:
    """The value at a dotted ``path`` of parsed JSON (``checks.0.ok`` indexes lists); (False, None) if absent."""
    cur = data
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False, None
    return True, cur


def _equal(value: Any, want: Any) -> bool:
    """JSON equality without Python's ``True == 1``: a boolean equals only a boolean, a number a number."""
    if isinstance(want, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(want, bool) and value == want
    if isinstance(want, (int, float)):
        return isinstance(value, (int, float)) and float(value) == float(want)
    return isinstance(value, str) and value == want


def judge_answer(check: GateCheck, answer: CheckAnswer, at: float) -> CheckResult:
    """Pass only on the expected answer: one of ``expect_status`` and, with ``expect_field``, that field of
    the JSON body equal to ``expect_equals``. No answer in time is ``timeout``, no HTTP answer at all
    ``unreachable``; both hold like a failing answer."""
    ms = answer.elapsed_ms
    if answer.timed_out:
        return CheckResult(check.name, "timeout", f"check {check.name}: no answer within {check.timeout_s:g} s "
                                                  f"(timeout) from {shown_url(check.url)}", at, ms)
    if answer.status is None:
        return CheckResult(check.name, "unreachable", f"check {check.name}: unreachable: "
                                                      f"{(answer.error or 'no answer')[:ANSWER_EXCERPT]} ({shown_url(check.url)})",
                           at, ms)
    text = excerpt(answer.body)
    shown = f": {text}" if text else " (empty answer)"
    if answer.status not in check.expect_status:
        return CheckResult(check.name, "fail", f"check {check.name}: HTTP {answer.status}, expected "
                                               f"{check.describe_expect()}{shown}", at, ms, answer.status, text)
    if check.expect_field is not None:
        try:
            data = json.loads(answer.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return CheckResult(check.name, "fail", f"check {check.name}: HTTP {answer.status} but the answer is "
                                                   f"not JSON (expected {check.describe_expect()}){shown}",
                               at, ms, answer.status, text)
        found, value = _field(data, check.expect_field)
        if not found:
            return CheckResult(check.name, "fail", f"check {check.name}: no field {check.expect_field} in the "
                                                   f"answer (expected {check.describe_expect()}){shown}",
                               at, ms, answer.status, text)
        if not _equal(value, check.expect_equals):
            return CheckResult(check.name, "fail", f"check {check.name}: {check.expect_field} is "
                                                   f"{json.dumps(value)[:80]}, expected "
                                                   f"{json.dumps(check.expect_equals)}{shown}",
                               at, ms, answer.status, text)
    return CheckResult(check.name, "pass", f"check {check.name} passed: {check.describe_expect()} "
                                           f"in {ms:.0f} ms", at, ms, answer.status, text)


def open_gates(step: Step, label: str, model: str, gates: GateInputs, now: float) -> GateVerdict:
    """Whether the gates of ``step`` (the stage called ``label``) let the rollout leave it at ``now``.

    Approval: an ``approved`` event for this stage. Each check: its latest result is a pass no older
    than its ``interval_s``. A check with no result yet, or whose result is older than ``interval_s``
    (a pass goes stale, a failure is retried), and not being called, is *due*.
    """
    waiting: list[str] = []
    passed: list[str] = []
    due: list[str] = []
    if step.approval:
        if gates.approval is None:
            since = gates.awaiting_since if gates.awaiting_since is not None else now
            waiting.append(f"waiting for approval of {label} since {fmt_utc(since)} "
                           f"(lockgate rollout approve {model})")
        else:
            who = gates.approval.actor + ("" if gates.approval.authenticated else ", unauthenticated")
            passed.append(f"{label} approved by {who} at {fmt_utc(gates.approval.at)}")
    for check in step.checks:
        result = gates.checks.get(check.name)
        fresh = result is not None and now - result.at < check.interval_s
        if result is not None and result.passed and fresh:
            passed.append(result.reason)
            continue
        running = check.name in gates.running
        if not running and not fresh:
            due.append(check.name)
        if result is None:
            waiting.append(f"check {check.name}: {'calling' if running else 'not called yet'} "
                           f"({check.method} {shown_url(check.url)}, expects {check.describe_expect()})")
        elif result.passed:
            waiting.append(f"check {check.name}: passed {now - result.at:.0f} s ago, calling it again "
                           f"(a pass counts for {check.interval_s:g} s)")
        else:
            waiting.append(result.reason + (" (calling again)" if running else
                                            f" (again in {max(0.0, check.interval_s - (now - result.at)):.0f} s)"
                                            if fresh else ""))
    return GateVerdict(open=not waiting, waiting=tuple(waiting), passed=tuple(passed), due=tuple(due),
                       awaiting_approval=step.approval and gates.approval is None)


def gates_json(spec: RolloutSpec, stage: int, gates: GateInputs) -> dict[str, Any] | None:
    """The current stage's gates for ``rollout status``, the log and the report (None: the step has none)."""
    if stage >= len(spec.steps) or not spec.steps[stage].gated:
        return None
    step = spec.steps[stage]
    out: dict[str, Any] = {"stage": stage}
    if step.approval:
        a = gates.approval
        out["approval"] = {"required": True, "approved_by": a.actor if a else None, "approved_at": a.at if a else None,
                           "authenticated": a.authenticated if a else None, "waiting_since": gates.awaiting_since}
    if step.checks:
        checks = []
        for c in step.checks:
            r = gates.checks.get(c.name)
            d = r.to_json() if r is not None else {"name": c.name, "state": "not called", "reason": ""}
            d.update(url=shown_url(c.url), expect=c.describe_expect(), running=c.name in gates.running)
            checks.append(d)
        out["checks"] = checks
    return out


def check_request_body(rollout_id: int, model: str, canary: str, baseline: str, spec: RolloutSpec, stage: int,
                       check: GateCheck) -> bytes:
    """The JSON a ``POST`` check receives: which rollout asks, at which stage and weight."""
    step = spec.steps[stage]
    return json.dumps({"rollout_id": rollout_id, "model": model, "canary": canary, "baseline": baseline,
                       "stage": stage + 1, "stages": len(spec.steps), "weight_percent": step.weight_bp / 100,
                       "check": check.name}).encode()
