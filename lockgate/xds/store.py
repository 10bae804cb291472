"""Durable desired weights (SQLite in the state directory).

The xDS server loads these *before* it answers any Envoy, so a restarted control plane serves the
live weights, never defaults. Every change is also appended to ``weight_changes`` (who, why, when).
The snapshot version counter is persisted too, so versions keep increasing across restarts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lockgate.routing import TOTAL_WEIGHT_BP, CanaryWeight
from lockgate.sqlite_util import open_store, write_transaction

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS weights (
    model TEXT PRIMARY KEY,
    canary TEXT,
    weight_bp INTEGER NOT NULL CHECK (weight_bp BETWEEN 0 AND {TOTAL_WEIGHT_BP}),
    stage TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
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
    weights_json TEXT NOT NULL,   -- {{model: [canary, weight_bp]}} of the routes it last ACKed
    updated_at REAL NOT NULL
);
"""


class WeightStore:
    """Desired canary weights per model, persisted. Not thread-safe: one owner (the xDS server)."""

    def __init__(self, path: Path):
        # every committed weight must survive a power cut: it is what Envoys are served after a restart
        self._db = open_store(path, SCHEMA, read_only=False, what="xDS weight store", synchronous="FULL",
                              timeout_s=10)

    def close(self) -> None:
        self._db.close()

    def load(self) -> dict[str, CanaryWeight]:
        rows = self._db.execute("SELECT model, canary, weight_bp, stage FROM weights").fetchall()
        return {model: CanaryWeight(canary, bp, stage) for model, canary, bp, stage in rows}

    def save(self, model: str, weight: CanaryWeight, previous: CanaryWeight | None, actor: str, reason: str,
             xds_version: int) -> None:
        """Persist one model's new weight and its change record atomically (before it is served)."""
        now = time.time()
        with write_transaction(self._db):
            self._db.execute(
                "INSERT INTO weights(model, canary, weight_bp, stage, updated_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(model) DO UPDATE SET canary=excluded.canary, weight_bp=excluded.weight_bp, "
                "stage=excluded.stage, updated_at=excluded.updated_at",
                (model, weight.canary, weight.weight_bp, weight.stage, now))
            self._db.execute(
                "INSERT INTO weight_changes(ts, model, canary, from_bp, to_bp, stage, actor, reason, xds_version) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (now, model, weight.canary, previous.weight_bp if previous else None, weight.weight_bp, weight.stage,
                 actor, reason, xds_version))
            self._db.execute("INSERT INTO xds_meta(key, value) VALUES ('version', ?) "
                             "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(xds_version),))

    def save_node(self, node_id: str, weights: dict[str, tuple[str | None, int]]) -> None:
        """The canary weights an Envoy last ACKed, so a restarted server still knows who holds a canary."""
        self._db.execute("INSERT INTO envoy_nodes(node_id, weights_json, updated_at) VALUES (?,?,?) "
                         "ON CONFLICT(node_id) DO UPDATE SET weights_json=excluded.weights_json, "
                         "updated_at=excluded.updated_at",
                         (node_id, json.dumps({m: list(w) for m, w in weights.items()}), time.time()))

    def load_nodes(self) -> dict[str, tuple[float, dict[str, tuple[str | None, int]]]]:
        """node id → (when it last ACKed, {model: (canary, weight_bp)})."""
        out = {}
        for node_id, text, ts in self._db.execute("SELECT node_id, weights_json, updated_at FROM envoy_nodes"):
            out[node_id] = (ts, {m: (w[0], int(w[1])) for m, w in json.loads(text).items()})
        return out

    def last_version(self) -> int:
        row = self._db.execute("SELECT value FROM xds_meta WHERE key='version'").fetchone()
        return int(row[0]) if row else 0

    def save_version(self, version: int) -> None:
        self._db.execute("INSERT INTO xds_meta(key, value) VALUES ('version', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(version),))

    def changes(self, model: str | None = None, limit: int = 100) -> list[dict]:
        q = "SELECT ts, model, canary, from_bp, to_bp, stage, actor, reason, xds_version FROM weight_changes"
        args: tuple = ()
        if model:
            q += " WHERE model=?"
            args = (model,)
        q += " ORDER BY id DESC LIMIT ?"
        cols = ("ts", "model", "canary", "from_bp", "to_bp", "stage", "actor", "reason", "xds_version")
        return [dict(zip(cols, r)) for r in self._db.execute(q, args + (limit,))]
