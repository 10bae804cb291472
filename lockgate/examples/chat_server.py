"""Example OpenAI-compatible chat model server (FastAPI on uvicorn, like vLLM's OpenAI server).

    python -m lockgate.examples.chat_server --port 18001 --version v1 [flags]

Endpoints:
  POST /v1/chat/completions   (messages, stream, logprobs, top_logprobs, max_tokens,
                               stream_options.include_usage)
  POST /v1/completions        (legacy: prompt, stream, logprobs=<int>, max_tokens)
  GET  /v1/models
  GET  /healthz

Every response carries ``x-model-version: <version>``; completion bodies carry
``"model": "<model>-<version>"`` where <model> is the request's ``model`` (or
--model-name).  Prints ``ready <port>`` once listening; SIGTERM/SIGINT exit 0.

Per-request behaviour is drawn from an RNG seeded from --seed (or from
--seed and the ``x-request-seed`` header, which makes the answer a
deterministic function of the header value).  Draw order is fixed: error,
content-filter, refusal, latency, length -- so two servers with the same
--seed but different rates make nested decisions for the same request seed.

Latency: non-streaming responses sleep ~lognormal(--latency-ms,
--latency-jitter-ms).  Streams sleep ~lognormal(--ttft-ms, --latency-jitter-ms)
before the first chunk and ~lognormal(--inter-token-ms, 0.3*inter-token) between
tokens; each chunk is written to the socket as soon as it is generated.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from typing import List, Optional, Tuple

from fastapi import FastAPI, Request
from starlette.responses import Response

from ._server import (ALL_METHODS, HTTPError, RngSource, SSE_DONE, add_common_args, error_response, json_response,
                      lognormal_ms, new_app, new_id, read_json, run_server, sse_event, sse_response)
from ._testmodes import test_mode_response
from . import vllm_metrics

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

VOCAB = tuple("""
the a an model system request answer data service account user network value result
process update report query response model token cloud server client policy order
customer payment invoice support ticket issue error update release version feature
traffic latency canary rollout metric signal window budget threshold baseline sample
quickly carefully usually often rarely simply clearly directly safely fully
is are was will can should could may might must has have does did makes takes
uses shows gives finds checks sends returns handles keeps moves starts stops
good new small large fast slow stable clear simple useful safe correct recent
first next last other same different important possible available specific
and or but so because while when if then also however therefore
of in on for with to from by at about into over under after before between
this that these those it they we you he she our your their its
time day week month year step part case point way number level rate
""".split())

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "I apologize, but I'm unable to help with this.",
    "As an AI language model, I can't provide that information.",
)

Token = Tuple[str, Optional[dict]]  # (text piece, logprob entry or None)


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


class Generator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.entropy_scale = max(1e-3, args.entropy_scale)

    def n_tokens(self, rng) -> int:
        return max(1, int(round(rng.gauss(self.args.tokens_mean, self.args.tokens_sd))))

    def _lp_entry(self, rng, forced: Optional[str], first: bool, top_k: int) -> dict:
        """Build a logprob entry.  ``forced`` (a word) makes that word the
        chosen, most-likely candidate; otherwise the token is sampled from the
        candidate distribution.  Higher --entropy-scale -> flatter
        distribution -> more negative logprobs."""
        kc = max(top_k, 4)
        scale = self.entropy_scale
        r = rng.random
        nv = len(VOCAB)
        words = [forced] if forced is not None else []
        while len(words) < kc:  # distinct candidates (vocab >> kc, so few retries)
            w = VOCAB[int(r() * nv)]
            if w not in words:
                words.append(w)
        gap = 2.5 / scale
        rest = min(0.6, 0.03 * scale * (0.5 + r()))
        logits = [0.0]
        for _ in range(kc - 1):
            logits.append(logits[-1] + gap * math.log(1.0 - r()))  # -Exp(mean=gap) steps
        z = sum(math.exp(x) for x in logits)
        shift = math.log((1.0 - rest) / z)
        lps = [round(x + shift, 5) for x in logits]
        if forced is not None:
            idx = 0
        else:
            u = r() * z
            idx = kc - 1
            acc = 0.0
            for i, x in enumerate(logits):
                acc += math.exp(x)
                if u < acc:
                    idx = i
                    break
        pre = "" if first else " "
        return {
            "token": pre + words[idx],
            "logprob": lps[idx],
            "top_logprobs": [{"token": pre + words[i], "logprob": lps[i]} for i in range(top_k)],
        }

    def tokens(self, rng, n: int, logprobs: bool, top_k: int) -> List[Token]:
        out: List[Token] = []
        for i in range(n):
            if logprobs:
                e = self._lp_entry(rng, None, i == 0, top_k)
                out.append((e["token"], e))
            else:
                w = rng.choice(VOCAB)
                out.append((w if i == 0 else " " + w, None))
        return out

    def forced_tokens(self, rng, text: str, logprobs: bool, top_k: int) -> List[Token]:
        out: List[Token] = []
        for i, w in enumerate(text.split(" ")):
            if logprobs:
                e = self._lp_entry(rng, w, i == 0, top_k)
                out.append((e["token"], e))
            else:
                out.append((w if i == 0 else " " + w, None))
        return out


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _count_words(s: str) -> int:
    return len(s.split())


def _int_field(body: dict, names, default, lo=None, hi=None) -> Optional[int]:
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise HTTPError(400, f"'{name}' must be an integer")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise HTTPError(400, f"'{name}' out of range")
        return v
    return default


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------


class ChatServer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rngs = RngSource(args.seed)
        self.gen = Generator(args)

    def _model(self, body) -> str:
        m = body.get("model") if isinstance(body, dict) else None
        if not isinstance(m, str) or not m:
            m = self.args.model_name
        return f"{m}-{self.args.version}"

    def app(self) -> FastAPI:
        """The routes: the two completion APIs (POST only), ``/v1/models`` and ``/healthz`` (any method);
        anything else is an OpenAI-style 404."""
        app = new_app("lockgate example chat model")

        @app.api_route("/healthz", methods=ALL_METHODS)
        async def healthz() -> Response:
            return json_response({"status": "ok", "version": self.args.version})

        @app.post(CHAT_PATH)
        async def chat_completions(request: Request) -> Response:
            return await self.complete(request, chat=True)

        @app.post(COMPLETIONS_PATH)
        async def completions(request: Request) -> Response:
            return await self.complete(request, chat=False)

        @app.api_route("/v1/models", methods=ALL_METHODS)
        async def models() -> Response:
            return json_response({"object": "list", "data": [
                {"id": f"{self.args.model_name}-{self.args.version}", "object": "model",
                 "created": 0, "owned_by": "lockgate-examples"}]})

        return app

    async def complete(self, req: Request, chat: bool) -> Response:
        if self.args.test_modes and "x-test-mode" in req.headers:
            try:
                body = await read_json(req)
            except HTTPError:
                body = None
            return test_mode_response(req, self._model(body))
        return await self._complete(req, chat)

    async def _complete(self, req: Request, chat: bool) -> Response:
        a = self.args
        body = await read_json(req)
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object")
        model = self._model(body)

        # -- parse request -------------------------------------------------
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HTTPError(400, "'messages' must be a non-empty list")
            prompt_tokens = sum(4 + _count_words(_text_of(m.get("content")))
                                for m in messages if isinstance(m, dict)) + 3
            lp_req = body.get("logprobs")
            if lp_req is not None and not isinstance(lp_req, bool):
                raise HTTPError(400, "'logprobs' must be a boolean")
            want_lp = bool(lp_req)
            top_k = _int_field(body, ("top_logprobs",), 0, 0, 20) if want_lp else 0
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list):
                prompt = " ".join(p for p in prompt if isinstance(p, str))
            if not isinstance(prompt, str):
                raise HTTPError(400, "'prompt' must be a string or list of strings")
            prompt_tokens = max(1, _count_words(prompt))
            lp_req = body.get("logprobs")
            if lp_req is None or lp_req is False:
                want_lp, top_k = False, 0
            elif lp_req is True:
                want_lp, top_k = True, _int_field(body, ("top_logprobs",), 0, 0, 20)
            elif isinstance(lp_req, int) and 0 <= lp_req <= 20:
                want_lp, top_k = True, lp_req
            else:
                raise HTTPError(400, "'logprobs' must be an integer 0..20")
        max_tokens = _int_field(body, ("max_completion_tokens", "max_tokens"), None, 1)
        stream = bool(body.get("stream", False))
        so = body.get("stream_options") or {}
        include_usage = stream and isinstance(so, dict) and bool(so.get("include_usage"))

        # -- draws (fixed order) ------------------------------------------
        rng = self.rngs.for_request(req.headers)
        u_err, u_cf, u_ref = rng.random(), rng.random(), rng.random()
        latency_ms = lognormal_ms(rng, a.ttft_ms if stream else a.latency_ms, a.latency_jitter_ms)
        n = self.gen.n_tokens(rng)

        if u_err < a.error_rate:
            await asyncio.sleep(latency_ms / 1000.0)
            return error_response(500, "The server had an error while processing your request.",
                                  "server_error", "internal_error")

        finish = "stop"
        if u_cf < a.content_filter_rate:
            tokens = self.gen.tokens(rng, n // 3, want_lp, top_k)
            finish = "content_filter"
        elif u_ref < a.refusal_rate:
            tokens = self.gen.forced_tokens(rng, rng.choice(REFUSALS), want_lp, top_k)
        else:
            tokens = self.gen.tokens(rng, n, want_lp, top_k)
        if max_tokens is not None and len(tokens) > max_tokens:
            tokens = tokens[:max_tokens]
            if finish != "content_filter":
                finish = "length"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                 "total_tokens": prompt_tokens + len(tokens)}

        vllm_metrics.finished(finish, len(tokens))
        if stream:
            it = self._stream(rng, chat, model, tokens, finish, usage, include_usage, want_lp,
                              latency_ms)
            return sse_response(req, it)

        await asyncio.sleep(latency_ms / 1000.0)
        text = "".join(t for t, _ in tokens)
        created = int(time.time())
        if chat:
            lp = {"content": [e for _, e in tokens], "refusal": None} if want_lp else None
            return json_response({
                "id": new_id("chatcmpl-"),
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": f"fp_{a.version}",
                "choices": [{"index": 0,
                             "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": lp, "finish_reason": finish}],
                "usage": usage,
            })
        return json_response({
            "id": new_id("cmpl-"),
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": f"fp_{a.version}",
            "choices": [{"index": 0, "text": text,
                         "logprobs": _legacy_logprobs(tokens, 0) if want_lp else None,
                         "finish_reason": finish}],
            "usage": usage,
        })

    async def _stream(self, rng, chat: bool, model: str, tokens: List[Token], finish: str,
                      usage: dict, include_usage: bool, want_lp: bool, ttft_ms: float):
        a = self.args
        cid = new_id("chatcmpl-" if chat else "cmpl-")
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        fp = f"fp_{a.version}"
        extra = {"usage": None} if include_usage else {}

        def chunk(choice: dict) -> bytes:
            d = {"id": cid, "object": obj, "created": created, "model": model,
                 "system_fingerprint": fp, "choices": [choice]}
            d.update(extra)
            return sse_event(d)

        await asyncio.sleep(ttft_ms / 1000.0)
        if chat:
            yield chunk({"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                         "logprobs": None, "finish_reason": None})
        offset = 0
        for i, (tok, e) in enumerate(tokens):
            if i:
                await asyncio.sleep(lognormal_ms(rng, a.inter_token_ms, 0.3 * a.inter_token_ms) / 1000.0)
            if chat:
                yield chunk({"index": 0, "delta": {"content": tok},
                             "logprobs": {"content": [e], "refusal": None} if want_lp else None,
                             "finish_reason": None})
            else:
                yield chunk({"index": 0, "text": tok,
                             "logprobs": _legacy_logprobs([(tok, e)], offset) if want_lp else None,
                             "finish_reason": None})
            offset += len(tok)
        if chat:
            yield chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish})
        else:
            yield chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": finish})
        if include_usage:
            yield sse_event({"id": cid, "object": obj, "created": created, "model": model,
                             "system_fingerprint": fp, "choices": [], "usage": usage})
        yield SSE_DONE


def _legacy_logprobs(tokens: List[Token], offset: int) -> dict:
    """Legacy /v1/completions logprobs format."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, e in tokens:
        out["tokens"].append(tok)
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
        out["text_offset"].append(offset)
        offset += len(tok)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lockgate.examples.chat_server",
                                description="Example OpenAI-compatible chat model server.")
    add_common_args(p, default_model="lockgate-chat")
    p.add_argument("--refusal-rate", type=float, default=0.0, help="fraction of answers that are refusals")
    p.add_argument("--content-filter-rate", type=float, default=0.0,
                   help="fraction of answers cut short with finish_reason=content_filter")
    p.add_argument("--tokens-mean", type=float, default=40.0, help="mean output length (tokens)")
    p.add_argument("--tokens-sd", type=float, default=15.0, help="output length standard deviation")
    p.add_argument("--ttft-ms", type=float, default=80.0, help="mean time to first token for streams (ms)")
    p.add_argument("--inter-token-ms", type=float, default=15.0, help="mean gap between streamed tokens (ms)")
    p.add_argument("--entropy-scale", type=float, default=1.0,
                   help="logprob spread; >1 flatter (more negative logprobs), <1 more peaked")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_server(ChatServer(args).app(), args)


if __name__ == "__main__":
    sys.exit(main())
