"""``POST /v1/feedback`` bodies: validation (:func:`parse_feedback`), limits and the JSON Schema for /openapi.json.

Pure: bytes in, ``(request_id, [(kind, value), …])`` out, or a :class:`FeedbackError` naming the field.
"""

from __future__ import annotations

import json
import math
from typing import Any


from lockgate.controller.ingest.schema import LABEL_KINDS




MAX_ITEMS = 10000


MAX_ID_LEN = 512


MAX_CLASS_LEN = 1024


class FeedbackError(ValueError):
    """A malformed feedback body; ``field`` names the offending field path."""


    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ClientRequestId(str):
    """A feedback item keyed by ``client_request_id`` (the client's ``x-request-id``) instead of lockgate's
    request id; resolved to the one observation carrying it (several: 409, ambiguous)."""


#: JSON Schema of a ``POST /v1/feedback`` body (what :func:`parse_feedback` accepts), for /openapi.json
_FEEDBACK_ITEM: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "request_id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN,
                       "description": "lockgate's request id (the x-lockgate-request-id response header)"},
        "client_request_id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN,
                              "description": "the request's own x-request-id (instead of request_id)"},
        "true_class": {"type": ["string", "integer"], "description": "the right answer (classification)"},
        "thumbs": {"enum": ["up", "down"]},
        "task_success": {"type": "boolean"},
        "evaluator_score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "oneOf": [{"required": ["request_id"]}, {"required": ["client_request_id"]}],
    "anyOf": [{"required": [k]} for k in ("true_class", "thumbs", "task_success", "evaluator_score")],
}


FEEDBACK_SCHEMA: dict[str, Any] = {"oneOf": [_FEEDBACK_ITEM, {"type": "array", "minItems": 1,
                                                              "maxItems": MAX_ITEMS, "items": _FEEDBACK_ITEM}]}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_feedback(body: bytes) -> tuple[list[tuple[str, list[tuple[str, Any]]]], bool]:
    """Validate a feedback body → ``([(request_id, [(kind, value), …]), …], was_list)``.


    An item keyed by ``client_request_id`` (instead of ``request_id``) yields a :class:`ClientRequestId`.
    Raises :class:`FeedbackError` naming the field (``[3].thumbs``, ``request_id``, …)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise FeedbackError("<body>", "is not UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise FeedbackError("<body>", f"invalid JSON: {exc}") from None
    was_list = isinstance(data, list)
    items = data if was_list else [data]
    if was_list and not items:
        raise FeedbackError("<body>", "empty list")
    if len(items) > MAX_ITEMS:
        raise FeedbackError("<body>", f"at most {MAX_ITEMS} items per request, got {len(items)}")
    out = []
    for i, item in enumerate(items):
        prefix = f"[{i}]." if was_list else ""
        if not isinstance(item, dict):
            raise FeedbackError(f"[{i}]" if was_list else "<body>", "must be a JSON object")
        for key in item:
            if key not in ("request_id", "client_request_id") and key not in LABEL_KINDS:
                raise FeedbackError(prefix + str(key), "unknown field (known: request_id, client_request_id, "
                                                       f"{', '.join(LABEL_KINDS)})")
        id_field = "client_request_id" if "client_request_id" in item else "request_id"
        if id_field == "client_request_id" and "request_id" in item:
            raise FeedbackError(prefix + "client_request_id", "give request_id or client_request_id, not both")
        rid = item.get(id_field)
        if not isinstance(rid, str) or not rid.strip():
            raise FeedbackError(prefix + id_field, "is required (a non-empty string)")
        if len(rid) > MAX_ID_LEN:
            raise FeedbackError(prefix + id_field, f"longer than {MAX_ID_LEN} characters")
        if id_field == "client_request_id":
            rid = ClientRequestId(rid)
        labels: list[tuple[str, Any]] = []
        for kind in LABEL_KINDS:
            if kind not in item:
                continue
            v = item[kind]
            name = prefix + kind
            if kind == "true_class":
                if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
                    raise FeedbackError(name, f"must be a non-empty string, got {json.dumps(v)}")
                v = str(v)
                if len(v) > MAX_CLASS_LEN:
                    raise FeedbackError(name, f"longer than {MAX_CLASS_LEN} characters")
            elif kind == "thumbs":
                if v not in ("up", "down"):
                    raise FeedbackError(name, f'must be "up" or "down", got {json.dumps(v)}')
            elif kind == "task_success":
                if not isinstance(v, bool):
                    raise FeedbackError(name, f"must be true or false, got {json.dumps(v)}")
            else:  # evaluator_score
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise FeedbackError(name, f"must be a finite number, got {json.dumps(v)}")
                if not 0.0 <= v <= 1.0:  # lockgate's own evaluators score on the same [0, 1] scale
                    raise FeedbackError(name, f"must be between 0 and 1 (scale other scores to [0, 1]: "
                                              f"a 1-10 rubric score s is (s - 1) / 9), got {json.dumps(v)}")
                v = float(v)
            labels.append((kind, v))
        if not labels:
            raise FeedbackError(prefix + "request_id", f"no feedback given (set one of {', '.join(LABEL_KINDS)})")
        out.append((rid, labels))
    return out, was_list
