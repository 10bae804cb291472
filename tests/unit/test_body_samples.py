"""Opt-in response-body retention (``capture.retain_bodies``): sampling, truncation, config, storage, diagnose."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import stat

import pytest
from google.protobuf import struct_pb2

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from lockgate.config import ConfigError, RetainBodies, config_from_text
from lockgate.controller.tell import diagnose as dg
from lockgate.controller.ingest.collector import ControllerMetrics, ObservationCollectorServicer
from lockgate.controller.api.http import ControllerHTTP
from lockgate.controller.ingest.observations import ObservationStore
from lockgate.controller.ingest.schema import STORED_COLUMN_NAMES
from lockgate.controller.decide.rollouts import RolloutStore
from lockgate.controller.ingest.samples import SampleStore, decoded_text, sample_json, samples_path
from lockgate.extproc.analyzers import AnalyzerConfig
from lockgate.extproc.capture import ATTR_NS, BodySampler, ResponseCapture, SampledCapture, body_sampler
from lockgate.proto.v1 import observations_pb2 as pb

NOW = 1_800_000_000.0
BASE = """listener: {address: 127.0.0.1, port: 10000}
state_dir: /tmp/lockgate-unit-state
models:
  - {name: chat, match: {path_prefix: /}, stable: v1,
     versions: {v1: {endpoints: ["127.0.0.1:1"]}, v2: {endpoints: ["127.0.0.1:2"]}}}
