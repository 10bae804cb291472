"""``controller.prometheus:`` — the Prometheus HTTP API that rollout metrics with a ``prometheus:`` block read.

Example::

    controller:
      prometheus:
        url: http://prometheus.internal:9090     # or url_env: PROMETHEUS_URL
        timeout_s: 2                             # per query; a slower answer holds the gate (never promotes)
        refresh_s: 5                             # at most one round of queries per rollout this often

A metric of a rollout spec may name its own ``prometheus.url`` (then it needs none here); without either,
``lockgate validate -c lockgate.yaml`` reports the metric with its file and line.
"""

from __future__ import annotations

from dataclasses import dataclass

from lockgate.config.common import _url
from lockgate.yamlconf import Fields

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_REFRESH_S = 5.0


@dataclass(frozen=True)
class PrometheusConfig:
    """Where Prometheus-sourced metrics are read: ``url`` (the server's base URL, the API is under
    ``/api/v1/``), the per-query ``timeout_s`` and ``refresh_s`` (the least time between two rounds of
    queries for one rollout: the controller's data-triggered looks in between reuse the last answer)."""

    url: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    refresh_s: float = DEFAULT_REFRESH_S


def _prometheus(f: Fields) -> PrometheusConfig | None:
    """The ``prometheus`` mapping of ``controller:`` (None when absent)."""
    if "prometheus" not in f.data or f.data.get("prometheus") is None:
        f.raw("prometheus")
        return None
    sub = f.sub("prometheus")
    url = _url(sub, required=True)
    timeout = sub.float("timeout_s", DEFAULT_TIMEOUT_S, min=0.05, max=60.0)
    refresh = sub.float("refresh_s", DEFAULT_REFRESH_S, min=0.0, max=3600.0)
    sub.finish()
    if url is None:
        return None
    return PrometheusConfig(url.rstrip("/"), DEFAULT_TIMEOUT_S if timeout is None else timeout,
                            DEFAULT_REFRESH_S if refresh is None else refresh)


__all__ = ["DEFAULT_REFRESH_S", "DEFAULT_TIMEOUT_S", "PrometheusConfig"]
