"""The shadow stage's data path, without Envoy: the weight that carries a mirror, the shadow cluster and
mirror policy the xDS server renders from it, the attribution of a shadow response, and its persistence.
(Through a real Envoy: tests/integration/test_shadow.py.)"""

from __future__ import annotations

import sqlite3

import pytest

from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo

from lockgate.config import config_from_text
from lockgate.extproc.capture import attribute
from lockgate.routing import (EXTPROC_FILTER, SHADOW_STAGE_HEADER, CanaryWeight, paired_request_id,
                              parse_cluster_name, parse_shadow_cluster_name, request_header_attribute,
                              shadow_cluster_name, shadow_request_id)
from lockgate.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE, SHADOW_MAX_REQUESTS, build_resources
from lockgate.xds.store import WeightStore

CFG = config_from_text("""
sticky_keys: [{header: x-user-id}]
models:
  - {name: chat, match: {path_prefix: /v1/chat}, stable: v1,
     versions: {v1: {endpoints: ["127.0.0.1:1"]}, v2: {endpoints: ["127.0.0.1:2", "127.0.0.1:3"]}}}
""")
SHADOW = CanaryWeight("v2", 0, "shadow", mirror_ppm=100_000)


def test_a_mirror_needs_a_canary_and_a_share_within_a_million():
    with pytest.raises(ValueError, match="needs a canary"):
        CanaryWeight(None, 0, mirror_ppm=1)
    with pytest.raises(ValueError, match="mirror_ppm must be 0..1000000"):
        CanaryWeight("v2", 0, mirror_ppm=1_000_001)
    assert CanaryWeight("v2", 0).mirror_ppm == 0


def test_names_and_ids():
    assert shadow_cluster_name("chat", "v2") == "chat.v2.shadow"
    assert parse_shadow_cluster_name("chat.v2.shadow") == ("chat", "v2")
    assert parse_shadow_cluster_name("chat.v2") is None and parse_shadow_cluster_name("chat.shadow") is None
    assert parse_cluster_name("chat.v2.shadow") == ("chat", "v2.shadow")  # never a configured version (no dots)
    assert paired_request_id(shadow_request_id("abc")) == "abc" and paired_request_id("abc") is None


def test_the_shadow_cluster_and_mirror_exist_only_with_a_mirror():
    res = build_resources(CFG, {"chat": SHADOW})
    cluster = res[CLUSTER_TYPE]["chat.v2.shadow"]
    opts = hpo.HttpProtocolOptions()
    cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(opts)
    assert [f.name for f in opts.http_filters] == [EXTPROC_FILTER, "envoy.filters.http.upstream_codec"]
    capture = ext_proc_pb2.ExternalProcessor()
    opts.http_filters[0].typed_config.Unpack(capture)
    assert capture.failure_mode_allow and request_header_attribute(SHADOW_STAGE_HEADER) in capture.response_attributes
    limits = cluster.circuit_breakers.thresholds[0]
    assert limits.max_requests.value == SHADOW_MAX_REQUESTS and limits.max_retries.value == 0
    # the shadow cluster has the canary's endpoints
    lbs = res[ENDPOINT_TYPE]["chat.v2.shadow"].endpoints[0].lb_endpoints
    assert res[ENDPOINT_TYPE]["chat.v2.shadow"].cluster_name == "chat.v2.shadow"
    assert sorted(e.endpoint.address.socket_address.port_value for e in lbs) == [2, 3]
    routes = res[ROUTE_TYPE]["lockgate"].virtual_hosts[0].routes
    split = [r for r in routes if r.name.startswith("chat/key/")]
    assert split
    for r in split:
        [mirror] = r.route.request_mirror_policies
        assert mirror.cluster == "chat.v2.shadow"
        assert mirror.runtime_fraction.default_value.numerator == 100_000
        assert mirror.runtime_fraction.default_value.denominator == 2  # MILLION
        assert [(m.append.header.key, m.append.header.value) for m in mirror.request_headers_mutations] == \
            [(SHADOW_STAGE_HEADER, "shadow")]
        # the user's split: all to the baseline
        assert [(c.name, c.weight.value) for c in r.route.weighted_clusters.clusters] == [("chat.v2", 0), ("chat.v1", 10000)]
    for weights in ({"chat": CanaryWeight("v2", 0, "shadow")}, {"chat": CanaryWeight("v2", 0)}, {}):
        res = build_resources(CFG, weights)
        assert "chat.v2.shadow" not in res[CLUSTER_TYPE] and "chat.v2.shadow" not in res[ENDPOINT_TYPE]
        assert not any(r.route.request_mirror_policies for r in res[ROUTE_TYPE]["lockgate"].virtual_hosts[0].routes)


def test_a_shadow_response_is_role_shadow_never_canary():
    models = {m.name: m for m in CFG.models}
    who = attribute(models, "chat.v2.shadow", "")
    assert who is not None and (who.version, who.role, who.route) == ("v2", "shadow", "shadow")
    assert attribute(models, "other.v2.shadow", "") is None
    assert attribute(models, "chat.v2", "chat/key/0?canary=v2&w=0&stage=shadow").role == "canary"


def test_the_mirror_is_persisted_and_an_older_store_is_migrated(tmp_path):
    path = tmp_path / "xds.db"
    store = WeightStore(path)
    store.save("chat", SHADOW, "test", "shadow")
    store.close()
    store = WeightStore(path)
    assert store.load()["chat"] == SHADOW
    store.close()
    db = sqlite3.connect(path)  # a store written before the shadow stage: no mirror_ppm column
    db.execute("ALTER TABLE weights DROP COLUMN mirror_ppm")
    db.commit()
    db.close()
    store = WeightStore(path)
    assert store.load()["chat"] == CanaryWeight("v2", 0, "shadow")
    store.close()


