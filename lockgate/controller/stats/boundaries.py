"""Time-uniform boundaries and e-processes.

Everything here is a pure function of sufficient statistics; nothing keeps state
between looks.  Evaluating these functions on every prefix of a growing data set
is valid because each one is (an upper bound on) a nonnegative supermartingale
under the null hypothesis, so Ville's inequality bounds the probability that it
*ever* crosses ``1/alpha``:  P(sup_t M_t >= 1/alpha) <= alpha.

Two building blocks:

* :func:`one_sided_boundary` / :func:`confidence_bounds` -- the one-sided
  normal-mixture (half-normal prior) boundary of Howard et al. (2021) applied to
  an estimator ``theta_hat`` with (estimated) variance ``var``.  In "information
  time" ``I = 1/var`` the score ``S = (theta_hat - theta0) * I`` behaves like a
  Brownian motion with drift ``(theta - theta0)`` (asymptotically, CLT), and

      M(S, I) = 2 sqrt(rho/(I+rho)) exp(S^2 / (2(I+rho))) Phi(S / sqrt(I+rho))

  is the half-normal mixture of the exponential martingales
  ``exp(lambda S - lambda^2 I / 2)``, ``lambda ~ half-N(0, 1/rho)``.
  This is the asymptotic confidence-sequence construction of Waudby-Smith et al.
  with a one-sided mixture.

* :func:`conditional_binomial_log_e` -- the exact mixture SPRT for event counts
  split between canary and baseline (conditional binomial / Poisson split):
  given that an event happened in stratum ``k`` the probability that it came
  from the canary is ``s_k`` under ``rate ratio = 1`` and
  ``rho s_k / (rho s_k + 1 - s_k)`` under rate ratio ``rho``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr, logsumexp
from scipy.stats import halfnorm

__all__ = [
    "log_half_normal_mixture",
    "one_sided_boundary",
    "confidence_bounds",
    "conditional_binomial_log_e",
]

_LOG2 = math.log(2.0)


def log_half_normal_mixture(s: float, info: float, rho: float) -> float:
    """log of the one-sided (half-normal) normal-mixture martingale.

    ``s``: score (sum of centred increments, in information units),
    ``info``: intrinsic time / information (1/variance of the estimator),
    ``rho``: prior precision of the mixing distribution (1/tau^2, tau in the
    metric's units).
    """
    v = info + rho
    return _LOG2 + 0.5 * math.log(rho / v) + s * s / (2.0 * v) + float(log_ndtr(s / math.sqrt(v)))


def one_sided_boundary(info: float, rho: float, alpha: float) -> float:
    """Smallest score ``s >= 0`` at which the half-normal mixture reaches ``1/alpha``.

    The crossing probability of ``S_I >= one_sided_boundary(I, rho, alpha)`` for
    any ``I`` (uniformly over time) is at most ``alpha`` for a driftless
    Brownian motion (Ville's inequality on the mixture martingale).
    """
    if not (info > 0.0) or not math.isfinite(info):
        return math.inf
    if not (0.0 < alpha < 1.0):
        raise ValueError("alpha must be in (0, 1)")
    la = -math.log(alpha)
    v = info + rho
    half_log = 0.5 * math.log(v / rho)
    # log Phi(.) in [-log 2, 0] for s >= 0 gives a bracket.
    hi = math.sqrt(2.0 * v * (la + half_log))
    lo_sq = 2.0 * v * (la - _LOG2 + half_log)
    lo = math.sqrt(lo_sq) if lo_sq > 0.0 else 0.0

    def f(s: float) -> float:
        return log_half_normal_mixture(s, info, rho) - la

    if f(lo) >= 0.0:
        return lo
    if hi <= lo:
        return hi
    return brentq(f, lo, hi, xtol=1e-12 * max(hi, 1e-300), rtol=1e-12)


def confidence_bounds(theta_hat: float, var: float, tau: float, alpha: float) -> tuple[float, float]:
    """Time-uniform one-sided bounds ``(lcb, ucb)`` for ``theta``, each at level ``alpha``.

    ``P(exists t: lcb_t > theta) <= alpha`` and ``P(exists t: ucb_t < theta) <= alpha``
    (asymptotically, for an estimator whose score process is approximately a
    Brownian motion in information time).  ``tau`` is the scale, in the metric's
    units, of the effects the mixture is tuned to (we use the allowed change).
    Together ``(lcb, ucb)`` is a two-sided ``1 - 2 alpha`` confidence sequence.
    """
    if not (var > 0.0) or not math.isfinite(var) or not math.isfinite(theta_hat):
        return (-math.inf, math.inf)
    if not (tau > 0.0) or not math.isfinite(tau):
        tau = math.sqrt(var)
    info = 1.0 / var
    rho = 1.0 / (tau * tau)
    b = one_sided_boundary(info, rho, alpha)
    half = b * var
    return (theta_hat - half, theta_hat + half)


def conditional_binomial_log_e(
    x: np.ndarray,
    e: np.ndarray,
    s: np.ndarray,
    *,
    direction: int,
    rho0: float = 1.0,
    tau_log: float = math.log(2.0),
    n_grid: int = 48,
) -> float:
    """log e-value of the conditional-binomial mixture SPRT.

    ``x[k]``: canary events in stratum ``k``; ``e[k]``: all events in stratum
    ``k``; ``s[k]``: canary share of the exposure in stratum ``k`` (probability
    that an event is a canary event when the per-request rates are equal).

    Null: rate ratio ``canary/baseline`` is ``<= rho0`` (``direction=+1``) or
    ``>= rho0`` (``direction=-1``).  Alternative: a discrete, equal-weight
    half-normal mixture on ``log rho`` beyond ``log rho0`` with scale
    ``tau_log``.  Each alternative's likelihood ratio against ``rho0`` is a
    supermartingale under every null ratio on the other side of ``rho0``
    (monotone likelihood ratio of the Bernoulli per event), so is their
    average; the e-value is therefore valid at any stopping time.

    Events must be conditionally independent given the exposure (e.g.
    independent requests).  With correlated (sticky-user) events the
    cluster-robust test must be used alongside (see ``metrics.evaluate_rate``).
    """
    x = np.asarray(x, dtype=float)
    e = np.asarray(e, dtype=float)
    s = np.asarray(s, dtype=float)
    keep = (e > 0) & (s > 0) & (s < 1)
    if not keep.any():
        return 0.0
    x, e, s = x[keep], e[keep], s[keep]
    if direction not in (1, -1):
        raise ValueError("direction must be +1 or -1")
    z = halfnorm.ppf((np.arange(n_grid) + 0.5) / n_grid)
    log_r = math.log(rho0) + direction * tau_log * z  # (J,)
    r = np.exp(log_r)[:, None]

    def ll(rr: np.ndarray, lr: np.ndarray) -> np.ndarray:
        return (x[None, :] * lr[:, None] - e[None, :] * np.log(rr * s[None, :] + 1.0 - s[None, :])).sum(axis=1)

    ll_alt = ll(r, log_r)
    ll_null = ll(np.array([[rho0]]), np.array([math.log(rho0)]))[0]
    return float(logsumexp(ll_alt - ll_null) - math.log(n_grid))
