"""Rollout state on a real controller's /metrics during a real rollout through Envoy, scraped by a real
Prometheus: the series follow the rollout (running at stage 1 of 3 and 10 % → rolled back, one rollback
by harm), and every query of the Grafana dashboard (deploy/grafana/lockgate.json) and of the alert rules
is accepted by Prometheus and — but for the annotation's — returns data."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Fleet, Proc, free_port, requires_envoy
from tests.integration.test_rollout_e2e import Traffic, chat_server, status, wait_status
from tests.unit.test_deploy import dashboard_exprs

pytestmark = [requires_envoy, pytest.mark.envoy]

ROOT = Path(__file__).resolve().parents[2]
SPEC = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 1
  steps:
    - {weight_percent: 10, min_duration: 2s, min_canary_samples: 40}
    - {weight_percent: 30, min_duration: 2s, min_canary_samples: 80}
    - {weight_percent: 50, min_duration: 2s, min_canary_samples: 150}
  promotion: {max_duration: 10m, preflight: drill}
  metrics:
    - {name: error_rate, gating: true, allowed: {absolute: 0.15}}
    - {name: output_tokens, gating: false, allowed: {relative: 0.5}}
"""
#: what the dashboard's variables and Grafana's own interval variables stand for in this test
VARIABLES = {"$job": "lockgate-controller", "$model": "chat", "$metric": "error_rate", "$__rate_interval": "15s",
             "$__range": "5m", "${datasource}": ""}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def promql(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:  # 400: a query Prometheus refuses, with its error
        return json.loads(exc.read())


def substitute(expr: str) -> str:
    for k in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(k, VARIABLES[k])
    return expr


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="Debian package prometheus not installed (.ci/run installs it)")
def test_rollout_series_on_a_real_controller_and_the_dashboard_queries(tmp_path):
    v1, p1 = chat_server(tmp_path, "v1", "--error-rate", "0.02", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--error-rate", "0.42", "--seed", "2")
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}}]
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC)
    prom = None
    try:
        with Fleet(tmp_path, models, with_controller=True) as fleet:
            http = fleet.ports["controller_http"]
            prom_port = free_port()
            (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: lockgate-controller
    static_configs: [{{targets: ["127.0.0.1:{http}"]}}]
""")
            prom = Proc(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                        tmp_path / "prometheus.log", ready_line=None)
            s = scrape(http)
            assert value(s, "lockgate_rollbacks_total", model="chat", reason="harm") == 0  # there before any rollout
            assert value(s, "lockgate_promotions_total", model="chat", by="evidence") == 0

            # 1. started, no traffic yet: running at stage 0 of 3, 10 %; looks without data: both gates not yet
            r = fleet.cli("rollout", "start", str(spec))
            assert r.returncode == 0, r.stderr + r.stdout
            rid = status(fleet)["id"]
            def judged():
                got = scrape(http)
                return got if value(got, "lockgate_gate_verdict", model="chat", metric="error_rate",
                                    gating="true") is not None else None

            s = wait_for(judged, 20, "no gate verdict on /metrics")
            assert value(s, "lockgate_rollout_info", model="chat", rollout=str(rid), canary="v2", baseline="v1") == 1
            assert value(s, "lockgate_rollout_status", model="chat", status="running") == 1
            assert value(s, "lockgate_rollout_stage_index", model="chat") == 0
            assert value(s, "lockgate_rollout_stages", model="chat") == 3
            assert value(s, "lockgate_rollout_canary_weight_ratio", model="chat") == 0.1
            assert value(s, "lockgate_gate_verdict", model="chat", metric="error_rate", gating="true") == 0
            assert value(s, "lockgate_gate_verdict", model="chat", metric="output_tokens", gating="false") == 0
            assert value(s, "lockgate_gate_samples", model="chat", metric="error_rate", arm="canary") == 0
            assert value(s, "lockgate_rollout_last_evaluation_timestamp_seconds", model="chat") > time.time() - 10
            # Prometheus records the running state (its scrape, not a fixed sleep: a loaded machine delays it)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                seen = promql(prom_port, 'lockgate_rollout_status{model="chat", status="running"} == 1')
                if seen.get("status") == "success" and seen["data"]["result"]:
                    break
                time.sleep(0.5)

            # 2. traffic: the canary's 42 % errors are shown beyond the +15 points allowed → rolled back
            with Traffic(fleet.ports["listener"]):
                final = wait_status(fleet, ("promoted", "rolled_back", "inconclusive", "aborted"), 75)
                assert final["status"] == "rolled_back", final
                s = scrape(http)
                time.sleep(4)  # Prometheus scrapes the outcome with traffic still flowing
            err = {v["metric"]: v for v in final["last_eval"]["verdicts"]}["error_rate"]
            assert value(s, "lockgate_rollout_status", model="chat", status="rolled_back") == 1
            assert value(s, "lockgate_rollout_status", model="chat", status="running") == 0
            assert value(s, "lockgate_rollout_canary_weight_ratio", model="chat") == 0
            assert value(s, "lockgate_rollbacks_total", model="chat", reason="harm") == 1
            assert value(s, "lockgate_rollbacks_total", model="chat", reason="abort") == 0
            assert value(s, "lockgate_gate_verdict", model="chat", metric="error_rate", gating="true") == -1
            assert value(s, "lockgate_gate_value", model="chat", metric="error_rate", arm="canary") == \
                pytest.approx(err["canary"])
            assert value(s, "lockgate_gate_value", model="chat", metric="error_rate", arm="baseline") == \
                pytest.approx(err["baseline"])
            assert value(s, "lockgate_gate_samples", model="chat", metric="error_rate", arm="canary") == err["n_canary"]
            assert value(s, "lockgate_gate_allowed", model="chat", metric="error_rate") == pytest.approx(0.15)

            # 3. Prometheus saw the rollout run and roll back ...
            ran = promql(prom_port, 'max_over_time(lockgate_rollout_status{model="chat", status="running"}[5m])')
            assert ran["status"] == "success" and float(ran["data"]["result"][0]["value"][1]) == 1, ran
            # ... and every dashboard query is valid PromQL over what lockgate exports, with data
            empty = []
            for where, expr in dashboard_exprs():
                q = promql(prom_port, substitute(expr))
                assert q["status"] == "success", (where, substitute(expr), q)
                if not q["data"]["result"] and not where.startswith("annotation"):
                    empty.append((where, substitute(expr)))
            assert not empty, empty
            # the alert rules' expressions too (no alert is expected to be firing but the rollback one)
            rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "lockgate-rules.yml").read_text())
            for g in rules["groups"]:
                for rule in g["rules"]:
                    q = promql(prom_port, rule["expr"])
                    assert q["status"] == "success", (rule["alert"], q)
                    firing = bool(q["data"]["result"])
                    assert firing == (rule["alert"] == "LockgateRolledBack"), (rule["alert"], q["data"]["result"])
    finally:
        if prom is not None:
            prom.stop()
        v1.stop()
        v2.stop()
