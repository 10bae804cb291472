"""Where lockgate's state lives: SQLite files (the embedded default) or one PostgreSQL database.

Every store (weights, rollouts and the deployment log, outbox, observations, response samples,
evaluations) opens its connection here and writes its SQL once, in the subset both engines share,
with ``?`` placeholders:

* upserts and duplicates: ``INSERT … ON CONFLICT(col) DO UPDATE SET … = excluded.…`` /
  ``ON CONFLICT DO NOTHING`` (never ``INSERT OR IGNORE/REPLACE``); new ids: ``RETURNING id``
  (never ``lastrowid``); ``IS DISTINCT FROM``, not ``IS NOT`` between values; ``COALESCE``, not
  ``IFNULL``; no scalar ``MAX(a, b)``; no bare ``WHERE 1`` / ``0`` (``1 = 1``); a comparison selected
  as a value is a boolean on PostgreSQL (``bool()`` it); ``rowid`` only on tables without an ``id``.
  (SQLite ≥ 3.39.)
* transactions: :func:`write_transaction` — SQLite ``BEGIN IMMEDIATE`` (the file's one write lock);
  PostgreSQL a transaction that first takes an advisory lock named after the store, so a
  read-then-write body is serialised exactly as on SQLite, across processes and machines.

On PostgreSQL each store keeps its tables in its own schema of the one database, named after its
SQLite file (``rollouts.db`` → schema ``rollouts``), so table names never clash. The connection
(:class:`PgConnection`) has the small part of :class:`sqlite3.Connection` the stores use
(``execute``, ``executemany``, ``executescript``, ``close``, ``with db:``) and adapts each
statement: ``?`` → ``%s``, ``REAL`` → ``DOUBLE PRECISION``, ``INTEGER`` → ``BIGINT``,
``INTEGER PRIMARY KEY AUTOINCREMENT`` → an identity column, ``BLOB`` → ``BYTEA``; a table without
an ``id`` column gets SQLite's implicit ``rowid`` as an identity column. Its errors are raised as
:mod:`sqlite3`'s exception classes (:class:`PgError` and two subclasses), so a caller catches one
family, ``sqlite3.Error``, whatever the engine; a connection the server dropped is reopened on the
next statement (the failed statement raises; callers already retry).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
import urllib.parse
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from lockgate import sqlite_util
from lockgate.sqlite_util import window_where

__all__ = ["Connection", "PgConnection", "PgError", "Postgres", "Where", "columns", "exists", "insert_new", "locate",
           "open_reader", "open_store", "redact", "set_durable", "sibling", "window_where", "write_transaction"]


@dataclass(frozen=True)
class Postgres:
    """A store in PostgreSQL: the database ``url`` (``postgresql://user@host:port/dbname``; the
    password comes from ``PGPASSWORD`` or ``PGPASSFILE``, never from lockgate's config) and the
    store's own ``schema``."""

    url: str
    schema: str

    def __str__(self) -> str:
        return f"{redact(self.url)} (schema {self.schema})"


#: where one store lives: its SQLite file, or its schema in PostgreSQL
Where = Path | Postgres


def locate(state_dir: Path, filename: str, database_url: str | None) -> Where:
    """The store kept in ``<state_dir>/<filename>`` on SQLite; with ``database_url`` its schema there
    (the file name without ``.db``, e.g. ``rollouts``)."""
    if database_url is None:
        return Path(state_dir) / filename
    return Postgres(database_url, re.sub(r"[^a-z0-9_]", "_", Path(filename).stem.lower()))


def exists(where: Where) -> bool:
    """Whether the store was ever created (its file, or its schema)."""
    if isinstance(where, Postgres):
        try:
            open_store(where, read_only=True, what="store").close()
        except FileNotFoundError:
            return False
        return True
    return Path(where).exists()


def sibling(where: Where, filename: str) -> Where:
    """Another store beside ``where``: the file next to it, or its schema in the same database."""
    if isinstance(where, Postgres):
        return locate(Path("."), filename, where.url)
    return Path(where).parent / filename


def redact(url: str) -> str:
    """``url`` without a password (for messages and logs)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


# ---------------------------------------------------------------- the shared API (dispatch)

def open_store(where: Where, schema: str = "", *, read_only: bool, what: str, private: bool = False,
               synchronous: str = "NORMAL", timeout_s: float = 30.0,
               before_schema: Callable[[Any], None] | None = None) -> "Connection":
    """Open one store (see :func:`lockgate.sqlite_util.open_store` for the SQLite arguments).

    On PostgreSQL: ``read_only`` needs the store's schema to exist (FileNotFoundError naming ``what``
    otherwise) and opens a read-only session; otherwise the schema and ``schema``'s tables are created
    (under the store's advisory lock, so two processes starting at once do not collide) after
    ``before_schema(db)``. ``synchronous="OFF"`` turns ``synchronous_commit`` off for the session;
    ``private`` is the database's own access control."""
    if isinstance(where, Postgres):
        db = PgConnection(where, read_only=read_only, timeout_s=timeout_s)
        try:
            if read_only:
                if not db.schema_exists():
                    raise FileNotFoundError(f"no {what} at {where}")
            else:
                if synchronous == "OFF":
                    db.execute("SET synchronous_commit = off")
                with db.transaction():
                    db.execute(f'CREATE SCHEMA IF NOT EXISTS "{where.schema}"')
                    if before_schema is not None:
                        before_schema(db)
                    if schema:
                        db.executescript(schema)
        except BaseException:
            db.close()
            raise
        return db
    return sqlite_util.open_store(where, schema, read_only=read_only, what=what, private=private,
                                  synchronous=synchronous, timeout_s=timeout_s, before_schema=before_schema)


def open_reader(where: Where, *, timeout_s: float = 30.0, file_read_only: bool = True) -> "Connection":
    """One more read connection to an existing store (see :func:`lockgate.sqlite_util.open_reader`)."""
    if isinstance(where, Postgres):
        return PgConnection(where, read_only=True, timeout_s=timeout_s)
    return sqlite_util.open_reader(where, timeout_s=timeout_s, file_read_only=file_read_only)


def write_transaction(db: "Connection") -> contextlib.AbstractContextManager:
    """A write transaction that a read-then-write body cannot lose to another writer: SQLite
    ``BEGIN IMMEDIATE``; PostgreSQL a transaction holding the store's advisory lock. Rolled back if
    the body raises."""
    if isinstance(db, PgConnection):
        return db.transaction()
    return sqlite_util.write_transaction(db)


def insert_new(db: "Connection", table: str, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """``INSERT INTO table(names) … ON CONFLICT DO NOTHING`` of many rows, inside the caller's transaction:
    SQLite ``executemany``; PostgreSQL ``COPY`` into a session staging table, then one ``INSERT … SELECT``
    (1.2–1.6× the rows per second of psycopg's pipelined ``executemany``: bench/store_throughput.py)."""
    if isinstance(db, PgConnection):
        db.copy_insert_new(table, names, rows)
        return
    db.executemany(f"INSERT INTO {table}({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
                   "ON CONFLICT DO NOTHING", rows)


def columns(db: "Connection", table: str) -> set[str]:
    """The column names of ``table`` (empty when it does not exist)."""
    if isinstance(db, PgConnection):
        return {r[0] for r in db.execute("SELECT column_name FROM information_schema.columns "
                                         "WHERE table_schema = current_schema() AND table_name = ?", (table,))}
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def set_durable(db: "Connection", durable: bool, sqlite_durable: str = "FULL", sqlite_fast: str = "NORMAL") -> None:
    """Whether each commit waits for the disk: SQLite ``synchronous``, PostgreSQL ``synchronous_commit``."""
    if isinstance(db, PgConnection):
        db.execute(f"SET synchronous_commit = {'on' if durable else 'off'}")
    else:
        db.execute(f"PRAGMA synchronous={sqlite_durable if durable else sqlite_fast}")


# ---------------------------------------------------------------- PostgreSQL

class PgError(sqlite3.DatabaseError):
    """An error PostgreSQL (or the way to it) reported; chained to psycopg's exception."""


class PgIntegrityError(PgError, sqlite3.IntegrityError):
    """A constraint PostgreSQL enforced (unique, check, not null, foreign key)."""


class PgOperationalError(PgError, sqlite3.OperationalError):
    """The server is unreachable, went away, timed out or refused the session."""


def _pg_error(exc: Exception) -> PgError:
    import psycopg

    cls = (PgIntegrityError if isinstance(exc, psycopg.IntegrityError) else
           PgOperationalError if isinstance(exc, (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction))
           else PgError)
    return cls(f"PostgreSQL: {exc}".strip())


@lru_cache(maxsize=1024)
def adapt_sql(sql: str) -> str:
    """One statement in the shared subset → PostgreSQL: placeholders and SQLite's type names."""
    return _adapt_types(sql.replace("%", "%%").replace("?", "%s"))


def _adapt_types(sql: str) -> str:
    sql = re.sub(r"\bINTEGER\s+PRIMARY\s+KEY(\s+AUTOINCREMENT)?\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                 sql, flags=re.I)
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql, flags=re.I)
    sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql, flags=re.I)
    return re.sub(r"\bBLOB\b", "BYTEA", sql, flags=re.I)


def adapt_schema(script: str) -> list[str]:
    """A schema script → PostgreSQL statements: :func:`adapt_sql`'s types (``INTEGER PRIMARY KEY``, SQLite's
    rowid alias, becomes an identity column too), ``--`` comments dropped, ``WITHOUT ROWID`` dropped, a
    column without a type (SQLite's dynamic typing; alone on its line) becomes ``TEXT``, and every other
    table without an ``id`` column gets SQLite's implicit ``rowid`` as an identity column."""
    out = []
    for statement in re.sub(r"--[^\n]*", "", script).split(";"):
        if not statement.strip():
            continue
        if re.match(r"\s*CREATE TABLE", statement, flags=re.I):
            statement = re.sub(r"(?m)^(\s*)(\w+)\s*,\s*$", r"\1\2 TEXT,", statement)
            without_rowid = re.search(r"\)\s*WITHOUT\s+ROWID\s*$", statement, flags=re.I)
            if without_rowid:
                statement = statement[:without_rowid.start()] + ")"
            elif not re.search(r"[(,]\s*id\s+INTEGER\b", statement, flags=re.I):
                statement = statement.replace("(", "(rowid INTEGER GENERATED BY DEFAULT AS IDENTITY, ", 1)
        out.append(_adapt_types(statement))
    return out


#: libpq parameters lockgate sets unless the ``database`` URL does: dead-peer detection
LIBPQ_DEFAULTS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
                  "tcp_user_timeout": 10_000}


