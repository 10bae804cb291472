"""Observations as JSON Lines: ``lockgate observations export`` writes them, :func:`read_jsonl` reads them.

The format is documented in ``docs/observations.md``. In short, one JSON object per line:

* an observation (no ``kind``, or ``"kind": "observation"``): ``ts``, ``request_id`` (lockgate's,
  minted by Envoy), ``client_request_id`` (the request's ``x-request-id``), ``model``,
  ``version``, ``role``, ``weight`` (canary share 0–1), ``stage``, ``status_code``, ``timeout``,
  ``latency_ms``, ``ttfb_ms``, ``output_tokens``, ``refusal``, ``predicted_class``, ``confidence``,
  ``entropy``, ``error_kind`` (a stream cut mid-way: ``upstream_reset``/``upstream_timeout``/``client_reset``),
  ``user_key``, ``upstream_host``, … and its labels inline (``true_class`` +
  ``label_arrival_ts``, ``thumbs`` + ``thumbs_arrival_ts``, ``task_success`` +
  ``task_success_arrival_ts``, ``evaluator_score`` + ``evaluator_score_arrival_ts``);
* a label (``"kind": "label"``): ``request_id``, ``ts`` (arrival time) and one or more of
  ``true_class``, ``thumbs``, ``task_success``, ``evaluator_score``.

An observation whose request was sampled for evaluation (``docs/evaluation.md``) also carries
``evaluator``, ``similarity`` and, unless feedback set one, ``evaluator_score`` (+ its arrival time).

A field that is absent or ``null`` was not measured (never 0).
"""

from __future__ import annotations

import json
import math
import sqlite3
from datetime import datetime, timezone
from typing import IO, Any, Iterable, Iterator

import numpy as np

from lockgate.controller.ingest.observations import ObservationStore
from lockgate.controller.ingest.schema import (
    FETCH_COLUMNS, JSONL_FIELD_TYPES, LABEL_ARRIVAL_COLUMN, LABEL_KINDS, add_label_aliases, columns_to_arrays,
)
from lockgate.routing import TOTAL_WEIGHT_BP

#: store column → JSONL field (in output order); label fields follow.
_FIELDS = (
    ("ts", "ts"), ("request_id", "request_id"), ("client_request_id", "client_request_id"), ("model", "model"),
    ("version", "version"), ("role", "role"),
    ("weight_bp", "weight"), ("stage", "stage"), ("route", "route"), ("status_code", "status_code"),
    ("timeout", "timeout"), ("duration_ms", "latency_ms"), ("ttfb_ms", "ttfb_ms"),
    ("request_bytes", "request_bytes"), ("response_bytes", "response_bytes"),
    ("output_tokens", "output_tokens"), ("output_tokens_estimated", "output_tokens_estimated"),
    ("output_chars", "output_chars"), ("finish_reason", "finish_reason"), ("refusal", "refusal"),
    ("entropy", "entropy"), ("predicted_class", "predicted_class"), ("confidence", "confidence"),
    ("class_entropy", "class_entropy"), ("events", "events"), ("analyzer", "analyzer"),
    ("truncated", "truncated"), ("parse_error", "parse_error"), ("error_kind", "error_kind"),
    ("user_key", "user_key"),
    ("upstream_host", "upstream_host"), ("replay", "replay"),
)
#: booleans written only when true (false is the default when absent)
_ONLY_IF_TRUE = {"output_tokens_estimated", "truncated", "replay"}


def record_to_json(rec: dict[str, Any]) -> dict[str, Any]:
    """A stored row (:meth:`ObservationStore.iter_records`) → one export object (None fields omitted)."""
    out: dict[str, Any] = {}
    for col, name in _FIELDS:
        v = rec.get(col)
        if v is None:
            continue
        if col == "weight_bp":
            v = v / TOTAL_WEIGHT_BP
        elif isinstance(v, float) and not math.isfinite(v):
            continue
        if name in _ONLY_IF_TRUE and not v:
            continue
        out[name] = v
    for kind in LABEL_KINDS:
        ts_col = LABEL_ARRIVAL_COLUMN[kind]
        if rec.get(ts_col) is not None and rec.get(kind) is not None:
            out[kind] = rec[kind]
            out[ts_col] = rec[ts_col]
    return out


