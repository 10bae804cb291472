"""Non-streaming JSON bodies: OpenAI chat/completions answers (and classifier answers, :mod:`.classifier`).

Buffered up to ``max_body_bytes`` and parsed once at ``finish``; over the cap, a best-effort scan of
the head and tail. ``mode`` "auto" decides OpenAI vs classifier by the document's shape.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lockgate.extproc.analyzers.base import (AnalyzerConfig, BodyAnalysis, BodyAnalyzer, _count, _decode_error,
                                             _json_decode, _json_error)
from lockgate.extproc.analyzers.classifier import classifier_analysis
from lockgate.extproc.analyzers.tokens import _choice0, _estimate_tokens, _LogprobAcc, _text_of, _tool_args_chars

# -- JSON (OpenAI non-streaming / classifier) --------------------------------

_TAIL_KEEP = 8192
_HEAD_SCAN = 4096
_MODEL_RE = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){0,256})"')
_FINISH_RE = re.compile(rb'"finish_reason"\s*:\s*"([A-Za-z0-9_\-]{1,64})"')
_COMPLETION_TOKENS_RE = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})\b')


class _JsonAnalyzer(BodyAnalyzer):
    """Buffers up to the cap, parses once at finish.

    ``mode``: "openai", "classifier" or "auto" (decide by shape).
    """

    def __init__(self, config: AnalyzerConfig, mode: str) -> None:
        super().__init__(config)
        self._mode = mode
        self.name = "json" if mode == "auto" else mode
        self._buf = bytearray()
        self._tail = bytearray()  # last bytes beyond the cap
        self._truncated = False

    def _feed(self, chunk: bytes) -> None:
        buf = self._buf
        room = self._cfg.max_body_bytes - len(buf)
        if len(chunk) <= room:
            buf += chunk
            return
        if room > 0:
            buf += chunk[:room]
            chunk = chunk[room:]
        self._truncated = True
        tail = self._tail
        tail += chunk[-_TAIL_KEEP:]
        if len(tail) > 2 * _TAIL_KEEP:
            del tail[:-_TAIL_KEEP]

    def _base(self, name: str, **kw: Any) -> BodyAnalysis:
        return BodyAnalysis(analyzer=name, body_bytes=self._bytes, truncated=self._truncated, **kw)

    def _finish(self, end_of_stream: bool) -> BodyAnalysis:
        if self._truncated:
            return self._finish_truncated()
        buf = self._buf
        if not buf:
            return self._base(self.name, parse_error="empty" if end_of_stream else "incomplete")
        try:
            text = buf.decode("utf-8")
        except UnicodeDecodeError:
            return self._base(self.name, parse_error=_decode_error(buf))
        if text[:1] == "\ufeff":
            text = text[1:]
        try:
            obj = _json_decode(text)
        except (ValueError, RecursionError) as exc:
            return self._base(self.name, parse_error=_json_error(text, exc, end_of_stream))
        mode = self._mode
        if mode == "auto":
            mode = _sniff_json_shape(obj)
            if mode is None:
                return self._base("json", parse_error="unrecognized_shape")
        if mode == "openai":
            return self._openai(obj)
        return classifier_analysis(obj, self._base)

    # .. OpenAI chat/completions ............................................
    def _openai(self, obj: Any) -> BodyAnalysis:
        cfg = self._cfg
        if not isinstance(obj, dict):
            return self._base("openai", parse_error="unrecognized_shape")
        model = obj.get("model")
        model = model if isinstance(model, str) and model else None
        choices = obj.get("choices")
        if not isinstance(choices, list):
            err = "error_response" if "error" in obj else "unrecognized_shape"
            return self._base("openai", parse_error=err, model_reported=model)
        usage = obj.get("usage")
        usage_tokens = _count(usage.get("completion_tokens")) if isinstance(usage, dict) else None
        c0 = _choice0(choices) if choices else None
        if not isinstance(c0, dict):
            # e.g. choices: [] (Azure prompt filtered): nothing generated.
            return self._base(
                "openai",
                model_reported=model,
                output_tokens=usage_tokens,
                parse_error=None if usage_tokens is not None else "unrecognized_shape",
            )
        refusal = False
        extra_chars = 0
        msg = c0.get("message")
        if isinstance(msg, dict):
            text = _text_of(msg.get("content"))
            r = msg.get("refusal")
            if isinstance(r, str) and r:
                refusal = True
                extra_chars += len(r)
            extra_chars += _tool_args_chars(msg.get("tool_calls"))
        else:
            text = _text_of(c0.get("text"))
        if text is None:
            text = ""
        fr = c0.get("finish_reason")
        fr = fr if isinstance(fr, str) and fr else None
        acc = _LogprobAcc()
        acc.add(c0.get("logprobs"))
        if not refusal:
            refusal = fr == "content_filter" or cfg.is_refusal_text(text)
        if usage_tokens is not None:
            tokens, est = usage_tokens, False
        else:
            tokens, est = _estimate_tokens(len(text) + extra_chars, acc.tokens, cfg), True
        return self._base(
            "openai",
            output_tokens=tokens,
            output_tokens_estimated=est,
            output_chars=len(text),
            finish_reason=fr,
            refusal=refusal,
            entropy=acc.mean(),
            model_reported=model,
        )

    def _finish_truncated(self) -> BodyAnalysis:
        """Body over the cap: best-effort regex scan of head and tail only."""
        if self._mode == "classifier":
            return self._base("classifier", parse_error="truncated")
        head = bytes(self._buf[:_HEAD_SCAN])
        region = bytes(self._buf[-_TAIL_KEEP:]) + bytes(self._tail[-_TAIL_KEEP:])
        is_openai = self._mode == "openai" or b'"choices"' in head
        if not is_openai:
            return self._base("json", parse_error="truncated")
        model = None
        m = _MODEL_RE.search(head)
        if m:
            try:
                model = json.loads(b'"' + m.group(1) + b'"') or None
            except (ValueError, RecursionError):
                model = None
        fr = None
        for m in _FINISH_RE.finditer(region):
            fr = m.group(1).decode("ascii")
        tokens = None
        for m in _COMPLETION_TOKENS_RE.finditer(region):
            tokens = int(m.group(1))
        return self._base(
            "openai",
            parse_error="truncated",
            output_tokens=tokens,
            finish_reason=fr,
            refusal=True if fr == "content_filter" else None,
            model_reported=model,
        )


def _sniff_json_shape(obj: Any) -> str | None:
    if isinstance(obj, dict):
        if "choices" in obj or "error" in obj:
            return "openai"
        o = obj.get("object")
        if isinstance(o, str) and (o.startswith("chat.completion") or o == "text_completion"):
            return "openai"
        if "probs" in obj or "label" in obj:
            return "classifier"
        return None
    if isinstance(obj, list) and obj:
        first = obj[0]
        if isinstance(first, list) and first:
            first = first[0]
        if isinstance(first, dict) and "label" in first:
            return "classifier"
    return None
