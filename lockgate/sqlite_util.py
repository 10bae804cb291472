"""Opening lockgate's small SQLite stores the same way everywhere."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any, Sequence


def open_store(path: Path, schema: str, *, read_only: bool, what: str, private: bool = False) -> sqlite3.Connection:
    """A connection shared across threads (callers serialise with their own lock).

    ``read_only``: the file must exist (FileNotFoundError naming ``what`` otherwise) and is opened
    ``mode=ro`` with ``query_only``. Otherwise the directory and file are created (``private``: the
    file is created 0600, for user data), WAL journaling is on and ``schema`` is applied.
    """
    if read_only:
        if not path.exists():
            raise FileNotFoundError(f"no {what} at {path}")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=30,
                             check_same_thread=False)
        db.execute("PRAGMA query_only=1")
        return db
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.chmod(path, 0o600)  # also a file an older version created world-readable (SQLite gives -wal/-shm its mode)
    db = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    return db


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
        clauses.append(f"{prefix}version IN ({','.join('?' * len(versions))})" if versions else "0")
        params.extend(versions)
    return clauses, params
