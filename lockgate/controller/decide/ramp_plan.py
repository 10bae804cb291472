"""Promotion you can plan: how long each gating metric needs before the canary can be promoted.

Pure functions (no I/O, no clock): the promoter calls :func:`plan_start` at ``rollout start`` with the
stable version's stored history, and :func:`plan_status` for ``rollout status`` with the latest
evaluation; the CLI prints the result. See docs/statistics.md §2.5.

**At start** (:func:`plan_start`), for each gating metric, from the baseline's history:

* the variance per canary observation of the metric's *decision contrast* under "no change" (A/A),
  as the verdicts build it (``stats.means``): ``v1 = deff_c·var_c + c²·deff_b·var_b·s/(1−s)``
  (the baseline arrives at ``(1−s)/s`` observations per canary one at the last stage's share ``s``;
  ``c = 1 ± rel`` for relative allowances, ``r`` for exceedance ratios, else 1). ``var`` is the
  variance of the value the contrast averages: the value (means), the 0/1 event (rates), the
  exceedance indicator beyond the baseline's quantile (+ the allowed shift on the canary side) for
  quantiles, "predicted the class" over the labelled requests of the class (recall) or "labelled the
  class" over the labelled requests predicted as it (precision). ``deff`` is the cluster design
  effect: the cluster-robust (per-user sums) variance of a mean over the iid one, measured on a
  window of the history as long as the rollout is expected to take (more requests per user in a
  longer window means a larger design effect);
* the gap the contrast must clear: the allowance in metric units (``delta_abs``, ``rel × baseline``)
  or, for quantiles, the exceedance-share change it means (``P(X > q_b) − P(X > q_b + d)``, or
  ``(r − 1)·P(X > q_b)``); ``tau`` = that gap, as in the verdicts;
* the canary observations needed: :func:`stats.samples_needed` ``(gap, alpha_metric, v1, tau=gap)``,
  the median crossing of the non-inferiority bound for an identical canary;
* the time: the metric's own observation rate at today's traffic (requests/h over the history's last
  24 h × the share of requests that yield an observation of the metric: a metric measured on 30 % of
  requests, or labelled for 80 % of a 10 % class, grows that much slower; label-fed metrics are
  counted by label arrival and their median label delay is added), walked through the ramp: each
  stage at its share for its minimum duration (or until its minimum canary samples, if later), then
  the last stage until enough. ``hours`` is counted from rollout start; ``fits_ramp`` /
  ``fits_max_duration`` compare it with the ramp (the stages' minimums together) and with
  ``promotion.max_duration``.

**During the rollout** (:func:`plan_status`): the latest evaluation's verdicts carry ``n_needed``
(at the current variance and split, rescaled here to the last stage's split) and ``n_canary``; the
remaining canary observations are walked through the rest of the ramp at the evaluation's traffic.

Over 500 lines because it is one computation, documented above: the per-kind variance of each
metric's decision contrast (means, rates, quantiles, per-class) and the walk through the ramp share
its estimates; about a fifth of the file is this description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from lockgate.controller.ingest.schema import FEEDBACK_ARRIVAL_COLUMNS
from lockgate.controller.stats import MetricSpec, samples_needed, split_alpha, usable_labels
from lockgate.controller.stats.estimators import factorize
from lockgate.routing import TOTAL_WEIGHT_BP

__all__ = ["MetricRampPlan", "RampPlan", "StageSpan", "plan_start", "plan_status", "stage_hours",
           "hours_to_reach", "metric_estimate", "MetricEstimate", "CannotEstimate", "fmt_hours"]

#: traffic rate window (today's traffic): the history's last 24 h
RATE_WINDOW_S = 86400.0
#: shortest history window the design effect is measured on (hours)
MIN_WINDOW_H = 5 / 60
#: fewest observations of a metric in the history to estimate its variance from
MIN_OBS = 30


class CannotEstimate(Exception):
    """The history cannot tell this metric's variance or rate; the message says why."""


# --------------------------------------------------------------------------- formatting


def fmt_hours(h: float | None) -> str:
    if h is None or not math.isfinite(h):
        return "unknown"
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 10:
        return f"{h:.1f} h"
    if h < 72:
        return f"{h:.0f} h"
    return f"{h:,.0f} h (~{h / 24:,.0f} days)"


