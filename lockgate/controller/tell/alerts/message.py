"""What an alert says: the :class:`Alert` model and its text.

* :class:`Alert` — one notification (kind, severity, model/canary, a one-line ``title`` and explanatory
  ``lines`` with the numbers: which gating metric, canary vs baseline, the interval, the allowed change
  (the rollback line: a rollback says by how much the canary was shown worse than the baseline against it),
  and for rollbacks detected → pushed → all Envoys ACKed in N ms). Built from a promoter outcome event by
  :func:`alert_from_event`, or for component trouble by :func:`trouble_alert`.
* the lines of text: per metric :func:`describe_verdict` / :func:`describe_beyond` (from
  :mod:`lockgate.controller.tell.verdicts`, the one verdict renderer), rollback timings :func:`describe_timings`.

Pure: no I/O. How an alert looks for each sink is in :mod:`.webhook`, :mod:`.slack`, :mod:`.alertmanager`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from lockgate.controller.tell.verdicts import describe_beyond, describe_verdict, is_gating, ordered, rollback_line

SEVERITY = {"rolled_back": "critical", "aborted": "warning", "inconclusive": "warning", "promoted": "info",
            "advanced": "info", "started": "info", "awaiting_approval": "warning",
            "capacity_hold": "warning"}


@dataclass
class Alert:
    """One notification; ``ts`` in seconds since the epoch; ``metrics`` one summary per verdict (gating first,
    failing first); ``timings`` the rollback's detected/pushed/ACKed record (``rolled_back`` / ``aborted``)."""

    kind: str                       #: rolled_back | aborted | inconclusive | promoted | advanced | trouble
    severity: str                   #: critical | warning | info
    title: str
    lines: list[str] = field(default_factory=list)
    model: str = "*"
    canary: str = "*"
    baseline: str | None = None
    rollout_id: int | None = None
    status: str = "firing"          #: firing | resolved
    component: str | None = None    #: trouble only: control_api, push, rollback_push, drill, observations, envoy
    key: str = ""                   #: identity (Alertmanager labels; resolution of a firing condition)
    ts: float = field(default_factory=time.time)
    weight_bp: int | None = None
    reasons: list[str] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    timings: dict | None = None

    @property
    def text(self) -> str:
        return "\n".join([self.title, *self.lines])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Alert":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def describe_timings(t: dict | None) -> str | None:
    """``Rollback: detected → pushed 3 ms → all 2 Envoys ACKed 11 ms later (detected → all ACKed 14 ms)``."""
    if not t:
        return None
    if t.get("error"):
        return f"Rollback push FAILED: {t['error']} — weights may still send traffic to the canary"
    detected, pushed = t.get("detected_at"), t.get("pushed_at")
    envoys = t.get("envoys") or []
    push_ms = (pushed - detected) * 1000 if detected and pushed else None
    ack_ms = t.get("push_to_ack_ms")
    n = len(envoys)
    parts = ["Rollback: detected"]
    if push_ms is not None:
        parts.append(f"pushed {max(push_ms, 0):.0f} ms later")
    if t.get("all_acked"):
        parts.append(f"all {n} Envoy{'s' if n != 1 else ''} ACKed {ack_ms:.0f} ms after the push"
                     if ack_ms is not None else f"all {n} Envoys ACKed")
        total = (push_ms or 0) + (ack_ms or 0)
        return " → ".join(parts) + f" (detected → all ACKed: {total:.0f} ms)"
    missing = ", ".join(t.get("not_acked") or []) or "some Envoys"
    parts.append(f"NOT ACKed by {missing} after {ack_ms:.0f} ms" if ack_ms is not None else f"NOT ACKed by {missing}")
    return " → ".join(parts)


