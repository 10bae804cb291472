"""Rollout spec (lockgate/controller/decide/spec.py): parsing, defaults, every problem with line and path,
the lock hash, the JSON Schema and the mapping onto the statistics core."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockgate.cli import main
from lockgate.config import config_from_text, load_config
from lockgate.controller.decide import spec as S
from lockgate.controller.decide.spec import (
    BUILTIN_METRICS,
    DEFAULT_STEPS,
    ConfigError,
    MetricCriterion,
    PromotionPolicy,
    RolloutSpec,
    Step,
    load_spec,
    parse_duration,
    spec_from_text,
    spec_hash,
)
from lockgate.controller.decide.spec_schema import rollout_schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "rollouts").glob("*.yaml"))

ISSUE_EXAMPLE = """
rollout:
  model: chat                 # a model in lockgate.yaml
  canary: v2
  analysis_interval_s: 30
  alpha: 0.01
  steps:
    - {weight_percent: 1,  min_duration: 10m, min_canary_samples: 200}
    - {weight_percent: 5,  min_duration: 30m, min_canary_samples: 1000}
    - {weight_percent: 20, min_duration: 1h,  min_canary_samples: 3000}
    - {weight_percent: 50, min_duration: 1h,  min_canary_samples: 5000}
  promotion:
    require_non_inferiority: true
    max_duration: 24h
    preflight: none
  metrics:
    - {name: error_rate, gating: true, harmful: increase, allowed: {absolute: 0.005}}
    - {name: latency_p95, gating: true, allowed: {relative: 0.10}}
    - {name: output_tokens, gating: false, allowed: auto}
    - {name: refusal_rate, gating: true, allowed: {relative: 0.5}}
    - {name: class_recall, class: fraud, gating: true, allowed: {absolute: 0.02}}
"""

MINIMAL = """
rollout:
  model: chat
  canary: v2
  metrics:
    - {name: error_rate, allowed: {absolute: 0.01}}
"""

CONFIG = """
state_dir: /tmp/lg-spec-test
models:
  - name: chat
    stable: v1
    versions:
      v1: {endpoints: ["127.0.0.1:8001"]}
      v2: {endpoints: ["127.0.0.1:8002"]}
      v3: {endpoints: ["127.0.0.1:8003"]}
  - name: cls
    match: {path_prefix: /v1/classify}
    stable: a
    versions: {a: {endpoints: ["127.0.0.1:9000"]}}
"""


def problems(text: str, config=None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        spec_from_text(text, "r.yaml", config)
    return str(exc.value).splitlines()


def one_problem(text: str, config=None) -> str:
    lines = problems(text, config)
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------- good specs


def test_issue_example_parses():
    spec = spec_from_text(ISSUE_EXAMPLE, "r.yaml")
    assert (spec.model, spec.canary, spec.alpha, spec.analysis_interval_s) == ("chat", "v2", 0.01, 30.0)
    assert [s.weight_bp for s in spec.steps] == [100, 500, 2000, 5000]
    assert spec.steps[1] == Step(500, 1800.0, 1000) and spec.steps[1].weight_percent == 5
    assert spec.promotion == PromotionPolicy(True, 86400.0, "none")
    err, p95, tokens, refusal, recall = spec.metrics
    assert err == MetricCriterion("error_rate", "rate", "increase", "absolute", 0.005, True, None, None, "error", "")
    assert (p95.kind, p95.quantile, p95.allowed_mode, p95.allowed, p95.unit) == ("quantile", 0.95, "relative", 0.1,
                                                                                   "ms")
    assert (tokens.gating, tokens.allowed_mode, tokens.allowed) == (False, "auto", None)
    assert refusal.harmful == "increase" and refusal.column == "refusal"
    assert (recall.key, recall.harmful, recall.cls) == ("class_recall[fraud]", "decrease", "fraud")
    assert len(spec.gating_metrics) == 4 and spec.alpha_per_metric == pytest.approx(0.0025)
    assert spec.summary() == "model chat, canary v2, 4 stages + promotion, 5 metrics (4 gating)"
    assert spec.warnings == ()
    assert len(spec.sha256) == 64 and spec.source == "r.yaml"


def test_defaults():
    spec = spec_from_text(MINIMAL)
    assert spec.steps == DEFAULT_STEPS
    assert [s.weight_percent for s in spec.steps] == [1, 5, 20, 50]
    assert spec.alpha == S.DEFAULT_ALPHA and spec.analysis_interval_s == S.DEFAULT_ANALYSIS_INTERVAL_S
    assert spec.promotion == PromotionPolicy(True, 86400.0, "drill")
    (m,) = spec.metrics
    assert m.gating and m.harmful == "increase"


def test_step_defaults_fractional_weights_and_explicit_100_step():
    spec = spec_from_text("""
rollout:
  model: chat
  canary: v2
  steps: [{weight_percent: 0.25}, {weight_percent: 12.5, min_duration: 90}, {weight_percent: 100}]
  metrics: [{name: error_rate, allowed: {absolute: 0.01}}]
""")
    assert spec.steps == (Step(25, S.DEFAULT_STEP_MIN_DURATION_S, S.DEFAULT_STEP_MIN_CANARY_SAMPLES),
                          Step(1250, 90.0, S.DEFAULT_STEP_MIN_CANARY_SAMPLES))
    assert spec.summary().startswith("model chat, canary v2, 2 stages + promotion")
    # the explicit 100 % step means exactly what leaving it out means
    without = spec_from_text("""
rollout:
  model: chat
  canary: v2
  steps: [{weight_percent: 0.25}, {weight_percent: 12.5, min_duration: 90}]
  metrics: [{name: error_rate, allowed: {absolute: 0.01}}]
