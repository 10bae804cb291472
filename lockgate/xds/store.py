"""Durable desired weights, shared by every xDS server of a fleet (``<state_dir>/lockgate.db``, or the
schema ``lockgate`` of the ``database:``, :mod:`lockgate.database`).

The xDS server loads these *before* it answers any Envoy, so a restarted control plane serves the
live weights, never defaults. Every change is also appended to ``weight_changes`` (who, why, when).

Two (or more) xDS servers may share one store (high availability, docs/operations.md):

* the **snapshot version** is allocated here, in the transaction that saves the change
  (``xds_meta.version``), never by a per-process counter: every server serves a change under the
  same version, and versions only grow across servers and restarts. ``xds_meta.forced`` is the last
  version that re-sends identical routes (a drill), so every server re-sends them;
* **what each Envoy holds** (``xds_nodes``: the server its ADS stream is on, whether it is connected,
  the routes version and weights it last ACKed, its last NACK) is written by the server the Envoy is
  connected to and read by the others, so "every Envoy ACKed" counts the Envoys of every server;
* **which servers are alive** (``xds_servers``: a heartbeat each server writes); a server whose
  heartbeat stops moving no longer vouches for its Envoys.

The SQL is the subset SQLite and PostgreSQL share (``?`` placeholders, ``ON CONFLICT … DO UPDATE``).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lockgate.routing import TOTAL_WEIGHT_BP, CanaryWeight, Cohort
from lockgate.database import Where, columns, open_store, write_transaction


def cohorts_json(weight: CanaryWeight) -> str:
    """``weights.cohorts``: the cohorts as a JSON list of ``[name, kind, key, value]`` ("" when none)."""
    return json.dumps([c.to_list() for c in weight.cohorts]) if weight.cohorts else ""


def parse_cohorts(text: str | None) -> tuple[Cohort, ...]:
    return tuple(Cohort(*c) for c in json.loads(text)) if text else ()


def ejected_json(weight: CanaryWeight) -> str:
    """``weights.ejected``: the canary's endpoints out of rotation, a JSON list of ``ip:port`` ("" when none)."""
    return json.dumps(list(weight.ejected)) if weight.ejected else ""


