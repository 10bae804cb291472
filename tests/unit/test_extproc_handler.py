"""The ext_proc handler (``ExtProcServer.Process``) over the grpc.aio read/write API it uses.

Envoy's real behaviour is covered by tests/integration/test_capture.py; these pin the handler's own
contract: every message answered "continue unchanged", in order; the RPC ends after the last answer
without waiting for Envoy; exactly one observation per response — also when the stream is cancelled
mid-body (what was fed is kept, marked cut off)."""

from __future__ import annotations

import asyncio
import json

import grpc
from prometheus_client import CollectorRegistry

from envoy.config.core.v3 import base_pb2
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

    def offer(self, o, owed=False):
        self.got.append(o)
        return True

    def owe(self):
        pass


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
    assert [a.WhichOneof("response") for a in ctx.answers] == ["response_headers"] + ["response_body"] * 3
    assert all(a == ep.ProcessingResponse(response_headers=ep.HeadersResponse()) or
               a == ep.ProcessingResponse(response_body=ep.BodyResponse()) for a in ctx.answers)  # unchanged
    assert ctx.reads == 4  # ended itself after the last body chunk, did not wait for Envoy's EOF
    (o,) = sink.got
    assert (o.request_id, o.version, o.role, o.status_code) == ("r1", "v2", "canary", 200)
    assert o.output_tokens == 2 and o.finish_reason == "stop" and not o.parse_error


def test_bodiless_response_is_one_message(tmp_path):
    srv, sink = server(tmp_path)
    (h,) = messages("v1", "r-204", b"", 1)[:1]
    h.response_headers.headers.headers[0].CopyFrom(base_pb2.HeaderValue(key=":status", raw_value=b"204"))
    h.response_headers.end_of_stream = True
    ctx = Context([h])
    assert asyncio.run(run(srv, ctx))
    assert [a.WhichOneof("response") for a in ctx.answers] == ["response_headers"] and ctx.reads == 1
    (o,) = sink.got
    assert (o.request_id, o.status_code, o.role, o.response_bytes) == ("r-204", 204, "baseline", 0)


def test_cancelled_mid_body_keeps_what_was_fed(tmp_path):
    srv, sink = server(tmp_path)
    ctx = Context(messages("v2", "r-cut", BODY, 4), cancel_after=3)  # headers + 2 of 4 chunks, then reset
    assert not asyncio.run(run(srv, ctx))
    assert len(ctx.answers) == 3
    (o,) = sink.got
    assert o.request_id == "r-cut" and o.response_bytes == 2 * -(-len(BODY) // 4)
    assert o.parse_error  # a cut-off JSON body is counted, not guessed


def test_envoy_eof_before_end_of_stream_still_observes(tmp_path):
    srv, sink = server(tmp_path)
    ctx = Context(messages("v2", "r-eof", BODY, 4)[:2])  # Envoy half-closes after one chunk
    assert asyncio.run(run(srv, ctx))
    (o,) = sink.got
    assert o.request_id == "r-eof" and o.parse_error


def test_server_wires_the_sampler(tmp_path):
    srv, sink = server(tmp_path, "capture:\n  retain_bodies: {sample_rate: 1.0, max_bytes: 64}\n")
    ctx = Context(messages("v2", "r-srv", BODY, 5))
    assert asyncio.run(run(srv, ctx))
    assert all(a.WhichOneof("response") in ("response_headers", "response_body") for a in ctx.answers)
    assert all(not a.response_body.HasField("response") for a in ctx.answers if a.HasField("response_body"))
    (o,) = sink.got
    assert o.body_sample == BODY[:64] and o.body_sample_truncated


def test_a_response_of_no_lockgate_model_is_answered_and_not_observed(tmp_path):
    srv, sink = server(tmp_path)
    msgs = messages("v2", "r-x", BODY, 2)
    msgs[0].attributes[ATTR_NS].fields["xds.cluster_name"].string_value = "someone-else"
    ctx = Context(msgs)
    assert asyncio.run(run(srv, ctx))
    assert len(ctx.answers) == 3 and sink.got == []


# ------------------------------------------------------------------ capture.mode: observability
OBSERVE = "capture:\n  mode: observability\n"


def test_observability_mode_answers_nothing_and_yields_the_same_observation(tmp_path):
    inline, inline_sink = server(tmp_path / "a")
    assert asyncio.run(run(inline, Context(messages("v2", "r1", BODY, 3))))
    srv, sink = server(tmp_path / "b", OBSERVE)
    msgs = messages("v2", "r1", BODY, 3)
    ctx = Context(msgs + [msgs[1]])
    assert asyncio.run(run(srv, ctx))
    assert ctx.answers == []  # Envoy does not wait for (and ignores) answers in observability mode
    assert ctx.reads == 4  # the RPC ends at the last message: Envoy need not hold it to deferred_close
    (o,), (i,) = sink.got, inline_sink.got
    for field in ("request_id", "version", "role", "status_code", "output_tokens", "finish_reason", "parse_error",
                  "response_bytes", "user_key"):
        assert getattr(o, field) == getattr(i, field), field


def test_observability_mode_cut_stream_and_bodiless_response(tmp_path):
    srv, sink = server(tmp_path, OBSERVE)
    assert not asyncio.run(run(srv, Context(messages("v2", "r-cut", BODY, 4), cancel_after=3)))
    (h,) = messages("v1", "r-204", b"", 1)[:1]
    h.response_headers.headers.headers[0].CopyFrom(base_pb2.HeaderValue(key=":status", raw_value=b"204"))
    h.response_headers.end_of_stream = True
    ctx = Context([h])
    assert asyncio.run(run(srv, ctx)) and ctx.answers == []
    cut, bodiless = sink.got
    assert cut.request_id == "r-cut" and cut.parse_error and cut.response_bytes == 2 * -(-len(BODY) // 4)
    assert (bodiless.request_id, bodiless.status_code) == ("r-204", 204)


def test_observability_mode_still_answers_the_qa_check(tmp_path):
    srv, sink = server(tmp_path, OBSERVE + "qa_override: {token: qa-secret-token-0123456789}\n")
    req = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key="x-lockgate-qa-token", raw_value=b"qa-secret-token-0123456789"),
        base_pb2.HeaderValue(key="x-lockgate-version", raw_value=b"v2")])))
    ctx = Context([req])
    assert asyncio.run(run(srv, ctx))
    (a,) = ctx.answers
    assert a.request_headers.response.clear_route_cache
    assert a.dynamic_metadata.fields["lockgate.qa"].struct_value.fields["version"].string_value == "v2"
    assert sink.got == []
