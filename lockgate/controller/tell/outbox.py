"""The notifier's durable queue (``<state_dir>/notify.db``, SQLite, WAL, ``synchronous=FULL``; or the
schema ``notify`` in PostgreSQL, :mod:`lockgate.database`).

One row per (alert, sink) and per registry update, on a *channel* (``alert:<sink name>`` or
``registry``). Rows are delivered in order per channel: :meth:`Outbox.heads` is the oldest pending row
of each. A row is ``pending`` until ``delivered`` or ``failed`` (given up); done rows are pruned after a
week by the notifier. A ``meta`` table keeps the trouble monitor's cursors across restarts.
Times are epoch seconds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockgate.database import Where, open_store

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    kind TEXT NOT NULL,
    rollout_id INTEGER,
    payload_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT,
    done_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(state, channel, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Item:
    id: int
    channel: str
    kind: str
    rollout_id: int | None
    payload: dict
    created_at: float
    attempts: int
    next_at: float
    state: str = "pending"
    last_error: str | None = None


_ITEM_COLS = "id, channel, kind, rollout_id, payload_json, created_at, attempts, next_at, state, last_error"


def _item(r: tuple) -> Item:
    return Item(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8], r[9])


class Outbox:
    """The durable queue. Not thread-safe: the notifier uses it from its one database thread."""

    def __init__(self, path: Where):
        self.path = path
        self.db = open_store(path, SCHEMA, read_only=False, what="notification outbox", synchronous="FULL",
                             timeout_s=10.0)

    def close(self) -> None:
        self.db.close()

    def add(self, channel: str, kind: str, rollout_id: int | None, payload: dict, now: float | None = None) -> int:
        now = time.time() if now is None else now
        cur = self.db.execute("INSERT INTO outbox(channel, kind, rollout_id, payload_json, created_at, next_at) "
                              "VALUES (?,?,?,?,?,?) RETURNING id", (channel, kind, rollout_id, json.dumps(payload, default=str),
                                                       now, now))
        return int(cur.fetchone()[0])

    def heads(self, busy: frozenset[str] = frozenset()) -> list[Item]:
        """The oldest pending row of every channel (delivery is in order per channel)."""
        rows = self.db.execute(f"SELECT {_ITEM_COLS} FROM outbox WHERE id IN (SELECT MIN(id) FROM outbox "
                               f"WHERE state='pending' GROUP BY channel) ORDER BY id").fetchall()
        return [i for i in map(_item, rows) if i.channel not in busy]

    def due(self, now: float, busy: frozenset[str] = frozenset()) -> list[Item]:
        return [i for i in self.heads(busy) if i.next_at <= now]

    def next_at(self, busy: frozenset[str] = frozenset()) -> float | None:
        heads = self.heads(busy)
        return min((i.next_at for i in heads), default=None)

    def delivered(self, item_id: int, attempts: int, now: float) -> None:
        self.db.execute("UPDATE outbox SET state='delivered', attempts=?, done_at=?, last_error=NULL WHERE id=?",
                        (attempts, now, item_id))

    def retry(self, item_id: int, attempts: int, next_at: float, error: str) -> None:
        self.db.execute("UPDATE outbox SET attempts=?, next_at=?, last_error=? WHERE id=?",
                        (attempts, next_at, error[:2000], item_id))

    def failed(self, item_id: int, attempts: int, now: float, error: str) -> None:
        self.db.execute("UPDATE outbox SET state='failed', attempts=?, done_at=?, last_error=? WHERE id=?",
                        (attempts, now, error[:2000], item_id))

    def items(self, state: str | None = None) -> list[Item]:
        q = f"SELECT {_ITEM_COLS} FROM outbox" + (" WHERE state=?" if state else "") + " ORDER BY id"
        return [_item(r) for r in self.db.execute(q, (state,) if state else ())]

    def prune(self, before: float) -> int:
        return self.db.execute("DELETE FROM outbox WHERE state!='pending' AND done_at < ?", (before,)).rowcount

    def meta_get(self, key: str, default: Any = None) -> Any:
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(r[0]) if r else default

    def meta_set(self, key: str, value: Any) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (key, json.dumps(value)))


__all__ = ["Item", "Outbox", "SCHEMA"]
