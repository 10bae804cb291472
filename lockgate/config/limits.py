"""``limits:`` — what one client request may cost Envoy (header size and count, header timeout, body size)."""

from __future__ import annotations

from dataclasses import dataclass

from lockgate.yamlconf import Fields


@dataclass(frozen=True)
class RequestLimits:
    """What one client request may cost Envoy (``limits:`` in lockgate.yaml; Envoy answers 431/413/408).

    ``max_request_headers_kb``: the request's headers together (Envoy's default 60);
    ``max_headers_count``: how many (Envoy's default 100); ``request_headers_timeout_s``: time to
    receive them (0 = none; slow-header clients are cut after it); ``max_request_body_bytes``: 0 = no
    limit (requests stream through); otherwise Envoy buffers each request body up to this size and
    answers 413 beyond it — fine for model APIs, whose requests are small JSON.
    """

    max_request_headers_kb: int = 60
    max_headers_count: int = 100
    request_headers_timeout_s: float = 10.0
    max_request_body_bytes: int = 0


def _limits(f: Fields) -> RequestLimits:
    d = RequestLimits()
    if "limits" not in f.data:
        f.raw("limits")
        return d
    sub = f.sub("limits")
    out = RequestLimits(
        max_request_headers_kb=sub.int("max_request_headers_kb", d.max_request_headers_kb, min=1, max=8192)
        or d.max_request_headers_kb,
        max_headers_count=sub.int("max_headers_count", d.max_headers_count, min=1, max=10000) or d.max_headers_count,
        request_headers_timeout_s=sub.float("request_headers_timeout_s", d.request_headers_timeout_s, min=0.0,
                                            max=3600.0) or 0.0,
        max_request_body_bytes=sub.int("max_request_body_bytes", d.max_request_body_bytes, min=0,
                                       max=4 * 1024**3 - 1) or 0)
    sub.finish()
    return out
