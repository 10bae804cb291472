"""One metric's observations split into arms, users and stages, and what is counted from them.

Units: every array has one entry per request (observation).  ``is_canary`` is
boolean, ``cluster`` is any hashable key per request (hashed sticky-user key),
``share`` is the canary traffic share (0..1) in force when the request was
routed, timestamps are seconds.  NaN in a value array means "not measured" and
the row is dropped for that metric (never treated as zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .estimators import DiffEstimate, RowGrouping, factorize, group_rows, grouped_differences, stratified_differences
from .verdict import NO_COUNTS, ArmCounts, MetricSpec, MetricVerdict

__all__ = ["DEFAULT_MIN_CLUSTERS", "Groups", "Prepared", "arm_mean", "cell_sums", "estimates", "arrays_per_request", "check_alpha", "cluster_df", "counts", "estimate",
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
    _grouping: RowGrouping | None = field(default=None, init=False, repr=False, compare=False)

    def grouping(self) -> RowGrouping:
        """The rows' (user, stratum, arm) groups, computed at the first call (they do not depend on ``y``:
        every estimate on these rows, whatever the values, reuses them)."""
        if self._grouping is None:
            self._grouping = group_rows(self.arm, self.cl, self.st, self.n_st)
        return self._grouping


@dataclass
class Groups:
    """The kept rows of one metric summed per (user, stratum, arm): the sufficient statistics of every
    variance-based test (no row-level data). One entry per group with at least one row: dense cluster and
    stratum indices ``cl`` (``0..n_cl-1``) and ``st`` (``0..n_st-1``), ``arm`` (0 baseline / 1 canary),
    ``n`` (rows, float) and ``s`` (sum of the values). Every function of this module that takes a
    :class:`Prepared` also takes a :class:`Groups` and gives the same numbers (up to float summation order);
    ``decide/accumulator.py`` keeps them up to date batch by batch."""

    cl: np.ndarray
    st: np.ndarray
    arm: np.ndarray  # intp 0/1
    n: np.ndarray
    s: np.ndarray
    n_cl: int
    n_st: int

    @property
    def size(self) -> int:
        """Rows (as :attr:`Prepared.y`'s size)."""
        return int(self.n.sum())


def estimates(p: "Prepared | Groups", cs: tuple[float, ...], binary: bool) -> list[DiffEstimate | None]:
    """:func:`~.estimators.stratified_differences` of ``p`` for the contrasts ``cs``."""
    if isinstance(p, Groups):
        return grouped_differences(p.cl, p.st, p.arm, p.n, p.s, p.n_cl, p.n_st, cs=cs, binary=binary)
    return stratified_differences(p.y, p.arm, p.cl, p.n_cl, p.st, p.n_st, cs=cs, binary=binary,
                                  grouping=p.grouping())


def cell_sums(p: "Prepared | Groups") -> tuple[np.ndarray, np.ndarray]:
    """Rows and sums of the values per (stratum, arm): two ``(n_st, 2)`` arrays."""
    if isinstance(p, Groups):
        key = p.st * 2 + p.arm
        nk = np.bincount(key, weights=p.n, minlength=2 * p.n_st).reshape(p.n_st, 2)
        ek = np.bincount(key, weights=p.s, minlength=2 * p.n_st).reshape(p.n_st, 2)
        return nk, ek
    key = p.st * 2 + p.arm
    nk = np.bincount(key, minlength=2 * p.n_st).reshape(p.n_st, 2).astype(float)
    ek = np.bincount(key, weights=p.y, minlength=2 * p.n_st).reshape(p.n_st, 2)
    return nk, ek


def arm_mean(p: "Prepared | Groups", a: int) -> float:
    """The pooled mean of arm ``a`` (NaN when it has no rows)."""
    if isinstance(p, Groups):
        m = p.arm == a
        n = float(p.n[m].sum())
        return float(p.s[m].sum() / n) if n > 0 else float("nan")
    return float(p.y[p.arm == a].mean())


def _cluster_counts(p: "Prepared | Groups", a: int) -> np.ndarray:
    """Rows per cluster in arm ``a`` (length ``n_cl``)."""
    if isinstance(p, Groups):
        m = p.arm == a
        return np.bincount(p.cl[m], weights=p.n[m], minlength=p.n_cl)
    g = p.grouping()  # per group, not per row: a few thousand entries instead of every row
    m = g.arm == a
    return np.bincount(g.cl[m], weights=g.n[m], minlength=p.n_cl)


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


def estimate(p: "Prepared | Groups", c: float, binary: bool, y: np.ndarray | None = None) -> DiffEstimate | None:
    """The stratified cluster-robust estimate of ``canary - c x baseline`` on ``y`` (default ``p.y``)."""
    if isinstance(p, Groups):
        return estimates(p, (c,), binary)[0]
    return stratified_differences(p.y if y is None else y, p.arm, p.cl, p.n_cl, p.st, p.n_st, cs=(c,),
                                  binary=binary, grouping=p.grouping())[0]


def effective_clusters(p: "Prepared | Groups") -> tuple[float, float]:
    """Effective number of users per arm (baseline, canary): ``(sum n_g)^2 / sum n_g^2``.

    Equal to the number of users when each sends the same number of requests, much smaller when a
    few heavy users send most of them.  The sandwich variance is only trustworthy with enough
    *effective* clusters (Carter, Schnepel & Steigerwald 2017): 25 users of whom one sends half the
    requests behave like ~4.
    """
    out = []
    for a in (0, 1):
        cnt = _cluster_counts(p, a).astype(float)
        ss = float(np.dot(cnt, cnt))
        out.append(float(cnt.sum()) ** 2 / ss if ss > 0 else 0.0)
    return out[0], out[1]


def cluster_df(p: "Prepared | Groups") -> float:
    """Degrees of freedom of the sandwich variance: effective users of the smaller arm, minus one."""
    return max(min(effective_clusters(p)) - 1.0, 1.0)


def too_few_users(p: "Prepared | Groups", gb: int, gc: int, min_clusters: int) -> str | None:
    """The reason a decision is withheld for lack of (effective) users, or None."""
    eb, ec = effective_clusters(p)
    if min(gb, gc, eb, ec) >= min_clusters:
        return None
    return (f"too few users for a cluster-robust decision: canary {gc}, baseline {gb} distinct users "
            f"({ec:.0f} and {eb:.0f} effective, weighing heavy users; need >= {min_clusters} each)")


def counts(p: "Prepared | Groups") -> ArmCounts:
    """Observations and distinct users per arm."""
    if isinstance(p, Groups):
        n_c = int(round(float(p.n[p.arm == 1].sum())))
        n_b = int(round(float(p.n[p.arm == 0].sum())))
    else:
        n_c = int(p.arm.sum())
        n_b = int(p.arm.size - n_c)
    gc = int(np.count_nonzero(_cluster_counts(p, 1))) if n_c else 0
    gb = int(np.count_nonzero(_cluster_counts(p, 0))) if n_b else 0
    return ArmCounts(n_b, n_c, gb, gc)



def undecided(spec: MetricSpec, alpha: float, reason: str, p: "Prepared | Groups | None", *, baseline: float | None = None,
              canary: float | None = None) -> MetricVerdict:
    """A ``not-yet`` verdict for lack of data (``reason`` says which), with the counts of ``p`` if any."""
    return MetricVerdict.judged(spec, alpha, counts(p) if p is not None else NO_COUNTS, reason=reason,
                                baseline=baseline, canary=canary)