""")
    assert without.sha256 == spec.sha256


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("10m", 600), ("1.5h", 5400), ("2d", 172800), ("1h30m", 5400), ("45", 45), ("0", 0),
    (" 10 m ", 600), ("1H", 3600), (120, 120), (2.5, 2.5),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10", "x", "1x", "-5m", "m", "1.h", True, None, [1], float("inf"), float("nan"),
                                 -1, "400d", 10**400])
def test_bad_durations(bad):
    if bad == "10":
        assert parse_duration(bad) == 10  # plain seconds as a string are fine
        return
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_examples_parse_against_the_example_config():
    config = load_config(ROOT / "examples" / "lockgate.yaml")
    assert {p.name for p in EXAMPLES} >= {"chat-v2.yaml", "classifier-v2.yaml"}
    for path in EXAMPLES:
        spec = load_spec(path, config)
        assert spec.warnings == (), (path, spec.warnings)
        model = config.model(spec.model)
        assert spec.canary in model.versions and spec.canary != model.stable
    chat = load_spec(ROOT / "examples" / "rollouts" / "chat-v2.yaml")
    assert {m.name for m in chat.metrics} == {"error_rate", "latency_p95", "ttft_p95", "output_tokens",
                                              "refusal_rate", "evaluator_score"}
    cls = load_spec(ROOT / "examples" / "rollouts" / "classifier-v2.yaml")
    keys = {m.key: m for m in cls.metrics}
    assert keys["class_recall[fraud]"].gating and keys["class_precision[fraud]"].gating
    assert not keys["accuracy"].gating
    # the other classes' recall as one family: together one metric's share of alpha
    assert {k for k, m in keys.items() if m.family == "other-recall"} == \
        {"class_recall[billing]", "class_recall[technical]", "class_recall[account]"}
    assert cls.alphas["class_recall[billing]"] == pytest.approx(cls.alphas["class_recall[fraud]"] / 3)
    assert keys["latency_p99"].allowed_mode == "exceedance_ratio"


# ----------------------------------------------------------------------------- errors


def test_every_kind_of_error_with_line_column_and_path():
    text = """\
rollout:
  model: chatt
  canary: v9
  alpha: 0
  analysis_interval_s: 0.5
  steps:
    - {weigth_percent: 1, min_duration: 10m}
    - {weight_percent: 5.005, min_duration: -3}
    - {weight_percent: 20, min_duration: 1x, min_canary_samples: -1}
    - {weight_percent: 10}
    - {weight_percent: 100, min_duration: 1h}
  promotion:
    require_non_inferiority: maybe
    max_duration: 0
    preflight: dril
  metrics:
    - {name: eror_rate, allowed: {absolute: 0.005}}
    - {name: latency_p95, allowed: {relative: 10%}}
    - {name: class_recall, allowed: {absolute: 0.02}}
    - {name: accuracy, class: fraud, allowed: auto}
    - {name: class_precision, class: fraud, harmful: increase, allowed: {absolute: 2}}
    - {name: evaluator_score, allowed: {relative: 1.0}}
    - {name: refusal_rate, allowed: {absolute: 0.1, relative: 0.1}}
    - {name: refusal_rate, allowed: auto}
    - {name: refusal_rate, allowed: auto, extra: 1}
    - {name: entropy}
    - {name: class_recall, class: 3, allowed: {absolute: .inf}}
  extra: 3
