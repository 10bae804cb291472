"""Retained response bodies (opt-in ``capture.retain_bodies``): a bounded sample of what a model answered.

SQLite (WAL) at ``<state_dir>/response_samples.db`` (or the schema ``response_samples`` in PostgreSQL) — its own file, never the ``observations`` table,
created ``0600`` (response bodies may hold user data), deletable on its own. One table::

    response_samples(request_id PRIMARY KEY, model, version, role, ts, status_code, upstream_host,
                     content_type, content_encoding, body BLOB, truncated, received_ts)

``body`` is the first ``max_bytes`` of the raw response body as Envoy passed it (``truncated``: it
was longer). At most ``max_count`` rows per model are kept (the oldest by ``ts`` are deleted as new
ones arrive), and :meth:`SampleStore.prune` applies the observation retention. Writes come from the
collector's writer thread, reads from the HTTP API and ``lockgate rollout diagnose``; one connection
under a lock is plenty for this volume (a sample of the responses).
"""

from __future__ import annotations

import base64
import contextlib
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

from lockgate.database import Postgres, Where, open_store, window_where, write_transaction

FILENAME = "response_samples.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS response_samples (
    request_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    role TEXT NOT NULL,
    ts REAL NOT NULL,
    status_code INTEGER,
    upstream_host TEXT,
    content_type TEXT,
    content_encoding TEXT,
    body BLOB NOT NULL,
    truncated INTEGER NOT NULL,
    received_ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_model_ts ON response_samples(model, ts);
