"""Opt-in response-body retention through the real Envoy: byte-exact samples, byte-identical
responses, the per-model bound, nothing kept when off, and ``lockgate rollout diagnose`` showing them."""

from __future__ import annotations

import base64
import json
import time
import urllib.request

import pytest

from lockgate.config import RetainBodies
from lockgate.controller.decide.rollouts import RolloutStore
from lockgate.controller.ingest.samples import SampleStore, samples_path
from lockgate.extproc.capture import BodySampler
from tests.fixture_upstream import FIXTURES, SSE
from tests.harness import Client, Fleet, Proc, PY, requires_envoy
from tests.integration.test_capture import get

pytestmark = [requires_envoy, pytest.mark.envoy]

MAX_BYTES = 2048


def start(tmp_path, retain: dict | None) -> Fleet:
    ups = [Proc([PY, "-m", "tests.fixture_upstream", "--port", "0"], tmp_path / f"fixture-{v}.log")
           for v in ("v1", "v2")]
    ports = [int(u.ready_text.split()[1]) for u in ups]
    models = [{"name": "fx", "match": {"path_prefix": "/"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{ports[0]}"]},
                            "v2": {"endpoints": [f"127.0.0.1:{ports[1]}"]}}}]
    capture = {"max_body_bytes": 65536}
    if retain is not None:
        capture["retain_bodies"] = retain
    fleet = Fleet(tmp_path, models, with_controller=True, extra={"capture": capture})
    fleet.upstreams = ups
    fleet.canary_port = ports[1]
    fleet.start()
    return fleet


@pytest.fixture
def sampled(tmp_path):
    f = start(tmp_path, {"sample_rate": 1.0, "max_bytes": MAX_BYTES, "max_count": 1000, "roles": ["canary"]})
    yield f
    f.stop()
    for u in f.upstreams:
        u.stop()


def samples(fleet) -> SampleStore:
    return SampleStore(samples_path(fleet.tmp / "state"), read_only=True)


def wait_samples(fleet, n: int, timeout: float = 15) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        ids: list[str] = []
        if samples_path(fleet.tmp / "state").exists():
            s = samples(fleet)
            try:
                ids = [r["request_id"] for r in s.window("fx", limit=100_000)]
            finally:
                s.close()
        if len(ids) >= n or time.monotonic() > deadline:
            return ids
        time.sleep(0.1)


def http_observation(fleet, rid: str) -> dict:
    url = f"http://127.0.0.1:{fleet.ports['controller_http']}/v1/observations/{rid}"
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_sampled_bodies_are_byte_exact_and_responses_unchanged(sampled):
    f = sampled
    assert f.set_weight("fx", "v2", 100)["allAcked"]
    sent: dict[str, bytes] = {}  # by lockgate's request id
    lg: dict[str, str] = {}  # the client's x-request-id -> lockgate's (the x-lockgate-request-id header)
    for name, (status, _, body) in FIXTURES.items():
        rid = f"bs-{name}"
        st, headers, got = get(f.ports["listener"], f"/fixture/{name}", {"x-request-id": rid})
        assert st == status and got == body, f"{name}: the client's body differs from the upstream's"
        assert got == get(f.canary_port, f"/fixture/{name}")[2]
        lg[rid] = headers["x-lockgate-request-id"]
        sent[lg[rid]] = body
    st, headers, got = get(f.ports["listener"], "/sse/stream?interval_ms=20", {"x-request-id": "bs-sse"})
    assert got == b"".join(SSE["stream"])
    lg["bs-sse"] = headers["x-lockgate-request-id"]
    sent[lg["bs-sse"]] = got
    assert len(wait_samples(f, len(sent))) == len(sent)
    s = samples(f)
    try:
        for rid, body in sent.items():
            rec = s.get(rid)
            assert rec is not None, rid
            assert rec["body"] == body[:MAX_BYTES], rid
            assert rec["truncated"] == (len(body) > MAX_BYTES), rid
            assert (rec["model"], rec["version"], rec["role"]) == ("fx", "v2", "canary")
        assert s.get(lg["bs-huge"])["truncated"]
        assert s.get(lg["bs-binary"])["body"] == FIXTURES["binary"][2][:MAX_BYTES]
        assert s.get(lg["bs-gzip"])["content_encoding"] == "gzip" and s.get(lg["bs-error"])["status_code"] == 500
        assert s.get(lg["bs-empty"])["body"] == b"" and s.get(lg["bs-sse"])["content_type"] == "text/event-stream"
    finally:
        s.close()
    # the observation itself is unchanged (analysis as before), and the HTTP API shows the sample
    (o,) = f.observations(lg["bs-chat"])
    assert o["analyzer"] == "openai" and o["output_tokens"] == 6 and "body_sample" not in o
    d = http_observation(f, lg["bs-binary"])
    assert base64.b64decode(d["body_sample"]["body_base64"]) == FIXTURES["binary"][2][:MAX_BYTES]
    assert d["body_sample"]["truncated"] and d["body_sample"]["status"] == 200
    assert "The answer is forty two." in http_observation(f, lg["bs-chat"])["body_sample"]["text"]

    # after a rollback the baseline answers: its responses are not kept (roles: [canary]), the canary's stay
    f.rollback("fx")
    c = Client(f.ports["listener"])
    after = []
    for i in range(20):
        r = c.request("/fixture/chat", {"x-request-id": f"bs-after-{i}"})
        assert r.status == 200 and r.body == FIXTURES["chat"][2]
        after.append(r.headers["x-lockgate-request-id"])
    c.close()
    obs = f.wait_observations(len(sent) + 20)
    assert {o["role"] for o in obs if o["client_request_id"].startswith("bs-after-")} == {"baseline"}
    assert sorted(wait_samples(f, len(sent) + 1, timeout=2)) == sorted(sent)
    assert "body_sample" not in http_observation(f, after[0])


