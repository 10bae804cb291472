"""The rollout spec: one YAML file per rollout, saying how a canary is ramped and judged.

Example (``examples/rollouts/chat-v2.yaml``; every field in ``docs/rollout-spec.md``)::

    rollout:
      model: chat
      canary: v2
      alpha: 0.01
      steps:
        - {weight_percent: 1, min_duration: 10m, min_canary_samples: 200}
        - {weight_percent: 5, min_duration: 30m, min_canary_samples: 1000}
      promotion: {require_non_inferiority: true, max_duration: 24h, preflight: drill}
      metrics:
        - {name: error_rate, allowed: {absolute: 0.005}}
        - {name: latency_p95, allowed: {relative: 0.10}}
        - {name: output_tokens, gating: false, allowed: auto}

Each gating metric's ``allowed`` change is the contract: the canary is rolled back once it is shown
worse than the baseline by more than it, promoted only once every gating metric is shown within it.
Quantile metrics may instead allow an ``{exceedance_ratio: R}`` (at most R x the baseline's share of
requests beyond the baseline's quantile). A metric may take an explicit share of the rollout's
``alpha`` (``alpha: X``) or share one metric's share with others (``family: NAME``).

Validated like ``lockgate.yaml`` (:mod:`lockgate.yamlconf`): every problem is collected and reported
together as one :class:`~lockgate.yamlconf.ConfigError`, each naming file:line:col and the field path;
unknown keys are reported with the known ones (and a "did you mean" for typos).

The spec is locked at rollout start by :func:`spec_hash` / :attr:`RolloutSpec.sha256`: the sha256 of
the *normalised* spec (:meth:`RolloutSpec.canonical`: defaults filled in, durations in seconds, weights
in basis points), so whitespace, comments, key order and spelling (``10m`` vs ``600``) do not change
it, while any change to a criterion does.

:meth:`RolloutSpec.to_stats_specs` maps the metric criteria onto the statistics core's
:class:`~lockgate.controller.stats.MetricSpec` (imported lazily: parsing needs no numpy).

The package, by concern: :mod:`.catalogue` (built-in metrics, field names, defaults and limits),
:mod:`.model` (the typed, validated :class:`RolloutSpec` and its hash), :mod:`.parsing` (YAML → spec,
every rule, file:line:col messages) and :mod:`.document` (the file format as typed pydantic models, from
which ``lockgate schema`` generates the JSON Schema; imported only for the schema). Every public name is
importable from here.
"""

from __future__ import annotations

from lockgate.controller.decide.spec.catalogue import *  # noqa: F401,F403  (constants and MetricDef)
from lockgate.controller.decide.spec.catalogue import BUILTIN_METRICS, NAME_RE, SPEC_FORMAT, MetricDef
from lockgate.controller.decide.spec.model import (
    DEFAULT_STEPS,
    MetricCriterion,
    PromotionPolicy,
    RolloutSpec,
    Step,
    canonical_json,
)
from lockgate.controller.decide.spec.parsing import (
    format_duration,
    load_spec,
    parse_duration,
    parse_spec,
    render_warning,
    spec_from_text,
    spec_hash,
)
from lockgate.yamlconf import ConfigError, format_path

__all__ = ["BUILTIN_METRICS", "ConfigError", "DEFAULT_STEPS", "MetricCriterion", "MetricDef", "NAME_RE",
           "PromotionPolicy", "RolloutSpec", "SPEC_FORMAT", "Step", "canonical_json", "format_duration",
           "format_path", "load_spec", "parse_duration", "parse_spec", "render_warning", "spec_from_text",
           "spec_hash"]
