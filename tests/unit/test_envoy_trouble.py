"""The trouble monitor's Envoy conditions, from what the control API reports (``GetWeights``).

An Envoy that disconnects, NACKs the current routes, or stays connected without ACKing them for
``OUT_OF_SYNC_S`` (stalled, or partitioned while its TCP connection looks alive) raises one ``trouble``
alert, and one ``resolved`` alert when it is back in sync; a push in flight at check time is not trouble.
The alerts are recorded at the notifier's ``raise_trouble`` (the integration tests deliver them).
"""

from __future__ import annotations

import asyncio

from lockgate.controller.tell.trouble import OUT_OF_SYNC_S, TroubleMonitor
from lockgate.proto.v1 import control_pb2


class Recorder:
    """The notifier's ``raise_trouble``, recording."""

    def __init__(self):
        self.alerts = []

    async def raise_trouble(self, alert) -> None:
        self.alerts.append(alert)


def weights(version: int, *envoys: dict) -> control_pb2.GetWeightsResponse:
    m = control_pb2.ModelWeights(model="chat", stable="v1", canary="v2", weight_bp=0, xds_version=str(version))
    for e in envoys:
        m.envoys.append(control_pb2.EnvoyRouteState(**e))
    return control_pb2.GetWeightsResponse(models=[m])


def ok(node: str, version: int) -> dict:
    return {"node_id": node, "connected": True, "acked": True, "acked_version": str(version)}


def behind(node: str, acked: int) -> dict:
    return {"node_id": node, "connected": True, "acked": False, "acked_version": str(acked),
            "acked_canary": "v2", "acked_weight_bp": 500}


def check(mon: TroubleMonitor, resp, now: float) -> None:
    asyncio.run(mon._check_envoys(resp, now))


def test_an_envoy_out_of_sync_for_long_is_trouble_a_push_in_flight_is_not():
    rec = Recorder()
    mon = TroubleMonitor(rec, weights=None, drops=None, rollouts=None)
    check(mon, weights(7, ok("a", 7), behind("b", 6)), 100.0)  # b has not ACKed 7 yet: a push in flight
    check(mon, weights(7, ok("a", 7), ok("b", 7)), 105.0)       # ... and then it did
    check(mon, weights(7, ok("a", 7), ok("b", 7)), 200.0)
    assert rec.alerts == []

    check(mon, weights(8, ok("a", 8), behind("b", 7)), 300.0)
    check(mon, weights(8, ok("a", 8), behind("b", 7)), 300.0 + OUT_OF_SYNC_S - 1)
    assert rec.alerts == []
    check(mon, weights(8, ok("a", 8), behind("b", 7)), 300.0 + OUT_OF_SYNC_S)
    [alert] = rec.alerts
    assert alert.kind == "trouble" and alert.component == "envoy" and alert.status == "firing"
    assert alert.title.startswith("Envoy b connected but has not ACKed routes 8")
    assert "it ACKed 7: canary v2 at 5% for chat" in alert.title
    check(mon, weights(8, ok("a", 8), behind("b", 7)), 330.0)  # still the same trouble: not sent again
    assert len(rec.alerts) == 1
    # a newer push while b is still cut off: b stays in trouble (no false "back in sync", no repeat)
    check(mon, weights(9, ok("a", 9), behind("b", 7)), 340.0)
    assert len(rec.alerts) == 1
    check(mon, weights(9, ok("a", 9), ok("b", 9)), 350.0)
    assert rec.alerts[-1].status == "resolved" and rec.alerts[-1].title == "Envoy b back in sync with the xDS server"
    assert len(rec.alerts) == 2


def test_disconnected_and_nacking_envoys_are_trouble_at_once_and_resolve():
    rec = Recorder()
    mon = TroubleMonitor(rec, weights=None, drops=None, rollouts=None)
    gone = {"node_id": "g", "connected": False, "acked": False, "acked_version": "3", "acked_canary": "v2",
            "acked_weight_bp": 500}
    nack = {"node_id": "n", "connected": True, "acked": False, "nack_version": "4", "nack_error": "bad route"}
    stale_nack = dict(nack, nack_version="3")  # a NACK of an older version: only out of sync (not yet trouble)
    check(mon, weights(4, ok("a", 4), gone, nack), 10.0)
    assert sorted(a.title for a in rec.alerts) == ["Envoy g disconnected from the xDS server",
                                                   "Envoy n NACKed routes 4: bad route"]
    check(mon, weights(4, ok("a", 4), gone, nack), 15.0)
    assert len(rec.alerts) == 2
    check(mon, weights(5, ok("a", 5), ok("g", 5), stale_nack), 20.0)
    # g is back; n's NACK was of an older version — n is still alerted on (it has not ACKed 5 either)
    assert [a.title for a in rec.alerts[2:]] == ["Envoy g back in sync with the xDS server"]
    check(mon, weights(5, ok("a", 5), ok("g", 5), ok("n", 5)), 25.0)
    assert rec.alerts[-1].title == "Envoy n back in sync with the xDS server" and rec.alerts[-1].status == "resolved"
