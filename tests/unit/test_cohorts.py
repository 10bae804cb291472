"""Cohorts: the spec field (file/line errors), the routing contract (names, cookie regex) and the xDS routes
(order, the cohort header set on cohort routes and removed on every other one, gone after a rollback),
the weight store (persisted with the weight, older stores migrated), the ext_proc's labelling."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from lockgate import routing
from lockgate.config import config_from_text
from lockgate.controller.decide.spec import ConfigError, spec_from_text
from lockgate.extproc.capture import attribute
from lockgate.routing import COHORT_HEADER, CanaryWeight, Cohort
from lockgate.xds.resources import ROUTE_TYPE, build_resources
from lockgate.xds.store import WeightStore
from tests.pg import pg_server, pg_url, where  # noqa: F401  (fixtures)

CFG = config_from_text("""
qa_override: {token: "0123456789abcdef-token"}
sticky_keys: [{header: x-user-id}, {cookie: sid}]
models:
  - {name: chat, match: {path_prefix: /v1/chat}, stable: v1,
     versions: {v1: {endpoints: ["127.0.0.1:1"]}, v2: {endpoints: ["127.0.0.1:2"]}}}
""")
BETA = Cohort("beta", "header", "x-beta-tester", "true")
STAFF = Cohort("staff", "cookie", "internal", "1")

BASE = """rollout:
  model: chat
  canary: v2
  steps: [{weight_percent: 1}, {weight_percent: 5}, {weight_percent: 20}]
  metrics: [{name: error_rate, allowed: {absolute: 0.01}}]
"""


def problems(text: str, config=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        spec_from_text(text, "r.yaml", config)
    return str(e.value).splitlines()


# ----------------------------------------------------------------------------- spec


def test_spec_cohorts_standing_and_step_rules():
    spec = spec_from_text(BASE + """  cohorts:
    - {name: beta, header: {name: x-beta-tester, value: "true"}}
    - {name: staff, cookie: {name: internal, value: "1"}, from_step: 2}
""", "r.yaml")
    assert spec.cohorts_at(0) == (BETA,)
    assert spec.cohorts_at(1) == spec.cohorts_at(2) == (BETA, STAFF)
    assert spec.cohorts_at(3) == ()  # the promotion: everyone has the canary
    assert spec.cohort_detail(1) == {"cohorts": ["beta (header x-beta-tester=true)", "staff (cookie internal=1)"]}
    assert spec.cohort_detail(3) == {}
    assert spec.summary().endswith("1 metric (1 gating), cohorts: beta (header x-beta-tester=true), every stage, "
                                   "staff (cookie internal=1), from stage-2")
    # the hash covers the cohorts; a spec without them keeps the hash it had before cohorts existed
    plain = spec_from_text(BASE, "r.yaml")
    assert "cohorts" not in plain.canonical() and plain.sha256 != spec.sha256


def test_spec_cohort_errors_name_file_line_and_field():
    lines = problems(BASE + """  cohorts:
    - {name: beta, header: {name: X-Beta, value: "true"}}
    - {name: beta, header: {name: x-lockgate-cohort, value: a}}
    - {name: c, cookie: {name: a, value: "1"}, header: {name: b, value: "1"}}
    - {name: d, from_step: 4, cookie: {name: a, value: "1"}}
    - {name: e}
    - {name: Bad, header: {name: cookie, value: " x"}}
    - {name: f, header: {name: x-a, value: "1"}, colour: red}
    - {name: g, cookie: {name: "a;b", value: "1"}}
    - {name: h, header: {name: x-beta-tester, value: "true"}}
    - {name: h, header: {name: x-beta-tester, value: "true"}}
""")
    expect = [
        "r.yaml:7:35: rollout.cohorts[0].header.name: must be a lower-case HTTP header name",
        "r.yaml:8:35: rollout.cohorts[1].header.name: 'x-lockgate-cohort': headers starting with x-lockgate- are",
        "r.yaml:9:7: rollout.cohorts[2]: one of header or cookie, not both",
        "r.yaml:10:28: rollout.cohorts[3].from_step: must be between 1 and 3, got 4",
        "r.yaml:11:7: rollout.cohorts[4]: needs header: {name: ..., value: ...} or cookie:",
        "r.yaml:12:14: rollout.cohorts[5].name: must match",
        "r.yaml:12:34: rollout.cohorts[5].header.name: to match a cookie write cookie:",
        "r.yaml:12:49: rollout.cohorts[5].header.value: ' x': no control characters, no leading or trailing space",
        "r.yaml:13:58: rollout.cohorts[6].colour: unknown field (known: cookie, from_step, header, name)",
        "r.yaml:14:32: rollout.cohorts[7].cookie.name: must be a cookie name",
        "r.yaml:16:14: rollout.cohorts[9].name: duplicate cohort 'h' (also cohorts[8])",
    ]
    for e in expect:
        assert any(line.startswith(e) for line in lines), f"missing: {e}\n--- got:\n" + "\n".join(lines)
    assert len(lines) == len(expect), lines


def test_spec_same_match_twice_and_qa_header_refused():
    lines = problems(BASE + """  cohorts:
    - {name: a, header: {name: x-beta-tester, value: "true"}}
    - {name: b, header: {name: x-beta-tester, value: "true"}}
