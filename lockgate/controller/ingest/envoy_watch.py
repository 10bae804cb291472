"""Responses Envoy let through without lockgate seeing them, made visible.

When the ext_proc server answers later than ``extproc_message_timeout_ms`` (a starved or hung
process), Envoy — by design, ``failure_mode_allow`` — passes the response on and stops sending that
stream to ext_proc; the observation is then lost and ext_proc's own counters cannot know. Envoy
counts it (``http.lockgate.ext_proc.lockgate.message_timeouts`` / ``failure_mode_allowed``). This
controller task reads those counters from the local Envoy's admin endpoint (``admin`` in
lockgate.yaml) every few seconds, exports them on the controller's ``/metrics`` as
``lockgate_envoy_extproc_unobserved`` and logs a warning whenever they grow: observation loss is
counted, never silent.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge

if TYPE_CHECKING:
    from lockgate.config import Address

log = logging.getLogger("lockgate.controller.ingest.envoy_watch")
#: Envoy's counters of responses lockgate did not observe (exported as ``lockgate_envoy_extproc_unobserved``)
UNOBSERVED = ("http.lockgate.ext_proc.lockgate.message_timeouts", "http.lockgate.ext_proc.lockgate.failure_mode_allowed",
              "http.lockgate.ext_proc.lockgate.streams_failed")
#: every ext_proc stream Envoy opened (one per captured response): in ``capture.mode: observability``
#: Envoy never waits for the ext_proc, so a stream it drops is in none of the counters above; the gap
#: between this and the observations stored is the loss (exported as ``lockgate_envoy_extproc_streams_started``)
STARTED = "http.lockgate.ext_proc.lockgate.streams_started"
STATS = UNOBSERVED + (STARTED,)
INTERVAL_S = 5.0


def parse_stats(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name in STATS and value.strip().isdigit():
            out[name] = int(value)
    return out


def _read(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url, timeout=2) as r:
        return parse_stats(r.read().decode())


async def watch_envoy(admin: "Address | str", registry: CollectorRegistry, stop: asyncio.Event) -> None:
    """Controller task: read the ext_proc counters of the Envoy whose admin listens on ``admin`` every
    :data:`INTERVAL_S` until ``stop``; export them on ``registry``, warn when they grow."""
    gauge = Gauge("lockgate_envoy_extproc_unobserved", "Envoy ext_proc counters of responses lockgate did not "
                  "observe (message timeouts, failure-mode-allowed, failed streams), read from the local Envoy admin",
                  ["counter"], registry=registry)
    started = Gauge("lockgate_envoy_extproc_streams_started", "ext_proc streams the local Envoy opened to lockgate "
                    "(one per captured response); minus the observations stored, the responses not observed "
                    "(the only view of losses in capture.mode: observability)", registry=registry)
    url = f"http://{admin}/stats?filter=ext_proc.lockgate"
    loop = asyncio.get_running_loop()
    last: dict[str, int] = {}
    while not stop.is_set():
        try:
            stats = await loop.run_in_executor(None, _read, url)
        except OSError:
            stats = {}
        if STARTED in stats:
            started.set(stats.pop(STARTED))
        for name, value in stats.items():
            gauge.labels(name.rsplit(".", 1)[-1]).set(value)
            grew = value - last.get(name, value)
            if grew > 0:
                log.warning("Envoy %s: %d responses in the last %.0f s were not observed (%s grew to %d); the "
                            "ext_proc server is answering slower than extproc_message_timeout_ms", admin,
                            grew, INTERVAL_S, name.rsplit(".", 1)[-1], value)
            last[name] = value
        try:
            await asyncio.wait_for(stop.wait(), INTERVAL_S)
        except asyncio.TimeoutError:
            pass
