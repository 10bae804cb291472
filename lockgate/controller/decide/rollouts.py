"""Durable rollout state and the deployment log (SQLite ``<state_dir>/rollouts.db``, or the schema
``rollouts`` in PostgreSQL: :mod:`lockgate.database`).

* ``rollouts``: one row per attempted rollout — the locked spec (text + sha256), status, stage,
  timestamps, the resolved ``auto`` allowances and the last judgement. A controller killed
  mid-rollout resumes from this row at the same stage with the same evidence.
* ``rollout_events``: append-only log of everything that happened (start, advance, promote,
  rollback with its timings, pause, resume, abort, inconclusive, annotations) and who did it.
* ``rollout_evaluations``: every judgement (for status, reports and the per-stage history).
* ``leases``: one controller drives a model; a lease expires unless renewed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lockgate.database import Where, open_store, write_transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    canary TEXT NOT NULL,
    baseline TEXT NOT NULL,
    spec_text TEXT NOT NULL,
    spec_source TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    stage INTEGER NOT NULL DEFAULT 0,
    started_at REAL NOT NULL,
    stage_started_at REAL NOT NULL,
    ended_at REAL,
    created_by TEXT NOT NULL,
    auto_json TEXT NOT NULL DEFAULT '{}',
    last_eval_json TEXT,
    last_eval_at REAL
);
CREATE INDEX IF NOT EXISTS rollouts_model ON rollouts(model, id);
CREATE TABLE IF NOT EXISTS rollout_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    stage INTEGER,
    weight_bp INTEGER,
    actor TEXT NOT NULL,
    detail_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS rollout_events_rollout ON rollout_events(rollout_id, id);
CREATE TABLE IF NOT EXISTS rollout_evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    ts REAL NOT NULL,
    stage INTEGER NOT NULL,
    weight_bp INTEGER NOT NULL,
    decision TEXT NOT NULL,
    judgement_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_evaluations_rollout ON rollout_evaluations(rollout_id, id);
CREATE TABLE IF NOT EXISTS leases (
    model TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""

#: ``rolling_back``: a rollback or abort was decided but not every Envoy has ACKed weight 0 (or the
#: xDS server has not saved it) yet; the controller retries with back-off until it has, and only
#: then records the final ``rolled_back`` / ``aborted``. It counts as active: no new rollout starts.
ACTIVE_STATUSES = ("pending", "running", "paused", "rolling_back")
_ACTIVE_SQL = "(" + ",".join(f"'{x}'" for x in ACTIVE_STATUSES) + ")"


class RolloutConflict(Exception):
    """The request conflicts with the current state (an active rollout exists, wrong status, ...)."""


@dataclass(frozen=True)
class Rollout:
    id: int
    model: str
    canary: str
    baseline: str
    spec_text: str
    spec_source: str
    spec_hash: str
    status: str
    stage: int
    started_at: float
    stage_started_at: float
    ended_at: float | None
    created_by: str
    auto: dict
    last_eval: dict | None
    last_eval_at: float | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def auto_values(self) -> dict[str, tuple[float, str]]:
        """Resolved ``allowed: auto`` values (fixed at rollout start), for ``RolloutSpec.to_stats_specs``."""
        return {k: (float(v["value"]), str(v["derivation"])) for k, v in self.auto.items()}


_COLS = ("id", "model", "canary", "baseline", "spec_text", "spec_source", "spec_hash", "status", "stage",
         "started_at", "stage_started_at", "ended_at", "created_by", "auto_json", "last_eval_json", "last_eval_at")


def _row(r: tuple) -> Rollout:
    d = dict(zip(_COLS, r))
    d["auto"] = json.loads(d.pop("auto_json") or "{}")
    le = d.pop("last_eval_json")
    d["last_eval"] = json.loads(le) if le else None
    return Rollout(**d)


def _owner_is_dead(owner: str) -> bool:
    """A lease owner (``host:pid``) on *this* host whose process is gone: its lease is void at once.

    A controller that crashed (or was killed) must not keep a model without a driver — and so
    without its safety net, the rollback — until the lease's TTL runs out. An owner on another host
    cannot be checked from here; its lease expires with the TTL.
    """
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RolloutStore:
    def __init__(self, path: Where):
        self.path = path
        # every commit must survive a power cut (a rollback decided is a rollback recorded)
        self._db = open_store(path, SCHEMA, read_only=False, what="rollout store", synchronous="FULL",
                              timeout_s=10.0)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    def close(self) -> None:
        self._db.close()

    # ----- reads -----
    def get(self, rollout_id: int) -> Rollout | None:
        r = self._db.execute(f"SELECT {', '.join(_COLS)} FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        return _row(r) if r else None

    def active(self, model: str | None = None) -> list[Rollout]:
        q = f"SELECT {', '.join(_COLS)} FROM rollouts WHERE status IN {_ACTIVE_SQL}"
        args: tuple = ()
        if model:
            q += " AND model=?"
            args = (model,)
        return [_row(r) for r in self._db.execute(q + " ORDER BY id", args)]

    def latest(self, model: str) -> Rollout | None:
        r = self._db.execute(f"SELECT {', '.join(_COLS)} FROM rollouts WHERE model=? ORDER BY id DESC LIMIT 1",
                             (model,)).fetchone()
        return _row(r) if r else None

    def history(self, model: str | None = None, limit: int = 100) -> list[Rollout]:
        q = f"SELECT {', '.join(_COLS)} FROM rollouts"
        args: tuple = ()
        if model:
            q += " WHERE model=?"
            args = (model,)
        return [_row(r) for r in self._db.execute(q + " ORDER BY id DESC LIMIT ?", args + (limit,))]

    def events(self, rollout_id: int) -> list[dict]:
        cols = ("id", "ts", "kind", "stage", "weight_bp", "actor", "detail_json")
        out = []
        for r in self._db.execute(f"SELECT {', '.join(cols)} FROM rollout_events WHERE rollout_id=? ORDER BY id",
                                  (rollout_id,)):
            d = dict(zip(cols, r))
            d["detail"] = json.loads(d.pop("detail_json"))
            out.append(d)
        return out

    def last_event_id(self) -> int:
        """The id of the newest event of any rollout (0 when there is none): a cursor for :meth:`events_after`."""
        return int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM rollout_events").fetchone()[0])

    def events_after(self, cursor: int, kinds: Sequence[str], limit: int = 500) -> tuple[list[dict], int]:
        """Events of the given ``kinds`` with id > ``cursor``, oldest first (at most ``limit``), each with
        its rollout's ``model`` and ``canary``; and the cursor to pass next time (the newest event id of
        any kind, so events of other kinds are not read again)."""
        last = self.last_event_id()
        if not kinds:
            return [], max(last, cursor)
        rows = self._db.execute(
            "SELECT e.id, e.rollout_id, e.ts, e.kind, e.stage, e.detail_json, r.model, r.canary "
            "FROM rollout_events e JOIN rollouts r ON r.id = e.rollout_id WHERE e.id > ? "
            f"AND e.kind IN ({','.join('?' * len(kinds))}) ORDER BY e.id LIMIT ?",
            (cursor, *kinds, limit)).fetchall()
        events = [{"id": r[0], "rollout_id": r[1], "ts": r[2], "kind": r[3], "stage": r[4],
                   "detail": json.loads(r[5]), "model": r[6], "canary": r[7]} for r in rows]
        # with more than `limit` matches, resume after the last one returned
        nxt = events[-1]["id"] if len(events) == limit else max(last, cursor)
        return events, nxt

    def evaluations(self, rollout_id: int) -> list[dict]:
        out = []
        for ts, stage, bp, decision, j in self._db.execute(
                "SELECT ts, stage, weight_bp, decision, judgement_json FROM rollout_evaluations "
                "WHERE rollout_id=? ORDER BY id", (rollout_id,)):
            out.append({"ts": ts, "stage": stage, "weight_bp": bp, "decision": decision,
                        "judgement": json.loads(j)})
        return out

    # ----- writes -----
    def create(self, *, model: str, canary: str, baseline: str, spec_text: str, spec_source: str, spec_hash: str,
               created_by: str, auto: dict, now: float | None = None) -> Rollout:
        now = time.time() if now is None else now
        with write_transaction(self._db):
            existing = self._db.execute(f"SELECT id, status FROM rollouts WHERE model=? AND status IN "
                                        f"{_ACTIVE_SQL}", (model,)).fetchone()
            if existing:
                raise RolloutConflict(f"model {model!r} already has rollout #{existing[0]} ({existing[1]}); "
                                      f"abort it or wait for it to finish")
            cur = self._db.execute(
                "INSERT INTO rollouts(model, canary, baseline, spec_text, spec_source, spec_hash, status, stage, "
                "started_at, stage_started_at, created_by, auto_json) VALUES (?,?,?,?,?,?,'pending',0,?,?,?,?) "
                "RETURNING id",
                (model, canary, baseline, spec_text, spec_source, spec_hash, now, now, created_by, json.dumps(auto)))
            rid = cur.fetchone()[0]
            self._event(rid, now, "created", 0, 0, created_by, {"spec_hash": spec_hash, "source": spec_source})
        return self.get(rid)  # type: ignore[return-value]

    def _event(self, rollout_id: int, ts: float, kind: str, stage: int | None, weight_bp: int | None, actor: str,
               detail: dict[str, Any]) -> None:
        self._db.execute("INSERT INTO rollout_events(rollout_id, ts, kind, stage, weight_bp, actor, detail_json) "
                         "VALUES (?,?,?,?,?,?,?)",
                         (rollout_id, ts, kind, stage, weight_bp, actor, json.dumps(detail, default=str)))

    def last_event(self, rollout_id: int, kind: str) -> dict | None:
        """The most recent event of ``kind`` of a rollout (with its detail), or None."""
        r = self._db.execute("SELECT ts, detail_json FROM rollout_events WHERE rollout_id=? AND kind=? "
                             "ORDER BY id DESC LIMIT 1", (rollout_id, kind)).fetchone()
        return {"ts": r[0], "detail": json.loads(r[1])} if r else None

    def event(self, rollout_id: int, kind: str, actor: str, detail: dict[str, Any] | None = None,
              stage: int | None = None, weight_bp: int | None = None, now: float | None = None) -> None:
        with write_transaction(self._db):
            self._event(rollout_id, time.time() if now is None else now, kind, stage, weight_bp, actor, detail or {})

    def transition(self, rollout_id: int, *, expect: tuple[str, ...], status: str, stage: int | None = None,
                   kind: str, actor: str, weight_bp: int | None = None, detail: dict[str, Any] | None = None,
                   now: float | None = None) -> Rollout:
        """Change status/stage atomically with its event; raises RolloutConflict if the status moved on."""
        now = time.time() if now is None else now
        with write_transaction(self._db):
            row = self._db.execute("SELECT status, stage, stage_started_at FROM rollouts WHERE id=?",
                                   (rollout_id,)).fetchone()
            if row is None:
                raise RolloutConflict(f"no rollout #{rollout_id}")
            if row[0] not in expect:
                raise RolloutConflict(f"rollout #{rollout_id} is {row[0]}, not {' or '.join(expect)}")
            new_stage = row[1] if stage is None else stage
            stage_started = now if (new_stage != row[1] or row[0] == "pending") else row[2]
            ended = now if status not in ACTIVE_STATUSES else None
            self._db.execute("UPDATE rollouts SET status=?, stage=?, stage_started_at=?, ended_at=? WHERE id=?",
                             (status, new_stage, stage_started, ended, rollout_id))
            self._event(rollout_id, now, kind, new_stage, weight_bp, actor, detail or {})
        return self.get(rollout_id)  # type: ignore[return-value]

    def record_evaluation(self, rollout_id: int, now: float, stage: int, weight_bp: int, judgement: dict,
                          history: bool = True) -> None:
        """Set the rollout's latest evaluation; ``history``: also append it to ``rollout_evaluations``."""
        text = json.dumps(judgement, default=str)
        with write_transaction(self._db):
            if history:
                self._db.execute("INSERT INTO rollout_evaluations(rollout_id, ts, stage, weight_bp, decision, "
                                 "judgement_json) VALUES (?,?,?,?,?,?)",
                                 (rollout_id, now, stage, weight_bp, judgement.get("decision", ""), text))
            self._db.execute("UPDATE rollouts SET last_eval_json=?, last_eval_at=? WHERE id=?",
                             (text, now, rollout_id))

    # ----- leases: one controller drives a model -----
    def acquire(self, model: str, ttl_s: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with write_transaction(self._db):
            row = self._db.execute("SELECT owner, expires_at FROM leases WHERE model=?", (model,)).fetchone()
            if row and row[0] != self.owner and row[1] > now and not _owner_is_dead(row[0]):
                return False
            self._db.execute("INSERT INTO leases(model, owner, expires_at) VALUES (?,?,?) ON CONFLICT(model) DO "
                             "UPDATE SET owner=excluded.owner, expires_at=excluded.expires_at",
                             (model, self.owner, now + ttl_s))
        return True

    def lease_owner(self, model: str) -> tuple[str, float] | None:
        row = self._db.execute("SELECT owner, expires_at FROM leases WHERE model=?", (model,)).fetchone()
        return (row[0], row[1]) if row else None

    def release(self, model: str) -> None:
        with write_transaction(self._db):
            self._db.execute("DELETE FROM leases WHERE model=? AND owner=?", (model, self.owner))
