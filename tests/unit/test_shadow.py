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
