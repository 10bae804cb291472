"""JSON Schema (draft 2020-12) of the rollout spec, for editors (``lockgate schema`` prints it).

Built from the parser's own tables (:mod:`lockgate.controller.decide.spec`), so metric names, field names and
enums cannot drift apart; ``tests/unit/test_rollout_spec.py`` checks both directions. The schema is an
editing aid — it cannot express every rule (0.01 % weight resolution, strictly increasing steps,
accuracy needing per-class metrics, the sum of per-metric alphas, model/version existence); ``lockgate
validate`` is authoritative.

To use it in VS Code (redhat.vscode-yaml): ``lockgate schema > rollout.schema.json`` and add
``# yaml-language-server: $schema=./rollout.schema.json`` as the first line of a rollout file.
"""

from __future__ import annotations

import json
from typing import Any

from lockgate.controller.decide import spec as S
SCHEMA_ID = "urn:lockgate:rollout-spec:v1"

_DURATION = {
    "description": "A duration: 90s, 10m, 1.5h, 2d, 1h30m, or a plain number of seconds.",
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*((\d+(\.\d+)?\s*[dhmsDHMS])+|\d+(\.\d+)?)\s*$"},
    ],
}


def _metric_schema() -> dict[str, Any]:
    names = list(S.BUILTIN_METRICS)
    per_class = [n for n, d in S.BUILTIN_METRICS.items() if d.per_class]
    fractions = [n for n, d in S.BUILTIN_METRICS.items() if d.fraction]
    not_quantile = [n for n in names if n not in S.QUANTILE_METRICS]
    table = "; ".join(f"{n}: {d.kind}, harmful {d.harmful}" for n, d in S.BUILTIN_METRICS.items())
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "allowed"],
        "properties": {
            "name": {"enum": names, "description": f"A built-in metric ({table})."},
            "class": {"type": "string", "minLength": 1,
                      "description": "The class watched by class_recall / class_precision (required for "
                                     "them, not allowed for other metrics)."},
            "gating": {"type": "boolean", "default": True,
                       "description": "Gating metrics can roll back and must pass for promotion; "
                                      "false = informational."},
            "harmful": {"enum": list(S.HARMFUL),
                        "description": "Direction in which a change hurts (default: the metric's own; class "
                                       "metrics are always 'decrease')."},
            "allowed": {
                "description": "The change users accept, in the harmful direction: the canary is rolled back "
                               "once shown worse than the baseline beyond it, and promoted only once every "
                               "gating metric is shown within it.",
                "oneOf": [
                    {"const": "auto", "description": "Derived from the baseline's historical variance."},
                    {"type": "object", "additionalProperties": False, "required": ["absolute"],
                     "properties": {"absolute": {"type": "number", "minimum": 0,
                                                 "description": "In the metric's units; rates and class "
                                                                "metrics as fractions (0.01 = 1 point)."}}},
                    {"type": "object", "additionalProperties": False, "required": ["relative"],
                     "properties": {"relative": {"type": "number", "minimum": 0, "maximum": S.MAX_RELATIVE,
                                                 "description": "A fraction of the baseline value "
                                                                "(0.10 = 10 %)."}}},
                    {"type": "object", "additionalProperties": False, "required": ["exceedance_ratio"],
                     "properties": {"exceedance_ratio": {
                         "type": "number", "minimum": 1, "maximum": S.MAX_EXCEEDANCE_RATIO,
                         "description": "Quantile metrics only (" + ", ".join(S.QUANTILE_METRICS) + "): at most "
                                        "R x the baseline's share of canary requests beyond the baseline's "
                                        "quantile (p95 with 1.2: 6 % instead of 5 %); 1 = no change allowed."}}},
                ],
            },
            "alpha": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": S.MAX_ALPHA,
                      "description": "This metric's explicit share of the rollout's alpha (less than it); the "
                                     "explicit shares of the gating metrics must leave some for the others. "
                                     "Default: an even split."},
            "family": {"type": "string", "pattern": S.NAME_RE.pattern,
                       "description": "Gating metrics with the same family (e.g. every class_recall class) share "
                                      "one metric's share of alpha, split evenly among them."},
        },
        "allOf": [
            {"if": {"properties": {"name": {"enum": per_class}}, "required": ["name"]},
             "then": {"required": ["class"], "properties": {"harmful": {"const": "decrease"}}},
             "else": {"not": {"required": ["class"]}}},
            {"if": {"properties": {"name": {"enum": fractions}}, "required": ["name"]},
             "then": {"properties": {"allowed": {"properties": {"absolute": {"maximum": 1}}}}}},
            {"if": {"properties": {"name": {"enum": not_quantile}}, "required": ["name"]},
             "then": {"properties": {"allowed": {"not": {"type": "object", "required": ["exceedance_ratio"]}}}}},
        ],
    }


