"""Property tests (hypothesis) for lockgate.extproc.analyzers."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockgate.extproc.analyzers import AnalyzerConfig, BodyAnalysis, make_analyzer

STRICT = AnalyzerConfig(strict=True)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KINDS = [
    (None, "application/json", None),
    (None, "text/event-stream", None),
    ("openai", "application/json", None),
    ("openai", "text/event-stream", None),
    ("sse", "text/plain", None),
    ("classifier", "application/json", None),
    ("none", "application/json", None),
    (None, "application/json", "gzip"),
]


def analyse(body: bytes, cuts: list[int], kind, ctype, enc=None, cfg=STRICT, eos=True) -> BodyAnalysis:
    a = make_analyzer(kind, ctype, enc, cfg)
    prev = 0
    for c in sorted(set(cuts)) + [len(body)]:
        c = min(max(c, 0), len(body))
        if c < prev:
            continue
        a.feed(body[prev:c])
        prev = c
    return a.finish(end_of_stream=eos)


def one_chunk(body: bytes, kind, ctype, enc=None, cfg=STRICT, eos=True) -> BodyAnalysis:
    a = make_analyzer(kind, ctype, enc, cfg)
    a.feed(body)
    return a.finish(end_of_stream=eos)


@st.composite
def body_and_cuts(draw, body_strategy):
    body = draw(body_strategy)
    cuts = draw(st.lists(st.integers(0, max(len(body), 0)), max_size=40))
    return body, cuts


# Text with multi-byte UTF-8 (2, 3 and 4 byte sequences), quotes, backslashes, newlines.
TEXT = st.lists(st.sampled_from(list("ab \n\"\\é世🙂\r:") + ["data: ", "[DONE]"]), max_size=8).map("".join)


@st.composite
def sse_streams(draw):
    nl = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    pieces = draw(st.lists(TEXT, max_size=8))
    out = []
    expected_chars = 0

    def emit(obj, multiline=False):
        if draw(st.booleans()):
            out.append(": keep-alive" + nl + nl)
        if draw(st.booleans()):
            out.append("event: message" + nl + "id: 7" + nl)
        if multiline:
            for line in json.dumps(obj, indent=1).split("\n"):
                out.append("data:" + line + nl)
        else:
            out.append("data: " + json.dumps(obj, ensure_ascii=draw(st.booleans())) + nl)
        out.append(nl)

    for p in pieces:
        expected_chars += len(p)
        choice = {"index": 0, "delta": {"content": p}, "finish_reason": None}
        if draw(st.booleans()):
            choice["logprobs"] = {"content": [{"token": "t", "logprob": -0.5, "top_logprobs": [{"token": "t", "logprob": -0.5}, {"token": "u", "logprob": -1.5}]}]}
        emit({"model": "m", "choices": [choice]}, multiline=draw(st.booleans()))
    finish = draw(st.sampled_from([None, "stop", "length"]))
    if finish:
        emit({"model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if draw(st.booleans()):
        emit({"model": "m", "choices": [], "usage": {"completion_tokens": len(pieces)}})
    done = draw(st.booleans())
    if done:
        out.append("data: [DONE]" + nl + nl)
    return "".join(out).encode(), expected_chars, finish, done


@given(st.data())
@SETTINGS
def test_sse_any_split_equals_one_chunk(data):
    (body, chars, finish, done) = data.draw(sse_streams())
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=40))
    for eos in (True, False):
        whole = one_chunk(body, None, "text/event-stream", eos=eos)
        split = analyse(body, cuts, None, "text/event-stream", eos=eos)
        assert split == whole
    assert whole.body_bytes == len(body)
    whole = one_chunk(body, None, "text/event-stream")
    if whole.output_chars is not None:
        assert whole.output_chars == chars
    assert whole.finish_reason == finish
    if not finish and not done:
        assert whole.parse_error == "cut_off"
    else:
        assert whole.parse_error is None


def test_sse_every_single_split_point():
    body = (
        ': hi\r\n\r\nevent: x\r\ndata: {"model":"m",\r\ndata: "choices":[{"index":0,"delta":{"content":"h\u00e9\u4e16\U0001f642"}}]}\r\n\r\n'
        'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\r\r'
        "data: [DONE]\n\n"
    ).encode()
    whole = one_chunk(body, None, "text/event-stream")
    assert whole.parse_error is None and whole.output_chars == 4 and whole.events == 3
    for i in range(len(body) + 1):
        for j in range(i, min(i + 4, len(body) + 1)):
            assert analyse(body, [i, j], None, "text/event-stream") == whole


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=10,
)


@st.composite
def openai_json(draw):
    content = draw(st.one_of(st.none(), TEXT))
    body = {
        "model": draw(TEXT),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": draw(st.sampled_from([None, "stop", "length", "content_filter"]))}],
    }
    if draw(st.booleans()):
        body["usage"] = {"completion_tokens": draw(st.integers(0, 10_000))}
    if draw(st.booleans()):
        body["extra"] = draw(JSON_VALUES)
    return json.dumps(body, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def classifier_json(draw):
    labels = draw(st.lists(TEXT, min_size=1, max_size=5, unique=True))
    probs = [draw(st.floats(0.001, 1.0)) for _ in labels]
    form = draw(st.sampled_from(["map", "hf", "label"]))
    if form == "map":
        return json.dumps({"probs": dict(zip(labels, probs))}).encode()
    if form == "hf":
        return json.dumps([{"label": lab, "score": p} for lab, p in zip(labels, probs)]).encode()
    return json.dumps({"label": labels[0], "score": probs[0]}).encode()


@given(st.data())
@SETTINGS
def test_json_any_split_equals_one_chunk(data):
    body = data.draw(st.one_of(openai_json(), classifier_json(), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=30))
    for kind, ctype, enc in KINDS:
        whole = one_chunk(body, kind, ctype, enc)
        assert analyse(body, cuts, kind, ctype, enc) == whole
        assert whole.body_bytes == len(body)


@given(openai_json())
@SETTINGS
def test_openai_json_always_measured(body):
    r = one_chunk(body, None, "application/json")
    obj = json.loads(body)
    assert r.analyzer == "openai" and r.parse_error is None
    assert r.output_tokens is not None and r.output_chars is not None and r.refusal is not None
    content = obj["choices"][0]["message"]["content"] or ""
    assert r.output_chars == len(content)
    if "usage" in obj:
        assert r.output_tokens == obj["usage"]["completion_tokens"] and not r.output_tokens_estimated
    else:
        assert r.output_tokens == math.ceil(len(content) / 4) and r.output_tokens_estimated
    if obj["choices"][0]["finish_reason"] == "content_filter":
        assert r.refusal is True


@given(classifier_json())
@SETTINGS
def test_classifier_always_measured(body):
    r = one_chunk(body, None, "application/json")
    assert r.analyzer == "classifier" and r.parse_error is None
    assert r.predicted_class is not None and r.confidence is not None
    assert 0.0 <= r.confidence <= 1.0
    if r.class_entropy is not None:
        assert r.class_entropy >= 0.0


@given(body_and_cuts(st.binary(max_size=300)), st.sampled_from(KINDS), st.booleans())
@SETTINGS
def test_arbitrary_bytes_never_raise(bc, kind_ctype_enc, eos):
    body, cuts = bc
    kind, ctype, enc = kind_ctype_enc
    # strict=True: an internal error would raise here instead of being hidden.
    r = analyse(body, cuts, kind, ctype, enc, eos=eos)
    assert r.body_bytes == len(body)
    assert r.parse_error != "analyzer_error"
    json.dumps(r.to_dict(), allow_nan=False)
    assert analyse(body, [], kind, ctype, enc, eos=eos) == r


SSE_ALPHABET = st.sampled_from([b"data: ", b"data:", b"\n", b"\r", b"\r\n", b": c", b"event: e", b"[DONE]", b"{", b"}", b'"choices"', b"\xff", b"\xc3", b"\xa9", b" ", b"id:1"])


@given(body_and_cuts(st.lists(SSE_ALPHABET, max_size=60).map(b"".join)), st.booleans())
@SETTINGS
def test_sse_like_garbage_split_invariant(bc, eos):
    body, cuts = bc
    r = analyse(body, cuts, "sse", "text/event-stream", eos=eos)
    assert r == one_chunk(body, "sse", "text/event-stream", eos=eos)
    assert r.body_bytes == len(body)


@given(st.data())
@SETTINGS
def test_cap_truncates_and_counts_exactly(data):
    kind, ctype, enc = data.draw(st.sampled_from(KINDS))
    body = data.draw(st.one_of(st.binary(max_size=400), sse_streams().map(lambda t: t[0]), openai_json()))
    cap = data.draw(st.integers(0, len(body) + 5))
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=20))
    cfg = AnalyzerConfig(strict=True, max_body_bytes=cap)
    r = analyse(body, cuts, kind, ctype, enc, cfg=cfg)
    assert r.body_bytes == len(body)
    buffering = r.analyzer not in ("none",)
    if buffering:
        assert r.truncated == (len(body) > cap)
    else:
        assert r.truncated is False
    assert r == one_chunk(body, kind, ctype, enc, cfg=cfg)


@given(sse_streams(), st.data())
@SETTINGS
def test_sse_truncated_equals_prefix_observed_early(stream, data):
    body = stream[0]
    cap = data.draw(st.integers(0, max(len(body) - 1, 0)))
    if len(body) <= cap:
        return
    cut = one_chunk(body, None, "text/event-stream", cfg=AnalyzerConfig(strict=True, max_body_bytes=cap))
    prefix = one_chunk(body[:cap], None, "text/event-stream", eos=False)
    assert cut.truncated and not prefix.truncated
    for f in ("events", "output_chars", "finish_reason", "entropy", "model_reported", "refusal", "output_tokens"):
        assert getattr(cut, f) == getattr(prefix, f), f


REFUSAL_WORDS = [
    # fragments of refusal phrases (so that full phrases are likely) ...
    "I", "i", "I'm", "I’m", "i'M", "I am", "I'm sorry, but I", "I am sorry but I", "sorry,", "but I", "I can't",
    "I can’t", "I cannot", "i can not", "I won't", "I will not", "I must", "As an AI,", "as an ai language model",
    "I'm unable", "I am not able", "not", "allowed", "permitted", "to", "help", "assist", "with", "you", "that",
    "this", "your", "comply", "fulfill", "fulfil", "provide", "any", "information on", "unable", "able",
    "respectfully", "decline", "refuse", "can", "won", "am",
    # ... and near misses / word-boundary traps
    "AI", "xI", "Kai", "_I", "9", "é", "a", "assistance", "helpful", "declined", "thatx", "İ", "ı", "DECLİNE", "xİ",
]
REFUSAL_SEPS = [" ", " ", " ", " ", "", ",", ", ", "\n", ".", "'"]


# One canonical phrase per branch of every default pattern.
CANONICAL_REFUSALS = [
    "I'm sorry, but I can't", "I am sorry but I won't", "I’m sorry, but I will not", "I'm sorry, but I am unable",
    "I'm sorry, but I'm not able", "I can't help with", "I cannot assist you with", "I won't help you with",
    "I will not assist with", "I can not comply with that", "I can’t fulfill your", "I cannot fulfil this",
    "I won't help with this", "I cannot assist", "I can't comply", "I cannot provide that", "I can't provide any",
    "I won't provide help", "I cannot provide assistance", "I can't provide information on", "I'm unable to help",
    "I am not able to assist", "I’m unable to comply", "I am unable to fulfill", "I'm not able to fulfil",
    "I am unable to provide", "I'm not allowed to", "I am not permitted to", "I must decline",
    "I must respectfully refuse", "As an AI, I can't", "As an AI language model, I cannot", "as an ai i won't",
]
GLUE = ["", " ", "x", "_", "9", ".", "\n", "Kai", "é", "s", "ly", ", ", "İ", "ı"]


def _slow_refusal(text: str) -> bool:
    import re

    from lockgate.extproc.analyzers import DEFAULT_REFUSAL_PATTERNS

    return any(re.search(p, text, re.IGNORECASE) for p in DEFAULT_REFUSAL_PATTERNS)


FAST_CFG = AnalyzerConfig(refusal_scan_chars=10_000)


@pytest.mark.parametrize("phrase", CANONICAL_REFUSALS)
def test_fast_default_refusal_regex_each_branch(phrase):
    turkish = phrase.replace("I", "İ").replace("i", "ı")
    for variant in (phrase, phrase.upper(), phrase.lower(), "Well. " + phrase + " it.", turkish):
        assert _slow_refusal(variant) is True, variant
        assert FAST_CFG.is_refusal_text(variant) is True, variant
    for glued in ("x" + phrase, "_" + phrase, "9" + phrase, phrase + "x", phrase[:-1]):
        assert FAST_CFG.is_refusal_text(glued) == _slow_refusal(glued), glued


@given(
    st.one_of(
        st.lists(st.tuples(st.sampled_from(REFUSAL_WORDS), st.sampled_from(REFUSAL_SEPS)), max_size=12).map(
            lambda ws: "".join(w + s for w, s in ws)
        ),
        st.tuples(st.sampled_from(GLUE), st.sampled_from(CANONICAL_REFUSALS), st.sampled_from(GLUE), st.sampled_from(REFUSAL_WORDS)).map(
            "".join
        ),
    )
)
@settings(max_examples=1000, deadline=None)
def test_fast_default_refusal_regex_equivalent_to_patterns(text):
    assert FAST_CFG.is_refusal_text(text) == _slow_refusal(text)


def test_sse_huge_line_in_tiny_chunks_is_linear():
    import time

    content = "x" * 300_000
    body = (
        'data: {"choices":[{"index":0,"delta":{"content":"' + content + '"},"finish_reason":"stop"}]}\n\n' "data: [DONE]\n\n"
    ).encode()
    a = make_analyzer(None, "text/event-stream", None, STRICT)
    t0 = time.perf_counter()
    for i in range(0, len(body), 7):
        a.feed(body[i : i + 7])
    r = a.finish()
    elapsed = time.perf_counter() - t0
    assert r.output_chars == 300_000 and r.parse_error is None
    assert elapsed < 2.0, elapsed  # quadratic re-scanning would take far longer
