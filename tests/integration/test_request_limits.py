"""Envoy's request limits from lockgate.yaml (``limits:``), through the real Envoy: headers beyond
``max_request_headers_kb`` (or more than ``max_headers_count``) are refused (431, or over HTTP/1.1 the
connection closed as a protocol error), a body beyond ``max_request_body_bytes`` gets 413, and requests
within the limits reach the model as before."""

from __future__ import annotations

import pytest

from tests.harness import Fleet, requires_envoy, start_echo

pytestmark = [requires_envoy, pytest.mark.envoy]


def refused(fleet, headers) -> bool:
    """Envoy did not pass the request on: 431, or the connection closed without an answer."""
    try:
        return fleet.client().request("/", headers).status == 431
    except (ConnectionError, OSError):
        return True


def test_header_and_body_limits(tmp_path):
    echo, port = start_echo("v1", tmp_path)
    models = [{"name": "m", "match": {"path_prefix": "/"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{port}"]}}}]
    limits = {"max_request_headers_kb": 8, "max_headers_count": 40, "max_request_body_bytes": 4096}
    try:
        with Fleet(tmp_path, models, extra={"limits": limits}) as fleet:
            c = fleet.client()
            assert c.request("/", {"x-user-id": "u1"}).status == 200
            assert c.request("/", {"x-user-id": "u1"}, "POST", b"x" * 4000).status == 200
            assert fleet.client().request("/", {"x-user-id": "u1"}, "POST", b"x" * 5000).status == 413
            before = fleet.stat(0, "http.lockgate.downstream_cx_protocol_error") or 0
            assert refused(fleet, {"x-user-id": "u1", "x-big": "y" * 9000})
            assert refused(fleet, {"x-user-id": "u1", **{f"x-h{i}": "1" for i in range(60)}})
            # Envoy 1.40 over HTTP/1.1 closes such a connection as a protocol error (no answer is sent)
            assert (fleet.stat(0, "http.lockgate.downstream_cx_protocol_error") or 0) >= before + 2
            assert fleet.client().request("/", {"x-user-id": "u1"}).status == 200  # and still serving
    finally:
        echo.stop()
