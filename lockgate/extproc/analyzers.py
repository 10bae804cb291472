"""Pure, incremental response-body analyzers for the ext_proc hot path.

One analyzer instance is created per HTTP response with :func:`make_analyzer`;
the ext_proc server calls :meth:`BodyAnalyzer.feed` for every body chunk as it
streams past (chunks may be split anywhere: mid UTF-8 sequence, mid JSON,
mid SSE line, mid ``\\r\\n``) and :meth:`BodyAnalyzer.finish` once at the end.
The result is a :class:`BodyAnalysis`, a flat JSON-serialisable record.

Design rules
------------
* No I/O, no globals mutated, no threads: everything is per-instance state.
* ``feed`` is cheap.  JSON bodies are buffered (up to
  ``AnalyzerConfig.max_body_bytes``) and parsed exactly once, at ``finish``.
  SSE bodies are parsed incrementally, one event at a time, as lines complete;
  each byte is looked at a constant number of times (O(total bytes)).
* ``feed``/``finish`` never raise (unless ``AnalyzerConfig.strict`` is set,
  which the unit tests use so that bugs are not hidden).  An internal error
  yields ``parse_error="analyzer_error"`` with an exact ``body_bytes``.
* Unknown is ``None``, never ``0``.

Measures
--------
``output_tokens``
    ``usage.completion_tokens`` when the server reports it
    (``output_tokens_estimated=False``).  Otherwise an estimate
    (``output_tokens_estimated=True``): the number of per-token ``logprobs``
    entries when the response carries them, else
    ``ceil(chars / AnalyzerConfig.chars_per_token)`` (default 4 chars/token,
    the usual rule of thumb for English BPE vocabularies) over the text
    content plus refusal text plus tool-call arguments.
``entropy``
    Mean, over generated token positions that carry ``top_logprobs``, of the
    Shannon entropy (nats) of the top-k alternatives renormalised to sum to 1.
    The probability mass outside the top-k is unknown and dropped, so this is
    an approximation that in practice under-estimates the true entropy (a
    lower-bound-style signal); compare it only across responses produced with
    the same ``top_logprobs`` k.
``refusal``
    ``finish_reason == "content_filter"`` OR a non-empty ``message.refusal``
    (``delta.refusal`` when streaming) OR one of
    ``AnalyzerConfig.refusal_patterns`` (case-insensitive) matches within the
    first ``AnalyzerConfig.refusal_scan_chars`` characters of the content.
``events``
    Number of dispatched SSE events carrying data, the ``[DONE]`` sentinel
    included.  ``None`` for non-SSE analyzers.

``parse_error`` values
----------------------
``compressed``          non-identity Content-Encoding; bytes counted only.
``empty``               JSON analyzer received a 0-byte body.
``malformed_json``      JSON body (or an SSE event's data) is not valid JSON.
``cut_off``             end of stream reached but the document/stream is
                        incomplete (JSON ends mid-document; SSE stream ends
                        without ``[DONE]`` and without any ``finish_reason``).
``incomplete``          like ``cut_off`` but ``finish(end_of_stream=False)``
                        was called: observation stopped early (e.g. client
                        reset), so the model is not to blame.
``not_utf8``            body/event is not valid UTF-8.
``binary``              body is not UTF-8 and contains NUL bytes.
``truncated``           JSON body exceeded ``max_body_bytes``; only a
                        best-effort scan of the head/tail was possible.
``unrecognized_shape``  valid JSON, but not the expected (or any known) shape.
``invalid_probs``       classifier probabilities negative / non-finite.
``error_response``      OpenAI-style ``{"error": {...}}`` JSON body.
``error_event``         an SSE event carried an ``"error"`` object.
``unknown_kind``        ``make_analyzer`` got an unknown ``kind``.
``analyzer_error``      internal bug caught defensively.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Pattern

__all__ = [
    "ANALYZER_KINDS",
    "AnalyzerConfig",
    "BodyAnalysis",
    "BodyAnalyzer",
    "DEFAULT_CONFIG",
    "DEFAULT_REFUSAL_PATTERNS",
    "make_analyzer",
    "token_entropy",
]

#: Values accepted for ``kind`` (``None`` and ``"auto"`` both mean auto-detect).
ANALYZER_KINDS = frozenset({"openai", "sse", "classifier", "none", "auto"})

_APOS = "['\u2019]"  # straight or typographic apostrophe
_CANT = rf"(?:can(?:not|{_APOS}t| not)|won{_APOS}t|will not)"

#: Default refusal phrases (regex, matched case-insensitively against the
#: first ``refusal_scan_chars`` characters of the content).  Deliberately
#: conservative: phrased as a refusal of the *request*, so that e.g.
#: "I can't help but notice" does not match.
DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    rf"\bI(?:{_APOS}m| am) sorry,? but I(?: (?:can|won|will not|am (?:not able|unable))|{_APOS}m (?:not able|unable))",
    rf"\bI {_CANT} (?:help|assist)(?: you)? with\b",
    rf"\bI {_CANT} (?:assist|comply|fulfill|fulfil|help) (?:you |with )?(?:that|this|your)\b",
    rf"\bI {_CANT} (?:assist|comply)\b",
    rf"\bI {_CANT} provide (?:that|this|any|help|assistance|information on)\b",
    rf"\bI(?:{_APOS}m| am) (?:unable|not able) to (?:help|assist|comply|fulfill|fulfil|provide)\b",
    rf"\bI(?:{_APOS}m| am) not (?:allowed|permitted) to\b",
    r"\bI must (?:respectfully )?(?:decline|refuse)\b",
    rf"\bAs an AI(?: language model)?,? I {_CANT}\b",
)


# Hand-optimised equivalent of DEFAULT_REFUSAL_PATTERNS, matched against the
# *lowercased* scan window without IGNORECASE.  Every branch but one starts
# with a literal ("i" / "as"; word boundaries are checked by a lookbehind
# *after* it), which lets the regex engine skip ahead with a fast literal
# scan instead of trying a 9-way case-insensitive alternation at every
# position (~20x faster on typical text; equivalence is property-tested
# in tests/unit/test_analyzers_properties.py).
_DEFAULT_REFUSAL_FAST: tuple[Pattern[str], ...] = (
    re.compile(
        rf"i(?<!\wi)(?:"
        rf"(?:{_APOS}m| am) (?:"
        rf"sorry,? but i(?: (?:can|won|will not|am (?:not able|unable))|{_APOS}m (?:not able|unable))"
        rf"|(?:unable|not able) to (?:help|assist|comply|fulfill|fulfil|provide)\b"
        rf"|not (?:allowed|permitted) to\b)"
        rf"| {_CANT} (?:"
        rf"(?:help|assist)(?: you)? with\b"
        rf"|(?:assist|comply|fulfill|fulfil|help) (?:you |with )?(?:that|this|your)\b"
        rf"|(?:assist|comply)\b"
        rf"|provide (?:that|this|any|help|assistance|information on)\b)"
        rf"| must (?:respectfully )?(?:decline|refuse)\b)"
    ),
    re.compile(rf"as(?<!\was) an ai(?: language model)?,? i {_CANT}\b"),
)


def _compile_patterns(patterns: tuple[str, ...]) -> tuple[Pattern[str], ...]:
    if not patterns:
        return ()
    try:  # one combined alternation: a single pass over the text
        return (re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE),)
    except re.error:
        # e.g. a pattern with inline global flags cannot be embedded; fall back
        # to one regex per pattern (invalid patterns raise here, at config time).
        return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


@dataclass(frozen=True)
class AnalyzerConfig:
    """Analyzer settings.  Build once (per route/rollout), share freely.

    Refusal patterns are compiled once, here; an invalid regex raises
    ``re.error`` at construction time (config load), never on the hot path.
    Pass ``refusal_patterns=DEFAULT_REFUSAL_PATTERNS + (...)`` to extend the
    defaults, or any iterable of regexes to replace them.
    """

    max_body_bytes: int = 1 << 20
    refusal_patterns: tuple[str, ...] = DEFAULT_REFUSAL_PATTERNS
    refusal_scan_chars: int = 2000
    chars_per_token: float = 4.0
    #: Re-raise internal errors instead of reporting ``analyzer_error``
    #: (tests/debugging only; never enable on the response path).
    strict: bool = False
    _refusal_res: tuple[Pattern[str], ...] = field(
        init=False, repr=False, compare=False, hash=False, default=()
    )
    _refusal_fast: tuple[Pattern[str], ...] = field(
        init=False, repr=False, compare=False, hash=False, default=()
    )

    def __post_init__(self) -> None:
        pats = self.refusal_patterns
        if isinstance(pats, str):
            pats = (pats,)
        pats = tuple(pats)
        object.__setattr__(self, "refusal_patterns", pats)
        if self.max_body_bytes < 0:
            raise ValueError("max_body_bytes must be >= 0")
        if self.refusal_scan_chars < 0:
            raise ValueError("refusal_scan_chars must be >= 0")
        if not self.chars_per_token > 0:
            raise ValueError("chars_per_token must be > 0")
        n = len(DEFAULT_REFUSAL_PATTERNS)
        if pats[:n] == DEFAULT_REFUSAL_PATTERNS:  # defaults (possibly extended)
            fast, rest = _DEFAULT_REFUSAL_FAST, pats[n:]
        else:
            fast, rest = (), pats
        object.__setattr__(self, "_refusal_fast", fast)
        object.__setattr__(self, "_refusal_res", _compile_patterns(rest))

    def is_refusal_text(self, text: str) -> bool:
        """True if a refusal pattern matches the first ``refusal_scan_chars``."""
        if not text:
            return False
        head = text[: self.refusal_scan_chars]
        if self._refusal_fast:
            low = head.lower()
            if not low.isascii():
                # IGNORECASE treats dotless "ı" and dotted "İ" (lowercased to
                # "i" + U+0307) like "i"; mirror that for exact equivalence.
                low = low.replace("\u0131", "i").replace("i\u0307", "i")
            for rx in self._refusal_fast:
                if rx.search(low):
                    return True
        for rx in self._refusal_res:
            if rx.search(head):
                return True
        return False


DEFAULT_CONFIG = AnalyzerConfig()


@dataclass(frozen=True, slots=True)
class BodyAnalysis:
    """What one response body told us.  ``None`` = not measured.

    ``analyzer`` is the analyzer that produced the record: ``"openai"``
    (chat/completions JSON), ``"sse"``, ``"classifier"``, ``"json"`` (auto
    mode, JSON of no known shape / unparsable) or ``"none"`` (bytes only,
    including compressed bodies).  See the module docstring for the meaning
    of each measure and of the ``parse_error`` codes.
    """

    analyzer: str
    body_bytes: int
    truncated: bool = False
    parse_error: str | None = None
    output_tokens: int | None = None
    output_tokens_estimated: bool = False
    output_chars: int | None = None
    finish_reason: str | None = None
    refusal: bool | None = None
    entropy: float | None = None
    predicted_class: str | None = None
    confidence: float | None = None
    class_entropy: float | None = None
    model_reported: str | None = None
    events: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _ANALYSIS_FIELDS}


_ANALYSIS_FIELDS = tuple(f.name for f in fields(BodyAnalysis))

# ---------------------------------------------------------------------------
# small pure helpers
# ---------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    """A finite float from an int/float JSON value (bools rejected)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        v = float(x)
    except (OverflowError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _count(x: Any) -> int | None:
    """A non-negative int token count (bools rejected, integral floats ok)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x if x >= 0 else None
    if isinstance(x, float) and math.isfinite(x) and x >= 0 and x == int(x):
        return int(x)
    return None


def token_entropy(logprobs: Iterable[Any]) -> float | None:
    """Entropy (nats) of the distribution given by ``logprobs`` renormalised.

    Non-numeric / NaN entries are ignored; ``-inf`` contributes nothing.
    Returns ``None`` when no usable entry remains.
    """
    lps = []
    for lp in logprobs:
        if isinstance(lp, bool) or not isinstance(lp, (int, float)):
            continue
        lp = float(lp)
        if lp != lp or lp == math.inf:  # NaN / +inf: garbage
            continue
        lps.append(lp)
    if not lps:
        return None
    m = max(lps)
    if m == -math.inf:
        return None
    z = 0.0
    s = 0.0
    for lp in lps:
        d = lp - m  # <= 0
        p = math.exp(d)
        z += p
        s += p * d
    h = math.log(z) - s / z
    return h if h > 0.0 else 0.0


def _position_entropy_chat(entry: Any) -> float | None:
    """Chat-style logprobs.content[i] -> entropy of its top_logprobs."""
    if not isinstance(entry, dict):
        return None
    tops = entry.get("top_logprobs")
    if not isinstance(tops, list) or not tops:
        return None
    return token_entropy(t.get("logprob") for t in tops if isinstance(t, dict))


def _position_entropy_completions(entry: Any) -> float | None:
    """Completions-style logprobs.top_logprobs[i] ({token: logprob})."""
    if not isinstance(entry, dict) or not entry:
        return None
    return token_entropy(entry.values())


class _LogprobAcc:
    """Running mean token entropy + number of logprob'd token positions."""

    __slots__ = ("h_sum", "h_n", "tokens")

    def __init__(self) -> None:
        self.h_sum = 0.0
        self.h_n = 0
        self.tokens = 0

    def add(self, lp: Any) -> None:
        if not isinstance(lp, dict):
            return
        content = lp.get("content")
        if isinstance(content, list):
            self.tokens += len(content)
            for entry in content:
                h = _position_entropy_chat(entry)
                if h is not None:
                    self.h_sum += h
                    self.h_n += 1
            return
        tops = lp.get("top_logprobs")
        if isinstance(tops, list):
            toks = lp.get("tokens")
            self.tokens += len(toks) if isinstance(toks, list) else len(tops)
            for entry in tops:
                h = _position_entropy_completions(entry)
                if h is not None:
                    self.h_sum += h
                    self.h_n += 1

    def mean(self) -> float | None:
        return self.h_sum / self.h_n if self.h_n else None


def _text_of(content: Any) -> str | None:
    """Message content as text: a string, or a list of ``{"text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
        return "".join(parts)
    return None


def _tool_args_chars(tool_calls: Any) -> int:
    n = 0
    if isinstance(tool_calls, list):
        for tc in tool_calls:
            if isinstance(tc, dict):
                fn = tc.get("function")
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    n += len(fn["arguments"])
    return n


def _choice0(choices: list) -> Any:
    """The choice with index 0 (streams with n>1 interleave indices)."""
    c = choices[0]
    if isinstance(c, dict):
        idx = c.get("index")
        if idx is None or idx == 0:
            return c
        for c2 in choices:
            if isinstance(c2, dict) and c2.get("index") == 0:
                return c2
        return None
    return None


def _estimate_tokens(chars: int, lp_tokens: int, cfg: AnalyzerConfig) -> int:
    if lp_tokens > 0:
        return lp_tokens
    return math.ceil(chars / cfg.chars_per_token)


def _media_type(content_type: str | None) -> str:
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def _is_json_media(mt: str) -> bool:
    return mt == "application/json" or mt.endswith("+json") or mt == "text/json"


_BOM = b"\xef\xbb\xbf"
# json.loads(str) minus the wrapper overhead; a stateless, shared decoder.
_json_decode = json.JSONDecoder().decode


def _decode_error(buf: bytes | bytearray) -> str:
    return "binary" if b"\x00" in buf else "not_utf8"


def _json_error(text: str, exc: ValueError | RecursionError, end_of_stream: bool) -> str:
    """Tell a document that merely ended early from a malformed one."""
    if isinstance(exc, json.JSONDecodeError):
        ended_early = exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip())
        if ended_early and text.strip():
            return "cut_off" if end_of_stream else "incomplete"
    return "malformed_json" if end_of_stream else "incomplete"


# ---------------------------------------------------------------------------
# analyzers
# ---------------------------------------------------------------------------


class BodyAnalyzer:
    """Base class: byte counting and the never-raise wrappers.

    Subclasses implement ``_feed(chunk)`` and ``_finish(end_of_stream)``.
    ``finish`` is idempotent (the first result is cached); chunks fed after
    ``finish`` are ignored.
    """

    name = "none"

    def __init__(self, config: AnalyzerConfig) -> None:
        self._cfg = config
        self._bytes = 0
        self._failed = False
        self._result: BodyAnalysis | None = None

    @property
    def body_bytes(self) -> int:
        return self._bytes

    def feed(self, chunk: bytes) -> None:
        if self._result is not None:
            return
        try:
            self._bytes += len(chunk)
            if not self._failed and chunk:
                self._feed(chunk if isinstance(chunk, bytes) else bytes(chunk))
        except Exception:
            if self._cfg.strict:
                raise
            self._failed = True

    def finish(self, end_of_stream: bool = True) -> BodyAnalysis:
        if self._result is not None:
            return self._result
        try:
            if self._failed:
                res = self._error_result("analyzer_error")
            else:
                res = self._finish(bool(end_of_stream))
        except Exception:
            if self._cfg.strict:
                raise
            res = self._error_result("analyzer_error")
        self._result = res
        return res

    # -- to override ------------------------------------------------------
    def _feed(self, chunk: bytes) -> None:  # pragma: no cover - trivial
        pass

    def _finish(self, end_of_stream: bool) -> BodyAnalysis:
        return BodyAnalysis(analyzer=self.name, body_bytes=self._bytes)

    def _error_result(self, err: str) -> BodyAnalysis:
        return BodyAnalysis(analyzer=self.name, body_bytes=self._bytes, parse_error=err)


class _BytesOnlyAnalyzer(BodyAnalyzer):
    """Counts bytes; optionally reports a fixed parse_error (compressed...)."""

    name = "none"

    def __init__(self, config: AnalyzerConfig, parse_error: str | None = None) -> None:
        super().__init__(config)
        self._pe = parse_error

    def feed(self, chunk: bytes) -> None:  # hot path: skip the wrapper
        if self._result is None:
            try:
                self._bytes += len(chunk)
            except Exception:
                if self._cfg.strict:
                    raise

    def _finish(self, end_of_stream: bool) -> BodyAnalysis:
        return BodyAnalysis(analyzer=self.name, body_bytes=self._bytes, parse_error=self._pe)


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
        return self._classifier(obj)

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

    # .. classifier ...........................................................
    def _classifier(self, obj: Any) -> BodyAnalysis:
        model = None
        pairs: list[tuple[str, float]] | None = None
        label: str | None = None
        score: float | None = None
        if isinstance(obj, list):
            items = obj[0] if obj and isinstance(obj[0], list) else obj
            pairs = []
            for d in items:
                if isinstance(d, dict) and "label" in d:
                    s = _num(d.get("score"))
                    if s is not None:
                        pairs.append((str(d["label"]), s))
            if not pairs:
                return self._base("classifier", parse_error="unrecognized_shape")
        elif isinstance(obj, dict):
            m = obj.get("model")
            model = m if isinstance(m, str) and m else None
            if obj.get("label") is not None:
                label = str(obj["label"])
                score = _num(obj.get("score"))
            probs = obj.get("probs")
            if isinstance(probs, dict):
                pairs = [(str(k), v) for k, v in probs.items()]
            elif isinstance(probs, list):
                labels = obj.get("labels")
                if isinstance(labels, list) and len(labels) == len(probs):
                    pairs = [(str(k), v) for k, v in zip(labels, probs)]
                else:
                    pairs = [(str(i), v) for i, v in enumerate(probs)]
            if pairs is not None:
                cleaned = []
                for k, v in pairs:
                    f = _num(v)
                    if f is None or f < 0:
                        return self._base("classifier", parse_error="invalid_probs", model_reported=model)
                    cleaned.append((k, f))
                pairs = cleaned
                total = sum(v for _, v in pairs)
                if not pairs or total <= 0 or not math.isfinite(total):
                    return self._base("classifier", parse_error="invalid_probs", model_reported=model)
                pairs = [(k, v / total) for k, v in pairs]
            elif label is None:
                return self._base("classifier", parse_error="unrecognized_shape", model_reported=model)
        else:
            return self._base("classifier", parse_error="unrecognized_shape")

        if pairs:
            best_label, best = pairs[0]
            for k, v in pairs:
                if v > best:
                    best_label, best = k, v
            ent = _entropy_of(v for _, v in pairs) if len(pairs) >= 2 else None
            if label is None:
                label, score = best_label, best
            elif score is None:
                score = dict(pairs).get(label, best)
        else:
            ent = None
        return self._base(
            "classifier",
            predicted_class=label,
            confidence=score,
            class_entropy=ent,
            model_reported=model,
        )


def _entropy_of(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v > 0]
    z = sum(vals)
    if z <= 0 or not math.isfinite(z):
        return None
    h = 0.0
    for v in vals:
        p = v / z
        h -= p * math.log(p)
    return h if h > 0.0 else 0.0


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


# ---------------------------------------------------------------------------
# factory
# ---------------------------------------------------------------------------


def make_analyzer(
    kind: str | None,
    content_type: str | None,
    content_encoding: str | None,
    config: AnalyzerConfig | None = None,
) -> BodyAnalyzer:
    """Pick the analyzer for one response.  Never raises.

    * non-identity ``content_encoding`` -> bytes only, ``parse_error="compressed"``.
    * ``kind=None``/``"auto"``: ``text/event-stream`` -> SSE; JSON media types
      (``application/json``, ``*+json``) -> OpenAI vs classifier decided by
      shape at finish; anything else -> bytes only.
    * ``"openai"``: SSE if the content type is ``text/event-stream`` (a
      ``stream: true`` request), else OpenAI JSON.
    * ``"sse"`` / ``"classifier"`` / ``"none"``: forced, whatever the type.
    * unknown kind -> bytes only with ``parse_error="unknown_kind"``.
    """
    cfg = config if config is not None else DEFAULT_CONFIG
    try:
        if content_encoding:
            enc = content_encoding.strip().lower()
            if enc and enc != "identity":
                return _BytesOnlyAnalyzer(cfg, "compressed")
        k = kind.strip().lower() if kind else "auto"
        mt = _media_type(content_type)
        if k == "auto":
            if mt == "text/event-stream":
                return _SseAnalyzer(cfg)
            if _is_json_media(mt):
                return _JsonAnalyzer(cfg, "auto")
            return _BytesOnlyAnalyzer(cfg)
        if k == "openai":
            if mt == "text/event-stream":
                return _SseAnalyzer(cfg)
            return _JsonAnalyzer(cfg, "openai")
        if k == "sse":
            return _SseAnalyzer(cfg)
        if k == "classifier":
            return _JsonAnalyzer(cfg, "classifier")
        if k == "none":
            return _BytesOnlyAnalyzer(cfg)
        return _BytesOnlyAnalyzer(cfg, "unknown_kind")
    except Exception:
        if cfg.strict:
            raise
        return _BytesOnlyAnalyzer(cfg, "analyzer_error")
