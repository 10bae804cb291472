"""Streaming bodies: OpenAI-style ``text/event-stream`` chunk streams, parsed incrementally."""

from __future__ import annotations

from lockgate.extproc.analyzers.base import AnalyzerConfig, BodyAnalysis, BodyAnalyzer, _count, _json_decode
from lockgate.extproc.analyzers.tokens import _choice0, _estimate_tokens, _LogprobAcc, _text_of, _tool_args_chars

# -- SSE (OpenAI streaming) -------------------------------------------------


class _SseAnalyzer(BodyAnalyzer):
    """Incremental ``text/event-stream`` parser for OpenAI-style chunk streams.

    Lines are split on ``\\r\\n``, ``\\n`` or ``\\r`` (a ``\\r`` at a chunk
    end followed by ``\\n`` at the next chunk start is one terminator).  Only
    the unterminated tail of a chunk is carried over, so every byte is
    scanned O(1) times.  ``data:`` lines accumulate (multi-line data joined by
    ``\\n``), a blank line dispatches the event, ``:`` lines are comments,
    ``event:``/``id:``/``retry:`` are accepted (the event type is ignored,
    errors are detected by an ``"error"`` key in the payload).

    Past ``max_body_bytes`` parsing stops (events completed before the cap
    are kept) and ``truncated=True``; bytes keep being counted.

    At ``finish(end_of_stream=True)`` an unterminated last line / event is
    processed leniently (servers sometimes omit the final blank line).  A
    stream without ``[DONE]`` and without any ``finish_reason`` is
    ``cut_off`` -- provided it looked like an OpenAI stream (some chunk had
    ``choices``/``usage``) or had no event at all; other SSE dialects only get
    ``events`` and bytes.
    """

    name = "sse"

    def __init__(self, config: AnalyzerConfig) -> None:
        super().__init__(config)
        self._room = config.max_body_bytes
        self._truncated = False
        self._partial: list[bytes] = []  # pieces of the current unterminated line
        self._skip_lf = False
        self._data: list[bytes] = []
        self._events = 0
        self._done = False
        self._openai = False
        self._error_event = False
        self._event_err: str | None = None
        self._model: str | None = None
        self._finish_reason: str | None = None
        self._usage_tokens: int | None = None
        self._chars = 0
        self._extra_chars = 0
        self._refusal_field = False
        self._prefix: list[str] = []
        self._prefix_len = 0
        self._lp = _LogprobAcc()

    # .. byte -> line ........................................................
    def _feed(self, chunk: bytes) -> None:
        if self._truncated:
            return
        if len(chunk) > self._room:
            chunk = chunk[: self._room]
            self._truncated = True
        self._room -= len(chunk)
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if not chunk:
            return
        lines = chunk.splitlines(True)
        last = lines[-1]
        end = last[-1:]
        carry = None
        if end != b"\n" and end != b"\r":
            carry = lines.pop()
        elif end == b"\r":
            self._skip_lf = True
        partial = self._partial
        on_line = self._line
        for line in lines:
            if partial:
                partial.append(line)
                line = b"".join(partial)
                partial.clear()
            if line[-2:] == b"\r\n":
                line = line[:-2]
            else:
                line = line[:-1]
            on_line(line)
        if carry is not None:
            partial.append(carry)

    def _line(self, line: bytes) -> None:
        if line[:6] == b"data: ":
            self._data.append(line[6:])
            return
        if not line:
            if self._data:
                self._dispatch()
            return
        if line[:1] == b":":
            return  # comment / keep-alive
        i = line.find(b":")
        if i < 0:
            fname, value = line, b""
        else:
            fname, value = line[:i], line[i + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if fname == b"data":
            self._data.append(value)
        # event:/id:/retry:/unknown fields: nothing to measure

    # .. event -> measures ...................................................
    def _dispatch(self) -> None:
        data = self._data
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        self._data = []
        self._events += 1
        if payload == b"[DONE]" or (len(payload) < 32 and payload.strip() == b"[DONE]"):
            self._done = True
            return
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            self._event_err = self._event_err or "not_utf8"
            return
        try:
            obj = _json_decode(text)
        except (ValueError, RecursionError):
            self._event_err = self._event_err or "malformed_json"
            return
        if isinstance(obj, dict):
            self._chunk(obj)

    def _add_text(self, s: str) -> None:
        self._chars += len(s)
        if self._prefix_len < self._cfg.refusal_scan_chars:
            self._prefix.append(s)
            self._prefix_len += len(s)

    def _chunk(self, obj: dict) -> None:
        if self._model is None:
            m = obj.get("model")
            if isinstance(m, str) and m:
                self._model = m
        if obj.get("error") is not None:
            self._error_event = True
        choices = obj.get("choices")
        if isinstance(choices, list):
            self._openai = True
            c = _choice0(choices) if choices else None
            if isinstance(c, dict):
                delta = c.get("delta")
                if delta is None:
                    delta = c.get("message")  # some servers stream full messages
                if isinstance(delta, dict):
                    content = delta.get("content")
                    if isinstance(content, str):
                        if content:
                            self._add_text(content)
                    elif content is not None:
                        t = _text_of(content)
                        if t:
                            self._add_text(t)
                    r = delta.get("refusal")
                    if isinstance(r, str) and r:
                        self._refusal_field = True
                        self._extra_chars += len(r)
                    tcs = delta.get("tool_calls")
                    if tcs:
                        self._extra_chars += _tool_args_chars(tcs)
                else:
                    t = c.get("text")  # completions stream
                    if isinstance(t, str) and t:
                        self._add_text(t)
                fr = c.get("finish_reason")
                if isinstance(fr, str) and fr:
                    self._finish_reason = fr
                lp = c.get("logprobs")
                if lp:
                    self._lp.add(lp)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._openai = True
            n = _count(usage.get("completion_tokens"))
            if n is not None:
                self._usage_tokens = n

    def _finish(self, end_of_stream: bool) -> BodyAnalysis:
        if end_of_stream and not self._truncated:
            if self._partial:
                line = b"".join(self._partial)
                self._partial.clear()
                self._line(line)
            if self._data:
                self._dispatch()
        cfg = self._cfg
        if self._error_event:
            pe: str | None = "error_event"
        elif (
            not self._truncated
            and not self._done
            and self._finish_reason is None
            and (self._openai or self._events == 0)
        ):
            pe = "cut_off" if end_of_stream else "incomplete"
        else:
            pe = self._event_err
        if not self._openai:
            return BodyAnalysis(
                analyzer="sse",
                body_bytes=self._bytes,
                truncated=self._truncated,
                parse_error=pe,
                model_reported=self._model,
                events=self._events,
            )
        fr = self._finish_reason
        refusal = self._refusal_field or fr == "content_filter"
        if not refusal and self._prefix:
            refusal = cfg.is_refusal_text("".join(self._prefix))
        if self._usage_tokens is not None:
            tokens, est = self._usage_tokens, False
        else:
            tokens = _estimate_tokens(self._chars + self._extra_chars, self._lp.tokens, cfg)
            est = True
        return BodyAnalysis(
            analyzer="sse",
            body_bytes=self._bytes,
            truncated=self._truncated,
            parse_error=pe,
            output_tokens=tokens,
            output_tokens_estimated=est,
            output_chars=self._chars,
            finish_reason=fr,
            refusal=refusal,
            entropy=self._lp.mean(),
            model_reported=self._model,
            events=self._events,
        )