"""


def cfg(capture: str | None = None):
    return config_from_text(BASE + (f"capture:\n{capture}" if capture else ""), "lockgate.yaml")


# ----------------------------------------------------------------------------------------------- config
def test_config_default_off_and_values():
    assert cfg().capture.retain_bodies is None
    assert body_sampler(cfg()) is None
    assert cfg("  retain_bodies: false\n").capture.retain_bodies is None
    assert cfg("  retain_bodies: {}\n").capture.retain_bodies == RetainBodies(0.01, 16384, 1000, ("canary",))
    rb = cfg("  retain_bodies: {sample_rate: 0.5, max_bytes: 100, max_count: 7, roles: [baseline, canary]}\n"
             ).capture.retain_bodies
    assert rb == RetainBodies(0.5, 100, 7, ("baseline", "canary"))
    assert body_sampler(cfg("  retain_bodies: {sample_rate: 0}\n")) is None  # rate 0: nothing is even hashed


@pytest.mark.parametrize("body, where, message", [
    ("  retain_bodies: {sample_rate: 1.5}\n", "lockgate.yaml:7:32: capture.retain_bodies.sample_rate",
     "must be between 0.0 and 1.0, got 1.5"),
    ("  retain_bodies: {sample_rate: often}\n", "lockgate.yaml:7:32: capture.retain_bodies.sample_rate",
     "must be a number"),
    ("  retain_bodies:\n    max_bytes: 0\n", "lockgate.yaml:8:16: capture.retain_bodies.max_bytes",
     "must be between 1 and 1048576, got 0"),
    ("  retain_bodies:\n    max_count: -1\n", "lockgate.yaml:8:16: capture.retain_bodies.max_count",
     "must be between 1 and 1000000"),
    ("  retain_bodies:\n    roles: [canary, other]\n", "lockgate.yaml:8:21: capture.retain_bodies.roles[1]",
     "must be one of baseline, canary, got 'other'"),
    ("  retain_bodies:\n    roles: []\n", "lockgate.yaml:8:12: capture.retain_bodies.roles",
     "must name at least one of baseline, canary"),
    ("  retain_bodies:\n    roles: canary\n", "lockgate.yaml:8:12: capture.retain_bodies.roles", "must be a list"),
    ("  retain_bodies:\n    sample: 0.1\n", "lockgate.yaml:8:13: capture.retain_bodies.sample",
     "unknown field (known: max_bytes, max_count, roles, sample_rate)"),
    ("  retain_bodies: yes\n", "lockgate.yaml:7:18: capture.retain_bodies", "must be a mapping"),
    ("  mode: fire-and-forget\n", "lockgate.yaml:7:9: capture.mode",
     "must be one of inline, observability, got 'fire-and-forget'"),
    ("  deferred_close_ms: 0\n", "lockgate.yaml:7:22: capture.deferred_close_ms", "must be between 1 and 600000"),
    ("  batch_size: 500\n  retain_bodies: {max_bytes: 1048576}\n",
     "lockgate.yaml:8:30: capture.retain_bodies.max_bytes", "max_bytes × capture.batch_size"),
])
def test_config_errors_name_file_line_and_field(body, where, message):
    with pytest.raises(ConfigError) as e:
        cfg(body)
    text = str(e.value)
    assert where in text and message in text, text


def test_config_large_max_bytes_with_small_batches():
    rb = cfg("  batch_size: 32\n  retain_bodies: {max_bytes: 1048576}\n").capture.retain_bodies
    assert rb.max_bytes == 1 << 20


# --------------------------------------------------------------------------------------------- sampling
def test_sampling_is_deterministic_and_independent_of_the_instance():
    a = BodySampler(RetainBodies(sample_rate=0.1))
    b = BodySampler(RetainBodies(sample_rate=0.1))
    ids = [f"req-{i}" for i in range(5000)]
    assert [a.sampled(i) for i in ids] == [b.sampled(i) for i in ids]
    assert a.sampled("") is False  # no request id: nothing to key the sample on
    # nested: whatever is sampled at a rate is sampled at every higher rate
    low = BodySampler(RetainBodies(sample_rate=0.01))
    assert all(a.sampled(i) for i in ids if low.sampled(i))


@pytest.mark.parametrize("rate", [0.001, 0.01, 0.25])
def test_sampling_rate(rate):
    s = BodySampler(RetainBodies(sample_rate=rate))
    n = 100_000
    hits = sum(s.sampled(f"{i:08x}-2b1c-4f0e-9d1a-{i * 7919:012x}") for i in range(n))
    sd = (n * rate * (1 - rate)) ** 0.5
    assert abs(hits - n * rate) < 5 * sd + 1, (hits, n * rate)


def test_sampling_rate_one_takes_everything():
    s = BodySampler(RetainBodies(sample_rate=1.0))
    assert all(s.sampled(f"r{i}") for i in range(2000))


# ------------------------------------------------------------------------------------------ capture
def messages(version: str, rid: str, body: bytes, chunks: int, content_type: str = "application/json",
             content_encoding: str | None = None) -> list[ep.ProcessingRequest]:
    attrs = struct_pb2.Struct()
    attrs.update({"xds.cluster_name": f"chat.{version}", "xds.route_name": "chat/sticky?canary=v2&w=500&stage=",
                  "request.headers['x-lockgate-request-id']": rid, "request.id": f"client-{rid}",
                  "request.time": "2026-01-01T00:00:00.000000Z",
                  "upstream.address": "127.0.0.1:1"})
    h = ep.ProcessingRequest()
    h.response_headers.headers.headers.extend([base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                                               base_pb2.HeaderValue(key="content-type",
                                                                    raw_value=content_type.encode())])
    if content_encoding:
        h.response_headers.headers.headers.append(base_pb2.HeaderValue(key="content-encoding",
                                                                       raw_value=content_encoding.encode()))
    h.attributes[ATTR_NS].CopyFrom(attrs)
    out = [h]
    step = max(1, -(-len(body) // chunks))
    for i in range(chunks):
        m = ep.ProcessingRequest()
        m.response_body.body = body[i * step:(i + 1) * step]
        m.response_body.end_of_stream = i == chunks - 1
        out.append(m)
    return out


def capture(config, msgs, sampler="auto") -> tuple[ResponseCapture, pb.Observation]:
    models = {m.name: m for m in config.models}
    h = msgs[0]
    s = body_sampler(config) if sampler == "auto" else sampler
    cap = ResponseCapture.start(h.response_headers, h.attributes.get(ATTR_NS), NOW, models,
                                AnalyzerConfig(max_body_bytes=1 << 20, refusal_patterns=()), b"k" * 32,
                                [], sampler=s)
    for m in msgs[1:]:
        cap.feed(m.response_body.body)
    return cap, cap.finish(NOW + 0.1, True)


BODY = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "héllo " * 300},
                                "finish_reason": "stop"}]}).encode()


@pytest.mark.parametrize("max_bytes, chunks", [(100, 1), (100, 7), (1000, 13), (len(BODY), 5),
                                               (len(BODY) + 1, 3), (65536, 1), (1, 40)])
def test_sampled_body_is_the_exact_prefix(max_bytes, chunks):
    config = cfg(f"  retain_bodies: {{sample_rate: 1.0, max_bytes: {max_bytes}}}\n")
    cap, o = capture(config, messages("v2", "r1", BODY, chunks))
    assert isinstance(cap, SampledCapture) and o.role == "canary"
    assert o.HasField("body_sample")
    assert o.body_sample == BODY[:max_bytes]
    assert o.body_sample_truncated == (len(BODY) > max_bytes)
    assert o.body_sample_content_type == "application/json"
    # the analysis is the same as without sampling
    _, plain = capture(cfg(), messages("v2", "r1", BODY, chunks))
    assert (o.output_chars, o.response_bytes, o.finish_reason) == (plain.output_chars, plain.response_bytes,
                                                                   plain.finish_reason)


def test_unsampled_roles_and_ids_carry_nothing():
    config = cfg("  retain_bodies: {sample_rate: 1.0}\n")  # roles: [canary]
    cap, o = capture(config, messages("v1", "r1", BODY, 3))
    assert type(cap) is ResponseCapture and o.role == "baseline"
    assert not o.HasField("body_sample") and not o.body_sample_truncated and not o.body_sample_content_type
    config = cfg("  retain_bodies: {sample_rate: 0.5}\n")
    sampler = body_sampler(config)
    rid = next(f"r{i}" for i in range(100) if not sampler.sampled(f"r{i}"))
    cap, o = capture(config, messages("v2", rid, BODY, 3))
    assert type(cap) is ResponseCapture and not o.HasField("body_sample")
    _, o = capture(cfg(), messages("v2", "r1", BODY, 3))  # off
    assert not o.HasField("body_sample")


def test_empty_sampled_body_is_present_and_encoding_kept():
    config = cfg("  retain_bodies: {sample_rate: 1.0, roles: [baseline]}\n")
    _, o = capture(config, messages("v1", "r1", b"", 1))
    assert o.HasField("body_sample") and o.body_sample == b"" and not o.body_sample_truncated
    gz = gzip.compress(BODY, mtime=0)
    _, o = capture(config, messages("v1", "r2", gz, 4, content_encoding="gzip"))
    assert o.body_sample == gz and o.body_sample_content_encoding == "gzip"


# ------------------------------------------------------------------------------------------ storage
def obs(rid, ts=NOW, model="chat", version="v2", role="canary", body=b"hello", **kw):
    o = pb.Observation(request_id=rid, ts=ts, model=model, version=version, role=role, status_code=200,
                       upstream_host="10.0.0.2:80", **kw)
    if body is not None:
        o.body_sample = body
        o.body_sample_content_type = "application/json"
    return o


def test_sample_store_bounds_per_model_and_retention(tmp_path):
    s = SampleStore(tmp_path / "s.db", max_count=5)
    assert stat.S_IMODE(os.stat(tmp_path / "s.db").st_mode) == 0o600
    assert s.insert([obs(f"a{i}", NOW + i, body=f"body {i}".encode()) for i in range(8)], NOW) == 8 - 0
    assert s.count("chat") == 5
    assert [r["request_id"] for r in s.window("chat")] == [f"a{i}" for i in range(3, 8)]  # oldest pruned
    assert s.insert([obs("a7", NOW + 7)], NOW) == 0  # idempotent
    assert s.insert([obs(f"b{i}", NOW + i, model="other") for i in range(3)], NOW) == 3
    assert (s.count("chat"), s.count("other")) == (5, 3)
    # an old one arriving late is the oldest: stored, then pruned at once
    s.insert([obs("late", NOW - 100)], NOW)
    assert s.get("late") is None and s.count("chat") == 5
    s.insert([obs(f"c{i}", NOW + 10 + i) for i in range(2)], NOW)
    assert [r["request_id"] for r in s.window("chat")] == ["a5", "a6", "a7", "c0", "c1"]
    assert s.prune(NOW + 7) == 2 + 3  # a5, a6 and all of "other"
    assert s.count() == 3
    s.insert([obs(f"d{i}", NOW + 20 + i) for i in range(4)], NOW)  # counts re-read after prune
    assert s.count("chat") == 5
    rec = s.get("d3")
    assert rec["body"] == b"hello" and rec["status_code"] == 200 and rec["upstream_host"] == "10.0.0.2:80"
    assert rec["content_type"] == "application/json" and rec["truncated"] is False
    s.close()
    ro = SampleStore(tmp_path / "s.db", read_only=True)
    assert ro.count("chat") == 5
    ro.close()
    with pytest.raises(FileNotFoundError):
        SampleStore(tmp_path / "nope.db", read_only=True)


def test_sample_store_skips_what_carries_no_sample_and_filters_roles(tmp_path):
    s = SampleStore(tmp_path / "s.db", max_count=100)
    batch = [obs("x1", body=None), obs("", body=b"x"), obs("x2", role="baseline"), obs("x3"),
             obs("x4", replay=True)]
    assert s.insert(batch, NOW, roles=("canary",)) == 1
    assert s.get("x3") is not None and s.get("x2") is None
    assert s.insert(batch, NOW) == 1  # no role filter: the baseline one too
    s.close()


def test_sample_text_decoding():
    rec = {"request_id": "r", "model": "m", "version": "v", "role": "canary", "ts": 1.0, "status_code": 200,
           "upstream_host": "h", "content_type": "application/json", "content_encoding": None,
           "body": "naïve ✓".encode() + b"\xff\xfe cut", "truncated": True}
    assert decoded_text(rec) == "naïve ✓\ufffd\ufffd cut"
    j = sample_json(rec)
    assert base64.b64decode(j["body_base64"]) == rec["body"] and j["bytes"] == len(rec["body"]) and j["truncated"]
    gz = gzip.compress("compressed answer ✓".encode() * 50, mtime=0)
    assert decoded_text({**rec, "content_encoding": "gzip", "body": gz}).startswith("compressed answer ✓")
    # cut mid-stream (max_bytes): what inflates is shown
    assert decoded_text({**rec, "content_encoding": "gzip", "body": gz[:40]}).startswith("compressed")
    assert decoded_text({**rec, "content_encoding": "gzip", "body": b"not gzip"}) == "not gzip"


def test_collector_stores_samples_in_their_own_store(tmp_path):
    store = ObservationStore(tmp_path / "observations.db")
    samples = SampleStore(samples_path(tmp_path), max_count=10)
    metrics = ControllerMetrics()
    svc = ObservationCollectorServicer(store, metrics, samples=samples, sample_roles=("canary",))
    batch = pb.ObservationBatch(source="h:1", observations=[obs("s1", body=b"\x00\x01bin"), obs("s2", body=None),
                                                            obs("s3", role="baseline", version="v1")])

    async def go():
        return await svc.Report(batch, None), await svc.Report(batch, None)

    first, second = asyncio.run(go())
    svc.executor.shutdown()
    assert first.stored == 3 and second.duplicates == 3
    assert samples.count() == 1 and samples.get("s1")["body"] == b"\x00\x01bin"
    assert metrics.registry.get_sample_value("lockgate_controller_response_samples_stored_total") == 1
    assert not any("body" in c for c in STORED_COLUMN_NAMES)  # never in the observations table
    assert store.count() == 3

    # the HTTP API shows the sample with the observation
    api = ControllerHTTP("127.0.0.1", 0, store, metrics, retention_s=86400, unknown_grace_s=0.0, samples=samples)
    try:
        status, body = api.observation("s1")
        assert status == 200 and base64.b64decode(body["body_sample"]["body_base64"]) == b"\x00\x01bin"
        assert body["body_sample"]["status"] == 200 and body["body_sample"]["host"] == "10.0.0.2:80"
        status, body = api.observation("s2")
        assert status == 200 and "body_sample" not in body
    finally:
        api.server.server_close()
    store.close()
    samples.close()


def test_collector_without_sample_store_keeps_nothing(tmp_path):
    store = ObservationStore(tmp_path / "observations.db")
    svc = ObservationCollectorServicer(store, ControllerMetrics())
    asyncio.run(svc.Report(pb.ObservationBatch(observations=[obs("s1")]), None))
    svc.executor.shutdown()
    assert store.count() == 1 and not samples_path(tmp_path).exists()
    store.close()


def test_collector_sample_failure_never_fails_the_batch(tmp_path):
    store = ObservationStore(tmp_path / "observations.db")

    class Broken:
        def insert(self, *a, **kw):
            raise OSError("disk full")

    metrics = ControllerMetrics()
    svc = ObservationCollectorServicer(store, metrics, samples=Broken())
    ack = asyncio.run(svc.Report(pb.ObservationBatch(observations=[obs("s1")]), None))
    svc.executor.shutdown()
    assert ack.stored == 1 and store.count() == 1
    assert metrics.registry.get_sample_value("lockgate_controller_response_samples_failed_total") == 1
    store.close()


# ------------------------------------------------------------------------------------------ diagnose
def test_diagnose_shows_the_canarys_first_samples(tmp_path):
    rs = RolloutStore(tmp_path / "rollouts.db")
    r = rs.create(model="chat", canary="v2", baseline="v1", spec_text="x", spec_source="t", spec_hash="h",
                  created_by="test", auto={}, now=NOW)
    rs.transition(r.id, expect=("pending",), status="rolled_back", kind="rolled_back", actor="t", now=NOW + 60)
    rs.close()
    d = dg.diagnose(tmp_path, r.id, now=NOW + 100)
    assert d["samples"] == [] and d["samples_kept"] is False
    assert "capture.retain_bodies is off" in dg.render(d)

    s = SampleStore(samples_path(tmp_path), max_count=100)
    s.insert([obs("before", NOW - 1), obs("base", NOW + 1, version="v1", role="baseline"),
              obs("other-model", NOW + 1, model="x")]
             + [obs(f"c{i}", NOW + 2 + i, body=(f"answer {i}\n\x1b[31mred" + "é" * 400).encode()) for i in range(8)]
             + [obs("after", NOW + 60 + dg.END_SLACK_S + 1)], NOW)
    s.close()
    d = dg.diagnose(tmp_path, r.id, now=NOW + 100)
    assert [x["request_id"] for x in d["samples"]] == [f"c{i}" for i in range(dg.SAMPLES_SHOWN)]
    first = d["samples"][0]
    assert first["text"].startswith("answer 0\n") and first["status"] == 200 and first["host"] == "10.0.0.2:80"
    json.dumps(d)  # --json
    text = dg.render(d)
    assert "sampled canary responses:" in text and "c0" in text and "10.0.0.2:80" in text
    assert "answer 0\\n\\x1b[31mred" in text and "\x1b" not in text  # terminal-safe
    assert "… (+" in text  # shortened for display
    assert len(dg.diagnose(tmp_path, r.id, now=NOW + 100, samples=2)["samples"]) == 2


def test_display_text():
    assert dg.display_text("a\tb\r\nc") == "a\\tb\\r\\nc"
    assert dg.display_text("x" * 10, limit=4) == "xxxx… (+6 chars)"
