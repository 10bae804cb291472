"""``capture.mode: observability`` through the real Envoy (Envoy's ``observability_mode``: it sends the
response's messages to the ext_proc and never waits for an answer).

The same contract as inline capture (tests/integration/test_capture.py): byte-identical responses,
every analyzer field, one observation per response, the ``x-lockgate-request-id`` header; plus what the
mode changes: the QA override still works (its token check is a separate, waiting ext_proc filter), and
with the ext_proc dead traffic flows and Envoy counts the streams it could not deliver.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.fixture_upstream import FIXTURES, SSE
from tests.harness import Fleet, Proc, PY, requires_envoy
from tests.integration.test_capture import get

pytestmark = [requires_envoy, pytest.mark.envoy]

QA_TOKEN = "qa-secret-token-0123456789"


@pytest.fixture
def observe_fleet(tmp_path):
    up = Proc([PY, "-m", "tests.fixture_upstream", "--port", "0"], tmp_path / "fixture.log")
    port = int(up.ready_text.split()[1])
    ep = [f"127.0.0.1:{port}"]
    models = [{"name": "fx", "match": {"path_prefix": "/"}, "stable": "v1",
               "versions": {"v1": {"endpoints": ep}, "v2": {"endpoints": ep}}}]
    fleet = Fleet(tmp_path, models, with_controller=True,
                  extra={"capture": {"mode": "observability", "deferred_close_ms": 2000, "max_body_bytes": 65536},
                         "qa_override": {"token": QA_TOKEN}})
    try:
        fleet.start()
        fleet.upstream_port = port
        yield fleet
        fleet.stop()
    finally:
        up.stop()


def envoy_stats(f: Fleet, prefix: str = "lockgate") -> dict[str, int]:
    out = {}
    for line in f.admin(0, f"/stats?filter=ext_proc.{prefix}\\.").splitlines():
        k, _, v = line.partition(": ")
        if v.strip().isdigit():
            out[k.rsplit(".", 1)[1]] = int(v)
    return out


def test_observability_mode_byte_identity_every_field_and_request_id(observe_fleet):
    f = observe_fleet
    lockgate_ids = {}
    for name, (status, _, body) in FIXTURES.items():
        st, headers, got = get(f.ports["listener"], f"/fixture/{name}", {"x-request-id": f"req-{name}",
                                                                         "x-user-id": "alice"})
        assert st == status, name
        assert got == body, f"{name}: body through lockgate differs from the upstream's"  # malformed included
        assert headers.get("x-request-id") == f"req-{name}"
        lockgate_ids[f"req-{name}"] = headers["x-lockgate-request-id"]
    st, _, got = get(f.ports["listener"], "/sse/stream", {"x-request-id": "req-sse"})
    assert got == b"".join(SSE["stream"])
    obs = {o["client_request_id"]: o for o in f.wait_observations(len(FIXTURES) + 1)}
    assert set(obs) == set(lockgate_ids) | {"req-sse"}
    for cid, rid in lockgate_ids.items():
        assert obs[cid]["request_id"] == rid  # keyed by the id Envoy returned to the client
    chat = obs["req-chat"]
    assert (chat["model"], chat["version"], chat["role"], chat["status_code"]) == ("fx", "v1", "baseline", 200)
    assert chat["analyzer"] == "openai" and chat["output_tokens"] == 6 and chat["finish_reason"] == "stop"
    assert chat["response_bytes"] == len(FIXTURES["chat"][2]) and chat["user_key"]
    assert chat["duration_ms"] >= chat["ttfb_ms"] >= 0
    assert obs["req-refusal"]["refusal"] is True
    assert obs["req-malformed"]["parse_error"] and obs["req-error"]["status_code"] == 500
    assert obs["req-sse"]["output_tokens"] == 6
    stats = envoy_stats(f)
    assert stats["stream_msgs_received"] == 0  # nothing answered: Envoy did not wait
    assert stats.get("streams_closed", 0) == 0  # the server ended every stream: none left to deferred close


def test_observability_mode_qa_override_still_checks_the_token(observe_fleet):
    f = observe_fleet
    port = f.ports["listener"]
    st, h, _ = get(port, "/fixture/chat", {"x-request-id": "qa-ok", "x-lockgate-version": "v2",
                                           "x-lockgate-qa-token": QA_TOKEN})
    assert st == 200 and h.get("x-lockgate-request-id")
    st, _, _ = get(port, "/fixture/chat", {"x-request-id": "qa-bad", "x-lockgate-version": "v2",
                                           "x-lockgate-qa-token": "wrong-token-0123456789"})
    assert st == 200
    obs = {o["client_request_id"]: o for o in f.wait_observations(2)}
    assert (obs["qa-ok"]["version"], obs["qa-ok"]["route"]) == ("v2", "qa")
    assert obs["qa-bad"]["version"] == "v1"
    qa = envoy_stats(f, "lockgate_qa")
    assert qa["streams_started"] == 2 and qa["stream_msgs_received"] == 2  # the check waited for its answers


def test_observability_mode_extproc_dead_traffic_flows_and_is_counted(observe_fleet):
    f = observe_fleet
    port = f.ports["listener"]
    before = envoy_stats(f)
    f.procs["extproc"].kill(signal.SIGKILL)
    for i in range(20):
        st, _, body = get(port, "/fixture/chat", {"x-request-id": f"dead-{i}"})
        assert st == 200 and body == FIXTURES["chat"][2]
    # the QA check cannot run: qa/* answers 503 rather than route unchecked
    st, _, _ = get(port, "/fixture/chat", {"x-lockgate-version": "v2", "x-lockgate-qa-token": QA_TOKEN})
    assert st == 503
    # Not silent, but counted mostly elsewhere than in inline mode: observability mode never waits, so
    # nothing times out; the ext_proc cluster counts each stream it could not open (a stream cut as the
    # process died may count as failure_mode_allowed instead; docs/observations.md, "Capture modes").
    after = envoy_stats(f)
    failed = int(f.stat(0, "cluster.lockgate_extproc.upstream_rq_pending_failure_eject") or 0)
    counted = failed + sum(after.get(k, 0) - before.get(k, 0) for k in ("failure_mode_allowed", "streams_failed"))
    assert counted >= 20 + 1, (failed, before, after)  # 20 capture streams + the QA check
    f.start_extproc()
    time.sleep(1.5)
    st, _, _ = get(port, "/fixture/chat", {"x-request-id": "back"})
    assert st == 200
    assert any(o["client_request_id"] == "back" for o in f.wait_observations(1))
