"""Sticky-key policy and the pure xDS resource builder."""

from __future__ import annotations

import re

from hypothesis import given, strategies as st

from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2

from lockgate.config import KeySource, config_from_text
from lockgate import routing
from lockgate.extproc import keys
from lockgate.routing import CanaryWeight, parse_cluster_name
from lockgate.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, build_resources

CFG_TEXT = """
qa_override: {token: "0123456789abcdef-token"}
sticky_keys: [{header: x-user-id}, {cookie: sid}, {client_ip: {}}]
models:
  - {name: chat, match: {path_prefix: /v1/chat}, stable: v1,
     versions: {v1: {endpoints: ["127.0.0.1:1"]}, v2: {endpoints: ["127.0.0.1:2"]}}}
  - {name: cls, stable: a, sticky_keys: [{header: x-s}],
     versions: {a: {endpoints: ["127.0.0.1:3"]}, b: {endpoints: ["127.0.0.1:4"]}}}
"""
CFG = config_from_text(CFG_TEXT)

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", min_size=1, max_size=20)


@given(before=st.lists(st.tuples(token, token), max_size=3), value=token,
       after=st.lists(st.tuples(token, token), max_size=3))
def test_cookie_regex_extracts_the_named_cookie(before, value, after):
    before = [(n, v) for n, v in before if n != "sid"]
    after = [(n, v) for n, v in after if n != "sid"]
    header = "; ".join(f"{n}={v}" for n, v in before + [("sid", value)] + after)
    m = re.fullmatch(routing.cookie_value_regex("sid"), header)
    assert m and m.group(1) == value
    assert routing.extract_key((KeySource("cookie", "sid"),), {"cookie": header}) == ("cookie sid", value)


@given(st.lists(st.from_regex(r"\A[0-9]{1,3}(\.[0-9]{1,3}){3}\Z"), min_size=1, max_size=4), st.integers(0, 2))
def test_xff_regex_takes_the_trusted_entry(addresses, hops):
    xff = ", ".join(addresses)
    m = re.fullmatch(routing.xff_client_regex(hops), xff)
    if hops < len(addresses):
        assert m and m.group(1) == addresses[-1 - hops]
        assert routing.extract_key((KeySource("client_ip", trusted_hops=hops),), {"x-forwarded-for": xff})[1] == \
            addresses[-1 - hops]


def test_extract_key_order():
    src = (KeySource("header", "x-user-id"), KeySource("cookie", "sid"), KeySource("client_ip"))
    assert routing.extract_key(src, {"x-user-id": "u1", "cookie": "sid=s", "x-forwarded-for": "1.2.3.4"}) == \
        ("header x-user-id", "u1")
    assert routing.extract_key(src, {"cookie": "a=b; sid=s", "x-forwarded-for": "1.2.3.4"}) == ("cookie sid", "s")
    assert routing.extract_key(src, {"cookie": "a=b", "x-forwarded-for": "1.2.3.4"}) == ("client_ip", "1.2.3.4")
    assert routing.extract_key(src[:1], {}) is None


def test_hash_key_is_keyed_and_stable():
    a = keys.hash_key("alice", b"secret-1")
    assert a == keys.hash_key("alice", b"secret-1") and len(a) == 16
    assert a != keys.hash_key("alice", b"secret-2") and "alice" not in a


def routes(weights):
    rc = build_resources(CFG, weights)[ROUTE_TYPE]["lockgate"]
    return {r.name.partition("?")[0]: r for r in rc.virtual_hosts[0].routes}, rc


def test_canary_first_total_fixed_and_salted_per_canary():
    rs, rc = routes({"chat": CanaryWeight("v2", 1234)})
    split = rs["chat/key/0"].route.weighted_clusters
    assert [(c.name, c.weight.value) for c in split.clusters] == [("chat.v2", 1234), ("chat.v1", routing.TOTAL_WEIGHT_BP - 1234)]
    assert split.use_hash_policy.value
    hp = rs["chat/key/0"].route.hash_policy[0]
    assert hp.header.header_name == "x-user-id" and hp.terminal
    assert hp.header.regex_rewrite.substitution.startswith("lockgate:chat:v2|")
    # key routes in the configured order, then the model without a canary routes to stable only
    assert [n for n in rs if n.startswith("chat/key")] == ["chat/key/0", "chat/key/1", "chat/key/2"]
    assert rs["chat/key/1"].match.headers[0].name == "cookie"
    assert rs["chat/key/2"].route.hash_policy[0].header.header_name == "x-forwarded-for"
    assert [(c.name, c.weight.value) for c in rs["cls/key/0"].route.weighted_clusters.clusters] == [("cls.a", 10000)]
    assert "cls/key/none" in rs  # no client_ip source: a keyless request is still routed by weight
    # QA: the version routes match metadata only the ext_proc's token check sets (never the token);
    # a request with both QA headers takes qa/*, which sends its request headers to the ext_proc
    qa = rs["chat/qa/v2"]
    assert not qa.match.headers and qa.route.cluster == "chat.v2"
    (md,) = qa.match.dynamic_metadata
    assert (md.filter, [s.key for s in md.path], md.value.string_match.exact) == ("lockgate.qa", ["version"], "v2")
    check = rs["chat/qa/*"]
    assert {h.name: h.present_match for h in check.match.headers} == {"x-lockgate-qa-token": True,
                                                                       "x-lockgate-version": True}
    assert check.direct_response.status == 503
    per_route = ext_proc_pb2.ExtProcPerRoute()
    check.typed_per_filter_config["lockgate.qa_check"].Unpack(per_route)  # enables the QA check filter
    assert per_route.overrides.processing_mode.request_header_mode == processing_mode_pb2.ProcessingMode.SEND
    assert per_route.overrides.processing_mode.response_header_mode == processing_mode_pb2.ProcessingMode.SKIP
    assert list(rs).index("chat/qa/*") < list(rs).index("chat/key/0")
    assert set(rc.virtual_hosts[0].request_headers_to_remove) == {"x-lockgate-qa-token", "x-lockgate-version",
                                                                 "x-lockgate-replay"}
    # the token is nowhere in what Envoy receives (its /config_dump shows all of it)
    for resources in build_resources(CFG, {"chat": CanaryWeight("v2", 1234)}).values():
        for msg in resources.values():
            assert b"0123456789abcdef-token" not in msg.SerializeToString()
            assert "0123456789abcdef-token" not in str(msg)