"""
    config = config_from_text(CONFIG, "lg.yaml")
    lines = problems(text, config)
    out = "\n".join(lines)
    expect = [
        ("r.yaml:2:10: rollout.model: model 'chatt' is not in lg.yaml (models: chat, cls)"),
        ("r.yaml:4:10: rollout.alpha: must be greater than 0"),
        ("r.yaml:5:24: rollout.analysis_interval_s: must be at least 1"),
        ("r.yaml:7:7: rollout.steps[0].weight_percent: is required"),
        ("r.yaml:7:24: rollout.steps[0].weigth_percent: unknown field (did you mean 'weight_percent'? known: "
         "approval, checks, min_canary_samples, min_duration, weight_percent)"),
        ("r.yaml:8:24: rollout.steps[1].weight_percent: resolution is 0.01 %, got 5.005"),
        ("r.yaml:8:45: rollout.steps[1].min_duration: must not be negative"),
        ("r.yaml:9:42: rollout.steps[2].min_duration: must be a duration such as 90s"),
        ("r.yaml:9:66: rollout.steps[2].min_canary_samples: must be between 0 and"),
        ("r.yaml:10:24: rollout.steps[3].weight_percent: must be greater than the previous step's 20 %"),
        ("r.yaml:11:7: rollout.steps[4]: the 100 % step is the promotion"),
        ("r.yaml:13:30: rollout.promotion.require_non_inferiority: must be true or false"),
        ("r.yaml:14:19: rollout.promotion.max_duration: must be longer than 0"),
        ("r.yaml:15:16: rollout.promotion.preflight: must be one of none, drill, got 'dril'"),
        ("r.yaml:17:14: rollout.metrics[0].name: unknown metric 'eror_rate' (did you mean 'error_rate'?"),
        ("r.yaml:18:47: rollout.metrics[1].allowed.relative: must be a number, got a string (write percentages as "
         "fractions: 0.1 for 10%)"),
        ("r.yaml:19:7: rollout.metrics[2]: class_recall is per class: set class:"),
        ("r.yaml:20:31: rollout.metrics[3].class: only class_recall and class_precision take a class, not accuracy"),
        ("r.yaml:21:54: rollout.metrics[4].harmful: class_precision is harmful when it decreases"),
        ("r.yaml:21:84: rollout.metrics[4].allowed.absolute: must be at least 0 and at most 1 (a fraction"),
        ("r.yaml:22:51: rollout.metrics[5].allowed.relative: must be at least 0 and less than 1"),
        ("r.yaml:23:37: rollout.metrics[6].allowed: must be {absolute: X}, {relative: X}"),
        ("r.yaml:25:7: rollout.metrics[8]: duplicate metric refusal_rate (also metrics[7])"),
        ("r.yaml:25:50: rollout.metrics[8].extra: unknown field (known: allowed, alpha, class, family, gating, "
         "harmful, name, prometheus)"),
        ("r.yaml:26:7: rollout.metrics[9].allowed: is required"),
        ("r.yaml:27:35: rollout.metrics[10].class: must be a string (quote numeric class names"),
        ("r.yaml:27:58: rollout.metrics[10].allowed.absolute: must be a finite number"),
        ("r.yaml:28:10: rollout.extra: unknown field (known: alpha, analysis_interval_s, canary, capacity, cohorts, metrics, "
         "model, promotion, shadow, steps)"),
    ]
    for e in expect:
        assert any(line.startswith(e) for line in lines), f"missing: {e}\n--- got:\n{out}"
    assert len(lines) == len(expect), out
    # sorted by position in the file
    pos = [tuple(int(x) for x in line.split(":")[1:3]) for line in lines]
    assert pos == sorted(pos)


def test_not_a_mapping_and_empty_files():
    assert one_problem("") == "r.yaml: rollout: is required (the file is empty)"
    assert "r.yaml:1:1: <root>: must be a mapping, got a list" in problems("[1, 2]")
    assert one_problem("rollout: 3\n").startswith("r.yaml:1:10: rollout: must be a mapping, got an integer")
    assert one_problem("rollout: {model: chat, canary: v2, metrics: []}\n") == \
        "r.yaml:1:45: rollout.metrics: must list at least one metric"
    assert "steps: must list at least one step" in one_problem(
        "rollout: {model: chat, canary: v2, steps: [], metrics: [{name: error_rate, allowed: auto}]}")
    assert "invalid YAML" in one_problem("rollout: {model: [\n")
    lines = problems("rolout: {}\n")
    assert "r.yaml:1:1: rollout: is required" in lines
    assert "r.yaml:1:9: rolout: unknown field (did you mean 'rollout'? known: rollout)" in lines


def test_required_fields():
    lines = problems("rollout: {}\n")
    assert [line.split(": ", 2)[1] for line in lines] == ["rollout.model", "rollout.canary", "rollout.metrics"]
    assert all(line.endswith("is required") for line in lines)


def test_model_and_version_checked_against_config():
    config = config_from_text(CONFIG, "lg.yaml")
    def base(v):
        return MINIMAL.replace("canary: v2", f"canary: {v}")

    assert spec_from_text(base("v3"), "r.yaml", config).canary == "v3"
    line = one_problem(base("v1"), config)
    assert line == ("r.yaml:4:11: rollout.canary: 'v1' is chat's stable version (the baseline) in lg.yaml; "
                    "other versions: v2, v3")
    line = one_problem(base("v7"), config)
    assert line == "r.yaml:4:11: rollout.canary: chat has no version 'v7' in lg.yaml (versions: v1, v2, v3; stable v1)"
    line = one_problem(MINIMAL.replace("model: chat", "model: cls").replace("canary: v2", "canary: a"), config)
    assert "'a' is cls's stable version" in line and "add the canary version to it first" in line
    # without a config, the same spec is fine
    assert spec_from_text(base("v7")).canary == "v7"


def test_accuracy_gating_needs_per_class_metrics():
    acc = """
rollout:
  model: cls
  canary: b
  metrics:
    - {name: accuracy, allowed: {absolute: 0.01}}
"""
    line = one_problem(acc)
    assert line.startswith("r.yaml:6:7: rollout.metrics[0]: aggregate accuracy must never stand in for "
                           "per-class metrics")
    with_recall = acc + "    - {name: class_recall, class: fraud, allowed: {absolute: 0.02}}\n"
    assert len(spec_from_text(with_recall).gating_metrics) == 2
    informational = acc.replace("{name: accuracy,", "{name: accuracy, gating: false,") + \
        "    - {name: error_rate, allowed: {absolute: 0.01}}\n"
    assert spec_from_text(informational).metric("accuracy").gating is False
    # but a non-gating per-class metric is not enough
    nongating = acc + "    - {name: class_recall, class: fraud, gating: false, allowed: {absolute: 0.02}}\n"
    assert "aggregate accuracy must never stand in" in one_problem(nongating)


def test_needs_a_gating_metric_and_budget_for_the_steps():
    line = one_problem(MINIMAL.replace("allowed:", "gating: false, allowed:"))
    assert line.startswith("r.yaml:6:5: rollout.metrics: at least one metric must be gating")
    line = one_problem(MINIMAL + "  promotion: {max_duration: 2h}\n")
    assert line == ("r.yaml:7:32: rollout.promotion.max_duration: 2h is shorter than the default steps' "
                    "min_duration together (3.33333h): the rollout could never be promoted") or \
        "is shorter than the default steps' min_duration together" in line


def test_warnings():
    spec = spec_from_text(MINIMAL.replace("0.01}", "0}") + """\
    - {name: class_precision, class: fraud, allowed: {absolute: 0.05}}
  promotion: {require_non_inferiority: false}
