"""Rate metrics (0/1 events per request: errors, refusals, timeouts): :func:`evaluate_rate`."""

from __future__ import annotations

import math

import numpy as np

from .arms import DEFAULT_MIN_CLUSTERS, Groups, Prepared, arrays_per_request, cell_sums, check_alpha, prepare, undecided
from .boundaries import conditional_binomial_log_e
from .means import difference_verdict
from .verdict import MetricSpec, MetricVerdict

__all__ = ["evaluate_rate", "rate_verdict"]


def evaluate_rate(
    events: np.ndarray,
    is_canary: np.ndarray,
    share: np.ndarray,
    cluster: np.ndarray,
    spec: MetricSpec,
    alpha: float,
    *,
    stratum: np.ndarray | None = None,
    min_clusters: int = DEFAULT_MIN_CLUSTERS,
) -> MetricVerdict:
    """Rate of (rare) events per request: errors, refusals, timeouts, ...

    ``events``: bool/0-1 per request (float with NaN = not measured).
    ``share``: canary share in force for each request; requests are compared
    within stages of equal share (``stratum`` overrides the grouping).

    Two tests, both anytime-valid, must agree before a verdict:

    1. the conditional-binomial mixture SPRT on event counts
       (:func:`~.boundaries.conditional_binomial_log_e`): given an event in
       stage ``k``, P(canary) = ``s_k`` (the stage's realised canary share of
       measured requests) if the per-request rates are equal.  Exact and
       accurate with few events, but assumes independent requests.
    2. the stratified cluster-robust difference of rates with the
       normal-mixture confidence sequence (valid with correlated requests of
       sticky users, asymptotic).

    Requiring both means the false-decision probability is at most the smaller
    of the two tests' error probabilities, so it stays <= alpha whichever
    assumption (few events / correlated users) is the binding one.
    Both nulls sit at the allowance: in ``relative`` mode the rate ratio
    ``1 + allowed`` (harm: ratio > it shown; non-inferiority: ratio < it shown),
    with both tests; with ``allowed = 0`` at ratio 1, with both tests; in
    ``absolute`` mode (``allowed`` points) the difference ``allowed``, with the
    cluster-robust test alone (a difference of points is not a fixed ratio).
    """
    alpha = check_alpha(alpha)
    if spec.kind != "rate":
        raise ValueError(f"{spec.name}: evaluate_rate needs kind='rate'")
    ev = np.asarray(events).reshape(-1)
    n = ev.size
    arm, cl, st = arrays_per_request(n, is_canary, cluster, share if stratum is None else stratum)
    if ev.dtype.kind == "f":
        keep = np.isfinite(ev)
    else:
        keep = np.ones(n, dtype=bool)
    y = ev.astype(float) if ev.dtype.kind != "f" else ev
    if np.any((y[keep] != 0.0) & (y[keep] != 1.0)):
        raise ValueError(f"{spec.name}: rate events must be 0/1 (or NaN for not measured)")
    p = prepare(y, arm, cl, st, keep)
    if p.y.size == 0:
        return undecided(spec, alpha, "no measured requests yet", None)
    return rate_verdict(spec, alpha, p, min_clusters=min_clusters)


def rate_verdict(spec: MetricSpec, alpha: float, p: Prepared | Groups, *,
                 min_clusters: int = DEFAULT_MIN_CLUSTERS) -> MetricVerdict:
    """:func:`evaluate_rate` on rows already kept and grouped (a :class:`~.arms.Prepared` or the per-user sums
    of a :class:`~.arms.Groups`; values 0/1, at least one row)."""
    # count test, per stage
    nk, ek = cell_sums(p)
    both = (nk[:, 0] > 0) & (nk[:, 1] > 0)
    s_k = np.where(both, nk[:, 1] / np.maximum(nk.sum(axis=1), 1.0), 0.0)
    x_k = np.where(both, ek[:, 1], 0.0)
    e_k = np.where(both, ek.sum(axis=1), 0.0)
    h = spec.sign
    base_rate = float(ek[:, 0].sum() / nk[:, 0].sum()) if nk[:, 0].sum() > 0 else 0.0
    if spec.allowed_mode == "relative" and spec.allowed > 0:
        tau_log = abs(math.log1p(h * spec.allowed))
    elif spec.allowed > 0 and base_rate > 0:
        tau_log = abs(math.log1p(h * min(spec.allowed / base_rate, 0.99 if h < 0 else 1e9)))
    else:
        tau_log = math.log(2.0)
    la = math.log(1.0 / alpha)
    details: dict = {
        "events_canary": float(ek[:, 1].sum()),
        "events_baseline": float(ek[:, 0].sum()),
    }
    extra_harm = extra_ni = None
    # The exact count test speaks about rate *ratios*: it runs for relative allowances (null at
    # ratio 1 + h rel) and for "any harm" (allowed 0: ratio 1). An absolute allowance of d points
    # is not a fixed ratio; there the cluster-robust sequence decides alone (with its binomial floor).
    if spec.allowed_mode == "relative" or spec.allowed == 0.0:
        rho0 = 1.0 + h * spec.allowed if spec.allowed_mode == "relative" else 1.0
        log_e_harm = conditional_binomial_log_e(x_k, e_k, s_k, direction=h, rho0=rho0, tau_log=tau_log)
        log_e_ni = conditional_binomial_log_e(x_k, e_k, s_k, direction=-h, rho0=rho0, tau_log=tau_log)
        e_h, e_n = math.exp(min(log_e_harm, 700.0)), math.exp(min(log_e_ni, 700.0))
        details.update({"count_test_rate_ratio": rho0, "count_test_e_harm": e_h, "count_test_e_noninferiority": e_n})
        extra_harm = (
            log_e_harm >= la,
            f"count test against rate ratio {rho0:.4g}: e={e_h:.3g} vs 1/alpha={1 / alpha:.3g} "
            f"({int(details['events_canary'])} canary / {int(details['events_baseline'])} baseline events)",
        )
        extra_ni = (log_e_ni >= la, f"count test against rate ratio {rho0:.4g}: e={e_n:.3g} vs 1/alpha={1 / alpha:.3g}")
    return difference_verdict(
        spec, alpha, p, binary=True, min_clusters=min_clusters,
        extra_harm=extra_harm, extra_ni=extra_ni, details=details,
    )
