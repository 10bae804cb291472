"""The ext_proc handler (``ExtProcServer.Process``) over the grpc.aio read/write API it uses.

Envoy's real behaviour is covered by tests/integration/test_capture.py; these pin the handler's own
contract: every message answered "continue unchanged", in order; the RPC ends after the last answer
without waiting for Envoy; exactly one observation per response — also when the stream is cancelled
mid-body (what was fed is kept, marked cut off)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from prometheus_client import CollectorRegistry

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from lockgate.config import config_from_text
from lockgate.extproc.capture import ATTR_NS
from lockgate.extproc.server import CaptureMetrics, ExtProcServer
from tests.unit.test_body_samples import BASE, messages

BODY = json.dumps({"choices": [{"message": {"role": "assistant", "content": "hello there"},
                                "finish_reason": "stop"}], "usage": {"completion_tokens": 2}}).encode()


class Sink:
    def __init__(self):
        self.got = []

    def offer(self, o):
        self.got.append(o)
        return True


class Context:
    """``read`` returns the queued messages then EOF; ``cancel_after`` reads: raises CancelledError
    (what grpc.aio does when Envoy resets the stream while the handler waits)."""

    def __init__(self, msgs, cancel_after=None):
        self.incoming, self.answers, self.reads, self.cancel_after = list(msgs), [], 0, cancel_after

    async def read(self):
        if self.cancel_after is not None and self.reads >= self.cancel_after:
            raise asyncio.CancelledError
        self.reads += 1
        return self.incoming.pop(0) if self.incoming else grpc.aio.EOF

    async def write(self, answer):
        self.answers.append(answer)


def server(tmp_path, extra: str = "") -> tuple[ExtProcServer, Sink]:
    config = config_from_text(BASE.replace("/tmp/lockgate-unit-state", str(tmp_path / "state")) + extra)
    sink = Sink()
    return ExtProcServer(config, sink, CaptureMetrics(CollectorRegistry())), sink


async def run(srv, ctx) -> bool:
    """Run the handler; True if it ended by itself. Then let the loop finish what it scheduled."""
    try:
        await srv.Process(None, ctx)
        ended = True
    except asyncio.CancelledError:
        ended = False
    for _ in range(3):
        await asyncio.sleep(0)
    return ended


def test_json_response_answers_each_message_and_yields_one_observation(tmp_path):
    srv, sink = server(tmp_path)
    msgs = messages("v2", "r1", BODY, 3)
    ctx = Context(msgs + [msgs[1]])  # a message after end of stream must never be read
    assert asyncio.run(run(srv, ctx))
    assert ctx.answers == [ep.ProcessingResponse(response_body=ep.BodyResponse())] * 3  # each unchanged
    assert ctx.reads == 3  # ended itself after the last body chunk, did not wait for Envoy's EOF
    (o,) = sink.got
    assert (o.request_id, o.version, o.role, o.status_code) == ("r1", "v2", "canary", 200)
    assert o.output_tokens == 2 and o.finish_reason == "stop" and not o.parse_error
    assert o.response_bytes == len(BODY) and o.analyzer == "openai"


def test_single_chunk_response_is_one_message_answered_before_it_is_read(tmp_path):
    srv, sink = server(tmp_path)
    ctx = Context(messages("v2", "r-one", BODY, 1))
    assert asyncio.run(run(srv, ctx))
    assert ctx.answers == [ep.ProcessingResponse(response_body=ep.BodyResponse())] and ctx.reads == 1
    (o,) = sink.got
    assert (o.request_id, o.status_code, o.output_tokens, o.response_bytes) == ("r-one", 200, 2, len(BODY))


def test_headers_first_layout_gives_the_same_observation(tmp_path):
    """A hand-written filter config with ``response_header_mode: SEND`` is read the same way."""
    got = {}
    for headers_first in (False, True):
        srv, sink = server(tmp_path)
        ctx = Context(messages("v2", "r1", BODY, 3, headers_first=headers_first))
        assert asyncio.run(run(srv, ctx))
        assert [a.WhichOneof("response") for a in ctx.answers] == (
            ["response_headers"] * headers_first + ["response_body"] * 3)
        (o,) = sink.got
        o.ClearField("ts"), o.ClearField("ttfb_ms"), o.ClearField("duration_ms")
        got[headers_first] = o
    assert got[False] == got[True] and got[True].status_code == 200 and got[True].output_tokens == 2


def test_bodiless_response_with_headers_first_is_one_message(tmp_path):
    srv, sink = server(tmp_path)
    (h,) = messages("v1", "r-204", b"", 1, headers_first=True)[:1]
    h.response_headers.headers.headers[0].CopyFrom(base_pb2.HeaderValue(key=":status", raw_value=b"204"))
    h.response_headers.end_of_stream = True
    ctx = Context([h])
    assert asyncio.run(run(srv, ctx))
    assert [a.WhichOneof("response") for a in ctx.answers] == ["response_headers"] and ctx.reads == 1
    (o,) = sink.got
    assert (o.request_id, o.status_code, o.role, o.response_bytes) == ("r-204", 204, "baseline", 0)


def test_cancelled_mid_body_keeps_what_was_fed(tmp_path):
    srv, sink = server(tmp_path)
    ctx = Context(messages("v2", "r-cut", BODY, 4), cancel_after=2)  # 2 of 4 chunks, then reset
    assert not asyncio.run(run(srv, ctx))
    assert len(ctx.answers) == 2
    (o,) = sink.got
    assert o.request_id == "r-cut" and o.response_bytes == 2 * -(-len(BODY) // 4)
    assert o.parse_error  # a cut-off JSON body is counted, not guessed


def test_cancelled_at_the_first_answer_still_observes_the_first_chunk(tmp_path):
    class CancelAtWrite(Context):
        async def write(self, answer):
            raise asyncio.CancelledError

    srv, sink = server(tmp_path)
    ctx = CancelAtWrite(messages("v2", "r-c1", BODY, 4))
    assert not asyncio.run(run(srv, ctx))
    (o,) = sink.got
    assert o.request_id == "r-c1" and o.response_bytes == -(-len(BODY) // 4) and o.parse_error


def test_envoy_eof_before_end_of_stream_still_observes(tmp_path):
    srv, sink = server(tmp_path)
    ctx = Context(messages("v2", "r-eof", BODY, 4)[:1])  # Envoy half-closes after one chunk
    assert asyncio.run(run(srv, ctx))
    (o,) = sink.got
    assert o.request_id == "r-eof" and o.parse_error


def test_a_response_of_no_lockgate_model_is_answered_and_not_observed(tmp_path):
    srv, sink = server(tmp_path)
    msgs = messages("v2", "r-x", BODY, 2)
    msgs[0].attributes[ATTR_NS].fields["xds.cluster_name"].string_value = "someone-else"
    ctx = Context(msgs)
    assert asyncio.run(run(srv, ctx))
    assert len(ctx.answers) == 2 and sink.got == []


def test_server_wires_the_sampler(tmp_path):
    srv, sink = server(tmp_path, "capture:\n  retain_bodies: {sample_rate: 1.0, max_bytes: 64}\n")
    ctx = Context(messages("v2", "r-srv", BODY, 5))
    assert asyncio.run(run(srv, ctx))
    assert all(a.WhichOneof("response") == "response_body" for a in ctx.answers)
    assert all(not a.response_body.HasField("response") for a in ctx.answers if a.HasField("response_body"))
    (o,) = sink.got
    assert o.body_sample == BODY[:64] and o.body_sample_truncated


def access_log_entry(rid: str, status: int, cluster: str = "chat.v1") -> al.HTTPAccessLogEntry:
    """An entry as Envoy's gRPC access log sends it for a bodiless response."""
    e = al.HTTPAccessLogEntry()
    cp = e.common_properties
    cp.start_time.FromSeconds(1_800_000_000)
    cp.time_to_first_downstream_tx_byte.FromMilliseconds(3)
    cp.duration.FromMilliseconds(4)
    cp.upstream_cluster = cluster
    cp.route_name = "chat/sticky?canary=v2&w=500&stage=s2"
    cp.upstream_remote_address.socket_address.address = "10.0.0.7"
    cp.upstream_remote_address.socket_address.port_value = 8000
    e.request.request_id = rid
    e.request.request_body_bytes = 17
    e.request.request_headers["x-user-id"] = "alice"
    e.response.response_code.value = status
    e.response.response_code_details = "via_upstream"
    e.response.response_headers["content-type"] = "application/json"
    return e