""", "r.yaml")
    text = [S.render_warning(w, "r.yaml") for w in spec.warnings]
    assert len(text) == 2
    assert text[0].startswith("r.yaml:7:7: rollout.metrics[1]: warning: precision of 'fraud' without its recall")
    assert text[1].startswith("r.yaml:8:40: rollout.promotion.require_non_inferiority: warning: false:")
    # allowed 0 on a gating metric while non-inferiority is required
    spec = spec_from_text(MINIMAL.replace("0.01}", "0}"))
    (w,) = spec.warnings
    assert w.path == "rollout.metrics[0].allowed" and "strictly better" in w.message


def test_yaml_1_1_quirks_are_handled():
    # 1e-2 is a string in YAML 1.1; accepted as the number it looks like
    spec = spec_from_text(MINIMAL.replace("canary: v2", "canary: v2\n  alpha: 1e-2"))
    assert spec.alpha == 0.01
    # a class that looks like a number must be quoted
    line = one_problem(MINIMAL + "    - {name: class_recall, class: 1, allowed: {absolute: 0.02}}\n")
    assert 'quote numeric class names: class: "1"' in line


# ----------------------------------------------------------------------------- hash


def test_hash_ignores_formatting_and_changes_with_criteria():
    h = spec_hash(ISSUE_EXAMPLE)
    assert h == spec_from_text(ISSUE_EXAMPLE).sha256
    reformatted = yaml.safe_dump(yaml.safe_load(ISSUE_EXAMPLE), default_flow_style=False, sort_keys=True)
    assert spec_hash(reformatted) == h
    # comments, flow style, spelling of the same values, explicit defaults
    same = ISSUE_EXAMPLE.replace("# a model in lockgate.yaml", "# changed comment") \
        .replace("min_duration: 10m", "min_duration: 600") \
        .replace("min_duration: 30m", "min_duration: 0.5h") \
        .replace("{relative: 0.10}", "{relative: 1.0e-1}") \
        .replace("alpha: 0.01", "alpha: 0.010") \
        .replace("gating: true, harmful: increase, allowed", "allowed")
    assert spec_hash(same) == h
    changes = [
        ("{absolute: 0.005}", "{absolute: 0.006}"),
        ("{relative: 0.10}", "{absolute: 0.10}"),
        ("gating: false", "gating: true"),
        ("alpha: 0.01", "alpha: 0.02"),
        ("min_canary_samples: 1000", "min_canary_samples: 1001"),
        ("weight_percent: 20", "weight_percent: 25"),
        ("max_duration: 24h", "max_duration: 25h"),
        ("preflight: none", "preflight: drill"),
        ("canary: v2", "canary: v3"),
        ("class: fraud", "class: spam"),
        ("analysis_interval_s: 30", "analysis_interval_s: 31"),
        ("{name: latency_p95, gating: true,", "{name: latency_p99, gating: true,"),
        ("{name: output_tokens, gating: false,", "{name: output_tokens, gating: false, harmful: decrease,"),
    ]
    seen = {h}
    for old, new in changes:
        assert old in ISSUE_EXAMPLE, old
        changed = spec_hash(ISSUE_EXAMPLE.replace(old, new, 1))
        assert changed not in seen, (old, new)
        seen.add(changed)
    # metric order is part of the spec (it is the order verdicts are reported in)
    assert spec_from_text(ISSUE_EXAMPLE).canonical_json() == S.canonical_json(json.loads(
        spec_from_text(ISSUE_EXAMPLE).canonical_json()))


def test_hash_of_specs_without_the_new_fields_is_stable():
    # Pinned: alpha, family and exceedance_ratio enter the canonical form only when set, so specs written
    # before they existed keep the hash they were locked with.
    assert spec_hash(ISSUE_EXAMPLE) == "f049d543ec1ca444263a217a8fcc7962ab93ca498e15ffe0c2549d0338991696"
    assert spec_hash(MINIMAL) == "eb05c4e37df102e6a17356c824b381f931f765db74f580843099f50868776889"
    assert all(set(m) == {"name", "class", "gating", "harmful", "allowed_mode", "allowed"}
               for m in spec_from_text(ISSUE_EXAMPLE).canonical()["metrics"])
    # and each new field, once set, is part of it
    h = spec_hash(ISSUE_EXAMPLE)
    seen = {h}
    for old, new in [
        ("{name: error_rate, gating: true,", "{name: error_rate, gating: true, alpha: 0.004,"),
        ("{name: error_rate, gating: true,", "{name: error_rate, gating: true, alpha: 0.005,"),
        ("{name: error_rate, gating: true,", "{name: error_rate, gating: true, family: a,"),
        ("{name: error_rate, gating: true,", "{name: error_rate, gating: true, family: b,"),
        ("{relative: 0.10}", "{exceedance_ratio: 1.1}"),
        ("{relative: 0.10}", "{exceedance_ratio: 1.2}"),
    ]:
        changed = spec_hash(ISSUE_EXAMPLE.replace(old, new, 1))
        assert changed not in seen, new
        seen.add(changed)


def test_hash_of_invalid_spec_raises():
    with pytest.raises(ConfigError):
        spec_hash("rollout: {}")


# ----------------------------------------------------------------------------- exceedance ratio, alpha, family

NEW_FIELDS = """\
rollout:
  model: cls
  canary: b
  alpha: 0.01
  metrics:
    - {name: latency_p95, allowed: {exceedance_ratio: 1.2}}
    - {name: error_rate, alpha: 0.004, allowed: {absolute: 0.01}}
    - {name: class_recall, class: fraud, family: recall, allowed: {absolute: 0.02}}
    - {name: class_recall, class: billing, family: recall, allowed: {absolute: 0.03}}
    - {name: class_recall, class: account, family: recall, allowed: {absolute: 0.03}}
    - {name: accuracy, gating: false, allowed: {absolute: 0.01}}
