"""The controller's composition root (lockgate/controller/app.py): every part is built there and wired
through the typed ports of lockgate/controller/ports.py; no other module sets attributes on a part."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from lockgate.config import config_from_text
from lockgate.controller import ports

ROOT = Path(__file__).resolve().parents[2] / "lockgate"


def _config(tmp_path):
    return config_from_text(f"""
state_dir: {tmp_path}
control: {{port: 1}}
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:11"]}}, v2: {{endpoints: ["127.0.0.1:12"]}}}}}}]
""")


def test_the_controller_is_wired_through_ports(tmp_path):
    from lockgate.controller.app import Controller

    async def main():
        c = Controller(_config(tmp_path))
        try:
            assert [t.name for t in c.tasks] == ["retention", "promotion", "notifications", "envoy-watch"]
            assert [t.critical for t in c.tasks] == [True, True, False, True]
            p = c.promoter
            assert p.weights is c.weights and p.observations is c.store and p.rollouts is c.rollouts
            assert p.sinks == (c.notifier,)
            assert p.series is c.rollout_series  # rollout state on the controller's /metrics registry
            assert c.actions.promoter is p and c.actions.rollouts is c.rollouts
            assert c.trouble.weights is c.probe_weights and c.trouble.rollouts is c.rollouts
            assert p.notify in c.collector.on_stored
            assert isinstance(c.weights, ports.WeightPusher) and isinstance(c.probe_weights, ports.WeightReader)
            assert isinstance(c.store, ports.ObservationSource)
            assert isinstance(c.notifier, ports.EventSink)
            assert isinstance(c.actions, ports.RolloutCommands)
            assert isinstance(c.rollouts, ports.ActiveRollouts)
            assert isinstance(c.trouble.drops, ports.DropCounts) and c.trouble.drops.dropped_totals() == {}
        finally:
            await c.close()

    asyncio.run(main())


#: a part of the controller having an attribute set, or a callback added, by someone else
_REACH_IN = re.compile(r"\b(?:service|promoter|notifier|collector|trouble|actions|controller)\.\w+\s*[-+|]?=(?!=)"
                       r"|(?<!self)\.(?:listeners|on_stored|_background)\.(?:append|add)\("
                       r"|\.service\.|sources\._lock")


def test_no_part_sets_attributes_on_another():
    offenders = []
    for path in sorted((ROOT / "controller").rglob("*.py")):
        if path.name == "app.py" and path.parent.name == "controller":
            continue  # the composition root is where parts are wired
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if _REACH_IN.search(code) and not re.match(r"\s*self\.\w+\s*=", code):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_the_control_api_client_is_defined_once():
    """Only lockgate/control_client.py builds WeightControl stubs (the servers and tests aside)."""
    users = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                   if "WeightControlStub(" in p.read_text(encoding="utf-8") and "proto" not in p.parts)
    assert users == ["control_client.py"]