def _round_sig(n: int | float, sig: int = 2) -> int:
    n = float(n)
    if n <= 0 or not math.isfinite(n):
        return int(n) if math.isfinite(n) else 0
    k = max(0, int(math.floor(math.log10(n))) - sig + 1)
    return int(round(n / 10**k) * 10**k)


def _approx(n: int | float) -> str:
    return f"~{_round_sig(n):,}"


def _fin(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# --------------------------------------------------------------------------- the ramp walk


@dataclass(frozen=True)
class StageSpan:
    """One stage as the plan walks it: canary ``share`` for at least ``hours`` (its minimum duration,
    or the time its minimum canary samples take at today's traffic if that is longer)."""

    share: float
    hours: float


def stage_hours(steps: Sequence[Any], requests_per_hour: float) -> list[StageSpan]:
    """:class:`StageSpan` per ``spec.steps`` entry (``weight_bp``, ``min_duration_s``, ``min_canary_samples``)."""
    out = []
    for st in steps:
        share = st.weight_bp / TOTAL_WEIGHT_BP
        h = st.min_duration_s / 3600.0
        if st.min_canary_samples > 0:
            h = max(h, st.min_canary_samples / (requests_per_hour * share)) if requests_per_hour > 0 else math.inf
        out.append(StageSpan(share, h))
    return out


def hours_to_reach(n: float, stages: Sequence[StageSpan], obs_per_hour: float, *, have: float = 0.0,
                   start_stage: int = 0, elapsed_in_stage: float = 0.0) -> float | None:
    """Hours from now until ``n`` canary observations of a metric (``obs_per_hour`` observations of it per
    hour over both arms; the canary gets ``share`` of them), walking the ramp from ``start_stage`` (of
    which ``elapsed_in_stage`` hours have passed) with ``have`` observations already; the last stage
    lasts until enough. ``None`` if never (no traffic)."""
    if n <= have:
        return 0.0
    if not stages or not (obs_per_hour > 0):
        return None
    t = 0.0
    last = len(stages) - 1
    for i in range(start_stage, last):
        d = max(0.0, stages[i].hours - (elapsed_in_stage if i == start_stage else 0.0))
        if not math.isfinite(d):
            return None
        rate = obs_per_hour * stages[i].share
        if have + rate * d >= n:
            return t + (n - have) / rate
        have += rate * d
        t += d
    rate = obs_per_hour * stages[last].share
    return t + (n - have) / rate if rate > 0 else None


def ramp_hours_from(stages: Sequence[StageSpan], start_stage: int = 0, elapsed_in_stage: float = 0.0) -> float:
    """Hours until the ramp's minimums are all met (the earliest a promotion can happen)."""
    return sum(max(0.0, s.hours - (elapsed_in_stage if i == start_stage else 0.0))
               for i, s in enumerate(stages) if i >= start_stage)


# --------------------------------------------------------------------------- estimates from the history


def _design_effect(y: np.ndarray, cluster: np.ndarray) -> float:
    """CR1 variance of the mean of ``y`` (per-cluster sums of deviations) over its iid variance; >= 1."""
    n = y.size
    if n < 2:
        return 1.0
    r = y - float(y.mean())
    ss = float(np.dot(r, r))
    if not (ss > 0.0):
        return 1.0
    idx, n_cl = factorize(cluster)
    g = np.bincount(idx, weights=r, minlength=n_cl)
    n_g = int(np.count_nonzero(np.bincount(idx, minlength=n_cl)))
    corr = n_g / (n_g - 1.0) if n_g > 1 else 1.0
    return max(1.0, corr * float(np.dot(g, g)) / ss)


@dataclass(frozen=True)
class MetricEstimate:
    """What the history says about one metric (see :func:`metric_estimate`)."""

    v1: float                 #: variance of the decision contrast per canary observation (both arms, deff included)
    gap: float                #: what the contrast must clear (metric units; exceedance share for quantiles)
    tau: float
    obs_per_hour: float       #: observations of the metric per hour of today's traffic (both arms)
    measured_fraction: float  #: obs_per_hour / requests_per_hour
    label_delay_h: float      #: median label delay (label-fed metrics), else 0
    design_effect: float
    unit: str                 #: count noun of one observation: "requests", "labelled fraud requests", ...
    baseline: float | None    #: the baseline's value of the metric in the history
    n_history: int            #: observations of the metric in the history
    contrast: str


def _unit(spec: MetricSpec, label_fed: bool, fraction: float) -> str:
    if spec.kind == "class_recall":
        return f"labelled {spec.cls} requests"
    if spec.kind == "class_precision":
        return f"labelled requests predicted {spec.cls}"
    if label_fed:
        return f"requests with {spec.data_column} feedback"
    if fraction < 0.99:
        return f"requests with {spec.data_column} measured"
    return "requests"


def metric_estimate(spec: MetricSpec, history: Mapping[str, np.ndarray], now: float, share: float, *,
                    requests_per_hour: float, window_hours: float | None = None,
                    arrival_columns: Mapping[str, str] | None = None,
                    rate_window_s: float = RATE_WINDOW_S) -> MetricEstimate:
    """Variance per canary observation, gap and observation rate of ``spec``'s decision contrast for an
    identical canary, from the baseline's ``history`` (columns as ``analysis.prepare`` returns them).
    ``window_hours``: the design effect is measured on the history's last ``window_hours`` (None: all).
    Raises :class:`CannotEstimate` (with the reason) when the history cannot tell."""
    arrival_columns = FEEDBACK_ARRIVAL_COLUMNS if arrival_columns is None else arrival_columns
    ts = np.asarray(history.get("ts", np.zeros(0)), dtype=float).reshape(-1)
    n = ts.size
    if n == 0:
        raise CannotEstimate("no baseline observations in the history")
    base = ~np.asarray(history.get("is_canary", np.zeros(n, dtype=bool)), dtype=bool).reshape(-1)
    cluster = np.asarray(history.get("cluster", np.arange(n))).reshape(-1)
    col = spec.data_column
    if col not in history:
        raise CannotEstimate(f"the history has no {col!r} column")
    h = spec.sign
    label_fed = False
    if spec.kind in ("class_recall", "class_precision"):
        if spec.label_column not in history or spec.label_ts_column not in history:
            raise CannotEstimate(f"the history has no labels ({spec.label_column!r})")
        pred = np.asarray(history[col]).reshape(-1)
        true = np.asarray(history[spec.label_column]).reshape(-1)
        arrival = np.asarray(history[spec.label_ts_column], dtype=float).reshape(-1)
        ok = usable_labels(true, arrival, now)
        pred_is = np.asarray(pred == spec.cls, dtype=bool).reshape(-1)
        true_is = np.zeros(n, dtype=bool)
        true_is[ok] = np.asarray(true[ok] == spec.cls, dtype=bool).reshape(-1)
        if spec.kind == "class_recall":
            keep, y = ok & true_is, pred_is.astype(float)
        else:
            keep, y = ok & pred_is, true_is.astype(float)
        label_fed, binary = True, True
    else:
        v = np.asarray(history[col], dtype=float).reshape(-1)
        keep = np.isfinite(v)
        arr_col = arrival_columns.get(col)
        if arr_col and arr_col in history:
            arrival = np.asarray(history[arr_col], dtype=float).reshape(-1)
            keep &= np.isfinite(arrival) & (arrival <= now)
            label_fed = True
        else:
            arrival = ts
        y = v
        binary = spec.kind == "rate"
    keep &= base & (ts <= now)
    n_obs = int(np.count_nonzero(keep))
    what = (f"labelled requests of class {spec.cls!r}" if spec.kind == "class_recall" else
            f"labelled requests predicted {spec.cls!r}" if spec.kind == "class_precision" else
            f"measured values of {col!r}")
    if n_obs < MIN_OBS:
        raise CannotEstimate(f"only {n_obs} {what} in the history (need >= {MIN_OBS})")

    # today's rate of observations of this metric (label-fed: by label arrival)
    t0 = max(float(ts[base].min()) if base.any() else now, now - rate_window_s)
    span_h = max(now - t0, 1.0) / 3600.0
    in_rate = keep & (arrival >= t0) & (arrival <= now)
    obs_per_hour = float(np.count_nonzero(in_rate)) / span_h
    if not (obs_per_hour > 0):
        raise CannotEstimate(f"no {what} in the history's last {rate_window_s / 3600:g} h")
    delay_h = float(np.median(arrival[keep] - ts[keep])) / 3600.0 if label_fed else 0.0
    delay_h = max(0.0, delay_h) if math.isfinite(delay_h) else 0.0

    win = keep if window_hours is None else keep & (ts >= now - window_hours * 3600.0)
    if int(np.count_nonzero(win)) < MIN_OBS:
        win = keep
    q = share / (1.0 - share)
    yk = y[keep]
    if spec.kind == "quantile":
        x = yk if h > 0 else -yk
        xw = (y[win] if h > 0 else -y[win])
        pq = spec.quantile if h > 0 else 1.0 - spec.quantile
        qb = float(np.quantile(x, pq))
        base_q = qb if h > 0 else -qb
        p0 = float(np.mean(x > qb))
        if spec.allowed_mode == "exceedance_ratio":
            r = spec.allowed
            gap = (r - 1.0) * p0
            ind = (xw > qb).astype(float)
            d = _design_effect(ind, cluster[win])
            v1 = d * p0 * (1.0 - p0) * (1.0 + r * r * q)
            contrast = f"exceedance share beyond the baseline p{spec.quantile * 100:g} - {r:g} x the baseline's"
        else:
            shift = spec.allowed * abs(base_q) if spec.allowed_mode == "relative" else spec.allowed
            pd_ = float(np.mean(x > qb + shift))
            gap = p0 - pd_
            d_c = _design_effect((xw > qb + shift).astype(float), cluster[win])
            d_b = _design_effect((xw > qb).astype(float), cluster[win])
            v1 = d_c * pd_ * (1.0 - pd_) + d_b * p0 * (1.0 - p0) * q
            d = d_b
            contrast = f"exceedance share beyond the baseline p{spec.quantile * 100:g} (+ allowed shift on the canary)"
        baseline_value = base_q
    else:
        if binary:
            p = (float(yk.sum()) + 0.5) / (yk.size + 1.0)  # Jeffreys, as the verdicts' binomial floor
            var, mean = p * (1.0 - p), p
        else:
            mean = float(yk.mean())
            var = float(yk.var())
        d = _design_effect(y[win], cluster[win])
        if spec.allowed_mode == "relative":
            c = 1.0 + h * spec.allowed
            gap = spec.allowed * abs(mean)
            contrast = f"canary - {c:g} x baseline"
        else:
            c = 1.0
            gap = spec.allowed
            contrast = "canary - baseline"
        v1 = d * var * (1.0 + c * c * q)
        baseline_value = float(yk.mean())
    fraction = obs_per_hour / requests_per_hour if requests_per_hour > 0 else 0.0
    return MetricEstimate(v1=float(v1), gap=float(gap), tau=float(gap), obs_per_hour=obs_per_hour,
                          measured_fraction=float(fraction), label_delay_h=delay_h, design_effect=float(d),
                          unit=_unit(spec, label_fed, fraction), baseline=_fin(baseline_value), n_history=n_obs,
                          contrast=contrast)


def requests_per_hour(ts: np.ndarray, now: float, window_s: float = RATE_WINDOW_S) -> float:
    """Requests per hour over the last ``window_s`` of ``ts`` (or its whole span if shorter)."""
    ts = np.asarray(ts, dtype=float)
    ts = ts[ts <= now]
    if ts.size == 0:
        return 0.0
    start = max(float(ts.min()), now - window_s)
    return float(np.count_nonzero(ts >= start)) * 3600.0 / max(now - start, 1.0)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MetricRampPlan:
    """One gating metric's plan. ``needed``: total canary observations (of ``unit``) for non-inferiority
    of an identical canary; ``hours``: from rollout start until then (or the end of the ramp, whichever
    is later); in a status plan ``n_canary`` / ``remaining`` / ``hours_remaining`` say where it stands."""

    metric: str
    kind: str
    unit: str
    needed: int | None
    baseline_needed: int | None
    obs_per_hour: float | None
    hours: float | None
    fits_ramp: bool | None
    fits_max_duration: bool | None
    text: str
    warning: str | None = None
    n_canary: int | None = None
    remaining: int | None = None
    hours_remaining: float | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"metric": self.metric, "kind": self.kind, "unit": self.unit, "needed": self.needed,
             "baseline_needed": self.baseline_needed, "obs_per_hour": _fin(self.obs_per_hour),
             "hours": _fin(self.hours), "fits_ramp": self.fits_ramp, "fits_max_duration": self.fits_max_duration,
             "text": self.text, "warning": self.warning}
        if self.n_canary is not None:
            d.update({"n_canary": self.n_canary, "remaining": self.remaining,
                      "hours_remaining": _fin(self.hours_remaining)})
        d["details"] = {k: (_fin(v) if isinstance(v, (float, np.floating)) else v) for k, v in self.details.items()}
        return d


