"""OpenAI response shapes: message text, tool-call arguments, the index-0 choice, per-token
entropy from ``logprobs``, and the output-token estimate when the server reports no usage.

Shared by the JSON (:mod:`.json_body`) and SSE (:mod:`.sse`) analyzers; pure functions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from lockgate.extproc.analyzers.base import AnalyzerConfig

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


def _entropy_of(values: Iterable[float]) -> float | None:
    """Shannon entropy (nats) of non-negative weights ``values`` renormalised; None when they sum to 0."""
    vals = [v for v in values if v > 0]
    z = sum(vals)
    if z <= 0 or not math.isfinite(z):
        return None
    h = 0.0
    for v in vals:
        p = v / z
        h -= p * math.log(p)
    return h if h > 0.0 else 0.0
