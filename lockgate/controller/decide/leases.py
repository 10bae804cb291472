"""One controller drives a model at a time: the model's lease in the rollout store (``leases``).

Every controller's promotion loop tries to take the lease of each active rollout's model
(:meth:`.rollouts.RolloutStore.acquire`); the one that holds it drives the rollout, the others only
watch. The holder renews it every ``LEASE_RENEW_S`` (:func:`keep_leases`, beside the loop, so a long
look never lets it lapse); another controller takes the model over once the lease is ``LEASE_TTL_S``
old, or at once when the holder was a process on the same host that is gone. The new driver starts at
the stored stage with the stored evidence (docs/operations.md, "High availability").
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

__all__ = ["LEASE_RENEW_S", "LEASE_TTL_S", "holds_lease", "keep_leases"]


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
