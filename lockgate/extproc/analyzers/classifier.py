"""Classifier JSON bodies: predicted class, confidence and the entropy of the class distribution."""

from __future__ import annotations

import math
from typing import Any, Callable

from lockgate.extproc.analyzers.base import BodyAnalysis, _num
from lockgate.extproc.analyzers.tokens import _entropy_of

def classifier_analysis(obj: Any, base: Callable[..., BodyAnalysis]) -> BodyAnalysis:
    """A classifier's JSON answer (``{label, score}``, ``{probs, labels}``, or a list of
    ``{label, score}``) → predicted class, confidence and class entropy; ``base(analyzer, **fields)``
    builds the record (it adds byte counts and truncation)."""
    model = None
    pairs: list[tuple[str, float]] | None = None
    label: str | None = None
    score: float | None = None
    if isinstance(obj, list):
        items = obj[0] if obj and isinstance(obj[0], list) else obj
        pairs = []
        for d in items:
            if isinstance(d, dict) and "label" in d:
                s = _num(d.get("score"))
                if s is not None:
                    pairs.append((str(d["label"]), s))
        if not pairs:
            return base("classifier", parse_error="unrecognized_shape")
    elif isinstance(obj, dict):
        m = obj.get("model")
        model = m if isinstance(m, str) and m else None
        if obj.get("label") is not None:
            label = str(obj["label"])
            score = _num(obj.get("score"))
        probs = obj.get("probs")
        if isinstance(probs, dict):
            pairs = [(str(k), v) for k, v in probs.items()]
        elif isinstance(probs, list):
            labels = obj.get("labels")
            if isinstance(labels, list) and len(labels) == len(probs):
                pairs = [(str(k), v) for k, v in zip(labels, probs)]
            else:
                pairs = [(str(i), v) for i, v in enumerate(probs)]
        if pairs is not None:
            cleaned = []
            for k, v in pairs:
                f = _num(v)
                if f is None or f < 0:
                    return base("classifier", parse_error="invalid_probs", model_reported=model)
                cleaned.append((k, f))
            pairs = cleaned
            total = sum(v for _, v in pairs)
            if not pairs or total <= 0 or not math.isfinite(total):
                return base("classifier", parse_error="invalid_probs", model_reported=model)
            pairs = [(k, v / total) for k, v in pairs]
        elif label is None:
            return base("classifier", parse_error="unrecognized_shape", model_reported=model)
    else:
        return base("classifier", parse_error="unrecognized_shape")

    if pairs:
        best_label, best = pairs[0]
        for k, v in pairs:
            if v > best:
                best_label, best = k, v
        ent = _entropy_of(v for _, v in pairs) if len(pairs) >= 2 else None
        if label is None:
            label, score = best_label, best
        elif score is None:
            score = dict(pairs).get(label, best)
    else:
        ent = None
    return base(
        "classifier",
        predicted_class=label,
        confidence=score,
        class_entropy=ent,
        model_reported=model,
    )
