"""Opening lockgate's small SQLite stores the same way everywhere."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


def open_store(path: Path, schema: str = "", *, read_only: bool, what: str, private: bool = False,
               synchronous: str = "NORMAL", timeout_s: float = 30.0,
               before_schema: Callable[[sqlite3.Connection], None] | None = None) -> sqlite3.Connection:
    """Open one of lockgate's SQLite stores: the one way every store opens its file.

    The connection may be shared across threads (callers serialise with their own lock) and runs in
    autocommit mode (``isolation_level=None``; callers open transactions explicitly). ``timeout_s``:
    how long a statement waits for another writer's lock (seconds).

    ``read_only``: the file must exist (FileNotFoundError naming ``what`` otherwise) and is opened
    ``mode=ro`` with ``query_only``; ``schema`` is not applied. Otherwise the directory and file are
    created (``private``: the file is created 0600, for user data), WAL journaling is on with
    ``synchronous`` (``"NORMAL"``, or ``"FULL"`` for stores whose every commit must survive a power
    cut), ``before_schema(db)`` runs (migrations of an older file) and ``schema`` is applied.
    """
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
    if read_only:
        if not path.exists():
            raise FileNotFoundError(f"no {what} at {path}")
        return open_reader(path, timeout_s=timeout_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.chmod(path, 0o600)  # also a file an older version created world-readable (SQLite gives -wal/-shm its mode)
    db = sqlite3.connect(str(path), isolation_level=None, timeout=timeout_s, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    if before_schema is not None:
        before_schema(db)
    if schema:
        db.executescript(schema)
    return db


def open_reader(path: Path, *, timeout_s: float = 30.0, file_read_only: bool = True) -> sqlite3.Connection:
    """One more read connection to an existing store (``query_only``, autocommit, shareable across
    threads, ``timeout_s`` seconds waiting for a lock): for stores that keep a pool of readers beside
    their writer. ``file_read_only``: the file is opened ``mode=ro`` (a process that never writes it);
    otherwise normally (readers beside this process's own writer connection). The caller checks that
    the file exists (:func:`open_store` with ``read_only`` does).
    """
    if file_read_only:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=timeout_s,
                             check_same_thread=False)
    else:
        db = sqlite3.connect(str(path), isolation_level=None, timeout=timeout_s, check_same_thread=False)
    db.execute("PRAGMA query_only=1")
    return db


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` on an autocommit connection (``open_store``'s), ``ROLLBACK`` if the
    body raises. IMMEDIATE takes the write lock up front, so a read-then-write body cannot lose a race
    to another writer (it waits up to the connection's timeout instead). Callers serialise threads."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def window_where(*, model: str | None = None, since_ts: float | None = None, until_ts: float | None = None,
                 versions: Sequence[str] | None = None, prefix: str = "") -> tuple[list[str], list[Any]]:
    """The row filters lockgate's stores share, as WHERE clauses (the caller ANDs them, adding its
    own) and their parameters: ``model``; ``since_ts <= ts < until_ts`` (epoch seconds, None =
    unbounded); ``version IN versions`` (an empty list matches nothing). ``prefix``: a table alias
    with its dot, e.g. ``"o."``."""
    clauses: list[str] = []
    params: list[Any] = []
    if model is not None:
        clauses.append(f"{prefix}model = ?")
        params.append(model)
    if since_ts is not None:
        clauses.append(f"{prefix}ts >= ?")
        params.append(float(since_ts))
    if until_ts is not None:
        clauses.append(f"{prefix}ts < ?")
        params.append(float(until_ts))
    if versions is not None:
        versions = list(versions)
        clauses.append(f"{prefix}version IN ({','.join('?' * len(versions))})" if versions else "1 = 0")
        params.extend(versions)
    return clauses, params