""")
    assert lines == ["r.yaml:8:25: rollout.cohorts[1].header: the same header and value as cohorts[0]"]
    cfg = config_from_text("""
qa_override: {token: "0123456789abcdef-token", token_header: x-qa-token, version_header: x-qa-version}
models:
  - {name: chat, stable: v1, versions: {v1: {endpoints: ["127.0.0.1:1"]}, v2: {endpoints: ["127.0.0.1:2"]}}}
""")
    lines = problems(BASE + "  cohorts: [{name: a, header: {name: x-qa-token, value: '1'}}]\n", cfg)
    assert len(lines) == 1 and "rollout.cohorts[0].header.name: 'x-qa-token' is a qa_override header" in lines[0]


# ----------------------------------------------------------------------------- routing contract


def test_route_names_round_trip():
    w = CanaryWeight("v2", 1, "#3:stage-1", (BETA,))
    info = routing.parse_route_name(routing.cohort_route_name("chat", "beta", w))
    assert (info.path, info.cohort, info.canary, info.weight_bp, info.stage) == ("cohort", "beta", "v2", 1, "#3:stage-1")
    sticky = routing.parse_route_name(routing.sticky_route_name("chat", 0, w))
    assert (sticky.path, sticky.cohort) == ("sticky", "")


def test_cohort_values_checked():
    with pytest.raises(ValueError, match="reserved"):
        Cohort("a", "header", "x-lockgate-version", "1")
    with pytest.raises(ValueError, match="unique"):
        CanaryWeight("v2", 0, "", (BETA, Cohort("beta", "cookie", "x", "1")))
    with pytest.raises(ValueError, match="need a canary"):
        CanaryWeight(None, 0, "", (BETA,))


token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", min_size=1, max_size=12)


@given(before=st.lists(st.tuples(token, token), max_size=3), value=token, other=token,
       after=st.lists(st.tuples(token, token), max_size=3))
def test_cookie_match_regex_exact_value_anywhere(before, value, other, after):
    before = [(n, v) for n, v in before if n != "internal"]
    after = [(n, v) for n, v in after if n != "internal"]
    regex = routing.cookie_match_regex("internal", value)
    header = "; ".join(f"{n}={v}" for n, v in before + [("internal", value)] + after)
    assert re.fullmatch(regex, header)
    if other != value:
        header = "; ".join(f"{n}={v}" for n, v in before + [("internal", other)] + after)
        assert not re.fullmatch(regex, header)
    assert not re.fullmatch(regex, "; ".join(f"{n}={v}" for n, v in before + after) or "x=1")


# ----------------------------------------------------------------------------- xDS routes


def routes(weight: CanaryWeight):
    return list(build_resources(CFG, {"chat": weight})[ROUTE_TYPE]["lockgate"].virtual_hosts[0].routes)


def test_cohort_routes_after_qa_before_the_split_set_and_strip_the_header():
    rs = routes(CanaryWeight("v2", 1, "s", (BETA, STAFF)))
    names = [r.name.partition("?")[0] for r in rs]
    assert names == ["chat/qa/v1", "chat/qa/v2", "chat/qa/*", "chat/cohort/beta", "chat/cohort/staff",
                     "chat/key/0", "chat/key/1", "chat/key/none"]
    beta, staff = rs[3], rs[4]
    assert beta.route.cluster == staff.route.cluster == "chat.v2"  # the canary whatever the weight
    assert not beta.route.request_mirror_policies  # a cohort is not a sample of the traffic
    assert [(h.name, h.string_match.exact) for h in beta.match.headers] == [("x-beta-tester", "true")]
    assert staff.match.headers[0].name == "cookie"
    assert re.fullmatch(staff.match.headers[0].string_match.safe_regex.regex, "a=b; internal=1")
    assert [(h.header.key, h.header.value) for h in beta.request_headers_to_add] == [(COHORT_HEADER, "beta")]
    assert beta.request_headers_to_add[0].append_action == beta.request_headers_to_add[0].OVERWRITE_IF_EXISTS_OR_ADD
    for r in rs:  # every other route that reaches a model removes a client-sent cohort header
        if r.HasField("route") and "/cohort/" not in r.name:
            assert COHORT_HEADER in r.request_headers_to_remove, r.name
    assert routing.parse_route_name(beta.name).cohort == "beta"


def test_no_cohort_routes_without_a_canary_or_after_a_rollback():
    assert not [r for r in routes(CanaryWeight("v2", 0, "s")) if "/cohort/" in r.name]  # rollback: no cohorts
    assert not [r for r in routes(CanaryWeight("v1", 0, "s", (BETA,))) if "/cohort/" in r.name]  # stable
    # a weight of 0 with cohorts: only the cohort goes to the canary
    rs = routes(CanaryWeight("v2", 0, "s", (BETA,)))
    assert [r.name.partition("?")[0] for r in rs if "/cohort/" in r.name] == ["chat/cohort/beta"]


# ----------------------------------------------------------------------------- weight store


def test_weight_store_keeps_cohorts_and_migrates_an_older_store(where):
    """On SQLite and PostgreSQL: a store written before cohorts gains the column, keeps its weight."""
    from lockgate.database import open_store, write_transaction

    path = where("lockgate.db")
    db = open_store(path, "CREATE TABLE IF NOT EXISTS weights (model TEXT PRIMARY KEY, canary TEXT, "
                          "weight_bp INTEGER NOT NULL, stage TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL);",
                    read_only=False, what="an older weight store")
    with write_transaction(db):
        db.execute("INSERT INTO weights(model, canary, weight_bp, stage, updated_at) VALUES ('chat', 'v2', 100, 's', 1.0)")
    db.close()
    store = WeightStore(path)
    assert store.load() == {"chat": CanaryWeight("v2", 100, "s")}
    store.save("chat", CanaryWeight("v2", 1, "t", (BETA, STAFF)), "test", "cohorts")
    store.close()
    store = WeightStore(path)
    assert store.load()["chat"].cohorts == (BETA, STAFF)
    store.save("chat", CanaryWeight("v2", 0, "t"), "test", "rollback")
    assert store.load()["chat"].cohorts == ()
    store.close()


# ----------------------------------------------------------------------------- ext_proc labelling


def test_cohort_requests_are_labelled_and_neither_arm():
    models = {m.name: m for m in CFG.models}
    w = CanaryWeight("v2", 1, "#1:stage-1", (BETA,))
    who = attribute(models, "chat.v2", routing.cohort_route_name("chat", "beta", w))
    assert (who.role, who.route, who.cohort, who.weight_bp, who.stage) == ("other", "cohort", "beta", 1, "#1:stage-1")
    who = attribute(models, "chat.v2", routing.sticky_route_name("chat", 0, w))
    assert (who.role, who.route, who.cohort) == ("canary", "sticky", "")


# ----------------------------------------------------------------------------- shown apart


def test_cohort_stats_read_each_cohort_apart_and_the_gates_columns_never_see_them(tmp_path):
    from lockgate.controller.decide.evidence import cohort_stats, rollout_columns
    from lockgate.controller.decide.rollouts import Rollout
    from lockgate.controller.ingest.observations import ObservationStore
    from lockgate.controller.tell.report import cohort_table
    from lockgate.proto.v1 import observations_pb2 as obs_pb2

    spec = spec_from_text(BASE + """  cohorts:
    - {name: beta, header: {name: x-beta-tester, value: "true"}}
    - {name: staff, cookie: {name: internal, value: "1"}, from_step: 2}