CREATE INDEX IF NOT EXISTS samples_ts ON response_samples(ts);
"""
_COLS = ("request_id", "model", "version", "role", "ts", "status_code", "upstream_host", "content_type",
         "content_encoding", "body", "truncated", "received_ts")
_INSERT = (f"INSERT INTO response_samples({', '.join(_COLS)}) VALUES ({', '.join('?' * len(_COLS))}) "
           "ON CONFLICT DO NOTHING")


def samples_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / FILENAME


def sample_row(obs: Any, received_ts: float) -> tuple | None:
    """A proto Observation carrying ``body_sample`` → a row; None if it carries none (or cannot be keyed)."""
    if not obs.HasField("body_sample") or not obs.request_id or not obs.model or obs.replay:
        return None
    ts = obs.ts if obs.ts > 0 else received_ts
    return (obs.request_id, obs.model, obs.version, obs.role or "other", ts, obs.status_code or None,
            obs.upstream_host or None, obs.body_sample_content_type or None,
            obs.body_sample_content_encoding or None, bytes(obs.body_sample), int(obs.body_sample_truncated),
            received_ts)


class SampleStore:
    """The ``response_samples`` table. ``max_count`` (per model) applies to inserts; read-only opens for tools."""

    def __init__(self, path: str | Where, *, max_count: int | None = None, read_only: bool = False):
        self.path: Where = path if isinstance(path, Postgres) else Path(path)
        self.max_count = max_count
        self.read_only = read_only
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}  #: rows per model, known after the first insert for it
        # response bodies are user data: the file is readable by its owner only
        self._db = open_store(self.path, SCHEMA, read_only=read_only, what="response sample store", private=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ----- writes -----
    def insert(self, observations: Iterable[Any], received_ts: float | None = None,
               roles: Sequence[str] | None = None) -> int:
        """Store the body samples of these observations (those of ``roles``, if given); idempotent on
        request id. Then keeps at most ``max_count`` per model. Returns how many were new."""
        now = time.time() if received_ts is None else received_ts
        rows = [r for r in (sample_row(o, now) for o in observations)
                if r is not None and (roles is None or r[3] in roles)]
        if not rows:
            return 0
        new_by_model: dict[str, int] = {}
        with self._lock:
            try:
                self._insert(rows, new_by_model)
            except BaseException:
                self._counts.clear()
                raise
        return sum(new_by_model.values())

    def _insert(self, rows: list[tuple], new_by_model: dict[str, int]) -> None:
        """Insert ``rows`` (counting the new ones per model) and trim each model to ``max_count``, atomically."""
        with write_transaction(self._db) as db:
            for row in rows:
                if db.execute(_INSERT, row).rowcount:
                    new_by_model[row[1]] = new_by_model.get(row[1], 0) + 1
            if self.max_count is not None:
                for model, added in new_by_model.items():
                    n = self._counts.get(model)
                    if n is None:
                        n = db.execute("SELECT COUNT(*) FROM response_samples WHERE model = ?",
                                       (model,)).fetchone()[0]
                    else:
                        n += added
                    if n > self.max_count:
                        db.execute("DELETE FROM response_samples WHERE rowid IN (SELECT rowid FROM "
                                   "response_samples WHERE model = ? ORDER BY ts, rowid LIMIT ?)",
                                   (model, n - self.max_count))
                        n = self.max_count
                    self._counts[model] = n

    def prune(self, older_than_ts: float) -> int:
        """Delete samples with ``ts < older_than_ts`` (the observation retention). Returns rows deleted."""
        with self._lock:
            cur = self._db.execute("DELETE FROM response_samples WHERE ts < ?", (older_than_ts,))
            self._counts.clear()
            return cur.rowcount

    # ----- reads -----
    def get(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLS)} FROM response_samples WHERE request_id = ?",
                                   (request_id,)).fetchone()
        return _record(row) if row else None

    def window(self, model: str, since_ts: float | None = None, until_ts: float | None = None, *,
               versions: Sequence[str] | None = None, role: str | None = None, limit: int = 10
               ) -> list[dict[str, Any]]:
        """The first ``limit`` samples of ``model`` with ``since_ts <= ts < until_ts``, ordered by ts."""
        where, params = window_where(model=model, since_ts=since_ts, until_ts=until_ts, versions=versions)
        if role is not None:
            where.append("role = ?")
            params.append(role)
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLS)} FROM response_samples WHERE {' AND '.join(where)} "
                                    f"ORDER BY ts, rowid LIMIT ?", (*params, int(limit))).fetchall()
        return [_record(r) for r in rows]

    def count(self, model: str | None = None) -> int:
        with self._lock:
            if model is None:
                return self._db.execute("SELECT COUNT(*) FROM response_samples").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM response_samples WHERE model = ?", (model,)).fetchone()[0]


def _record(row: Sequence[Any]) -> dict[str, Any]:
    rec = dict(zip(_COLS, row))
    rec["body"] = bytes(rec["body"])
    rec["truncated"] = bool(rec["truncated"])
    return rec


def decoded_text(rec: dict[str, Any]) -> str:
    """The sample as text: gzip/deflate bodies inflated as far as the (possibly cut) bytes go, then
    UTF-8 with replacement characters for anything that is not."""
    body = rec["body"]
    enc = (rec.get("content_encoding") or "").lower()
    if enc in ("gzip", "x-gzip", "deflate"):
        with contextlib.suppress(zlib.error):
            body = zlib.decompressobj(47).decompress(body, 1 << 20)  # 47: gzip or zlib header
    return body.decode("utf-8", errors="replace")


def sample_json(rec: dict[str, Any]) -> dict[str, Any]:
    """A stored sample for JSON answers: byte-exact as base64, and decoded as text."""
    return {"request_id": rec["request_id"], "model": rec["model"], "version": rec["version"], "role": rec["role"],
            "ts": rec["ts"], "status": rec["status_code"], "host": rec["upstream_host"],
            "content_type": rec["content_type"], "content_encoding": rec["content_encoding"],
            "bytes": len(rec["body"]), "truncated": rec["truncated"], "text": decoded_text(rec),
            "body_base64": base64.b64encode(rec["body"]).decode("ascii")}


__all__ = ["FILENAME", "SampleStore", "decoded_text", "sample_json", "sample_row", "samples_path"]
