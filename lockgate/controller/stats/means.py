"""Differences of means: the test shared by rate, mean and class metrics (:func:`difference_verdict`), and
:func:`evaluate_mean`."""

from __future__ import annotations

import math

import numpy as np

from .arms import (DEFAULT_MIN_CLUSTERS, Groups, Prepared, arm_mean, arrays_per_request, check_alpha, cluster_df,
                   counts, estimate, estimates, prepare, too_few_users, undecided)
from .boundaries import confidence_bounds
from .planning import samples_needed
from .verdict import MetricSpec, MetricVerdict, allowed_text, finite_or_none, fmt_num, fmt_signed

__all__ = ["difference_verdict", "evaluate_mean"]


def difference_verdict(
    spec: MetricSpec,
    alpha: float,
    p: Prepared | Groups,
    *,
    binary: bool,
    min_clusters: int,
    extra_harm: tuple[bool, str] | None = None,
    extra_ni: tuple[bool, str] | None = None,
    details: dict | None = None,
) -> MetricVerdict:
    """Shared logic for rate, mean and class metrics (difference of means).

    One contrast, one confidence sequence, one line.  ``absolute``: the contrast
    is ``theta = canary - baseline`` and the line is ``+delta`` (harmful
    increase) or ``-delta`` (harmful decrease).  ``relative``: the contrast is
    ``canary - (1 + h rel) x baseline`` (a ratio of means / rates, tested exactly,
    not by plugging in the baseline estimate) and the line is 0.  ``fail`` when
    the sequence lies entirely beyond the line in the harmful direction,
    ``pass`` when it lies entirely on the other side.  The reported interval is
    the same sequence on the ``canary - baseline`` scale, so "interval beyond
    ``allowed``" reads exactly as the decision.
    """
    h = spec.sign
    relative = spec.allowed_mode == "relative"
    c = 1.0 + h * spec.allowed if relative else 1.0
    if relative and c != 1.0:
        est, est_r = estimates(p, (1.0, c), binary)
    else:
        est = estimate(p, 1.0, binary)
        est_r = est
    arm_counts = counts(p)
    n_b, n_c, gb, gc = arm_counts
    if est is None or est_r is None:
        return undecided(
            spec, alpha, "no stage has observations in both canary and baseline yet", p,
            baseline=finite_or_none(arm_mean(p, 0)) if n_b else None,
            canary=finite_or_none(arm_mean(p, 1)) if n_c else None,
        )
    base, can = est.mean_baseline, est.mean_canary
    # est.estimate - est_r.estimate = (c - 1) x (stratum-weighted baseline mean) = h x delta_abs
    delta_abs = abs(est.estimate - est_r.estimate) if relative else spec.allowed
    if not math.isfinite(delta_abs):
        delta_abs = 0.0
    tau = delta_abs if delta_abs > 0 else math.sqrt(est_r.variance)
    df = cluster_df(p)
    lcb_r, ucb_r = confidence_bounds(est_r.estimate, est_r.variance, tau, alpha, df=df)
    line_r = 0.0 if relative else h * delta_abs  # the allowance on the decision contrast's scale
    shift = est.estimate - est_r.estimate  # decision contrast -> canary - baseline scale
    lcb, ucb = lcb_r + shift, ucb_r + shift
    line = h * delta_abs
    if h > 0:
        harm_cr, ni_cr = lcb_r > line_r, ucb_r < line_r
    else:
        harm_cr, ni_cr = ucb_r < line_r, lcb_r > line_r
    contrast = f"canary - {c:.4g} x baseline" if relative else "canary - baseline"
    allowed_txt = allowed_text(spec, delta_abs)
    n_needed = (samples_needed(delta_abs, alpha, var_per_canary_obs=est_r.variance * max(est_r.n_canary, 1), tau=tau)
                if delta_abs > 0 else None)

    det = {"tau": tau, "lcb": lcb, "ucb": ucb, "estimate": est.estimate, "variance": est_r.variance,
           "contrast": contrast, "contrast_estimate": est_r.estimate, "contrast_lcb": lcb_r, "contrast_ucb": ucb_r,
           "rollback_line": line}
    if details:
        det.update(details)
    harm = harm_cr and (extra_harm[0] if extra_harm else True)
    ni = ni_cr and (extra_ni[0] if extra_ni else True)
    interval_txt = f"[{fmt_signed(lcb, spec.unit)}, {fmt_signed(ucb, spec.unit)}]"
    arms_txt = f"canary {fmt_num(can, spec.unit)} vs baseline {fmt_num(base, spec.unit)}"
    if relative:
        beyond = (f"{contrast} {'>=' if h > 0 else '<='} {fmt_signed(lcb_r if h > 0 else ucb_r, spec.unit)} "
                  f"{'>' if h > 0 else '<'} 0")
        within = (f"{contrast} {'<=' if h > 0 else '>='} {fmt_signed(ucb_r if h > 0 else lcb_r, spec.unit)} "
                  f"{'<' if h > 0 else '>'} 0")
    else:
        beyond = (f"canary - baseline {'>=' if h > 0 else '<='} {fmt_signed(lcb if h > 0 else ucb, spec.unit)}, "
                  f"beyond the allowed {allowed_txt}")
        within = (f"canary - baseline {'<=' if h > 0 else '>='} {fmt_signed(ucb if h > 0 else lcb, spec.unit)}, "
                  f"within the allowed {allowed_txt}")
    too_few = too_few_users(p, gb, gc, min_clusters)
    if too_few:
        verdict = "not-yet"
        reason = f"{too_few}; {arms_txt}"
    elif harm:
        verdict = "fail"
        reason = (f"worse beyond the allowance ({spec.harmful} is harmful, allowed {allowed_txt}): {arms_txt}; "
                  f"time-uniform bound {beyond} at alpha={alpha:.4g}")
        if extra_harm:
            reason += f"; {extra_harm[1]}"
    elif ni:
        verdict = "pass"
        reason = f"within the allowance: {arms_txt}; time-uniform bound {within} at alpha={alpha:.4g}"
        if extra_ni:
            reason += f"; {extra_ni[1]}"
    else:
        verdict = "not-yet"
        reason = (
            f"neither beyond nor within the allowance shown yet: {arms_txt}; canary - baseline in {interval_txt} "
            f"(alpha={alpha:.4g} per side), allowed {allowed_txt}"
        )
        if harm_cr and extra_harm and not extra_harm[0]:
            reason += f"; cluster-robust bound is beyond the allowance but {extra_harm[1]}"
        if ni_cr and extra_ni and not extra_ni[0]:
            reason += f"; cluster-robust bound is within the allowance but {extra_ni[1]}"
        if n_needed is not None:
            reason += f"; ~{n_needed} canary observations needed to show it within the allowance at the current variance (have {n_c})"
    return MetricVerdict.judged(
        spec, alpha, arm_counts, verdict=verdict, reason=reason, baseline=finite_or_none(base),
        canary=finite_or_none(can), difference=finite_or_none(est.estimate),
        interval=(finite_or_none(lcb), finite_or_none(ucb)), allowed=float(delta_abs), n_needed=n_needed, details=det,
    )



