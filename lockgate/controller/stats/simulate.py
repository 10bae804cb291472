"""Synthetic rollout streams for tests and benchmarks (pure: all randomness from the given Generator).

A stream is a dict of equal-length numpy arrays, one row per request, in time
order: ``ts`` (seconds since rollout start), ``user`` (int cluster key),
``is_canary``, ``share``, ``stratum`` (stage index), ``error``, ``refusal`` (bool), ``latency_ms``,
``output_tokens`` (NaN when the request errored: not measured), ``score``
(evaluator score, NaN when not sampled), ``pred`` / ``label`` (class ids,
``label`` NaN when never labelled), ``label_ts`` (arrival second, inf = never).

Users are sticky: user ``u`` has a uniform hash ``h_u`` and is routed to the
canary while ``h_u < share``; as the share grows users move from baseline to
canary, never back.  Each user has persistent random effects (error/refusal
propensity, latency, length, score) so that one user's requests are
correlated.  The baseline may drift (time of day) while the share grows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .verdict import MetricSpec

__all__ = ["Effects", "RolloutConfig", "simulate_rollout", "default_specs", "look_times", "prefix", "CLASSES",
           "latency_mult_for_exceedance"]

CLASSES = ("billing", "tech", "fraud")  # ids 0, 1, 2; "fraud" is the 10 % minority


@dataclass(frozen=True)
class Effects:
    """Canary-vs-baseline changes (1.0 / 0.0 = no change)."""

    error_mult: float = 1.0
    refusal_mult: float = 1.0
    latency_mult: float = 1.0
    length_mult: float = 1.0
    score_shift: float = 0.0
    minority_recall_shift: float = 0.0
    majority_recall_shift: float = 0.0
    host_error_mults: tuple[float, ...] = ()  # per canary host (requests spread evenly): error multiplier on top of error_mult


@dataclass(frozen=True)
class RolloutConfig:
    requests_per_hour: float = 20_000.0
    stages: tuple[float, ...] = (0.01, 0.05, 0.20, 0.50)
    hours_per_stage: float = 0.75
    requests_per_user: float = 8.0  # mean
    user_activity_shape: float = 0.7  # gamma shape of per-user activity (smaller = heavier users)
    base_error: float = 0.01
    base_refusal: float = 0.01
    error_user_shape: float = 1.0  # gamma shape of per-user error propensity (smaller = more clustered)
    base_latency_ms: float = 800.0
    latency_sigma: float = 0.5
    latency_user_sigma: float = 0.3
    base_tokens: float = 300.0
    tokens_sigma: float = 0.6
    tokens_user_sigma: float = 0.3
    score_mean: float = 0.70
    score_sd: float = 0.15
    score_user_sd: float = 0.05
    score_sample_rate: float = 0.3
    drift_amplitude: float = 0.15  # relative diurnal amplitude of baseline error/latency
    class_probs: tuple[float, float, float] = (0.6, 0.3, 0.1)
    class_recall: tuple[float, float, float] = (0.92, 0.88, 0.80)
    label_rate: float = 0.8
    label_delay_mean_s: float = 1800.0

    @property
    def hours(self) -> float:
        return self.hours_per_stage * len(self.stages)


def simulate_rollout(rng: np.random.Generator, cfg: RolloutConfig = RolloutConfig(), effects: Effects = Effects()) -> dict[str, np.ndarray]:
    n = int(cfg.requests_per_hour * cfg.hours)
    n_users = max(10, int(n / cfg.requests_per_user))
    t_h = np.sort(rng.uniform(0.0, cfg.hours, n))
    stage = np.minimum((t_h / cfg.hours_per_stage).astype(np.intp), len(cfg.stages) - 1)
    share = np.asarray(cfg.stages, dtype=float)[stage]
    activity = rng.gamma(cfg.user_activity_shape, 1.0, n_users)
    activity /= activity.sum()
    user = rng.choice(n_users, size=n, p=activity)
    h_u = rng.uniform(0.0, 1.0, n_users)
    is_c = h_u[user] < share

    drift = 1.0 + cfg.drift_amplitude * np.sin(2 * np.pi * (t_h / 24.0 + rng.uniform()))
    k = cfg.error_user_shape
    err_u = rng.gamma(k, 1.0 / k, n_users)
    ref_u = rng.gamma(k, 1.0 / k, n_users)
    p_err = np.clip(cfg.base_error * err_u[user] * drift * np.where(is_c, effects.error_mult, 1.0), 0, 1)
    host = None
    if effects.host_error_mults:  # only then: streams without hosts keep their draws
        hm = np.asarray(effects.host_error_mults, dtype=float)
        host = np.where(is_c, rng.integers(0, hm.size, n), -1)
        p_err = np.clip(p_err * np.where(is_c, hm[np.maximum(host, 0)], 1.0), 0, 1)
    p_ref = np.clip(cfg.base_refusal * ref_u[user] * np.where(is_c, effects.refusal_mult, 1.0), 0, 1)
    error = rng.random(n) < p_err
    refusal = (rng.random(n) < p_ref) & ~error

    lat_u = rng.normal(0.0, cfg.latency_user_sigma, n_users)
    latency = cfg.base_latency_ms * drift * np.exp(lat_u[user] + rng.normal(0.0, cfg.latency_sigma, n)) * np.where(
        is_c, effects.latency_mult, 1.0
    )
    latency[error] = np.nan
    tok_u = rng.normal(0.0, cfg.tokens_user_sigma, n_users)
    tokens = np.round(cfg.base_tokens * np.exp(tok_u[user] + rng.normal(0.0, cfg.tokens_sigma, n)) * np.where(is_c, effects.length_mult, 1.0))
    tokens[error | refusal] = np.nan
    sc_u = rng.normal(0.0, cfg.score_user_sd, n_users)
    score = cfg.score_mean + sc_u[user] + rng.normal(0.0, cfg.score_sd, n) + np.where(is_c, effects.score_shift, 0.0)
    score[(rng.random(n) >= cfg.score_sample_rate) | error] = np.nan

    probs = np.asarray(cfg.class_probs)
    true = rng.choice(3, size=n, p=probs / probs.sum())
    recall = np.asarray(cfg.class_recall, dtype=float)
    rec = recall[true] + np.where(is_c, np.where(true == 2, effects.minority_recall_shift, effects.majority_recall_shift), 0.0)
    correct = rng.random(n) < np.clip(rec, 0, 1)
    other = (true + rng.integers(1, 3, n)) % 3
    pred = np.where(correct, true, other)
    labelled = rng.random(n) < cfg.label_rate
    ts = t_h * 3600.0
    label_ts = np.where(labelled, ts + rng.exponential(cfg.label_delay_mean_s, n), np.inf)
    label = np.where(labelled, true.astype(float), np.nan)
    out = {
        "ts": ts,
        "user": user,
        "cluster": user,
        "is_canary": is_c,
        "share": share,
        "stratum": stage,
        "error": error,
        "refusal": refusal,
        "latency_ms": latency,
        "output_tokens": tokens,
        "score": score,
        "pred": pred,
        "label": label,
        "label_ts": label_ts,
        "true_class": true,
    }
    if host is not None:
        out["host"] = host  # canary host index per request (-1: a baseline request)
    return out


def default_specs(*, with_classes: bool = False) -> list[MetricSpec]:
    """The gating metrics used by tests and the benchmark (the issue's allowances).

    errors and refusals: rate ratio 1.2; p95 latency: exceedance ratio 1.2 (at most 6 % of canary
    requests above the baseline's p95); output tokens: +10 %; evaluator score: -0.01.
    """
    specs = [
        MetricSpec("error_rate", "rate", "increase", allowed=0.2, allowed_mode="relative", column="error"),
        MetricSpec("refusal_rate", "rate", "increase", allowed=0.2, allowed_mode="relative", column="refusal"),
        MetricSpec("latency_p95", "quantile", "increase", allowed=1.2, allowed_mode="exceedance_ratio", quantile=0.95,
                   column="latency_ms", unit="ms"),
        MetricSpec("output_tokens", "mean", "increase", allowed=0.10, allowed_mode="relative"),
        MetricSpec("score", "mean", "decrease", allowed=0.01, allowed_mode="absolute"),
    ]
    if with_classes:
        specs.append(MetricSpec("recall_fraud", "class_recall", "decrease", allowed=0.01, cls=2, column="pred"))
    return specs


def look_times(cfg: RolloutConfig, n_looks: int) -> np.ndarray:
    """Evenly spaced look times (seconds), the last one at the end of the rollout."""
    return np.linspace(cfg.hours * 3600.0 / n_looks, cfg.hours * 3600.0, n_looks)


def prefix(stream: dict[str, np.ndarray], t_s: float) -> dict[str, np.ndarray]:
    """Rows with ``ts <= t_s`` (streams are time ordered)."""
    m = int(np.searchsorted(stream["ts"], t_s, side="right"))
    return {k: v[:m] for k, v in stream.items()}


def latency_mult_for_exceedance(
    rng: np.random.Generator,
    cfg: RolloutConfig = RolloutConfig(),
    *,
    share_above: float | tuple[float, ...] = 0.06,
    quantile: float = 0.95,
    n_streams: int = 200,
    weighting: str = "stage",
) -> float | list[float]:
    """``Effects.latency_mult`` at which the canary's share above the baseline's ``quantile`` is ``share_above``.

    Found numerically on ``n_streams`` A/A streams of ``cfg`` (so the per-user and per-request
    lognormal noise, the errors that leave latency unmeasured and the diurnal drift common to both
    arms are all included).  :func:`simulate_rollout` multiplies the canary's latencies by
    ``latency_mult`` with the same random draws, so for any multiplier ``m`` the canary's share above
    the baseline's empirical quantile ``q_b`` is the share of A/A canary latencies above ``q_b / m``;
    ``m`` is read off the pooled, weighted canary latency ratios ``x / q_b`` of all streams (sorted) so
    that the average over streams hits the target:

    * ``weighting="pooled"``: all canary requests of the rollout against the pooled baseline quantile
      (the literal "share of canary requests above the baseline's p95");
    * ``weighting="stage"``: the evaluator's contrast for ``allowed_mode="exceedance_ratio"`` with
      ratio ``r = share_above / (1 - quantile)`` -- the stage-weighted
      ``sum_k w_k (share_c,k(m) - r share_b,k)``, ``w_k`` as in the stratified estimator
      (``n_c,k n_b,k / n_k``) -- set to 0: the test's null boundary.

    ``share_above`` may be a tuple of targets (one multiplier each, from the same streams).

    Without drift the answer is ``exp(s (z_quantile - z_(1 - share_above)))`` with
    ``s = sqrt(latency_sigma^2 + latency_user_sigma^2)`` (1.0539 for p95 at 6 % with the defaults).
    """
    if weighting not in ("pooled", "stage"):
        raise ValueError("weighting must be 'pooled' or 'stage'")
    targets_in = share_above if isinstance(share_above, (tuple, list)) else (share_above,)
    ratios, weights, used = [], [], 0
    target = np.zeros(len(targets_in))
    for _ in range(n_streams):
        s = simulate_rollout(rng, cfg, Effects())
        lat, c = s["latency_ms"], s["is_canary"]
        ok = np.isfinite(lat)
        xb = lat[ok & ~c]
        if xb.size == 0 or not np.any(ok & c):
            continue
        qb = float(np.quantile(xb, quantile))
        parts = []
        for k in (np.unique(s["stratum"]) if weighting == "stage" else (None,)):
            sel = ok if k is None else ok & (s["stratum"] == k)
            xc_k, xb_k = lat[sel & c], lat[sel & ~c]
            if xc_k.size == 0 or xb_k.size == 0:
                continue
            w = 1.0 if k is None else xc_k.size * xb_k.size / (xc_k.size + xb_k.size)
            parts.append((w, xc_k, float(np.mean(xb_k > qb))))
        wsum = sum(w for w, _, _ in parts)
        for w, xc_k, eb in parts:
            # this stratum's canary share above qb / m is the share of xc_k / qb above 1 / m
            ratios.append(xc_k / qb)
            weights.append(np.full(xc_k.size, w / wsum / xc_k.size))
            target += w / wsum * np.array([sa if weighting == "pooled" else sa / (1.0 - quantile) * eb
                                           for sa in targets_in])
        used += 1
    if used == 0:
        raise ValueError("no stream had measured latencies in both arms")
    # sum of the weights of canary rows with ratio > 1/m, averaged over streams, must equal the target:
    # sort by ratio (largest first) and read off the ratio where the cumulative weight reaches the target
    x = np.concatenate(ratios)
    wt = np.concatenate(weights) / used
    order = np.argsort(-x, kind="stable")
    x, cum = x[order], np.cumsum(wt[order])
    out = []
    for tg in target / used:
        i = min(max(int(np.searchsorted(cum, tg, side="left")), 1), x.size - 1)
        out.append(float(1.0 / (0.5 * (x[i - 1] + x[i]))))
    return out if isinstance(share_above, (tuple, list)) else out[0]
