"""The deployment log, read back: ``lockgate history``, ``lockgate show``, ``lockgate annotate``.

Everything here reads the rollout store directly (``<state_dir>/rollouts.db`` on a read-only SQLite
connection, or its PostgreSQL schema when the config has ``database:``), so it works whether or not
the controller runs. The log is append-only: an annotation is one more
``annotation`` event (``detail`` = ``{"root_cause": …, "category": …}``); nothing is rewritten, and
the latest annotation of a rollout wins for display.

The pure parts (:func:`summarize`, :func:`describe`, :func:`causes` and the ``render_*``
formatters) take a :class:`~lockgate.controller.decide.rollouts.Rollout` plus its events and evaluations,
so they are testable on synthetic data.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Sequence

from lockgate.controller.decide.rollouts import Rollout, RolloutStore
# the verdict helpers are re-exported here for callers that still import them from the history module
from lockgate.controller.tell.verdicts import (EXCEEDANCE_SCALE, allowance_state, any_harm_fail, beyond_text,
                                               fmt_line, is_gating, on_exceedance_scale, plain, rollback_line,
                                               scale_suffix, verdict_label, worse_bound)
from lockgate.controller.tell.verdicts import verdict_rows  # noqa: F401  (re-exported for report and diagnose)
from lockgate.database import Where, locate, open_store

CATEGORIES = ("data", "preprocessing", "tokenizer", "hardware", "other")
#: statuses that count as a failed rollout for ``history --causes``
FAILED = ("rolled_back", "aborted", "inconclusive")
#: event kinds that end (or decide) a rollout
OUTCOMES = ("promoted", "rolled_back", "aborted", "inconclusive")
#: event kinds that move the canary weight
MOVES = ("started", "advanced", "promoted", "rolled_back", "aborted")


class LogError(Exception):
    """A user-facing problem reading the deployment log."""


# ---------------------------------------------------------------------------------------- storage
class ReadOnlyRolloutStore(RolloutStore):
    """:class:`RolloutStore` on a read-only connection (the same read methods; writes fail)."""

    def __init__(self, path: Where):  # noqa: D107 - deliberately not calling super().__init__
        try:
            self._db = open_store(path, read_only=True, what="deployment log", timeout_s=10.0)
        except FileNotFoundError:
            raise LogError(f"no deployment log yet ({path} does not exist: no rollout was ever started "
                           f"with this state_dir)") from None
        self.path = path
        self.owner = "read-only"


def open_log(state_dir: Path, database: str | None = None) -> ReadOnlyRolloutStore:
    """The deployment log of ``state_dir`` (``database``: the config's PostgreSQL URL, if any)."""
    return ReadOnlyRolloutStore(locate(state_dir, "rollouts.db", database))


def annotate(state_dir: Path, rollout_id: int, root_cause: str, category: str, actor: str,
             now: float | None = None, database: str | None = None) -> dict:
    """Append an ``annotation`` event (the only write here). Returns the event detail."""
    if category not in CATEGORIES:
        raise LogError(f"--category must be one of {', '.join(CATEGORIES)}, got {category!r}")
    root_cause = root_cause.strip()
    if not root_cause:
        raise LogError("--root-cause must not be empty")
    open_log(state_dir, database).close()  # LogError when there is none yet
    store = RolloutStore(locate(state_dir, "rollouts.db", database))
    try:
        r = store.get(rollout_id)
        if r is None:
            raise LogError(f"no rollout #{rollout_id}")
        previous = latest_annotation(store.events(rollout_id))
        detail = {"root_cause": root_cause, "category": category}
        if previous:
            detail["supersedes_event"] = previous["event_id"]
        store.event(rollout_id, "annotation", actor, detail, now=now)
    finally:
        store.close()
    return detail


# ---------------------------------------------------------------------------------------- helpers
def fmt_ts(ts: float | None) -> str:
    if ts is None:
        return "-"
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.1f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ms"


def _pct(bp: int | None) -> str:
    return "-" if bp is None else f"{bp / 100:g}%"


def spec_steps(r: Rollout) -> list[int] | None:
    """Weights (bp) of the locked spec's stages, or None if the stored spec no longer parses."""
    try:
        from lockgate.controller.decide.spec import spec_from_text

        return [s.weight_bp for s in spec_from_text(r.spec_text, r.spec_source, None).steps]
    except Exception:  # the log must stay readable whatever happened to the spec parser
        return None


def latest_annotation(events: Sequence[dict]) -> dict | None:
    last = None
    for e in events:
        if e["kind"] == "annotation":
            last = {"event_id": e["id"], "ts": e["ts"], "actor": e["actor"],
                    "root_cause": e["detail"].get("root_cause", ""), "category": e["detail"].get("category", "other")}
    return last


def _outcome(events: Sequence[dict]) -> dict | None:
    last = None
    for e in events:
        if e["kind"] in OUTCOMES:
            last = e
    return last


def _rollback_timings(events: Sequence[dict]) -> dict | None:
    for e in reversed(events):
        if e["kind"] in ("rolled_back", "aborted") and "timings" in e["detail"]:
            t = dict(e["detail"]["timings"])
            if t.get("acked_at") is not None and t.get("detected_at") is not None:
                t["detect_to_ack_ms"] = (t["acked_at"] - t["detected_at"]) * 1000.0
            return t
    return None


def _short(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _action_summary(e: dict) -> str:
    d = e["detail"]
    k = e["kind"]
    if k == "annotation":
        return f"[{d.get('category')}] {d.get('root_cause')}"
    if k == "created":
        return f"spec {str(d.get('spec_hash', ''))[:12]}… from {d.get('source')}"
    if k == "drill":
        return (f"preflight drill: {'every Envoy ACKed' if d.get('all_acked') else 'NOT every Envoy ACKed'} "
                f"in {fmt_ms(d.get('elapsed_ms'))}")
    if k == "warnings":
        return "; ".join(d.get("warnings", []))
    if k == "push_incomplete":
        return f"weight {_pct(d.get('wanted_bp'))} not ACKed by {', '.join(d.get('not_acked', []))}"
    parts = []
    if d.get("reasons"):
        parts.append("; ".join(d["reasons"]))
    if "ack_ms" in d:
        parts.append(f"ACKed in {fmt_ms(d['ack_ms'])}")
    if d.get("cohorts"):  # rollout.cohorts this stage sent to the canary
        parts.append("cohorts to the canary: " + ", ".join(d["cohorts"]))
    t = d.get("timings")
    if t:
        if t.get("error"):
            parts.append(f"revert push failed: {t['error']}")
        elif t.get("push_to_ack_ms") is not None:
            parts.append(f"reverted in {fmt_ms(t['push_to_ack_ms'])} (push→every ACK)")
    return "; ".join(parts)


def _reason_summary(outcome: dict | None) -> str:
    """Short decision reason for one history line: the failing *gating* metrics with their values and how far
    they were shown worse against their allowance (what rolled it back), else the first recorded reason.
    Informational metrics never decide, so never show here."""
    if outcome is None:
        return ""
    d = outcome["detail"]
    fails = [v for v in d.get("verdicts") or [] if v.get("verdict") == "fail" and is_gating(v)]
    if fails:
        return "harm: " + "; ".join(f"{v['metric']} canary {plain(v.get('canary'))} vs baseline "
                                    f"{plain(v.get('baseline'))}, {beyond_text(v)}" for v in fails)
    reasons = d.get("reasons") or []
    return _short(reasons[0], 90) if reasons else ""


# ---------------------------------------------------------------------------------------- summaries
def summarize(r: Rollout, events: Sequence[dict], now: float | None = None) -> dict:
    """One rollout as a history row (plain JSON data)."""
    import time

    steps = spec_steps(r)
    moved = [e for e in events if e["kind"] in ("started", "advanced", "promoted") and e["stage"] is not None]
    reached = max((e["stage"] for e in moved), default=None)
    max_bp = max((e["weight_bp"] or 0 for e in moved), default=0)
    outcome = _outcome(events)
    reasons = list(outcome["detail"].get("reasons", [])) if outcome else []
    end = r.ended_at if r.ended_at is not None else (time.time() if now is None else now)
    timings = _rollback_timings(events) if r.status in ("rolled_back", "aborted") else None
    ann = latest_annotation(events)
    n_steps = len(steps) if steps is not None else None
    if reached is None:
        stages = "none"
    elif n_steps is not None and reached >= n_steps:
        stages = f"{n_steps}/{n_steps} → 100%"
    else:
        stages = f"{reached + 1}/{n_steps if n_steps is not None else '?'} ({_pct(max_bp)})"
    return {
        "id": r.id, "model": r.model, "baseline": r.baseline, "canary": r.canary, "status": r.status,
        "stages_reached": stages, "stage": reached, "n_stages": n_steps, "max_weight_bp": max_bp,
        "started_at": r.started_at, "ended_at": r.ended_at, "duration_s": end - r.started_at,
        "created_by": r.created_by, "spec_hash": r.spec_hash,
        "decided_by": outcome["actor"] if outcome else None,
        "reason": "; ".join(reasons), "reason_summary": _reason_summary(outcome), "revert_ms": timings.get("push_to_ack_ms") if timings else None,
        "detect_to_ack_ms": timings.get("detect_to_ack_ms") if timings else None,
        "annotation": ann,
    }


def history(store: RolloutStore, model: str | None = None, limit: int = 100) -> list[dict]:
    return [summarize(r, store.events(r.id)) for r in store.history(model, limit)]


def render_history(rows: Sequence[dict]) -> str:
    if not rows:
        return "no rollouts yet"
    table = [("ID", "MODEL", "CHANGE", "STATUS", "STAGES", "STARTED", "ENDED", "DURATION", "REVERT", "REASON")]
    for s in rows:
        reason = s["reason_summary"] or ("(running)" if s["ended_at"] is None else "-")
        if s["annotation"]:
            reason += f"  [cause: {s['annotation']['category']}]"
        table.append((f"#{s['id']}", s["model"], f"{s['baseline']}→{s['canary']}", s["status"].upper(),
                      s["stages_reached"], fmt_ts(s["started_at"]), fmt_ts(s["ended_at"]),
                      fmt_duration(s["duration_s"]), fmt_ms(s["revert_ms"]) if s["revert_ms"] is not None else "-",
                      reason))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in table)


def describe(r: Rollout, events: Sequence[dict], evaluations: Sequence[dict], now: float | None = None) -> dict:
    """Everything about one rollout (``lockgate show --json``)."""
    summary = summarize(r, events, now)
    steps = spec_steps(r)
    entered: dict[int, float] = {}
    for e in events:
        if e["kind"] in ("started", "advanced") and e["stage"] is not None:
            entered.setdefault(e["stage"], e["ts"])
    per_stage: dict[int, list[dict]] = {}
    for ev in evaluations:
        per_stage.setdefault(ev["stage"], []).append(ev)
    stages = []
    for k in sorted(set(per_stage) | set(entered)):
        evs = per_stage.get(k, [])
        last = evs[-1] if evs else None
        weight = steps[k] if steps is not None and k < len(steps) else (last["weight_bp"] if last else None)
        later = [t for s, t in entered.items() if s > k]
        j = last["judgement"] if last else {}
        stages.append({
            "stage": k, "label": f"stage {k + 1}" + (f"/{len(steps)}" if steps else "") + f" ({_pct(weight)})",
            "weight_bp": weight, "entered_at": entered.get(k), "left_at": min(later) if later else r.ended_at,
            "evaluations": len(evs),
            "last_evaluation": None if last is None else {
                "ts": last["ts"], "decision": last["decision"], "action": j.get("stage_decision", {}).get("action"),
                "reasons": j.get("stage_decision", {}).get("reasons", []), "n_baseline": j.get("n_baseline"),
                "n_canary": j.get("n_canary"), "alpha_statement": j.get("alpha_statement"),
                "verdicts": j.get("verdicts", [])},
        })
    outcome = _outcome(events)
    annotations = [{"event_id": e["id"], "ts": e["ts"], "actor": e["actor"], **e["detail"]}
                   for e in events if e["kind"] == "annotation"]
    return {
        "rollout": {**summary, "spec_source": r.spec_source, "spec_text": r.spec_text, "auto": r.auto,
                    "current_stage": r.stage, "stage_started_at": r.stage_started_at},
        "stages": stages,
        "decision": None if outcome is None else {
            "kind": outcome["kind"], "ts": outcome["ts"], "actor": outcome["actor"], "stage": outcome["stage"],
            "weight_bp": outcome["weight_bp"], "reasons": outcome["detail"].get("reasons", []),
            "verdicts": outcome["detail"].get("verdicts")},
        "rollback": _rollback_timings(events),
        "last_evaluation": r.last_eval,
        "actions": [{"event_id": e["id"], "ts": e["ts"], "kind": e["kind"], "stage": e["stage"],
                     "weight_bp": e["weight_bp"], "actor": e["actor"], "summary": _action_summary(e),
                     "detail": e["detail"]} for e in events],
        "annotation": latest_annotation(events),
        "annotations": annotations,
        "evaluations": len(evaluations),
    }


# ---------------------------------------------------------------------------------------- verdicts
def render_show(d: dict) -> str:
    r = d["rollout"]
    out = [f"rollout #{r['id']} {r['model']}: {r['baseline']} → {r['canary']}: {r['status'].upper()}",
           f"  spec sha256 {r['spec_hash']} ({r['spec_source']}), started by {r['created_by']}",
           f"  started {fmt_ts(r['started_at'])}, ended {fmt_ts(r['ended_at'])}, "
           f"duration {fmt_duration(r['duration_s'])}, stages reached {r['stages_reached']}"]
    dec = d["decision"]
    if dec:
        out.append(f"  decision: {dec['kind']} by {dec['actor']} at {fmt_ts(dec['ts'])}")
        for reason in dec["reasons"]:
            out.append(f"    {reason}")
    rb = d["rollback"]
    if rb:
        if rb.get("error"):
            out.append(f"  revert: FAILED ({rb['error']})")
        else:
            envoys = ", ".join(f"{e['node_id']} {fmt_ms(e.get('ack_ms'))}" + ("" if e.get("acked") else " NOT ACKED")
                               for e in rb.get("envoys", []))
            out.append(f"  revert: detected {fmt_ts(rb.get('detected_at'))}, pushed {fmt_ts(rb.get('pushed_at'))}, "
                       f"every Envoy ACKed {fmt_ts(rb.get('acked_at'))}")
            out.append(f"    push→ACK {fmt_ms(rb.get('push_to_ack_ms'))}, detection→ACK "
                       f"{fmt_ms(rb.get('detect_to_ack_ms'))}; per Envoy: {envoys or '-'}")
    ann = d["annotation"]
    if ann:
        out.append(f"  root cause [{ann['category']}]: {ann['root_cause']} ({ann['actor']}, {fmt_ts(ann['ts'])})")
        if len(d["annotations"]) > 1:
            out.append(f"    ({len(d['annotations']) - 1} earlier annotation(s) kept in the log)")
    for st in d["stages"]:
        le = st["last_evaluation"]
        out.append(f"  {st['label']}: entered {fmt_ts(st['entered_at'])}, {st['evaluations']} evaluation(s)")
        if le:
            out.append(f"    last judgement {fmt_ts(le['ts'])}: {le['decision']} → {le['action'] or '-'}"
                       f" ({'; '.join(le['reasons'])})")
            out.extend("    " + line for line in verdict_rows(le["verdicts"]))
    out.append("  actions:")
    for a in d["actions"]:
        moved = a["kind"] in MOVES or a["kind"] in OUTCOMES
        where = "" if a["stage"] is None or not moved or a["kind"] == "promoted" else f" stage {a['stage'] + 1}"
        weight = "" if a["weight_bp"] is None or not moved else f" {_pct(a['weight_bp'])}"
        text = f"    {fmt_ts(a['ts'])}  {a['kind']}{where}{weight} by {a['actor']}"
        if a["summary"]:
            text += f": {_short(a['summary'], 160)}"
        out.append(text)
    return "\n".join(out)


def causes(rows: Sequence[dict], recent: int = 5) -> dict:
    """Failure causes across rollouts: failed (rolled back / aborted / inconclusive) rollouts plus any
    annotated one (a promoted rollout annotated later is a failure that got through)."""
    failures = [s for s in rows if s["status"] in FAILED or s["annotation"]]
    by_category: dict[str, int] = {}
    by_model: dict[str, dict[str, int]] = {}
    by_status: dict[str, int] = {}
    for s in failures:
        cat = s["annotation"]["category"] if s["annotation"] else "unannotated"
        by_category[cat] = by_category.get(cat, 0) + 1
        m = by_model.setdefault(s["model"], {})
        m[cat] = m.get(cat, 0) + 1
        by_status[s["status"]] = by_status.get(s["status"], 0) + 1
    ordered = sorted(failures, key=lambda s: s["started_at"], reverse=True)
    return {
        "rollouts": len(rows),
        "failures": len(failures),
        "by_status": by_status,
        "annotated": sum(1 for s in failures if s["annotation"]),
        "unannotated": sum(1 for s in failures if not s["annotation"]),
        "by_category": dict(sorted(by_category.items(), key=lambda kv: (-kv[1], kv[0]))),
        "by_model": {m: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for m, c in sorted(by_model.items())},
        "recent": [{"id": s["id"], "model": s["model"], "change": f"{s['baseline']}→{s['canary']}",
                    "status": s["status"], "started_at": s["started_at"],
                    "category": s["annotation"]["category"] if s["annotation"] else "unannotated",
                    "root_cause": s["annotation"]["root_cause"] if s["annotation"] else None,
                    "reason": s["reason"]} for s in ordered[:recent]],
    }


def render_causes(c: dict) -> str:
    if not c["failures"]:
        return f"no failed rollouts ({c['rollouts']} rollout(s) in the log)"
    st = ", ".join(f"{k} {v}" for k, v in sorted(c["by_status"].items()))
    out = [f"{c['failures']} failed rollout(s) of {c['rollouts']} ({st}); "
           f"{c['annotated']} annotated, {c['unannotated']} unannotated",
           "by category:"]
    w = max(len(k) for k in c["by_category"])
    for k, v in c["by_category"].items():
        out.append(f"  {k.ljust(w)}  {v}")
    out.append("by model:")
    for m, cats in c["by_model"].items():
        out.append(f"  {m}: " + ", ".join(f"{k} {v}" for k, v in cats.items()))
    out.append("recent:")
    for e in c["recent"]:
        why = e["root_cause"] or f"(no root cause recorded; decision: {_short(e['reason'] or '-', 70)})"
        out.append(f"  #{e['id']} {e['model']} {e['change']} {e['status']} {fmt_ts(e['started_at'])} "
                   f"[{e['category']}] {why}")
    return "\n".join(out)


def load(store: RolloutStore, rollout_id: int) -> tuple[Rollout, list[dict], list[dict]]:
    r = store.get(rollout_id)
    if r is None:
        raise LogError(f"no rollout #{rollout_id}")
    return r, store.events(rollout_id), store.evaluations(rollout_id)


__all__ = ["CATEGORIES", "FAILED", "LogError", "ReadOnlyRolloutStore", "annotate", "causes", "describe",
           "history", "load", "open_log", "render_causes", "render_history", "render_show", "summarize",
           "verdict_rows", "fmt_ts", "fmt_duration", "EXCEEDANCE_SCALE", "allowance_state", "any_harm_fail",
           "beyond_text", "fmt_line", "on_exceedance_scale", "rollback_line", "scale_suffix", "verdict_label",
           "worse_bound"]

