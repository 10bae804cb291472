"""Tests for lockgate.examples.{chat_server,classifier_server}.

Each server runs as a real subprocess on port 0; the port is read from its
``ready <port>`` line.  Processes are killed by PID in teardown.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHAT = "lockgate.examples.chat_server"
CLS = "lockgate.examples.classifier_server"
MSG = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


class Server:
    def __init__(self, module: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0", *args],
            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        line = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if r:
                line = self.proc.stdout.readline()
                break
            if self.proc.poll() is not None:
                break
        if not line.startswith(b"ready "):
            self.stop()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()!r}")
        self.port = int(line.split()[1])
        assert self.port > 0

    def conn(self, timeout: float = 10) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, conn=None):
        c = conn or self.conn()
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        h = {"content-type": "application/json", **(headers or {})}
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        raw = r.read()
        if conn is None:
            c.close()
        return r, raw

    def post_json(self, path, body, headers=None, conn=None):
        r, raw = self.request("POST", path, body, headers, conn)
        return r, json.loads(raw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


@pytest.fixture
def spawn():
    servers = []

    def _spawn(module, *args):
        s = Server(module, *args)
        servers.append(s)
        return s

    yield _spawn
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def chat():
    s = Server(CHAT, "--version", "v7", "--latency-ms", "0", "--ttft-ms", "0",
               "--inter-token-ms", "0", "--tokens-mean", "12", "--tokens-sd", "3", "--seed", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def testmode():
    s = Server(CHAT, "--version", "vt", "--latency-ms", "0", "--ttft-ms", "0",
               "--inter-token-ms", "0", "--test-modes")
    yield s
    s.stop()


def read_sse(resp):
    """Yield (arrival_time, data) for each SSE event, reading incrementally."""
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.strip()
        if line.startswith(b"data: "):
            yield time.monotonic(), line[6:]


# ---------------------------------------------------------------------------
# chat server: JSON
# ---------------------------------------------------------------------------


def test_chat_json_basic(chat):
    r, d = chat.post_json("/v1/chat/completions", MSG, {"x-user-id": "secret-user-42"})
    assert r.status == 200
    assert r.getheader("x-model-version") == "v7"
    assert r.getheader("content-type") == "application/json"
    assert "secret-user-42" not in str(r.getheaders()) and "secret-user-42" not in json.dumps(d)
    assert d["object"] == "chat.completion"
    assert d["model"] == "m-v7"
    ch = d["choices"][0]
    assert ch["message"]["role"] == "assistant"
    assert isinstance(ch["message"]["content"], str) and ch["message"]["content"]
    assert ch["finish_reason"] == "stop"
    assert ch["logprobs"] is None
    u = d["usage"]
    assert u["completion_tokens"] >= 1 and u["prompt_tokens"] >= 1
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # default model name when the request has none
    _, d = chat.post_json("/v1/chat/completions", {"messages": MSG["messages"]})
    assert d["model"] == "lockgate-chat-v7"


def test_chat_logprobs(chat):
    body = {**MSG, "logprobs": True, "top_logprobs": 3}
    _, d = chat.post_json("/v1/chat/completions", body)
    ch = d["choices"][0]
    content = ch["logprobs"]["content"]
    assert len(content) == d["usage"]["completion_tokens"]
    assert "".join(e["token"] for e in content) == ch["message"]["content"]
    for e in content:
        assert -30 < e["logprob"] <= 0
        assert len(e["top_logprobs"]) == 3
        lps = [t["logprob"] for t in e["top_logprobs"]]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert len({t["token"] for t in e["top_logprobs"]}) == 3


def _mean_logprob(server, n=15):
    lps = []
    for i in range(n):
        _, d = server.post_json("/v1/chat/completions", {**MSG, "logprobs": True},
                                {"x-request-seed": str(i)})
        lps += [e["logprob"] for e in d["choices"][0]["logprobs"]["content"]]
    return sum(lps) / len(lps)


def test_entropy_scale_moves_logprobs(chat, spawn):
    flat = spawn(CHAT, "--latency-ms", "0", "--entropy-scale", "4", "--tokens-mean", "12", "--seed", "1")
    assert _mean_logprob(flat) < _mean_logprob(chat) - 0.3


def test_request_seed_deterministic(chat):
    h = {"x-request-seed": "abc"}
    _, a = chat.post_json("/v1/chat/completions", MSG, h)
    _, b = chat.post_json("/v1/chat/completions", MSG, h)
    _, c = chat.post_json("/v1/chat/completions", MSG, {"x-request-seed": "xyz"})
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["choices"][0]["message"]["content"] != c["choices"][0]["message"]["content"]


def test_max_tokens_length(chat):
    _, d = chat.post_json("/v1/chat/completions", {**MSG, "max_tokens": 2})
    assert d["choices"][0]["finish_reason"] == "length"
    assert d["usage"]["completion_tokens"] == 2


def test_legacy_completions(chat):
    _, d = chat.post_json("/v1/completions", {"model": "m", "prompt": "say hi", "logprobs": 2})
    assert d["object"] == "text_completion" and d["model"] == "m-v7"
    ch = d["choices"][0]
    lp = ch["logprobs"]
    assert "".join(lp["tokens"]) == ch["text"]
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(lp["text_offset"])
    assert all(len(t) == 2 for t in lp["top_logprobs"])


def test_bad_requests_and_routes(chat):
    r, raw = chat.request("POST", "/v1/chat/completions", b"{not json")
    assert r.status == 400 and "error" in json.loads(raw)
    r, _ = chat.request("POST", "/v1/chat/completions", {"model": "m"})
    assert r.status == 400
    r, _ = chat.request("GET", "/v1/chat/completions")
    assert r.status == 405
    r, _ = chat.request("GET", "/nope")
    assert r.status == 404
    r, raw = chat.request("GET", "/healthz")
    assert r.status == 200 and r.getheader("x-model-version") == "v7"
    # test modes are ignored unless --test-modes
    r, d = chat.post_json("/v1/chat/completions", MSG, {"x-test-mode": "error"})
    assert r.status == 200 and d["object"] == "chat.completion"


def test_keepalive_and_chunked_request_body(chat):
    c = chat.conn()
    r, _ = chat.post_json("/v1/chat/completions", MSG, conn=c)
    sock = c.sock
    for _ in range(20):
        r, d = chat.post_json("/v1/chat/completions", MSG, conn=c)
        assert r.status == 200
    assert c.sock is sock  # same TCP connection reused
    # chunked request body
    c.request("POST", "/v1/chat/completions", body=iter([json.dumps(MSG).encode()]),
              headers={"content-type": "application/json", "transfer-encoding": "chunked"},
              encode_chunked=True)
    r = c.getresponse()
    assert r.status == 200 and json.loads(r.read())["object"] == "chat.completion"
    assert c.sock is sock
    # Connection: close is honoured
    c.request("GET", "/healthz", headers={"connection": "close"})
    r = c.getresponse()
    r.read()
    assert r.getheader("connection") == "close"
    c.close()


def test_rates(spawn):
    s = spawn(CHAT, "--latency-ms", "0", "--seed", "3", "--error-rate", "0.2",
              "--refusal-rate", "0.3", "--content-filter-rate", "0.1", "--tokens-mean", "6")
    n, err, ref, cf = 400, 0, 0, 0
    c = s.conn()
    for _ in range(n):
        r, d = s.post_json("/v1/chat/completions", MSG, conn=c)
        if r.status == 500:
            assert d["error"]["type"] == "server_error" and r.getheader("x-model-version") == "v1"
            err += 1
            continue
        ch = d["choices"][0]
        if ch["finish_reason"] == "content_filter":
            cf += 1
        elif "sorry" in ch["message"]["content"].lower() or "I can't" in ch["message"]["content"] \
                or "unable" in ch["message"]["content"]:
            ref += 1
    c.close()
    assert abs(err / n - 0.2) < 0.07
    assert abs(cf / n - 0.8 * 0.1) < 0.05
    assert abs(ref / n - 0.8 * 0.9 * 0.3) < 0.07


def test_refusal_with_logprobs(spawn):
    s = spawn(CHAT, "--latency-ms", "0", "--refusal-rate", "1")
    _, d = s.post_json("/v1/chat/completions", {**MSG, "logprobs": True, "top_logprobs": 2})
    ch = d["choices"][0]
    assert ch["message"]["content"] in (
        "I'm sorry, but I can't help with that.",
        "I'm sorry, but I cannot assist with that request.",
        "I apologize, but I'm unable to help with this.",
        "As an AI language model, I can't provide that information.",
    )
    assert "".join(e["token"] for e in ch["logprobs"]["content"]) == ch["message"]["content"]


def test_latency(spawn):
    s = spawn(CHAT, "--latency-ms", "150", "--latency-jitter-ms", "0")
    c = s.conn()
    s.post_json("/v1/chat/completions", MSG, conn=c)
    t0 = time.monotonic()
    s.post_json("/v1/chat/completions", MSG, conn=c)
    assert 0.14 < time.monotonic() - t0 < 5.0  # the configured 150 ms are waited; the bound only catches a hang
    c.close()


# ---------------------------------------------------------------------------
# chat server: streaming
# ---------------------------------------------------------------------------


def test_stream_chat(spawn):
    s = spawn(CHAT, "--ttft-ms", "150", "--latency-jitter-ms", "0", "--inter-token-ms", "40",
              "--tokens-mean", "8", "--tokens-sd", "0", "--version", "v2")
    c = s.conn()
    body = {**MSG, "stream": True, "logprobs": True, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    c.request("POST", "/v1/chat/completions", body=json.dumps(body),
              headers={"content-type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    assert r.getheader("content-type").startswith("text/event-stream")
    assert r.getheader("transfer-encoding") == "chunked"
    assert r.getheader("x-model-version") == "v2"
    events = list(read_sse(r))
    assert events[-1][1] == b"[DONE]"
    chunks = [json.loads(e) for _, e in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" and ch["model"] == "m-v2" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content_chunks = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["delta"].get("content")]
    assert len(content_chunks) == 8
    for ch in content_chunks:
        assert ch["choices"][0]["logprobs"]["content"][0]["logprob"] <= 0
    fin = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"]]
    assert len(fin) == 1 and fin[0]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    # timing: first token after ~ttft, tokens spread out after that
    t_first = events[1][0] - t0
    t_last = events[-1][0] - t0
    assert 0.13 < t_first < 0.5
    assert t_last - t_first > 0.15  # 7 gaps of ~40 ms
    # connection is reusable after a chunked response
    r2, d = s.post_json("/v1/chat/completions", MSG, conn=c)
    assert r2.status == 200 and d["object"] == "chat.completion"
    c.close()


def test_stream_legacy_completions_no_usage(chat):
    c = chat.conn()
    c.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "stream": True, "max_tokens": 3}),
              headers={"content-type": "application/json"})
    r = c.getresponse()
    events = [e for _, e in read_sse(r)]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(ch["object"] == "text_completion" and "usage" not in ch for ch in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len([ch for ch in chunks if ch["choices"][0]["text"]]) == 3
    c.close()


def test_concurrent_streams(spawn):
    s = spawn(CHAT, "--ttft-ms", "50", "--latency-jitter-ms", "0", "--inter-token-ms", "20",
              "--tokens-mean", "10", "--tokens-sd", "0")
    results = []

    def one():
        c = s.conn()
        c.request("POST", "/v1/chat/completions", body=json.dumps({**MSG, "stream": True}),
                  headers={"content-type": "application/json"})
        events = [e for _, e in read_sse(c.getresponse())]
        results.append(events[-1] == b"[DONE]")
        c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # one stream takes ~50 + 9*20 ms; 50 serialised would take ~11.5 s (a loaded machine stays far below)
    assert time.monotonic() - t0 < 6.0
    assert results == [True] * 50


# ---------------------------------------------------------------------------
# chat server: test modes
# ---------------------------------------------------------------------------


def test_mode_huge(testmode):
    r, raw = testmode.request("POST", "/v1/chat/completions", MSG,
                              {"x-test-mode": "huge", "x-test-size": "200000"})
    assert r.status == 200 and len(raw) == 200000
    assert int(r.getheader("content-length")) == 200000
    assert json.loads(raw)["object"] == "chat.completion"
    r, raw = testmode.request("POST", "/v1/chat/completions", MSG, {"x-test-mode": "huge"})
    assert len(raw) == 5 * 1024 * 1024
    assert json.loads(raw)["model"] == "m-vt"


def test_mode_binary_malformed_gzip_error(testmode):
    r, raw = testmode.request("POST", "/v1/chat/completions", MSG,
                              {"x-test-mode": "binary", "x-test-size": "1000"})
    assert r.status == 200 and r.getheader("content-type") == "application/octet-stream"
    assert len(raw) == 1000

    r, raw = testmode.request("POST", "/v1/chat/completions", MSG, {"x-test-mode": "malformed"})
    assert r.status == 200 and r.getheader("content-type") == "application/json"
    assert raw.startswith(b"{")
    with pytest.raises(ValueError):
        json.loads(raw)

    r, raw = testmode.request("POST", "/v1/chat/completions", MSG, {"x-test-mode": "gzip"})
    assert r.status == 200 and r.getheader("content-encoding") == "gzip"
    assert raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(raw))["object"] == "chat.completion"

    r, raw = testmode.request("POST", "/v1/chat/completions", MSG, {"x-test-mode": "error"})
    assert r.status == 500 and "error" in json.loads(raw)

    r, raw = testmode.request("POST", "/v1/chat/completions", MSG, {"x-test-mode": "bogus"})
    assert r.status == 400


def test_mode_slow_sse(testmode):
    c = testmode.conn()
    t0 = time.monotonic()
    c.request("POST", "/v1/chat/completions", body=json.dumps({**MSG, "stream": True}),
              headers={"content-type": "application/json", "x-test-mode": "slow-sse",
                       "x-test-interval-ms": "150", "x-test-events": "4"})
    r = c.getresponse()
    events = list(read_sse(r))
    first_content = next(t for t, e in events if b'"content":"event0' in e)
    assert events[-1][1] == b"[DONE]"
    # the first event was received while the server was still sleeping
    # before sending the later ones (4 more gaps of 150 ms)
    assert first_content - t0 < 0.3
    assert events[-1][0] - first_content > 0.45
    c.close()


def test_mode_cut_sse(testmode):
    c = testmode.conn()
    c.request("POST", "/v1/chat/completions", body=json.dumps({**MSG, "stream": True}),
              headers={"content-type": "application/json", "x-test-mode": "cut-sse"})
    r = c.getresponse()
    assert r.getheader("transfer-encoding") == "chunked"
    got = b""
    with pytest.raises(http.client.IncompleteRead) as ei:
        while True:
            b = r.read(64)
            if not b:
                break
            got += b
    got += ei.value.partial
    assert b"event0" in got and b"[DONE]" not in got
    c.close()


def test_mode_cut_sse_raw_socket(testmode):
    """The connection is closed without the terminating 0-length chunk."""
    body = json.dumps(MSG).encode()
    s = socket.create_connection(("127.0.0.1", testmode.port), timeout=5)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-test-mode: cut-sse\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(body), body))
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    s.close()
    assert b"event2" in data and not data.endswith(b"0\r\n\r\n")


# ---------------------------------------------------------------------------
# request log and shutdown
# ---------------------------------------------------------------------------


def test_request_log(spawn, tmp_path):
    log = tmp_path / "req.log"
    s = spawn(CHAT, "--latency-ms", "0", "--version", "canary", "--log-requests", str(log))
    t0 = time.time()
    c = s.conn()
    s.post_json("/v1/chat/completions", MSG, {"x-user-id": "alice", "x-request-id": "r-1"}, conn=c)
    s.request("GET", "/healthz", conn=c)  # not logged by default
    s.post_json("/v1/completions", {"prompt": "x"}, conn=c)
    t1 = time.time()
    # lines are visible as soon as the responses are
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    assert len(lines) == 2
    a, b = lines
    assert a["version"] == "canary" and a["path"] == "/v1/chat/completions"
    assert a["user"] == "alice" and a["request_id"] == "r-1"
    assert b["user"] is None and b["request_id"] is None and b["path"] == "/v1/completions"
    assert t0 - 0.01 <= a["t"] <= b["t"] <= t1 + 0.01
    assert set(a) == {"t", "version", "path", "user", "request_id"}
    c.close()


def test_request_logged_at_arrival(spawn, tmp_path):
    log = tmp_path / "req.log"
    s = spawn(CHAT, "--latency-ms", "400", "--latency-jitter-ms", "0", "--log-requests", str(log))
    done = threading.Event()

    def go():
        s.post_json("/v1/chat/completions", MSG, {"x-request-id": "slow"})
        done.set()

    threading.Thread(target=go, daemon=True).start()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not (log.exists() and log.read_text()):
        time.sleep(0.01)
    assert json.loads(log.read_text())["request_id"] == "slow"
    assert not done.is_set()  # logged before the response was sent
    assert done.wait(3)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shutdown(spawn, sig):
    s = spawn(CHAT, "--ttft-ms", "0", "--inter-token-ms", "200", "--tokens-mean", "50")
    # an in-flight stream must not block shutdown
    c = s.conn()
    c.request("POST", "/v1/chat/completions", body=json.dumps({**MSG, "stream": True}),
              headers={"content-type": "application/json"})
    r = c.getresponse()
    r.readline()
    t0 = time.monotonic()
    os.kill(s.proc.pid, sig)
    assert s.proc.wait(timeout=5) == 0
    assert time.monotonic() - t0 < 3
    c.close()


# ---------------------------------------------------------------------------
# classifier server
# ---------------------------------------------------------------------------


def test_classifier_basic(spawn):
    s = spawn(CLS, "--latency-ms", "0", "--version", "v3", "--seed", "5",
              "--accuracy", "billing=1,technical=0.5,account=0.5,fraud=0")
    classes = ["billing", "technical", "account", "fraud"]
    c = s.conn()
    for path in ("/v1/classify", "/predict"):
        r, d = s.post_json(path, {"text": "refund my card"}, {"x-true-class": "billing"}, conn=c)
        assert r.status == 200 and r.getheader("x-model-version") == "v3"
        assert d["model"] == "intent-classifier-v3"
        assert d["label"] == "billing"
        assert set(d["probs"]) == set(classes)
        assert abs(sum(d["probs"].values()) - 1) < 1e-3
        assert d["score"] == d["probs"]["billing"] == max(d["probs"].values())
        assert 0.5 <= d["score"] <= 0.99
    for _ in range(10):
        _, d = s.post_json("/v1/classify", {"text": "x"}, {"x-true-class": "fraud"}, conn=c)
        assert d["label"] != "fraud" and d["label"] in classes
    # true class in the body
    _, d = s.post_json("/v1/classify", {"text": "x", "true_class": "billing"}, conn=c)
    assert d["label"] == "billing"
    # no true class: label from the prior
    _, d = s.post_json("/v1/classify", {"text": "x"}, conn=c)
    assert d["label"] in classes
    r, _ = s.request("POST", "/v1/classify", {"nope": 1}, conn=c)
    assert r.status == 400
    r, _ = s.request("GET", "/healthz", conn=c)
    assert r.status == 200
    c.close()


def test_classifier_accuracy_prior_errors(spawn):
    s = spawn(CLS, "--latency-ms", "0", "--seed", "9", "--classes", "a,b,c",
              "--accuracy", "0.8", "--class-weights", "a=0,b=0,c=1", "--error-rate", "0.1")
    c = s.conn()
    n, right, errs = 300, 0, 0
    for _ in range(n):
        r, d = s.post_json("/predict", {"text": "x"}, {"x-true-class": "a"}, conn=c)
        if r.status == 500:
            errs += 1
            assert "error" in d
            continue
        right += d["label"] == "a"
    assert abs(errs / n - 0.1) < 0.05
    assert abs(right / (n - errs) - 0.8) < 0.08
    for _ in range(5):
        r, d = s.post_json("/predict", {"text": "x"}, conn=c)
        assert r.status == 500 or d["label"] == "c"
    c.close()


def _series(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_vllm_style_metrics_count_what_the_server_answered(spawn):
    """GET /metrics: the vLLM series, labelled with version, agree with the answers the client got."""
    s = spawn(CHAT, "--version", "v3", "--latency-ms", "0", "--seed", "5", "--error-rate", "0.25",
              "--content-filter-rate", "0.2", "--tokens-mean", "8")
    c = s.conn()
    statuses, reasons, tokens = [], {}, 0
    for i in range(120):
        body = {**MSG, "stream": i % 4 == 0}
        r, raw = s.request("POST", "/v1/chat/completions", body, conn=c)
        statuses.append(r.status)
        if r.status == 200 and not body["stream"]:
            d = json.loads(raw)
            reasons[d["choices"][0]["finish_reason"]] = reasons.get(d["choices"][0]["finish_reason"], 0) + 1
            tokens += d["usage"]["completion_tokens"]
    r, raw = s.request("GET", "/metrics", conn=c)
    c.close()
    assert r.status == 200 and r.getheader("x-model-version") == "v3"
    m = _series(raw.decode())
    lab = 'model_name="lockgate-chat",version="v3"'
    h = 'handler="/v1/chat/completions",method="POST"'
    n5 = statuses.count(500)
    assert 0 < n5 < 120
    assert m[f'http_requests_total{{{h},model_name="lockgate-chat",status="5xx",version="v3"}}'] == n5
    assert m[f'http_requests_total{{{h},model_name="lockgate-chat",status="2xx",version="v3"}}'] == 120 - n5
    assert m[f"vllm:e2e_request_latency_seconds_count{{{lab}}}"] == 120  # streams timed to their end
    assert m[f'vllm:e2e_request_latency_seconds_bucket{{le="+Inf",{lab}}}'] == 120
    assert m[f"vllm:num_requests_running{{{lab}}}"] == 0
    success = {k: v for k, v in m.items() if k.startswith("vllm:request_success_total")}
    assert sum(success.values()) == 120 - n5  # streams included
    assert m[f'vllm:request_success_total{{finished_reason="content_filter",{lab}}}'] >= reasons.get("content_filter", 0) > 0
    assert m[f"vllm:generation_tokens_total{{{lab}}}"] >= tokens > 0
