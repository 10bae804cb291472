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
from functools import lru_cache

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr
from scipy.stats import halfnorm, norm
from scipy.stats import t as student_t

__all__ = [
    "log_half_normal_mixture",
    "one_sided_boundary",
    "confidence_bounds",
    "conditional_binomial_log_e",
]

_LOG2 = math.log(2.0)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


@lru_cache(maxsize=8)
def _halfnormal_grid(n_grid: int) -> np.ndarray:
    """Equal-probability half-normal quantiles (bin midpoints) -- a fixed discrete prior."""
    return halfnorm.ppf((np.arange(n_grid) + 0.5) / n_grid)


def log_half_normal_mixture(s: float, info: float, rho: float) -> float:
    """log of the one-sided (half-normal) normal-mixture martingale.

    ``s``: score (sum of centred increments, in information units),
    ``info``: intrinsic time / information (1/variance of the estimator),
    ``rho``: prior precision of the mixing distribution (1/tau^2, tau in the
    metric's units).
    """
    v = info + rho
    x = s / math.sqrt(v)
    log_phi = math.log1p(-0.5 * math.erfc(x * _INV_SQRT2)) if x >= 0.0 else float(log_ndtr(x))
    return _LOG2 + 0.5 * math.log(rho / v) + s * s / (2.0 * v) + log_phi


#: Multipliers of the effect scale ``tau`` over which the normal mixture is
#: itself mixed (equal weights).  A mixture of e-processes is an e-process, so
#: this costs only ``log(3)`` in the threshold while keeping the boundary
#: reasonably tight from "effects of size tau" up to "effects 16x larger"
#: (large regressions are caught early, small ones eventually).
TAU_MULTIPLIERS: tuple[float, ...] = (1.0, 4.0, 16.0)


def _log_mix(s: float, info: float, rhos: tuple[float, ...]) -> float:
    vals = [log_half_normal_mixture(s, info, r) for r in rhos]
    m = max(vals)
    return m + math.log(sum(math.exp(v - m) for v in vals) / len(vals))


def _single_bracket(info: float, rho: float, la: float) -> tuple[float, float]:
    v = info + rho
    half_log = 0.5 * math.log(v / rho)
    # log Phi(.) in [-log 2, 0] for s >= 0 gives a bracket.
    hi = math.sqrt(2.0 * v * (la + half_log))
    lo_sq = 2.0 * v * (la - _LOG2 + half_log)
    return (math.sqrt(lo_sq) if lo_sq > 0.0 else 0.0), hi


def one_sided_boundary(info: float, rho: float | tuple[float, ...], alpha: float) -> float:
    """Smallest score ``s >= 0`` at which the (mixed) half-normal mixture reaches ``1/alpha``.

    ``rho`` is one prior precision or a tuple of them (equal-weight mixture).
    The crossing probability of ``S_I >= one_sided_boundary(I, rho, alpha)`` for
    any ``I`` (uniformly over time) is at most ``alpha`` for a driftless
    Brownian motion (Ville's inequality on the mixture martingale).
    """
    if not (info > 0.0) or not math.isfinite(info):
        return math.inf
    if not (0.0 < alpha < 1.0):
        raise ValueError("alpha must be in (0, 1)")
    rhos = (float(rho),) if isinstance(rho, (int, float)) else tuple(float(r) for r in rho)
    la = -math.log(alpha)
    k = len(rhos)
    # mixture >= M_j / k  ->  boundary <= min_j b_j(alpha / k);  mixture <= max_j M_j -> boundary >= min_j b_j(alpha)
    lo = min(_single_bracket(info, r, la)[0] for r in rhos)
    hi = min(_single_bracket(info, r, la + math.log(k))[1] for r in rhos)

    def f(s: float) -> float:
        return _log_mix(s, info, rhos) - la

    if f(lo) >= 0.0:
        return lo
    if hi <= lo:
        return hi
    return brentq(f, lo, hi, xtol=1e-10 * max(hi, 1e-300), rtol=1e-10)


