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

Modules (one per concern): :mod:`.base` (config, result record, base class, shared helpers),
:mod:`.tokens` (OpenAI shapes, entropy, token estimate), :mod:`.json_body` (OpenAI JSON),
:mod:`.classifier` (classifier JSON), :mod:`.sse` (streams); the refusal phrases are in
:mod:`lockgate.refusal`. This package's names are the public interface.
"""

from __future__ import annotations

from lockgate.extproc.analyzers.base import (ANALYZER_KINDS, DEFAULT_CONFIG, AnalyzerConfig, BodyAnalysis,
                                             BodyAnalyzer, _BytesOnlyAnalyzer, _is_json_media, _media_type)
from lockgate.extproc.analyzers.json_body import _JsonAnalyzer
from lockgate.extproc.analyzers.sse import _SseAnalyzer
from lockgate.extproc.analyzers.tokens import token_entropy
from lockgate.refusal import DEFAULT_REFUSAL_PATTERNS

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