@dataclass(frozen=True)
class RampPlan:
    """The plan of a rollout: per gating metric, and the warnings to show (one per metric that does not
    fit the ramp or max_duration or cannot be estimated, one if the ramp itself is longer than max_duration)."""

    kind: str                      #: "start" or "status"
    requests_per_hour: float
    last_share: float
    ramp_hours: float | None       #: the ramp's minimums together (start); what is left of them (status)
    max_duration_hours: float
    metrics: tuple[MetricRampPlan, ...]
    warnings: tuple[str, ...]
    elapsed_hours: float | None = None
    history_hours: float | None = None  #: start: how much baseline history the estimates come from

    def summary(self) -> str:
        """One line: the traffic and the ramp the plan assumes."""
        ramp = fmt_hours(self.ramp_hours) if self.ramp_hours is not None else "unknown"
        if self.kind == "status":
            return (f"at {self.requests_per_hour:,.0f} req/h (last evaluation); {fmt_hours(self.elapsed_hours)} "
                    f"since start, {ramp} of the ramp's minimums left, max_duration {fmt_hours(self.max_duration_hours)}")
        hist = (f" ({fmt_hours(self.history_hours)} of history)" if self.history_hours is not None
                and self.history_hours < 23 else "")
        return (f"for an identical canary at today's {self.requests_per_hour:,.0f} req/h{hist}; ramp {ramp} "
                f"(last stage {self.last_share * 100:g}%), max_duration {fmt_hours(self.max_duration_hours)}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "summary": self.summary(), "requests_per_hour": _fin(self.requests_per_hour),
                "last_share": self.last_share, "ramp_hours": _fin(self.ramp_hours),
                "max_duration_hours": _fin(self.max_duration_hours), "elapsed_hours": _fin(self.elapsed_hours),
                "history_hours": _fin(self.history_hours), "metrics": [m.to_dict() for m in self.metrics],
                "warnings": list(self.warnings)}


