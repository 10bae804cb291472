"""Rollout state on the controller's /metrics (lockgate/controller/decide/rollout_series.py), from real
decisions: a real Promoter and RolloutActions on a real rollout store and observation store, moving
weights through a real in-process WeightService (the xDS server's control logic) to an Envoy-like ADS
stream that ACKs (the ADS protocol code in process, as tests/unit/test_revert.py drives it),
scraped in the Prometheus text format and parsed back with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lockgate.config import config_from_text
from lockgate.controller.decide.actions import RolloutActions
from lockgate.controller.decide.promoter import Promoter
from lockgate.controller.decide.rollout_series import SERIES, STATUSES, RolloutSeries
from lockgate.controller.decide.rollouts import RolloutStore
from lockgate.controller.ingest.observations import ObservationStore
from lockgate.proto.v1 import observations_pb2 as pb
from lockgate.xds.ads import AdsServer
from lockgate.xds.control import WeightService
from lockgate.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from lockgate.xds.store import WeightStore
from tests.unit.test_ads_protocol import req

SPEC = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 1
  steps:
    - {weight_percent: 10, min_duration: 0s, min_canary_samples: 0}
    - {weight_percent: 40, min_duration: 1h, min_canary_samples: 0}
  promotion: {max_duration: 24h, preflight: none}
  metrics:
    - {name: error_rate, allowed: {absolute: 0.05}}
    - {name: latency_p95, allowed: {relative: 0.2}, gating: false}
"""


class Pusher:
    """The WeightPusher port over a real WeightService (what the gRPC control API calls on the xDS side)."""

    def __init__(self, svc: WeightService):
        self.svc = svc

    async def get_weights(self, model: str = "", deadline_s: float = 5.0):
        from lockgate.proto.v1 import control_pb2
        return control_pb2.GetWeightsResponse(models=[self.svc.model_state(model)])

    async def set_weight(self, model, version, weight_bp, *, actor, reason, stage="", timeout_s=5.0, deadline_s=10.0,
                         wait_for_ready=True):
        return await self.svc.set_weight(model, version, weight_bp, actor=actor, reason=reason, timeout_s=timeout_s,
                                         stage=stage)

    async def rollback(self, model, *, actor, reason, timeout_s=5.0, deadline_s=10.0, wait_for_ready=True):
        return await self.svc.rollback(model, actor=actor, reason=reason, timeout_s=timeout_s)

    async def drill(self, model, *, actor, timeout_s=5.0, deadline_s=10.0, wait_for_ready=True):
        return await self.svc.drill(model, actor=actor, timeout_s=timeout_s)


CLUSTERS = ["chat.v1", "chat.v2", "other.v1"]


async def envoy(ads: AdsServer, svc: WeightService, stop: asyncio.Event, streams: list | None = None) -> None:
    """An Envoy-like ADS stream (the real ADS protocol code, in process) that ACKs every update."""
    s = svc.registry.open("e0")
    if streams is not None:
        streams.append(s)
    names = {ENDPOINT_TYPE: CLUSTERS, ROUTE_TYPE: ["lockgate"]}
    todo = []
    for r in (req(CLUSTER_TYPE, node="e0"), req(LISTENER_TYPE), req(ENDPOINT_TYPE, names=CLUSTERS),
              req(ROUTE_TYPE, names=["lockgate"])):
        todo += await ads._on_request(s, r)
    while not stop.is_set():
        todo += ads._pending_sends(s)
        while todo:
            r = todo.pop(0)  # ACK it, as Envoy does once it applied it (answers may bring more updates)
            todo += await ads._on_request(s, req(r.type_url, r.version_info, r.nonce, names.get(r.type_url, ())))
        await asyncio.sleep(0.005)


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """Every sample of the registry's text exposition: (name, sorted labels) → value."""
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def observations(since: float, now: float, n: int, canary_error: float, seed: int) -> list:
    """``n`` requests between ``since`` and ``now``, half to each arm, from 400 users."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        canary = i % 2 == 1
        err = rng.uniform() < (canary_error if canary else 0.01)
        out.append(pb.Observation(request_id=f"s{seed}-{i}", ts=since + (now - since) * i / n, model="chat",
                                  version="v2" if canary else "v1", role="canary" if canary else "baseline",
                                  weight_bp=1000, status_code=503 if err else 200, user_key=f"u{i % 400}",
                                  duration_ms=float(rng.lognormal(4, 0.3))))
    return out


def test_series_follow_the_decisions(tmp_path):
    cfg = config_from_text(f"""