"""


def test_exceedance_ratio_alpha_and_family_parse():
    from lockgate.controller.stats import MetricSpec, split_alpha

    spec = spec_from_text(NEW_FIELDS, "r.yaml")
    assert spec.warnings == ()
    p95, err, fraud, billing, account, acc = spec.metrics
    assert (p95.allowed_mode, p95.allowed, p95.alpha, p95.family) == ("exceedance_ratio", 1.2, None, None)
    assert p95.describe_allowed() == "exceedance ratio 1.2 (at most 6% of canary requests above the baseline's p95)"
    assert (err.alpha, err.family) == (0.004, None) and err.describe_allowed() == "+0.01"
    assert {m.family for m in (fraud, billing, account)} == {"recall"}
    # alphas: error_rate its explicit 0.004; the rest (0.006) evenly over 2 units (latency_p95, the recall
    # family); the family's share evenly over its 3 members; a non-gating metric an even share, never deciding
    a = spec.alphas
    assert a == pytest.approx({"latency_p95": 0.003, "error_rate": 0.004, "class_recall[fraud]": 0.001,
                               "class_recall[billing]": 0.001, "class_recall[account]": 0.001, "accuracy": 0.003})
    assert sum(v for k, v in a.items() if spec.metric(k).gating) == pytest.approx(spec.alpha)
    assert spec.alpha_per_metric == pytest.approx(0.01 / 5)  # still the even share
    # the statistics core gets the same mode, alpha and family, and splits alpha the same way
    specs = spec.to_stats_specs()
    by = {s.name: s for s in specs}
    assert (by["latency_p95"].allowed_mode, by["latency_p95"].allowed, by["latency_p95"].quantile) == \
        ("exceedance_ratio", 1.2, 0.95)
    assert by["error_rate"].alpha == 0.004 and by["class_recall[billing]"].family == "recall"
    assert split_alpha(specs, spec.alpha) == pytest.approx(a)
    assert isinstance(by["latency_p95"], MetricSpec)
    # canonical form: the new fields appear exactly where they are set
    canon = {m["name"] + (f"[{m['class']}]" if m["class"] else ""): m for m in spec.canonical()["metrics"]}
    assert canon["error_rate"]["alpha"] == 0.004 and "family" not in canon["error_rate"]
    assert canon["class_recall[fraud]"]["family"] == "recall" and "alpha" not in canon["class_recall[fraud]"]
    assert canon["latency_p95"]["allowed_mode"] == "exceedance_ratio" and set(canon["latency_p95"]) == \
        {"name", "class", "gating", "harmful", "allowed_mode", "allowed"}
    # every quantile metric takes a ratio; a harmful decrease counts requests below the quantile
    for name in S.QUANTILE_METRICS:
        m = spec_from_text(MINIMAL.replace("error_rate, allowed: {absolute: 0.01}",
                                           f"{name}, allowed: {{exceedance_ratio: 1.5}}")).metrics[0]
        assert m.allowed_mode == "exceedance_ratio" and m.to_stats_spec().allowed == 1.5
    m = spec_from_text(MINIMAL.replace("error_rate, allowed: {absolute: 0.01}",
                                       "latency_p50, harmful: decrease, allowed: {exceedance_ratio: 1.5}")).metrics[0]
    assert m.describe_allowed() == "exceedance ratio 1.5 (at most 75% of canary requests below the baseline's p50)"
    # a single gating metric may not take all of the rollout's alpha (leave alpha out for that)...
    one = MINIMAL.replace("error_rate, allowed", "error_rate, alpha: 0.05, allowed")
    assert "rollout.metrics[0].alpha: must be greater than 0 and less than 0.05" in one_problem(one)
    # ...but explicit alphas may add up to all of it when no other gating metric is left without one
    two = MINIMAL + "    - {name: latency_p95, alpha: 0.02, allowed: {relative: 0.1}}\n"
    two = two.replace("error_rate, allowed", "error_rate, alpha: 0.03, allowed")
    assert spec_from_text(two).alphas == pytest.approx({"error_rate": 0.03, "latency_p95": 0.02})


@pytest.mark.parametrize("metric, expect", [
    ("{name: error_rate, allowed: {exceedance_ratio: 1.2}}",
     "r.yaml:6:54: rollout.metrics[0].allowed.exceedance_ratio: exceedance_ratio is for quantile metrics only "
     "(latency_p50, latency_p95, latency_p99, ttft_p95); error_rate is a rate metric: use absolute or relative"),
    ("{name: output_tokens, allowed: {exceedance_ratio: 1.2}}",
     "r.yaml:6:57: rollout.metrics[0].allowed.exceedance_ratio: exceedance_ratio is for quantile metrics only "
     "(latency_p50, latency_p95, latency_p99, ttft_p95); output_tokens is a mean metric"),
    ("{name: latency_p95, allowed: {exceedance_ratio: 0.9}}",
     "r.yaml:6:55: rollout.metrics[0].allowed.exceedance_ratio: must be at least 1 and at most 10 (at most R x the "
     "baseline's share of requests beyond its p95; 1 = no change allowed), got 0.9"),
    ("{name: latency_p95, allowed: {exceedance_ratio: 12}}",
     "r.yaml:6:55: rollout.metrics[0].allowed.exceedance_ratio: must be at least 1 and at most 10"),
    ("{name: latency_p95, allowed: {exceedance_ratio: 1.2x}}",
     "r.yaml:6:55: rollout.metrics[0].allowed.exceedance_ratio: must be a number, got a string"),
    ("{name: latency_p50, allowed: {exceedance_ratio: 2}}",
     "r.yaml:6:55: rollout.metrics[0].allowed.exceedance_ratio: 2 x the baseline's 50% of requests above its p50 "
     "allows every canary request above it: nothing could be worse than that (use less than 2)"),
    ("{name: latency_p95, harmful: decrease, allowed: {exceedance_ratio: 1.1}}",
     "r.yaml:6:74: rollout.metrics[0].allowed.exceedance_ratio: 1.1 x the baseline's 95% of requests below its p95 "
     "allows every canary request below it"),
    ("{name: latency_p95, allowed: {exceedance_ratio: 1.2, relative: 0.1}}",
     "r.yaml:6:36: rollout.metrics[0].allowed: must be {absolute: X}, {relative: X} (a fraction: 0.10 = 10 %), "
     "{exceedance_ratio: R} or auto: exactly one of absolute, relative or exceedance_ratio, got exceedance_ratio, "
     "relative"),
    ("{name: error_rate, alpha: 0.01, allowed: {absolute: 0.01}}",
     "r.yaml:6:33: rollout.metrics[0].alpha: must be greater than 0 and less than 0.01 (this metric's share of the "
     "rollout's alpha 0.01; leave it out for an even split), got 0.01"),
    ("{name: error_rate, alpha: 0, allowed: {absolute: 0.01}}",
     "r.yaml:6:33: rollout.metrics[0].alpha: must be greater than 0 and less than 0.01"),
    ("{name: error_rate, alpha: 1%, allowed: {absolute: 0.01}}",
     "r.yaml:6:33: rollout.metrics[0].alpha: must be a number, got a string (write percentages as fractions: "
     "0.01 for 1%)"),
    ("{name: error_rate, family: two words, allowed: {absolute: 0.01}}",
     "r.yaml:6:34: rollout.metrics[0].family: must be a family name matching ^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$ "
     "(letters, digits, _ and -; e.g. family: recall), got 'two words'"),
    ("{name: error_rate, family: 3, allowed: {absolute: 0.01}}",
     "r.yaml:6:34: rollout.metrics[0].family: must be a family name matching"),
    ("{name: error_rate, alpha: 0.001, family: f, allowed: {absolute: 0.01}}",
     "r.yaml:6:33: rollout.metrics[0].alpha: alpha and family together: the members of family 'f' share one "
     "metric's share of alpha evenly; give this metric its own alpha or put it in the family, not both"),
])
def test_bad_exceedance_ratio_alpha_and_family(metric, expect):
    text = f"rollout:\n  model: m\n  canary: c\n  alpha: 0.01\n  metrics:\n    - {metric}\n"
    assert one_problem(text).startswith(expect), one_problem(text)


def test_explicit_alphas_must_leave_some_for_the_other_gating_metrics():
    base = """\
