"""Prometheus as a metrics source, end to end: two example model servers (v1 the baseline, v2 the canary)
export vLLM-style series, a real Prometheus scrapes them every second, real traffic reaches them through a
real Envoy with lockgate's ext_proc and controller capturing every response. The same traffic is then
judged twice in one judgement — the built-in metrics from lockgate's own stored observations, the
Prometheus metrics from PromQL — and the verdicts must agree, with the counts equal.

Bounded: 1,600 requests, no timing asserts (only deadlines for Prometheus to catch up)."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import yaml

from tests.harness import Client, Fleet, Proc, PY, free_port, requires_envoy

pytestmark = [requires_envoy, pytest.mark.envoy,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="Debian package prometheus not installed (.ci/run installs it)")]

N_USERS = 1600
SPEC = """
rollout:
  model: chat
  canary: v2
  alpha: 0.05
  steps: [{weight_percent: 50, min_duration: 1m, min_canary_samples: 10}]
  metrics:
    - {name: error_rate, allowed: {relative: 0.5}}
    - name: http_error_rate
      prometheus:
        kind: counter
        events: 'http_requests_total{handler="/v1/chat/completions", version="$version", status="5xx"}'
        total: 'http_requests_total{handler="/v1/chat/completions", version="$version"}'
      allowed: {relative: 0.5}
    - name: slow_share
      prometheus:
        kind: histogram
        histogram: 'vllm:e2e_request_latency_seconds{version="$version"}'
        le: 0.1
      allowed: {absolute: 0.03}
    - name: requests_running
      prometheus:
        kind: gauge
        query: 'sum(vllm:num_requests_running{version="$version"})'
        step: 1s
        block: 1s
        unit: requests
      gating: false
      allowed: {absolute: 1}