def _count_phrase(n: int, unit: str, share: float) -> str:
    if abs(share - 0.5) < 1e-9:
        return f"{_approx(n)} {unit} per arm"
    nb = n * (1.0 - share) / share
    return f"{_approx(n)} {unit} on the canary ({_approx(nb)} on the baseline)"


def _decorate(name: str, count: str, hours: float, ramp_h: float, max_h: float, last_share: float,
              require_ni: bool, *, when: str = "at today's rate", status: bool = False
              ) -> tuple[str, str | None, bool, bool]:
    fits_ramp = hours <= ramp_h * (1 + 1e-9) + 1e-9
    fits_max = hours <= max_h * (1 + 1e-9)
    head = f"{name}: {count} needed, ~{fmt_hours(hours)} {when}"
    if fits_ramp:
        text = f"{head}: fits the ramp ({fmt_hours(ramp_h)})"
    elif fits_max:
        text = (f"{head}: longer than the ramp ({fmt_hours(ramp_h)}), holds at the last stage "
                f"({last_share * 100:g}%) ~{fmt_hours(hours - ramp_h)} longer")
    else:
        text = f"{head}: longer than max_duration {fmt_hours(max_h)}"
    warning = None
    if fits_ramp:
        pass  # a ramp longer than max_duration is one warning of its own, not one per metric
    elif require_ni and not fits_max:
        warning = (f"{head}, longer than max_duration {fmt_hours(max_h)}: the rollout will end inconclusive "
                   f"for an identical canary; loosen the allowance or gate it offline")
        if status:
            warning = warning.replace("the rollout will end", "the rollout now cannot be promoted in time and will end")
    elif require_ni and not fits_ramp and not status:
        warning = (f"{head}: longer than the ramp ({fmt_hours(ramp_h)}): holds at the last stage "
                   f"({last_share * 100:g}%) ~{fmt_hours(hours - ramp_h)} longer")
    if not require_ni:
        text += " (promotion does not wait for it: require_non_inferiority is false)"
    return text, warning, fits_ramp, fits_max


