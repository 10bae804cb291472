"""``envoy:`` — how ``lockgate up`` sizes Envoy on this host, and the ext_proc processes that follow from it.

``concurrency`` is Envoy's worker threads (``--concurrency``); the default is the host's cores (the CPUs
this process may run on, ``os.sched_getaffinity``, so a ``taskset`` or a cgroup cpuset is honoured).
When ``extproc_processes`` is not set, :func:`extproc_processes_for` derives it from ``concurrency``:
one ext_proc process per :data:`WORKERS_PER_EXTPROC` Envoy workers, at most :data:`MAX_DERIVED_EXTPROC`
(measured in ``bench/capture.py``, part ``workers``; docs/operations.md "Envoy and ext_proc sizing").
An explicit ``extproc_processes`` always wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lockgate.config.common import Address
from lockgate.yamlconf import Fields

#: bounds of ``envoy.concurrency`` (Envoy itself accepts more; 256 workers is beyond any host lockgate serves)
MIN_CONCURRENCY = 1
MAX_CONCURRENCY = 256
#: Envoy workers per ext_proc process when ``extproc_processes`` is not set
WORKERS_PER_EXTPROC = 2
#: the most ext_proc processes derived from ``concurrency`` (each takes two ports, extproc.port + i and
#: extproc_metrics.port + i; the default ports leave room for 10); set ``extproc_processes`` for more
MAX_DERIVED_EXTPROC = 8


def host_cores() -> int:
    """CPUs this process may run on (its affinity set), else ``os.cpu_count()``, within the allowed bounds."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    return max(MIN_CONCURRENCY, min(MAX_CONCURRENCY, n))


def extproc_processes_for(concurrency: int) -> int:
    """ext_proc processes for an Envoy with ``concurrency`` workers, when ``extproc_processes`` is not set:
    ceil(concurrency / WORKERS_PER_EXTPROC), between 1 and MAX_DERIVED_EXTPROC."""
    return max(1, min(MAX_DERIVED_EXTPROC, -(-concurrency // WORKERS_PER_EXTPROC)))


def derive_extproc_processes(concurrency: int, extproc: Address, extproc_metrics: Address,
                             others: list[Address]) -> tuple[int, str]:
    """``extproc_processes`` when it is not set: :func:`extproc_processes_for`, fewer if process i's ports
    (``extproc.port + i``, ``extproc_metrics.port + i``) would reach another lockgate address — a config
    that was valid with one process stays valid on a bigger host. Returns (processes, how it was derived)."""
    want = extproc_processes_for(concurrency)
    taken = {a.port for a in others}
    n = 1
    while n < want:
        ep = {extproc.port + i for i in range(n + 1)}
        mp = {extproc_metrics.port + i for i in range(n + 1)}
        if ep & mp or (ep | mp) & taken:
            break
        n += 1
    rule = f"one per {WORKERS_PER_EXTPROC} Envoy workers"
    if -(-concurrency // WORKERS_PER_EXTPROC) > MAX_DERIVED_EXTPROC:
        rule += f", at most {MAX_DERIVED_EXTPROC} unless extproc_processes is set"
    if n < want:
        return n, (f"{rule} would be {want}; {n} fit{'s' if n == 1 else ''} before the next lockgate port "
                   f"(extproc.port {extproc.port}, extproc_metrics.port {extproc_metrics.port}): "
                   f"set extproc_processes or move the ports")
    return n, rule


@dataclass(frozen=True)
class EnvoyConfig:
    """``envoy:`` in lockgate.yaml. ``concurrency``: Envoy's worker threads; ``from_host``: True when
    it was not set and follows the host's cores (``lockgate up`` and ``check-config`` say which)."""

    concurrency: int = 1
    from_host: bool = False
    #: how ``extproc_processes`` was derived from ``concurrency``; empty when it was set explicitly
    extproc_rule: str = ""

    def describe(self, extproc_processes: int) -> str:
        """E.g. ``2 worker threads (the host's cores), 1 ext_proc process (one per 2 Envoy workers)``."""
        source = "the host's cores" if self.from_host else "envoy.concurrency"
        n = extproc_processes
        return (f"{self.concurrency} worker thread{'s' if self.concurrency != 1 else ''} ({source}), "
                f"{n} ext_proc process{'es' if n != 1 else ''} ({self.extproc_rule or 'extproc_processes'})")


def _envoy(f: Fields) -> EnvoyConfig:
    if "envoy" not in f.data:
        f.raw("envoy")
        return EnvoyConfig(host_cores(), from_host=True)
    sub = f.sub("envoy")
    concurrency = sub.int("concurrency", None, min=MIN_CONCURRENCY, max=MAX_CONCURRENCY)
    sub.finish()
    if concurrency is None:  # not set (or invalid: the problem is recorded and nothing starts)
        return EnvoyConfig(host_cores(), from_host=True)
    return EnvoyConfig(concurrency, from_host=False)
