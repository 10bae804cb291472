"""The rollout spec *file format* as typed pydantic models: the source of ``lockgate schema`` (the JSON Schema
is generated from these classes by ``model_json_schema()``, see :mod:`lockgate.controller.decide.spec_schema`).

Each class is one level of the YAML file, field for field (YAML names via aliases), with the types, bounds,
enums, defaults and descriptions an editor needs. Names and limits come from :mod:`.catalogue`, so the
schema, the parser and the docs cannot drift apart (``tests/unit/test_rollout_spec.py`` checks the field
sets of both directions and that every example validates here).

These models describe the format; they are not the validator. :mod:`.parsing` is authoritative: it checks
the rules a schema cannot express (0.01 % weight resolution, strictly increasing steps, accuracy needing
per-class metrics, the sum of per-metric alphas, model/version existence) and reports every problem of a
file at once with file:line:col — pydantic's model validators stop at the first failing field of a level,
which would hide the cross-field problems (see docs/architecture.md, "Choices"). Only ``lockgate schema``
imports this module, so parsing a spec costs no pydantic import.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from lockgate.controller.decide.spec.catalogue import (
    BUILTIN_METRICS,
    CHECK_METHODS,
    DEFAULT_ALPHA,
    DEFAULT_ANALYSIS_INTERVAL_S,
    DEFAULT_CHECK_INTERVAL_S,
    DEFAULT_CHECK_STATUS,
    DEFAULT_CHECK_TIMEOUT_S,
    DEFAULT_MAX_DURATION_S,
    DEFAULT_PREFLIGHT,
    DEFAULT_STEP_MIN_CANARY_SAMPLES,
    DEFAULT_STEP_MIN_DURATION_S,
    MAX_ALPHA,
    MAX_ANALYSIS_INTERVAL_S,
    MAX_CHECK_INTERVAL_S,
    MAX_CHECK_TIMEOUT_S,
    MAX_CHECKS_PER_STEP,
    MAX_EXCEEDANCE_RATIO,
    MAX_RELATIVE,
    MIN_CHECK_INTERVAL_S,
    NAME_RE,
    QUANTILE_METRICS,
)
from lockgate.controller.decide.spec.parsing import format_duration

_DURATION_TEXT = "A duration: 90s, 10m, 1.5h, 2d, 1h30m, or a plain number of seconds."
#: what :func:`~.parsing.parse_duration` accepts, as a JSON Schema pattern (case-insensitive units)
DURATION_PATTERN = r"^\s*((\d+(\.\d+)?\s*[dhmsDHMS])+|\d+(\.\d+)?)\s*$"
Duration = Union[Annotated[float, Field(ge=0)], Annotated[str, Field(pattern=DURATION_PATTERN)]]
Name = Annotated[str, Field(pattern=NAME_RE.pattern)]

MetricName = Literal[tuple(BUILTIN_METRICS)]  # type: ignore[valid-type]


def _one_of(schema: dict[str, Any]) -> None:
    """Exactly one alternative matches (the union's members exclude each other): ``oneOf``, not ``anyOf``."""
    schema["oneOf"] = schema.pop("anyOf")


class _Level(BaseModel):
    """One mapping of the file: unknown keys are refused (``additionalProperties: false``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class AbsoluteAllowed(_Level):
    absolute: float = Field(ge=0, description="In the metric's units; rates and class metrics as fractions "
                                              "(0.01 = 1 point).")


class RelativeAllowed(_Level):
    relative: float = Field(ge=0, le=MAX_RELATIVE, description="A fraction of the baseline value (0.10 = 10 %).")


class ExceedanceAllowed(_Level):
    exceedance_ratio: float = Field(
        ge=1, le=MAX_EXCEEDANCE_RATIO,
        description="Quantile metrics only (" + ", ".join(QUANTILE_METRICS) + "): at most R x the baseline's share "
                    "of canary requests beyond the baseline's quantile (p95 with 1.2: 6 % instead of 5 %); 1 = no "
                    "change allowed.")


Auto = Annotated[Literal["auto"], Field(description="Derived from the baseline's historical variance.")]
Allowed = Annotated[Union[Auto, AbsoluteAllowed, RelativeAllowed, ExceedanceAllowed], Field(
    description="The change users accept, in the harmful direction: the canary is rolled back once shown worse "
                "than the baseline beyond it, and promoted only once every gating metric is shown within it.",
    json_schema_extra=_one_of)]


def _metric_rules(schema: dict[str, Any]) -> None:
    """Rules by metric name (JSON Schema ``if``/``then``), from the catalogue."""
    names = list(BUILTIN_METRICS)
    per_class = [n for n, d in BUILTIN_METRICS.items() if d.per_class]
    fractions = [n for n, d in BUILTIN_METRICS.items() if d.fraction]
    not_quantile = [n for n in names if n not in QUANTILE_METRICS]
    table = "; ".join(f"{n}: {d.kind}, harmful {d.harmful}" for n, d in BUILTIN_METRICS.items())
    schema["properties"]["name"]["description"] = (f"A built-in metric ({table}), or a name of your own for a "
                                                   "metric with a prometheus block.")
    schema["allOf"] = [
        {"if": {"properties": {"name": {"enum": per_class}}, "required": ["name"]},
         "then": {"required": ["class"], "properties": {"harmful": {"const": "decrease"}}},
         "else": {"not": {"required": ["class"]}}},
        {"if": {"properties": {"name": {"enum": fractions}}, "required": ["name"]},
         "then": {"properties": {"allowed": {"properties": {"absolute": {"maximum": 1}}}}}},
        {"if": {"properties": {"name": {"enum": not_quantile}}, "required": ["name"]},
         "then": {"properties": {"allowed": {"not": {"type": "object", "required": ["exceedance_ratio"]}}}}},
    ]


class ArmQueryDocument(_Level):
    """A PromQL query per arm (instead of one query with $version)."""

    canary: str = Field(min_length=1, description="The canary's query ($canary or $version selects it).")
    baseline: str = Field(min_length=1, description="The baseline's query ($baseline or $version selects it).")


PromQuery = Annotated[Union[Annotated[str, Field(min_length=1)], ArmQueryDocument], Field(
    description="A PromQL query with $version (the arm's version; also $canary, $baseline, $model), or one per arm.")]
PromDuration = Union[Annotated[float, Field(gt=0)], Annotated[str, Field(pattern=r"^\d+(\.\d+)?(ms|s|m|h)?$")]]


class PrometheusDocument(_Level):
    """A metric read from Prometheus instead of lockgate's own observations (docs/rollout-spec.md)."""

    kind: Literal["counter", "histogram", "gauge"] = Field(
        description="counter: events/total (a rate test); histogram: the share of requests above le (a rate test); "
                    "gauge: the mean of its samples (a mean test).")
    events: PromQuery = Field(None, description="counter: the events counter (e.g. 5xx responses).")  # type: ignore[assignment]
    total: PromQuery = Field(None, description="counter: the requests counter.")  # type: ignore[assignment]
    histogram: PromQuery = Field(None, description="histogram: its series selector, without _bucket/_count.")  # type: ignore[assignment]
    le: float = Field(None, gt=0, description="histogram: the bucket bound; requests above it are the events.")  # type: ignore[assignment]
    query: PromQuery = Field(None, description="gauge: one series per arm.")  # type: ignore[assignment]
    step: PromDuration = Field(None, description="gauge: sampling step (default 15s).")  # type: ignore[assignment]
    block: PromDuration = Field(None, description="gauge: samples of one block of time form one cluster (default 1m).")  # type: ignore[assignment]
    unit: str = Field(None, description="gauge: the unit of its values (for reading).")  # type: ignore[assignment]
    url: str = Field(None, pattern=r"^https?://\S+$", description="This metric's Prometheus (default: lockgate.yaml's "  # type: ignore[assignment]
                                                                  "controller.prometheus.url).")


class MetricDocument(_Level):
    """One item of rollout.metrics: a built-in metric (or one read from Prometheus) and the change allowed on it."""

    model_config = ConfigDict(json_schema_extra=_metric_rules)

    name: Union[MetricName, Name]  # type: ignore[valid-type]
    prometheus: PrometheusDocument = Field(None, description="Read the metric from Prometheus; its name is then "  # type: ignore[assignment]
                                                             "one of your own, not a built-in metric's.")
    cls: str = Field(None, alias="class", min_length=1,  # type: ignore[assignment]
                     description="The class watched by class_recall / class_precision (required for them, not "
                                 "allowed for other metrics).")
    gating: bool = Field(True, description="Gating metrics can roll back and must pass for promotion; "
                                           "false = informational.")
    harmful: Literal["increase", "decrease"] = Field(
        None, description="Direction in which a change hurts (default: the metric's own; class metrics are "  # type: ignore[arg-type]
                          "always 'decrease').")
    allowed: Allowed
    alpha: float = Field(None, gt=0, lt=MAX_ALPHA,  # type: ignore[assignment]
                         description="This metric's explicit share of the rollout's alpha (less than it); the "
                                     "explicit shares of the gating metrics must leave some for the others. "
                                     "Default: an even split.")
    family: Name = Field(None, description="Gating metrics with the same family (e.g. every class_recall class) "  # type: ignore[assignment]
                                           "share one metric's share of alpha, split evenly among them.")


class ApprovalDocument(_Level):
    """Leaving the step waits for ``lockgate rollout approve MODEL`` (who approved is logged)."""

    required: bool = Field(description="true: the next stage (or, after the last step, the promotion) also needs "
                                       "an approval; the metric gates still apply.")


class ExpectDocument(_Level):
    """The answer a check must give to pass."""

    status: Union[Annotated[int, Field(ge=100, le=599)], list[Annotated[int, Field(ge=100, le=599)]]] = Field(
        DEFAULT_CHECK_STATUS, description="The HTTP status (or statuses) that pass.")
    field: str = Field(None, pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",  # type: ignore[assignment]
                       description="A field of the JSON answer (dotted for nested ones: result.status) that must "
                                   "equal `equals`.")
    equals: Union[str, float, bool] = Field(None, description="The value `field` must have "  # type: ignore[assignment]
                                                              "(with field only).")


class CheckDocument(_Level):
    """An external gate: an HTTP endpoint that must answer pass before the rollout leaves the step."""

    name: Name = Field(description="Unique within the step; shown in status, the log and the report.")
    url: str = Field(pattern=r"^https?://\S+$", max_length=2000, description="http(s) URL the controller calls.")
    method: Literal[tuple(CHECK_METHODS)] = Field("GET", description="POST sends the rollout as JSON "  # type: ignore[valid-type]
                                                                    "(model, canary, stage, weight).")
    timeout_s: float = Field(DEFAULT_CHECK_TIMEOUT_S, gt=0, le=MAX_CHECK_TIMEOUT_S,
                             description="Seconds to wait for the answer; no answer in time holds the rollout.")
    interval_s: float = Field(DEFAULT_CHECK_INTERVAL_S, ge=MIN_CHECK_INTERVAL_S, le=MAX_CHECK_INTERVAL_S,
                              description="Seconds between calls while the step waits for it (a pass older than "
                                          "this is called again).")
    expect: ExpectDocument = Field(None)  # type: ignore[assignment]


class StepDocument(_Level):
    """One item of rollout.steps: a stage of the ramp."""

    weight_percent: float = Field(gt=0, le=100, description="Canary share of the model's traffic in percent, "
                                                            "resolution 0.01; strictly increasing from step to step. "
                                                            "A last step of 100 is the promotion itself (it takes no "
                                                            "other fields).")
    min_duration: Duration = Field(format_duration(DEFAULT_STEP_MIN_DURATION_S),
                                   description="Least time at this stage. " + _DURATION_TEXT)
    min_canary_samples: int = Field(DEFAULT_STEP_MIN_CANARY_SAMPLES, ge=0,
                                    description="Least canary observations at this stage.")
    approval: ApprovalDocument = Field(None)  # type: ignore[assignment]
    checks: list[CheckDocument] = Field(None, max_length=MAX_CHECKS_PER_STEP,  # type: ignore[assignment]
                                        description="External checks that must answer pass before the rollout "
                                                    "leaves this step.")


class PromotionDocument(_Level):
    """The last move, from the final stage to 100 %."""

    require_non_inferiority: bool = Field(True, description="Promotion to 100 % needs every gating metric shown "
                                                            "within its allowed change.")
    max_duration: Duration = Field(format_duration(DEFAULT_MAX_DURATION_S),
                                   description="Wall-clock budget of the whole rollout; then it holds as "
                                               "'inconclusive' for a human. " + _DURATION_TEXT)
    preflight: Literal["none", "drill"] = Field(DEFAULT_PREFLIGHT,
                                                description="drill: prove the revert path before the first stage.")


class CohortMatchDocument(_Level):
    """The header (lower-case name) or cookie and the exact value that put a request in the cohort."""

    name: str = Field(description="Header name (lower case, not x-lockgate-*) or cookie name.")
    value: str = Field(min_length=1, max_length=256, description="The exact value.")


class CohortDocument(_Level):
    """A named group sent to the canary whatever the weight (by header or by cookie, not both)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="Unique; labels its observations.")
    header: CohortMatchDocument = Field(None)  # type: ignore[assignment]
    cookie: CohortMatchDocument = Field(None)  # type: ignore[assignment]
    from_step: int = Field(1, ge=1, description="The step (counted from 1) it starts at; default: every stage.")


class CapacityDocument(_Level):
    """The canary hosts' capacity: the ramp holds before a step whose projected load exceeds
    hosts x capacity x headroom (hosts: the canary version's endpoints in lockgate.yaml)."""

    requests_per_s_per_host: float = Field(None, gt=0, le=1e9,  # type: ignore[assignment]
                                           description="Requests per second one canary host can serve.")
    tokens_per_s_per_host: float = Field(None, gt=0, le=1e9,  # type: ignore[assignment]
                                         description="Output tokens per second one canary host can generate.")
    headroom: float = Field(0.8, gt=0, le=1, description="The share of the capacity a step may use.")
    window_s: float = Field(60, ge=10, le=3600, description="Seconds of traffic the rate is measured over.")
    latency_rise: float = Field(None, ge=1.05, le=100,  # type: ignore[assignment]
                                description="Observed mode: hold when the canary's p50 latency over the last "
                                            "window_s is more than this factor above its p50 at the start.")


class ShadowDocument(_Level):
    """The shadow stage: before any user sees the canary, a share of the baseline's requests is
    mirrored to it and the two answers to each request are compared."""

    mirror_percent: float = Field(gt=0, le=100, description="The share of the model's requests mirrored.")
    max_rps: float = Field(gt=0, le=1e6, description="At most this many mirrored requests per second in all.")
    min_duration: Duration = Field("10m", description="At least this long in shadow.")  # type: ignore[assignment]
    min_pairs: int = Field(200, ge=1, le=10_000_000, description="And at least this many paired answers.")


class RolloutDocument(_Level):
    """One progressive canary rollout: which model and canary, how it ramps, what is judged."""

    model: Name = Field(description="A model in lockgate.yaml.")
    canary: Name = Field(description="The canary version (the baseline is the model's stable version).")
    analysis_interval_s: float = Field(DEFAULT_ANALYSIS_INTERVAL_S, ge=1, le=MAX_ANALYSIS_INTERVAL_S,
                                       description="Seconds between evaluations.")
    alpha: float = Field(DEFAULT_ALPHA, gt=0, le=MAX_ALPHA,
                         description="False-rollback budget across all gating metrics together, over the whole "
                                     "rollout; split evenly over the gating metrics unless metrics set their own "
                                     "alpha or family.")
    steps: list[StepDocument] = Field(None, min_length=1,  # type: ignore[assignment]
                                      description="Stages (default: 1, 5, 20, 50 % then promotion to 100 %).")
    promotion: PromotionDocument = Field(None)  # type: ignore[assignment]
    metrics: list[MetricDocument] = Field(min_length=1, description="At least one must be gating.")
    cohorts: list[CohortDocument] = Field(None, max_length=16,  # type: ignore[assignment]
                                          description="Groups sent to the canary by header or cookie, never "
                                                      "part of the sample the gates compare.")
    capacity: CapacityDocument = Field(None,  # type: ignore[assignment]
                                       description="Hold the ramp before a step the canary's hosts cannot take.")
    shadow: ShadowDocument = Field(None,  # type: ignore[assignment]
                                   description="A first stage at 0 % served: mirrored requests, paired answers.")


class SpecDocument(_Level):
    """A rollout spec file (docs/rollout-spec.md)."""

    model_config = ConfigDict(title="lockgate rollout spec")

    rollout: RolloutDocument


__all__ = ["ApprovalDocument", "CapacityDocument", "CheckDocument", "DURATION_PATTERN", "ExpectDocument", "MetricDocument", "PromotionDocument", "RolloutDocument", "ShadowDocument", "SpecDocument",
           "StepDocument"]
