"""Which canary each model has now, as the xDS server holds it: read through the control API.

The evaluation worker replays a sample only while its model still has the canary it had when the
sample was mirrored. The desired weights live in the xDS server; the controller asks for them with
``GetWeights`` (:mod:`lockgate.control_client`) — never by opening the xDS server's database file, so
the controller may run on another host and the xDS store stays the xDS server's own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Awaitable, Callable

from lockgate import control_client
from lockgate.config import LockgateConfig, Model
from lockgate.control_client import AsyncControlClient

log = logging.getLogger("lockgate.controller.evaluate.canaries")

#: fetches ``{model: canary or None}`` from wherever the desired weights live (raises when it cannot)
CanaryFetch = Callable[[], Awaitable[dict[str, "str | None"]]]


def control_api_fetch(config: LockgateConfig, deadline_s: float = 2.0) -> CanaryFetch:
    """A :data:`CanaryFetch` over the control API's ``GetWeights`` (:mod:`lockgate.control_client`),
    presenting the controller's own token; the client is made on first use, on the loop that uses it."""
    client: AsyncControlClient | None = None

    async def fetch() -> dict[str, str | None]:
        nonlocal client
        if client is None:
            client = control_client.for_process(config, "controller")
        resp = await client.get_weights(deadline_s=deadline_s)
        return {m.model: (m.canary or None) for m in resp.models}

    async def close() -> None:
        if client is not None:
            await client.close()

    fetch.close = close  # type: ignore[attr-defined]
    return fetch


class DesiredCanaries:
    """The current canary of each model as the xDS server holds it (the control API's ``GetWeights``;
    never the xDS database file), re-fetched at most every ``ttl_s`` seconds, one fetch at a time.

    When a fetch fails (control API unreachable) the last known canaries stay and the failure is
    logged (warning once per outage); before any answer :meth:`canaries` is None (unknown), and the
    worker then trusts the mirror's canary header. A model absent from the answer has no canary."""

    def __init__(self, fetch: CanaryFetch, ttl_s: float = 1.0):
        self.fetch = fetch
        self.ttl_s = ttl_s
        self._known: dict[str, str | None] | None = None
        self._at = -math.inf  # monotonic time of the last fetch attempt
        self._failing = False
        self._lock: asyncio.Lock | None = None

    async def canaries(self) -> dict[str, str | None] | None:
        """``{model: canary}`` (None: never answered yet)."""
        if time.monotonic() - self._at < self.ttl_s:
            return self._known
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if time.monotonic() - self._at < self.ttl_s:  # another caller just fetched
                return self._known
            try:
                self._known = await self.fetch()
                if self._failing:
                    log.info("desired weights readable again from the control API")
                self._failing = False
            except Exception as exc:  # noqa: BLE001 - any failure: keep the last known value
                (log.debug if self._failing else log.warning)(
                    "cannot read desired weights from the control API (keeping the last known): %s", exc)
                self._failing = True
            self._at = time.monotonic()
        return self._known

    def invalidate(self) -> None:
        """Fetch again on the next call (e.g. after a weight change the caller knows of)."""
        self._at = -math.inf

    async def close(self) -> None:
        close = getattr(self.fetch, "close", None)
        if close is not None:
            await close()

    @staticmethod
    def canary_of(model: Model, canary: str | None) -> str | None:
        """``canary`` if it is a real canary of ``model`` (a configured version other than stable), else None."""
        return canary if canary and canary != model.stable and canary in model.versions else None


__all__ = ["CanaryFetch", "DesiredCanaries", "control_api_fetch"]