def test_bodiless_response_from_the_access_log(tmp_path):
    srv, sink = server(tmp_path)
    assert "x-user-id" in srv.header_names  # the default sticky key
    srv.observe_bodiless(access_log_entry("r-head", 200))
    srv.observe_bodiless(access_log_entry("r-other", 204, cluster="not-a-lockgate-cluster"))
    (o,) = sink.got  # a cluster of no lockgate model is not observed
    assert (o.request_id, o.model, o.version, o.role, o.status_code) == ("r-head", "chat", "v1", "baseline", 200)
    assert (o.weight_bp, o.stage, o.upstream_host, o.request_bytes) == (500, "s2", "10.0.0.7:8000", 17)
    assert o.ts == 1_800_000_000.003 and o.ttfb_ms == pytest.approx(3, abs=1e-3) and o.duration_ms == pytest.approx(4, abs=1e-3)
    assert o.response_bytes == 0 and o.user_key and "alice" not in o.user_key


def test_a_malformed_access_log_entry_is_not_fatal(tmp_path, caplog):
    srv, sink = server(tmp_path)
    e = access_log_entry("r-bad", 200)
    e.common_properties.ClearField("start_time")  # epoch 0: still an observation, never a crash
    srv.observe_bodiless(e)
    srv.models = None  # a broken server state is logged, not raised
    srv.observe_bodiless(access_log_entry("r-x", 200))
    assert [o.request_id for o in sink.got] == ["r-bad"] and "not observed" in caplog.text
