"""Planning helpers: sample-size estimates and the ``auto`` allowed change."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .boundaries import half_width_table

__all__ = [
    "samples_needed",
    "hours_needed",
    "AutoAllowed",
    "auto_allowed",
]


def samples_needed(
    delta: float,
    alpha: float,
    *,
    var_per_canary_obs: float | None = None,
    sd_canary: float | None = None,
    sd_baseline: float | None = None,
    share: float | None = None,
    design_effect: float = 1.0,
    true_diff: float = 0.0,
    tau: float | None = None,
    max_n: int = 10**12,
) -> int | None:
    """Canary observations needed before non-inferiority can be shown.

    The non-inferiority test passes once the time-uniform bound
    ``theta_hat + b(I) * V`` drops below the allowed change ``delta``.  With the
    estimator's variance scaling as ``V(n) = v1 / n`` (``n`` = canary
    observations) and a true difference ``true_diff`` (0 = "no change"), the
    expected bound crosses ``delta`` at the smallest ``n`` with

        b(n / v1) * v1 / n  <=  delta - true_diff.

    ``v1`` (variance contributed per canary observation, both arms included) is
    either given as ``var_per_canary_obs`` (e.g. ``V_now * n_canary_now`` from a
    running evaluation -- this already contains the cluster design effect and
    the current baseline/canary split) or built from
    ``design_effect * (sd_canary^2 + sd_baseline^2 * share / (1 - share))``
    (baseline observations arriving at ``(1-share)/share`` per canary one).

    Returns the *total* number of canary observations (not the additional
    number), or ``None`` if ``delta <= true_diff`` (never provable).
    """
    gap = float(delta) - float(true_diff)
    if not (gap > 0.0):
        return None
    if var_per_canary_obs is None:
        if sd_canary is None or share is None:
            raise ValueError("give var_per_canary_obs or (sd_canary, share[, sd_baseline])")
        if not (0.0 < share < 1.0):
            raise ValueError("share must be in (0, 1)")
        sdb = sd_canary if sd_baseline is None else sd_baseline
        v1 = design_effect * (sd_canary**2 + sdb**2 * share / (1.0 - share))
    else:
        v1 = float(var_per_canary_obs)
    if not (v1 > 0.0) or not math.isfinite(v1):
        return None
    tau = float(delta) if tau is None else float(tau)
    if not (tau > 0.0):
        tau = gap

    # half-width of the CS after n canary observations: b~(u)/u * tau with
    # u = I tau^2 = n tau^2 / v1 (scale-free table, vectorised over n)
    n_grid = np.exp(np.linspace(0.0, math.log(max_n), 1500))
    hw = half_width_table(n_grid * tau * tau / v1, alpha) * tau
    ok = np.nonzero(hw <= gap)[0]
    if ok.size == 0:
        return None
    i = int(ok[0])
    if i == 0:
        return 1
    # refine between the two grid points (the half-width is decreasing there)
    lo, hi = float(n_grid[i - 1]), float(n_grid[i])
    fine = np.linspace(lo, hi, 32)
    hw_f = half_width_table(fine * tau * tau / v1, alpha) * tau
    j = int(np.nonzero(hw_f <= gap)[0][0]) if np.any(hw_f <= gap) else fine.size - 1
    return int(math.ceil(fine[j]))


def hours_needed(n_needed: int | None, n_canary_now: int, requests_per_hour: float, share: float) -> float | None:
    """Hours of traffic until ``n_needed`` canary observations at ``share`` of ``requests_per_hour``.

    ``requests_per_hour`` counts all requests (canary + baseline) that yield an
    observation of the metric.  Returns 0.0 if already reached, ``None`` if
    unknown/unreachable.
    """
    if n_needed is None or requests_per_hour <= 0 or share <= 0:
        return None
    remaining = max(0, int(n_needed) - int(n_canary_now))
    return remaining / (requests_per_hour * share)


@dataclass(frozen=True)
class AutoAllowed:
    """An allowed change derived from the baseline's own history."""

    value: float
    derivation: str
    n_blocks: int
    block_sd: float
    block_values: tuple[float, ...]

    def to_dict(self) -> dict:
        return {
            "value": float(self.value),
            "derivation": self.derivation,
            "n_blocks": int(self.n_blocks),
            "block_sd": float(self.block_sd),
            "block_values": [float(v) for v in self.block_values],
        }


