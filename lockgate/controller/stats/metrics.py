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

* ``fail``    -- shown worse than the baseline by *more than* the allowed change
                 ``delta`` in the harmful direction (one-sided, time-uniform, level
                 ``alpha``; null hypothesis: degradation <= delta).
* ``pass``    -- shown worse by *less than* ``delta`` (non-inferiority; one-sided,
                 time-uniform, level ``alpha``; null: degradation >= delta).
* ``not-yet`` -- neither (yet).

Both questions are asked of one contrast and one confidence sequence, on either
side of the same line (the allowance): ``fail`` when the whole sequence is beyond
it, ``pass`` when it is entirely within it.  ``delta = 0`` keeps "any harm".
A canary that is worse but within its allowance is therefore never rolled back
(beyond the ``alpha`` chance), however much traffic accumulates.
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
    "ALLOWED_MODES",
    "MetricSpec",
    "MetricVerdict",
    "evaluate_rate",
    "evaluate_mean",
    "evaluate_quantile",
    "evaluate_class",
    "usable_labels",
]

KINDS = ("rate", "mean", "quantile", "class_recall", "class_precision")
ALLOWED_MODES = ("absolute", "relative", "exceedance_ratio")
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
    1 point).  ``relative`` -- a fraction of the baseline value (0.1 = 10 %):
    a ratio of rates for rates, of means for means, of quantiles for quantiles.
    ``exceedance_ratio`` (quantile metrics only) -- ``allowed`` is a ratio >= 1
    on the share of canary requests beyond the baseline's quantile: p95 with
    ratio 1.2 allows up to 1.2 x 5 % = 6 % of canary requests above the
    baseline's p95.

    ``alpha``: an explicit per-metric share of the family-wise alpha (``None``:
    an even split, see ``decision.split_alpha``).  ``family``: metrics with the
    same family name (e.g. the classes of ``class_recall``) share one metric's
    share of alpha, split evenly among them.
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
    alpha: float | None = None
    family: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}")
        if self.harmful not in ("increase", "decrease"):
            raise ValueError(f"{self.name}: harmful must be 'increase' or 'decrease'")
        if self.allowed_mode not in ALLOWED_MODES:
            raise ValueError(f"{self.name}: allowed_mode must be one of {ALLOWED_MODES} (resolve 'auto' first)")
        if self.allowed_mode == "exceedance_ratio":
            if self.kind != "quantile":
                raise ValueError(f"{self.name}: allowed_mode exceedance_ratio is for quantile metrics only")
            if not (self.allowed >= 1.0):
                raise ValueError(f"{self.name}: an exceedance ratio must be >= 1 (1 = no change allowed)")
        if self.alpha is not None and not (0.0 < self.alpha < 1.0):
            raise ValueError(f"{self.name}: alpha must be in (0, 1)")
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
            "alpha": self.alpha,
            "family": self.family,
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


def _effective_clusters(p: _Prepared) -> tuple[float, float]:
    """Effective number of users per arm (baseline, canary): ``(sum n_g)^2 / sum n_g^2``.

    Equal to the number of users when each sends the same number of requests, much smaller when a
    few heavy users send most of them.  The sandwich variance is only trustworthy with enough
    *effective* clusters (Carter, Schnepel & Steigerwald 2017): 25 users of whom one sends half the
    requests behave like ~4.
    """
    out = []
    for a in (0, 1):
        cnt = np.bincount(p.cl[p.arm == a], minlength=p.n_cl).astype(float)
        ss = float(np.dot(cnt, cnt))
        out.append(float(cnt.sum()) ** 2 / ss if ss > 0 else 0.0)
    return out[0], out[1]


def _cluster_df(p: _Prepared) -> float:
    """Degrees of freedom of the sandwich variance: effective users of the smaller arm, minus one."""
    return max(min(_effective_clusters(p)) - 1.0, 1.0)