def test_sampling_rate_and_max_count(tmp_path):
    rate, max_count, n = 0.3, 8, 80
    f = start(tmp_path, {"sample_rate": rate, "max_bytes": 64, "max_count": max_count})
    try:
        f.set_weight("fx", "v2", 100)
        ids = []  # lockgate's request ids (Envoy's x-lockgate-request-id), which the sampling hashes
        c = Client(f.ports["listener"])
        for i in range(n):
            r = c.request("/fixture/classifier", {"x-request-id": f"rate-{i:03d}"})
            assert r.body == FIXTURES["classifier"][2]
            ids.append(r.headers["x-lockgate-request-id"])
        c.close()
        f.wait_observations(n)
        sampler = BodySampler(RetainBodies(sample_rate=rate))
        expected = [rid for rid in ids if sampler.sampled(rid)]  # deterministic: the test knows which
        assert max_count < len(expected) < n
        deadline = time.monotonic() + 10
        while (got := wait_samples(f, max_count)) != expected[-max_count:] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert got == expected[-max_count:]  # the newest max_count of the sampled ones; older pruned
    finally:
        f.stop()
        for u in f.upstreams:
            u.stop()


def test_nothing_is_stored_when_off(tmp_path):
    f = start(tmp_path, None)
    try:
        f.set_weight("fx", "v2", 100)
        c = Client(f.ports["listener"])
        first = None
        for i in range(30):
            r = c.request("/fixture/chat", {"x-request-id": f"off-{i}"})
            assert r.body == FIXTURES["chat"][2]
            first = first or r.headers["x-lockgate-request-id"]
        c.close()
        obs = f.wait_observations(30)
        assert len(obs) == 30 and {o["role"] for o in obs} == {"canary"}
        assert not samples_path(f.tmp / "state").exists()
        assert "body_sample" not in http_observation(f, first)
    finally:
        f.stop()
        for u in f.upstreams:
            u.stop()


def test_diagnose_shows_the_canarys_sampled_responses(sampled):
    f = sampled
    f.set_weight("fx", "v2", 100)
    t0 = time.time()
    c = Client(f.ports["listener"])
    ids = [c.request("/fixture/refusal" if i % 2 else "/fixture/chat", {"x-request-id": f"dg-{i}"}
                     ).headers["x-lockgate-request-id"] for i in range(6)]
    c.close()
    assert len(wait_samples(f, 6)) == 6
    f.rollback("fx")
    t1 = time.time()
    f.stop()  # diagnose reads the state dir alone
    # a rollout record covering the window (the promoter is not what is under test here)
    rs = RolloutStore(f.tmp / "state" / "rollouts.db")
    r = rs.create(model="fx", canary="v2", baseline="v1", spec_text="x", spec_source="test", spec_hash="h",
                  created_by="test", auto={}, now=t0 - 1)
    rs.transition(r.id, expect=("pending",), status="rolled_back", kind="rolled_back", actor="test", now=t1)
    rs.close()
    d = json.loads(f.cli("rollout", "diagnose", str(r.id), "--json", check=True).stdout)
    shown = d["samples"]
    assert [s["request_id"] for s in shown] == ids[:5]  # the first N of the window
    assert base64.b64decode(shown[0]["body_base64"]) == FIXTURES["chat"][2]
    assert "can't help" in shown[1]["text"] and shown[1]["status"] == 200
    assert shown[0]["host"] == f"127.0.0.1:{f.canary_port}"
    text = f.cli("rollout", "diagnose", str(r.id), check=True).stdout
    assert "sampled canary responses:" in text and ids[0] in text and "The answer is forty two." in text
    assert f"host 127.0.0.1:{f.canary_port}" in text
