"""``controller:`` — the controller process's addresses, observation retention and evaluation concurrency, and
the Prometheus that Prometheus-sourced rollout metrics read (``controller.prometheus``, :mod:`.prometheus`)."""

from __future__ import annotations

from dataclasses import dataclass

from lockgate.config.common import Address, _host_port
from lockgate.config.prometheus import PrometheusConfig, _prometheus
from lockgate.yamlconf import Fields


@dataclass(frozen=True)
class ControllerConfig:
    """The controller process (``lockgate controller``): observation collector (gRPC, ``address``),
    feedback + metrics HTTP API (``http``), and how long observations are kept. ``sampler`` receives
    the requests Envoy mirrors for evaluation (listened on only when a model has ``evaluation``);
    ``evaluation_concurrency`` bounds the replays (and judge calls) in flight."""

    address: Address = Address("127.0.0.1", 18020)
    http: Address = Address("127.0.0.1", 18021)
    retention_days: float = 30.0
    prune_interval_s: float = 3600.0
    sampler: Address = Address("127.0.0.1", 18022)
    evaluation_concurrency: int = 2
    #: ``controller.prometheus``: the Prometheus HTTP API of rollout metrics with a ``prometheus:`` block
    prometheus: PrometheusConfig | None = None


def _controller(f: Fields) -> ControllerConfig:
    d = ControllerConfig()
    if "controller" not in f.data:
        f.raw("controller")
        return d
    sub = f.sub("controller")
    address = _host_port(sub, "address", d.address)
    http = _host_port(sub, "http", d.http)
    retention = sub.float("retention_days", d.retention_days, min=0.0001, max=36500.0)
    prune = sub.float("prune_interval_s", d.prune_interval_s, min=0.1, max=86400.0)
    sampler = _host_port(sub, "sampler", d.sampler)
    concurrency = sub.int("evaluation_concurrency", d.evaluation_concurrency, min=1, max=64)
    prometheus = _prometheus(sub)
    sub.finish()
    return ControllerConfig(address, http, d.retention_days if retention is None else retention,
                            d.prune_interval_s if prune is None else prune, sampler,
                            concurrency or d.evaluation_concurrency, prometheus)