def plan_start(spec: Any, stats_specs: Sequence[MetricSpec], history: Mapping[str, np.ndarray], now: float, *,
               alphas: Mapping[str, float] | None = None, arrival_columns: Mapping[str, str] | None = None,
               rate_window_s: float = RATE_WINDOW_S) -> RampPlan:
    """The plan at ``rollout start``.

    ``spec``: the :class:`~lockgate.controller.decide.spec.RolloutSpec` (``steps``, ``promotion.max_duration_s``,
    ``promotion.require_non_inferiority``, ``alpha``); ``stats_specs``: its metrics as statistics-core
    specs (``allowed: auto`` resolved); ``alphas``: per-metric alpha (default ``split_alpha(stats_specs,
    spec.alpha)``); ``history``: the stable version's observations before the rollout, prepared
    (``analysis.prepare``: ``ts``, ``cluster``, ``is_canary``, metric and label columns); ``now``: the
    rollout start (seconds, the history's clock).
    """
    alphas = split_alpha(stats_specs, spec.alpha) if alphas is None else alphas
    steps = list(spec.steps)
    max_h = spec.promotion.max_duration_s / 3600.0
    require_ni = bool(getattr(spec.promotion, "require_non_inferiority", True))
    ts = np.asarray(history.get("ts", np.zeros(0)), dtype=float)
    if "is_canary" in history and ts.size:
        ts = ts[~np.asarray(history["is_canary"], dtype=bool)]
    rate = requests_per_hour(ts, now, rate_window_s)
    last_share = steps[-1].weight_bp / TOTAL_WEIGHT_BP if steps else 0.0
    gating = [s for s in stats_specs if s.gating]
    if rate <= 0:
        why = f"no baseline traffic recorded in the history's last {rate_window_s / 3600:g} h"
        ms = tuple(MetricRampPlan(s.name, s.kind, "requests", None, None, None, None, None, None,
                                  f"{s.name}: cannot estimate: {why}") for s in gating)
        return RampPlan("start", 0.0, last_share, None, max_h, ms,
                        (f"cannot estimate how long promotion takes for {', '.join(s.name for s in gating)}: {why}",))
    stages = stage_hours(steps, rate)
    ramp_h = ramp_hours_from(stages)
    span_h = max(now - float(ts.min()), 1.0) / 3600.0 if ts.size else 1.0
    out: list[MetricRampPlan] = []
    warnings: list[str] = []
    if ramp_h > max_h * (1 + 1e-9):
        slow = [f"stage {i + 1} ({st.share * 100:g}%) {fmt_hours(st.hours)}"
                for i, (st, step) in enumerate(zip(stages, steps)) if st.hours > step.min_duration_s / 3600.0 + 1e-9]
        why = f" (min_canary_samples at today's traffic: {', '.join(slow)})" if slow else ""
        warnings.append(f"the ramp's minimums take ~{fmt_hours(ramp_h)} at today's {rate:,.0f} req/h{why}, longer than "
                        f"max_duration {fmt_hours(max_h)}: the rollout will end inconclusive; lower the stages' "
                        f"minimums or raise max_duration")
    for s in gating:
        alpha = float(alphas[s.name])
        window = min(span_h, max(MIN_WINDOW_H, ramp_h if math.isfinite(ramp_h) else span_h))
        est = needed = hours = None
        try:
            # The design effect grows with the requests per user, so with how long the canary collects: measure
            # it on a window of the history as long as the time to collect the observations needed (fixed point).
            for _ in range(6):
                est = metric_estimate(s, history, now, last_share, requests_per_hour=rate, window_hours=window,
                                      arrival_columns=arrival_columns, rate_window_s=rate_window_s)
                needed = samples_needed(est.gap, alpha, var_per_canary_obs=est.v1, tau=est.tau) if est.gap > 0 else None
                if needed is None:
                    break
                t = hours_to_reach(needed, stages, est.obs_per_hour)
                hours = None if t is None else max(ramp_h, t + est.label_delay_h)
                new_window = min(span_h, max(MIN_WINDOW_H, t if t is not None else span_h))
                if abs(new_window - window) <= 0.1 * window:
                    break
                window = new_window
        except CannotEstimate as exc:
            msg = f"{s.name}: cannot estimate how long showing it within its allowance takes: {exc}"
            out.append(MetricRampPlan(s.name, s.kind, "requests", None, None, None, None, None, None, msg))
            warnings.append(msg)
            continue
        assert est is not None
        details = {"alpha": alpha, "gap": est.gap, "tau": est.tau, "var_per_canary_obs": est.v1,
                   "design_effect": est.design_effect, "measured_fraction": est.measured_fraction,
                   "label_delay_hours": est.label_delay_h, "baseline": est.baseline, "n_history": est.n_history,
                   "contrast": est.contrast, "share": last_share}
        if needed is None:
            msg = (f"{s.name}: an identical canary can never be shown within an allowance of 0 "
                   f"(only a better one): promotion will wait for it until max_duration")
            out.append(MetricRampPlan(s.name, s.kind, est.unit, None, None, est.obs_per_hour, None, False, False,
                                      msg, msg if require_ni else None, details=details))
            if require_ni:
                warnings.append(msg)
            continue
        count = _count_phrase(needed, est.unit, last_share)
        if hours is None:
            msg = f"{s.name}: {count} needed; cannot tell how long that takes (no traffic at the stages' shares)"
            out.append(MetricRampPlan(s.name, s.kind, est.unit, needed, None, est.obs_per_hour, None, None, None,
                                      msg, details=details))
            continue
        text, warning, fits_ramp, fits_max = _decorate(s.name, count, hours, ramp_h, max_h, last_share, require_ni)
        out.append(MetricRampPlan(s.name, s.kind, est.unit, int(needed),
                                  int(math.ceil(needed * (1 - last_share) / last_share)), est.obs_per_hour, hours,
                                  fits_ramp, fits_max, text, warning, details=details))
        if warning:
            warnings.append(warning)
    return RampPlan("start", rate, last_share, ramp_h, max_h, tuple(out), tuple(warnings), history_hours=span_h)