def auto_allowed(
    values: np.ndarray,
    timestamps: np.ndarray,
    *,
    statistic: str = "mean",
    quantile: float | None = None,
    block_seconds: float = 86400.0,
    k: float = 2.5,
    min_blocks: int = 5,
    min_obs_per_block: int = 30,
    name: str = "metric",
    unit: str = "",
) -> AutoAllowed:
    """Allowed change = ``k`` x the block-to-block standard deviation of the baseline.

    ``values``: stored *baseline* observations (NaN = not measured, dropped);
    ``timestamps``: seconds (any epoch); blocks are ``floor(ts / block_seconds)``
    (default: calendar days in the timestamps' epoch).  ``statistic``:
    ``"mean"`` (also use it for rates: pass 0/1 values) or ``"quantile"`` (with
    ``quantile`` in (0,1)).  Blocks with fewer than ``min_obs_per_block``
    observations are ignored.  Raises ``ValueError`` if fewer than
    ``min_blocks`` usable blocks exist -- then the operator must set the
    allowed change explicitly.

    Rationale: a change smaller than the baseline's own day-to-day wobble is not
    one users can notice or one that a fixed threshold could justify; ``k``
    between 2 and 3 keeps normal variation inside the allowance.
    """
    v = np.asarray(values, dtype=float)
    ts = np.asarray(timestamps, dtype=float)
    if v.shape != ts.shape:
        raise ValueError("values and timestamps must have the same shape")
    m = np.isfinite(v) & np.isfinite(ts)
    v, ts = v[m], ts[m]
    if v.size == 0:
        raise ValueError(f"auto allowed change for {name}: no stored observations")
    blk = np.floor(ts / block_seconds).astype(np.int64)
    order = np.argsort(blk, kind="stable")
    blk, v = blk[order], v[order]
    uniq, start, counts = np.unique(blk, return_index=True, return_counts=True)
    keep = counts >= min_obs_per_block
    if statistic == "mean":
        sums = np.add.reduceat(v, start)
        stats = sums / counts
        label = "mean"
    elif statistic == "quantile":
        if quantile is None or not (0.0 < quantile < 1.0):
            raise ValueError("statistic='quantile' needs quantile in (0, 1)")
        stats = np.array([np.quantile(v[a : a + c], quantile) for a, c in zip(start, counts)])
        label = f"p{quantile * 100:g}"
    else:
        raise ValueError("statistic must be 'mean' or 'quantile'")
    stats = stats[keep]
    nb = int(stats.size)
    if nb < min_blocks:
        raise ValueError(
            f"auto allowed change for {name}: only {nb} blocks of {block_seconds:g}s with "
            f">= {min_obs_per_block} observations (need {min_blocks}); set 'allowed' explicitly"
        )
    sd = float(np.std(stats, ddof=1))
    value = k * sd
    blk_desc = "day" if block_seconds == 86400.0 else ("hour" if block_seconds == 3600.0 else f"{block_seconds:g}s block")
    u = f" {unit}" if unit else ""
    derivation = (
        f"allowed = {k:g} x sd of {nb} per-{blk_desc} baseline {label}s of {name} "
        f"(sd = {sd:.6g}{u}, range {stats.min():.6g}..{stats.max():.6g}{u}) = {value:.6g}{u}"
    )
    return AutoAllowed(value=value, derivation=derivation, n_blocks=nb, block_sd=sd, block_values=tuple(float(x) for x in stats))
