"""The common interface of the body analyzers: settings, result record, base class, shared helpers.

:class:`AnalyzerConfig` (built once per config), :class:`BodyAnalysis` (one response's result),
:class:`BodyAnalyzer` (the never-raise ``feed``/``finish`` wrappers every analyzer inherits), the
bytes-only analyzer, and the small JSON/media helpers the JSON and SSE analyzers share. The
measures and ``parse_error`` codes are described in :mod:`lockgate.extproc.analyzers`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Pattern

from lockgate.refusal import DEFAULT_REFUSAL_FAST, DEFAULT_REFUSAL_PATTERNS, compile_patterns, search_refusal

#: Values accepted for ``kind`` (``None`` and ``"auto"`` both mean auto-detect).
ANALYZER_KINDS = frozenset({"openai", "sse", "classifier", "none", "auto"})


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
            fast, rest = DEFAULT_REFUSAL_FAST, pats[n:]
        else:
            fast, rest = (), pats
        object.__setattr__(self, "_refusal_fast", fast)
        object.__setattr__(self, "_refusal_res", compile_patterns(rest))

    def is_refusal_text(self, text: str) -> bool:
        """True if a refusal pattern matches the first ``refusal_scan_chars``."""
        if not text:
            return False
        return search_refusal(text[: self.refusal_scan_chars], self._refusal_fast, self._refusal_res)


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
