"""Per-metric anytime-valid verdicts.

Every ``evaluate_*`` function is a pure function of the data observed so far.
Calling it at every look on the growing prefix of the data is valid: the
harm and non-inferiority decisions are crossings of time-uniform boundaries
(e-processes / confidence sequences), not fixed-sample tests.

Units: every array has one entry per request (observation).  ``is_canary`` is
boolean, ``cluster`` is any hashable key per request (hashed sticky-user key),
``share`` is the canary traffic share (0..1) in force when the request was
routed, timestamps are seconds.  NaN in a value array means "not measured" and
the row is dropped for that metric (never treated as zero).

Verdicts (see :class:`MetricVerdict`):

* ``fail``    -- harm shown: canary worse than baseline beyond 0 in the harmful
                 direction (one-sided, time-uniform, level ``alpha``).
* ``pass``    -- non-inferiority shown: canary within the allowed change of the
                 baseline (one-sided, time-uniform, level ``alpha``).
* ``not-yet`` -- neither (yet).

``fail`` takes precedence: rollback needs only harm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .boundaries import conditional_binomial_log_e, confidence_bounds
from .estimators import DiffEstimate, factorize, stratified_difference, stratified_differences
from .planning import samples_needed

__all__ = [
    "KINDS",
    "MetricSpec",
    "MetricVerdict",
    "evaluate_rate",
    "evaluate_mean",
    "evaluate_quantile",
    "evaluate_class",
    "usable_labels",
]

KINDS = ("rate", "mean", "quantile", "class_recall", "class_precision")
DEFAULT_MIN_CLUSTERS = 20


@dataclass(frozen=True)
class MetricSpec:
    """What to test for one metric.

    ``kind``: ``rate`` (0/1 event per request: error, refusal, timeout, ...),
    ``mean`` (output tokens, scores, entropy, similarity, ...), ``quantile``
    (latency p50/p95/p99, ttft p95; needs ``quantile``), ``class_recall`` /
    ``class_precision`` (needs ``cls``).

    ``harmful``: direction in which a change hurts users (``increase`` or
    ``decrease``; class metrics must be ``decrease``).

    ``allowed`` / ``allowed_mode``: the change users accept, in the harmful
    direction.  ``absolute`` -- in the metric's units (for ``quantile`` in the
    quantile's units, e.g. ms; for rates and class metrics as a fraction, 0.01 =
    1 point).  ``relative`` -- a fraction of the baseline value (0.1 = 10 %).
    Use :func:`lockgate.controller.stats.planning.auto_allowed` to derive it
    from the baseline history and store the text in ``allowed_derivation``.

    ``gating``: whether the metric can block promotion / trigger rollback; the
    overall alpha is split across gating metrics (see ``decision.split_alpha``).

    ``column``: name of the value column in a data mapping (default ``name``);
    class metrics read predictions from ``column`` and truth / arrival time
    from ``label_column`` / ``label_ts_column``.
    """

    name: str
    kind: str
    harmful: str = "increase"
    allowed: float = 0.0
    allowed_mode: str = "absolute"
    gating: bool = True
    quantile: float | None = None
    cls: Any = None
    column: str | None = None
    label_column: str = "label"
    label_ts_column: str = "label_ts"
    allowed_derivation: str | None = None
    unit: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}")
        if self.harmful not in ("increase", "decrease"):
            raise ValueError(f"{self.name}: harmful must be 'increase' or 'decrease'")
        if self.allowed_mode not in ("absolute", "relative"):
            raise ValueError(f"{self.name}: allowed_mode must be 'absolute' or 'relative' (resolve 'auto' first)")
        if not (self.allowed >= 0.0) or not math.isfinite(self.allowed):
            raise ValueError(f"{self.name}: allowed must be a finite number >= 0")
        if self.allowed_mode == "relative" and self.harmful == "decrease" and self.allowed >= 1.0:
            raise ValueError(f"{self.name}: relative allowed decrease must be < 1")
        if self.kind == "quantile" and (self.quantile is None or not (0.0 < self.quantile < 1.0)):
            raise ValueError(f"{self.name}: quantile metrics need quantile in (0, 1)")
        if self.kind.startswith("class_"):
            if self.cls is None:
                raise ValueError(f"{self.name}: class metrics need cls")
            if self.harmful != "decrease":
                raise ValueError(f"{self.name}: recall/precision are harmful when they decrease")

    @property
    def data_column(self) -> str:
        return self.column or self.name

    @property
    def sign(self) -> int:
        """+1 if an increase is harmful, -1 if a decrease is harmful."""
        return 1 if self.harmful == "increase" else -1

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "harmful": self.harmful,
            "allowed": float(self.allowed),
            "allowed_mode": self.allowed_mode,
            "gating": bool(self.gating),
            "quantile": None if self.quantile is None else float(self.quantile),
            "cls": None if self.cls is None else _plain(self.cls),
            "column": self.data_column,
            "allowed_derivation": self.allowed_derivation,
            "unit": self.unit,
        }


def _plain(x: Any) -> Any:
    """Convert numpy scalars / non-finite floats to JSON-friendly Python values."""
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        xf = float(x)
        return xf if math.isfinite(xf) else None
    if isinstance(x, int):
        return x
    if isinstance(x, str):
        return x
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if x is None:
        return None
    return str(x)


@dataclass(frozen=True)
class MetricVerdict:
    """A metric's verdict with everything needed to explain it.

    ``baseline`` / ``canary``: the metric's value per arm (rate, mean, quantile
    value, recall, precision; pooled over stages).  ``difference``: the
    stratified canary - baseline estimate used by the test (for quantiles: the
    difference of the two empirical quantiles).  ``interval``: time-uniform
    bounds on canary - baseline in the metric's units, each end one-sided at
    level ``alpha`` (together a 1 - 2 alpha confidence sequence); ``None`` =
    unbounded so far.  ``allowed``: allowed change in the metric's units, in
    the harmful direction (for ``relative`` mode: ``allowed_fraction x
    baseline``).  ``n_needed``: planning estimate of the *total* canary
    observations at which non-inferiority would be shown if there is no true
    difference, at the currently observed variance.
    """

    metric: str
    kind: str
    verdict: str
    reason: str
    baseline: float | None
    canary: float | None
    difference: float | None
    interval: tuple[float | None, float | None]
    allowed: float | None
    allowed_mode: str
    harmful: str
    n_baseline: int
    n_canary: int
    clusters_baseline: int
    clusters_canary: int
    alpha: float
    gating: bool
    n_needed: int | None = None
    allowed_derivation: str | None = None
    unit: str = ""
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "kind": self.kind,
            "verdict": self.verdict,
            "reason": self.reason,
            "baseline": _plain(self.baseline),
            "canary": _plain(self.canary),
            "difference": _plain(self.difference),
            "interval": [_plain(self.interval[0]), _plain(self.interval[1])],
            "allowed": _plain(self.allowed),
            "allowed_mode": self.allowed_mode,
            "allowed_derivation": self.allowed_derivation,
            "harmful": self.harmful,
            "n_baseline": int(self.n_baseline),
            "n_canary": int(self.n_canary),
            "clusters_baseline": int(self.clusters_baseline),
            "clusters_canary": int(self.clusters_canary),
            "alpha": float(self.alpha),
            "gating": bool(self.gating),
            "n_needed": None if self.n_needed is None else int(self.n_needed),
            "unit": self.unit,
            "details": _plain(self.details),
        }


# --------------------------------------------------------------------------
# helpers


def _f(x: float | None, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return "unbounded" if x is not None and math.isinf(x) else "n/a"
    s = f"{x:.4g}"
    return f"{s} {unit}".rstrip() if unit else s


def _sf(x: float, unit: str = "") -> str:
    """Signed format."""
    if x is None or not math.isfinite(x):
        return _f(x, unit)
    s = f"{x:+.4g}"
    return f"{s} {unit}".rstrip() if unit else s


def _fin(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not (0.0 < alpha < 1.0):
        raise ValueError("alpha must be in (0, 1)")
    return alpha


def _common(n: int, is_canary: Any, cluster: Any, stratum: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
class _Prepared:
    y: np.ndarray
    arm: np.ndarray  # intp 0/1
    cl: np.ndarray
    n_cl: int
    st: np.ndarray
    n_st: int


def _prepare(y: np.ndarray, arm: np.ndarray, cl: np.ndarray, st: np.ndarray, keep: np.ndarray) -> _Prepared:
    cl_idx, n_cl = factorize(cl[keep])
    st_idx, n_st = factorize(st[keep])
    return _Prepared(
        y=np.asarray(y[keep], dtype=float),
        arm=arm[keep].astype(np.intp),
        cl=cl_idx,
        n_cl=n_cl,
        st=st_idx,
        n_st=n_st,
    )


def _est(p: _Prepared, c: float, binary: bool, y: np.ndarray | None = None) -> DiffEstimate | None:
    return stratified_difference(p.y if y is None else y, p.arm, p.cl, p.n_cl, p.st, p.n_st, c=c, binary=binary)


def _counts(p: _Prepared) -> tuple[int, int, int, int]:
    n_c = int(p.arm.sum())
    n_b = int(p.arm.size - n_c)
    gc = int(np.count_nonzero(np.bincount(p.cl[p.arm == 1], minlength=p.n_cl))) if n_c else 0
    gb = int(np.count_nonzero(np.bincount(p.cl[p.arm == 0], minlength=p.n_cl))) if n_b else 0
    return n_b, n_c, gb, gc


def _empty_verdict(spec: MetricSpec, alpha: float, reason: str, p: _Prepared | None, **kw: Any) -> MetricVerdict:
    n_b = n_c = gb = gc = 0
    if p is not None:
        n_b, n_c, gb, gc = _counts(p)
    return MetricVerdict(
        metric=spec.name,
        kind=spec.kind,
        verdict="not-yet",
        reason=reason,
        baseline=kw.get("baseline"),
        canary=kw.get("canary"),
        difference=None,
        interval=(None, None),
        allowed=kw.get("allowed"),
        allowed_mode=spec.allowed_mode,
        harmful=spec.harmful,
        n_baseline=n_b,
        n_canary=n_c,
        clusters_baseline=gb,
        clusters_canary=gc,
        alpha=alpha,
        gating=spec.gating,
        allowed_derivation=spec.allowed_derivation,
        unit=spec.unit,
    )


def _allowed_text(spec: MetricSpec, delta_abs: float) -> str:
    sgn = "+" if spec.sign > 0 else "-"
    if spec.allowed_mode == "relative":
        return f"{sgn}{_f(delta_abs, spec.unit)} ({spec.allowed * 100:.4g}% of baseline)"
    if spec.allowed_derivation:
        return f"{sgn}{_f(delta_abs, spec.unit)} (auto)"
    return f"{sgn}{_f(delta_abs, spec.unit)}"


def _variance_verdict(
    spec: MetricSpec,
    alpha: float,
    p: _Prepared,
    *,
    binary: bool,
    min_clusters: int,
    extra_harm: tuple[bool, str] | None = None,
    extra_ni: tuple[bool, str] | None = None,
    details: dict | None = None,
) -> MetricVerdict:
    """Shared logic for rate, mean and class metrics (difference of means)."""
    h = spec.sign
    rel_c = 1.0 + h * spec.allowed
    if spec.allowed_mode == "relative":
        est, est_r = stratified_differences(p.y, p.arm, p.cl, p.n_cl, p.st, p.n_st, cs=(1.0, rel_c), binary=binary)
    else:
        est, est_r = _est(p, 1.0, binary), None
    n_b, n_c, gb, gc = _counts(p)
    if est is None:
        return _empty_verdict(
            spec, alpha, "no stage has observations in both canary and baseline yet", p,
            baseline=_fin(float(p.y[p.arm == 0].mean())) if n_b else None,
            canary=_fin(float(p.y[p.arm == 1].mean())) if n_c else None,
        )
    base, can = est.mean_baseline, est.mean_canary
    delta_abs = spec.allowed * abs(base) if spec.allowed_mode == "relative" else spec.allowed
    if not math.isfinite(delta_abs):
        delta_abs = 0.0
    tau = delta_abs if delta_abs > 0 else math.sqrt(est.variance)
    lcb, ucb = confidence_bounds(est.estimate, est.variance, tau, alpha)
    harm_cr = (lcb > 0.0) if h > 0 else (ucb < 0.0)
    # non-inferiority
    if spec.allowed_mode == "relative":
        c = rel_c
        lr, ur = confidence_bounds(est_r.estimate, est_r.variance, tau, alpha) if est_r else (-math.inf, math.inf)
        ni_cr = (ur < 0.0) if h > 0 else (lr > 0.0)
        ni_text = (
            f"canary - {c:.4g} x baseline <= {_sf(ur, spec.unit)} < 0" if h > 0
            else f"canary - {c:.4g} x baseline >= {_sf(lr, spec.unit)} > 0"
        )
        var_plan = est_r.variance if est_r else est.variance
    else:
        ni_cr = (ucb < delta_abs) if h > 0 else (lcb > -delta_abs)
        ni_text = (
            f"canary - baseline <= {_sf(ucb, spec.unit)} < allowed {_allowed_text(spec, delta_abs)}" if h > 0
            else f"canary - baseline >= {_sf(lcb, spec.unit)} > allowed {_allowed_text(spec, delta_abs)}"
        )
        var_plan = est.variance
    n_needed = samples_needed(delta_abs, alpha, var_per_canary_obs=var_plan * max(est.n_canary, 1), tau=tau) if delta_abs > 0 else None

    det = {"tau": tau, "lcb": lcb, "ucb": ucb, "estimate": est.estimate, "variance": est.variance}
    if details:
        det.update(details)
    harm = harm_cr and (extra_harm[0] if extra_harm else True)
    ni = ni_cr and (extra_ni[0] if extra_ni else True)
    interval_txt = f"[{_sf(lcb, spec.unit)}, {_sf(ucb, spec.unit)}]"
    arms_txt = f"canary {_f(can, spec.unit)} vs baseline {_f(base, spec.unit)}"
    if gc < min_clusters or gb < min_clusters:
        verdict = "not-yet"
        reason = (
            f"too few users for a cluster-robust decision: canary {gc}, baseline {gb} distinct users "
            f"(need >= {min_clusters} each); {arms_txt}"
        )
    elif harm:
        verdict = "fail"
        bound = f"lower bound {_sf(lcb, spec.unit)} > 0" if h > 0 else f"upper bound {_sf(ucb, spec.unit)} < 0"
        reason = f"harm shown ({spec.harmful} is harmful): {arms_txt}; time-uniform {bound} on canary - baseline at alpha={alpha:.4g}"
        if extra_harm:
            reason += f"; {extra_harm[1]}"
        if ni:
            reason += "; (the change is within the allowed change, but rollback needs only harm)"
    elif ni:
        verdict = "pass"
        reason = f"non-inferior: {arms_txt}; time-uniform bound {ni_text} at alpha={alpha:.4g}"
        if extra_ni:
            reason += f"; {extra_ni[1]}"
    else:
        verdict = "not-yet"
        reason = (
            f"neither harm nor non-inferiority shown yet: {arms_txt}; canary - baseline in {interval_txt} "
            f"(alpha={alpha:.4g} per side), allowed {_allowed_text(spec, delta_abs)}"
        )
        if harm_cr and extra_harm and not extra_harm[0]:
            reason += f"; cluster-robust bound excludes 0 but {extra_harm[1]}"
        if ni_cr and extra_ni and not extra_ni[0]:
            reason += f"; cluster-robust bound is within allowed but {extra_ni[1]}"
        if n_needed is not None:
            reason += f"; ~{n_needed} canary observations needed for non-inferiority at the current variance (have {n_c})"
    return MetricVerdict(
        metric=spec.name,
        kind=spec.kind,
        verdict=verdict,
        reason=reason,
        baseline=_fin(base),
        canary=_fin(can),
        difference=_fin(est.estimate),
        interval=(_fin(lcb), _fin(ucb)),
        allowed=float(delta_abs),
        allowed_mode=spec.allowed_mode,
        harmful=spec.harmful,
        n_baseline=n_b,
        n_canary=n_c,
        clusters_baseline=gb,
        clusters_canary=gc,
        alpha=alpha,
        gating=spec.gating,
        n_needed=n_needed,
        allowed_derivation=spec.allowed_derivation,
        unit=spec.unit,
        details=det,
    )


# --------------------------------------------------------------------------
# public evaluators


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
    Non-inferiority in ``relative`` mode uses both tests (null: rate ratio
    ``>= 1 + allowed``); in ``absolute`` mode the cluster-robust test.
    """
    alpha = _check_alpha(alpha)
    if spec.kind != "rate":
        raise ValueError(f"{spec.name}: evaluate_rate needs kind='rate'")
    ev = np.asarray(events).reshape(-1)
    n = ev.size
    arm, cl, st = _common(n, is_canary, cluster, share if stratum is None else stratum)
    if ev.dtype.kind == "f":
        keep = np.isfinite(ev)
    else:
        keep = np.ones(n, dtype=bool)
    y = ev.astype(float) if ev.dtype.kind != "f" else ev
    if np.any((y[keep] != 0.0) & (y[keep] != 1.0)):
        raise ValueError(f"{spec.name}: rate events must be 0/1 (or NaN for not measured)")
    p = _prepare(y, arm, cl, st, keep)
    if p.y.size == 0:
        return _empty_verdict(spec, alpha, "no measured requests yet", None)

    # count test, per stage
    key = p.st * 2 + p.arm
    nk = np.bincount(key, minlength=2 * p.n_st).reshape(p.n_st, 2).astype(float)
    ek = np.bincount(key, weights=p.y, minlength=2 * p.n_st).reshape(p.n_st, 2)
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
    log_e_harm = conditional_binomial_log_e(x_k, e_k, s_k, direction=h, rho0=1.0, tau_log=tau_log)
    harm_exact = log_e_harm >= la
    details: dict = {
        "events_canary": float(ek[:, 1].sum()),
        "events_baseline": float(ek[:, 0].sum()),
        "count_test_e_harm": math.exp(min(log_e_harm, 700.0)),
    }
    extra_ni = None
    if spec.allowed_mode == "relative" and spec.allowed > 0:
        rho0 = 1.0 + h * spec.allowed
        log_e_ni = conditional_binomial_log_e(x_k, e_k, s_k, direction=-h, rho0=rho0, tau_log=tau_log)
        details["count_test_e_noninferiority"] = math.exp(min(log_e_ni, 700.0))
        extra_ni = (
            log_e_ni >= la,
            f"count test e={math.exp(min(log_e_ni, 700.0)):.3g} vs 1/alpha={1 / alpha:.3g} against rate ratio {rho0:.4g}",
        )
    extra_harm = (
        harm_exact,
        f"count test e={details['count_test_e_harm']:.3g} vs 1/alpha={1 / alpha:.3g} "
        f"({int(details['events_canary'])} canary / {int(details['events_baseline'])} baseline events)",
    )
    return _variance_verdict(
        spec, alpha, p, binary=True, min_clusters=min_clusters,
        extra_harm=extra_harm, extra_ni=extra_ni, details=details,
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
    alpha = _check_alpha(alpha)
    if spec.kind != "mean":
        raise ValueError(f"{spec.name}: evaluate_mean needs kind='mean'")
    v = np.asarray(values, dtype=float).reshape(-1)
    arm, cl, st = _common(v.size, is_canary, cluster, stratum)
    keep = np.isfinite(v)
    p = _prepare(v, arm, cl, st, keep)
    if p.y.size == 0:
        return _empty_verdict(spec, alpha, "no measured values yet", None)
    return _variance_verdict(spec, alpha, p, binary=False, min_clusters=min_clusters)


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
    """Quantile metrics (latency p50/p95/p99, ttft p95) reduced to exceedance rates.

    For harmful increases and quantile level ``p`` let ``q_b`` be the
    baseline's empirical ``p``-quantile.  Then

    * harm  ``q_c > q_b``          <=>  ``P_c(X > q_b) > 1 - p``;
    * non-inferiority ``q_c <= q_b + delta``  <=>  ``P_c(X > q_b + delta) <= 1 - p``.

    Both are tested as a difference of exceedance rates
    ``mean_c[X > q_b + d] - mean_b[X > q_b]`` (``d = 0`` / ``d = delta``) with
    the cluster-robust estimator and normal-mixture boundary.  The baseline
    term both estimates ``1 - p`` and carries the sampling noise of ``q_b``
    (Bahadur representation: ``F(q_b_hat) - p ~ -(F_b(q_b)-p)``, with variance
    ``p(1-p)/n_b``), which is why the two-sample form is used.  Harmful
    decreases are handled by mirroring (``X -> -X``, ``p -> 1-p``).

    ``interval`` is on the quantile-shift scale (metric units, e.g. ms),
    obtained by inverting the exceedance test over shifts ``d`` (bisection on
    the canary order statistics); ``compute_interval=False`` skips that work
    (verdict unchanged; interval then reported as ``(None, None)``).
    """
    alpha = _check_alpha(alpha)
    if spec.kind != "quantile":
        raise ValueError(f"{spec.name}: evaluate_quantile needs kind='quantile'")
    v = np.asarray(values, dtype=float).reshape(-1)
    arm, cl, st = _common(v.size, is_canary, cluster, stratum)
    keep = np.isfinite(v)
    h = spec.sign
    x_all = v if h > 0 else -v
    pq = spec.quantile if h > 0 else 1.0 - spec.quantile
    p = _prepare(x_all, arm, cl, st, keep)
    x = p.y
    is_c = p.arm == 1
    n_b, n_c, gb, gc = _counts(p)
    if n_b == 0 or n_c == 0:
        return _empty_verdict(spec, alpha, "need measured values in both canary and baseline", p)
    xb = x[~is_c]
    xc = x[is_c]
    qb = float(np.quantile(xb, pq))
    qc = float(np.quantile(xc, pq))
    base_q, can_q = (qb, qc) if h > 0 else (-qb, -qc)
    delta_abs = spec.allowed * abs(base_q) if spec.allowed_mode == "relative" else spec.allowed
    ind_b = (xb > qb).astype(float)
    exc_b = float(ind_b.mean())
    # exceedance-rate change corresponding to the allowed shift (planning & mixture scale)
    gap = exc_b - float(np.mean(xb > qb + delta_abs)) if delta_abs > 0 else 0.0

    def est_at(d: float) -> DiffEstimate | None:
        y = np.empty_like(x)
        y[~is_c] = ind_b
        y[is_c] = xc > qb + d
        return _est(p, 1.0, True, y)

    e0 = est_at(0.0)
    if e0 is None:
        return _empty_verdict(spec, alpha, "no stage has observations in both canary and baseline yet", p)
    tau = gap if gap > 0 else math.sqrt(e0.variance)
    l0, u0 = confidence_bounds(e0.estimate, e0.variance, tau, alpha)
    harm = l0 > 0.0
    e1 = est_at(delta_abs) if delta_abs > 0 else e0
    l1, u1 = confidence_bounds(e1.estimate, e1.variance, tau, alpha)
    ni = u1 < 0.0
    n_needed = samples_needed(gap, alpha, var_per_canary_obs=e1.variance * max(e1.n_canary, 1), tau=tau) if gap > 0 else None

    lo_shift = hi_shift = None
    if compute_interval:
        cand = np.unique(xc) - qb

        def lcb_pos(d: float) -> bool:
            e = est_at(d)
            return confidence_bounds(e.estimate, e.variance, tau, alpha)[0] > 0.0

        def ucb_neg(d: float) -> bool:
            e = est_at(d)
            return confidence_bounds(e.estimate, e.variance, tau, alpha)[1] < 0.0

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
    interval = (_fin(lo_shift) if lo_shift is not None else None, _fin(hi_shift) if hi_shift is not None else None)

    pct = f"p{spec.quantile * 100:g}"
    arms_txt = f"{pct} canary {_f(can_q, spec.unit)} vs baseline {_f(base_q, spec.unit)}"
    side = ">" if h > 0 else "<"
    exc_c0 = float(np.mean(xc > qb))
    exc_txt = (
        f"canary share {side} baseline {pct} = {exc_c0:.4g} vs baseline {exc_b:.4g}"
    )
    shift_txt = ""
    if compute_interval:
        shift_txt = f"; quantile shift in [{_sf(interval[0] if interval[0] is not None else (-math.inf), spec.unit)}, {_sf(interval[1] if interval[1] is not None else math.inf, spec.unit)}]"
    if gc < min_clusters or gb < min_clusters:
        verdict = "not-yet"
        reason = (
            f"too few users for a cluster-robust decision: canary {gc}, baseline {gb} distinct users "
            f"(need >= {min_clusters} each); {arms_txt}"
        )
    elif harm:
        verdict = "fail"
        reason = (
            f"harm shown ({spec.harmful} is harmful): {arms_txt}; {exc_txt}; time-uniform lower bound "
            f"{_sf(l0)} > 0 on the exceedance-rate difference at alpha={alpha:.4g}{shift_txt}"
        )
    elif ni:
        verdict = "pass"
        reason = (
            f"non-inferior: {arms_txt}; canary share {side} baseline {pct} {'+' if h > 0 else '-'} allowed "
            f"({_f(delta_abs, spec.unit)}) is below {1 - spec.quantile if h > 0 else spec.quantile:.4g}: time-uniform upper bound "
            f"{_sf(u1)} < 0 on the exceedance-rate difference at alpha={alpha:.4g}{shift_txt}"
        )
    else:
        verdict = "not-yet"
        reason = (
            f"neither harm nor non-inferiority shown yet: {arms_txt}; {exc_txt}; exceedance difference bounds "
            f"[{_sf(l0)}, {_sf(u1)}] (alpha={alpha:.4g} per side), allowed {_allowed_text(spec, delta_abs)}{shift_txt}"
        )
        if n_needed is not None:
            reason += f"; ~{n_needed} canary observations needed for non-inferiority at the current variance (have {n_c})"
    return MetricVerdict(
        metric=spec.name,
        kind=spec.kind,
        verdict=verdict,
        reason=reason,
        baseline=_fin(base_q),
        canary=_fin(can_q),
        difference=_fin(can_q - base_q),
        interval=interval,
        allowed=float(delta_abs),
        allowed_mode=spec.allowed_mode,
        harmful=spec.harmful,
        n_baseline=n_b,
        n_canary=n_c,
        clusters_baseline=gb,
        clusters_canary=gc,
        alpha=alpha,
        gating=spec.gating,
        n_needed=n_needed,
        allowed_derivation=spec.allowed_derivation,
        unit=spec.unit,
        details={
            "exceedance_threshold": float(base_q),
            "exceedance_canary": exc_c0,
            "exceedance_baseline": exc_b,
            "exceedance_lcb_harm": l0,
            "exceedance_ucb_noninferiority": u1,
            "allowed_exceedance_change": gap,
            "tau": tau,
        },
    )


def usable_labels(true: np.ndarray, label_arrival_ts: np.ndarray, now: float) -> np.ndarray:
    """Mask of labels usable at evaluation time ``now``.

    A label is usable only if it exists and its arrival timestamp is finite and
    ``<= now``.  Labels that arrive later must not influence a decision taken
    at ``now`` (otherwise replaying a decision would not reproduce it, and the
    sequential guarantee would be about a different data stream).
    """
    t = np.asarray(true).reshape(-1)
    ts = np.asarray(label_arrival_ts, dtype=float).reshape(-1)
    if ts.size != t.size:
        raise ValueError("label_arrival_ts must have one entry per observation")
    if t.dtype.kind == "f":
        present = np.isfinite(t)
    elif t.dtype.kind == "O":
        present = np.array([(x is not None) and (x == x) for x in t], dtype=bool)
    else:
        present = np.ones(t.size, dtype=bool)
    return present & np.isfinite(ts) & (ts <= float(now))


def evaluate_class(
    pred: np.ndarray,
    true: np.ndarray,
    label_arrival_ts: np.ndarray,
    now: float,
    is_canary: np.ndarray,
    cluster: np.ndarray,
    spec: MetricSpec,
    alpha: float,
    *,
    stratum: np.ndarray | None = None,
    min_clusters: int = DEFAULT_MIN_CLUSTERS,
) -> MetricVerdict:
    """Per-class recall or precision from delayed labels.

    ``pred``: predicted class per request (known at serving time); ``true``:
    label (NaN/None = no label); ``label_arrival_ts``: when the label arrived
    (seconds, NaN/inf = never); ``now``: evaluation time.  Only labels with
    ``arrival <= now`` are used (:func:`usable_labels`).

    * recall(cls)    = mean of ``pred == cls`` over labelled requests with ``true == cls``
    * precision(cls) = mean of ``true == cls`` over labelled requests with ``pred == cls``

    Each is a ratio estimator over a subset, tested like a mean (cluster-robust,
    stratified, normal-mixture boundary).  Aggregate accuracy is deliberately
    not offered: a minority class can lose recall while accuracy rises.
    Assumes label arrival is unrelated to the arm (labels missing at random
    with respect to canary/baseline).
    """
    alpha = _check_alpha(alpha)
    if spec.kind not in ("class_recall", "class_precision"):
        raise ValueError(f"{spec.name}: evaluate_class needs kind class_recall/class_precision")
    pr = np.asarray(pred).reshape(-1)
    tr = np.asarray(true).reshape(-1)
    if tr.size != pr.size:
        raise ValueError("pred and true must have the same length")
    arm, cl, st = _common(pr.size, is_canary, cluster, stratum)
    ok = usable_labels(tr, label_arrival_ts, now)
    pred_is = np.asarray(pr == spec.cls, dtype=bool).reshape(-1)
    true_is = np.zeros(tr.size, dtype=bool)
    true_is[ok] = np.asarray(tr[ok] == spec.cls, dtype=bool).reshape(-1)
    if spec.kind == "class_recall":
        keep = ok & true_is
        y = pred_is.astype(float)
    else:
        keep = ok & pred_is
        y = true_is.astype(float)
    p = _prepare(y, arm, cl, st, keep)
    if p.y.size == 0:
        return _empty_verdict(spec, alpha, f"no usable labels for class {spec.cls!r} at now={now:g}", None)
    v = _variance_verdict(spec, alpha, p, binary=True, min_clusters=min_clusters,
                          details={"labels_usable": int(ok.sum()), "labels_total": int(tr.size), "now": float(now)})
    return v