def evaluate_mean(
    values: np.ndarray,
    is_canary: np.ndarray,
    cluster: np.ndarray,
    spec: MetricSpec,
    alpha: float,
    *,
    stratum: np.ndarray | None = None,
    min_clusters: int = DEFAULT_MIN_CLUSTERS,
) -> MetricVerdict:
    """Difference of means (output tokens, scores, entropy, similarity, ...).

    Confidence sequence for ``mean_canary - mean_baseline`` from the stratified
    cluster-robust estimator (:mod:`.estimators`) with the one-sided
    normal-mixture boundary (:func:`~.boundaries.confidence_bounds`).  Pass
    ``stratum`` (e.g. the canary share / stage) to compare within stages.
    """
    alpha = check_alpha(alpha)
    if spec.kind != "mean":
        raise ValueError(f"{spec.name}: evaluate_mean needs kind='mean'")
    v = np.asarray(values, dtype=float).reshape(-1)
    arm, cl, st = arrays_per_request(v.size, is_canary, cluster, stratum)
    keep = np.isfinite(v)
    p = prepare(v, arm, cl, st, keep)
    if p.y.size == 0:
        return undecided(spec, alpha, "no measured values yet", None)
    return difference_verdict(spec, alpha, p, binary=False, min_clusters=min_clusters)
