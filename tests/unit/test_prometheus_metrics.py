"""Prometheus-sourced rollout metrics, the pure parts: the ``prometheus:`` block of the spec (every problem
with file:line), the PromQL lockgate builds, and the translation of Prometheus counts into the statistics
core (the same verdict as the core on the equivalent per-request rows, with the clustering note). The
real Prometheus is in tests/integration/test_prometheus_source.py."""

from __future__ import annotations

import re
import socket

import numpy as np
import pytest

from lockgate.config import config_from_text
from lockgate.controller.decide.prometheus_evidence import (
    CLUSTERING_NOTE,
    PrometheusEvidence,
    count_groups,
    count_verdict,
    merge,
)
from lockgate.controller.decide.spec import ConfigError, spec_from_text
from lockgate.controller.decide.spec.prometheus import ArmQuery
from lockgate.controller.evaluate.prometheus_source import (
    PrometheusError,
    PrometheusReader,
    counter_expr,
    histogram_exprs,
    le_matcher,
)
from lockgate.controller.stats import MetricSpec, evaluate_rate, judge

SPEC = """
rollout:
  model: chat
  canary: v2
  alpha: 0.01
  metrics:
    - {name: error_rate, allowed: {relative: 0.5}}
    - name: prom_errors
      prometheus:
        kind: counter
        events: 'http_requests_total{version="$version", status="5xx"}'
        total: 'http_requests_total{version="$version"}'
      allowed: {relative: 0.5}
    - name: slow_share
      prometheus: {kind: histogram, histogram: 'vllm:e2e_request_latency_seconds{model_name="$model", version="$version"}', le: 0.05}
      allowed: {absolute: 0.02}
    - name: running
      prometheus:
        kind: gauge
        query: {canary: 'sum(vllm:num_requests_running{version="$canary"})', baseline: 'sum(vllm:num_requests_running{version="$baseline"})'}
        step: 1s
        block: 5s
        unit: requests
      gating: false
      allowed: {absolute: 1}
"""

CONFIG = """
models:
  - name: chat
    match: {path_prefix: /v1/chat}
    stable: v1
    versions:
      v1: {endpoints: ["127.0.0.1:1"]}
      v2: {endpoints: ["127.0.0.1:2"]}
"""


