"""The validated rollout spec as lockgate uses it: stages in basis points, durations in seconds, each
metric criterion resolved against the catalogue; its canonical form and sha256 (the spec lock).

Built only by :mod:`.parsing` (which checks every rule); plain frozen dataclasses, so a spec costs no
validation library at run time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

from lockgate.controller.decide.spec.catalogue import (
    BUILTIN_METRICS,
    DEFAULT_MAX_DURATION_S,
    DEFAULT_PREFLIGHT,
    SPEC_FORMAT,
    MetricDef,
)
from lockgate.yamlconf import Problem
from lockgate.controller.ingest.schema import LABEL_ARRIVAL_COLUMN

if TYPE_CHECKING:  # pragma: no cover
    from lockgate.controller.stats import MetricSpec

# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class GateCheck:
    """An external gate of a step (``steps[].checks[]``): an HTTP endpoint the controller calls before the
    rollout may leave the step; it passes only on the expected answer (``expect_status`` and, when
    ``expect_field`` is set, that dotted field of the JSON body equal to ``expect_equals``). A failing,
    slow (``timeout_s``) or unreachable check holds the rollout; it is called again every ``interval_s``."""

    name: str
    url: str
    method: str = "GET"
    timeout_s: float = 5.0
    interval_s: float = 30.0
    expect_status: tuple[int, ...] = (200,)
    expect_field: str | None = None
    expect_equals: Any = None

    def describe_expect(self) -> str:
        """``HTTP 200 and verdict == 'pass'``."""
        status = " or ".join(str(s) for s in self.expect_status)
        if self.expect_field is None:
            return f"HTTP {status}"
        return f"HTTP {status} and {self.expect_field} == {json.dumps(self.expect_equals)}"

    def canonical(self) -> dict:
        out = {"name": self.name, "url": self.url, "method": self.method, "timeout_s": self.timeout_s,
               "interval_s": self.interval_s, "expect_status": list(self.expect_status)}
        if self.expect_field is not None:
            out["expect_field"] = self.expect_field
            out["expect_equals"] = self.expect_equals
        return out


@dataclass(frozen=True)
class Step:
    """One stage of the ramp: hold ``weight_bp`` (basis points, 100 = 1 %) of the model's traffic on
    the canary for at least ``min_duration_s`` seconds and ``min_canary_samples`` canary observations
    before the next stage may start (a gating metric shown worse than its allowance rolls back instead).

    ``approval``: leaving the step (the next stage, or the promotion after the last one) also waits for
    ``lockgate rollout approve``; ``checks``: and for every external check to answer pass."""

    weight_bp: int
    min_duration_s: float
    min_canary_samples: int
    approval: bool = False
    checks: tuple[GateCheck, ...] = ()

    @property
    def weight_percent(self) -> float:
        return self.weight_bp / 100

    @property
    def gated(self) -> bool:
        """Leaving this step waits for an approval or external checks."""
        return self.approval or bool(self.checks)

    def canonical(self) -> dict:
        out = {"weight_bp": self.weight_bp, "min_duration_s": self.min_duration_s,
               "min_canary_samples": self.min_canary_samples}
        # only when set, so that specs written before these fields existed keep their hash
        if self.approval:
            out["approval"] = True
        if self.checks:
            out["checks"] = [c.canonical() for c in self.checks]
        return out


DEFAULT_STEPS: tuple[Step, ...] = (
    Step(100, 600.0, 200),
    Step(500, 1800.0, 1000),
    Step(2000, 3600.0, 3000),
    Step(5000, 3600.0, 5000),
)


@dataclass(frozen=True)
class PromotionPolicy:
    """The last move, from the final stage to 100 %.

    ``require_non_inferiority``: promotion needs every gating metric shown within its allowed change
    (verdict ``pass``); if false, the final stage's minimums without any gating metric shown worse than
    its allowance are enough.
    ``max_duration_s``: wall-clock budget of the whole rollout, from its start; when it runs out
    without promotion being justified the rollout holds where it is as ``inconclusive`` for a human
    (never promoted silently). ``preflight``: ``drill`` proves the revert path (``lockgate drill``:
    every Envoy ACKs a route re-push) before the first stage; ``none`` skips it.
    """

    require_non_inferiority: bool = True
    max_duration_s: float = DEFAULT_MAX_DURATION_S
    preflight: str = DEFAULT_PREFLIGHT

    def canonical(self) -> dict:
        return {"require_non_inferiority": self.require_non_inferiority, "max_duration_s": self.max_duration_s,
                "preflight": self.preflight}


@dataclass(frozen=True)
class MetricCriterion:
    """One metric and what counts as acceptable for it.

    ``allowed_mode`` is ``absolute`` (``allowed`` in the metric's units; fractions for rates and
    class metrics: 0.01 = 1 point), ``relative`` (``allowed`` as a fraction of the baseline value:
    0.10 = 10 %), ``exceedance_ratio`` (quantile metrics only: ``allowed`` is a ratio R >= 1, at
    most R x the baseline's share of canary requests beyond the baseline's quantile) or ``auto``
    (``allowed`` is None: derived at rollout start from the baseline's historical variance, see
    :func:`lockgate.controller.stats.auto_allowed`).

    ``alpha``: an explicit share of the rollout's alpha for this metric (None: an even split).
    ``family``: metrics with the same family share one metric's share of alpha, split evenly
    among them (see :func:`lockgate.controller.stats.split_alpha`).
    """

    name: str
    kind: str
    harmful: str
    allowed_mode: str
    allowed: float | None
    gating: bool = True
    cls: str | None = None
    quantile: float | None = None
    column: str = ""
    unit: str = ""
    alpha: float | None = None
    family: str | None = None
    #: a :class:`~.prometheus.PromSource` when the metric is read from Prometheus (not a built-in metric)
    prometheus: Any = None

    @property
    def key(self) -> str:
        """Unique name within a spec: ``class_recall[fraud]`` for class metrics, else ``name``."""
        return f"{self.name}[{self.cls}]" if self.cls is not None else self.name

    @property
    def definition(self) -> MetricDef:
        if self.prometheus is not None:
            return self.prometheus.definition(self.name)
        return BUILTIN_METRICS[self.name]

    @property
    def auto_statistic(self) -> tuple[str, float | None]:
        """``(statistic, quantile)`` arguments for ``auto_allowed`` when ``allowed_mode == "auto"``."""
        return ("quantile", self.quantile) if self.kind == "quantile" else ("mean", None)

    @property
    def exceedance_share(self) -> float | None:
        """For a quantile metric, the baseline's share of requests beyond its quantile in the harmful
        direction (p95 harmful increase: 0.05 above it; harmful decrease: 0.95 below it)."""
        if self.quantile is None:
            return None
        return 1.0 - self.quantile if self.harmful == "increase" else self.quantile

    def describe_allowed(self) -> str:
        """``+0.5% of baseline``, ``+150 ms``, ``exceedance ratio 1.2 (at most 6% of canary requests
        above the baseline's p95)`` or ``auto``."""
        if self.allowed_mode == "auto":
            return "auto"
        if self.allowed_mode == "exceedance_ratio":
            share = self.exceedance_share or 0.0
            side = "above" if self.harmful == "increase" else "below"
            pct = f"p{(self.quantile or 0) * 100:g}"
            return (f"exceedance ratio {self.allowed:g} (at most {self.allowed * share * 100:.4g}% of canary "
                    f"requests {side} the baseline's {pct})")
        sign = "+" if self.harmful == "increase" else "-"
        if self.allowed_mode == "relative":
            return f"{sign}{self.allowed * 100:g}% of baseline"
        unit = f" {self.unit}" if self.unit else ""
        return f"{sign}{self.allowed:g}{unit}"

    def canonical(self) -> dict:
        out = {"name": self.name, "class": self.cls, "gating": self.gating, "harmful": self.harmful,
               "allowed_mode": self.allowed_mode, "allowed": self.allowed}
        # only when set, so that specs written before these fields existed keep their hash
        if self.alpha is not None:
            out["alpha"] = self.alpha
        if self.family is not None:
            out["family"] = self.family
        if self.prometheus is not None:
            out["prometheus"] = self.prometheus.canonical()
        return out

    def to_stats_spec(self, auto: Any = None) -> "MetricSpec":
        """This criterion as a statistics-core ``MetricSpec``.

        ``auto`` resolves an ``allowed: auto`` criterion: an ``AutoAllowed`` (from
        ``stats.auto_allowed``), a ``(value, derivation)`` pair or a plain number (absolute, in the
        metric's units). Raises ``ValueError`` if the criterion is ``auto`` and ``auto`` is None.
        """
        from lockgate.controller.stats import MetricSpec

        derivation = None
        if self.allowed_mode == "auto":
            if auto is None:
                raise ValueError(f"{self.key}: allowed is auto; derive it from the baseline first "
                                 "(stats.auto_allowed) and pass it in")
            if isinstance(auto, (int, float)) and not isinstance(auto, bool):
                value, derivation = float(auto), "auto (given)"
            elif isinstance(auto, tuple):
                value, derivation = float(auto[0]), str(auto[1])
            else:
                value, derivation = float(auto.value), str(auto.derivation)
            mode = "absolute"
        else:
            value, mode = float(self.allowed or 0.0), self.allowed_mode
        labels = {"label_column": "true_class", "label_ts_column": LABEL_ARRIVAL_COLUMN["true_class"]} if self.cls is not None else {}
        return MetricSpec(
            name=self.key, kind=self.kind, harmful=self.harmful, allowed=value, allowed_mode=mode,
            gating=self.gating, quantile=self.quantile, cls=self.cls, column=self.column,
            allowed_derivation=derivation, unit=self.unit, alpha=self.alpha, family=self.family, **labels)


@dataclass(frozen=True)
class RolloutSpec:
    """A validated rollout spec. ``steps`` are the stages below 100 % (a ``weight_percent: 100``
    step in the file is the promotion itself and is folded into ``promotion``); ``sha256`` locks
    the spec (see :func:`spec_hash`); ``warnings`` are non-fatal problems worth showing."""

    model: str
    canary: str
    analysis_interval_s: float
    alpha: float
    steps: tuple[Step, ...]
    promotion: PromotionPolicy
    metrics: tuple[MetricCriterion, ...]
    source: str = "<string>"
    sha256: str = ""
    warnings: tuple[Problem, ...] = ()
    #: ``cohorts``: :class:`~.cohorts.CohortRule` s, sent to the canary whatever the weight (docs/rollout-spec.md)
    cohorts: tuple[Any, ...] = ()
    #: ``capacity``: :class:`~.capacity.CapacitySpec` (None: no capacity rule; docs/rollout-spec.md "Capacity")
    capacity: Any = None
    #: ``shadow``: :class:`~.shadow.ShadowSpec` (None: no shadow stage; docs/rollout-spec.md "Shadow stage")
    shadow: Any = None

    def cohorts_at(self, stage: int) -> tuple[Any, ...]:
        """The :class:`lockgate.routing.Cohort` s active at ``stage`` (0-based), in the spec's order; none
        at the promotion (``stage`` past the last step: everyone gets the canary)."""
        return tuple(r.cohort for r in self.cohorts if r.active(stage)) if stage < len(self.steps) else ()

    def cohort_detail(self, stage: int) -> dict:
        """``{"cohorts": [description, ...]}`` for the deployment log of a move to ``stage`` ({} when none)."""
        active = self.cohorts_at(stage)
        return {"cohorts": [c.describe() for c in active]} if active else {}

    @property
    def gating_metrics(self) -> tuple[MetricCriterion, ...]:
        return tuple(m for m in self.metrics if m.gating)

    @property
    def alpha_per_metric(self) -> float:
        """The even Bonferroni share of ``alpha`` per gating metric (``alpha / n_gating``); the split in
        force, with explicit ``alpha`` and ``family`` taken into account, is :attr:`alphas`."""
        return self.alpha / max(1, len(self.gating_metrics))

    @property
    def alphas(self) -> dict[str, float]:
        """Per-metric alpha by :attr:`MetricCriterion.key`, as ``stats.split_alpha`` splits the rollout's
        ``alpha`` (explicit ``alpha`` shares, families sharing one share, the rest split evenly; a
        non-gating metric gets an even share but never decides). Needs no ``auto`` resolution."""
        from lockgate.controller.stats import MetricSpec, split_alpha

        specs = [MetricSpec(name=m.key, kind=m.kind, harmful=m.harmful, gating=m.gating, quantile=m.quantile,
                            cls=m.cls, alpha=m.alpha, family=m.family) for m in self.metrics]
        return split_alpha(specs, self.alpha)

    def metric(self, key: str) -> MetricCriterion:
        for m in self.metrics:
            if m.key == key:
                return m
        raise KeyError(key)

    def canonical(self) -> dict:
        """The normalised spec as plain JSON data (defaults filled in, seconds, basis points).
        Its sorted-keys JSON is what :attr:`sha256` hashes."""
        return {
            "format": SPEC_FORMAT,
            "model": self.model,
            "canary": self.canary,
            "analysis_interval_s": self.analysis_interval_s,
            "alpha": self.alpha,
            "steps": [s.canonical() for s in self.steps],
            "promotion": self.promotion.canonical(),
            "metrics": [m.canonical() for m in self.metrics],
            # only when set, so that specs written before cohorts existed keep their hash
            **({"cohorts": [r.canonical() for r in self.cohorts]} if self.cohorts else {}),
            **({"capacity": self.capacity.canonical()} if self.capacity is not None else {}),
            **({"shadow": self.shadow.canonical()} if self.shadow is not None else {}),
        }

    def canonical_json(self) -> str:
        return canonical_json(self.canonical())

    def summary(self) -> str:
        """``model chat, canary v2, 4 stages + promotion, 5 metrics (4 gating)``."""
        n, g = len(self.metrics), len(self.gating_metrics)
        return (f"model {self.model}, canary {self.canary}, {len(self.steps)} stage{'s' * (len(self.steps) != 1)}"
                f" + promotion, {n} metric{'s' * (n != 1)} ({g} gating)"
                + (f", cohorts: {', '.join(r.describe() for r in self.cohorts)}" if self.cohorts else "")
                + (f", capacity: {self.capacity.describe()}" if self.capacity is not None else ""))

    def to_stats_specs(self, auto: Mapping[str, Any] | None = None) -> list["MetricSpec"]:
        """Every criterion as a statistics-core ``MetricSpec`` (named by :attr:`MetricCriterion.key`).

        ``auto`` maps the key of each ``allowed: auto`` criterion to its resolved allowed change (see
        :meth:`MetricCriterion.to_stats_spec`); a missing one raises ``ValueError``.
        """
        auto = auto or {}
        if not self.prometheus_metrics:
            return [m.to_stats_spec(auto.get(m.key)) for m in self.metrics]
        # Prometheus-sourced metrics are judged apart (decide/prometheus_evidence.py) but share the rollout's
        # alpha: the metrics read from observations keep the share the whole spec gives them.
        alphas = self.alphas
        return [replace(m.to_stats_spec(auto.get(m.key)), alpha=alphas[m.key], family=None)
                for m in self.metrics if m.prometheus is None]

    @property
    def prometheus_metrics(self) -> tuple[MetricCriterion, ...]:
        """The metrics read from Prometheus (``prometheus:`` block); :meth:`to_stats_specs` leaves them out."""
        return tuple(m for m in self.metrics if m.prometheus is not None)


# --------------------------------------------------------------------------- hashing


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _sha256(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()
