"""A revert you can trust, end to end through real Envoys: an abort requested while the xDS server is
frozen (SIGSTOP) is not recorded as done; the rollout is ``rolling_back``, ``rollout abort`` exits
non-zero and says why, the Envoy keeps its last routes (the canary still serves), and once the xDS
server resumes the controller's retry reaches every Envoy and only then records ``aborted``."""

from __future__ import annotations

import signal
import time

import pytest

from tests.harness import Fleet, requires_envoy
from tests.integration.test_faults import chat_rollout
from tests.integration.test_rollout_e2e import Traffic, status, wait_status

pytestmark = [requires_envoy, pytest.mark.envoy]


def test_abort_while_xds_is_frozen_is_retried_until_every_envoy_has_weight_0(tmp_path):
    with chat_rollout(tmp_path, "5m") as (models, spec):
        with Fleet(tmp_path, models, n_envoys=2, with_controller=True) as fleet, \
                Traffic(fleet.ports["listener"], max_s=120):
            assert fleet.cli("rollout", "start", str(spec)).returncode == 0
            assert wait_status(fleet, ("running",), 30)["status"] == "running"
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 1000)
            xds = fleet.procs["xds"]
            xds.kill(signal.SIGSTOP)
            try:
                r = fleet.cli("rollout", "abort", "chat")
                assert r.returncode == 1, (r.stdout, r.stderr)
                assert "revert NOT complete" in r.stderr and "rolling_back" in r.stdout
                st = status(fleet)
                assert st["status"] == "rolling_back"
                # Nothing was recorded as done, and the Envoys still serve the canary (last routes kept).
                assert all(fleet.route_weights(i)["chat/key/0"][0] == ("chat.v2", 1000) for i in range(2))
                again = fleet.cli("rollout", "start", str(spec))
                assert again.returncode == 2 and "rolling_back" in again.stderr
            finally:
                xds.kill(signal.SIGCONT)
            final = wait_status(fleet, ("aborted",), 60)
            assert final["status"] == "aborted", final
            for i in range(2):
                assert fleet.route_weights(i)["chat/key/0"][0] == ("chat.v2", 0)
            events = fleet.cli("show", str(final["id"]), "--json", check=False)
            assert events.returncode == 0
            text = events.stdout
            assert "revert_incomplete" in text and "rolling_back" in text and "aborted" in text


def test_a_manual_set_weight_during_a_rollout_pauses_it_and_resume_reapplies_the_stage(tmp_path):
    with chat_rollout(tmp_path, "5m") as (models, spec):
        with Fleet(tmp_path, models, with_controller=True) as fleet, Traffic(fleet.ports["listener"], max_s=60):
            assert fleet.cli("rollout", "start", str(spec)).returncode == 0
            assert wait_status(fleet, ("running",), 30)["status"] == "running"
            assert fleet.cli("set-weight", "chat", "v2", "100").returncode == 0  # someone, by hand
            st = wait_status(fleet, ("paused",), 20)
            assert st["status"] == "paused", st
            shown = fleet.cli("show", str(st["id"]), "--json").stdout
            assert "weight_drift" in shown and "changed outside the rollout" in shown
            r = fleet.cli("rollout", "resume", "chat")
            assert r.returncode == 0, r.stderr
            assert status(fleet)["status"] == "running"
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 1000)  # the stage's 10 %, re-applied
