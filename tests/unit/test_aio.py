"""Tests for lockgate.aio: demote_helper_threads (Linux scheduling policy) and run_fast (uvloop)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from lockgate import aio


@pytest.fixture
def restore_thread_policies():
    """demote_helper_threads changes every other thread of the process: put them back afterwards."""
    before = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            before[int(tid)] = os.sched_getscheduler(int(tid))
        except OSError:
            pass
    yield
    for tid in os.listdir("/proc/self/task"):
        t = int(tid)
        try:
            if os.sched_getscheduler(t) != before.get(t, os.SCHED_OTHER):
                os.sched_setscheduler(t, before.get(t, os.SCHED_OTHER), os.sched_param(0))
        except OSError:  # ended meanwhile / not permitted
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "SCHED_BATCH"),
                    reason="SCHED_BATCH and /proc/self/task are Linux-only")
def test_demote_helper_threads_puts_other_threads_under_sched_batch(restore_thread_policies,
                                                                   monkeypatch):
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        pytest.skip("test process does not run under SCHED_OTHER")
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            assert os.sched_getscheduler(t.native_id) == os.SCHED_OTHER  # inherited from us

        changed = aio.demote_helper_threads()

        assert changed >= 2
        for t in threads:
            assert os.sched_getscheduler(t.native_id) == os.SCHED_BATCH
        assert os.sched_getscheduler(0) == os.SCHED_OTHER, "the calling thread was demoted"
        assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER

        # Second call: our threads are already SCHED_BATCH and are left alone (other threads
        # started meanwhile by the process, e.g. gRPC's, could still be changed).
        touched: list[int] = []
        real_set = os.sched_setscheduler

        def spy(tid, policy, param):
            touched.append(tid)
            return real_set(tid, policy, param)

        monkeypatch.setattr(os, "sched_setscheduler", spy)
        again = aio.demote_helper_threads()
        assert again == len(touched)
        assert not {t.native_id for t in threads} & set(touched)
        assert threading.get_native_id() not in touched
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)


def test_run_fast_returns_value_and_runs_on_uvloop():
    pytest.importorskip("uvloop")

    async def main():
        await asyncio.sleep(0)
        return 42, type(asyncio.get_running_loop()).__module__

    value, loop_module = aio.run_fast(main())
    assert value == 42
    assert loop_module.startswith("uvloop"), loop_module