def test_weight_change_touches_routes_only():
    a = build_resources(CFG, {"chat": CanaryWeight("v2", 100)})
    b = build_resources(CFG, {"chat": CanaryWeight("v2", 500)})
    for t in (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE):
        assert a[t] == b[t]
    assert a[ROUTE_TYPE] != b[ROUTE_TYPE]
    assert sorted(a[CLUSTER_TYPE]) == ["chat.v1", "chat.v2", "cls.a", "cls.b"]


def test_route_names_carry_the_split():
    from lockgate.routing import parse_route_name

    rc = build_resources(CFG, {"chat": CanaryWeight("v2", 1234, "stage-2")})[ROUTE_TYPE]["lockgate"]
    infos = {r.name: parse_route_name(r.name) for r in rc.virtual_hosts[0].routes}
    sticky = [i for i in infos.values() if i.model == "chat" and i.path == "sticky"]
    assert sticky and all((i.canary, i.weight_bp, i.stage) == ("v2", 1234, "stage-2") for i in sticky)
    assert infos["chat/qa/v1"].path == "qa"
    assert parse_route_name("somebody-elses-route") is None


def test_parse_cluster_name():
    assert parse_cluster_name("chat.v2") == ("chat", "v2")
    assert parse_cluster_name("lockgate_extproc") is None


def test_request_time_parsing_matches_protobuf_for_envoy_and_other_layouts():
    from google.protobuf import struct_pb2, timestamp_pb2

    from lockgate.extproc.capture import _epoch

    for text in ("2026-11-27T13:08:42.827874+00:00", "2026-11-27T13:08:42+00:00", "2026-11-27T11:02:03.5Z",
                 "2026-11-27T11:02:03.25+01:00", "1999-12-31T23:59:59.999999+00:00"):
        ts = timestamp_pb2.Timestamp()
        ts.FromJsonString(text)
        assert abs(_epoch(struct_pb2.Value(string_value=text)) - (ts.seconds + ts.nanos / 1e9)) < 1e-6, text
    assert _epoch(struct_pb2.Value(string_value="not a time")) is None
    assert _epoch(struct_pb2.Value(number_value=12.5)) == 12.5
    assert _epoch(None) is None


def _filters(cfg):
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    listener = build_resources(cfg, {})["type.googleapis.com/envoy.config.listener.v3.Listener"]["lockgate"]
    manager = hcm.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    out = {}
    for f in manager.http_filters:
        if f.typed_config.type_url.endswith("ExternalProcessor"):
            ep = ext_proc_pb2.ExternalProcessor()
            f.typed_config.Unpack(ep)
            out[f.name] = (ep, f.disabled)
    return out


def test_capture_modes_and_the_qa_check_filter():
    mode = processing_mode_pb2.ProcessingMode
    inline = _filters(CFG)
    (cap, off), (qa, qa_off) = inline["envoy.filters.http.ext_proc"], inline["lockgate.qa_check"]
    assert not off and not cap.observability_mode and cap.failure_mode_allow
    assert (cap.processing_mode.request_header_mode, cap.processing_mode.response_body_mode) == (mode.SKIP, mode.STREAMED)
    # the QA check: off unless a qa/* route enables it, always waited for, request headers only, own stats
    assert qa_off and not qa.observability_mode and qa.failure_mode_allow and qa.stat_prefix == "lockgate_qa"
    assert qa.processing_mode.request_header_mode == mode.SEND
    assert qa.processing_mode.response_header_mode == mode.SKIP
    assert list(qa.metadata_options.receiving_namespaces.untyped) == ["lockgate.qa"]
    obs_cfg = config_from_text(CFG_TEXT + "capture: {mode: observability, deferred_close_ms: 2500}\n")
    observe = _filters(obs_cfg)
    (cap, _), (qa, _) = observe["envoy.filters.http.ext_proc"], observe["lockgate.qa_check"]
    assert cap.observability_mode and cap.deferred_close_timeout.ToMilliseconds() == 2500
    assert cap.stat_prefix == "lockgate" and cap.processing_mode.response_body_mode == mode.STREAMED
    assert not qa.observability_mode
