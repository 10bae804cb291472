"""Pseudonymous user ids for observations.

Which key Envoy used for a request (the sticky-key policy) is part of the routing contract,
:func:`lockgate.routing.extract_key`; this module only turns that raw key into the hashed id an
observation carries, so per-user statistics never see the raw id.
"""

from __future__ import annotations

import hashlib


def hash_key(raw_key: str, secret: bytes) -> str:
    """Pseudonymous user id for observations: 16 hex chars of keyed BLAKE2b. Never the raw key."""
    return hashlib.blake2b(raw_key.encode("utf-8", "surrogateescape"), key=secret[:64], digest_size=8).hexdigest()
