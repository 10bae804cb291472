"""``database: postgresql://…``: one config line moves every piece of lockgate state into PostgreSQL.

A real Envoy, the xDS server and the controller on a fresh database of a real PostgreSQL
(tests/pg.py) drive a good canary to promotion under sticky traffic. Then: no SQLite store exists in
the state directory; the weights and their change log, the rollout and its deployment log, the
observations and the outbox (the registry update of the promotion) are in the database; the
deployment-log commands and the export read it from there; and a restarted xDS server serves the promoted weight
from it.
"""

from __future__ import annotations

import json
import time

import pytest

from lockgate.controller.decide.rollouts import RolloutStore
from lockgate.controller.ingest.observations import ObservationStore
from lockgate.controller.tell.outbox import Outbox
from lockgate.database import locate
from lockgate.xds.store import WeightStore
from tests.harness import Fleet, requires_envoy
from tests.integration.test_rollout_e2e import SPEC, Traffic, chat_server, wait_status
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)

pytestmark = [requires_envoy, pytest.mark.envoy]


def test_a_rollout_with_every_store_in_postgresql(tmp_path, pg_url):  # noqa: F811
    v1, p1 = chat_server(tmp_path, "v1", "--error-rate", "0.02", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--error-rate", "0.02", "--seed", "2")
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}}]
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC.format(max_duration="10m"))
    state = tmp_path / "state"
    try:
        with Fleet(tmp_path, models, with_controller=True, extra={"database": pg_url}) as fleet, \
                Traffic(fleet.ports["listener"]):
            time.sleep(1.0)
            r = fleet.cli("rollout", "start", str(spec))
            assert r.returncode == 0, r.stderr + r.stdout
            final = wait_status(fleet, ("promoted", "rolled_back", "inconclusive", "aborted"), 75)
            assert final["status"] == "promoted", final
            history = fleet.cli("history", "--json", check=True)
            shown = fleet.cli("show", str(final["id"]), check=True)
            exported = fleet.cli("observations", "export", "--model", "chat", check=True)
            # a restarted xDS server serves the promoted weight, read back from PostgreSQL
            fleet.procs["xds"].kill()
            fleet.start_xds()
            time.sleep(1.0)
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 10000)
    finally:
        v1.stop()
        v2.stop()

    assert sorted(p.name for p in state.glob("*.db*")) == []  # no SQLite store was created

    def where(filename):
        return locate(state, filename, pg_url)

    weights = WeightStore(where("lockgate.db"))
    assert weights.load()["chat"].weight_bp == 10000
    assert [c["to_bp"] for c in reversed(weights.changes("chat"))][-1] == 10000
    weights.close()

    rollouts = RolloutStore(where("rollouts.db"))
    kinds = [e["kind"] for e in rollouts.events(final["id"])]
    assert kinds[0] == "created" and "promoted" in kinds, kinds
    assert rollouts.evaluations(final["id"]), "no judgement recorded"
    rollouts.close()

    obs = ObservationStore(where("observations.db"), read_only=True)
    n = obs.count("chat")
    columns = obs.fetch("chat")
    obs.close()
    assert n > 100 and columns["ts"].size == n
    assert 100 < len(exported.stdout.splitlines()) <= n  # the CLI export read them from PostgreSQL (more came later)
    assert set(columns["version"]) == {"v1", "v2"}

    outbox = Outbox(where("notify.db"))
    registry = [i for i in outbox.items() if i.channel == "registry"]
    outbox.close()
    assert [i.kind for i in registry] and registry[-1].state == "delivered", registry

    rows = json.loads(history.stdout)
    assert rows[0]["id"] == final["id"] and rows[0]["status"] == "promoted", rows
    assert "promoted" in shown.stdout