def problems(text: str, config=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        spec_from_text(text, "r.yaml", config)
    return str(e.value).splitlines()


def metric(block: str, allowed: str = "{relative: 0.5}", extra: str = "") -> str:
    return f"""
rollout:
  model: chat
  canary: v2
  metrics:
    - name: p
      prometheus: {block}
      allowed: {allowed}{extra}
"""


# ----------------------------------------------------------------------------- the spec


def test_a_prometheus_metric_parses_into_its_source_and_shares_the_rollouts_alpha():
    spec = spec_from_text(SPEC, "r.yaml")
    prom = {m.key: m.prometheus for m in spec.prometheus_metrics}
    assert list(prom) == ["prom_errors", "slow_share", "running"]
    assert prom["prom_errors"].stats_kind == "rate" and prom["running"].stats_kind == "mean"
    assert prom["slow_share"].le == 0.05 and prom["running"].step_s == 1.0 and prom["running"].block_s == 5.0
    assert spec.metric("running").unit == "requests" and spec.metric("prom_errors").kind == "rate"
    # 3 gating metrics share alpha 0.01; the observation-fed ones keep their share of the whole spec
    assert spec.alphas["error_rate"] == pytest.approx(0.01 / 3)
    stats = spec.to_stats_specs()
    assert [s.name for s in stats] == ["error_rate"] and stats[0].alpha == pytest.approx(0.01 / 3)
    # rendering: $version per arm, $model, the explicit per-arm form
    q = prom["slow_share"].histogram
    assert q.render("canary", model="chat", canary="v2", baseline="v1") == \
        'vllm:e2e_request_latency_seconds{model_name="chat", version="v2"}'
    assert prom["running"].query.render("baseline", model="chat", canary="v2", baseline="v1") == \
        'sum(vllm:num_requests_running{version="v1"})'
    assert ArmQuery("x{v='${version}'}", "x").render("canary", model="m", canary="c", baseline="b") == "x{v='c'}"


def test_the_hash_covers_the_queries_and_leaves_specs_without_prometheus_alone():
    spec = spec_from_text(SPEC, "r.yaml")
    assert spec.metric("prom_errors").canonical()["prometheus"]["events"]["canary"].endswith('status="5xx"}')
    assert "prometheus" not in spec.metric("error_rate").canonical()
    other = spec_from_text(SPEC.replace('status="5xx"', 'status="4xx"'), "r.yaml")
    assert other.sha256 != spec.sha256
    # where Prometheus is (lockgate.yaml) is not part of the criteria
    cfg = config_from_text(CONFIG + "controller: {prometheus: {url: 'http://127.0.0.1:9/'}}\n", "l.yaml")
    with_cfg = spec_from_text(SPEC, "r.yaml", cfg)
    assert with_cfg.sha256 == spec.sha256
    assert with_cfg.metric("prom_errors").prometheus.endpoint == "http://127.0.0.1:9"


@pytest.mark.parametrize("block, allowed, expect", [
    ("{kind: countr, events: 'a{v=\"$version\"}'}", "{relative: 0.5}",
     "r.yaml:7:26: rollout.metrics[0].prometheus.kind: must be one of counter, histogram, gauge, got 'countr'"),
    ("{kind: counter, events: 'a{v=\"v2\"}', total: 'b{v=\"$version\"}'}", "{relative: 0.5}",
     "r.yaml:7:43: rollout.metrics[0].prometheus.events: needs $version: without it the query does not select"),
    ("{kind: counter, events: 'a{v=\"$version\"}', total: 'b{v=\"$vresion\"}'}", "{relative: 0.5}",
     "rollout.metrics[0].prometheus.total: unknown placeholder $vresion (known: $version, $canary, $baseline, $model)"),
    ("{kind: counter, events: 'a{v=\"$version\"}'}", "{relative: 0.5}",
     "rollout.metrics[0].prometheus.total: is required"),
    ("{kind: histogram, histogram: 'h_bucket{v=\"$version\"}', le: 1}", "{relative: 0.5}",
     "rollout.metrics[0].prometheus.histogram: name the histogram without its suffix (h)"),
    ("{kind: histogram, histogram: 'rate(h{v=\"$version\"}[5m])', le: 1}", "{relative: 0.5}",
     "rollout.metrics[0].prometheus.histogram: must be a histogram's series selector"),
    ("{kind: histogram, histogram: 'h{v=\"$version\"}', le: 0}", "{relative: 0.5}",
     "rollout.metrics[0].prometheus.le: must be a finite bucket bound greater than 0"),
    ("{kind: gauge, query: 'g{v=\"$version\"}', url: 'ftp://prom:9090'}", "{relative: 0.5}",
     "rollout.metrics[0].prometheus.url: must be an http:// or https:// URL with a host"),
    ("{kind: gauge, query: 'g{v=\"$version\"}', url: 'http://prom:99999'}", "{relative: 0.5}",
     "rollout.metrics[0].prometheus.url: not a valid URL"),
    ("{kind: gauge, query: {canary: 'g{v=\"$baseline\"}', baseline: 'g{v=\"$baseline\"}'}}", "{relative: 0.5}",
     "rollout.metrics[0].prometheus.query.canary: needs $canary or $version"),
    ("{kind: counter, events: 'a{v=\"$version\"}', total: 'b{v=\"$version\"}', le: 2}", "{relative: 0.5}",
     "rollout.metrics[0].prometheus.le: le is the histogram's bucket bound: only kind histogram takes it"),
    ("{kind: counter, events: 'a{v=\"$version\"}', total: 'b{v=\"$version\"}', evnts: 1}", "{relative: 0.5}",
     "rollout.metrics[0].prometheus.evnts: unknown field (did you mean 'events'?"),
    ("{kind: counter, events: 'a{v=\"$version\"}', total: 'b{v=\"$version\"}'}", "auto",
     "rollout.metrics[0].allowed: auto derives the allowance from lockgate's stored observations"),
    ("{kind: counter, events: 'a{v=\"$version\"}', total: 'b{v=\"$version\"}'}", "{absolute: 5}",
     "rollout.metrics[0].allowed.absolute: must be at least 0 and at most 1 (a fraction: 0.01 = 1 point)"),
    ("{kind: gauge, query: 'g{v=\"$version\"}', step: 1m, block: 10s}", "{absolute: 5}",
     "rollout.metrics[0].prometheus.block: must be at least the step (60 s)"),
])
def test_every_problem_of_a_prometheus_block_names_its_line_and_field(block, allowed, expect):
    lines = [x for x in problems(metric(block, allowed)) if "rollout." in x]
    assert len(lines) == 1 and expect in lines[0], lines


def test_a_builtin_name_a_class_and_a_missing_prometheus_are_reported():
    lines = problems(metric("{kind: counter, events: 'a{v=\"$version\"}', total: 'b{v=\"$version\"}'}",
                            extra="\n      class: x").replace("name: p", "name: error_rate"))
    assert any("rollout.metrics[0].name: 'error_rate' is a built-in metric" in x for x in lines), lines
    assert any("rollout.metrics[0].class: only class_recall and class_precision take a class" in x for x in lines)
    cfg = config_from_text(CONFIG, "l.yaml")
    text = metric("{kind: counter, events: 'a{v=\"$version\"}', total: 'b{v=\"$version\"}'}")
    lines = problems(text, cfg)
    assert "r.yaml:7:19: rollout.metrics[0].prometheus: p reads Prometheus but l.yaml has no controller.prometheus.url" \
        in lines[-1], lines
    # its own url is enough
    own = text.replace("total: 'b{v=\"$version\"}'}", "total: 'b{v=\"$version\"}', url: 'http://prom:9090'}")
    assert spec_from_text(own, "r.yaml", cfg).metrics[0].prometheus.endpoint == "http://prom:9090"
    # an unknown name says how to bring one's own metric
    assert "a metric of your own needs a prometheus: block" in problems(metric("x").replace(
        "      prometheus: x\n", ""))[-1]


def test_the_controller_prometheus_section_is_validated_with_its_line():
    with pytest.raises(ConfigError) as e:
        config_from_text(CONFIG + "controller:\n  prometheus: {url: 'prom:9090', timeout_s: 0}\n", "l.yaml")
    text = str(e.value)
    assert "l.yaml:10:21: controller.prometheus.url: must be an http:// or https:// URL, got 'prom:9090'" in text
    assert "controller.prometheus.timeout_s: must be between 0.05 and 60.0, got 0" in text
    cfg = config_from_text(CONFIG + "controller: {prometheus: {url: 'https://prom:9090/', refresh_s: 1}}\n", "l.yaml")
    assert cfg.controller.prometheus.url == "https://prom:9090" and cfg.controller.prometheus.refresh_s == 1.0
    assert config_from_text(CONFIG, "l.yaml").controller.prometheus is None


# ----------------------------------------------------------------------------- PromQL


def test_histogram_queries_match_every_spelling_of_the_bucket_bound():
    count, bucket = histogram_exprs('vllm:e2e_request_latency_seconds{model_name="chat", version="v2"}', 2.0)
    assert count == 'sum(vllm:e2e_request_latency_seconds_count{model_name="chat", version="v2"})'
    assert bucket.startswith('sum(vllm:e2e_request_latency_seconds_bucket{model_name="chat", version="v2", le=~"')
    # the regex as Prometheus sees it (PromQL unescapes the string literal once)
    regex = re.search(r'le=~"(.*)"', le_matcher(2.0)).group(1).replace("\\\\", "\\")
    assert all(re.fullmatch(regex, s) for s in ("2", "2.0")) and not re.fullmatch(regex, "20")
    regex = re.search(r'le=~"(.*)"', le_matcher(0.05)).group(1).replace("\\\\", "\\")
    assert re.fullmatch(regex, "0.05") and not re.fullmatch(regex, "0x05")
    assert histogram_exprs("h", 1.0)[0] == "sum(h_count)"
    assert counter_expr('x{a="b"}') == 'sum(x{a="b"})'


# ----------------------------------------------------------------------------- into the statistics core


def rows(windows):
    """The per-request rows equivalent to per-stage counts, each request its own user."""
    ev, canary, stratum = [], [], []
    for k, (eb, nb, ec, nc) in enumerate(windows):
        for is_c, e, n in ((False, eb, nb), (True, ec, nc)):
            ev += [1.0] * int(e) + [0.0] * int(n - e)
            canary += [is_c] * int(n)
            stratum += [k] * int(n)
    ev = np.array(ev)
    return ev, np.array(canary), np.arange(ev.size), np.array(stratum)


@pytest.mark.parametrize("windows, allowed, mode, expect", [
    ([(20, 2000, 30, 2000)], 0.5, "relative", "not-yet"),
    ([(20, 4000, 200, 4000)], 0.5, "relative", "fail"),
    ([(10, 3000, 1, 1000), (200, 100000, 180, 100000)], 0.5, "relative", "pass"),
    ([(0, 3000, 0, 3000)], 0.01, "absolute", "pass"),
    ([(5, 10, 5, 10)], 0.5, "relative", "not-yet"),
])
def test_counts_are_judged_by_the_core_as_the_equivalent_requests(windows, allowed, mode, expect):
    spec = MetricSpec("prom_errors", "rate", "increase", allowed=allowed, allowed_mode=mode, column="prom_errors")
    v = count_verdict(spec, 0.01, windows, source="Prometheus http://p:9090")
    ev, is_c, cl, st = rows(windows)
    direct = evaluate_rate(ev, is_c, np.zeros(ev.size), cl, spec, 0.01, stratum=st)
    assert v.verdict == direct.verdict == expect, (v.reason, direct.reason)
    assert (v.n_baseline, v.n_canary) == (direct.n_baseline, direct.n_canary)
    assert v.interval == pytest.approx(direct.interval) and v.difference == pytest.approx(direct.difference)
    assert CLUSTERING_NOTE in v.reason and "canary requests with" in v.reason
    assert v.details["source"] == "prometheus" and v.details["windows"] == [list(map(float, w)) for w in windows]


def test_counts_beyond_the_cap_are_scaled_down_and_said_so():
    windows = [(1000, 200_000, 4000, 200_000)]
    g, scale = count_groups(windows, max_requests=40_000)
    assert scale == pytest.approx(0.1) and g.n_cl == 40_000 and g.s.sum() == pytest.approx(500)
    spec = MetricSpec("e", "rate", "increase", allowed=0.5, allowed_mode="relative", column="e")
    v = count_verdict(spec, 0.01, windows, source="x", max_requests=40_000)
    full = count_verdict(spec, 0.01, windows, source="x")
    assert v.verdict == full.verdict == "fail" and "counts scaled by 0.1" in v.reason
    assert v.interval[1] - v.interval[0] > full.interval[1] - full.interval[0]  # wider: conservative
    assert count_groups([(0, 0, 0, 0)])[0] is None
    assert count_verdict(spec, 0.01, [(0, 0, 0, 0)], source="x").verdict == "not-yet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Rollout:
    id, model, canary, baseline, stage = 1, "chat", "v2", "v1", 0
    started_at = stage_started_at = 1000.0


def test_an_unreachable_prometheus_holds_the_gate_and_a_failing_one_rolls_back():
    spec = spec_from_text(SPEC.replace("'sum(vllm:num_requests_running", "'sum(x").replace(
        "events: 'http", "events: 'http") + "", "r.yaml")
    port = free_port()  # nothing listens there
    cfg = config_from_text(CONFIG + f"controller: {{prometheus: {{url: 'http://127.0.0.1:{port}', timeout_s: 0.5}}}}\n",
                           "l.yaml")
    spec = spec_from_text(SPEC, "r.yaml", cfg)
    with pytest.raises(PrometheusError, match="unreachable"):
        PrometheusReader(f"http://127.0.0.1:{port}", 0.5).instant("up", 1000.0)
    builtin = [count_verdict(MetricSpec("error_rate", "rate", allowed=0.5, allowed_mode="relative",
                                        alpha=spec.alphas["error_rate"]),
                             spec.alphas["error_rate"], [(0, 3000, 0, 3000)], source="x")]
    base = judge(builtin, 0.01)
    ev = PrometheusEvidence()
    merged = ev.with_prometheus(base, _Rollout(), spec, 1100.0)
    by = {v.metric: v for v in merged.verdicts}
    assert [v.metric for v in merged.verdicts] == ["error_rate", "prom_errors", "slow_share", "running"]
    for key in ("prom_errors", "slow_share", "running"):
        assert by[key].verdict == "not-yet" and "cannot read Prometheus" in by[key].reason
        assert "the gate holds" in by[key].reason and "unreachable" in by[key].reason
    assert merged.decision == "continue"  # never promotes on missing data
    assert sum(merged.to_dict()["alphas"].values()) == pytest.approx(0.01)
    # a Prometheus verdict that fails rolls back, whatever the observation-fed ones say
    fail = count_verdict(spec.metric("prom_errors").to_stats_spec(), spec.alphas["prom_errors"],
                         [(20, 4000, 200, 4000)], source="x")
    assert merge(base, [fail], spec).decision == "rollback"


def test_a_replay_of_recorded_observations_never_promotes_past_a_prometheus_gate():
    from lockgate.controller.decide.prometheus_evidence import NOT_REPLAYED
    from lockgate.controller.decide.replay import replay

    rng = np.random.default_rng(3)
    n = 6000
    data = {"ts": np.sort(rng.uniform(1000.0, 1600.0, n)), "role": np.where(rng.random(n) < 0.5, "canary", "baseline"),
            "status_code": np.full(n, 200.0), "timeout": np.zeros(n), "user_key": np.array([f"u{i}" for i in range(n)]),
            "request_id": np.array([f"r{i}" for i in range(n)]), "weight": np.full(n, 0.5)}
    data["version"] = np.where(data["role"] == "canary", "v2", "v1")
    text = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 60
  steps: [{weight_percent: 50, min_duration: 1m, min_canary_samples: 10}]
  promotion: {max_duration: 1h}
  metrics:
    - {name: error_rate, allowed: {absolute: 0.02}}
"""
    assert replay(spec_from_text(text, "r.yaml"), data, start=1000.0)["decision"] == "promote"
    with_gate = text + """    - name: prom_errors
      prometheus: {kind: counter, events: 'e{version="$version"}', total: 't{version="$version"}'}
      allowed: {absolute: 0.02}
"""
    out = replay(spec_from_text(with_gate, "r.yaml"), data, start=1000.0)
    assert out["decision"] == "continue", out
    assert {r["metric"]: r for r in out["reasons"]}["prom_errors"]["verdict"] == "not-yet"
    assert any(NOT_REPLAYED in str(r) for r in out["reasons"])


def test_a_controller_starting_mid_rollout_recovers_the_stage_starts_from_the_store(tmp_path):
    """Stage windows (the strata of the Prometheus counts) survive a restart or a takeover: the earlier stages'
    starts are the first stored requests routed at their weights, as `lockgate analyze` reads them."""
    from types import SimpleNamespace

    from lockgate.controller.decide.prometheus_evidence import stage_starts
    from lockgate.controller.ingest.observations import ObservationStore
    from lockgate.proto.v1 import observations_pb2 as pb

    text = SPEC.replace("  alpha: 0.01\n", "  alpha: 0.01\n  steps: [{weight_percent: 10}, {weight_percent: 30}, "
                                            "{weight_percent: 50}]\n  promotion: {max_duration: 2h}\n")
    spec = spec_from_text(text, "r.yaml")
    store = ObservationStore(tmp_path / "obs.db")
    try:
        obs = [pb.Observation(request_id=f"r{t:g}-{i}", ts=t + i * 0.5, model="chat", version=v, role=role, weight_bp=bp,
                              status_code=200, user_key=f"u{i}")
               for t, bp in ((100.0, 1000), (200.0, 3000), (300.0, 5000))
               for i, (v, role) in enumerate((("v1", "baseline"), ("v2", "canary")) * 3)]
        store.insert(obs, received_ts=400.0)
        rollout = SimpleNamespace(id=7, model="chat", canary="v2", baseline="v1", stage=2, started_at=50.0,
                                  stage_started_at=300.0)
        assert stage_starts(spec, [100.0, 200.5, 200.0, 300.0], [0.1, 0.3, 0.3, 0.5], 50.0, 1) == {1: 200.0}
        assert PrometheusEvidence().bounds(rollout, 400.0, spec, store) == [50.0, 200.0, 300.0, 400.0]
        # without the store (or at stage 0) only what this controller saw: the current stage's start
        assert PrometheusEvidence().bounds(rollout, 400.0) == [50.0, 300.0, 400.0]
    finally:
        store.close()


def test_validate_warns_on_gating_prometheus_metrics_and_the_schema_accepts_the_block():
    import yaml

    from lockgate.controller.decide.spec.document import SpecDocument
    from lockgate.controller.decide.spec_schema import rollout_schema

    spec = spec_from_text(SPEC, "r.yaml")
    warned = [w for w in spec.warnings if "Prometheus aggregates" in w.message]
    # the gating ones, not the informational gauge
    assert [w.path for w in warned] == ["rollout.metrics[1].prometheus", "rollout.metrics[2].prometheus"]
    assert all(w.line for w in warned)
    doc = SpecDocument.model_validate(yaml.safe_load(SPEC))
    assert doc.rollout.metrics[1].prometheus.kind == "counter"
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (optional)")
    validator = jsonschema.Draft202012Validator(rollout_schema())
    assert not list(validator.iter_errors(yaml.safe_load(SPEC)))
    bad = yaml.safe_load(SPEC)
    bad["rollout"]["metrics"][1]["prometheus"]["kind"] = "summary"
    assert list(validator.iter_errors(bad))


def test_a_prometheus_that_does_not_answer_costs_one_timeout_and_never_delays_a_rollback():
    from lockgate.controller.evaluate.prometheus_source import PrometheusUnreachable

    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        reader = PrometheusReader(url, 0.3)
        for _ in range(3):
            with pytest.raises(PrometheusUnreachable, match="unreachable"):
                reader.instant("up", 1000.0)
        assert reader.queries == 1  # the later calls failed at once, without asking
        cfg = config_from_text(CONFIG + f"controller: {{prometheus: {{url: '{url}', timeout_s: 0.3}}}}\n", "l.yaml")
        spec = spec_from_text(SPEC, "r.yaml", cfg)
        ev = PrometheusEvidence()
        fail = count_verdict(MetricSpec("error_rate", "rate", allowed=0.5, allowed_mode="relative"),
                             spec.alphas["error_rate"], [(20, 4000, 200, 4000)], source="x")
        rolled = ev.with_prometheus(judge([fail], 0.01), _Rollout(), spec, 1100.0)
        assert rolled.decision == "rollback" and not ev._readers  # Prometheus was not asked
        held = {v.metric: v for v in rolled.verdicts}["prom_errors"]
        assert held.verdict == "not-yet" and "other gating metrics roll the canary back" in held.reason