def _too_few_users(p: _Prepared, gb: int, gc: int, min_clusters: int) -> str | None:
    """The reason a decision is withheld for lack of (effective) users, or None."""
    eb, ec = _effective_clusters(p)
    if min(gb, gc, eb, ec) >= min_clusters:
        return None
    return (f"too few users for a cluster-robust decision: canary {gc}, baseline {gb} distinct users "
            f"({ec:.0f} and {eb:.0f} effective, weighing heavy users; need >= {min_clusters} each)")


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
    if spec.allowed_mode == "exceedance_ratio":
        return f"exceedance ratio {spec.allowed:.4g}"
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
        est, est_r = stratified_differences(p.y, p.arm, p.cl, p.n_cl, p.st, p.n_st, cs=(1.0, c), binary=binary)
    else:
        est = _est(p, 1.0, binary)
        est_r = est
    n_b, n_c, gb, gc = _counts(p)
    if est is None or est_r is None:
        return _empty_verdict(
            spec, alpha, "no stage has observations in both canary and baseline yet", p,
            baseline=_fin(float(p.y[p.arm == 0].mean())) if n_b else None,
            canary=_fin(float(p.y[p.arm == 1].mean())) if n_c else None,
        )
    base, can = est.mean_baseline, est.mean_canary
    # est.estimate - est_r.estimate = (c - 1) x (stratum-weighted baseline mean) = h x delta_abs
    delta_abs = abs(est.estimate - est_r.estimate) if relative else spec.allowed
    if not math.isfinite(delta_abs):
        delta_abs = 0.0
    tau = delta_abs if delta_abs > 0 else math.sqrt(est_r.variance)
    df = _cluster_df(p)
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
    allowed_txt = _allowed_text(spec, delta_abs)
    n_needed = (samples_needed(delta_abs, alpha, var_per_canary_obs=est_r.variance * max(est_r.n_canary, 1), tau=tau)
                if delta_abs > 0 else None)

    det = {"tau": tau, "lcb": lcb, "ucb": ucb, "estimate": est.estimate, "variance": est_r.variance,
           "contrast": contrast, "contrast_estimate": est_r.estimate, "contrast_lcb": lcb_r, "contrast_ucb": ucb_r,
           "rollback_line": line}
    if details:
        det.update(details)
    harm = harm_cr and (extra_harm[0] if extra_harm else True)
    ni = ni_cr and (extra_ni[0] if extra_ni else True)
    interval_txt = f"[{_sf(lcb, spec.unit)}, {_sf(ucb, spec.unit)}]"
    arms_txt = f"canary {_f(can, spec.unit)} vs baseline {_f(base, spec.unit)}"
    if relative:
        beyond = (f"{contrast} {'>=' if h > 0 else '<='} {_sf(lcb_r if h > 0 else ucb_r, spec.unit)} "
                  f"{'>' if h > 0 else '<'} 0")
        within = (f"{contrast} {'<=' if h > 0 else '>='} {_sf(ucb_r if h > 0 else lcb_r, spec.unit)} "
                  f"{'<' if h > 0 else '>'} 0")
    else:
        beyond = (f"canary - baseline {'>=' if h > 0 else '<='} {_sf(lcb if h > 0 else ucb, spec.unit)}, "
                  f"beyond the allowed {allowed_txt}")
        within = (f"canary - baseline {'<=' if h > 0 else '>='} {_sf(ucb if h > 0 else lcb, spec.unit)}, "
                  f"within the allowed {allowed_txt}")
    too_few = _too_few_users(p, gb, gc, min_clusters)
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
    Both nulls sit at the allowance: in ``relative`` mode the rate ratio
    ``1 + allowed`` (harm: ratio > it shown; non-inferiority: ratio < it shown),
    with both tests; with ``allowed = 0`` at ratio 1, with both tests; in
    ``absolute`` mode (``allowed`` points) the difference ``allowed``, with the
    cluster-robust test alone (a difference of points is not a fixed ratio).
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
        return _est(p, c, True, y)

    e1 = est_at(shift_abs, r)
    if e1 is None:
        return _empty_verdict(spec, alpha, "no stage has observations in both canary and baseline yet", p)
    tau = gap if gap > 0 else math.sqrt(e1.variance)
    df = _cluster_df(p)
    l1, u1 = confidence_bounds(e1.estimate, e1.variance, tau, alpha, df=df)
    harm, ni = l1 > 0.0, u1 < 0.0
    n_needed = samples_needed(gap, alpha, var_per_canary_obs=e1.variance * max(e1.n_canary, 1), tau=tau) if gap > 0 else None

    if ratio_mode:
        # the same sequence on the exceedance-share difference scale: + (r - 1) x weighted baseline share
        e0 = est_at(0.0) if r != 1.0 else e1
        to_diff = e0.estimate - e1.estimate
        interval = (_fin(l1 + to_diff), _fin(u1 + to_diff))
        allowed_line = abs(to_diff)
        shift_txt = ""
    else:
        interval, allowed_line = (None, None), float(shift_abs)
        if compute_interval:
            interval = _shift_interval(est_at, xc, qb, tau, alpha, h, df)
        shift_txt = ("" if not compute_interval else
                     f"; quantile shift in [{_sf(interval[0] if interval[0] is not None else -math.inf, spec.unit)}, "
                     f"{_sf(interval[1] if interval[1] is not None else math.inf, spec.unit)}]")

    pct = f"p{spec.quantile * 100:g}"
    arms_txt = f"{pct} canary {_f(can_q, spec.unit)} vs baseline {_f(base_q, spec.unit)}"
    side = ">" if h > 0 else "<"
    exc_txt = f"canary share {side} baseline {pct} = {exc_c0:.4g} vs baseline {exc_b:.4g}"
    if ratio_mode:
        line_txt = f"{r:.4g} x the baseline's share {side} its {pct} (allowed exceedance ratio)"
        contrast = f"canary share {side} baseline {pct} - {r:.4g} x baseline share"
    else:
        line_txt = f"{1 - spec.quantile if h > 0 else spec.quantile:.4g} at the baseline {pct} {'+' if h > 0 else '-'} allowed ({_f(shift_abs, spec.unit)})"
        contrast = f"canary share {side} baseline {pct} {'+' if h > 0 else '-'} allowed - baseline share {side} {pct}"
    too_few = _too_few_users(p, gb, gc, min_clusters)
    if too_few:
        verdict = "not-yet"
        reason = f"{too_few}; {arms_txt}"
    elif harm:
        verdict = "fail"
        reason = (
            f"worse beyond the allowance ({spec.harmful} is harmful): {arms_txt}; {exc_txt}; canary share above "
            f"{line_txt} shown: time-uniform lower bound {_sf(l1)} > 0 on {contrast} at alpha={alpha:.4g}{shift_txt}"
        )
    elif ni:
        verdict = "pass"
        reason = (
            f"within the allowance: {arms_txt}; canary share below {line_txt} shown: time-uniform upper bound "
            f"{_sf(u1)} < 0 on {contrast} at alpha={alpha:.4g}{shift_txt}"
        )
    else:
        verdict = "not-yet"
        reason = (
            f"neither beyond nor within the allowance shown yet: {arms_txt}; {exc_txt}; bounds [{_sf(l1)}, {_sf(u1)}] "
            f"on {contrast} (alpha={alpha:.4g} per side), allowed {_allowed_text(spec, shift_abs)}{shift_txt}"
        )
        if n_needed is not None:
            reason += f"; ~{n_needed} canary observations needed to show it within the allowance at the current variance (have {n_c})"
    return MetricVerdict(
        metric=spec.name,
        kind=spec.kind,
        verdict=verdict,
        reason=reason,
        baseline=_fin(base_q),
        canary=_fin(can_q),
        difference=_fin(exc_c0 - exc_b) if ratio_mode else _fin(can_q - base_q),
        interval=interval,
        allowed=allowed_line,
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
        unit="" if ratio_mode else spec.unit,
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
    return _fin(lo_shift), _fin(hi_shift)


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
