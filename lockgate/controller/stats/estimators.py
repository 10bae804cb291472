"""Vectorised, cluster-robust, stratified difference-of-means estimator.

The one estimator behind every variance-based test:

    theta_hat = sum_k w_k (mean_canary_k - c * mean_baseline_k)

* ``k`` runs over strata (by default the rollout stage, i.e. the canary share);
  comparing canary and baseline *within* a stage removes the bias that a
  drifting baseline (time of day, traffic mix) would otherwise create while the
  canary share grows.  ``w_k`` is proportional to ``n_c,k n_b,k / n_k``
  (Mantel-Haenszel / inverse-variance-like), normalised to 1; strata where one
  arm is empty carry no information and get weight 0.
* ``c = 1`` gives the plain difference; ``c = 1 + rel`` (or ``1 - rel``) gives
  the relative non-inferiority contrast ``mean_c - (1+rel) mean_b``.
* The means are ratio estimators (sum of values / number of observations), so
  their variance comes from the linearisation (influence function)

      psi_i = coef_{k,a} (y_i - mean_{k,a}),   coef = w_k / n_c,k  or  -c w_k / n_b,k

  summed per cluster (hashed sticky-user key) *before* squaring:

      Var_CR(theta_hat) = G/(G-1) * sum_g (sum_{i in g} psi_i)^2

  which is the cluster-robust ("sandwich", CR1) variance: correlated requests of
  one user count as one independent unit, not as many.  Each user's summed
  residual within a stratum-arm is divided by ``sqrt(1 - h)`` (``h`` = the
  user's share of that stratum-arm's requests; CR2, Bell & McCaffrey 2002):
  a heavy user pulls the mean toward itself and so shrinks its own residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["factorize", "DiffEstimate", "RowGrouping", "group_rows", "grouped_differences", "stratified_difference",
           "stratified_differences"]


def factorize(a: np.ndarray) -> tuple[np.ndarray, int]:
    """Map arbitrary keys to dense ``0..n_groups-1`` indices.

    Small non-negative integers are used as-is (cheap); everything else goes
    through ``np.unique``.
    """
    a = np.asarray(a)
    if a.size == 0:
        return np.zeros(0, dtype=np.intp), 0
    if a.dtype.kind == "b":
        return a.astype(np.intp), 2
    if a.dtype.kind in "iu":
        lo = int(a.min())
        hi = int(a.max())
        if lo >= 0 and hi < 4 * a.size + 1024:
            return a.astype(np.intp, copy=False), hi + 1
    _, inv = np.unique(a, return_inverse=True)
    inv = inv.reshape(-1).astype(np.intp, copy=False)
    return inv, int(inv.max()) + 1


@dataclass(frozen=True)
class DiffEstimate:
    """Result of :func:`stratified_difference`.

    ``estimate``/``variance`` refer to ``theta = sum_k w_k (mu_c,k - c mu_b,k)``.
    ``mean_canary``/``mean_baseline`` are the pooled (unstratified) means for
    display.  ``clusters_*`` count distinct clusters with at least one
    observation in an informative stratum.
    """

    estimate: float
    variance: float
    n_canary: int
    n_baseline: int
    clusters_canary: int
    clusters_baseline: int
    mean_canary: float
    mean_baseline: float


def stratified_difference(
    y: np.ndarray,
    arm: np.ndarray,
    cl_idx: np.ndarray,
    n_cl: int,
    st_idx: np.ndarray,
    n_st: int,
    *,
    c: float = 1.0,
    binary: bool = False,
) -> DiffEstimate | None:
    """Stratified cluster-robust contrast of canary vs baseline means.

    ``y``: float values (no NaN), ``arm``: 0 baseline / 1 canary (int),
    ``cl_idx``/``st_idx``: dense cluster / stratum indices (see :func:`factorize`).
    ``binary``: values are 0/1; the variance is then floored by the binomial
    variance with a Jeffreys-style pseudo-count, so zero observed events never
    produce a zero variance.

    Returns ``None`` when no stratum has both arms.
    """
    return stratified_differences(y, arm, cl_idx, n_cl, st_idx, n_st, cs=(c,), binary=binary)[0]


@dataclass(frozen=True)
class RowGrouping:
    """Rows mapped to their (user, stratum, arm) group: ``row_group`` (one group index per row) and, per
    group, its dense cluster ``cl``, stratum ``st``, arm ``arm`` (0/1) and row count ``n`` (float).
    Depends only on who sent each row, never on the values: compute it once (:func:`group_rows`) and sum
    any number of value vectors over it (one ``np.bincount`` each instead of a sort per contrast)."""

    row_group: np.ndarray
    cl: np.ndarray
    st: np.ndarray
    arm: np.ndarray
    n: np.ndarray

    def sums(self, y: np.ndarray) -> np.ndarray:
        """Sum of ``y`` (one value per row) per group."""
        return np.bincount(self.row_group, weights=np.asarray(y, dtype=float), minlength=self.n.size)


def group_rows(arm: np.ndarray, cl_idx: np.ndarray, st_idx: np.ndarray, n_st: int) -> RowGrouping:
    """The :class:`RowGrouping` of rows with dense cluster / stratum indices and arm 0/1."""
    k2 = 2 * n_st
    keys = np.asarray(cl_idx, dtype=np.int64) * k2 + np.asarray(st_idx, dtype=np.int64) * 2 \
        + np.asarray(arm, dtype=np.int64)
    span = int(keys.max()) + 1 if keys.size else 0
    if span <= 4 * keys.size + (1 << 16):
        # dense keys (the usual case: dense user and stratum indices): a counting pass, no sort
        present = np.bincount(keys, minlength=span) > 0
        g_uni = np.flatnonzero(present)
        g_inv = (np.cumsum(present) - 1)[keys]
    else:
        g_uni, g_inv = np.unique(keys, return_inverse=True)
        g_inv = g_inv.reshape(-1)
    cell = g_uni % k2
    return RowGrouping(g_inv, g_uni // k2, cell // 2, cell % 2,
                       np.bincount(g_inv, minlength=g_uni.size).astype(float))


def stratified_differences(
    y: np.ndarray,
    arm: np.ndarray,
    cl_idx: np.ndarray,
    n_cl: int,
    st_idx: np.ndarray,
    n_st: int,
    *,
    cs: tuple[float, ...] = (1.0,),
    binary: bool = False,
    grouping: RowGrouping | None = None,
) -> list[DiffEstimate | None]:
    """:func:`stratified_difference` for several contrasts ``c`` sharing the grouping work: the rows are
    summed per (user, stratum, arm) group and judged by :func:`grouped_differences` (one formula for both).
    ``grouping``: :func:`group_rows` of these ``arm``/``cl_idx``/``st_idx``, when the caller already has it."""
    g = grouping if grouping is not None else group_rows(arm, cl_idx, st_idx, n_st)
    return grouped_differences(g.cl, g.st, g.arm, g.n, g.sums(y), n_cl, n_st, cs=cs, binary=binary)


def grouped_differences(
    cl: np.ndarray,
    st: np.ndarray,
    arm: np.ndarray,
    gn: np.ndarray,
    gs: np.ndarray,
    n_cl: int,
    n_st: int,
    *,
    cs: tuple[float, ...] = (1.0,),
    binary: bool = False,
) -> list[DiffEstimate | None]:
    """:func:`stratified_differences` from per-(user, stratum, arm) sums instead of rows.

    One entry per group (each ``(cl, st, arm)`` at most once, ``gn > 0``): ``gn`` rows with values summing
    to ``gs``. A group's summed influence is ``coef (gs - gn mu)``, which is what the row version sums, so
    the estimate, variance and counts are the same (up to float summation order) at a cost that depends on
    the number of users and strata, not rows.
    """
    cl = np.asarray(cl, dtype=np.intp)
    arm = np.asarray(arm, dtype=np.intp)
    gn = np.asarray(gn, dtype=float)
    gs = np.asarray(gs, dtype=float)
    key = np.asarray(st, dtype=np.intp) * 2 + arm
    k2 = 2 * n_st
    n = np.bincount(key, weights=gn, minlength=k2).reshape(n_st, 2)
    s = np.bincount(key, weights=gs, minlength=k2).reshape(n_st, 2)
    n0, n1 = n[:, 0], n[:, 1]
    valid = (n0 > 0) & (n1 > 0)
    if not valid.any():
        return [None] * len(cs)
    w = np.where(valid, n0 * n1 / np.maximum(n0 + n1, 1.0), 0.0)
    w = w / w.sum()
    mu = s / np.maximum(n, 1.0)
    resid = gs - gn * mu.reshape(-1)[key]
    valid_g = valid[key // 2]
    in_c = valid_g & (arm == 1)
    in_b = valid_g & (arm == 0)
    cnt_c = np.bincount(cl[in_c], weights=gn[in_c], minlength=n_cl)
    cnt_b = np.bincount(cl[in_b], weights=gn[in_b], minlength=n_cl)
    g_c = int(np.count_nonzero(cnt_c))
    g_b = int(np.count_nonzero(cnt_b))
    g_all = int(np.count_nonzero(cnt_c + cnt_b))
    corr = g_all / (g_all - 1.0) if g_all > 1 else 1.0
    n_c_tot = float(n1.sum())
    n_b_tot = float(n0.sum())
    mean_c = float(s[:, 1].sum() / n_c_tot) if n_c_tot > 0 else math.nan
    mean_b = float(s[:, 0].sum() / n_b_tot) if n_b_tot > 0 else math.nan
    safe0 = np.maximum(n0, 1.0)
    safe1 = np.maximum(n1, 1.0)
    pt = (s + 0.5) / (n + 1.0) if binary else None
    h = np.minimum(gn / np.maximum(n.reshape(-1)[key], 1.0), 1.0 - 1e-9)
    scaled = resid / np.sqrt(1.0 - h)
    out: list[DiffEstimate | None] = []
    for c in cs:
        theta = float(np.sum(w * (mu[:, 1] - c * mu[:, 0])))
        coef = np.empty((n_st, 2))
        coef[:, 0] = np.where(valid, -c * w / safe0, 0.0)
        coef[:, 1] = np.where(valid, w / safe1, 0.0)
        g = np.bincount(cl, weights=coef.reshape(-1)[key] * scaled, minlength=n_cl)
        var = float(np.dot(g, g)) * corr
        if pt is not None:
            var = max(var, float(np.sum(coef * coef * n * pt * (1.0 - pt))))
        out.append(DiffEstimate(estimate=theta, variance=var, n_canary=int(n1[valid].sum()),
                                n_baseline=int(n0[valid].sum()), clusters_canary=g_c, clusters_baseline=g_b,
                                mean_canary=mean_c, mean_baseline=mean_b))
    return out
