"""Controller leases on one rollout store (SQLite and PostgreSQL): one holder at a time, renewed beside the loop,
taken over when they run out; the notifier runs only in the controller holding ``~notifications``."""

from __future__ import annotations

import asyncio
import time

import pytest

from lockgate.controller.decide import leases
from lockgate.controller.decide.rollouts import RolloutStore
from tests.pg import pg_server, pg_url, where  # noqa: F401  (fixtures)


def two_stores(where):
    a = RolloutStore(where("rollouts.db"))
    b = RolloutStore(where("rollouts.db"))
    b.owner = "another-host:4242"  # as a controller on another machine: its process cannot be checked from here
    a.owner = "first-host:4141"
    return a, b


def test_one_holder_until_the_lease_runs_out(where):
    a, b = two_stores(where)
    now = time.time()
    assert a.acquire("chat", 5.0, now=now)
    assert not b.acquire("chat", 5.0, now=now + 1)       # held
    assert a.acquire("chat", 5.0, now=now + 4)           # renewed by its holder
    assert not b.acquire("chat", 5.0, now=now + 8)       # still held (renewed at +4)
    assert b.acquire("chat", 5.0, now=now + 9.5)         # run out: taken over
    assert b.lease_owner("chat")[0] == "another-host:4242"
    a.close()
    b.close()


def test_the_notifier_runs_only_where_the_lease_is(where, monkeypatch):
    monkeypatch.setattr(leases, "LEASE_TTL_S", 0.6)
    monkeypatch.setattr(leases, "LEASE_RENEW_S", 0.1)

    async def run():
        a, b = two_stores(where)
        ran: list[str] = []

        def duty(name):
            async def go(stop: asyncio.Event) -> None:
                ran.append(name)
                await stop.wait()
            return go

        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        ta = asyncio.ensure_future(leases.once_leased(a, leases.NOTIFICATIONS_LEASE, duty("a"), stop_a))
        await asyncio.sleep(0.3)
        tb = asyncio.ensure_future(leases.once_leased(b, leases.NOTIFICATIONS_LEASE, duty("b"), stop_b))
        await asyncio.sleep(1.0)  # a renews every 0.1 s: b keeps waiting
        assert ran == ["a"]
        stop_a.set()              # a stops (its renewals with it); b takes over when the lease runs out
        await ta
        for _ in range(50):
            if ran == ["a", "b"]:
                break
            await asyncio.sleep(0.05)
        assert ran == ["a", "b"]
        assert b.lease_owner(leases.NOTIFICATIONS_LEASE)[0] == b.owner
        stop_b.set()
        await tb
        a.close()
        b.close()

    asyncio.run(run())


@pytest.mark.parametrize("engine", ["sqlite"])
def test_holds_lease_reads_the_store(tmp_path, engine):
    a = RolloutStore(tmp_path / "rollouts.db")
    assert not leases.holds_lease(a, "chat")
    a.acquire("chat", 5.0)
    assert leases.holds_lease(a, "chat")
    a.acquire("chat", -1.0)  # expired
    assert not leases.holds_lease(a, "chat")
    a.close()