def confidence_bounds(
    theta_hat: float,
    var: float,
    tau: float,
    alpha: float,
    multipliers: tuple[float, ...] = TAU_MULTIPLIERS,
    df: float | None = None,
) -> tuple[float, float]:
    """Time-uniform one-sided bounds ``(lcb, ucb)`` for ``theta``, each at level ``alpha``.

    ``P(exists t: lcb_t > theta) <= alpha`` and ``P(exists t: ucb_t < theta) <= alpha``
    (asymptotically, for an estimator whose score process is approximately a
    Brownian motion in information time).  ``tau`` is the scale, in the metric's
    units, of the effects the mixture is tuned to (we use the allowed change);
    the half-normal prior scales are ``tau * multipliers``.
    Together ``(lcb, ucb)`` is a two-sided ``1 - 2 alpha`` confidence sequence.

    ``df``: degrees of freedom of the variance estimate (e.g. effective users - 1).  The boundary
    assumes a known variance; with few effective clusters the sandwich variance is itself noisy and
    the studentised score is heavier-tailed than normal.  When ``df`` is given the half-width is
    widened by ``t_df / z`` at the boundary's own tail probability (the usual small-sample
    t-correction of cluster-robust inference); it vanishes as ``df`` grows.
    """
    if not (var > 0.0) or not math.isfinite(var) or not math.isfinite(theta_hat):
        return (-math.inf, math.inf)
    if not (tau > 0.0) or not math.isfinite(tau):
        tau = math.sqrt(var)
    info = 1.0 / var
    rhos = tuple(1.0 / (tau * m) ** 2 for m in multipliers)
    b = one_sided_boundary(info, rhos, alpha)
    half = b * var
    if df is not None and math.isfinite(half):
        half *= t_inflation(b * math.sqrt(var), df)
    return (theta_hat - half, theta_hat + half)


def t_inflation(z: float, df: float) -> float:
    """``t_df^-1(Phi(z)) / z``: how much wider a t-calibrated bound is than a normal one at level ``z``."""
    if not (z > 0.0) or not math.isfinite(z):
        return 1.0
    if not (df > 0.0):
        return math.inf
    return float(student_t.isf(norm.sf(z), df)) / z


@lru_cache(maxsize=32)
def _dimensionless_table(alpha: float, multipliers: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """log u grid and log b~(u) for the scale-free boundary (tau = 1)."""
    log_u = np.linspace(math.log(1e-8), math.log(1e16), 881)
    rhos = tuple(1.0 / (m * m) for m in multipliers)
    log_b = np.array([math.log(one_sided_boundary(math.exp(lu), rhos, alpha)) for lu in log_u])
    return log_u, log_b


def half_width_table(info_tau2: np.ndarray, alpha: float, multipliers: tuple[float, ...] = TAU_MULTIPLIERS) -> np.ndarray:
    """Vectorised ``b(I) * V * tau`` as a function of ``u = I tau^2`` (for planning only).

    The boundary is scale free: ``b(I; tau) = b~(I tau^2) / tau``, so the
    half-width of the confidence sequence is ``b~(u) / (tau I)``; this returns
    ``b~(u) / u`` (multiply by ``tau`` to get metric units), interpolated in
    log-log space from an exact table (relative error ~1e-4).  Decisions never
    use this table; they call :func:`one_sided_boundary` directly.
    """
    log_u, log_b = _dimensionless_table(float(alpha), tuple(multipliers))
    lu = np.log(np.asarray(info_tau2, dtype=float))
    return np.exp(np.interp(lu, log_u, log_b) - lu)


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
    cluster-robust test must be used alongside (see ``rates.evaluate_rate``).
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
    z = _halfnormal_grid(int(n_grid))
    log_r = math.log(rho0) + direction * tau_log * z  # (J,)
    r = np.exp(log_r)[:, None]

    def ll(rr: np.ndarray, lr: np.ndarray) -> np.ndarray:
        return (x[None, :] * lr[:, None] - e[None, :] * np.log(rr * s[None, :] + 1.0 - s[None, :])).sum(axis=1)

    d = ll(r, log_r) - ll(np.array([[rho0]]), np.array([math.log(rho0)]))[0]
    m = float(d.max())
    return m + math.log(float(np.exp(d - m).sum())) - math.log(n_grid)