# ----- the shadow stage's spec and decision (controller side)

SPEC_HEAD = """rollout:
  model: chat
  canary: v2
  shadow: {shadow}
  metrics:
    - {{name: error_rate, gating: true, allowed: {{relative: 0.5}}}}
    - {{name: output_tokens, gating: false, allowed: {{relative: 0.5}}}}
"""


def shadow_spec(shadow="{mirror_percent: 10, max_rps: 50, min_duration: 1m, min_pairs: 100}"):
    from lockgate.controller.decide.spec import spec_from_text
    return spec_from_text(SPEC_HEAD.format(shadow=shadow), "r.yaml")


def test_the_shadow_block_is_validated_with_file_and_line():
    from lockgate.controller.decide.spec import ConfigError
    spec = shadow_spec()
    assert (spec.shadow.mirror_percent, spec.shadow.max_rps, spec.shadow.min_duration_s, spec.shadow.min_pairs) == \
        (10, 50, 60, 100)
    assert spec.sha256 != shadow_spec("{mirror_percent: 20, max_rps: 50, min_duration: 1m}").sha256
    with pytest.raises(ConfigError) as exc:
        shadow_spec("{mirror_percent: 0, max_rps: -1, min_duration: soon, extra: 1}")
    lines = [p.render(exc.value.source) for p in exc.value.problems]
    assert lines == [
        "r.yaml:4:28: rollout.shadow.mirror_percent: must be greater than 0 and at most 100, got 0",
        "r.yaml:4:40: rollout.shadow.max_rps: must be greater than 0 and at most 1e+06 (mirrored requests/s in all), "
        "got -1",
        "r.yaml:4:58: rollout.shadow.min_duration: must be a duration such as 90s, 10m, 1.5h, 2d or seconds, got 'soon'",
        "r.yaml:4:71: rollout.shadow.extra: unknown field (known: max_rps, min_duration, min_pairs, mirror_percent)"]
    with pytest.raises(ConfigError, match="r.yaml:4:11: rollout.shadow.max_rps: is required"):
        shadow_spec("{mirror_percent: 5}")


def test_the_mirror_share_is_bounded_by_max_rps():
    from lockgate.controller.decide.shadow import mirror_ppm
    assert mirror_ppm(10, 50, None) == 100_000          # traffic unknown: the configured share
    assert mirror_ppm(10, 50, 100.0) == 100_000         # 10 % of 100/s = 10/s <= 50/s
    assert mirror_ppm(10, 50, 2000.0) == 25_000         # 10 % of 2000/s = 200/s > 50/s: 2.5 %
    assert mirror_ppm(100, 1, 1e9) == 1                 # never 0 (a mirror of nothing)


def rows(n, base_err, canary_err, seed=1, unpaired=0):
    """n user requests answered by the baseline, each mirrored to the canary (its answer in a shadow row)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    ids = [f"r{i}" for i in range(n)]
    ts = np.arange(n, dtype=float)
    base_status = np.where(rng.random(n) < base_err, 500, 200)
    shadow_status = np.where(rng.random(n) < canary_err, 500, 200)
    role = ["baseline"] * n + ["shadow"] * (n - unpaired)
    rid = ids + [shadow_request_id(r) for r in ids[unpaired:]]
    return {"ts": np.concatenate([ts, ts[unpaired:] + 0.01]), "request_id": np.asarray(rid, dtype=object),
            "role": np.asarray(role, dtype=object), "version": np.asarray(["v1"] * n + ["v2"] * (n - unpaired), dtype=object),
            "weight": np.zeros(2 * n - unpaired), "user_key": np.asarray(["u"] * (2 * n - unpaired), dtype=object),
            "status_code": np.concatenate([base_status, shadow_status[unpaired:]]).astype(float),
            "timeout": np.zeros(2 * n - unpaired), "error_kind": np.asarray([None] * (2 * n - unpaired), dtype=object),
            "output_tokens": np.full(2 * n - unpaired, 20.0)}


def test_pairs_are_the_shadow_rows_with_their_users_baseline_row():
    from lockgate.controller.decide.shadow import paired_columns
    paired, k = paired_columns(rows(50, 0.0, 0.0, unpaired=10))
    assert k == 40
    assert list(paired["role"]).count("canary") == 40 and list(paired["role"]).count("baseline") == 40
    # one cluster per pair: the user request's id on both rows
    assert list(paired["user_key"][:40]) == list(paired["user_key"][40:]) == [f"r{i}" for i in range(10, 50)]
    assert set(paired["weight"]) == {0.5}


def test_errors_x5_in_shadow_roll_back_and_a_healthy_canary_advances():
    from lockgate.controller.decide.shadow import judge_pairs, shadow_decision
    spec = shadow_spec()
    bad, k = judge_pairs(spec, rows(2000, 0.02, 0.10), now=3000.0)
    action, reasons = shadow_decision(spec, bad, k, started_at=0.0, now=3000.0)
    assert action == "rollback" and "error_rate shown worse" in reasons[0] and "no user saw the canary" in reasons[0]
    good, k = judge_pairs(spec, rows(2000, 0.02, 0.02, seed=2), now=3000.0)
    assert shadow_decision(spec, good, k, 0.0, 3000.0)[0] == "advance"
    assert shadow_decision(spec, good, k, 0.0, 30.0) == ("hold", ("shadow: 30 of 60 s in shadow",))
    few, k = judge_pairs(spec, rows(50, 0.02, 0.02), now=3000.0)
    assert shadow_decision(spec, few, k, 0.0, 3000.0) == ("hold", ("shadow: 50 of 100 paired answers",))