state_dir: {tmp_path}
control: {{port: 1}}
models:
  - {{name: chat, match: {{path_prefix: /chat}}, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:11"]}}, v2: {{endpoints: ["127.0.0.1:12"]}}}}}}
  - {{name: other, match: {{path_prefix: /other}}, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:13"]}}}}}}
""")
    registry = CollectorRegistry()

    async def main():
        store = ObservationStore(tmp_path / "obs.db")
        rollouts = RolloutStore(tmp_path / "rollouts.db")
        svc = WeightService(cfg, WeightStore(cfg.db_path))
        pusher = Pusher(svc)
        stop = asyncio.Event()
        acks = asyncio.ensure_future(envoy(AdsServer(svc.cache, svc.registry), svc, stop))
        series = RolloutSeries(registry, [m.name for m in cfg.models])
        promoter = Promoter(cfg, rollouts, pusher, store, series=series)
        actions = RolloutActions(cfg, rollouts, promoter, store)
        seen = []
        try:
            # before any rollout: the counters are there, at 0, for every model; no state series
            s = scrape(registry)
            seen.append(s)
            for model in ("chat", "other"):
                assert value(s, "lockgate_rollbacks_total", model=model, reason="harm") == 0
                assert value(s, "lockgate_rollbacks_total", model=model, reason="abort") == 0
                assert value(s, "lockgate_promotions_total", model=model, by="evidence") == 0
                assert value(s, "lockgate_promotions_total", model=model, by="manual") == 0
            assert not [k for k in s if k[0].startswith("lockgate_rollout_") or k[0].startswith("lockgate_gate_")]

            # 1. start: running at stage 0, 10 %
            out = await actions.start(SPEC, "chat-v2.yaml", "alice")
            rid = out["rollout"]["id"]
            assert out["start"]["push"]["all_acked"], out["start"]
            s = scrape(registry)
            seen.append(s)
            assert value(s, "lockgate_rollout_info", model="chat", rollout=str(rid), canary="v2", baseline="v1") == 1
            assert value(s, "lockgate_rollout_status", model="chat", status="running") == 1
            assert sum(value(s, "lockgate_rollout_status", model="chat", status=st) for st in STATUSES) == 1
            assert value(s, "lockgate_rollout_stage_index", model="chat") == 0
            assert value(s, "lockgate_rollout_stages", model="chat") == 2
            assert value(s, "lockgate_rollout_canary_weight_ratio", model="chat") == 0.1
            assert value(s, "lockgate_rollout_info", model="other", rollout=str(rid), canary="v2",
                         baseline="v1") is None

            # 2. a look with healthy traffic: the stage's minimums are met → advance to 40 %
            await asyncio.sleep(0.2)
            now = time.time()
            store.insert(observations(rollouts.get(rid).started_at, now, 1200, 0.01, 1), received_ts=now)
            decision = await promoter.evaluate_and_act(rollouts.get(rid))
            assert decision.action == "advance", decision
            s = scrape(registry)
            seen.append(s)
            assert value(s, "lockgate_rollout_stage_index", model="chat") == 1
            assert value(s, "lockgate_rollout_canary_weight_ratio", model="chat") == 0.4
            assert value(s, "lockgate_rollout_last_evaluation_timestamp_seconds", model="chat") >= now
            ev = {v["metric"]: v for v in rollouts.get(rid).last_eval["verdicts"]}
            for metric, gating in (("error_rate", "true"), ("latency_p95", "false")):
                code = {"pass": 1, "not-yet": 0, "fail": -1}[ev[metric]["verdict"]]
                assert value(s, "lockgate_gate_verdict", model="chat", metric=metric, gating=gating) == code
                for arm in ("baseline", "canary"):
                    assert value(s, "lockgate_gate_value", model="chat", metric=metric, arm=arm) == \
                        np.float64(ev[metric][arm]), (metric, arm)
                    assert value(s, "lockgate_gate_samples", model="chat", metric=metric, arm=arm) == \
                        ev[metric]["n_" + arm] > 0
                assert value(s, "lockgate_gate_allowed", model="chat", metric=metric) == ev[metric]["allowed"]
            assert value(s, "lockgate_gate_allowed", model="chat", metric="error_rate") == 0.05

            # 3. the canary breaks (60 % errors): harm shown → rollback, counted once the revert is complete
            since, now = now, time.time()
            store.insert(observations(since, now, 3000, 0.6, 2), received_ts=now)
            decision = await promoter.evaluate_and_act(rollouts.get(rid))
            assert decision.action == "rollback", decision
            s = scrape(registry)
            seen.append(s)
            assert value(s, "lockgate_rollout_status", model="chat", status="rolled_back") == 1
            assert value(s, "lockgate_rollout_status", model="chat", status="running") == 0
            assert value(s, "lockgate_rollout_canary_weight_ratio", model="chat") == 0
            assert value(s, "lockgate_gate_verdict", model="chat", metric="error_rate", gating="true") == -1
            assert value(s, "lockgate_gate_value", model="chat", metric="error_rate", arm="canary") > \
                value(s, "lockgate_gate_value", model="chat", metric="error_rate", arm="baseline") + 0.05
            assert value(s, "lockgate_rollbacks_total", model="chat", reason="harm") == 1
            assert value(s, "lockgate_rollbacks_total", model="chat", reason="abort") == 0

            # 4. a second rollout, aborted by a person; a third, promoted by hand
            out = await actions.start(SPEC, "chat-v2.yaml", "alice")
            rid2 = out["rollout"]["id"]
            s = scrape(registry)
            assert value(s, "lockgate_rollout_info", model="chat", rollout=str(rid2), canary="v2", baseline="v1") == 1
            assert value(s, "lockgate_rollout_info", model="chat", rollout=str(rid), canary="v2", baseline="v1") is None
            # the new rollout has not been judged yet: the last one's gates are gone
            assert not [k for k in s if k[0] == "lockgate_gate_verdict"]
            assert (await actions.action("chat", "abort", "bob"))["complete"]
            s = scrape(registry)
            seen.append(s)
            assert value(s, "lockgate_rollout_status", model="chat", status="aborted") == 1
            assert value(s, "lockgate_rollbacks_total", model="chat", reason="abort") == 1
            assert value(s, "lockgate_rollbacks_total", model="chat", reason="harm") == 1
            await actions.start(SPEC, "chat-v2.yaml", "alice")
            await actions.action("chat", "promote", "carol")
            s = scrape(registry)
            seen.append(s)
            assert value(s, "lockgate_rollout_status", model="chat", status="promoted") == 1
            assert value(s, "lockgate_rollout_canary_weight_ratio", model="chat") == 1
            assert value(s, "lockgate_rollout_stage_index", model="chat") == 2
            assert value(s, "lockgate_promotions_total", model="chat", by="manual") == 1
            assert value(s, "lockgate_promotions_total", model="chat", by="evidence") == 0
            assert value(s, "lockgate_rollbacks_total", model="other", reason="harm") == 0
        finally:
            stop.set()
            await acks
            store.close()
            rollouts.close()
        return seen

    seen = asyncio.run(main())
    # every exported name is declared in SERIES, with the declared labels; no label carries a user
    declared = {name: set(labels) for name, (_, labels) in SERIES.items()}
    names = set()
    for s in seen:
        for name, labels in s:
            if name.startswith(("lockgate_rollout", "lockgate_gate", "lockgate_rollbacks", "lockgate_promotions")):
                assert name in declared, name
                assert {k for k, _ in labels} == declared[name], (name, labels)
                assert not any(v.startswith("u") and v[1:].isdigit() for _, v in labels), labels
                names.add(name)
    waits = "lockgate_rollout_awaiting_approval_since_timestamp_seconds"  # no approval here: the test below
    assert names == set(declared) - {waits}, set(declared) - names


def test_a_broken_input_never_raises_into_the_promoter():
    registry = CollectorRegistry()
    series = RolloutSeries(registry, ["chat"])
    series.looked(object(), object(), object(), {}, 0.0)  # not a rollout: logged, nothing exported
    series.outcome("promoted", None, {})
    s = scrape(registry)
    assert value(s, "lockgate_promotions_total", model="chat", by="manual") == 0
    assert not [k for k in s if k[0].startswith("lockgate_rollout_")]


def test_an_abort_not_yet_on_every_envoy_shows_rolling_back(tmp_path):
    """The Envoy's stream drops while it holds the canary: the abort is incomplete (rolling_back, retried
    by the loop), and the series say so at once — not counted as a rollback until it is complete."""
    cfg = config_from_text(f"""
state_dir: {tmp_path}
control: {{port: 1}}
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:11"]}}, v2: {{endpoints: ["127.0.0.1:12"]}}}}}}]
""")
    registry = CollectorRegistry()

    async def main():
        store = ObservationStore(tmp_path / "obs.db")
        rollouts = RolloutStore(tmp_path / "rollouts.db")
        svc = WeightService(cfg, WeightStore(cfg.db_path))
        promoter = Promoter(cfg, rollouts, Pusher(svc), store, series=RolloutSeries(registry, ["chat"]))
        actions = RolloutActions(cfg, rollouts, promoter, store)
        stop, streams = asyncio.Event(), []
        acks = asyncio.ensure_future(envoy(AdsServer(svc.cache, svc.registry), svc, stop, streams))
        try:
            out = await actions.start(SPEC, "chat-v2.yaml", "alice")
            assert out["start"]["push"]["all_acked"], out["start"]
            assert value(scrape(registry), "lockgate_rollout_status", model="chat", status="running") == 1
            stop.set()
            await acks
            await svc.registry.close(streams[0])  # the Envoy keeps serving 10 % on its last routes
            done = await actions.action("chat", "abort", "bob")
            assert not done["complete"] and rollouts.get(out["rollout"]["id"]).status == "rolling_back", done
            return scrape(registry)
        finally:
            store.close()
            rollouts.close()

    s = asyncio.run(main())
    assert value(s, "lockgate_rollout_status", model="chat", status="rolling_back") == 1
    assert value(s, "lockgate_rollout_status", model="chat", status="running") == 0
    assert value(s, "lockgate_rollout_canary_weight_ratio", model="chat") == 0
    assert value(s, "lockgate_rollbacks_total", model="chat", reason="abort") == 0


def test_a_stage_waiting_for_an_approval_says_since_when(tmp_path):
    """A step with ``approval: {required: true}``: once its minimums are met the look holds for a person;
    the series carry since when, until ``rollout approve`` lets the rollout advance."""
    cfg = config_from_text(f"""
state_dir: {tmp_path}
control: {{port: 1}}
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:11"]}}, v2: {{endpoints: ["127.0.0.1:12"]}}}}}}]
""")
    spec = SPEC.replace("min_duration: 0s, min_canary_samples: 0}",
                        "min_duration: 0s, min_canary_samples: 0, approval: {required: true}}")
    assert spec != SPEC
    registry = CollectorRegistry()
    name = "lockgate_rollout_awaiting_approval_since_timestamp_seconds"

    async def main():
        store = ObservationStore(tmp_path / "obs.db")
        rollouts = RolloutStore(tmp_path / "rollouts.db")
        svc = WeightService(cfg, WeightStore(cfg.db_path))
        promoter = Promoter(cfg, rollouts, Pusher(svc), store, series=RolloutSeries(registry, ["chat"]))
        actions = RolloutActions(cfg, rollouts, promoter, store)
        stop = asyncio.Event()
        acks = asyncio.ensure_future(envoy(AdsServer(svc.cache, svc.registry), svc, stop))
        try:
            rid = (await actions.start(spec, "chat-v2.yaml", "alice"))["rollout"]["id"]
            assert value(scrape(registry), name, model="chat") is None
            await asyncio.sleep(0.2)
            now = time.time()
            store.insert(observations(rollouts.get(rid).started_at, now, 600, 0.01, 3), received_ts=now)
            decision = await promoter.evaluate_and_act(rollouts.get(rid))
            assert decision.action == "hold", decision
            waiting = scrape(registry)
            await actions.approve("chat", None, "carol", True)
            decision = await promoter.evaluate_and_act(rollouts.get(rid))
            assert decision.action == "advance", decision
            return now, waiting, scrape(registry)
        finally:
            stop.set()
            await acks
            store.close()
            rollouts.close()

    now, waiting, after = asyncio.run(main())
    since = value(waiting, name, model="chat")
    assert since is not None and now - 10 <= since <= time.time(), since
    assert value(waiting, "lockgate_rollout_stage_index", model="chat") == 0
    assert value(after, name, model="chat") is None
    assert value(after, "lockgate_rollout_stage_index", model="chat") == 1
