"""``envoy.concurrency`` (default: the host's cores) and the ext_proc processes derived from it: parsing,
errors with file/line/field, what ``lockgate up`` runs and what ``check-config`` says."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from lockgate.config import ConfigError, config_from_text
from lockgate.config.envoy import MAX_DERIVED_EXTPROC, extproc_processes_for, host_cores

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = "models: [{name: chat, stable: v1, versions: {v1: {endpoints: ['127.0.0.1:7001']}}}]\n"


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        config_from_text(text, "lg.yaml")
    return str(exc.value)


def test_default_is_the_cpus_this_process_may_run_on():
    cfg = config_from_text(MODELS)
    cores = len(os.sched_getaffinity(0))
    assert cfg.envoy.concurrency == min(256, cores) == host_cores()
    assert cfg.envoy.from_host
    assert cfg.extproc_processes == min(MAX_DERIVED_EXTPROC, -(-cores // 2))
    assert cfg.envoy.extproc_rule.startswith("one per 2 Envoy workers")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_default_follows_a_restricted_affinity_set():
    """A host (or cgroup, or ``taskset``) that gives lockgate one CPU gets one Envoy worker: a real child
    process restricted to CPU set {first CPU} parses the same config."""
    cpu = min(os.sched_getaffinity(0))
    code = ("import os, sys; os.sched_setaffinity(0, {%d}); from lockgate.config import config_from_text; "
            "c = config_from_text(sys.argv[1]); print(c.envoy.concurrency, c.envoy.from_host, c.extproc_processes)"
            % cpu)
    out = subprocess.run([sys.executable, "-c", code, MODELS], capture_output=True, text=True, cwd=REPO,
                         timeout=60, check=True).stdout.split()
    assert out == ["1", "True", "1"]


@pytest.mark.parametrize("concurrency, processes", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (16, 8), (17, 8),
                                                    (64, 8), (256, 8)])
def test_explicit_concurrency_and_the_derived_ext_proc_processes(concurrency, processes):
    cfg = config_from_text(f"envoy: {{concurrency: {concurrency}}}\n" + MODELS)
    assert (cfg.envoy.concurrency, cfg.envoy.from_host, cfg.extproc_processes) == (concurrency, False, processes)
    assert extproc_processes_for(concurrency) == processes
    assert len(cfg.extproc_addresses()) == processes
    if concurrency > 2 * MAX_DERIVED_EXTPROC:
        assert f"at most {MAX_DERIVED_EXTPROC} unless extproc_processes is set" in cfg.envoy.extproc_rule


def test_explicit_extproc_processes_wins():
    cfg = config_from_text("envoy: {concurrency: 8}\nextproc_processes: 1\n" + MODELS)
    assert (cfg.envoy.concurrency, cfg.extproc_processes, cfg.envoy.extproc_rule) == (8, 1, "")
    cfg = config_from_text("envoy: {concurrency: 1}\nextproc_processes: 3\n" + MODELS)
    assert (cfg.envoy.concurrency, cfg.extproc_processes) == (1, 3)
    assert "3 ext_proc processes (extproc_processes)" in cfg.envoy.describe(cfg.extproc_processes)


def test_derived_processes_stop_before_another_lockgate_port():
    """examples/lockgate.yaml puts extproc_metrics right after extproc (18080, 18081): a bigger host must
    not turn that valid config into a port clash; it gets fewer processes and says why."""
    text = "envoy: {concurrency: 8}\nextproc: {port: 18080}\nextproc_metrics: {port: 18081}\n" + MODELS
    cfg = config_from_text(text)
    assert cfg.extproc_processes == 1
    assert "would be 4; 1 fits before the next lockgate port" in cfg.envoy.extproc_rule
    cfg = config_from_text("envoy: {concurrency: 8}\nextproc: {port: 18080}\nextproc_metrics: {port: 18083}\n"
                           "xds: {port: 18086}\n" + MODELS)
    assert cfg.extproc_processes == 3  # 18080-18082 and 18083-18085; 18086 is the xDS server's
    # set explicitly, a clash is an error as before
    assert "port 18081 is also used by extproc (process 1)" in problems(
        "extproc_processes: 2\nextproc: {port: 18080}\nextproc_metrics: {port: 18081}\n" + MODELS)


@pytest.mark.parametrize("snippet, needle", [
    ("envoy: {concurrency: 0}", "lg.yaml:1:22: envoy.concurrency: must be between 1 and 256, got 0"),
    ("envoy: {concurrency: 257}", "lg.yaml:1:22: envoy.concurrency: must be between 1 and 256, got 257"),
    ("envoy: {concurrency: two}", "lg.yaml:1:22: envoy.concurrency: must be an integer, got a string"),
    ("envoy: {concurrency: 2.5}", "lg.yaml:1:22: envoy.concurrency: must be an integer, got a number"),
    ("envoy: {concurrency: true}", "lg.yaml:1:22: envoy.concurrency: must be an integer, got a boolean"),
    ("envoy: {workers: 2}", "lg.yaml:1:18: envoy.workers: unknown field (known: concurrency)"),
    ("envoy: [2]", "lg.yaml:1:8: envoy: must be a mapping, got a list"),
    ("envoy: 4", "lg.yaml:1:8: envoy: must be a mapping, got an integer"),
])
def test_bad_values_name_file_line_and_field(snippet, needle):
    text = problems(snippet + "\n" + MODELS)
    assert needle in text, text


def test_up_runs_envoy_with_the_concurrency_and_every_ext_proc_process(tmp_path):
    from lockgate.config import load_config
    from lockgate.supervisor import components, sizing

    path = tmp_path / "lockgate.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\nenvoy: {{concurrency: 3}}\n" + MODELS)
    config = load_config(path)
    comps = {c.name: c for c in components(config, str(path))}
    argv = comps["envoy"].argv
    assert argv[argv.index("--concurrency") + 1] == "3"
    assert [n for n in comps if n.startswith("extproc")] == ["extproc-0", "extproc-1"]
    assert comps["extproc-1"].argv[-2:] == ["--index", "1"]
    boot = yaml.safe_load((tmp_path / "state" / "envoy-bootstrap.yaml").read_text())
    (cluster,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == "lockgate_extproc"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [18080, 18081]
    assert sizing(config) == ("3 worker threads (envoy.concurrency), 2 ext_proc processes "
                              "(one per 2 Envoy workers)")


def test_check_config_says_how_up_sizes_the_data_path(tmp_path):
    path = tmp_path / "lockgate.yaml"
    path.write_text("envoy: {concurrency: 4}\n" + MODELS)
    r = subprocess.run([sys.executable, "-m", "lockgate", "-c", str(path), "check-config"], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert ("lockgate up here: Envoy with 4 worker threads (envoy.concurrency), 2 ext_proc processes "
            "(one per 2 Envoy workers)") in r.stdout, r.stdout
