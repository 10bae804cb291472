"""Pure statistics core of the promotion controller.

Anytime-valid (time-uniform) tests for progressive canary rollouts: functions
over numpy arrays, no I/O, no clocks, no global state.  See docs/statistics.md.

Modules: :mod:`.verdict` (``MetricSpec`` in, ``MetricVerdict`` out), one per metric kind (:mod:`.rates`,
:mod:`.means` — also the difference-of-means test that rates and class metrics share —, :mod:`.quantiles`,
:mod:`.classes`), :mod:`.arms` (observations split into arms, users and stages), :mod:`.estimators`,
:mod:`.boundaries`, :mod:`.decision` (a judgement over all metrics), :mod:`.planning`, :mod:`.simulate`.

Typical use::

    from lockgate.controller.stats import MetricSpec, evaluate_all
    specs = [MetricSpec("error_rate", "rate", "increase", allowed=0.5, allowed_mode="relative", column="error"), ...]
    judgement = evaluate_all(specs, columns, alpha=0.05, now=now_s)
    judgement.decision          # "rollback" | "promote" | "continue"
    judgement.to_dict()         # JSON-serialisable, every verdict explains itself
"""

from .boundaries import conditional_binomial_log_e, confidence_bounds, one_sided_boundary
from .classes import evaluate_class, usable_labels
from .decision import Judgement, alpha_statement, evaluate_all, judge, split_alpha
from .estimators import DiffEstimate, factorize, stratified_difference
from .means import evaluate_mean
from .planning import AutoAllowed, auto_allowed, hours_needed, samples_needed
from .quantiles import evaluate_quantile
from .rates import evaluate_rate
from .verdict import KINDS, MetricSpec, MetricVerdict

__all__ = [
    "KINDS",
    "MetricSpec",
    "MetricVerdict",
    "Judgement",
    "evaluate_rate",
    "evaluate_mean",
    "evaluate_quantile",
    "evaluate_class",
    "evaluate_all",
    "usable_labels",
    "judge",
    "split_alpha",
    "alpha_statement",
    "samples_needed",
    "hours_needed",
    "auto_allowed",
    "AutoAllowed",
    "confidence_bounds",
    "one_sided_boundary",
    "conditional_binomial_log_e",
    "stratified_difference",
    "factorize",
    "DiffEstimate",
]
