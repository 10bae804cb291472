"""The model of one metric's test: :class:`MetricSpec` (what to test) and :class:`MetricVerdict` (what was
shown, with everything needed to explain it), built in one place: :meth:`MetricVerdict.judged`.

Verdicts:

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

Also here: how numbers appear in a verdict's ``reason`` (:func:`fmt_num`, :func:`fmt_signed`,
:func:`allowed_text`) and in its JSON form (:func:`plain_json`, :func:`finite_or_none`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

__all__ = ["KINDS", "ALLOWED_MODES", "ArmCounts", "MetricSpec", "MetricVerdict"]

KINDS = ("rate", "mean", "quantile", "class_recall", "class_precision")
ALLOWED_MODES = ("absolute", "relative", "exceedance_ratio")


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
            "cls": None if self.cls is None else plain_json(self.cls),
            "column": self.data_column,
            "allowed_derivation": self.allowed_derivation,
            "unit": self.unit,
            "alpha": self.alpha,
            "family": self.family,
        }


def plain_json(x: Any) -> Any:
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
        return [plain_json(v) for v in x]
    if isinstance(x, dict):
        return {str(k): plain_json(v) for k, v in x.items()}
    if x is None:
        return None
    return str(x)


class ArmCounts(NamedTuple):
    """Observations and distinct users (clusters) per arm that a verdict was computed from."""

    n_baseline: int
    n_canary: int
    clusters_baseline: int
    clusters_canary: int


NO_COUNTS = ArmCounts(0, 0, 0, 0)


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
            "baseline": plain_json(self.baseline),
            "canary": plain_json(self.canary),
            "difference": plain_json(self.difference),
            "interval": [plain_json(self.interval[0]), plain_json(self.interval[1])],
            "allowed": plain_json(self.allowed),
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
            "details": plain_json(self.details),
        }

    @classmethod
    def judged(cls, spec: MetricSpec, alpha: float, counts: ArmCounts, *, reason: str, verdict: str = "not-yet",
               baseline: float | None = None, canary: float | None = None, difference: float | None = None,
               interval: tuple[float | None, float | None] = (None, None), allowed: float | None = None,
               n_needed: int | None = None, unit: str | None = None, details: dict | None = None) -> "MetricVerdict":
        """The one way a verdict is built: the spec's identity (name, kind, mode, direction, gating, derivation,
        unit unless ``unit`` overrides it) plus what the test found. Defaults describe an undecided metric."""
        return cls(
            metric=spec.name,
            kind=spec.kind,
            verdict=verdict,
            reason=reason,
            baseline=baseline,
            canary=canary,
            difference=difference,
            interval=interval,
            allowed=allowed,
            allowed_mode=spec.allowed_mode,
            harmful=spec.harmful,
            n_baseline=counts.n_baseline,
            n_canary=counts.n_canary,
            clusters_baseline=counts.clusters_baseline,
            clusters_canary=counts.clusters_canary,
            alpha=alpha,
            gating=spec.gating,
            n_needed=n_needed,
            allowed_derivation=spec.allowed_derivation,
            unit=spec.unit if unit is None else unit,
            details={} if details is None else details,
        )


# --------------------------------------------------------------------------
# numbers in reasons and in JSON


def fmt_num(x: float | None, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return "unbounded" if x is not None and math.isinf(x) else "n/a"
    s = f"{x:.4g}"
    return f"{s} {unit}".rstrip() if unit else s


def fmt_signed(x: float, unit: str = "") -> str:
    """Signed format."""
    if x is None or not math.isfinite(x):
        return fmt_num(x, unit)
    s = f"{x:+.4g}"
    return f"{s} {unit}".rstrip() if unit else s


def finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None



def allowed_text(spec: MetricSpec, delta_abs: float) -> str:
    sgn = "+" if spec.sign > 0 else "-"
    if spec.allowed_mode == "exceedance_ratio":
        return f"exceedance ratio {spec.allowed:.4g}"
    if spec.allowed_mode == "relative":
        return f"{sgn}{fmt_num(delta_abs, spec.unit)} ({spec.allowed * 100:.4g}% of baseline)"
    if spec.allowed_derivation:
        return f"{sgn}{fmt_num(delta_abs, spec.unit)} (auto)"
    return f"{sgn}{fmt_num(delta_abs, spec.unit)}"

