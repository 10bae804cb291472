"""`lockgate weights` for a fleet: a count line first, then every Envoy with what it serves."""

from __future__ import annotations

import io

from lockgate.cli import _print_model
from lockgate.proto.v1 import control_pb2


def render(*envoys: dict) -> str:
    m = control_pb2.ModelWeights(model="chat", stable="v1", canary="v2", weight_bp=500, xds_version="9")
    for e in envoys:
        m.envoys.append(control_pb2.EnvoyRouteState(**e))
    out = io.StringIO()
    _print_model(m, out)
    return out.getvalue()


def test_one_envoy_has_no_count_line_a_fleet_has_one():
    one = render({"node_id": "a", "connected": True, "acked": True, "acked_version": "9", "acked_canary": "v2",
                  "acked_weight_bp": 500})
    assert one.splitlines() == ["chat: stable v1, canary v2 at 5% (routes version 9)",
                                "  envoy a: connected, ACKed version 9 (canary v2 at 5%), in sync"]
    fleet = render(
        {"node_id": "a", "connected": True, "acked": True, "acked_version": "9", "acked_canary": "v2",
         "acked_weight_bp": 500},
        {"node_id": "b", "connected": True, "acked": False, "acked_version": "8", "acked_canary": "v2",
         "acked_weight_bp": 1000},
        {"node_id": "c", "connected": True, "acked": False, "nack_version": "9", "nack_error": "bad"},
        {"node_id": "d", "connected": True, "acked": False, "nack_version": "7", "nack_error": "old"},
        {"node_id": "e", "connected": False, "acked": False, "acked_version": "8", "acked_canary": "v2",
         "acked_weight_bp": 1000})
    lines = fleet.splitlines()
    # d NACKed an older version only: it is behind, not NACKing the current routes
    assert lines[1] == "  5 Envoys: 1 in sync, 2 NOT in sync, 1 NACKed, 1 DISCONNECTED"
    assert lines[3] == "  envoy b: connected, ACKed version 8 (canary v2 at 10%), NOT in sync"
    assert lines[4].startswith("  envoy c: connected, ACKed version - (nothing ACKed yet), NOT in sync; "
                               "last NACK of version 9: bad")
    assert lines[6] == "  envoy e: DISCONNECTED, ACKed version 8 (canary v2 at 10%), NOT in sync"


def test_shadow_cohorts_and_ejected_hosts_are_listed():
    m = control_pb2.ModelWeights(model="chat", stable="v1", canary="v2", weight_bp=100, xds_version="4",
                                 mirror_ppm=50_000, ejected=["10.0.0.14:8000"])
    m.cohorts.append(control_pb2.Cohort(name="beta", kind="header", key="x-beta-tester", value="true"))
    out = io.StringIO()
    _print_model(m, out)
    assert out.getvalue().splitlines() == [
        "chat: stable v1, canary v2 at 1% (routes version 4)",
        "  shadow: 5% of requests mirrored to v2 (answers discarded)",
        "  cohort beta: header x-beta-tester=true sent to v2",
        "  ejected: 10.0.0.14:8000 (out of rotation by per-host gating)",
        "  no Envoy connected"]
