"""Combine per-metric verdicts into a rollout decision with a family-wise alpha."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .metrics import (
    DEFAULT_MIN_CLUSTERS,
    MetricSpec,
    MetricVerdict,
    evaluate_class,
    evaluate_mean,
    evaluate_quantile,
    evaluate_rate,
)

__all__ = ["Judgement", "split_alpha", "alpha_statement", "judge", "evaluate_all"]

_EPS = 1e-12


def split_alpha(specs: Sequence[MetricSpec], alpha: float) -> float:
    """Per-metric alpha: Bonferroni split of ``alpha`` across gating metrics.

    With ``m`` gating metrics each tested at ``alpha/m`` (one-sided harm test),
    P(any gating metric falsely fails at any look) <= m * alpha/m = alpha, with
    no assumption on how the metrics depend on each other.  Non-gating metrics
    are evaluated at the same per-metric alpha but never affect the decision.
    """
    if not (0.0 < alpha < 1.0):
        raise ValueError("alpha must be in (0, 1)")
    m = sum(1 for s in specs if s.gating)
    return alpha / max(1, m)


def alpha_statement(n_gating: int, alpha: float) -> str:
    per = alpha / max(1, n_gating)
    return (
        f"family-wise alpha {alpha:g} split by Bonferroni across {n_gating} gating metric(s): "
        f"each harm test (one-sided, time-uniform) and each non-inferiority test runs at alpha={per:.4g}; "
        f"P(any false rollback over the whole rollout) <= {alpha:g}"
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
    alpha_per_metric: float
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
            "verdicts": [v.to_dict() for v in self.verdicts],
        }


def judge(verdicts: Sequence[MetricVerdict], alpha: float) -> Judgement:
    """Combine verdicts.  ``alpha`` is the family-wise level the verdicts were split from.

    Raises ``ValueError`` if a gating verdict was computed at a per-metric
    alpha larger than the Bonferroni share ``alpha / n_gating`` -- the
    family-wise guarantee would not hold.
    """
    if not (0.0 < alpha < 1.0):
        raise ValueError("alpha must be in (0, 1)")
    gating = [v for v in verdicts if v.gating]
    m = len(gating)
    per = alpha / max(1, m)
    for v in gating:
        if v.alpha > per * (1.0 + 1e-9) + _EPS:
            raise ValueError(
                f"gating metric {v.metric} was evaluated at alpha={v.alpha:g} > alpha/{m}={per:g}; "
                "use split_alpha(specs, alpha)"
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
    stmt = alpha_statement(m, alpha)
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
    per = split_alpha(specs, alpha)
    is_c = np.asarray(data["is_canary"])
    cl = np.asarray(data["cluster"])
    share = np.asarray(data["share"]) if "share" in data else np.zeros(is_c.size)
    stratum = data.get("stratum", share) if stratify else None
    out: list[MetricVerdict] = []
    for s in specs:
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
    return judge(out, alpha)