rollout:
  model: m
  canary: c
  alpha: 0.01
  metrics:
    - {name: error_rate, alpha: A1, allowed: {absolute: 0.01}}
    - {name: latency_p95, alpha: A2, allowed: {relative: 0.1}}
    - {name: refusal_rate, allowed: {relative: 0.5}}
    - {name: output_tokens, gating: false, allowed: auto}
"""
    line = one_problem(base.replace("A1", "0.006").replace("A2", "0.004"))
    assert line == ("r.yaml:6:5: rollout.metrics: the gating metrics' explicit alphas add up to 0.01 (error_rate "
                    "0.006 (line 6), latency_p95 0.004 (line 7)), all of the rollout's alpha 0.01, leaving none for "
                    "the 1 other gating metric (refusal_rate): their sum must be less than alpha while other gating "
                    "metrics have no alpha of their own")
    line = one_problem(base.replace("A1", "0.006").replace("A2", "0.005"))
    assert line.startswith("r.yaml:6:5: rollout.metrics: the gating metrics' explicit alphas add up to 0.011 "
                           "(error_rate 0.006 (line 6), latency_p95 0.005 (line 7)), more than the rollout's alpha "
                           "0.01: the false-rollback budget would not hold")
    # all gating metrics explicit: up to all of alpha is fine, more is not
    full = base.replace("    - {name: refusal_rate, allowed: {relative: 0.5}}\n", "")
    assert spec_from_text(full.replace("A1", "0.006").replace("A2", "0.004")).alphas["latency_p95"] == 0.004
    assert "more than the rollout's alpha" in one_problem(full.replace("A1", "0.006").replace("A2", "0.0041"))
    # the parser and the statistics core agree (stats.split_alpha raises exactly where the parser reports)
    from lockgate.controller.stats import MetricSpec, split_alpha

    for a1, a2, others in [(0.006, 0.004, True), (0.006, 0.0039, True), (0.006, 0.004, False),
                           (0.006, 0.0041, False), (0.009, 0.0005, True)]:
        text = (base if others else full).replace("A1", str(a1)).replace("A2", str(a2))
        try:
            spec_from_text(text)
            ok = True
        except ConfigError:
            ok = False
        specs = [MetricSpec("e", "rate", alpha=a1), MetricSpec("l", "mean", alpha=a2)] + \
            ([MetricSpec("r", "rate")] if others else [])
        try:
            split_alpha(specs, 0.01)
            core_ok = True
        except ValueError:
            core_ok = False
        assert ok == core_ok, (a1, a2, others)


def test_new_field_warnings():
    spec = spec_from_text(MINIMAL + """\
    - {name: output_tokens, gating: false, alpha: 0.001, allowed: auto}
    - {name: entropy, gating: false, family: f, allowed: auto}
    - {name: latency_p95, allowed: {exceedance_ratio: 1}}