"""


def prom_query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def send(port: int, users: list[str], statuses: dict[str, int]) -> None:
    c = Client(port)
    body = json.dumps({"messages": [{"role": "user", "content": "hello there"}]}).encode()
    try:
        for u in users:
            r = c.request("/v1/chat/completions", {"x-user-id": u, "content-type": "application/json"}, "POST", body)
            statuses[u] = r.status
    finally:
        c.close()


def test_prometheus_verdicts_equal_the_observation_stream_on_the_same_traffic(tmp_path):
    from lockgate.config import load_config
    from lockgate.controller.decide import analysis
    from lockgate.controller.decide.evidence import EVAL_COLUMNS
    from lockgate.controller.decide.prometheus_evidence import CLUSTERING_NOTE, PrometheusEvidence, merge
    from lockgate.controller.decide.rollouts import Rollout
    from lockgate.controller.decide.spec import spec_from_text
    from lockgate.controller.ingest.observations import ObservationStore
    from lockgate.controller.stats import evaluate_rate

    servers = {
        # the canary errs 6x as often as the baseline (beyond the allowed ratio 1.5): both sources must fail it;
        # both answer in ~5 ms, far from the 100 ms bucket bound: both must pass slow_share
        "v1": Proc([PY, "-m", "lockgate.examples.chat_server", "--port", "0", "--version", "v1", "--seed", "1",
                    "--latency-ms", "5", "--latency-jitter-ms", "1", "--error-rate", "0.02"], tmp_path / "v1.log"),
        "v2": Proc([PY, "-m", "lockgate.examples.chat_server", "--port", "0", "--version", "v2", "--seed", "2",
                    "--latency-ms", "5", "--latency-jitter-ms", "1", "--error-rate", "0.12"], tmp_path / "v2.log"),
    }
    ports = {v: int(p.ready_text.split()[1]) for v, p in servers.items()}
    prom_port = free_port()
    fleet = Fleet(tmp_path, [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
                              "versions": {v: {"endpoints": [f"127.0.0.1:{p}"]} for v, p in ports.items()}}],
                  with_controller=True)
    # lockgate.yaml names the Prometheus (controller.prometheus.url)
    cfg = yaml.safe_load(fleet.config_path.read_text())
    cfg["controller"]["prometheus"] = {"url": f"http://127.0.0.1:{prom_port}", "timeout_s": 5, "refresh_s": 0}
    fleet.config_path.write_text(yaml.safe_dump(cfg))
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: models
    static_configs: [{{targets: ["127.0.0.1:{ports['v1']}", "127.0.0.1:{ports['v2']}"]}}]
""")
    prom = None
    fleet.start()
    try:
        prom = Proc(["prometheus", f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path / "prometheus.log", ready_line=None)
        # both servers scraped before the rollout starts (their counters exist at its start)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if len(prom_query(prom_port, 'up{job="models"} == 1')) == 2:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("Prometheus never scraped the servers:\n" + (tmp_path / "prometheus.log").read_text()[-2000:])
        assert fleet.set_weight("chat", "v2", 50)["allAcked"]
        time.sleep(1.5)
        started = time.time()
        statuses: dict[str, int] = {}
        users = [f"user-{i}" for i in range(N_USERS)]
        threads = [threading.Thread(target=send, args=(fleet.ports["listener"], users[i::4], statuses))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(statuses) == N_USERS and set(statuses.values()) <= {200, 500}
        fleet.wait_observations(N_USERS, timeout=30)
        # Prometheus has scraped the final counters: its totals equal the requests sent
        deadline = time.monotonic() + 30
        total = 0.0
        while time.monotonic() < deadline:
            res = prom_query(prom_port, 'sum(http_requests_total{handler="/v1/chat/completions"})')
            total = float(res[0]["value"][1]) if res else 0.0
            if total >= N_USERS:
                break
            time.sleep(0.5)
        assert total == N_USERS
        time.sleep(2.5)  # a few more gauge samples after the traffic
        now = time.time()

        config = load_config(fleet.config_path)
        spec = spec_from_text(SPEC, "spec.yaml", config)
        rollout = Rollout(id=1, model="chat", canary="v2", baseline="v1", spec_text=SPEC, spec_source="spec.yaml",
                          spec_hash=spec.sha256, status="running", stage=0, started_at=started,
                          stage_started_at=started, ended_at=None, created_by="test", auto={}, last_eval=None,
                          last_eval_at=None)
        store = ObservationStore(tmp_path / "state" / "observations.db", read_only=True)
        try:
            data = store.fetch("chat", since_ts=started - 1, versions=["v1", "v2"], columns=list(EVAL_COLUMNS))
        finally:
            store.close()
        assert len(data["ts"]) == N_USERS
        prometheus = PrometheusEvidence()
        # both sources judged at the same look (merge: with_prometheus itself would not ask Prometheus at a look
        # whose other metrics already roll back — here the observation-fed error_rate does)
        judgement = merge(analysis.evaluate_at(spec, data, now), prometheus.verdicts(rollout, spec, now), spec)
        by = {v.metric: v for v in judgement.verdicts}
        print(json.dumps([{k: v.to_dict()[k] for k in ("metric", "verdict", "reason", "n_baseline", "n_canary")}
                          for v in judgement.verdicts], indent=1))
        assert list(by) == ["error_rate", "http_error_rate", "slow_share", "requests_running"]

        # errors: lockgate's observations and Prometheus's counters see the same requests and the same 5xx
        own, prom_v = by["error_rate"], by["http_error_rate"]
        assert (prom_v.n_baseline, prom_v.n_canary) == (own.n_baseline, own.n_canary), (prom_v.reason, own.reason)
        assert prom_v.details["events_canary"] == own.details["events_canary"]
        assert prom_v.details["events_baseline"] == own.details["events_baseline"]
        assert own.verdict == prom_v.verdict == "fail", (own.reason, prom_v.reason)
        assert prom_v.alpha == own.alpha
        assert CLUSTERING_NOTE in prom_v.reason and CLUSTERING_NOTE not in own.reason
        assert judgement.decision == "rollback"

        # slow share: Prometheus's histogram vs the same question asked of the stored latencies
        slow = by["slow_share"]
        prepared = analysis.prepare(data, now)
        direct = evaluate_rate((np.asarray(prepared["latency_ms"], dtype=float) > 100.0).astype(float),
                               prepared["is_canary"], prepared["share"], prepared["cluster"],
                               spec.metric("slow_share").to_stats_spec(), slow.alpha, stratum=prepared["share"])
        assert slow.verdict == direct.verdict == "pass", (slow.reason, direct.reason)
        assert (slow.n_baseline, slow.n_canary) == (direct.n_baseline, direct.n_canary)
        assert CLUSTERING_NOTE in slow.reason and slow.details["queries"]["canary"]["at_or_below_le"].count("le=~") == 1

        # the gauge: sampled every second per arm, one cluster per 1 s block; informational
        gauge = by["requests_running"]
        assert gauge.n_canary >= 3 and gauge.n_baseline >= 3 and not gauge.gating
        assert CLUSTERING_NOTE in gauge.reason and gauge.details["clustering"].startswith("time blocks")

        # a bucket bound the histogram does not have, and a Prometheus that is gone: the gate holds
        spec_bad = spec_from_text(SPEC.replace("le: 0.1", "le: 0.07"), "spec.yaml", config)
        held = merge(analysis.evaluate_at(spec_bad, data, now), PrometheusEvidence().verdicts(rollout, spec_bad, now),
                     spec_bad)
        hv = {v.metric: v for v in held.verdicts}["slow_share"]
        assert hv.verdict == "not-yet" and "no bucket le=0.07" in hv.reason, hv.reason
        prom.stop()
        prom = None
        gone = merge(analysis.evaluate_at(spec, data, now), PrometheusEvidence().verdicts(rollout, spec, now), spec)
        for v in gone.verdicts[1:]:
            assert v.verdict == "not-yet" and "unreachable" in v.reason and "the gate holds" in v.reason, v.reason
        assert {v.metric: v.verdict for v in gone.verdicts}["error_rate"] == "fail"  # the observations still decide
        # and a look that rolls back on them does not wait for Prometheus at all
        quick = PrometheusEvidence().with_prometheus(analysis.evaluate_at(spec, data, now), rollout, spec, now)
        assert quick.decision == "rollback"
        assert "other gating metrics roll the canary back" in {v.metric: v for v in quick.verdicts}["slow_share"].reason
    finally:
        if prom is not None:
            prom.stop()
        fleet.stop()
        for p in servers.values():
            p.stop()


E2E_SPEC = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 1
  alpha: 0.05
  steps:
    - {weight_percent: 20, min_duration: 2s, min_canary_samples: 40}
    - {weight_percent: 50, min_duration: 2s, min_canary_samples: 100}
  promotion: {max_duration: 10m, preflight: none}
  metrics:
    - {name: error_rate, gating: false, allowed: {absolute: 0.15}}
    - name: http_error_rate
      prometheus:
        kind: counter
        events: 'http_requests_total{handler="/v1/chat/completions", version="$version", status="5xx"}'
        total: 'http_requests_total{handler="/v1/chat/completions", version="$version"}'
      allowed: {absolute: 0.15}
"""


@pytest.mark.parametrize("canary_errors, outcome", [("0.02", "promoted"), ("0.42", "rolled_back")],
                         ids=["good-canary-promoted-on-prometheus", "bad-canary-rolled-back-on-prometheus"])
def test_the_controller_decides_on_a_prometheus_gate(tmp_path, canary_errors, outcome):
    """The live controller (its incremental evidence, a spec loaded with lockgate.yaml's controller.prometheus)
    gates a real rollout on a Prometheus metric alone: the observation-fed error_rate is informational."""
    from tests.integration.test_rollout_e2e import Traffic, status

    servers = {v: Proc([PY, "-m", "lockgate.examples.chat_server", "--port", "0", "--version", v, "--seed", s,
                        "--latency-ms", "0", "--latency-jitter-ms", "0", "--error-rate", rate], tmp_path / f"{v}.log")
               for v, s, rate in (("v1", "1", "0.02"), ("v2", "2", canary_errors))}
    ports = {v: int(p.ready_text.split()[1]) for v, p in servers.items()}
    prom_port = free_port()
    fleet = Fleet(tmp_path, [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
                              "versions": {v: {"endpoints": [f"127.0.0.1:{p}"]} for v, p in ports.items()}}],
                  with_controller=True)
    cfg = yaml.safe_load(fleet.config_path.read_text())
    cfg["controller"]["prometheus"] = {"url": f"http://127.0.0.1:{prom_port}", "timeout_s": 5, "refresh_s": 1}
    fleet.config_path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: models
    static_configs: [{{targets: ["127.0.0.1:{ports['v1']}", "127.0.0.1:{ports['v2']}"]}}]
""")
    spec = tmp_path / "rollout.yaml"
    spec.write_text(E2E_SPEC)
    prom = Proc(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path / "prometheus.log", ready_line=None)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if len(prom_query(prom_port, 'up{job="models"} == 1')) == 2:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        with fleet, Traffic(fleet.ports["listener"], max_s=120):
            time.sleep(1.0)
            r = fleet.cli("rollout", "start", str(spec))
            assert r.returncode == 0, r.stderr + r.stdout
            deadline = time.monotonic() + 100
            st = status(fleet)
            while time.monotonic() < deadline and st["status"] not in ("promoted", "rolled_back", "inconclusive"):
                time.sleep(0.5)
                st = status(fleet)
            text = fleet.cli("rollout", "status", "chat").stdout
    finally:
        prom.stop()
        for p in servers.values():
            p.stop()
    assert st["status"] == outcome, (st, text, (tmp_path / "controller.log").read_text()[-3000:])
    verdicts = {v["metric"]: v for v in st["last_eval"]["verdicts"]}
    gate = verdicts["http_error_rate"]
    assert gate["gating"] and not verdicts["error_rate"]["gating"]
    assert gate["verdict"] == ("pass" if outcome == "promoted" else "fail"), gate
    assert "per-user clustering not available: Prometheus aggregates" in gate["reason"]
    assert gate["details"]["source"] == "prometheus" and gate["n_canary"] > 0
    assert "http_error_rate" in text


def test_a_counter_reset_by_a_restarted_server_is_counted_exactly(tmp_path):
    """A model server restarted mid-stage starts its counters again: the window is summed from the raw samples
    (the difference of the two ends would say too few: 40 - 5 = 35 instead of 30 + 40 = 70). Like Prometheus's
    own rate(), a reset is seen when a scrape catches the counter below its previous value."""
    from lockgate.controller.evaluate.prometheus_source import PrometheusReader, read_counter_windows

    port, prom_port = free_port(), free_port()
    argv = [PY, "-m", "lockgate.examples.chat_server", "--port", str(port), "--version", "v2", "--latency-ms", "0"]
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s}}
scrape_configs:
  - job_name: models
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
""")
    server = Proc(argv, tmp_path / "v2.log")
    prom = Proc(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path / "prometheus.log", ready_line=None)
    expr = 'sum(http_requests_total{handler="/v1/chat/completions", version="v2"})'

    def wait_for(value: float) -> None:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                res = prom_query(prom_port, expr)
                if res and float(res[0]["value"][1]) == value:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        pytest.fail(f"Prometheus never saw {expr} == {value}")

    def traffic(n: int) -> None:
        send(port, [f"u{i}" for i in range(n)], {})

    try:
        traffic(5)
        wait_for(5)
        start = time.time()
        time.sleep(1.5)
        traffic(30)
        wait_for(35)
        server.stop()
        server = Proc(argv, tmp_path / "v2.log")
        traffic(10)
        wait_for(10)  # a scrape saw the counter below its old value: the reset (as Prometheus's rate() sees one)
        traffic(30)  # more than before the restart: the plain difference would be 40 - 5 = 35
        wait_for(40)
        now = time.time()
        got = read_counter_windows(PrometheusReader(f"http://127.0.0.1:{prom_port}", 5.0), expr, [start, now], now)
        assert got.counts == (70.0,), got
        assert got.notes and "reset" in got.notes[0] and "sample by sample" in got.notes[0]
        # without a reset the window is the plain difference, and says nothing
        time.sleep(2)
        later = time.time()
        quiet = read_counter_windows(PrometheusReader(f"http://127.0.0.1:{prom_port}", 5.0), expr, [now, later], later)
        assert quiet.counts == (0.0,) and not quiet.notes
    finally:
        prom.stop()
        server.stop()
