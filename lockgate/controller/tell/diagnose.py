"""``lockgate rollout diagnose ID``: why a rollout was judged as it was, down to hosts and requests.

Three views of one rollout:

1. the evidence per metric — the last judgement's verdicts (baseline vs canary, the canary−baseline
   interval, the allowed change as the signed rollback line: a ``fail`` lies beyond it, a ``pass`` within
   it) and, per failing metric, by how much it was shown worse than the baseline against that line;
2. the same traffic broken down **per upstream host and role** — requests, error rate, latency
   p50/p95, mean output tokens, parse errors — computed from the stored observations of the
   rollout's window (a canary replica on a different GPU type, a bad node, shows up here);
3. the canary's first failing requests (5xx, timeouts, streams the model cut, responses the analyzer
   could not parse) with request id, time, status, how the stream ended, host and parse error, to look
   up in logs and traces;
4. when ``capture.retain_bodies`` is on, the canary's first sampled responses of the window — what the
   model actually answered (decoded as UTF-8 with replacement, shortened for the terminal; ``--json``
   has the whole sample, also byte-exact as base64).

A rolled-back canary keeps its observations until the store's retention (``controller.retention_days``)
prunes them; diagnosing an older rollout says so instead of showing empty tables.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lockgate.controller.tell.history import LogError, fmt_ts, load, open_log
from lockgate.controller.tell.verdicts import beyond_text, verdict_rows
from lockgate.controller.ingest.samples import FILENAME, SampleStore, sample_json
from lockgate.controller.ingest.schema import ERROR_COLUMNS, error_column
from lockgate.database import locate

COLUMNS = ("ts", "request_id", "version", "role", "upstream_host", *ERROR_COLUMNS, "latency_ms", "output_tokens",
           "parse_error")
#: observations this long after the rollout ended still belong to it (requests in flight at the revert)
END_SLACK_S = 5.0
#: sampled canary responses shown, and characters of each shown by the text view
SAMPLES_SHOWN = 5
SAMPLE_CHARS = 300


def _col(data: Mapping[str, np.ndarray], name: str, n: int, dtype=float) -> np.ndarray:
    if name in data:
        return np.asarray(data[name])
    return np.full(n, np.nan) if dtype is float else np.full(n, None, dtype=object)


def _error(data: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """The ``error`` column (:func:`~lockgate.controller.ingest.schema.error_column`: 1.0, 0.0, NaN = unknown)."""
    return error_column(_col(data, "status_code", n).astype(float), np.asarray(_col(data, "timeout", n), dtype=float),
                        _col(data, "error_kind", n, object))


def failed_mask(data: Mapping[str, np.ndarray]) -> np.ndarray:
    """A request failed: an error (status >= 500, timed out, or the model cut the stream: the
    ``error_rate`` metric's definition) or its response could not be parsed."""
    n = np.asarray(data.get("ts", np.zeros(0))).shape[0]
    parse = _col(data, "parse_error", n, object)
    return (_error(data, n) == 1.0) | np.array([p is not None and p != "" for p in parse], dtype=bool)


def _q(values: np.ndarray, q: float) -> float | None:
    v = values[np.isfinite(values)]
    return float(np.quantile(v, q)) if v.size else None


def _mean(values: np.ndarray) -> float | None:
    v = values[np.isfinite(values)]
    return float(v.mean()) if v.size else None


def per_host(data: Mapping[str, np.ndarray]) -> list[dict]:
    """Per (role, version, upstream host): requests, errors, error rate, latency p50/p95, mean output tokens.

    ``errors`` counts 5xx, timeouts and streams the model cut (the ``error_rate`` metric's definition,
    ``schema.error_column``), over the requests whose outcome is known; ``parse_errors``
    counts the other responses the analyzer could not parse (a 200 with a broken body).
    Rows are ordered baseline first, then canary, then by version and host."""
    ts = np.asarray(data.get("ts", np.zeros(0)), dtype=float)
    n = ts.size
    role = _col(data, "role", n, object)
    version = _col(data, "version", n, object)
    host = _col(data, "upstream_host", n, object)
    latency = _col(data, "latency_ms", n).astype(float)
    tokens = _col(data, "output_tokens", n).astype(float)
    parse = np.array([p is not None and p != "" for p in _col(data, "parse_error", n, object)], dtype=bool)
    err = _error(data, n)
    known = ~np.isnan(err)
    error = err == 1.0
    keys: dict[tuple[str, str, str], list[int]] = {}
    for i in range(n):
        keys.setdefault((str(role[i] or "-"), str(version[i] or "-"), str(host[i] or "(unknown)")), []).append(i)
    order = {"baseline": 0, "canary": 1}
    out = []
    for (r, v, h), idx_list in sorted(keys.items(), key=lambda kv: (order.get(kv[0][0], 2), kv[0][1], kv[0][2])):
        idx = np.asarray(idx_list, dtype=int)
        n_known = int(known[idx].sum())
        errors = int(error[idx].sum())
        out.append({
            "role": r, "version": v, "host": h, "requests": int(idx.size), "errors": errors,
            "error_rate": errors / n_known if n_known else None,
            "parse_errors": int((parse & ~error)[idx].sum()),
            "latency_p50_ms": _q(latency[idx], 0.5), "latency_p95_ms": _q(latency[idx], 0.95),
            "output_tokens_mean": _mean(tokens[idx]),
            "first_ts": float(ts[idx].min()), "last_ts": float(ts[idx].max()),
        })
    return out


def first_failures(data: Mapping[str, np.ndarray], role: str = "canary", limit: int = 10) -> list[dict]:
    """The earliest failing requests of ``role`` (ordered by time)."""
    ts = np.asarray(data.get("ts", np.zeros(0)), dtype=float)
    n = ts.size
    roles = _col(data, "role", n, object)
    sel = np.nonzero(failed_mask(data) & (roles == role))[0]
    sel = sel[np.argsort(ts[sel], kind="stable")][:limit]
    rid = _col(data, "request_id", n, object)
    host = _col(data, "upstream_host", n, object)
    status = _col(data, "status_code", n).astype(float)
    timeout = np.nan_to_num(np.asarray(_col(data, "timeout", n), dtype=float)) > 0
    parse = _col(data, "parse_error", n, object)
    kind = _col(data, "error_kind", n, object)
    latency = _col(data, "latency_ms", n).astype(float)
    return [{"request_id": rid[i], "ts": float(ts[i]),
             "status": None if math.isnan(status[i]) else int(status[i]), "timeout": bool(timeout[i]),
             "error_kind": kind[i], "host": host[i], "parse_error": parse[i],
             "latency_ms": None if math.isnan(latency[i]) else float(latency[i])} for i in sel]


def canary_samples(state_dir: Path, model: str, canary: str, since: float, until: float,
                   limit: int = SAMPLES_SHOWN, database: str | None = None) -> list[dict] | None:
    """The first ``limit`` retained canary responses of the window (None: no sample store at all)."""
    try:
        store = SampleStore(locate(state_dir, FILENAME, database), read_only=True)
    except FileNotFoundError:
        return None
    try:
        recs = store.window(model, since, until, versions=[canary], role="canary", limit=limit)
    finally:
        store.close()
    return [sample_json(r) for r in recs]


def diagnose(state_dir: Path, rollout_id: int, retention_days: float | None = None, limit: int = 10,
             now: float | None = None, samples: int = SAMPLES_SHOWN, database: str | None = None) -> dict:
    """Everything ``lockgate rollout diagnose`` shows, as JSON data (``database``: the config's
    PostgreSQL URL, if any)."""
    from lockgate.controller.ingest.observations import ObservationStore

    now = time.time() if now is None else now
    store = open_log(state_dir, database)
    try:
        r, events, evaluations = load(store, rollout_id)
    finally:
        store.close()
    until = (r.ended_at + END_SLACK_S) if r.ended_at is not None else now
    last = r.last_eval or {}
    out: dict = {
        "rollout": {"id": r.id, "model": r.model, "baseline": r.baseline, "canary": r.canary, "status": r.status,
                    "stage": r.stage, "started_at": r.started_at, "ended_at": r.ended_at},
        "window": {"since": r.started_at, "until": until},
        "last_evaluation_at": r.last_eval_at,
        "decision": last.get("decision"), "stage_decision": last.get("stage_decision"),
        "verdicts": last.get("verdicts", []),
        "hosts": [], "first_failures": [], "observations": 0, "note": None,
    }
    got = canary_samples(Path(state_dir), r.model, r.canary, r.started_at, until, samples,
                         database) if samples > 0 else []
    out["samples"] = got or []
    out["samples_kept"] = got is not None  # False: no response body was ever retained (retain_bodies off)
    obs_path = locate(state_dir, "observations.db", database)
    try:
        obs = ObservationStore(obs_path, read_only=True)
    except FileNotFoundError:
        out["note"] = f"no observation store at {obs_path}"
        return out
    try:
        data = obs.fetch(r.model, since_ts=r.started_at, until_ts=until, versions=[r.baseline, r.canary],
                         columns=list(COLUMNS))
    finally:
        obs.close()
    out["observations"] = int(np.asarray(data["ts"]).size)
    out["hosts"] = per_host(data)
    out["first_failures"] = first_failures(data, "canary", limit)
    if not out["observations"]:
        if retention_days is not None and until < now - retention_days * 86400:
            out["note"] = (f"the observations of this rollout were pruned (retention {retention_days:g} days); "
                           f"only the recorded verdicts remain")
        else:
            out["note"] = "no observations stored for this rollout's window"
    return out


def _f(x, fmt: str = "{:.4g}") -> str:
    return "-" if x is None else fmt.format(x)


def host_rows(hosts: Sequence[dict]) -> list[str]:
    rows = [("role", "version", "host", "requests", "errors", "error rate", "p50 ms", "p95 ms", "tokens mean",
             "parse errors (non-5xx)")]
    for h in hosts:
        rows.append((h["role"], h["version"], h["host"], str(h["requests"]), str(h["errors"]),
                     _f(h["error_rate"], "{:.2%}"), _f(h["latency_p50_ms"], "{:.1f}"),
                     _f(h["latency_p95_ms"], "{:.1f}"), _f(h["output_tokens_mean"], "{:.1f}"),
                     str(h["parse_errors"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render(d: dict) -> str:
    r = d["rollout"]
    out = [f"rollout #{r['id']} {r['model']}: {r['baseline']} → {r['canary']}: {r['status'].upper()}",
           f"  window {fmt_ts(d['window']['since'])} → {fmt_ts(d['window']['until'])}, "
           f"{d['observations']} observation(s)"]
    sd = d.get("stage_decision") or {}
    out.append(f"evidence per metric (last judgement {fmt_ts(d['last_evaluation_at'])}: {d['decision'] or '-'}"
               f" → {sd.get('action', '-')}):")
    if d["verdicts"]:
        out.extend("  " + line for line in verdict_rows(d["verdicts"]))
        for v in d["verdicts"]:
            if v.get("verdict") == "fail":
                out.append(f"  {v['metric']}: {beyond_text(v)}")
                if v.get("reason"):
                    out.append(f"    {v['reason']}")
    else:
        out.append("  no judgement recorded")
    out.append("per upstream host:")
    if d["hosts"]:
        out.extend("  " + line for line in host_rows(d["hosts"]))
    if d["note"]:
        out.append(f"  {d['note']}")
    out.append("first failing canary requests:")
    if not d["first_failures"]:
        out.append("  none")
    for f in d["first_failures"]:
        status = "timeout" if f["timeout"] else (str(f["status"]) if f["status"] is not None else "-")
        out.append(f"  {fmt_ts(f['ts'])}  {f['request_id']}  status {status}  host {f['host'] or '-'}"
                   + (f"  stream {f['error_kind']}" if f.get("error_kind") else "")
                   + (f"  parse_error {f['parse_error']}" if f["parse_error"] else ""))
    out.append("sampled canary responses:")
    if not d.get("samples"):
        out.append("  none in this window" if d.get("samples_kept") else
                   "  none (capture.retain_bodies is off: no response body is kept)")
    for smp in d.get("samples") or []:
        size = f"{smp['bytes']} B" + (" (cut at max_bytes)" if smp["truncated"] else "")
        out.append(f"  {fmt_ts(smp['ts'])}  {smp['request_id']}  status {smp['status'] or '-'}  "
                   f"host {smp['host'] or '-'}  {smp['content_type'] or '-'}  {size}")
        out.append(f"    {display_text(smp['text'])}")
    return "\n".join(out)


def display_text(text: str, limit: int = SAMPLE_CHARS) -> str:
    """One terminal-safe line: control characters (newlines, escape sequences) escaped, cut at ``limit``."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return shown + (f"… (+{len(text) - limit} chars)" if len(text) > limit else "")


__all__ = ["COLUMNS", "LogError", "canary_samples", "diagnose", "display_text", "failed_mask", "first_failures", "host_rows", "per_host", "render"]