def _contrast_c(spec: MetricSpec | None) -> float:
    if spec is None:
        return 1.0
    if spec.allowed_mode == "relative" and spec.kind != "quantile":
        return 1.0 + spec.sign * spec.allowed
    if spec.allowed_mode == "exceedance_ratio":
        return spec.allowed
    return 1.0


def plan_status(spec: Any, stats_specs: Sequence[MetricSpec], last_eval: Mapping[str, Any], *, stage: int,
                started_at: float, stage_started_at: float, now: float) -> RampPlan:
    """The plan during a rollout, from the latest evaluation (``Judgement.to_dict()`` plus the promoter's
    ``requests_per_hour`` / ``n_canary`` / ``canary_samples_in_stage``).

    Per gating metric: ``n_needed`` of its verdict (at the variance observed so far; rescaled from the
    evaluation's canary/baseline split to the last stage's), minus its ``n_canary``, walked through the rest
    of the ramp at the evaluation's traffic and the metric's own share of it (its canary observations over
    all canary requests so far)."""
    steps = list(spec.steps)
    max_h = spec.promotion.max_duration_s / 3600.0
    require_ni = bool(getattr(spec.promotion, "require_non_inferiority", True))
    rate = float(last_eval.get("requests_per_hour") or 0.0)
    n_canary_all = int(last_eval.get("n_canary") or 0)
    last_share = steps[-1].weight_bp / TOTAL_WEIGHT_BP if steps else 0.0
    stage = min(max(stage, 0), len(steps) - 1)
    elapsed = max(0.0, now - started_at) / 3600.0
    in_stage = max(0.0, now - stage_started_at) / 3600.0
    by_name = {s.name: s for s in stats_specs}
    stages = stage_hours(steps, rate) if rate > 0 else []
    ramp_left = ramp_hours_from(stages, stage, in_stage) if stages else None
    out: list[MetricRampPlan] = []
    warnings: list[str] = []
    if ramp_left is not None and require_ni and elapsed + ramp_left > max_h * (1 + 1e-9):
        warnings.append(f"the ramp's remaining minimums take ~{fmt_hours(ramp_left)} more at {rate:,.0f} req/h: "
                        f"{fmt_hours(elapsed + ramp_left)} from start, longer than max_duration {fmt_hours(max_h)}; "
                        f"the rollout now cannot be promoted in time and will end inconclusive")
    for v in last_eval.get("verdicts", []):
        if not v.get("gating"):
            continue
        name, kind = v["metric"], v.get("kind", "")
        ms = by_name.get(name)
        n_c = int(v.get("n_canary") or 0)
        n_b = int(v.get("n_baseline") or 0)
        unit = _unit(ms, ms.data_column in FEEDBACK_ARRIVAL_COLUMNS, 1.0) if ms is not None else "requests"

        def row(text: str, **kw: Any) -> MetricRampPlan:
            base = dict(needed=None, baseline_needed=None, obs_per_hour=None, hours=None, fits_ramp=None,
                        fits_max_duration=None, n_canary=n_c, remaining=None, hours_remaining=None)
            base.update(kw)
            return MetricRampPlan(name, kind, unit, text=text, **base)

        verdict = v.get("verdict")
        if verdict == "pass":
            out.append(row(f"{name}: shown within its allowance ({n_c:,} {unit} on the canary)", remaining=0,
                           hours_remaining=0.0))
            continue
        if verdict == "fail":
            out.append(row(f"{name}: shown beyond its allowance"))
            continue
        n_needed = v.get("n_needed")
        if n_needed is None or n_canary_all <= 0 or rate <= 0 or not stages:
            why = ("no traffic in the last evaluation's window" if rate <= 0 else
                   "no canary observations yet" if n_canary_all <= 0 or n_c <= 0 else
                   "no variance estimate yet (or an allowance of 0)")
            out.append(row(f"{name}: cannot estimate yet: {why}"))
            continue
        c = _contrast_c(ms)
        q_now = n_c / max(n_b, 1)
        q_last = last_share / (1.0 - last_share) if last_share < 1 else math.inf
        scale = (1.0 + c * c * q_last) / (1.0 + c * c * q_now) if stage < len(steps) - 1 else 1.0
        needed = int(math.ceil(int(n_needed) * max(scale, 0.0)))
        fraction = n_c / n_canary_all
        obs_per_hour = rate * fraction
        remaining = max(0, needed - n_c)
        t = hours_to_reach(needed, stages, obs_per_hour, have=n_c, start_stage=stage, elapsed_in_stage=in_stage)
        if t is None or obs_per_hour <= 0:
            out.append(row(f"{name}: {_approx(remaining)} more {unit} needed; cannot tell how long that takes",
                           needed=needed, remaining=remaining))
            continue
        t = max(t, ramp_left or 0.0)
        total = elapsed + t
        count = f"{_approx(remaining)} more {unit} on the canary (of {_approx(needed)})"
        text, warning, _, fits_max = _decorate(name, count, total, elapsed + (ramp_left or 0.0), max_h, last_share,
                                               require_ni, when=f"from start ({fmt_hours(t)} from now)", status=True)
        fits_ramp = t <= (ramp_left or 0.0) * (1 + 1e-9) + 1e-9
        out.append(row(text, needed=needed, baseline_needed=int(math.ceil(needed * (1 - last_share) / last_share)),
                       obs_per_hour=obs_per_hour, hours=total, fits_ramp=fits_ramp, fits_max_duration=fits_max,
                       remaining=remaining, hours_remaining=t, warning=warning))
        if warning:
            warnings.append(warning)
    return RampPlan("status", rate, last_share, ramp_left, max_h, tuple(out), tuple(warnings), elapsed_hours=elapsed)