def parse_ejected(text: str | None) -> tuple[str, ...]:
    return tuple(str(e) for e in json.loads(text)) if text else ()

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS weights (
    model TEXT PRIMARY KEY,
    canary TEXT,
    weight_bp INTEGER NOT NULL CHECK (weight_bp BETWEEN 0 AND {TOTAL_WEIGHT_BP}),
    stage TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    cohorts TEXT NOT NULL DEFAULT '',
    mirror_ppm INTEGER NOT NULL DEFAULT 0,
    ejected TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS weight_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    model TEXT NOT NULL,
    canary TEXT,
    from_bp INTEGER,
    to_bp INTEGER NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    xds_version INTEGER
);
CREATE TABLE IF NOT EXISTS xds_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS envoy_nodes (
    node_id TEXT PRIMARY KEY,
    weights_json TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS xds_nodes (
    node_id TEXT PRIMARY KEY,
    server TEXT NOT NULL,
    connected INTEGER NOT NULL,
    routes_version INTEGER,
    weights_json TEXT NOT NULL,
    acked_at REAL,
    nack_version INTEGER,
    nack_error TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS xds_servers (
    server TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
"""
# envoy_nodes: what an Envoy last ACKed, as written by lockgate before xds_nodes (read once, copied over).


class WeightConflict(Exception):
    """The model has another canary with traffic (checked in the saving transaction, across servers)."""


@dataclass(frozen=True)
class NodeRecord:
    """One Envoy as the store knows it (written by the xDS server its ADS stream is on)."""

    node_id: str
    server: str
    connected: bool
    routes_version: int | None
    weights: dict[str, tuple[str | None, int]]  #: {model: (canary, weight_bp)} of the routes it last ACKed
    acked_at: float | None                       #: epoch seconds (the writing server's clock)
    nack_version: int | None
    nack_error: str
    updated_at: float


def _locked(method):
    """One call at a time on the store's connection (the xDS server calls it from its store thread, and
    ``close`` may come from another): a call after ``close`` raises ``sqlite3.ProgrammingError``."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return call


class WeightStore:
    """Desired canary weights per model, persisted. Thread-safe (one lock around the connection)."""

    def __init__(self, path: Where):
        self._lock = threading.RLock()
        # every committed weight must survive a power cut: it is what Envoys are served after a restart
        self._db = open_store(path, SCHEMA, read_only=False, what="xDS weight store", synchronous="FULL",
                              timeout_s=10)
        if "cohorts" not in columns(self._db, "weights"):  # a store written before cohorts
            with write_transaction(self._db):
                self._db.execute("ALTER TABLE weights ADD COLUMN cohorts TEXT NOT NULL DEFAULT ''")
        if "mirror_ppm" not in columns(self._db, "weights"):  # a store written before the shadow stage
            with write_transaction(self._db):
                self._db.execute("ALTER TABLE weights ADD COLUMN mirror_ppm INTEGER NOT NULL DEFAULT 0")
        if "ejected" not in columns(self._db, "weights"):  # a store written before per-host ejection
            with write_transaction(self._db):
                self._db.execute("ALTER TABLE weights ADD COLUMN ejected TEXT NOT NULL DEFAULT ''")
        if self._db.execute("SELECT 1 FROM envoy_nodes LIMIT 1").fetchone() is None:
            return
        with write_transaction(self._db):
            self._db.execute(
                "INSERT INTO xds_nodes(node_id, server, connected, routes_version, weights_json, acked_at, "
                "nack_version, nack_error, updated_at) SELECT node_id, '', 0, NULL, weights_json, updated_at, NULL, "
                "'', updated_at FROM envoy_nodes WHERE node_id NOT IN (SELECT node_id FROM xds_nodes)")
            self._db.execute("DELETE FROM envoy_nodes")

    @_locked
    def close(self) -> None:
        self._db.close()

    # ----- weights and versions
    @_locked
    def load(self) -> dict[str, CanaryWeight]:
        rows = self._db.execute("SELECT model, canary, weight_bp, stage, cohorts, ejected, mirror_ppm FROM weights").fetchall()
        return {model: CanaryWeight(canary, bp, stage, parse_cohorts(cohorts), mirror_ppm=mirror_ppm,
                                    ejected=parse_ejected(ejected))
                for model, canary, bp, stage, cohorts, ejected, mirror_ppm in rows}

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM xds_meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO xds_meta(key, value) VALUES (?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, str(value)))

    @_locked
    def versions(self) -> tuple[int, int]:
        """(the last allocated snapshot version, the last version that re-sends identical routes)."""
        got = dict(self._db.execute("SELECT key, value FROM xds_meta WHERE key IN ('version', 'forced')"))
        return int(got.get("version", 0)), int(got.get("forced", 0))

    @_locked
    def last_version(self) -> int:
        return self._meta("version")

    @_locked
    def next_version(self, at_least: int = 0, forced: bool = False) -> int:
        """Allocate a new snapshot version (> every earlier one, >= ``at_least``); ``forced``: it re-sends
        identical routes (a drill) on every server."""
        with write_transaction(self._db):
            version = max(self._meta("version") + 1, at_least)
            self._set_meta("version", version)
            if forced:
                self._set_meta("forced", version)
        return version

    @_locked
    def save(self, model: str, weight: CanaryWeight, actor: str, reason: str, at_least: int = 0
             ) -> tuple[int, CanaryWeight | None, dict[str, CanaryWeight]]:
        """Persist one model's new weight and its change record atomically (before it is served), under a
        newly allocated version (>= ``at_least``: a rollback served before it was saved keeps its version
        when no other change came in between).

        Returns (version, the model's previous weight, every model's weights as of that version). Raises
        :class:`WeightConflict` when the model has another canary with traffic (set through another server)."""
        now = time.time()
        with write_transaction(self._db):
            row = self._db.execute("SELECT canary, weight_bp, stage FROM weights WHERE model=?", (model,)).fetchone()
            previous = CanaryWeight(row[0], row[1], row[2]) if row else None
            if (previous is not None and weight.weight_bp > 0 and previous.weight_bp > 0
                    and previous.canary not in (None, weight.canary)):
                raise WeightConflict(f"model {model!r} already has canary {previous.canary!r} at "
                                     f"{previous.weight_bp / 100:g}%; roll it back first")
            version = max(self._meta("version") + 1, at_least)
            self._db.execute(
                "INSERT INTO weights(model, canary, weight_bp, stage, updated_at, cohorts, ejected, mirror_ppm) VALUES (?,?,?,?,?,?,?,?) "
                "ON CONFLICT(model) DO UPDATE SET canary=excluded.canary, weight_bp=excluded.weight_bp, "
                "stage=excluded.stage, updated_at=excluded.updated_at, cohorts=excluded.cohorts, ejected=excluded.ejected, "
                "mirror_ppm=excluded.mirror_ppm",
                (model, weight.canary, weight.weight_bp, weight.stage, now, cohorts_json(weight), ejected_json(weight), weight.mirror_ppm))
            self._db.execute(
                "INSERT INTO weight_changes(ts, model, canary, from_bp, to_bp, stage, actor, reason, xds_version) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (now, model, weight.canary, previous.weight_bp if previous else None, weight.weight_bp, weight.stage,
                 actor, reason, version))
            self._set_meta("version", version)
            weights = self.load()
        return version, previous, weights

    # ----- Envoys and servers
    @_locked
    def save_nodes(self, server: str, rows: list[tuple]) -> None:
        """Record the state of Envoys connected to ``server``: rows of (node_id, connected, routes_version,
        {model: (canary, bp)}, acked_at, nack_version, nack_error). A disconnection is recorded only while
        the node is still this server's (it may have reconnected to another one already)."""
        now = time.time()
        with write_transaction(self._db):
            for node_id, connected, routes_version, weights, acked_at, nack_version, nack_error in rows:
                text = json.dumps({m: list(w) for m, w in weights.items()})
                if connected:
                    self._db.execute(
                        "INSERT INTO xds_nodes(node_id, server, connected, routes_version, weights_json, acked_at, "
                        "nack_version, nack_error, updated_at) VALUES (?,?,1,?,?,?,?,?,?) ON CONFLICT(node_id) DO "
                        "UPDATE SET server=excluded.server, connected=1, routes_version=excluded.routes_version, "
                        "weights_json=excluded.weights_json, acked_at=excluded.acked_at, "
                        "nack_version=excluded.nack_version, nack_error=excluded.nack_error, "
                        "updated_at=excluded.updated_at",
                        (node_id, server, routes_version, text, acked_at, nack_version, nack_error, now))
                else:
                    self._db.execute("UPDATE xds_nodes SET connected=0, updated_at=? WHERE node_id=? AND server=?",
                                     (now, node_id, server))

    @_locked
    def nodes(self) -> dict[str, NodeRecord]:
        out = {}
        for (node_id, server, connected, routes_version, text, acked_at, nack_version, nack_error,
             updated_at) in self._db.execute(
                "SELECT node_id, server, connected, routes_version, weights_json, acked_at, nack_version, "
                "nack_error, updated_at FROM xds_nodes"):
            weights = {m: (w[0], int(w[1])) for m, w in json.loads(text).items()}
            out[node_id] = NodeRecord(node_id, server, bool(connected), routes_version, weights, acked_at,
                                      nack_version, nack_error or "", updated_at)
        return out

    @_locked
    def heartbeat(self, server: str, address: str, started_at: float) -> None:
        self._db.execute("INSERT INTO xds_servers(server, address, started_at, heartbeat_at) VALUES (?,?,?,?) "
                         "ON CONFLICT(server) DO UPDATE SET address=excluded.address, "
                         "heartbeat_at=excluded.heartbeat_at", (server, address, started_at, time.time()))

    @_locked
    def servers(self) -> dict[str, tuple[str, float]]:
        """server → (address, last heartbeat, epoch seconds of that server's clock)."""
        return {s: (a, hb) for s, a, hb in self._db.execute("SELECT server, address, heartbeat_at FROM xds_servers")}

    @_locked
    def forget_server(self, server: str) -> None:
        """A server stopping cleanly: its row goes; its Envoys' rows stay (they reconnect elsewhere)."""
        with write_transaction(self._db):
            self._db.execute("UPDATE xds_nodes SET connected=0 WHERE server=?", (server,))
            self._db.execute("DELETE FROM xds_servers WHERE server=?", (server,))

    @_locked
    def changes(self, model: str | None = None, limit: int = 100) -> list[dict]:
        q = "SELECT ts, model, canary, from_bp, to_bp, stage, actor, reason, xds_version FROM weight_changes"
        args: tuple = ()
        if model:
            q += " WHERE model=?"
            args = (model,)
        q += " ORDER BY id DESC LIMIT ?"
        cols = ("ts", "model", "canary", "from_bp", "to_bp", "stage", "actor", "reason", "xds_version")
        return [dict(zip(cols, r)) for r in self._db.execute(q, args + (limit,))]
