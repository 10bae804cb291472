"""Quantile metrics (latency p50/p95/p99, ttft p95) reduced to exceedance counts: :func:`evaluate_quantile`."""

from __future__ import annotations

import math

import numpy as np

from .arms import (DEFAULT_MIN_CLUSTERS, arrays_per_request, check_alpha, cluster_df, counts, estimate, prepare,
                   too_few_users, undecided)
from .boundaries import confidence_bounds
from .estimators import DiffEstimate
from .planning import samples_needed
from .verdict import MetricSpec, MetricVerdict, allowed_text, finite_or_none, fmt_num, fmt_signed

__all__ = ["evaluate_quantile"]


def evaluate_quantile(
    values: np.ndarray,
    is_canary: np.ndarray,
    cluster: np.ndarray,
    spec: MetricSpec,
    alpha: float,
    *,
    stratum: np.ndarray | None = None,
    min_clusters: int = DEFAULT_MIN_CLUSTERS,
    compute_interval: bool = True,
) -> MetricVerdict:
    """Quantile metrics (latency p50/p95/p99, ttft p95) reduced to exceedance counts.

    For harmful increases and quantile level ``p`` let ``q_b`` be the baseline's
    empirical ``p``-quantile.  The allowance says where the line is:

    * ``absolute`` / ``relative`` (a shift ``d`` of the quantile, ms or a
      fraction of ``q_b``):  ``q_c <= q_b + d``  <=>  ``P_c(X > q_b + d) <= 1 - p``.
      The contrast is ``mean_c[X > q_b + d] - mean_b[X > q_b]``.
    * ``exceedance_ratio`` ``r``: the share of canary requests beyond the
      baseline's quantile may be at most ``r`` times the baseline's:
      contrast ``mean_c[X > q_b] - r x mean_b[X > q_b]``.

    ``fail`` when the contrast's time-uniform lower bound is above 0 (worse than
    the allowance), ``pass`` when its upper bound is below 0 (within it).  The
    baseline term both estimates ``1 - p`` and carries the sampling noise of
    ``q_b`` (Bahadur: ``F(q_b_hat) - p ~ -(F_b(q_b)-p)``, variance
    ``p(1-p)/n_b``), which is why the two-sample form is used.  Harmful
    decreases are handled by mirroring (``X -> -X``, ``p -> 1-p``).

    ``interval`` (shift modes): on the quantile-shift scale (metric units, e.g.
    ms), by inverting the exceedance test over shifts ``d`` (bisection on the
    canary order statistics); ``allowed`` is the shift ``d``.  For
    ``exceedance_ratio``: on the exceedance-share difference (canary - baseline),
    with ``allowed = (r - 1) x`` the baseline's share.  ``compute_interval=False``
    skips the shift inversion (verdict unchanged; interval then ``(None, None)``).
    """
    alpha = check_alpha(alpha)
    if spec.kind != "quantile":
        raise ValueError(f"{spec.name}: evaluate_quantile needs kind='quantile'")
    v = np.asarray(values, dtype=float).reshape(-1)
    arm, cl, st = arrays_per_request(v.size, is_canary, cluster, stratum)
    keep = np.isfinite(v)
    h = spec.sign
    x_all = v if h > 0 else -v
    pq = spec.quantile if h > 0 else 1.0 - spec.quantile
    p = prepare(x_all, arm, cl, st, keep)
    x = p.y
    is_c = p.arm == 1
    arm_counts = counts(p)
    n_b, n_c, gb, gc = arm_counts
    if n_b == 0 or n_c == 0:
        return undecided(spec, alpha, "need measured values in both canary and baseline", p)
    xb = x[~is_c]
    xc = x[is_c]
    qb = float(np.quantile(xb, pq))
    qc = float(np.quantile(xc, pq))
    base_q, can_q = (qb, qc) if h > 0 else (-qb, -qc)
    ratio_mode = spec.allowed_mode == "exceedance_ratio"
    if ratio_mode:
        shift_abs = 0.0
    else:
        shift_abs = spec.allowed * abs(base_q) if spec.allowed_mode == "relative" else spec.allowed
    ind_b = (xb > qb).astype(float)
    exc_b = float(ind_b.mean())
    exc_c0 = float(np.mean(xc > qb))
    r = spec.allowed if ratio_mode else 1.0
    # exceedance-share change corresponding to the allowance (mixture scale and planning)
    if ratio_mode:
        gap = (r - 1.0) * exc_b
    else:
        gap = exc_b - float(np.mean(xb > qb + shift_abs)) if shift_abs > 0 else 0.0

    def est_at(d: float, c: float = 1.0) -> DiffEstimate | None:
        y = np.empty_like(x)
        y[~is_c] = ind_b
        y[is_c] = xc > qb + d
        return estimate(p, c, True, y)

    e1 = est_at(shift_abs, r)
    if e1 is None:
        return undecided(spec, alpha, "no stage has observations in both canary and baseline yet", p)
    tau = gap if gap > 0 else math.sqrt(e1.variance)
    df = cluster_df(p)
    l1, u1 = confidence_bounds(e1.estimate, e1.variance, tau, alpha, df=df)
    harm, ni = l1 > 0.0, u1 < 0.0
    n_needed = samples_needed(gap, alpha, var_per_canary_obs=e1.variance * max(e1.n_canary, 1), tau=tau) if gap > 0 else None

    if ratio_mode:
        # the same sequence on the exceedance-share difference scale: + (r - 1) x weighted baseline share
        e0 = est_at(0.0) if r != 1.0 else e1
        to_diff = e0.estimate - e1.estimate
        interval = (finite_or_none(l1 + to_diff), finite_or_none(u1 + to_diff))
        allowed_line = abs(to_diff)
        shift_txt = ""
    else:
        interval, allowed_line = (None, None), float(shift_abs)
        if compute_interval:
            interval = _shift_interval(est_at, xc, qb, tau, alpha, h, df)
        shift_txt = ("" if not compute_interval else
                     f"; quantile shift in [{fmt_signed(interval[0] if interval[0] is not None else -math.inf, spec.unit)}, "
                     f"{fmt_signed(interval[1] if interval[1] is not None else math.inf, spec.unit)}]")

    pct = f"p{spec.quantile * 100:g}"
    arms_txt = f"{pct} canary {fmt_num(can_q, spec.unit)} vs baseline {fmt_num(base_q, spec.unit)}"
    side = ">" if h > 0 else "<"
    exc_txt = f"canary share {side} baseline {pct} = {exc_c0:.4g} vs baseline {exc_b:.4g}"
    if ratio_mode:
        line_txt = f"{r:.4g} x the baseline's share {side} its {pct} (allowed exceedance ratio)"
        contrast = f"canary share {side} baseline {pct} - {r:.4g} x baseline share"
    else:
        line_txt = f"{1 - spec.quantile if h > 0 else spec.quantile:.4g} at the baseline {pct} {'+' if h > 0 else '-'} allowed ({fmt_num(shift_abs, spec.unit)})"
        contrast = f"canary share {side} baseline {pct} {'+' if h > 0 else '-'} allowed - baseline share {side} {pct}"
    too_few = too_few_users(p, gb, gc, min_clusters)
    if too_few:
        verdict = "not-yet"
        reason = f"{too_few}; {arms_txt}"
    elif harm:
        verdict = "fail"
        reason = (
            f"worse beyond the allowance ({spec.harmful} is harmful): {arms_txt}; {exc_txt}; canary share above "
            f"{line_txt} shown: time-uniform lower bound {fmt_signed(l1)} > 0 on {contrast} at alpha={alpha:.4g}{shift_txt}"
        )
    elif ni:
        verdict = "pass"
        reason = (
            f"within the allowance: {arms_txt}; canary share below {line_txt} shown: time-uniform upper bound "
            f"{fmt_signed(u1)} < 0 on {contrast} at alpha={alpha:.4g}{shift_txt}"
        )
    else:
        verdict = "not-yet"
        reason = (
            f"neither beyond nor within the allowance shown yet: {arms_txt}; {exc_txt}; bounds [{fmt_signed(l1)}, {fmt_signed(u1)}] "
            f"on {contrast} (alpha={alpha:.4g} per side), allowed {allowed_text(spec, shift_abs)}{shift_txt}"
        )
        if n_needed is not None:
            reason += f"; ~{n_needed} canary observations needed to show it within the allowance at the current variance (have {n_c})"
    return MetricVerdict.judged(
        spec, alpha, arm_counts, verdict=verdict, reason=reason, baseline=finite_or_none(base_q),
        canary=finite_or_none(can_q),
        difference=finite_or_none(exc_c0 - exc_b) if ratio_mode else finite_or_none(can_q - base_q),
        interval=interval, allowed=allowed_line, n_needed=n_needed, unit="" if ratio_mode else spec.unit,
        details={
            "exceedance_threshold": float(base_q),
            "exceedance_canary": exc_c0,
            "exceedance_baseline": exc_b,
            "contrast": contrast,
            "contrast_lcb": l1,
            "contrast_ucb": u1,
            "exceedance_lcb_harm": l1,
            "exceedance_ucb_noninferiority": u1,
            "allowed_exceedance_change": gap,
            "interval_scale": "exceedance share difference" if ratio_mode else "quantile shift",
            "rollback_line": allowed_line if h > 0 else -allowed_line,
            "tau": tau,
        },
    )


