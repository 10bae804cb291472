"""Deterministic upstream for capture tests: fixed bodies, so byte identity can be checked exactly.

``GET|POST /fixture/<name>`` answers ``FIXTURES[name]`` (status, headers, body). Streams:
``/sse/<name>?interval_ms=N`` sends ``SSE[name]`` events as separate chunks N ms apart (chunked
encoding); ``/empty-chunked`` a chunked body with no chunks; ``HEAD /fixture/<name>`` the headers of
``GET``; ``/slow`` answers an empty 200 after 1 s; ``/cut-sse`` sends three events 50 ms apart and
closes the connection without finishing the body.
``python -m tests.fixture_upstream --port 0`` prints ``ready <port>``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import signal
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _chat(content: str, finish: str = "stop", usage: int | None = 7, logprobs: bool = False) -> bytes:
    choice: dict = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
    if logprobs:
        choice["logprobs"] = {"content": [
            {"token": t, "logprob": -0.1, "top_logprobs": [{"token": t, "logprob": -0.1},
                                                          {"token": "x", "logprob": -2.5}]}
            for t in content.split()]}
    body: dict = {"id": "chatcmpl-fixed", "object": "chat.completion", "model": "fixture-v1", "choices": [choice]}
    if usage is not None:
        body["usage"] = {"prompt_tokens": 3, "completion_tokens": usage, "total_tokens": usage + 3}
    return json.dumps(body).encode()


def _sse_events(words: list[str], usage: int) -> list[bytes]:
    events = []
    for w in words:
        events.append(b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": w + " "}, "finish_reason": None}]}).encode() + b"\n\n")
    events.append(b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode() + b"\n\n")
    events.append(b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [],
                                          "usage": {"completion_tokens": usage}}).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


JSON = "application/json"
_rng = random.Random(7)
FIXTURES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "chat": (200, {"content-type": JSON}, _chat("The answer is forty two.", usage=6, logprobs=True)),
    "chat-nousage": (200, {"content-type": JSON}, _chat("one two three four five six seven eight", usage=None)),
    "refusal": (200, {"content-type": JSON}, _chat("I'm sorry, but I can't help with that request.")),
    "content-filter": (200, {"content-type": JSON}, _chat("", finish="content_filter")),
    "classifier": (200, {"content-type": JSON}, json.dumps(
        {"label": "fraud", "score": 0.8, "probs": {"fraud": 0.8, "billing": 0.15, "account": 0.05}}).encode()),
    "error": (500, {"content-type": JSON}, b'{"error": {"message": "boom", "type": "server_error"}}'),
    "malformed": (200, {"content-type": JSON}, b'{"choices": [{"message": {"content": "cut'),
    "binary": (200, {"content-type": "application/octet-stream"}, bytes(_rng.getrandbits(8) for _ in range(4096))),
    "gzip": (200, {"content-type": JSON, "content-encoding": "gzip"}, gzip.compress(_chat("zipped", usage=1), mtime=0)),
    "huge": (200, {"content-type": JSON}, json.dumps({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": "word " * 600_000}, "finish_reason": "stop"}],
        "usage": {"completion_tokens": 600_000}}).encode()),
    "empty": (204, {}, b""),
    "empty-200": (200, {"content-type": JSON}, b""),
}
SSE = {"stream": _sse_events("streamed tokens arrive one by one".split(), usage=6)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            url = urllib.parse.urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            if parts[0] == "fixture" and len(parts) == 2 and parts[1] in FIXTURES:
                status, headers, body = FIXTURES[parts[1]]
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if status != 204:
                    self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif parts[0] == "sse" and len(parts) == 2 and parts[1] in SSE:
                interval = float(urllib.parse.parse_qs(url.query).get("interval_ms", ["0"])[0]) / 1000
                self._chunked(SSE[parts[1]], interval, finish=True)
            elif parts[0] == "slow":  # nothing for a second: a client can give up before any response
                time.sleep(1.0)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
            elif parts[0] == "empty-chunked":  # headers, then the last chunk: an empty body that is not none
                self._chunked([], 0, finish=True)
            elif parts[0] == "cut-sse":
                self._chunked(SSE["stream"][:3], 0.05, finish=False)
                self.close_connection = True
            else:
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()
            self.wfile.flush()

        def _chunked(self, events: list[bytes], interval: float, finish: bool) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i, ev in enumerate(events):
                if i and interval:
                    time.sleep(interval)
                self.wfile.write(f"{len(ev):x}\r\n".encode() + ev + b"\r\n")
                self.wfile.flush()
            if finish:
                self.wfile.write(b"0\r\n\r\n")

        def do_HEAD(self) -> None:
            parts = urllib.parse.urlsplit(self.path).path.strip("/").split("/")
            status, headers, body = FIXTURES.get(parts[-1], (404, {}, b""))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(body)))
            self.end_headers()

        do_GET = do_POST = _answer

        def log_message(self, *a) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"ready {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