def _dur(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def alert_from_event(event: dict, weight_bp: int | None = None) -> Alert:
    """The alert for a promoter outcome event (``{"kind", "rollout", "detail", "ts"}``).
    ``weight_bp``: the canary weight in force when it happened (for the message)."""
    kind = event.get("kind", "?")
    r = event.get("rollout") or {}
    d = event.get("detail") or {}
    model, canary, baseline, rid = r.get("model", "?"), r.get("canary", "?"), r.get("baseline"), r.get("id")
    ts = float(event.get("ts") or time.time())
    share = f" at {weight_bp / 100:g}% of traffic" if weight_bp is not None else ""
    ran = _dur((r.get("ended_at") or ts) - r["started_at"]) if r.get("started_at") else "?"
    reasons = [str(x) for x in d.get("reasons") or []]
    verdicts = ordered(d.get("verdicts"))
    timings = d.get("timings")
    lines: list[str] = []
    if kind == "rolled_back":
        title = f"{model}: canary {canary} ROLLED BACK to {baseline}{share} (rollout #{rid}, after {ran})"
        failing = [v for v in verdicts if is_gating(v) and v.get("verdict") == "fail"]
        if failing:
            lines.append("Why: gating metric" + ("s " if len(failing) > 1 else " ")
                         + ", ".join(v["metric"] for v in failing) + " shown worse than baseline beyond the allowance")
            lines.extend(describe_beyond(v) for v in failing)
    elif kind == "aborted":
        title = f"{model}: rollout #{rid} of {canary} aborted{share}; traffic back on {baseline}"
    elif kind == "inconclusive":
        title = (f"{model}: canary {canary} INCONCLUSIVE after {ran} (rollout #{rid}); weight held"
                 f"{share}, not promoted")
    elif kind == "promoted":
        manual = any("manual promotion" in x for x in reasons)
        title = (f"{model}: canary {canary} promoted to 100% (rollout #{rid}, after {ran}"
                 + (", MANUAL — not by evidence)" if manual else ")"))
        if d.get("ack_ms") is not None:
            lines.append(f"Promotion push ACKed by every Envoy in {float(d['ack_ms']):.0f} ms")
    elif kind == "awaiting_approval":
        title = (f"{model}: rollout #{rid} of {canary} waits for an approval{share}: "
                 f"lockgate rollout approve {model}")
    elif kind == "capacity_hold":
        title = (f"{model}: rollout #{rid} of {canary} HELD{share}: its hosts cannot take the next step "
                 f"(capacity); lower traffic, more canary hosts or a person")
    elif kind == "host_ejected":
        title = (f"{model}: host {d.get('host', '?')} of canary {canary} EJECTED (rollout #{rid}): errors "
                 f"{d.get('host_errors') or 0:.0f}/{d.get('host_requests', 0)} vs its peers' "
                 f"{d.get('peers_errors') or 0:.0f}/{d.get('peers_requests', 0)}; the version is judged without it")
    elif kind == "advanced":
        title = (f"{model}: canary {canary} advanced" + (f" to {weight_bp / 100:g}%" if weight_bp is not None else "")
                 + f" (rollout #{rid})")
    else:
        title = f"{model}: rollout #{rid} {kind}"
    for x in reasons:
        lines.append(f"Reason: {x}")
    t_line = describe_timings(timings) if kind in ("rolled_back", "aborted") else None
    if t_line:
        lines.append(t_line)
    lines.extend(describe_verdict(v) for v in verdicts)
    if d.get("alpha_statement"):
        lines.append(str(d["alpha_statement"]))
    return Alert(kind=kind, severity=SEVERITY.get(kind, "info"), title=title, lines=lines, model=model,
                 canary=canary, baseline=baseline, rollout_id=rid, key=f"{kind}:{model}:{canary}:{rid}", ts=ts,
                 weight_bp=weight_bp, reasons=reasons, metrics=[_metric_summary(v) for v in verdicts],
                 timings=timings)


def _metric_summary(v: dict) -> dict:
    keys = ("metric", "kind", "verdict", "gating", "baseline", "canary", "difference", "interval", "allowed",
            "allowed_mode", "harmful", "n_baseline", "n_canary", "n_needed", "alpha", "unit")
    out = {k: v.get(k) for k in keys if k in v}
    # the signed line the verdict was judged against (fail = interval beyond it), and the interval's scale
    out["rollback_line"] = rollback_line(v)
    scale = (v.get("details") or {}).get("interval_scale")
    if scale:
        out["interval_scale"] = scale
    return out


def trouble_alert(component: str, title: str, lines: list[str] | None = None, *, severity: str = "warning",
                  model: str = "*", canary: str = "*", rollout_id: int | None = None, resolved: bool = False,
                  key: str | None = None, ts: float | None = None) -> Alert:
    return Alert(kind="trouble", severity=severity, title=title, lines=list(lines or []), model=model,
                 canary=canary, rollout_id=rollout_id, status="resolved" if resolved else "firing",
                 component=component, key=key or f"trouble:{component}:{model}", ts=ts or time.time())


def rollback_push_trouble(alert: Alert) -> Alert | None:
    """A rollback (or abort) whose weight push failed or was not ACKed by every Envoy: component trouble."""
    t = alert.timings or {}
    if alert.kind not in ("rolled_back", "aborted") or (t.get("all_acked") and not t.get("error")):
        return None
    if not t:
        return None
    what = t.get("error") or f"not ACKed by {', '.join(t.get('not_acked') or []) or 'some Envoys'}"
    return trouble_alert("rollback_push", f"{alert.model}: rollback of {alert.canary} (rollout #{alert.rollout_id}) "
                         f"not confirmed by every Envoy: {what}",
                         [describe_timings(t) or "", "Check the xDS server and `lockgate status`; the controller "
                          "does not re-push a finished rollback — run `lockgate rollback " f"{alert.model}` once "
                          "the Envoys are back."], severity="critical", model=alert.model, canary=alert.canary,
                         rollout_id=alert.rollout_id, key=f"trouble:rollback_push:{alert.model}:{alert.rollout_id}",
                         ts=alert.ts)


__all__ = ["SEVERITY", "Alert", "alert_from_event", "describe_beyond", "describe_timings", "describe_verdict",
           "rollback_push_trouble", "trouble_alert"]