class PgConnection:
    """A PostgreSQL session with the part of :class:`sqlite3.Connection` lockgate's stores use.

    Autocommit, like the stores' SQLite connections; :meth:`transaction` (and ``with db:``) opens one.
    Shareable across threads as a SQLite connection is (callers serialise with their own lock)."""

    engine = "postgresql"

    def __init__(self, where: Postgres, *, read_only: bool, timeout_s: float):
        self.where = where
        self.read_only = read_only
        self.timeout_s = timeout_s
        self._lock_key = zlib.crc32(f"lockgate:{where.schema}".encode()) - 2**31
        self._local = threading.local()
        self._staged: set[str] = set()  #: staging tables this session created (insert_new)
        self._conn = self._connect()

    def _connect(self):
        try:
            import psycopg
        except ImportError:
            raise PgOperationalError("database: postgresql:// needs psycopg 3: pip install 'lockgate[postgresql]'") \
                from None
        from psycopg.adapt import Dumper, Loader
        from psycopg.conninfo import conninfo_to_dict
        from psycopg.types.string import StrDumper

        # force_custom_plan: psycopg prepares a statement run 5 times; a generic plan made while a table
        # was small (a fresh store) would keep scanning it whole as it grows (a seq scan per batch)
        options = [f"-c search_path={self.where.schema}", f"-c lock_timeout={int(self.timeout_s * 1000)}",
                   "-c plan_cache_mode=force_custom_plan"]
        if self.read_only:
            options.append("-c default_transaction_read_only=on")
        # a database machine that vanishes without a reset is noticed within ~10 s, not TCP's ~15 min;
        # the URL's own parameters win
        try:
            given = conninfo_to_dict(self.where.url)
            extra = {k: v for k, v in {**LIBPQ_DEFAULTS, "connect_timeout": max(2, int(self.timeout_s))}.items()
                     if k not in given}
            conn = psycopg.connect(self.where.url, autocommit=True, application_name="lockgate",
                                   options=" ".join([str(given.get("options", "")), *options]).strip(), **extra)
        except psycopg.Error as exc:
            raise _pg_error(exc) from exc

        class BoolAsInt(Dumper):  # stores pass Python bools where SQLite keeps integers
            oid = psycopg.postgres.types["int8"].oid

            def dump(self, obj: bool) -> bytes:
                return b"1" if obj else b"0"

        class TextWithoutNul(StrDumper):  # PostgreSQL text cannot hold NUL: stored as U+FFFD
            def dump(self, obj: str):
                return super().dump(obj.replace("\x00", "\ufffd") if "\x00" in obj else obj)

        class NumericAsNumber(Loader):  # SUM(bigint), AVG(...) are NUMERIC: int or float, as SQLite gives
            def load(self, data) -> int | float:
                text = bytes(data).decode()
                return float(text) if any(c in text for c in ".eEn") else int(text)

        conn.adapters.register_dumper(bool, BoolAsInt)
        conn.adapters.register_dumper(str, TextWithoutNul)
        conn.adapters.register_loader("numeric", NumericAsNumber)
        return conn

    # ----- sqlite3.Connection's subset
    def execute(self, sql: str, params: Sequence[Any] | dict = ()) -> Any:
        import psycopg

        conn = self._live()
        try:
            return conn.execute(adapt_sql(sql), params if params is not None else ())
        except psycopg.Error as exc:
            raise _pg_error(exc) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any:
        """Many rows in one pipelined round trip (psycopg's ``executemany``); ``rowcount`` is their sum."""
        import psycopg

        conn = self._live()
        cur = conn.cursor()
        try:
            cur.executemany(adapt_sql(sql), list(rows))
        except psycopg.Error as exc:
            raise _pg_error(exc) from exc
        return cur

    def executescript(self, script: str) -> None:
        import psycopg

        conn = self._live()
        for statement in adapt_schema(script):
            try:
                conn.execute(statement)  # no parameters: no placeholder processing
            except psycopg.Error as exc:
                raise _pg_error(exc) from exc

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "PgConnection":
        self._local.tx = self.transaction()
        self._local.tx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        tx, self._local.tx = self._local.tx, None
        tx.__exit__(*exc)

    # ----- PostgreSQL
    @contextlib.contextmanager
    def transaction(self) -> Iterator["PgConnection"]:
        """A transaction holding this store's advisory lock (the SQLite file's write lock, as it were),
        begun in one round trip; nested, a savepoint. Rolled back if the body raises."""
        import psycopg

        depth = getattr(self._local, "depth", 0)
        conn = self._live()
        begin, commit, rollback = (("BEGIN" + ("" if self.read_only else
                                              f"; SELECT pg_advisory_xact_lock({self._lock_key})"),
                                    "COMMIT", "ROLLBACK") if not depth else
                                   (f"SAVEPOINT lockgate_{depth}", f"RELEASE SAVEPOINT lockgate_{depth}",
                                    f"ROLLBACK TO SAVEPOINT lockgate_{depth}"))
        try:
            conn.execute(begin)
            self._local.depth = depth + 1
            try:
                yield self
            except BaseException:
                self._local.depth = depth
                self._staged.clear()  # a staging table created in it is gone
                if not conn.broken:
                    conn.execute(rollback)
                raise
            self._local.depth = depth
            conn.execute(commit)
        except psycopg.Error as exc:
            raise _pg_error(exc) from exc

    def copy_insert_new(self, table: str, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """:func:`insert_new` on PostgreSQL, in the caller's transaction (or one of its own): the staging
        table empties at commit (a second call in the same transaction offers the first call's rows
        again, which conflict: nothing)."""
        import psycopg

        if not getattr(self._local, "depth", 0):
            with self.transaction():
                self.copy_insert_new(table, names, rows)
            return
        cols = ", ".join(names)
        staging = f"lockgate_new_{table}"
        conn = self._conn
        try:
            if staging not in self._staged:
                conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {staging} ON COMMIT DELETE ROWS AS "
                             f"SELECT {cols} FROM {table} WITH NO DATA")
                self._staged.add(staging)
            with conn.cursor().copy(f"COPY {staging} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            conn.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {staging} ON CONFLICT DO NOTHING")
        except psycopg.Error as exc:
            raise _pg_error(exc) from exc

    def schema_exists(self) -> bool:
        return self.execute("SELECT 1 FROM pg_namespace WHERE nspname = ?", (self.where.schema,)).fetchone() \
            is not None

    def _live(self):
        """The session, reopened if the server dropped it (not inside a transaction: that one is lost)."""
        if self._conn.closed or self._conn.broken:
            if getattr(self._local, "depth", 0):
                raise PgOperationalError(f"PostgreSQL: the connection to {self.where} was lost mid-transaction")
            self._conn = self._connect()
            self._staged.clear()
        return self._conn


#: the connection a store holds: sqlite3's, or :class:`PgConnection`
Connection = sqlite3.Connection | PgConnection