""", "r.yaml")
    text = [S.render_warning(w, "r.yaml") for w in spec.warnings]
    assert text == [
        "r.yaml:7:51: rollout.metrics[1].alpha: warning: alpha on a non-gating metric: output_tokens never decides, "
        "so its alpha only sets the width of its reported interval (it is not part of the rollout's false-rollback "
        "budget)",
        "r.yaml:8:46: rollout.metrics[2].family: warning: family on a non-gating metric has no effect: only gating "
        "metrics share the rollout's alpha",
        "r.yaml:9:36: rollout.metrics[3].allowed: warning: exceedance ratio 1: promotion needs the canary shown "
        "strictly better than the baseline on latency_p95",
    ]
    # a non-gating metric's alpha is not part of the budget: it may not break the gating split
    assert spec.alphas["output_tokens"] == 0.001 and spec.alphas["error_rate"] == pytest.approx(0.025)


# ----------------------------------------------------------------------------- stats core mapping


def test_builtin_metrics_map_onto_stats_core():
    from lockgate.controller.stats import KINDS, MetricSpec

    for d in BUILTIN_METRICS.values():
        assert d.kind in KINDS and d.harmful in ("increase", "decrease")
        assert (d.quantile is not None) == (d.kind == "quantile")
        assert d.per_class == d.kind.startswith("class_")
    spec = spec_from_text(ISSUE_EXAMPLE)
    with pytest.raises(ValueError, match="output_tokens: allowed is auto"):
        spec.to_stats_specs()
    specs = spec.to_stats_specs({"output_tokens": (12.5, "allowed = 2.5 x sd ...")})
    assert all(isinstance(s, MetricSpec) for s in specs)
    by = {s.name: s for s in specs}
    assert by["error_rate"] == MetricSpec("error_rate", "rate", "increase", 0.005, "absolute", True, column="error")
    assert by["error_rate"].label_column == "label"  # not a class metric: the stats core's default
    assert (by["latency_p95"].quantile, by["latency_p95"].allowed_mode, by["latency_p95"].data_column) == \
        (0.95, "relative", "latency_ms")
    assert (by["output_tokens"].allowed, by["output_tokens"].allowed_mode, by["output_tokens"].gating,
            by["output_tokens"].allowed_derivation) == (12.5, "absolute", False, "allowed = 2.5 x sd ...")
    r = by["class_recall[fraud]"]
    assert (r.kind, r.cls, r.harmful, r.data_column, r.label_column, r.label_ts_column) == \
        ("class_recall", "fraud", "decrease", "predicted_class", "true_class", "label_arrival_ts")
    # auto resolved with stats.auto_allowed's result
    from lockgate.controller.stats import AutoAllowed

    a = AutoAllowed(3.0, "derived", 7, 1.2, (1.0,) * 7)
    assert spec.metric("output_tokens").to_stats_spec(a).allowed_derivation == "derived"
    assert spec.metric("output_tokens").auto_statistic == ("mean", None)
    assert spec.metric("latency_p95").auto_statistic == ("quantile", 0.95)


def test_every_builtin_metric_becomes_a_valid_stats_spec():
    def spec_with(items: list[str]) -> RolloutSpec:
        return spec_from_text("rollout:\n  model: m\n  canary: c\n  metrics:\n" +
                              "".join(f"    - {{{item}}}\n" for item in items))

    relative, flipped, auto = [], [], []
    for name, d in BUILTIN_METRICS.items():
        cls = ", class: c1" if d.per_class else ""
        relative.append(f"name: {name}{cls}, allowed: {{relative: 0.5}}")
        other = "increase" if d.harmful == "decrease" else "decrease"
        flipped.append(f"name: {name}{cls}, gating: false, allowed: {{absolute: 0.5}}" + (
            "" if d.per_class else f", harmful: {other}"))
        auto.append(f"name: {name}{cls}, allowed: auto")
    assert len(spec_with(relative).to_stats_specs()) == len(BUILTIN_METRICS)
    flipped[0] = flipped[0].replace("gating: false", "gating: true")
    assert len(spec_with(flipped).to_stats_specs()) == len(BUILTIN_METRICS)
    spec = spec_with(auto)
    assert len(spec.to_stats_specs({m.key: 0.1 for m in spec.metrics})) == len(BUILTIN_METRICS)


# ----------------------------------------------------------------------------- schema


def test_schema_metric_enum_equals_builtins_and_fields_match_parser():
    schema = rollout_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    rollout = schema["properties"]["rollout"]
    metric = rollout["properties"]["metrics"]["items"]
    assert metric["properties"]["name"]["anyOf"][0]["enum"] == list(BUILTIN_METRICS)  # or a prometheus metric's
    assert set(rollout["properties"]) == set(S.ROLLOUT_KEYS)
    assert set(rollout["properties"]["steps"]["items"]["properties"]) == set(S.STEP_KEYS)
    assert set(rollout["properties"]["promotion"]["properties"]) == set(S.PROMOTION_KEYS)
    assert set(metric["properties"]) == set(S.METRIC_KEYS)
    allowed_modes = {k for alt in metric["properties"]["allowed"]["oneOf"] for k in alt.get("properties", {})}
    assert allowed_modes == set(S.ALLOWED_MODES)
    assert metric["properties"]["family"]["pattern"] == S.NAME_RE.pattern
    json.dumps(schema)  # serialisable


@pytest.mark.parametrize("level, keys, text", [
    ("rollout", S.ROLLOUT_KEYS,
     "rollout: {bogus: 1, model: m, canary: c, metrics: [{name: error_rate, allowed: auto}]}"),
    ("step", S.STEP_KEYS, "rollout: {model: m, canary: c, steps: [{weight_percent: 1, bogus: 1}], "
                          "metrics: [{name: error_rate, allowed: auto}]}"),
    ("promotion", S.PROMOTION_KEYS, "rollout: {model: m, canary: c, promotion: {bogus: 1}, "
                                    "metrics: [{name: error_rate, allowed: auto}]}"),
    ("metric", S.METRIC_KEYS, "rollout: {model: m, canary: c, metrics: [{name: error_rate, allowed: auto, bogus: 1}]}"),
])
def test_parser_known_fields_equal_the_tables(level, keys, text):
    line = one_problem(text)
    assert line.endswith(f"unknown field (known: {', '.join(sorted(keys))})"), line


def test_examples_validate_against_schema():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (optional; not a dependency)")
    validator = jsonschema.Draft202012Validator(rollout_schema())
    jsonschema.Draft202012Validator.check_schema(rollout_schema())
    for path in EXAMPLES:
        assert list(validator.iter_errors(yaml.safe_load(path.read_text()))) == [], path
    assert not list(validator.iter_errors(yaml.safe_load(ISSUE_EXAMPLE)))
    bad = yaml.safe_load(ISSUE_EXAMPLE)
    bad["rollout"]["metrics"][0]["name"] = "eror_rate"
    bad["rollout"]["steps"][0]["weigth_percent"] = 1
    bad["rollout"]["metrics"][4].pop("class")
    assert len(list(validator.iter_errors(bad))) >= 3
    # the new fields: valid where the parser accepts them, invalid where it refuses them
    assert not list(validator.iter_errors(yaml.safe_load(NEW_FIELDS)))
    new = yaml.safe_load(NEW_FIELDS)
    new["rollout"]["metrics"][1]["allowed"] = {"exceedance_ratio": 1.2}  # error_rate: not a quantile metric
    new["rollout"]["metrics"][2]["family"] = "two words"
    new["rollout"]["metrics"][0]["alpha"] = 0
    assert len(list(validator.iter_errors(new))) == 3


def test_document_models_accept_every_example_and_match_the_parser_tables():
    """The typed file-format models (the schema's source) accept what the parser accepts, field for field."""
    from lockgate.controller.decide.spec.document import (
        MetricDocument,
        PromotionDocument,
        RolloutDocument,
        SpecDocument,
        StepDocument,
    )

    def aliases(model):
        return {f.alias or name for name, f in model.model_fields.items()}

    assert aliases(RolloutDocument) == set(S.ROLLOUT_KEYS) and aliases(StepDocument) == set(S.STEP_KEYS)
    assert aliases(PromotionDocument) == set(S.PROMOTION_KEYS) and aliases(MetricDocument) == set(S.METRIC_KEYS)
    for text in [p.read_text() for p in EXAMPLES] + [ISSUE_EXAMPLE, NEW_FIELDS]:
        doc = SpecDocument.model_validate(yaml.safe_load(text))
        assert doc.rollout.metrics and spec_from_text(text).canary == doc.rollout.canary


# ----------------------------------------------------------------------------- CLI


def test_cli_validate_ok_with_and_without_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chat = str(ROOT / "examples" / "rollouts" / "chat-v2.yaml")
    assert main(["validate", chat]) == 0
    out = capsys.readouterr().out
    sha = load_spec(chat).sha256
    assert out.startswith(f"{chat}: ok (model chat, canary v2, 4 stages + promotion, 6 metrics (5 gating), "
                          f"spec sha256 {sha[:12]}…)")
    assert "validated standalone" in out
    cfg = str(ROOT / "examples" / "lockgate.yaml")
    assert main(["-c", cfg, "validate", chat]) == 0
    assert "standalone" not in capsys.readouterr().out
    assert main(["validate", "-c", cfg, "--json", chat]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["sha256"] == sha and report["spec"]["model"] == "chat"


def test_cli_validate_reports_every_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(ISSUE_EXAMPLE.replace("canary: v2", "canary: v1").replace("weight_percent: 5,", "weigth_percent: 5,")
                   .replace("name: latency_p95", "name: latency_95"))
    cfg = str(ROOT / "examples" / "lockgate.yaml")
    assert main(["-c", cfg, "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: invalid rollout spec (4 problems):" in err
    assert "rollout.canary: 'v1' is chat's stable version" in err
    assert "rollout.steps[1].weigth_percent: unknown field (did you mean 'weight_percent'?" in err
    assert "rollout.steps[1].weight_percent: is required" in err
    assert "rollout.metrics[1].name: unknown metric 'latency_95' (did you mean 'latency_p95'?" in err


def test_cli_schema(capsys):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == rollout_schema()


# ----------------------------------------------------------------------------- robustness

_BASE = yaml.safe_load(ISSUE_EXAMPLE)

_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["auto", "10m", "1.5h", "-1s", "1e-2", "10%", "fraud", "increase", "decrease", "drill",
                     "absolute", "relative", "exceedance_ratio", "class_recall", "accuracy", "latency_p50", "100", "",
                     "recall"]),
)
_value = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
        ["name", "class", "allowed", "absolute", "relative", "exceedance_ratio", "alpha", "family", "weight_percent",
         "min_duration", "gating", "x"]),
        inner, max_size=3)), max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _mutate(data, path, op, value):
    if not path:
        return value if op == "replace" else data
    parent = data
    for p in path[:-1]:
        parent = parent[p]
    key = path[-1]
    if op == "replace":
        parent[key] = value
    elif op == "delete":
        del parent[key]
    elif op == "add" and isinstance(parent[key], dict):
        parent[key]["zz_" + str(value)[:5]] = value
    elif op == "add" and isinstance(parent[key], list):
        parent[key].append(value)
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_mutations_never_crash(data):
    doc = copy.deepcopy(_BASE)
    for _ in range(data.draw(st.integers(1, 4))):
        paths = list(_paths(doc))
        path = data.draw(st.sampled_from(paths))
        op = data.draw(st.sampled_from(["replace", "delete", "add"]))
        value = data.draw(_value)
        doc = _mutate(doc, path, op, value)
    text = yaml.safe_dump(doc, allow_unicode=True)
    try:
        spec = spec_from_text(text, "m.yaml")
    except ConfigError as exc:
        assert exc.problems and all(p.message for p in exc.problems)
        str(exc)
        return
    # whatever is accepted is a consistent spec the statistics core accepts
    assert isinstance(spec, RolloutSpec) and len(spec.sha256) == 64
    assert spec.metrics and any(m.gating for m in spec.metrics)
    bps = [s.weight_bp for s in spec.steps]
    assert bps == sorted(set(bps)) and all(0 < b < 10000 for b in bps)
    assert all(math.isfinite(s.min_duration_s) and s.min_duration_s >= 0 for s in spec.steps)
    assert 0 < spec.alpha <= S.MAX_ALPHA
    stats_specs = spec.to_stats_specs({m.key: 1.0 for m in spec.metrics if m.allowed_mode == "auto"})
    # the alpha split it accepted is one the statistics core accepts too
    from lockgate.controller.stats import split_alpha

    assert split_alpha(stats_specs, spec.alpha) == spec.alphas
    assert sum(a for k, a in spec.alphas.items() if spec.metric(k).gating) <= spec.alpha * (1 + 1e-9)
    json.loads(spec.canonical_json())
    # nothing in the file was silently dropped
    raw = doc["rollout"]
    assert len(spec.metrics) == len(raw["metrics"])
    if "steps" in raw:
        assert len(spec.steps) == len([s for s in raw["steps"] if s["weight_percent"] != 100])


def test_evaluator_score_allowance_is_on_the_unit_scale():
    from lockgate.controller.decide.spec import ConfigError, spec_from_text

    with pytest.raises(ConfigError) as exc:
        spec_from_text("rollout:\n  model: chat\n  canary: v2\n  metrics:\n"
                       "    - {name: evaluator_score, allowed: {absolute: 3}}\n", "r.yaml")
    assert "r.yaml:5:51: rollout.metrics[0].allowed.absolute: must be at least 0 and at most 1 (evaluator scores " \
           "are in [0, 1])" in str(exc.value), str(exc.value)