def parse_time(text: str) -> float:
    """``"1718000000"`` / ``"1718000000.5"`` (epoch seconds) or ISO 8601 (``2024-06-10T06:13:20Z``;
    without a UTC offset it is taken as UTC) → epoch seconds. Raises ValueError."""
    t = text.strip()
    try:
        v = float(t)
    except ValueError:
        pass
    else:
        if not math.isfinite(v):
            raise ValueError(f"not a finite time: {text!r}")
        return v
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"not an epoch timestamp or ISO 8601 time: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def add_evaluation(obj: dict[str, Any], ev: dict[str, Any] | None) -> dict[str, Any]:
    """Attach an evaluation (docs/evaluation.md) of the observation's request id and version:
    ``evaluator``, ``similarity`` and — unless feedback already set it — ``evaluator_score`` with
    ``evaluator_score_arrival_ts`` = the evaluation time."""
    if ev is None:
        return obj
    obj["evaluator"] = ev["evaluator"]
    if ev.get("score") is not None and obj.get("evaluator_score") is None:
        obj["evaluator_score"] = ev["score"]
        obj[LABEL_ARRIVAL_COLUMN["evaluator_score"]] = ev["ts"]
    if ev.get("similarity") is not None:
        obj["similarity"] = ev["similarity"]
    return obj


def _evaluations_beside(store: ObservationStore) -> Any:
    """The evaluation store in the observation store's state directory, or None."""
    from lockgate.controller.evaluate.evaluation import EvaluationStore

    try:
        return EvaluationStore(store.path.parent / "evaluation.db", read_only=True)
    except (FileNotFoundError, sqlite3.Error):
        return None


def export_jsonl(store: ObservationStore, out: IO[str], model: str | None = None, since_ts: float | None = None,
                 until_ts: float | None = None, versions: list[str] | None = None,
                 include_replay: bool = True, evaluations: Any = "auto") -> int:
    """Write observations (ordered by ts) as JSON lines; returns the number of lines. Observations
    (not replays) with an evaluation of their request id and version carry it (:func:`add_evaluation`);
    ``evaluations``: an ``EvaluationStore``, None, or "auto" (the one beside ``store``, if any)."""
    ev_store = _evaluations_beside(store) if evaluations == "auto" else evaluations
    n = 0
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        found = ev_store.lookup([r["request_id"] for r in batch if not r.get("replay")]) if ev_store else {}
        for rec in batch:
            obj = record_to_json(rec)
            if not rec.get("replay"):
                add_evaluation(obj, found.get((rec["request_id"], rec["version"])))
            out.write(json.dumps(obj, separators=(",", ":"), allow_nan=False))
            out.write("\n")
        batch.clear()

    try:
        for rec in store.iter_records(model, since_ts, until_ts, versions, include_replay=include_replay):
            batch.append(rec)
            n += 1
            if len(batch) >= 500:
                flush()
        flush()
    finally:
        if evaluations == "auto" and ev_store is not None:
            ev_store.close()
    return n


# ----- reading -----
#: field -> what its value must be (fields not listed are not checked)
_KIND = JSONL_FIELD_TYPES
#: value types that pass each check without a closer look
_FAST_OK = {"number": (int, float), "bool": (bool,), "string": (str,)}


def _check(obj: dict[str, Any], lineno: int) -> None:
    for k, v in obj.items():
        kind = _KIND.get(k)
        if kind is None or v is None or type(v) in _FAST_OK.get(kind, ()):
            continue
        where = f"line {lineno}: {k}"
        if kind == "number" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{where}: must be a number, got {v!r}")
        if kind == "bool" and not isinstance(v, bool):
            raise ValueError(f"{where}: must be true or false, got {v!r}")
        if kind == "string" and not isinstance(v, str):
            if k == "true_class" and isinstance(v, int):
                continue
            raise ValueError(f"{where}: must be a string, got {v!r}")
        if kind == "thumbs" and v not in ("up", "down"):
            raise ValueError(f"{where}: must be \"up\" or \"down\", got {v!r}")


