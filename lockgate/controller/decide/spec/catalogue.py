"""The rollout spec's catalogue: the built-in metrics, the field names of each level of the file, and the
defaults and limits. Plain data, shared by the parser (:mod:`.parsing`), the typed result (:mod:`.model`)
and the generated JSON Schema (:mod:`.document`)."""

from __future__ import annotations
from lockgate.controller.ingest.schema import LABEL_ARRIVAL_COLUMN

import re
from dataclasses import dataclass

#: Version tag of the spec format; part of the canonical form (and so of the hash).
SPEC_FORMAT = "lockgate.rollout/v1"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # same rule as lockgate.yaml names


# --------------------------------------------------------------------------- built-in metrics


@dataclass(frozen=True)
class MetricDef:
    """A built-in metric: how the statistics core tests it and which observation column it reads.

    ``kind`` is a statistics-core kind (``rate``, ``mean``, ``quantile``, ``class_recall``,
    ``class_precision``). ``column`` is the column of the observation store's ``fetch()`` result
    the values come from — or, for ``error`` and ``correct``, a column the controller derives
    (see ``derived``). ``label_ts_column``: for metrics fed by feedback labels, the label's arrival
    time (labels that arrive after an evaluation's ``now`` must not be used).
    """

    name: str
    kind: str
    harmful: str
    column: str
    unit: str = ""
    quantile: float | None = None
    per_class: bool = False
    label_ts_column: str | None = None
    derived: str | None = None
    description: str = ""

    @property
    def fraction(self) -> bool:
        """Values are fractions in [0, 1] (rates, recall, precision): absolute allowed ≤ 1."""
        return self.kind in ("rate", "class_recall", "class_precision")


BUILTIN_METRICS: dict[str, MetricDef] = {m.name: m for m in (
    MetricDef("error_rate", "rate", "increase", "error",
              derived="1 if status_code >= 500, timeout, or the model cut the stream (error_kind upstream_reset / "
                      "upstream_timeout) else 0 (NaN if neither is known)",
              description="share of requests answered 5xx, timed out, or cut off by the model server"),
    MetricDef("latency_p50", "quantile", "increase", "latency_ms", "ms", 0.50,
              description="median request duration (first request byte to last response byte)"),
    MetricDef("latency_p95", "quantile", "increase", "latency_ms", "ms", 0.95,
              description="95th percentile of request duration"),
    MetricDef("latency_p99", "quantile", "increase", "latency_ms", "ms", 0.99,
              description="99th percentile of request duration"),
    MetricDef("ttft_p95", "quantile", "increase", "ttfb_ms", "ms", 0.95,
              description="95th percentile of time to first response byte (= first token when streaming)"),
    MetricDef("output_tokens", "mean", "increase", "output_tokens", "tokens",
              description="mean output tokens per response (cost and latency; override harmful: decrease "
                          "if shorter answers are the risk)"),
    MetricDef("refusal_rate", "rate", "increase", "refusal",
              description="share of responses the analyzer classified as refusals"),
    MetricDef("entropy", "mean", "increase", "entropy", "nats",
              description="mean token entropy from logprobs (model uncertainty)"),
    MetricDef("evaluator_score", "mean", "decrease", "evaluator_score", label_ts_column=LABEL_ARRIVAL_COLUMN["evaluator_score"],
              description="mean score posted by an evaluator (feedback label evaluator_score)"),
    MetricDef("similarity", "mean", "decrease", "similarity",
              description="mean similarity of canary answers to the baseline's answers (replay/shadow "
                          "comparison; 0..1)"),
    MetricDef("feedback_positive_rate", "rate", "decrease", "thumbs", label_ts_column=LABEL_ARRIVAL_COLUMN["thumbs"],
              description="share of thumbs-up among requests with thumbs feedback"),
    MetricDef("task_success_rate", "rate", "decrease", "task_success", label_ts_column=LABEL_ARRIVAL_COLUMN["task_success"],
              description="share of successful tasks among requests with task_success feedback"),
    MetricDef("accuracy", "rate", "decrease", "correct", label_ts_column=LABEL_ARRIVAL_COLUMN["true_class"],
              derived="1 if predicted_class == true_class else 0, over requests with a usable true_class label",
              description="aggregate accuracy over labelled requests (never a substitute for per-class metrics)"),
    MetricDef("class_recall", "class_recall", "decrease", "predicted_class", per_class=True,
              label_ts_column=LABEL_ARRIVAL_COLUMN["true_class"],
              description="recall of one class: share of requests labelled CLASS that were predicted CLASS"),
    MetricDef("class_precision", "class_precision", "decrease", "predicted_class", per_class=True,
              label_ts_column=LABEL_ARRIVAL_COLUMN["true_class"],
              description="precision of one class: share of requests predicted CLASS that are labelled CLASS"),
)}

# --------------------------------------------------------------------------- field names (shared with the schema)

ROLLOUT_KEYS = ("model", "canary", "analysis_interval_s", "alpha", "steps", "promotion", "metrics", "cohorts", "capacity", "shadow")
STEP_KEYS = ("weight_percent", "min_duration", "min_canary_samples", "approval", "checks")
APPROVAL_KEYS = ("required",)
CHECK_KEYS = ("name", "url", "method", "timeout_s", "interval_s", "expect")
EXPECT_KEYS = ("status", "field", "equals")
CHECK_METHODS = ("GET", "POST")
PROMOTION_KEYS = ("require_non_inferiority", "max_duration", "preflight")
METRIC_KEYS = ("name", "class", "gating", "harmful", "allowed", "alpha", "family", "prometheus")
ALLOWED_MODES = ("absolute", "relative", "exceedance_ratio")
PREFLIGHTS = ("none", "drill")
HARMFUL = ("increase", "decrease")

# --------------------------------------------------------------------------- defaults

DEFAULT_ANALYSIS_INTERVAL_S = 30.0
DEFAULT_ALPHA = 0.05
DEFAULT_STEP_MIN_DURATION_S = 600.0
DEFAULT_STEP_MIN_CANARY_SAMPLES = 100
DEFAULT_MAX_DURATION_S = 86400.0
DEFAULT_PREFLIGHT = "drill"
MAX_DURATION_S = 365 * 86400.0
MAX_ANALYSIS_INTERVAL_S = 3600.0
MAX_ALPHA = 0.2
MAX_RELATIVE = 10.0
MAX_EXCEEDANCE_RATIO = 10.0
#: external checks of a step (``steps[].checks``): seconds the controller waits for an answer, and between calls
DEFAULT_CHECK_TIMEOUT_S = 5.0
MAX_CHECK_TIMEOUT_S = 60.0
DEFAULT_CHECK_INTERVAL_S = 30.0
MIN_CHECK_INTERVAL_S = 1.0
MAX_CHECK_INTERVAL_S = 3600.0
MAX_CHECKS_PER_STEP = 10
#: the HTTP status a check must answer when ``expect.status`` is left out
DEFAULT_CHECK_STATUS = 200
#: Built-in metrics that take ``allowed: {exceedance_ratio: R}`` (the quantile metrics).
QUANTILE_METRICS = tuple(n for n, d in BUILTIN_METRICS.items() if d.kind == "quantile")


__all__ = [name for name in dir() if name.isupper() or name == "MetricDef"]
