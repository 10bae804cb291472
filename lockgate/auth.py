"""Who is calling: named bearer tokens, checked the same way by every lockgate API.

A client (a person, a CI job, an Envoy, lockgate's own processes) is configured by name with the
sha256 of its token — the config never holds a token in clear text::

    auth:
      tokens:
        - {name: ci-deployer, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08}
        - {name: envoy, sha256_file: /etc/lockgate/envoy.token.sha256}
      token_file: /etc/lockgate/lockgate.token   # the token lockgate's own processes present
      insecure: false                             # allow off-loopback binds without tokens (loudly)

A caller sends ``authorization: Bearer <token>`` (HTTP header or gRPC metadata).
:meth:`TokenRegistry.authenticate` hashes what it got and compares it with every configured hash in
constant time; the *name* it returns is the actor recorded in the deployment log — never a field the
caller writes. With no tokens configured, lockgate only serves loopback (``insecure: true`` overrides).

Pure module: no I/O except reading the optional ``*_file`` paths at config load.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass, field

__all__ = ["AuthConfig", "ClientToken", "TokenRegistry", "hash_token", "is_loopback_host", "bearer",
           "TOKEN_ENV", "read_client_token"]

#: Environment variable the CLI (and any client) reads its token from.
TOKEN_ENV = "LOCKGATE_TOKEN"


def hash_token(token: str) -> str:
    """sha256 hex digest of a token (what the config stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer(token: str) -> str:
    """The ``authorization`` header value for a token."""
    return f"Bearer {token}"


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for 0.0.0.0, :: and every other address."""
    h = host.strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ClientToken:
    """One named client: ``name`` is what the deployment log records; ``sha256`` is of its token."""

    name: str
    sha256: str


@dataclass(frozen=True)
class AuthConfig:
    """The ``auth:`` section of lockgate.yaml (see the module docstring)."""

    tokens: tuple[ClientToken, ...] = ()
    #: the token lockgate's own processes present to each other (file holding it), or None
    token_file: str | None = None
    #: serve off-loopback without tokens (refused otherwise)
    insecure: bool = False
    #: optional mTLS for gRPC: PEM paths (server certificate, key, and the CA clients must present)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def registry(self) -> "TokenRegistry":
        return TokenRegistry(self.tokens)

    def own_token(self) -> str | None:
        """The token lockgate's processes present (``token_file``, else ``$LOCKGATE_TOKEN``), or None."""
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as f:
                return f.read().strip() or None
        return read_client_token()


@dataclass
class TokenRegistry:
    """Authenticates ``authorization`` values against the configured token hashes."""

    clients: tuple[ClientToken, ...] = ()
    _by_hash: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_hash = {c.sha256.lower(): c.name for c in self.clients}

    @property
    def enabled(self) -> bool:
        return bool(self._by_hash)

    def authenticate(self, authorization: str | None) -> str | None:
        """Client name for ``Bearer <token>``, or None (missing, malformed or unknown token).

        Every configured hash is compared (constant time each), so the time taken does not tell
        which client's hash was closest.
        """
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hash_token(token.strip())
        found = None
        for h, name in self._by_hash.items():
            if hmac.compare_digest(h, digest):
                found = name
        return found


def read_client_token() -> str | None:
    """A client's own token from ``$LOCKGATE_TOKEN`` (None if unset or empty)."""
    t = os.environ.get(TOKEN_ENV, "").strip()
    return t or None
