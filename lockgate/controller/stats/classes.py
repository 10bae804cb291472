"""Per-class recall and precision from delayed labels: :func:`evaluate_class`, :func:`usable_labels`."""

from __future__ import annotations

import numpy as np

from .arms import DEFAULT_MIN_CLUSTERS, arrays_per_request, check_alpha, prepare, undecided
from .means import difference_verdict
from .verdict import MetricSpec, MetricVerdict

__all__ = ["evaluate_class", "usable_labels"]


def usable_labels(true: np.ndarray, label_arrival_ts: np.ndarray, now: float) -> np.ndarray:
    """Mask of labels usable at evaluation time ``now``.

    A label is usable only if it exists and its arrival timestamp is finite and
    ``<= now``.  Labels that arrive later must not influence a decision taken
    at ``now`` (otherwise replaying a decision would not reproduce it, and the
    sequential guarantee would be about a different data stream).
    """
    t = np.asarray(true).reshape(-1)
    ts = np.asarray(label_arrival_ts, dtype=float).reshape(-1)
    if ts.size != t.size:
        raise ValueError("label_arrival_ts must have one entry per observation")
    if t.dtype.kind == "f":
        present = np.isfinite(t)
    elif t.dtype.kind == "O":
        present = np.array([(x is not None) and (x == x) for x in t], dtype=bool)
    else:
        present = np.ones(t.size, dtype=bool)
    return present & np.isfinite(ts) & (ts <= float(now))


def evaluate_class(
    pred: np.ndarray,
    true: np.ndarray,
    label_arrival_ts: np.ndarray,
    now: float,
    is_canary: np.ndarray,
    cluster: np.ndarray,
    spec: MetricSpec,
    alpha: float,
    *,
    stratum: np.ndarray | None = None,
    min_clusters: int = DEFAULT_MIN_CLUSTERS,
) -> MetricVerdict:
    """Per-class recall or precision from delayed labels.

    ``pred``: predicted class per request (known at serving time); ``true``:
    label (NaN/None = no label); ``label_arrival_ts``: when the label arrived
    (seconds, NaN/inf = never); ``now``: evaluation time.  Only labels with
    ``arrival <= now`` are used (:func:`usable_labels`).

    * recall(cls)    = mean of ``pred == cls`` over labelled requests with ``true == cls``
    * precision(cls) = mean of ``true == cls`` over labelled requests with ``pred == cls``

    Each is a ratio estimator over a subset, tested like a mean (cluster-robust,
    stratified, normal-mixture boundary).  Aggregate accuracy is deliberately
    not offered: a minority class can lose recall while accuracy rises.
    Assumes label arrival is unrelated to the arm (labels missing at random
    with respect to canary/baseline).
    """
    alpha = check_alpha(alpha)
    if spec.kind not in ("class_recall", "class_precision"):
        raise ValueError(f"{spec.name}: evaluate_class needs kind class_recall/class_precision")
    pr = np.asarray(pred).reshape(-1)
    tr = np.asarray(true).reshape(-1)
    if tr.size != pr.size:
        raise ValueError("pred and true must have the same length")
    arm, cl, st = arrays_per_request(pr.size, is_canary, cluster, stratum)
    ok = usable_labels(tr, label_arrival_ts, now)
    pred_is = np.asarray(pr == spec.cls, dtype=bool).reshape(-1)
    true_is = np.zeros(tr.size, dtype=bool)
    true_is[ok] = np.asarray(tr[ok] == spec.cls, dtype=bool).reshape(-1)
    if spec.kind == "class_recall":
        keep = ok & true_is
        y = pred_is.astype(float)
    else:
        keep = ok & pred_is
        y = true_is.astype(float)
    p = prepare(y, arm, cl, st, keep)
    if p.y.size == 0:
        return undecided(spec, alpha, f"no usable labels for class {spec.cls!r} at now={now:g}", None)
    v = difference_verdict(spec, alpha, p, binary=True, min_clusters=min_clusters,
                          details={"labels_usable": int(ok.sum()), "labels_total": int(tr.size), "now": float(now)})
    return v
