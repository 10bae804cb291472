"""Small asyncio helpers shared by lockgate's servers."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")


def stop_on_signals(stop: asyncio.Event) -> asyncio.Event:
    """Set ``stop`` on SIGTERM or SIGINT (where the loop supports signal handlers); returns it."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / not supported
            pass
    return stop


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop's event loop (falls back to asyncio's when uvloop is not installed).

    Used by the ext_proc server, whose every captured response is two gRPC messages: with grpcio
    1.85 the same server spends ~1.4x less CPU per message on uvloop (bench/capture.py)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main)
    return uvloop.run(main)


def demote_helper_threads() -> int:
    """Put every thread of this process except the calling one under ``SCHED_BATCH`` (Linux).

    grpcio's asyncio server hands each completion from its own threads (a completion-queue poller
    and the event-engine pool) to the event loop; as SCHED_OTHER threads each wake-up preempts the
    loop, ~10 preemptions per ext_proc response measured. SCHED_BATCH threads keep their fair CPU
    share but do not preempt on wake-up: they run when the loop waits, which is when it would take
    their work anyway. Measured on the 2-core bench machine (bench/capture.py): ~24 → ~4 context
    switches per captured response. Returns how many threads were changed; 0 where unsupported."""
    sched_batch = getattr(os, "SCHED_BATCH", None)
    if sched_batch is None or not os.path.isdir("/proc/self/task"):
        return 0
    me = threading.get_native_id()
    changed = 0
    for tid in os.listdir("/proc/self/task"):
        t = int(tid)
        if t == me:
            continue
        try:
            if os.sched_getscheduler(t) != sched_batch:
                os.sched_setscheduler(t, sched_batch, os.sched_param(0))
                changed += 1
        except OSError:  # the thread ended meanwhile, or not permitted
            pass
    return changed


async def keep_helper_threads_demoted(interval_s: float = 5.0) -> None:
    """Run :func:`demote_helper_threads` now and every ``interval_s`` (gRPC starts threads lazily)."""
    while True:
        demote_helper_threads()
        await asyncio.sleep(interval_s)
