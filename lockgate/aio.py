"""Small asyncio helpers shared by lockgate's servers."""

from __future__ import annotations

import asyncio
import signal


def stop_on_signals(stop: asyncio.Event) -> asyncio.Event:
    """Set ``stop`` on SIGTERM or SIGINT (where the loop supports signal handlers); returns it."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / not supported
            pass
    return stop
