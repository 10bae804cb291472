"""A real Prometheus server scrapes lockgate's ext_proc and controller /metrics."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request

import pytest

from tests.harness import Client, Fleet, Proc, PY, free_port, requires_envoy

pytestmark = [requires_envoy, pytest.mark.envoy,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="Debian package prometheus not installed (.ci/run installs it)")]


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def test_prometheus_scrapes_requests_by_model_version_role(tmp_path):
    up = Proc([PY, "-m", "lockgate.examples.chat_server", "--port", "0", "--version", "v1", "--latency-ms", "0"],
              tmp_path / "chat.log")
    port = int(up.ready_text.split()[1])
    models = [{"name": "chat", "stable": "v1", "versions": {"v1": {"endpoints": [f"127.0.0.1:{port}"]}}}]
    fleet = Fleet(tmp_path, models, with_controller=True)
    fleet.start()
    prom_port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: lockgate-extproc
    static_configs: [{{targets: ["127.0.0.1:{fleet.ports['extproc_metrics']}"]}}]
  - job_name: lockgate-controller
    static_configs: [{{targets: ["127.0.0.1:{fleet.ports['controller_http']}"]}}]
""")
    prom = Proc(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path / "prometheus.log", ready_line=None)
    try:
        c = Client(fleet.ports["listener"])
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        for i in range(30):
            assert c.request("/v1/chat/completions", {"x-user-id": f"u{i}", "content-type": "application/json"},
                             "POST", body).status == 200
        c.close()
        deadline = time.monotonic() + 40
        result = []
        while time.monotonic() < deadline:
            try:
                result = query(prom_port, 'sum by (model, version, role) (lockgate_requests_total{job="lockgate-extproc"})')
                ctl = query(prom_port, 'sum(lockgate_controller_observations_stored_total)')
                if result and float(result[0]["value"][1]) >= 30 and ctl and float(ctl[0]["value"][1]) >= 30:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert result[0]["metric"] == {"model": "chat", "version": "v1", "role": "baseline"}
        assert float(result[0]["value"][1]) >= 30
        assert float(ctl[0]["value"][1]) >= 30
    finally:
        prom.stop()
        fleet.stop()
        up.stop()
