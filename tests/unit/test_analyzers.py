"""Example-based tests for lockgate.extproc.analyzers (realistic bodies)."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from lockgate.extproc.analyzers import (
    DEFAULT_REFUSAL_PATTERNS,
    AnalyzerConfig,
    BodyAnalysis,
    make_analyzer,
    token_entropy,
)

STRICT = AnalyzerConfig(strict=True)  # internal bugs raise instead of being hidden
JSON = "application/json"
SSE = "text/event-stream"


def run(body: bytes, kind=None, ctype=JSON, enc=None, cfg=STRICT, chunk=None, eos=True) -> BodyAnalysis:
    a = make_analyzer(kind, ctype, enc, cfg)
    if chunk is None:
        a.feed(body)
    else:
        for i in range(0, len(body), chunk):
            a.feed(body[i : i + chunk])
    res = a.finish(end_of_stream=eos)
    assert res.parse_error != "analyzer_error"
    json.dumps(res.to_dict(), allow_nan=False)  # always JSON-serialisable
    return res


def chat(content="Hello there! How can I help you today?", *, usage=True, finish="stop", model="gpt-4o-mini-2024-07-18", refusal=None, logprobs=None, **msg_extra):
    msg = {"role": "assistant", "content": content, "refusal": refusal, **msg_extra}
    body = {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "message": msg, "logprobs": logprobs, "finish_reason": finish}],
        "system_fingerprint": "fp_1234",
    }
    if usage:
        body["usage"] = {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22}
    return json.dumps(body).encode()


def sse_body(pieces, *, finish="stop", usage=None, done=True, nl="\n", model="gpt-4o", extra_first=None, logprobs=None):
    out = []

    def ev(obj):
        out.append(f"data: {json.dumps(obj)}{nl}{nl}")

    ev({"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    for i, p in enumerate(pieces):
        choice = {"index": 0, "delta": {"content": p}, "finish_reason": None}
        if logprobs is not None:
            choice["logprobs"] = {"content": [logprobs[i]]}
        ev({"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [choice]})
    if finish is not None:
        ev({"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if usage is not None:
        ev({"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": usage, "total_tokens": 5 + usage}})
    if done:
        out.append(f"data: [DONE]{nl}{nl}")
    return "".join(out).encode()


# ---------------------------------------------------------------- OpenAI JSON


def test_chat_with_usage():
    r = run(chat())
    assert r.analyzer == "openai"
    assert r.parse_error is None
    assert r.output_tokens == 10 and r.output_tokens_estimated is False
    assert r.output_chars == len("Hello there! How can I help you today?")
    assert r.finish_reason == "stop"
    assert r.refusal is False
    assert r.entropy is None
    assert r.model_reported == "gpt-4o-mini-2024-07-18"
    assert r.events is None and r.truncated is False
    assert r.predicted_class is None and r.confidence is None and r.class_entropy is None


def test_chat_without_usage_estimates_4_chars_per_token():
    content = "x" * 41
    r = run(chat(content, usage=False), kind="openai")
    assert r.output_tokens == 11 and r.output_tokens_estimated is True
    assert r.output_chars == 41


def test_chat_estimate_custom_chars_per_token():
    r = run(chat("abcdef", usage=False), cfg=AnalyzerConfig(strict=True, chars_per_token=2))
    assert r.output_tokens == 3


def test_chat_with_logprobs_entropy_and_token_count():
    lp = {
        "content": [
            # two equally likely alternatives -> ln 2
            {"token": "Hi", "logprob": math.log(0.5), "top_logprobs": [{"token": "Hi", "logprob": math.log(0.5)}, {"token": "Hey", "logprob": math.log(0.5)}]},
            # certain -> 0
            {"token": "!", "logprob": 0.0, "top_logprobs": [{"token": "!", "logprob": 0.0}]},
            # top-k not summing to 1 is renormalised: 0.3/0.3 -> ln 2
            {"token": "x", "logprob": math.log(0.3), "top_logprobs": [{"token": "x", "logprob": math.log(0.3)}, {"token": "y", "logprob": math.log(0.3)}]},
        ]
    }
    r = run(chat("Hi!x", usage=False, logprobs=lp))
    assert r.entropy == pytest.approx((2 * math.log(2)) / 3)
    assert r.output_tokens == 3 and r.output_tokens_estimated is True  # logprob positions


def test_completions_text_and_legacy_logprobs():
    body = {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "davinci-002",
        "choices": [
            {
                "text": " Paris is the capital.",
                "index": 0,
                "finish_reason": "length",
                "logprobs": {
                    "tokens": [" Paris", " is"],
                    "token_logprobs": [-0.1, -0.2],
                    "top_logprobs": [{" Paris": math.log(0.25), " Lyon": math.log(0.25), " Nice": math.log(0.5)}, {" is": 0.0}],
                },
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10},
    }
    r = run(json.dumps(body).encode())
    assert r.analyzer == "openai"
    assert r.output_chars == len(" Paris is the capital.")
    assert r.finish_reason == "length"
    assert r.output_tokens == 7 and not r.output_tokens_estimated
    h1 = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    assert r.entropy == pytest.approx(h1 / 2)
    assert r.refusal is False


def test_content_parts_list_and_tool_calls():
    tool = [{"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}}]
    r = run(chat(None, usage=False, finish="tool_calls", tool_calls=tool))
    assert r.output_chars == 0 and r.finish_reason == "tool_calls"
    assert r.output_tokens == math.ceil(len('{"city": "Paris"}') / 4)
    r = run(chat([{"type": "text", "text": "ab"}, {"type": "text", "text": "cd"}]))
    assert r.output_chars == 4


# ---------------------------------------------------------------- refusal


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that request.",
        "I’m sorry, but I cannot provide that.",
        "I can't help with creating malware.",
        "i cannot assist with that.",
        "I am unable to comply with this request.",
        "As an AI language model, I cannot do that.",
        "I must decline.",
    ],
)
def test_refusal_default_patterns(text):
    assert run(chat(text)).refusal is True


@pytest.mark.parametrize(
    "text",
    ["Sure! Here's the recipe.", "I can't help but notice the sky is blue.", "Paris is the capital of France."],
)
def test_no_refusal(text):
    assert run(chat(text)).refusal is False


def test_refusal_via_content_filter():
    r = run(chat(None, finish="content_filter"))
    assert r.refusal is True and r.finish_reason == "content_filter"


def test_refusal_via_message_refusal_field():
    r = run(chat(None, refusal="I can't assist with that."))
    assert r.refusal is True
    r = run(chat("fine", refusal=""))
    assert r.refusal is False


def test_refusal_only_scans_first_n_chars():
    text = "a" * 100 + " I cannot assist with that."
    assert run(chat(text)).refusal is True
    assert run(chat(text), cfg=AnalyzerConfig(strict=True, refusal_scan_chars=50)).refusal is False


def test_custom_refusal_patterns():
    cfg = AnalyzerConfig(strict=True, refusal_patterns=("computer says no",))
    assert run(chat("Computer says NO."), cfg=cfg).refusal is True
    assert run(chat("I cannot assist with that."), cfg=cfg).refusal is False  # defaults replaced
    ext = AnalyzerConfig(strict=True, refusal_patterns=DEFAULT_REFUSAL_PATTERNS + (r"\bnope\b",))
    assert run(chat("nope."), cfg=ext).refusal is True
    assert run(chat("I cannot assist with that."), cfg=ext).refusal is True
    inline = AnalyzerConfig(strict=True, refusal_patterns=["(?i)zzz", "yyy"])  # fallback path
    assert run(chat("ZZZ"), cfg=inline).refusal is True
    assert run(chat("YYY"), cfg=inline).refusal is True
    assert run(chat("I cannot assist"), cfg=AnalyzerConfig(strict=True, refusal_patterns=())).refusal is False


def test_invalid_refusal_pattern_fails_at_config_time():
    with pytest.raises(Exception):
        AnalyzerConfig(refusal_patterns=("(unclosed",))


def test_config_is_hashable_and_comparable():
    assert AnalyzerConfig() == AnalyzerConfig()
    assert hash(AnalyzerConfig()) == hash(AnalyzerConfig())


# ---------------------------------------------------------------- SSE


def test_sse_with_usage_chunk():
    pieces = ["Hel", "lo", " wor", "ld", "!"]
    r = run(sse_body(pieces, usage=42), ctype=SSE)
    assert r.analyzer == "sse" and r.parse_error is None
    assert r.output_chars == len("Hello world!")
    assert r.output_tokens == 42 and not r.output_tokens_estimated
    assert r.finish_reason == "stop" and r.refusal is False
    assert r.model_reported == "gpt-4o"
    assert r.events == 1 + 5 + 1 + 1 + 1  # role, pieces, finish, usage, [DONE]


def test_sse_without_usage_estimates():
    r = run(sse_body(["a" * 10, "b" * 3]), ctype=SSE)
    assert r.output_tokens == 4 and r.output_tokens_estimated


def test_sse_without_done_and_finish_is_cut_off():
    body = sse_body(["Hello", " there"], finish=None, done=False)
    r = run(body, ctype=SSE)
    assert r.parse_error == "cut_off"
    assert r.output_chars == len("Hello there")
    # observation stopped early (not end of stream): not the model's fault
    assert run(body, ctype=SSE, eos=False).parse_error == "incomplete"


def test_sse_with_finish_but_no_done_is_ok():
    r = run(sse_body(["x"], done=False), ctype=SSE)
    assert r.parse_error is None and r.finish_reason == "stop"


def test_sse_cut_mid_event():
    body = sse_body(["Hello", " there"], finish=None, done=False)
    body += b'data: {"choices": [{"delta": {"cont'
    r = run(body, ctype=SSE)
    assert r.parse_error == "cut_off"


def test_empty_sse_body_is_cut_off():
    r = run(b"", ctype=SSE)
    assert r.parse_error == "cut_off" and r.events == 0 and r.body_bytes == 0


def test_sse_crlf_comments_fields_multiline_data():
    e1 = json.dumps({"model": "m", "choices": [{"index": 0, "delta": {"content": "ab"}}]}, indent=1)
    data_lines = "".join(f"data:{line}\r\n" for line in e1.split("\n"))  # multi-line data, no space
    body = (
        ": keep-alive\r\n\r\n"
        "event: message\r\nid: 1\r\nretry: 1000\r\n" + data_lines + "\r\n"
        "id: 2\r\ndata: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "cd"}, "finish_reason": "stop"}]}) + "\r\n\r\n"
        "data: [DONE]\r\n\r\n"
    ).encode()
    for chunk in (None, 1, 2, 3, 7):
        r = run(body, ctype=SSE, chunk=chunk)
        assert r.parse_error is None
        assert r.output_chars == 4 and r.finish_reason == "stop" and r.events == 3
        assert r.model_reported == "m"


def test_sse_bare_cr_line_endings():
    body = sse_body(["abc"], nl="\r")
    for chunk in (None, 1, 5):
        r = run(body, ctype=SSE, chunk=chunk)
        assert r.parse_error is None and r.output_chars == 3 and r.events == 4


def test_sse_final_event_without_trailing_blank_line():
    body = sse_body(["abc"], done=False) + b"data: [DONE]"
    r = run(body, ctype=SSE)
    assert r.parse_error is None and r.events == 4


def test_sse_refusal_paths():
    assert run(sse_body(["I'm sorry, but I ", "can't help with that."]), ctype=SSE).refusal is True
    assert run(sse_body(["ok"], finish="content_filter"), ctype=SSE).refusal is True
    body = (
        'data: {"choices":[{"index":0,"delta":{"refusal":"I won\'t"}}]}\n\n'
        'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        "data: [DONE]\n\n"
    ).encode()
    assert run(body, ctype=SSE).refusal is True


def test_sse_logprobs_entropy():
    lps = [
        {"token": "a", "logprob": math.log(0.5), "top_logprobs": [{"token": "a", "logprob": math.log(0.5)}, {"token": "b", "logprob": math.log(0.5)}]},
        {"token": "c", "logprob": 0.0, "top_logprobs": [{"token": "c", "logprob": 0.0}]},
    ]
    r = run(sse_body(["a", "c"], logprobs=lps), ctype=SSE)
    assert r.entropy == pytest.approx(math.log(2) / 2)
    assert r.output_tokens == 2 and r.output_tokens_estimated


def test_sse_completions_stream():
    body = (
        'data: {"object":"text_completion","model":"m","choices":[{"text":"Hel","index":0,"finish_reason":null}]}\n\n'
        'data: {"object":"text_completion","model":"m","choices":[{"text":"lo","index":0,"finish_reason":"length"}]}\n\n'
        "data: [DONE]\n\n"
    ).encode()
    r = run(body, ctype=SSE)
    assert r.output_chars == 5 and r.finish_reason == "length"


def test_sse_n_greater_than_one_uses_index_0():
    body = (
        'data: {"choices":[{"index":1,"delta":{"content":"XXXX"}}]}\n\n'
        'data: {"choices":[{"index":0,"delta":{"content":"ab"}}]}\n\n'
        'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        "data: [DONE]\n\n"
    ).encode()
    assert run(body, ctype=SSE).output_chars == 2


def test_sse_error_event_and_malformed_event():
    body = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\nevent: error\ndata: {"error":{"message":"overloaded"}}\n\n'
    assert run(body, ctype=SSE).parse_error == "error_event"
    body = sse_body(["a"]).replace(b"data: [DONE]", b"data: {oops}\n\ndata: [DONE]")
    r = run(body, ctype=SSE)
    assert r.parse_error == "malformed_json" and r.output_chars == 1
    body = sse_body(["a"]).replace(b"data: [DONE]", b"data: \xff\xfe\n\ndata: [DONE]")
    assert run(body, ctype=SSE).parse_error == "not_utf8"


def test_sse_non_openai_dialect_not_flagged_cut_off():
    body = b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"hi"}}\n\n'
    r = run(body, kind="sse", ctype="text/plain")
    assert r.parse_error is None and r.events == 1 and r.output_tokens is None and r.refusal is None


def test_openai_kind_with_event_stream_uses_sse():
    assert run(sse_body(["a"]), kind="openai", ctype=SSE).analyzer == "sse"


def test_sse_over_cap_keeps_events_before_cap():
    body = sse_body(["abc"] * 20)
    cap = len(sse_body(["abc"] * 5, finish=None, done=False)) + 3  # 1 role + 5 pieces complete
    cfg = AnalyzerConfig(strict=True, max_body_bytes=cap)
    for chunk in (None, 1, 13):
        r = run(body, ctype=SSE, cfg=cfg, chunk=chunk)
        assert r.truncated is True and r.body_bytes == len(body)
        assert r.events == 6 and r.output_chars == 15
        assert r.parse_error is None  # can't tell if cut off: we stopped looking


# ---------------------------------------------------------------- classifier


def test_classifier_label_score():
    r = run(b'{"label": "toxic", "score": 0.91, "model": "tox-v3"}', kind="classifier")
    assert r.analyzer == "classifier" and r.parse_error is None
    assert r.predicted_class == "toxic" and r.confidence == pytest.approx(0.91)
    assert r.class_entropy is None and r.model_reported == "tox-v3"
    assert r.output_tokens is None and r.refusal is None and r.entropy is None


def test_classifier_probs_map():
    r = run(b'{"probs": {"cat": 0.7, "dog": 0.2, "bird": 0.1}}')
    assert r.analyzer == "classifier"
    assert r.predicted_class == "cat" and r.confidence == pytest.approx(0.7)
    expected = -sum(p * math.log(p) for p in (0.7, 0.2, 0.1))
    assert r.class_entropy == pytest.approx(expected)


def test_classifier_probs_are_normalised():
    r = run(b'{"probs": {"a": 2, "b": 2}}', kind="classifier")
    assert r.confidence == pytest.approx(0.5) and r.class_entropy == pytest.approx(math.log(2))
    assert r.predicted_class == "a"  # ties: first wins


def test_classifier_probs_list_with_labels():
    r = run(b'{"labels": ["neg", "pos"], "probs": [0.1, 0.9]}', kind="classifier")
    assert r.predicted_class == "pos" and r.confidence == pytest.approx(0.9)


def test_classifier_hf_list_form():
    body = json.dumps([{"label": "NEGATIVE", "score": 0.05}, {"label": "POSITIVE", "score": 0.95}]).encode()
    r = run(body)
    assert r.analyzer == "classifier"
    assert r.predicted_class == "POSITIVE" and r.confidence == pytest.approx(0.95)
    assert r.class_entropy == pytest.approx(-(0.05 * math.log(0.05) + 0.95 * math.log(0.95)))
    nested = json.dumps([[{"label": "A", "score": 0.6}, {"label": "B", "score": 0.4}]]).encode()
    assert run(nested).predicted_class == "A"
    single = run(json.dumps([{"label": "A", "score": 0.99}]).encode())
    assert single.predicted_class == "A" and single.class_entropy is None


def test_classifier_invalid_probs():
    assert run(b'{"probs": {"a": -1, "b": 2}}').parse_error == "invalid_probs"
    assert run(b'{"probs": {}}').parse_error == "invalid_probs"
    assert run(b'{"foo": 1}', kind="classifier").parse_error == "unrecognized_shape"


# ---------------------------------------------------------------- errors


def test_gzip_is_compressed_not_parsed():
    body = gzip.compress(chat())
    r = run(body, enc="gzip", chunk=10)
    assert r.parse_error == "compressed" and r.body_bytes == len(body)
    assert r.output_tokens is None and r.refusal is None and r.model_reported is None
    assert run(body, kind="sse", ctype=SSE, enc="br").parse_error == "compressed"
    assert run(chat(), enc="identity").parse_error is None


def test_malformed_and_cut_off_json():
    assert run(b'{"choices": [}').parse_error == "malformed_json"
    assert run(b'{"a": 1}}').parse_error == "malformed_json"
    body = chat()
    assert run(body[:-20]).parse_error == "cut_off"
    assert run(body[:-20], eos=False).parse_error == "incomplete"
    assert run(b"").parse_error == "empty"


def test_not_utf8_and_binary():
    assert run(b'{"label": "\xff"}').parse_error == "not_utf8"
    assert run(b"\x00\x01\x02\xff\xfe").parse_error == "binary"


def test_utf8_bom_accepted_and_multibyte_chars_counted():
    r = run(b"\xef\xbb\xbf" + chat("héllo 世界 🙂"), chunk=3)
    assert r.parse_error is None and r.output_chars == len("héllo 世界 🙂")


def test_unrecognized_and_error_shapes():
    r = run(b'{"data": [1, 2]}')
    assert r.analyzer == "json" and r.parse_error == "unrecognized_shape"
    r = run(b'{"error": {"message": "rate limited", "type": "rate_limit"}}')
    assert r.analyzer == "openai" and r.parse_error == "error_response"
    assert run(b'{"label": "x"}', kind="openai").parse_error == "unrecognized_shape"


def test_json_over_cap_truncated_with_tail_scan():
    big = chat("z" * 50_000)
    cfg = AnalyzerConfig(strict=True, max_body_bytes=1000)
    for chunk in (None, 1, 333, 4096):
        r = run(big, cfg=cfg, chunk=chunk)
        assert r.truncated is True and r.body_bytes == len(big)
        assert r.parse_error == "truncated"
        assert r.analyzer == "openai"
        assert r.finish_reason == "stop" and r.output_tokens == 10 and r.model_reported == "gpt-4o-mini-2024-07-18"
        assert r.output_chars is None  # unknown, not 0
    r = run(b'{"probs": {"a": 0.5, "b": 0.5}}' + b" " * 100, kind="classifier", cfg=AnalyzerConfig(max_body_bytes=10))
    assert r.truncated and r.parse_error == "truncated"


def test_none_and_other_content_types_count_bytes_only():
    for kind, ctype in [(None, "text/html"), (None, None), ("none", JSON), (None, "")]:
        r = run(b"<html>" * 10, kind=kind, ctype=ctype, chunk=7)
        assert r == BodyAnalysis(analyzer="none", body_bytes=60)


def test_unknown_kind_does_not_raise():
    r = run(b"abc", kind="bogus")
    assert r.parse_error == "unknown_kind" and r.body_bytes == 3


def test_content_type_params_and_suffix():
    assert run(chat(), ctype="application/json; charset=utf-8").analyzer == "openai"
    assert run(chat(), ctype="Application/JSON").analyzer == "openai"
    assert run(b'{"label":"a","score":1}', ctype="application/vnd.x+json").analyzer == "classifier"


# ---------------------------------------------------------------- robustness


class _Boom(Exception):
    pass


def test_internal_bug_is_contained_without_strict(monkeypatch):
    from lockgate.extproc import analyzers as mod

    def boom(self, obj):
        raise _Boom()

    monkeypatch.setattr(mod._JsonAnalyzer, "_openai", boom)
    a = make_analyzer(None, JSON, None, AnalyzerConfig())
    a.feed(chat())
    r = a.finish()
    assert r.parse_error == "analyzer_error" and r.body_bytes == len(chat())
    a = make_analyzer(None, JSON, None, AnalyzerConfig(strict=True))
    a.feed(chat())
    with pytest.raises(_Boom):
        a.finish()


def test_feed_bug_contained_and_bytes_still_counted():
    a = make_analyzer(None, SSE, None, AnalyzerConfig())
    a.feed(b"data: x\n")
    a.feed(12345)  # not bytes: contained
    a.feed(b"\n")
    r = a.finish()
    assert r.parse_error == "analyzer_error" and r.body_bytes == 9


def test_finish_is_idempotent_and_feed_after_finish_ignored():
    a = make_analyzer(None, JSON, None, STRICT)
    a.feed(chat())
    r1 = a.finish()
    a.feed(b"garbage")
    assert a.finish() is r1


def test_accepts_bytearray_and_memoryview():
    body = chat()
    a = make_analyzer(None, JSON, None, STRICT)
    a.feed(bytearray(body[:10]))
    a.feed(memoryview(body)[10:])
    assert a.finish() == run(body)


def test_token_entropy_helper():
    assert token_entropy([]) is None
    assert token_entropy([float("-inf")]) is None
    assert token_entropy([0.0]) == 0.0
    assert token_entropy([math.log(0.5), math.log(0.5), "x", None, float("nan")]) == pytest.approx(math.log(2))
    assert token_entropy([-1000.0, 0.0]) == pytest.approx(0.0, abs=1e-9)


def test_to_dict_round_trip():
    r = run(chat())
    d = r.to_dict()
    assert BodyAnalysis(**d) == r
    assert set(d) >= {"analyzer", "body_bytes", "truncated", "parse_error", "output_tokens", "output_tokens_estimated", "output_chars", "finish_reason", "refusal", "entropy", "predicted_class", "confidence", "class_entropy", "model_reported", "events"}
