"""One metric's observations split into arms, users and stages, and what is counted from them.

Units: every array has one entry per request (observation).  ``is_canary`` is
boolean, ``cluster`` is any hashable key per request (hashed sticky-user key),
``share`` is the canary traffic share (0..1) in force when the request was
routed, timestamps are seconds.  NaN in a value array means "not measured" and
the row is dropped for that metric (never treated as zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .estimators import DiffEstimate, factorize, stratified_difference
from .verdict import NO_COUNTS, ArmCounts, MetricSpec, MetricVerdict

__all__ = ["DEFAULT_MIN_CLUSTERS", "Prepared", "arrays_per_request", "check_alpha", "cluster_df", "counts", "estimate",
           "effective_clusters", "prepare", "too_few_users", "undecided"]

DEFAULT_MIN_CLUSTERS = 20


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in (0, 1); ValueError otherwise."""
    alpha = float(alpha)
    if not (0.0 < alpha < 1.0):
        raise ValueError("alpha must be in (0, 1)")
    return alpha


def arrays_per_request(n: int, is_canary: Any, cluster: Any, stratum: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arm as bool, cluster key, stratum) per request, each of length ``n``; no stratum = one stage; float
    strata (canary shares) rounded to 1e-9 so float noise does not split a stage."""
    arm = np.asarray(is_canary).astype(bool).reshape(-1)
    cl = np.asarray(cluster).reshape(-1)
    if arm.size != n or cl.size != n:
        raise ValueError("is_canary and cluster must have one entry per observation")
    if stratum is None:
        st = np.zeros(n, dtype=np.intp)
    else:
        st = np.asarray(stratum).reshape(-1)
        if st.size != n:
            raise ValueError("stratum must have one entry per observation")
        if st.dtype.kind == "f":
            st = np.round(st, 9)  # share values that differ only by float noise are one stage
    return arm, cl, st


@dataclass
class Prepared:
    """The kept rows of one metric: values ``y`` (float), ``arm`` (0 baseline / 1 canary), cluster and stratum
    as dense indices (``0..n_cl-1``, ``0..n_st-1``)."""

    y: np.ndarray
    arm: np.ndarray  # intp 0/1
    cl: np.ndarray
    n_cl: int
    st: np.ndarray
    n_st: int


def prepare(y: np.ndarray, arm: np.ndarray, cl: np.ndarray, st: np.ndarray, keep: np.ndarray) -> Prepared:
    """The rows where ``keep`` is True, with cluster and stratum keys factorized."""
    cl_idx, n_cl = factorize(cl[keep])
    st_idx, n_st = factorize(st[keep])
    return Prepared(
        y=np.asarray(y[keep], dtype=float),
        arm=arm[keep].astype(np.intp),
        cl=cl_idx,
        n_cl=n_cl,
        st=st_idx,
        n_st=n_st,
    )


def estimate(p: Prepared, c: float, binary: bool, y: np.ndarray | None = None) -> DiffEstimate | None:
    """The stratified cluster-robust estimate of ``canary - c x baseline`` on ``y`` (default ``p.y``)."""
    return stratified_difference(p.y if y is None else y, p.arm, p.cl, p.n_cl, p.st, p.n_st, c=c, binary=binary)


def effective_clusters(p: Prepared) -> tuple[float, float]:
    """Effective number of users per arm (baseline, canary): ``(sum n_g)^2 / sum n_g^2``.

    Equal to the number of users when each sends the same number of requests, much smaller when a
    few heavy users send most of them.  The sandwich variance is only trustworthy with enough
    *effective* clusters (Carter, Schnepel & Steigerwald 2017): 25 users of whom one sends half the
    requests behave like ~4.
    """
    out = []
    for a in (0, 1):
        cnt = np.bincount(p.cl[p.arm == a], minlength=p.n_cl).astype(float)
        ss = float(np.dot(cnt, cnt))
        out.append(float(cnt.sum()) ** 2 / ss if ss > 0 else 0.0)
    return out[0], out[1]


def cluster_df(p: Prepared) -> float:
    """Degrees of freedom of the sandwich variance: effective users of the smaller arm, minus one."""
    return max(min(effective_clusters(p)) - 1.0, 1.0)


def too_few_users(p: Prepared, gb: int, gc: int, min_clusters: int) -> str | None:
    """The reason a decision is withheld for lack of (effective) users, or None."""
    eb, ec = effective_clusters(p)
    if min(gb, gc, eb, ec) >= min_clusters:
        return None
    return (f"too few users for a cluster-robust decision: canary {gc}, baseline {gb} distinct users "
            f"({ec:.0f} and {eb:.0f} effective, weighing heavy users; need >= {min_clusters} each)")


def counts(p: Prepared) -> ArmCounts:
    """Observations and distinct users per arm."""
    n_c = int(p.arm.sum())
    n_b = int(p.arm.size - n_c)
    gc = int(np.count_nonzero(np.bincount(p.cl[p.arm == 1], minlength=p.n_cl))) if n_c else 0
    gb = int(np.count_nonzero(np.bincount(p.cl[p.arm == 0], minlength=p.n_cl))) if n_b else 0
    return ArmCounts(n_b, n_c, gb, gc)



def undecided(spec: MetricSpec, alpha: float, reason: str, p: Prepared | None, *, baseline: float | None = None,
              canary: float | None = None) -> MetricVerdict:
    """A ``not-yet`` verdict for lack of data (``reason`` says which), with the counts of ``p`` if any."""
    return MetricVerdict.judged(spec, alpha, counts(p) if p is not None else NO_COUNTS, reason=reason,
                                baseline=baseline, canary=canary)
