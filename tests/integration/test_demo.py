"""Smoke test of `make demo`'s path: both stories on a shortened run (free ports, temp state)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import yaml

from tests.harness import dump_yaml, REPO, _env, free_port, requires_envoy

pytestmark = [requires_envoy, pytest.mark.envoy, pytest.mark.slow]


def demo_config(tmp_path):
    cfg = yaml.safe_load((REPO / "examples" / "lockgate.yaml").read_text())
    for key in ("listener", "admin", "xds", "control", "extproc", "extproc_metrics"):
        cfg[key]["port"] = free_port()
    cfg["controller"] = {"address": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}"}
    cfg["state_dir"] = str(tmp_path / "state")
    for model in cfg["models"]:
        for version in model["versions"].values():
            version["endpoints"] = [f"127.0.0.1:{free_port()}"]
    path = tmp_path / "lockgate.yaml"
    path.write_text(dump_yaml(cfg))
    return cfg, path


def test_demo_promotes_the_good_canary_and_rolls_back_the_bad_one(tmp_path):
    cfg, path = demo_config(tmp_path)
    r = subprocess.run([sys.executable, "-m", "lockgate.demo", "-c", str(path), "--timeout", "200", "--no-report"],
                       capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-2000:]
    assert "chat v2 PROMOTED to 100%" in out
    assert "ticket-classifier v2 ROLLED BACK to v1" in out and "class_recall[fraud]" in out
    assert "every Envoy ACKed weight 0 in" in out
    assert "demo finished: chat promoted, ticket-classifier rolled_back" in out
    # Everything it started is gone: nothing listens on the Envoy listener any more.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", cfg["listener"]["port"]), timeout=1).close()


def test_demo_host_story_ejects_the_bad_host_and_promotes(tmp_path):
    """``--story host``: chat v2 on three hosts, one answering 500 to 30 %: that host is ejected (with its
    numbers) and the version promoted."""
    cfg, path = demo_config(tmp_path)
    r = subprocess.run([sys.executable, "-m", "lockgate.demo", "-c", str(path), "--story", "host", "--timeout", "200",
                        "--no-report"], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-2000:]
    assert "chat v2 runs on 3 hosts" in out
    assert "EJECTED: errors" in out and "every Envoy ACKed in" in out
    assert "chat v2 PROMOTED to 100%" in out and "hosts out: 127.0.0.1:" in out
    assert "demo finished: chat promoted" in out
