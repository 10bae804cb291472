"""File registry (the default): one JSON document per model in ``<state_dir>/registry/`` (or ``path``).

``<model>.json``::

    {"model": "chat", "updated_at": "…Z", "production": "v2",
     "versions": {"v2": {"status": "production", "rollout_id": 3, "baseline": "v1", "updated_at": "…Z",
                         "by_evidence": true, "reasons": […], "metrics": {"error_rate": {…}}, "timings": null}},
     "history": [{"version": "v2", "status": "production", "rollout_id": 3, "at": "…Z", …}, …]}

Writes are atomic (temporary file, fsync, rename, fsync of the directory): a reader sees the old or the
new document, never half of one. ``history`` keeps the last :data:`MAX_HISTORY` updates; re-applying
an update already recorded (a retry after a crash) changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
from pathlib import Path

from lockgate.controller.tell.registry.base import ModelRegistry, RegistryError, RegistryUpdate

MAX_HISTORY = 500


def _iso(ts: float) -> str:
    from lockgate.controller.tell.alerts.delivery import iso

    return iso(ts)


def atomic_write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


class FileRegistry(ModelRegistry):
    type = "file"

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"file ({self.directory})"

    def path_of(self, model: str) -> Path:
        return self.directory / f"{model}.json"

    def read(self, model: str) -> dict | None:
        p = self.path_of(model)
        if not p.exists():
            return None
        return json.loads(p.read_text(encoding="utf-8"))

    def apply(self, u: RegistryUpdate) -> dict:
        """Synchronous update (runs in a worker thread)."""
        with self._lock:
            path = self.path_of(u.model)
            try:
                doc = self.read(u.model) or {}
            except (OSError, ValueError) as exc:
                raise RegistryError(f"cannot read {path}: {exc}", retryable=False) from None
            doc.setdefault("model", u.model)
            doc.setdefault("production", None)
            versions = doc.setdefault("versions", {})
            history = doc.setdefault("history", [])
            entry = {"version": u.version, "status": u.status, "rollout_id": u.rollout_id, "kind": u.kind,
                     "at": _iso(u.ts), "baseline": u.baseline, "by_evidence": u.by_evidence}
            if any(h.get("rollout_id") == u.rollout_id and h.get("kind") == u.kind and h.get("version") == u.version
                   for h in history[-50:]):
                return {"path": str(path), "already_recorded": True}
            versions[u.version] = {"status": u.status, "rollout_id": u.rollout_id, "baseline": u.baseline,
                                   "updated_at": _iso(u.ts), "by_evidence": u.by_evidence, "reasons": u.reasons,
                                   "metrics": u.metrics, "timings": u.timings, "spec_hash": u.spec_hash}
            if u.status == "production":
                previous = doc.get("production")
                if previous and previous != u.version and previous in versions:
                    versions[previous]["superseded_by"] = u.version
                doc["production"] = u.version
            elif doc.get("production") == u.version and u.status == "failed-canary":
                doc["production"] = None
            doc["updated_at"] = _iso(u.ts)
            history.append(entry)
            del history[:-MAX_HISTORY]
            try:
                atomic_write_json(path, doc)
            except OSError as exc:
                raise RegistryError(f"cannot write {path}: {exc.strerror or exc}") from None
            return {"path": str(path)}

    async def report(self, update: RegistryUpdate) -> dict:
        return await asyncio.to_thread(self.apply, update)
