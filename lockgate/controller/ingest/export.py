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
from lockgate.database import sibling
from lockgate.controller.ingest.schema import (
    BOOL_COLUMNS, FETCH_COLUMNS, FLOAT_COLUMNS, JSONL_FIELD_TYPES, LABEL_ARRIVAL_COLUMN, LABEL_KINDS, add_label_aliases,
    columns_to_arrays,
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
        return EvaluationStore(sibling(store.path, "evaluation.db"), read_only=True)
    except (FileNotFoundError, sqlite3.Error):
        return None


def iter_export_objects(store: ObservationStore, model: str | None = None, since_ts: float | None = None,
                        until_ts: float | None = None, versions: list[str] | None = None,
                        include_replay: bool = True, evaluations: Any = "auto") -> Iterator[dict[str, Any]]:
    """The export's objects (:func:`record_to_json`), ordered by ts. Observations (not replays) with an
    evaluation of their request id and version carry it (:func:`add_evaluation`); ``evaluations``: an
    ``EvaluationStore``, None, or "auto" (the one beside ``store``, if any)."""
    ev_store = _evaluations_beside(store) if evaluations == "auto" else evaluations
    batch: list[dict[str, Any]] = []

    def flush() -> Iterator[dict[str, Any]]:
        found = ev_store.lookup([r["request_id"] for r in batch if not r.get("replay")]) if ev_store else {}
        for rec in batch:
            obj = record_to_json(rec)
            if not rec.get("replay"):
                add_evaluation(obj, found.get((rec["request_id"], rec["version"])))
            yield obj
        batch.clear()

    try:
        for rec in store.iter_records(model, since_ts, until_ts, versions, include_replay=include_replay):
            batch.append(rec)
            if len(batch) >= 500:
                yield from flush()
        yield from flush()
    finally:
        if evaluations == "auto" and ev_store is not None:
            ev_store.close()


def export_jsonl(store: ObservationStore, out: IO[str], model: str | None = None, since_ts: float | None = None,
                 until_ts: float | None = None, versions: list[str] | None = None,
                 include_replay: bool = True, evaluations: Any = "auto") -> int:
    """Write observations (ordered by ts) as JSON lines (:func:`iter_export_objects`); returns the
    number of lines."""
    n = 0
    for obj in iter_export_objects(store, model, since_ts, until_ts, versions, include_replay, evaluations):
        out.write(json.dumps(obj, separators=(",", ":"), allow_nan=False))
        out.write("\n")
        n += 1
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
    :meth:`ObservationStore.fetch`: labels joined by request id, the latest arrival per kind winning.
    Rows: the observations of ``model`` (all if None; replays only with ``include_replay``) with
    ``since_ts <= ts < until_ts``, ordered by ``ts`` (stable: file order among equal timestamps)."""
    return select_rows(jsonl_columns(lines), model, include_replay=include_replay, since_ts=since_ts,
                       until_ts=until_ts)


def jsonl_columns(lines: Iterable[str]) -> dict[str, np.ndarray]:
    """Every observation line as columns (:data:`FETCH_COLUMNS` and the label aliases), labels joined,
    rows ordered by ``ts`` (stable); :func:`select_rows` then picks rows. Raises ValueError naming the
    first offending line.

    Field by field, not line by line: each field is gathered from all lines in one pass and its types
    checked as a set (1M lines: ~5 s, most of it ``json.loads``). Anything unusual — a type error, a
    missing field, a non-finite label time — goes to the line-by-line reader (:func:`_columns_by_line`),
    which reads it the same way and names the first offending line."""
    texts = lines if isinstance(lines, list) else list(lines)
    try:
        objs = [_loads(t) for t in texts if t.strip()]
        return _columns_by_field(objs)
    except (ValueError, _Unusual):  # json.JSONDecodeError is a ValueError
        return _columns_by_line(iter_jsonl(texts))


def objects_to_columns(objs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Export objects (:func:`record_to_json`, label objects with ``"kind": "label"``) as
    :func:`jsonl_columns` reads them from their JSON lines."""
    try:
        return _columns_by_field(objs)
    except _Unusual:
        return _columns_by_line(enumerate(objs, 1))


def select_rows(cols: dict[str, np.ndarray], model: str | None = None, *, include_replay: bool = False,
                since_ts: float | None = None, until_ts: float | None = None) -> dict[str, np.ndarray]:
    """The rows of ``model`` (all if None), replays only with ``include_replay``, ``since_ts <= ts <
    until_ts``, in their order (the label aliases stay the same arrays as their columns)."""
    ts = cols["ts"]
    keep = np.ones(ts.size, dtype=bool)
    if model is not None:
        keep &= cols["model"] == model
    if not include_replay:
        keep &= ~cols["replay"]
    if since_ts is not None:  # (written as what is left out: a NaN time is kept, as it always was)
        keep &= ~(ts < since_ts)
    if until_ts is not None:
        keep &= ~(ts >= until_ts)
    if keep.all():
        return dict(cols)
    rows = np.flatnonzero(keep)
    return add_label_aliases({c: cols[c][rows] for c in FETCH_COLUMNS})


class _Unusual(Exception):
    """Raised by the field-by-field reader for input it leaves to the line-by-line one."""


_loads = json.loads
_NONE = type(None)
#: value types each check lets through (None: not measured); as :func:`_check`
_TYPES_OK = {"number": {int, float, _NONE}, "bool": {bool, _NONE}, "string": {str, _NONE}, "thumbs": {str, _NONE}}
_TS_KIND = {t: k for k, t in LABEL_ARRIVAL_COLUMN.items()}


def _columns_by_field(objs: list[Any]) -> dict[str, np.ndarray]:
    """:func:`_columns_by_line` for the usual input, field by field; raises _Unusual for anything else."""
    if objs and set(map(type, objs)) != {dict}:
        raise _Unusual
    kinds = [o.get("kind", "observation") for o in objs]
    if objs and set(map(type, kinds)) != {str} or not set(kinds) <= {"observation", "label"}:
        raise _Unusual
    kind_set = set(kinds)
    if "label" in kind_set:
        obs_pos = [i for i, k in enumerate(kinds) if k != "label"]
        label_pos = [i for i, k in enumerate(kinds) if k == "label"]
        obs = [objs[i] for i in obs_pos]
    else:
        obs_pos, label_pos, obs = None, [], objs
    all_keys: set[str] = set().union(*objs)
    obs_keys = all_keys if obs is objs else set().union(*obs)
    cache: dict[str, list] = {}

    def field(name: str) -> list:  # the field's value on every observation line (None where absent)
        if name not in cache:
            cache[name] = [o.get(name) for o in obs] if name in obs_keys else [None] * len(obs)
        return cache[name]

    # every line's fields have the types _check requires
    for k in all_keys & _KIND.keys():
        vals = field(k) if obs is objs else [o.get(k) for o in objs]
        types = set(map(type, vals))
        if not types <= _TYPES_OK[_KIND[k]] and not (k == "true_class" and types <= {str, int, _NONE}):
            raise _Unusual
        if _KIND[k] == "thumbs" and not set(vals) <= {"up", "down", None}:
            raise _Unusual
    n = len(obs)
    rids = field("request_id")
    if n and (set(map(type, rids)) != {str} or not all(rids) or set(map(type, field("ts"))) - {int, float}
              or set(map(type, field("model"))) != {str}):
        raise _Unusual
    # label candidates: inline (value and arrival time both set) and label lines; per request id and kind
    # the latest arrival wins, the later line among equal arrivals (as _columns_by_line's add_label)
    cands: dict[str, tuple[list, list, list, list]] = {k: ([], [], [], []) for k in LABEL_KINDS}
    for k in LABEL_KINDS:
        ts_col = LABEL_ARRIVAL_COLUMN[k]
        if k in obs_keys and ts_col in obs_keys:
            c_rid, c_ts, c_val, c_pos = cands[k]
            for i, (r, v, t) in enumerate(zip(rids, field(k), field(ts_col))):
                if v is not None and t is not None:
                    c_rid.append(r), c_ts.append(float(t)), c_val.append(v), c_pos.append(obs_pos[i] if obs_pos else i)
    for i in label_pos:
        o = objs[i]
        rid, ts = o.get("request_id"), o.get("ts")
        if not isinstance(rid, str) or not rid or ts is None or not math.isfinite(ts):
            raise _Unusual
        found = False
        for k in LABEL_KINDS:
            if o.get(k) is not None:
                c_rid, c_ts, c_val, c_pos = cands[k]
                c_rid.append(rid), c_ts.append(float(ts)), c_val.append(o[k]), c_pos.append(i)
                found = True
        if not found:
            raise _Unusual
    columns: dict[str, np.ndarray] = {}
    for k, (c_rid, c_ts, c_val, c_pos) in cands.items():
        ts_col = LABEL_ARRIVAL_COLUMN[k]
        if not c_rid:
            columns[k] = np.full(n, None, dtype=object) if k == "true_class" else np.full(n, math.nan)
            columns[ts_col] = np.full(n, math.nan)
            continue
        arrival = np.array(c_ts, dtype=float)
        if not np.isfinite(arrival).all():
            raise _Unusual
        order = np.lexsort((np.array(c_pos), arrival))
        winner = dict(zip([c_rid[j] for j in order], order.tolist()))  # later (arrival, line) overwrites
        j = np.fromiter((winner.get(r, -1) for r in rids), dtype=np.intp, count=n)
        has = j >= 0
        columns[ts_col] = np.where(has, arrival[np.maximum(j, 0)], math.nan)
        if k == "true_class":
            vals = np.empty(len(c_val), dtype=object)
            vals[:] = [v if type(v) is str else str(v) for v in c_val]
            col = np.full(n, None, dtype=object)
        else:
            vals = np.array([(1.0 if v == "up" else 0.0) for v in c_val] if k == "thumbs" else c_val, dtype=float)
            col = np.full(n, math.nan)
        col[has] = vals[j[has]]
        columns[k] = col
    for c in FETCH_COLUMNS:
        if c in columns:
            continue
        if c == "is_canary":
            columns[c] = np.array([r == "canary" for r in field("role")], dtype=bool)
        elif c not in obs_keys:
            columns[c] = (np.zeros(n, dtype=bool) if c in BOOL_COLUMNS else np.full(n, math.nan)
                          if c in FLOAT_COLUMNS else np.full(n, None, dtype=object))
        elif c in BOOL_COLUMNS:
            columns[c] = np.array(field(c), dtype=bool)  # None (absent) is false
        elif c in FLOAT_COLUMNS:
            vals = field(c)
            columns[c] = np.array([math.nan if v is None else v for v in vals] if None in vals else vals, dtype=float)
        else:
            col = np.empty(n, dtype=object)
            col[:] = field(c)
            columns[c] = col
    if not np.isfinite(columns["ts"]).all():  # (NaN from a literal NaN) its order is the line reader's
        raise _Unusual
    order = np.argsort(columns["ts"], kind="stable")
    if n and not (order[1:] > order[:-1]).all():
        columns = {c: v[order] for c, v in columns.items()}
    return add_label_aliases({c: columns[c] for c in FETCH_COLUMNS})


def _columns_by_line(numbered: Iterable[tuple[int, Any]]) -> dict[str, np.ndarray]:
    """Read ``(line number, object)`` pairs one by one (every observation line, in ``ts`` order)."""
    obs: list[dict[str, Any]] = []
    labels: dict[str, dict[str, tuple[float, Any]]] = {}

    def add_label(rid: str, kind: str, value: Any, ts: float) -> None:
        cur = labels.setdefault(rid, {}).get(kind)
        if cur is None or ts >= cur[0]:
            labels[rid][kind] = (ts, value)

    for lineno, o in numbered:
        if not isinstance(o, dict):
            raise ValueError(f"line {lineno}: must be a JSON object")
        _check(o, lineno)
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
        obs.append(o)
    obs.sort(key=lambda o: o["ts"])  # stable: file order among equal timestamps
    n = len(obs)
    present: set[str] = set().union(*(o.keys() for o in obs)) if obs else set()
    no_label: dict = {}
    labs = [labels.get(o["request_id"], no_label) for o in obs]
    columns: list[list] = []
    for c in FETCH_COLUMNS:
        if c == "is_canary":
            columns.append([o.get("role") == "canary" for o in obs])
        elif c in LABEL_KINDS:
            vals = [lab[c][1] if c in lab else None for lab in labs]
            if c == "thumbs":
                vals = [None if v is None else (1.0 if v == "up" else 0.0) for v in vals]
            columns.append(vals)
        elif c in _TS_KIND:
            k = _TS_KIND[c]
            columns.append([lab[k][0] if k in lab else None for lab in labs])
        elif c not in present:
            columns.append([None] * n)
        else:
            columns.append([o.get(c) for o in obs])
    return add_label_aliases(columns_to_arrays(columns, FETCH_COLUMNS, n))


__all__ = ["export_jsonl", "iter_export_objects", "iter_jsonl", "jsonl_columns", "objects_to_columns", "parse_time",
           "read_jsonl", "record_to_json", "select_rows"]