def _shift_interval(est_at, xc: np.ndarray, qb: float, tau: float, alpha: float, h: int, df: float
                    ) -> tuple[float | None, float | None]:
    """Time-uniform bounds on the quantile shift, by inverting the exceedance test over shifts."""
    cand = np.unique(xc) - qb

    def lcb_pos(d: float) -> bool:
        e = est_at(d)
        return confidence_bounds(e.estimate, e.variance, tau, alpha, df=df)[0] > 0.0

    def ucb_neg(d: float) -> bool:
        e = est_at(d)
        return confidence_bounds(e.estimate, e.variance, tau, alpha, df=df)[1] < 0.0

    # largest candidate shift still significantly exceeded (lower bound on the shift)
    lo_shift = -math.inf
    lo_i, hi_i = 0, cand.size - 1
    if lcb_pos(float(cand[0]) - 1e-12 * max(1.0, abs(float(cand[0])))):
        lo_shift = float(cand[0])
        if lcb_pos(float(cand[0])):
            while lo_i < hi_i:
                mid = (lo_i + hi_i + 1) // 2
                if lcb_pos(float(cand[mid])):
                    lo_i = mid
                else:
                    hi_i = mid - 1
            lo_shift = float(cand[lo_i])
    # smallest candidate shift significantly not exceeded (upper bound on the shift)
    hi_shift = math.inf
    lo_i, hi_i = 0, cand.size - 1
    if ucb_neg(float(cand[-1])):
        while lo_i < hi_i:
            mid = (lo_i + hi_i) // 2
            if ucb_neg(float(cand[mid])):
                hi_i = mid
            else:
                lo_i = mid + 1
        hi_shift = float(cand[lo_i])
    if h < 0:
        lo_shift, hi_shift = -hi_shift, -lo_shift
    return finite_or_none(lo_shift), finite_or_none(hi_shift)
