"""Micro-benchmark: µs per response for the ext_proc body analyzers.

    python3 bench/analyzers_speed.py [iterations]

Measures make_analyzer + feed(chunks) + finish for:
  * OpenAI chat JSON (~1 KB, usage present), fed in 2 chunks
  * OpenAI chat JSON (~1 KB) without usage and with a refusal scan miss
  * SSE stream (~50 events incl. usage chunk and [DONE]), one chunk per event
  * SSE stream, same body re-chunked into 64-byte pieces (events split mid-line)
  * classifier JSON (probs map, 5 classes)
  * HF list-form classifier JSON
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lockgate.extproc.analyzers import AnalyzerConfig, make_analyzer  # noqa: E402

CFG = AnalyzerConfig()
WORDS = "The quick brown fox jumps over the lazy dog while the canary rollout proceeds safely. "


def chat_json(usage: bool = True) -> bytes:
    body = {
        "id": "chatcmpl-9a8b7c",
        "object": "chat.completion",
        "created": 1718000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": (WORDS * 10)[:800], "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "system_fingerprint": "fp_0123456789",
    }
    if usage:
        body["usage"] = {"prompt_tokens": 25, "completion_tokens": 180, "total_tokens": 205}
    return json.dumps(body).encode()


def sse_events(n: int = 50) -> list[bytes]:
    words = WORDS.split(" ")
    out = []
    for i in range(n - 3):
        chunk = {
            "id": "chatcmpl-9a8b7c",
            "object": "chat.completion.chunk",
            "created": 1718000000,
            "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_0123456789",
            "choices": [{"index": 0, "delta": {"content": words[i % len(words)] + " "}, "logprobs": None, "finish_reason": None}],
        }
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    out.append(b'data: {"id":"chatcmpl-9a8b7c","object":"chat.completion.chunk","model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    out.append(b'data: {"id":"chatcmpl-9a8b7c","object":"chat.completion.chunk","model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":25,"completion_tokens":47,"total_tokens":72}}\n\n')
    out.append(b"data: [DONE]\n\n")
    return out


def rechunk(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def bench(name: str, kind, ctype: str, chunks: list[bytes], iters: int) -> None:
    # sanity: the analysis must succeed (a benchmark of an error path is useless)
    a = make_analyzer(kind, ctype, None, CFG)
    for c in chunks:
        a.feed(c)
    res = a.finish()
    assert res.parse_error is None, res
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            a = make_analyzer(kind, ctype, None, CFG)
            for c in chunks:
                a.feed(c)
            a.finish()
        best = min(best, (time.perf_counter() - t0) / iters)
    size = sum(len(c) for c in chunks)
    print(f"{name:<42} {size:>7} B {len(chunks):>4} chunks  {best * 1e6:9.1f} µs/response")


def main() -> None:
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    cj = chat_json()
    bench("openai chat JSON (usage)", None, "application/json", rechunk(cj, (len(cj) + 1) // 2), iters)
    bench("openai chat JSON (no usage, estimate)", "openai", "application/json", [chat_json(False)], iters)
    ev = sse_events(50)
    bench("SSE 50 events (1 chunk/event)", None, "text/event-stream", ev, iters)
    bench("SSE 50 events (64 B chunks)", None, "text/event-stream", rechunk(b"".join(ev), 64), iters)
    probs = json.dumps({"probs": {"safe": 0.91, "toxic": 0.04, "spam": 0.02, "pii": 0.02, "other": 0.01}, "model": "clf-v2"}).encode()
    bench("classifier probs map (5 classes)", None, "application/json", [probs], iters)
    hf = json.dumps([{"label": "POSITIVE", "score": 0.97}, {"label": "NEGATIVE", "score": 0.03}]).encode()
    bench("classifier HF list form", "classifier", "application/json", [hf], iters)


if __name__ == "__main__":
    main()
