"""One controller drives a model at a time: the model's lease in the rollout store (``leases``).

Every controller's promotion loop tries to take the lease of each active rollout's model
(:meth:`.rollouts.RolloutStore.acquire`); the one that holds it drives the rollout, the others only
watch. The holder renews it every ``LEASE_RENEW_S`` (:func:`keep_leases`, beside the loop, so a long
look never lets it lapse); another controller takes the model over once the lease is ``LEASE_TTL_S``
old, or at once when the holder was a process on the same host that is gone. The new driver starts at
the stored stage with the stored evidence (docs/operations.md, "High availability").

The same table holds the controller-wide duties that must run once per fleet, under names no model can
have (``~notifications``: delivering alerts and registry updates from the shared outbox, and the trouble
checks that raise alerts): :func:`once_leased` runs one only in the controller holding its lease.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

from lockgate.controller.decide.rollouts import RolloutStore

log = logging.getLogger("lockgate.controller.decide.leases")

LEASE_TTL_S = 5.0
LEASE_RENEW_S = 1.0

#: the lease of the notifier and trouble checks (``~`` is not allowed in a model name)
NOTIFICATIONS_LEASE = "~notifications"

__all__ = ["Driving", "LEASE_RENEW_S", "LEASE_TTL_S", "NOTIFICATIONS_LEASE", "holds_lease", "keep_leases",
           "once_leased"]


def holds_lease(rollouts: RolloutStore, model: str) -> bool:
    """Whether this controller holds ``model``'s lease now (read from the store; True when the store
    cannot be read: keep driving what was ours)."""
    try:
        owner = rollouts.lease_owner(model)
    except sqlite3.Error:
        return True
    return owner is not None and owner[0] == rollouts.owner and owner[1] > time.time()


async def keep_leases(rollouts: RolloutStore, stop: asyncio.Event, every_s: float = LEASE_RENEW_S) -> None:
    """Renew the leases this controller holds every ``every_s`` until ``stop``."""
    while not stop.is_set():
        try:
            for rollout in rollouts.active():
                owner = rollouts.lease_owner(rollout.model)
                if owner is not None and owner[0] == rollouts.owner:
                    rollouts.acquire(rollout.model, LEASE_TTL_S)
        except sqlite3.Error as exc:
            log.error("leases not renewed: %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass


async def once_leased(rollouts: RolloutStore, name: str, run, stop: asyncio.Event) -> None:
    """``run(stop)`` in this controller only once it holds lease ``name`` (free, run out, or its holder on this
    host gone), renewing it meanwhile: of two controllers, one delivers the alerts. ``run`` is not stopped if the
    lease is lost later (a notifier cannot be restarted): after a freeze longer than the lease both may run."""
    while not stop.is_set():
        try:
            if rollouts.acquire(name, LEASE_TTL_S):
                break
        except sqlite3.Error as exc:
            log.error("lease %s: %s", name, exc)
        try:
            await asyncio.wait_for(stop.wait(), LEASE_RENEW_S)
        except asyncio.TimeoutError:
            pass
    if stop.is_set():
        return
    log.info("%s: this controller holds the lease", name)

    async def renew() -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), LEASE_RENEW_S)
            except asyncio.TimeoutError:
                pass
            try:
                if not rollouts.acquire(name, LEASE_TTL_S):
                    log.error("%s: another controller took the lease (this one was too slow to renew it)", name)
            except sqlite3.Error as exc:
                log.error("lease %s not renewed: %s", name, exc)

    renewer = asyncio.ensure_future(renew())
    try:
        await run(stop)
    finally:
        renewer.cancel()


class Driving:
    """Which active rollouts this controller drives and which another controller drives, as the promotion loop
    last found (:meth:`mine` / :meth:`theirs`). A controller that drives none while another drives some is the
    **standby**: its collector refuses observations (:meth:`standby_reason`), so every ext_proc sends them to the
    driving controller, whose incremental evidence folds them (the standby's would not reach it)."""

    def __init__(self) -> None:
        self.own: set[int] = set()
        self.others: set[int] = set()

    def theirs(self, rollout_id: int) -> None:
        self.own.discard(rollout_id)
        self.others.add(rollout_id)

    def mine(self, rollout_id: int) -> bool:
        """Record that this controller drives it; True when another one did until now (a takeover)."""
        self.own.add(rollout_id)
        if rollout_id in self.others:
            self.others.discard(rollout_id)
            return True
        return False

    def retain(self, rollout_ids) -> None:
        keep = set(rollout_ids)
        self.own &= keep
        self.others &= keep

    def standby_reason(self) -> str | None:
        """None when this controller takes observations; else why not (the collector answers UNAVAILABLE)."""
        if self.others and not self.own:
            return (f"standby controller: another controller drives rollout(s) "
                    f"{', '.join(f'#{i}' for i in sorted(self.others))}; its observations API takes them")
        return None
