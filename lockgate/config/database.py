"""``database:`` — where lockgate keeps its state (one line).

Absent: SQLite files in ``state_dir`` (the embedded default). ``postgresql://user@host:port/dbname``:
every store (weights, rollouts and the deployment log, outbox, observations, response samples,
evaluations) lives in that PostgreSQL database instead, one schema per store (see
:mod:`lockgate.database`). The password never goes into the config file: libpq reads it from
``PGPASSWORD`` or a ``PGPASSFILE`` (default ``~/.pgpass``); other libpq parameters
(``?sslmode=verify-full&connect_timeout=5``) may follow the database name.
"""

from __future__ import annotations

import urllib.parse

from lockgate.yamlconf import Fields

SCHEMES = ("postgresql", "postgres")


def _database(f: Fields) -> str | None:
    """The ``database`` URL, or None for SQLite; a problem is reported on the field (the URL shown
    without any password)."""
    url = f.str("database")
    if url is None:
        return None
    path = f.path + ("database",)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as exc:
        f.errors.add(path, f"is not a valid URL ({exc})")
        return None
    if parts.scheme not in SCHEMES:
        shown = url.split("://", 1)[0] + "://…" if "://" in url else repr(url)
        f.errors.add(path, f"must be a postgresql://user@host:port/dbname URL (absent: SQLite files in state_dir), "
                           f"got {shown}")
        return None
    if parts.password is not None:
        f.errors.add(path, "must not contain a password: put it in PGPASSWORD or a PGPASSFILE (~/.pgpass), "
                           "which PostgreSQL's client reads")
        return None
    if not parts.hostname:
        f.errors.add(path, "needs a host: postgresql://user@host:port/dbname")
        return None
    if not parts.path.strip("/"):
        f.errors.add(path, "needs a database name: postgresql://user@host:port/dbname")
        return None
    return url
