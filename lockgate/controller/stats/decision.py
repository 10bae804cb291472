"""Combine per-metric verdicts into a rollout decision with a family-wise alpha."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .arms import DEFAULT_MIN_CLUSTERS
from .classes import evaluate_class
from .means import evaluate_mean
from .quantiles import evaluate_quantile
from .rates import evaluate_rate
from .verdict import MetricSpec, MetricVerdict

__all__ = ["Judgement", "split_alpha", "alpha_statement", "judge", "evaluate_all"]

_EPS = 1e-12


def split_alpha(specs: Sequence[MetricSpec], alpha: float) -> dict[str, float]:
    """Per-metric alpha, keyed by ``spec.name``: a Bonferroni split of the family-wise ``alpha``.

    Gating metrics form *units*: each metric with a ``family`` joins its family's one unit, every
    other metric is a unit of its own.  Metrics with an explicit ``spec.alpha`` get exactly that;
    the rest of ``alpha`` is split evenly over the units without one, and a family's share is split
    evenly among its members (e.g. five ``class_recall`` classes as one family share one metric's
    share).  Then P(any gating metric falsely fails at any look) <= sum of the shares <= alpha,
    whatever the dependence between metrics.  Non-gating metrics are evaluated at one unit's even
    share but never decide.

    Raises ``ValueError`` when the explicit shares add up to ``alpha`` or more while other gating
    metrics remain, or to more than ``alpha``.
    """
    if not (0.0 < alpha < 1.0):
        raise ValueError("alpha must be in (0, 1)")
    gating = [s for s in specs if s.gating]
    explicit = {s.name: float(s.alpha) for s in gating if s.alpha is not None}
    fixed = sum(explicit.values())
    units: dict[str, list[MetricSpec]] = {}
    for s in gating:
        if s.name in explicit:
            continue
        units.setdefault(f"family:{s.family}" if s.family else f"metric:{s.name}", []).append(s)
    if fixed > alpha * (1.0 + 1e-9):
        raise ValueError(f"the explicit per-metric alphas add up to {fixed:g}, more than the rollout's alpha {alpha:g}")
    rest = alpha - fixed
    if units and not rest > 0.0:
        raise ValueError(f"the explicit per-metric alphas use up the rollout's alpha {alpha:g}; "
                         f"{sum(len(u) for u in units.values())} other gating metric(s) get none")
    per_unit = rest / len(units) if units else alpha / max(1, len(gating))
    out = dict(explicit)
    for members in units.values():
        for s in members:
            out[s.name] = per_unit / len(members)
    for s in specs:
        if not s.gating:
            out[s.name] = float(s.alpha) if s.alpha is not None else per_unit
    return out


def alpha_statement(alphas: Mapping[str, float] | int, alpha: float, families: Mapping[str, str] | None = None) -> str:
    """One sentence saying how the family-wise alpha was split (part of every judgement)."""
    if isinstance(alphas, int):  # n gating metrics, even split
        n = alphas
        per = alpha / max(1, n)
        return (
            f"family-wise alpha {alpha:g} split by Bonferroni across {n} gating metric(s): "
            f"each harm test (one-sided, time-uniform) and each non-inferiority test runs at alpha={per:.4g}; "
            f"P(any false rollback over the whole rollout) <= {alpha:g}"
        )
    values = sorted(set(round(a, 12) for a in alphas.values()))
    if len(values) == 1:
        return alpha_statement(len(alphas), alpha)
    parts = ", ".join(f"{k} {a:.3g}" for k, a in alphas.items())
    fam = ""
    if families:
        groups: dict[str, list[str]] = {}
        for k, f in families.items():
            groups.setdefault(f, []).append(k)
        fam = "; families sharing one share: " + "; ".join(f"{f} ({', '.join(ks)})" for f, ks in groups.items())
    return (
        f"family-wise alpha {alpha:g} split by Bonferroni across {len(alphas)} gating metric(s) as the spec says "
        f"({parts}{fam}): each metric's harm and non-inferiority tests run at its share; "
        f"P(any false rollback over the whole rollout) <= {sum(alphas.values()):.4g} <= {alpha:g}"
    )


@dataclass(frozen=True)
class Judgement:
    """Rollout decision.

    ``decision``: ``rollback`` if any gating metric shows harm; ``promote`` if
    every gating metric shows non-inferiority; ``continue`` otherwise.
    """

    decision: str
    reasons: tuple[str, ...]
    alpha: float
    alpha_per_metric: float  #: the even share alpha / n_gating (see ``alphas`` for the split in force)
    n_gating: int
    alpha_statement: str
    verdicts: tuple[MetricVerdict, ...]

    def to_dict(self) -> dict:
        return {
            "decision": self.decision,
            "reasons": list(self.reasons),
            "alpha": float(self.alpha),
            "alpha_per_metric": float(self.alpha_per_metric),
            "n_gating": int(self.n_gating),
            "alpha_statement": self.alpha_statement,
            "alphas": {v.metric: float(v.alpha) for v in self.verdicts if v.gating},
            "verdicts": [v.to_dict() for v in self.verdicts],
        }


def judge(verdicts: Sequence[MetricVerdict], alpha: float, families: Mapping[str, str] | None = None) -> Judgement:
    """Combine verdicts.  ``alpha`` is the family-wise level the verdicts were split from.

    Raises ``ValueError`` if the gating verdicts were computed at per-metric
    alphas adding up to more than ``alpha`` -- the family-wise guarantee would
    not hold.  ``families``: metric -> family name, for the alpha statement.
    """
    if not (0.0 < alpha < 1.0):
        raise ValueError("alpha must be in (0, 1)")
    gating = [v for v in verdicts if v.gating]
    m = len(gating)
    per = alpha / max(1, m)
    spent = sum(v.alpha for v in gating)
    if spent > alpha * (1.0 + 1e-9) + _EPS:
        raise ValueError(
            f"the gating metrics were evaluated at alphas adding up to {spent:g} > the family-wise alpha {alpha:g} "
            f"({', '.join(f'{v.metric} {v.alpha:g}' for v in gating)}); use split_alpha(specs, alpha)"
        )
    reasons: list[str] = []
    fails = [v for v in gating if v.verdict == "fail"]
    passes = [v for v in gating if v.verdict == "pass"]
    if fails:
        decision = "rollback"
        reasons += [f"{v.metric}: {v.reason}" for v in fails]
    elif m > 0 and len(passes) == m:
        decision = "promote"
        reasons += [f"{v.metric}: {v.reason}" for v in passes]
    else:
        decision = "continue"
        if m == 0:
            reasons.append("no gating metrics configured: nothing can justify promotion")
        reasons += [f"{v.metric}: {v.reason}" for v in gating if v.verdict == "not-yet"]
    for v in verdicts:
        if not v.gating:
            reasons.append(f"(non-gating) {v.metric}: {v.verdict}: {v.reason}")
    stmt = alpha_statement({v.metric: v.alpha for v in gating}, alpha, families)
    reasons.append(stmt)
    return Judgement(
        decision=decision,
        reasons=tuple(reasons),
        alpha=float(alpha),
        alpha_per_metric=float(per),
        n_gating=m,
        alpha_statement=stmt,
        verdicts=tuple(verdicts),
    )


def evaluate_all(
    specs: Sequence[MetricSpec],
    data: Mapping[str, np.ndarray],
    alpha: float,
    *,
    now: float | None = None,
    stratify: bool = True,
    min_clusters: int = DEFAULT_MIN_CLUSTERS,
    quantile_intervals: bool = True,
) -> Judgement:
    """Evaluate every spec on columnar data and judge.

    ``data`` columns: ``is_canary`` (bool), ``cluster`` (sticky-user key),
    ``share`` (canary share in force per request), optional ``stratum``
    (defaults to ``share`` when ``stratify``), plus each metric's
    ``spec.data_column``; class metrics also read ``spec.label_column`` and
    ``spec.label_ts_column``.  ``now`` (seconds, same clock as label
    timestamps) is required for class metrics.
    """
    alphas = split_alpha(specs, alpha)
    is_c = np.asarray(data["is_canary"])
    cl = np.asarray(data["cluster"])
    share = np.asarray(data["share"]) if "share" in data else np.zeros(is_c.size)
    stratum = data.get("stratum", share) if stratify else None
    out: list[MetricVerdict] = []
    for s in specs:
        per = alphas[s.name]
        col = data[s.data_column]
        if s.kind == "rate":
            out.append(evaluate_rate(col, is_c, share, cl, s, per, stratum=stratum, min_clusters=min_clusters))
        elif s.kind == "mean":
            out.append(evaluate_mean(col, is_c, cl, s, per, stratum=stratum, min_clusters=min_clusters))
        elif s.kind == "quantile":
            out.append(evaluate_quantile(col, is_c, cl, s, per, stratum=stratum, min_clusters=min_clusters,
                                         compute_interval=quantile_intervals))
        else:
            if now is None:
                raise ValueError("class metrics need 'now'")
            out.append(evaluate_class(col, data[s.label_column], data[s.label_ts_column], now, is_c, cl, s, per,
                                      stratum=stratum, min_clusters=min_clusters))
    return judge(out, alpha, {s.name: s.family for s in specs if s.gating and s.family and s.alpha is None})