def rollout_schema() -> dict[str, Any]:
    """The schema as a dict (JSON-serialisable)."""
    step = {
        "type": "object",
        "additionalProperties": False,
        "required": ["weight_percent"],
        "properties": {
            "weight_percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 100,
                               "description": "Canary share of the model's traffic in percent, resolution 0.01; "
                                              "strictly increasing from step to step. A last step of 100 is the "
                                              "promotion itself (it takes no other fields)."},
            "min_duration": {**_DURATION, "default": S.format_duration(S.DEFAULT_STEP_MIN_DURATION_S),
                             "description": "Least time at this stage. " + _DURATION["description"]},
            "min_canary_samples": {"type": "integer", "minimum": 0, "default": S.DEFAULT_STEP_MIN_CANARY_SAMPLES,
                                   "description": "Least canary observations at this stage."},
        },
    }
    promotion = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "require_non_inferiority": {"type": "boolean", "default": True,
                                        "description": "Promotion to 100 % needs every gating metric shown "
                                                       "within its allowed change."},
            "max_duration": {**_DURATION, "default": S.format_duration(S.DEFAULT_MAX_DURATION_S),
                             "description": "Wall-clock budget of the whole rollout; then it holds as "
                                            "'inconclusive' for a human. " + _DURATION["description"]},
            "preflight": {"enum": list(S.PREFLIGHTS), "default": S.DEFAULT_PREFLIGHT,
                          "description": "drill: prove the revert path before the first stage."},
        },
    }
    rollout = {
        "type": "object",
        "additionalProperties": False,
        "required": ["model", "canary", "metrics"],
        "properties": {
            "model": {"type": "string", "pattern": S.NAME_RE.pattern, "description": "A model in lockgate.yaml."},
            "canary": {"type": "string", "pattern": S.NAME_RE.pattern,
                       "description": "The canary version (the baseline is the model's stable version)."},
            "analysis_interval_s": {"type": "number", "minimum": 1, "maximum": S.MAX_ANALYSIS_INTERVAL_S,
                                    "default": S.DEFAULT_ANALYSIS_INTERVAL_S,
                                    "description": "Seconds between evaluations."},
            "alpha": {"type": "number", "exclusiveMinimum": 0, "maximum": S.MAX_ALPHA, "default": S.DEFAULT_ALPHA,
                      "description": "False-rollback budget across all gating metrics together, over the whole "
                                     "rollout; split evenly over the gating metrics unless metrics set their "
                                     "own alpha or family."},
            "steps": {"type": "array", "minItems": 1, "items": step,
                      "description": "Stages (default: 1, 5, 20, 50 % then promotion to 100 %)."},
            "promotion": promotion,
            "metrics": {"type": "array", "minItems": 1, "items": _metric_schema(),
                        "description": "At least one must be gating."},
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "lockgate rollout spec",
        "description": "One progressive canary rollout (docs/rollout-spec.md). `lockgate validate FILE` is "
                       "authoritative; this schema is an editing aid.",
        "type": "object",
        "additionalProperties": False,
        "required": ["rollout"],
        "properties": {"rollout": rollout},
    }


def schema_json(indent: int = 2) -> str:
    return json.dumps(rollout_schema(), indent=indent, ensure_ascii=False) + "\n"


__all__ = ["SCHEMA_ID", "rollout_schema", "schema_json"]
