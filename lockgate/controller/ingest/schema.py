"""What an observation is: its columns and their types, the error definition, and label arrival.

The one place these are defined (pure: no I/O, no clock). Used by the observation store
(:mod:`.observations`: its table and :meth:`~.observations.ObservationStore.fetch`), the JSONL export and
reader (:mod:`.export`), the controller's metrics (:mod:`.collector`), the decision
(:mod:`lockgate.controller.decide.analysis`, ``.replay``, ``.ramp_plan``, the metric catalogue in
``.spec``) and ``lockgate rollout diagnose``.

Three views of one observation:

* **stored** (:data:`STORED_COLUMNS`): a column of the ``observations`` table per field of the proto
  ``Observation`` (``NULL`` = not measured, never 0), plus ``source`` and ``received_ts``;
* **columnar** (:data:`FETCH_COLUMNS`): what ``fetch`` and ``export.read_jsonl`` return, one NumPy
  array per column — float64 with NaN for not measured (:data:`FLOAT_COLUMNS`), bool
  (:data:`BOOL_COLUMNS`), or object with ``None`` (:data:`OBJECT_COLUMNS`); labels joined with their
  arrival times (:data:`LABEL_ARRIVAL_COLUMN`);
* **JSONL** (:data:`JSONL_FIELD_TYPES`): the export format, docs/observations.md.

The error definition (:func:`error_column`, :func:`is_error`): a request is an error when its status is
``>= 500`` (:data:`ERROR_STATUS_MIN`), it timed out upstream, or the model server cut its stream
(``error_kind`` in :data:`MODEL_FAILURE_KINDS`); unknown when its status is unknown and none of these
holds.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np


# ---------------------------------------------------------------------------------------- labels
#: feedback kinds a request can be labelled with (``POST /v1/feedback``)
LABEL_KINDS = ("true_class", "thumbs", "task_success", "evaluator_score")
#: label kind -> the column holding its arrival time (epoch s; NaN while no label arrived). A label is
#: used by the decision only from its arrival time on.
LABEL_ARRIVAL_COLUMN: Mapping[str, str] = {
    "true_class": "label_arrival_ts", "thumbs": "thumbs_arrival_ts",
    "task_success": "task_success_arrival_ts", "evaluator_score": "evaluator_score_arrival_ts",
}
#: the label-fed columns that are a metric's values themselves (feedback), -> their arrival column.
#: ``true_class`` is not one: metrics compare it with ``predicted_class`` (``correct``, per-class).
FEEDBACK_ARRIVAL_COLUMNS: Mapping[str, str] = {
    k: LABEL_ARRIVAL_COLUMN[k] for k in ("thumbs", "task_success", "evaluator_score")}
#: short names ``fetch`` and ``read_jsonl`` also return: ``label`` = ``true_class``, ``label_ts`` =
#: ``label_arrival_ts`` (the same arrays)
LABEL_ALIASES: Mapping[str, str] = {"label": "true_class", "label_ts": LABEL_ARRIVAL_COLUMN["true_class"]}
#: every label value column (aliases included) -> its arrival column: what a replay must cut at a
#: look's time (a label that arrived later is removed with its arrival time)
ARRIVAL_COLUMNS: Mapping[str, str] = {
    "true_class": LABEL_ARRIVAL_COLUMN["true_class"], "label": "label_ts",
    **FEEDBACK_ARRIVAL_COLUMNS,
}


# ---------------------------------------------------------------------------------------- errors
#: a response status at or above this is an error
ERROR_STATUS_MIN = 500
#: ``error_kind`` values (how a stream ended, from Envoy's access log) that are the model's failure:
#: they count as errors, like a 5xx or a timeout; ``client_reset`` (the client went away) is not one
MODEL_FAILURE_KINDS = ("upstream_reset", "upstream_timeout")
#: the columns the error definition reads
ERROR_COLUMNS = ("status_code", "timeout", "error_kind")


def model_failure(error_kind: Any) -> np.ndarray:
    """Bool per row: the ``error_kind`` column names a model failure (see :data:`MODEL_FAILURE_KINDS`)."""
    return np.isin(np.asarray(error_kind, dtype=object), MODEL_FAILURE_KINDS)


def is_model_failure(error_kind: str | None) -> bool:
    """One ``error_kind``: a model failure (see :data:`MODEL_FAILURE_KINDS`)."""
    return error_kind in MODEL_FAILURE_KINDS


def error_column(status_code: Any, timeout: Any, error_kind: Any = None) -> np.ndarray:
    """The ``error`` column: float64 per row, 1.0 = error, 0.0 = not, NaN = unknown.

    ``status_code``: float, NaN = unknown; ``timeout``: bool or 0/1 (NaN = not known, i.e. no);
    ``error_kind``: object, ``None`` = the stream ended normally (or None: no such column). An error is
    ``status_code >= 500``, a timeout, or a model failure; a row with an unknown status is an error
    when it timed out or the model cut its stream, else unknown.
    """
    status = np.asarray(status_code, dtype=float)
    err = np.where(np.isnan(status), np.nan, (status >= ERROR_STATUS_MIN).astype(float))
    err = np.where(np.nan_to_num(np.asarray(timeout, dtype=float)) > 0, 1.0, err)
    if error_kind is not None:
        err = np.where(model_failure(error_kind), 1.0, err)  # the model cut the stream
    return err


def is_error(status_code: int | float | None, timeout: bool, error_kind: str | None = None) -> bool:
    """One request (as :func:`error_column`, an unknown status counting as not an error):
    ``status_code`` None, 0 (the proto's "not set") or NaN = unknown."""
    known = status_code is not None and not (isinstance(status_code, float) and math.isnan(status_code))
    return (known and status_code >= ERROR_STATUS_MIN) or bool(timeout) or is_model_failure(error_kind)


# ---------------------------------------------------------------------------------------- stored
class StoredColumn(NamedTuple):
    """One column of the ``observations`` table."""

    name: str
    sql_type: str           #: its SQLite type (``NOT NULL`` for fields always set)
    proto_field: str | None  #: the ``Observation`` field it holds (None: set by the controller)
    #: how the proto says "not measured": ``opt`` proto3 optional (HasField), ``str`` "" = not set,
    #: ``nz`` 0 = not set (status_code), ``plain`` always set, ``""`` not from the proto
    unset: str


STORED_COLUMNS: tuple[StoredColumn, ...] = tuple(StoredColumn(*c) for c in (
    ("request_id", "TEXT NOT NULL", "request_id", "plain"),
    ("ts", "REAL NOT NULL", "ts", "plain"),
    ("model", "TEXT NOT NULL", "model", "plain"),
    ("version", "TEXT NOT NULL", "version", "plain"),
    ("role", "TEXT NOT NULL", "role", "plain"),
    ("weight_bp", "INTEGER NOT NULL", "weight_bp", "plain"),
    ("stage", "TEXT", "stage", "str"),
    ("route", "TEXT", "route", "str"),
    ("upstream_host", "TEXT", "upstream_host", "str"),
    ("status_code", "INTEGER", "status_code", "nz"),
    ("user_key", "TEXT", "user_key", "str"),
    ("ttfb_ms", "REAL", "ttfb_ms", "opt"),
    ("duration_ms", "REAL", "duration_ms", "opt"),
    ("request_bytes", "INTEGER", "request_bytes", "opt"),
    ("response_bytes", "INTEGER", "response_bytes", "opt"),
    ("timeout", "INTEGER NOT NULL", "timeout", "plain"),
    ("analyzer", "TEXT", "analyzer", "str"),
    ("truncated", "INTEGER NOT NULL", "truncated", "plain"),
    ("parse_error", "TEXT", "parse_error", "str"),
    ("output_tokens", "INTEGER", "output_tokens", "opt"),
    ("output_tokens_estimated", "INTEGER NOT NULL", "output_tokens_estimated", "plain"),
    ("output_chars", "INTEGER", "output_chars", "opt"),
    ("finish_reason", "TEXT", "finish_reason", "str"),
    ("refusal", "INTEGER", "refusal", "opt"),
    ("entropy", "REAL", "entropy", "opt"),
    ("predicted_class", "TEXT", "predicted_class", "str"),
    ("confidence", "REAL", "confidence", "opt"),
    ("class_entropy", "REAL", "class_entropy", "opt"),
    ("events", "INTEGER", "events", "opt"),
    ("replay", "INTEGER NOT NULL", "replay", "plain"),
    ("client_request_id", "TEXT", "client_request_id", "str"),
    ("cohort", "TEXT", "cohort", "str"),  # the cohort a cohort route sent it with (role "other"), else NULL
    ("source", "TEXT", None, ""),
    ("received_ts", "REAL NOT NULL", None, ""),
))
STORED_COLUMN_NAMES = tuple(c.name for c in STORED_COLUMNS)
#: stored 0/1, always known (true/false in exports)
STORED_BOOL_COLUMNS = ("timeout", "truncated", "output_tokens_estimated", "replay")


# ---------------------------------------------------------------------------------------- columnar
#: float64 columns, NaN = not measured (``weight``: the canary share 0–1; ``latency_ms``: the stored
#: ``duration_ms``; ``refusal``/``thumbs``/``task_success``: 1.0/0.0)
FLOAT_COLUMNS = ("ts", "weight", "status_code", "latency_ms", "ttfb_ms", "request_bytes", "response_bytes",
                 "output_tokens", "output_chars", "refusal", "entropy", "confidence", "class_entropy", "events",
                 "thumbs", "task_success", "evaluator_score", *LABEL_ARRIVAL_COLUMN.values())
#: bool columns (always known; ``is_canary`` = role is ``canary``)
BOOL_COLUMNS = ("is_canary", *STORED_BOOL_COLUMNS)
#: object columns, None = not set
OBJECT_COLUMNS = ("request_id", "model", "version", "role", "stage", "route", "upstream_host", "user_key",
                  "analyzer", "parse_error", "finish_reason", "predicted_class", "true_class", "client_request_id",
                  "error_kind", "cohort")
FETCH_COLUMNS = FLOAT_COLUMNS + BOOL_COLUMNS + OBJECT_COLUMNS
#: the columns the decision reads (``analysis.prepare_dataset`` and the catalogue's metrics): what the
#: controller fetches for a rollout's evaluation
DECISION_COLUMNS = ("ts", "request_id", "version", "role", "weight", "stage", *ERROR_COLUMNS,
                    "latency_ms", "ttfb_ms", "output_tokens", "refusal", "entropy", "predicted_class", "user_key",
                    "upstream_host", "true_class", LABEL_ARRIVAL_COLUMN["true_class"],
                    *(c for kind in FEEDBACK_ARRIVAL_COLUMNS for c in (kind, FEEDBACK_ARRIVAL_COLUMNS[kind])))


def columns_to_arrays(cols: Sequence[Sequence[Any]], names: Sequence[str], n: int) -> dict[str, np.ndarray]:
    """Value lists (one per name, each of length ``n``) → typed columns: bool (:data:`BOOL_COLUMNS`),
    float64 with NaN for ``None`` (:data:`FLOAT_COLUMNS`), or object with ``None`` (the rest;
    non-strings turned into strings)."""
    out: dict[str, np.ndarray] = {}
    for name, values in zip(names, cols):
        if name in BOOL_COLUMNS:
            out[name] = np.fromiter((bool(v) for v in values), dtype=bool, count=n)
        elif name in FLOAT_COLUMNS:
            out[name] = np.fromiter((math.nan if v is None else float(v) for v in values), dtype=np.float64,
                                    count=n)
        else:
            arr = np.empty(n, dtype=object)
            if n:
                arr[:] = values if all(v is None or type(v) is str for v in values) else \
                    [None if v is None else str(v) for v in values]
            out[name] = arr
    return out


def add_label_aliases(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add :data:`LABEL_ALIASES` (the same arrays) for the columns present; returns ``columns``."""
    for alias, name in LABEL_ALIASES.items():
        if name in columns:
            columns[alias] = columns[name]
    return columns


# ---------------------------------------------------------------------------------------- JSONL
#: fields that are a yes/no not always measured: 1.0/0.0/NaN in columns, true/false/absent in JSONL
OPTIONAL_BOOL_FIELDS = ("refusal", "task_success")
#: JSONL field -> what its value must be (``number``, ``bool``, ``string``, or ``thumbs``: "up"/"down");
#: fields not listed are not checked
JSONL_FIELD_TYPES: Mapping[str, str] = {
    **{c: "number" for c in FLOAT_COLUMNS if c not in OPTIONAL_BOOL_FIELDS and c != "thumbs"},
    **{c: "bool" for c in (*STORED_BOOL_COLUMNS, *OPTIONAL_BOOL_FIELDS)},
    **{c: "string" for c in OBJECT_COLUMNS},
    "thumbs": "thumbs",
}


__all__ = ["ARRIVAL_COLUMNS", "BOOL_COLUMNS", "DECISION_COLUMNS", "ERROR_COLUMNS", "ERROR_STATUS_MIN",
           "FEEDBACK_ARRIVAL_COLUMNS", "FETCH_COLUMNS", "FLOAT_COLUMNS", "JSONL_FIELD_TYPES", "LABEL_ALIASES",
           "LABEL_ARRIVAL_COLUMN", "LABEL_KINDS", "MODEL_FAILURE_KINDS", "OBJECT_COLUMNS", "OPTIONAL_BOOL_FIELDS",
           "STORED_BOOL_COLUMNS", "STORED_COLUMNS", "STORED_COLUMN_NAMES", "StoredColumn", "add_label_aliases",
           "columns_to_arrays", "error_column", "is_error", "is_model_failure", "model_failure"]