""", "r.yaml")
    rows = []
    for i in range(200):  # the random split: half each arm
        rows.append(obs_pb2.Observation(request_id=f"s{i}", ts=100.0 + i, model="chat", version="v2" if i % 2 else "v1",
                                        role="canary" if i % 2 else "baseline", weight_bp=100, route="sticky",
                                        status_code=200, duration_ms=10.0))
    for i in range(40):  # beta: 10 errors, slow
        rows.append(obs_pb2.Observation(request_id=f"b{i}", ts=100.5 + i, model="chat", version="v2", role="other",
                                        weight_bp=100, route="cohort", cohort="beta",
                                        status_code=500 if i < 10 else 200, duration_ms=100.0 + i))
    store = ObservationStore(tmp_path / "obs.db")
    store.insert(rows)
    r = Rollout(id=1, model="chat", canary="v2", baseline="v1", spec_text="", spec_source="r.yaml", spec_hash="h",
                status="running", stage=0, started_at=50.0, stage_started_at=50.0, ended_at=None, created_by="t",
                auto={}, last_eval=None, last_eval_at=None)
    beta, staff = cohort_stats(store, r, spec)
    assert (beta["name"], beta["requests"], beta["canary"], beta["errors"], beta["active"]) == ("beta", 40, 40, 10, True)
    assert beta["error_rate"] == pytest.approx(0.25)
    assert beta["p95_ms"] == pytest.approx(100.0 + 39 * 0.95, abs=0.5)
    assert (staff["requests"], staff["error_rate"], staff["p95_ms"], staff["active"]) == (0, None, None, False)
    # what the gates read: the two arms, 100 canary rows, none of the cohort's
    data = rollout_columns(store, CFG, r)
    role = list(data["role"])
    assert role.count("canary") == 100 and role.count("baseline") == 100 and set(role) <= {"canary", "baseline", "other"}
    canary = [i for i, x in enumerate(role) if x == "canary"]
    assert all(data["request_id"][i].startswith("s") for i in canary)
    html = cohort_table([beta, staff])
    assert "<td>beta</td><td>header x-beta-tester=true</td><td>1</td><td>40</td><td>40</td><td>10</td><td>25.00%</td>" in html
    store.close()