def iter_jsonl(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line. Raises ValueError naming the line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"line {lineno}: invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"line {lineno}: must be a JSON object")
        _check(obj, lineno)
        yield lineno, obj


def read_jsonl(lines: Iterable[str], model: str | None = None, *, include_replay: bool = False,
               since_ts: float | None = None, until_ts: float | None = None) -> dict[str, np.ndarray]:
    """Read an export (observation lines, and label lines in any order) into the same columns as
    :meth:`ObservationStore.fetch`: labels joined by request id, the latest arrival per kind winning."""
    obs: list[dict[str, Any]] = []
    labels: dict[str, dict[str, tuple[float, Any]]] = {}

    def add_label(rid: str, kind: str, value: Any, ts: float) -> None:
        cur = labels.setdefault(rid, {}).get(kind)
        if cur is None or ts >= cur[0]:
            labels[rid][kind] = (ts, value)

    for lineno, o in iter_jsonl(lines):
        kind = o.get("kind", "observation")
        rid = o.get("request_id")
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"line {lineno}: request_id is required")
        if kind == "label":
            ts = o.get("ts")
            if ts is None or not math.isfinite(ts):
                raise ValueError(f"line {lineno}: a label line needs ts (its arrival time)")
            found = False
            for k in LABEL_KINDS:
                if o.get(k) is not None:
                    add_label(rid, k, o[k], float(ts))
                    found = True
            if not found:
                raise ValueError(f"line {lineno}: a label line needs one of {', '.join(LABEL_KINDS)}")
            continue
        if kind != "observation":
            raise ValueError(f"line {lineno}: unknown kind {kind!r} (observation or label)")
        if o.get("ts") is None or not isinstance(o.get("model"), str):
            raise ValueError(f"line {lineno}: an observation needs ts and model")
        for k in LABEL_KINDS:
            ts_col = LABEL_ARRIVAL_COLUMN[k]
            if o.get(k) is not None and o.get(ts_col) is not None:
                add_label(rid, k, o[k], float(o[ts_col]))
        if model is not None and o["model"] != model:
            continue
        if not include_replay and o.get("replay"):
            continue
        if since_ts is not None and o["ts"] < since_ts:
            continue
        if until_ts is not None and o["ts"] >= until_ts:
            continue
        obs.append(o)
    obs.sort(key=lambda o: o["ts"])  # stable: file order among equal timestamps
    # Column by column (one pass per column, no per-cell dispatch; a field no line has is all None
    # without a pass): 1M lines in a few seconds.
    n = len(obs)
    present: set[str] = set().union(*(o.keys() for o in obs)) if obs else set()
    no_label: dict = {}
    labs = [labels.get(o["request_id"], no_label) for o in obs]
    ts_kind = {t: k for k, t in LABEL_ARRIVAL_COLUMN.items()}
    columns: list[list] = []
    for c in FETCH_COLUMNS:
        if c == "is_canary":
            columns.append([o.get("role") == "canary" for o in obs])
        elif c in LABEL_KINDS:
            vals = [lab[c][1] if c in lab else None for lab in labs]
            if c == "thumbs":
                vals = [None if v is None else (1.0 if v == "up" else 0.0) for v in vals]
            columns.append(vals)
        elif c in ts_kind:
            k = ts_kind[c]
            columns.append([lab[k][0] if k in lab else None for lab in labs])
        elif c not in present:
            columns.append([None] * n)
        else:
            columns.append([o.get(c) for o in obs])
    return add_label_aliases(columns_to_arrays(columns, FETCH_COLUMNS, n))


__all__ = ["export_jsonl", "iter_jsonl", "parse_time", "read_jsonl", "record_to_json"]
