"""The smaller items of the hardening issue, each pinned: a crashed controller's lease is void at once,
the evaluation store is private, the evaluation history grows with the analysis interval (not the
load), and component logs rotate."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from lockgate.controller.evaluate.evaluation import EvaluationStore
from lockgate.controller.decide.promoter import keep_in_history
from lockgate.controller.decide.rollouts import RolloutStore
from lockgate.supervisor import rotate_if_large


def test_a_dead_controllers_lease_is_taken_over_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = RolloutStore(tmp_path / "rollouts.db")
    crashed.owner = f"{crashed.owner.rpartition(':')[0]}:{dead.pid}"  # what the crashed controller wrote
    assert crashed.acquire("chat", ttl_s=15.0)
    successor = RolloutStore(tmp_path / "rollouts.db")
    assert successor.acquire("chat", ttl_s=15.0)  # not 15 s later
    assert successor.lease_owner("chat")[0] == successor.owner
    # a live owner keeps its lease until the TTL
    other = RolloutStore(tmp_path / "rollouts.db")
    other.owner = f"{other.owner.rpartition(':')[0]}:{os.getppid()}"
    assert not other.acquire("chat", ttl_s=15.0)
    # an owner on another host cannot be checked from here: it keeps its lease until the TTL
    remote = RolloutStore(tmp_path / "rollouts.db")
    remote.owner = "another-host:1"
    assert not remote.acquire("chat", ttl_s=15.0)


def test_evaluation_store_is_private_also_when_it_existed(tmp_path):
    path = tmp_path / "evaluation.db"
    EvaluationStore(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)  # created world-readable by an older version
    EvaluationStore(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_evaluation_history_keeps_one_row_per_interval_and_every_change():
    hold = ("hold", (("error_rate", "not-yet"),))
    assert keep_in_history(100.0, hold, None, 30.0)
    kept_at = 100.0
    rows = 0
    for t in range(101, 400):  # a data-triggered look every second for 5 minutes
        if keep_in_history(float(t), hold, (kept_at, hold), 30.0):
            kept_at, rows = float(t), rows + 1
    assert rows == 9  # one per 30 s, not 299
    changed = ("hold", (("error_rate", "pass"),))
    assert keep_in_history(kept_at + 1, changed, (kept_at, hold), 30.0)
    assert keep_in_history(kept_at + 1, ("advance", hold[1]), (kept_at, hold), 30.0)


def test_component_logs_rotate_and_keep_a_few(tmp_path):
    log = tmp_path / "xds.log"
    for i in range(5):
        log.write_bytes(f"run {i}\n".encode() * 200)
        assert rotate_if_large(log, max_bytes=100, keep=3)
        assert log.stat().st_size == 0
    assert (tmp_path / "xds.log.1").read_bytes().startswith(b"run 4")
    assert (tmp_path / "xds.log.3").read_bytes().startswith(b"run 2")
    assert not (tmp_path / "xds.log.4").exists()
    log.write_bytes(b"small")
    assert not rotate_if_large(log, max_bytes=100, keep=3)


# ----------------------------------------------------------------------------- check-config

import pytest  # noqa: E402

from lockgate.config import ConfigError, config_from_text  # noqa: E402
from lockgate.controller.decide.spec import spec_from_text  # noqa: E402

MODEL = '{name: chat, stable: v1, versions: {v1: {endpoints: ["127.0.0.1:7001"]}, v2: {endpoints: ["127.0.0.1:7002"]}}}'


@pytest.mark.parametrize("text, expect", [
    ('node_id: "edge\\"}, cluster: {evil"\nmodels: [' + MODEL + ']',
     "lg.yaml:1:10: node_id: must be 1-128 characters"),
    ('listener: {address: 0.0.0.0, port: 9100}\nadmin: {address: 127.0.0.1, port: 9100}\nmodels: [' + MODEL + ']',
     "lg.yaml:2:35: admin.port: port 9100 is also used by listener"),
    ('listener: {address: 127.0.0.1, port: 7001}\nmodels: [' + MODEL + ']',
     "models[0].versions.v1.endpoints: 127.0.0.1:7001 is lockgate's own listener address"),
    ('models: [' + MODEL + ', {name: chat2, stable: a, versions: {a: {endpoints: ["127.0.0.1:7003"]}}}]',
     "models[1].match: same match as models[0] (chat): path_prefix '/'"),
])
def test_check_config_refuses_what_it_used_to_accept(text, expect):
    with pytest.raises(ConfigError) as exc:
        config_from_text(text, "lg.yaml")
    assert expect in str(exc.value), str(exc.value)


def test_class_metrics_on_a_model_without_classes_are_refused():
    cfg = config_from_text("models: [" + MODEL.replace("{name: chat,", "{name: chat, analyzer: sse,") + "]", "lg.yaml")
    with pytest.raises(ConfigError) as exc:
        spec_from_text("rollout:\n  model: chat\n  canary: v2\n  metrics:\n"
                       "    - {name: error_rate, allowed: {absolute: 0.01}}\n"
                       "    - {name: class_recall, class: fraud, allowed: {absolute: 0.02}}\n", "r.yaml", cfg)
    assert "r.yaml:6:14: rollout.metrics[1].name: class_recall needs predicted classes" in str(exc.value)
