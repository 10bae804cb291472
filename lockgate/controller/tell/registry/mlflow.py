"""MLflow Model Registry over its REST API (no ``mlflow`` package needed in the controller).

For the canary's model version it sets the tags

* ``lockgate.status`` = production | failed-canary | inconclusive | aborted
* ``lockgate.rollout_id``, ``lockgate.model``, ``lockgate.baseline``, ``lockgate.decided_at`` (ISO 8601),
  ``lockgate.by_evidence``, ``lockgate.reason`` (first reason, truncated), ``lockgate.rollback_ms``
  (detected → all Envoys ACKed, rollbacks only)
* ``lockgate.metric.<metric>`` = ``verdict=… canary=… baseline=… diff=… interval=[…] allowed=… n=…``

(``POST /api/2.0/mlflow/model-versions/set-tag``), and on promotion the alias (default ``production``)
(``POST /api/2.0/mlflow/registered-models/alias``). Every call is idempotent, so a retried update is safe.

Which MLflow version a lockgate version is: ``registry.models.<model>.versions`` or ``registry.versions``
(``{v2: "3"}``), else the model version whose tag ``version_tag`` (default ``lockgate.version``) equals the
lockgate version name (``GET …/model-versions/search``, newest wins), else a purely numeric lockgate version
name is taken as the MLflow version itself. The registered model is ``registered_model`` (default: the
lockgate model name).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse

from lockgate.config import RegistryConfig
from lockgate.controller.tell.alerts.delivery import DeliveryError, classify_status, http_request, iso
from lockgate.controller.tell.registry.base import ModelRegistry, RegistryError, RegistryUpdate, key_metrics_text

TAG_VALUE_MAX = 5000
_TAG_KEY_BAD = re.compile(r"[^A-Za-z0-9_.\- /]")


def tag_key(name: str) -> str:
    return _TAG_KEY_BAD.sub("_", name)


class MlflowRegistry(ModelRegistry):
    type = "mlflow"

    def __init__(self, cfg: RegistryConfig):
        assert cfg.tracking_uri
        self.cfg = cfg
        self.base = cfg.tracking_uri.rstrip("/") + "/api/2.0/mlflow/"
        self.per_model = dict(cfg.models)

    def describe(self) -> str:
        parts = urllib.parse.urlsplit(self.cfg.tracking_uri or "")
        return f"mlflow ({parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''})"

    def registered_model(self, model: str) -> str:
        m = self.per_model.get(model)
        return (m.registered_model if m and m.registered_model else None) or self.cfg.registered_model or model

    async def _call(self, method: str, endpoint: str, body: dict | None = None, query: dict | None = None) -> dict:
        url = self.base + endpoint + (("?" + urllib.parse.urlencode(query)) if query else "")
        headers = {}
        if self.cfg.bearer_token_env:
            token = os.environ.get(self.cfg.bearer_token_env)
            if not token:
                raise RegistryError(f"environment variable {self.cfg.bearer_token_env} (bearer token) is not set")
            headers["Authorization"] = f"Bearer {token}"
        try:
            res = await http_request(method, url, json.dumps(body).encode() if body is not None else None, headers,
                                     self.cfg.timeout_s)
        except DeliveryError as exc:
            raise RegistryError(f"MLflow {endpoint}: {exc}", exc.retryable) from None
        verdict = classify_status(res.status)
        if verdict != "ok":
            try:
                err = res.json()
                msg = f"{err.get('error_code', '')}: {err.get('message', '')}"
            except (ValueError, AttributeError):
                msg = res.body[:200].decode("utf-8", "replace")
            raise RegistryError(f"MLflow {endpoint}: HTTP {res.status} {msg}", verdict == "retry")
        try:
            return res.json() or {}
        except ValueError:
            return {}

    async def resolve_version(self, model: str, version: str) -> tuple[str, str]:
        """(registered model name, MLflow version number) of a lockgate ``model``/``version``."""
        name = self.registered_model(model)
        m = self.per_model.get(model)
        for vmap in ((m.versions if m else ()), self.cfg.versions):
            for lv, mv in vmap:
                if lv == version:
                    return name, mv
        quoted = name.replace("'", "\\'")
        vq = version.replace("'", "\\'")
        found = await self._call("GET", "model-versions/search",
                                 query={"filter": f"name='{quoted}' and tags.`{self.cfg.version_tag}`='{vq}'"})
        candidates = [mv.get("version") for mv in found.get("model_versions", []) if mv.get("version")]
        if candidates:
            return name, max(candidates, key=lambda v: int(v) if str(v).isdigit() else -1)
        if version.isdigit():
            return name, version
        raise RegistryError(f"no MLflow version of registered model {name!r} is lockgate version {version!r}: "
                            f"map it in registry.versions or tag the model version "
                            f"{self.cfg.version_tag}={version}", retryable=False)

    def tags(self, u: RegistryUpdate) -> dict[str, str]:
        tags = {"lockgate.status": u.status, "lockgate.rollout_id": str(u.rollout_id), "lockgate.model": u.model,
                "lockgate.baseline": u.baseline, "lockgate.decided_at": iso(u.ts),
                "lockgate.by_evidence": "true" if u.by_evidence else "false"}
        if u.reasons:
            tags["lockgate.reason"] = "; ".join(u.reasons)
        t = u.timings or {}
        if t.get("all_acked") and t.get("detected_at") and t.get("pushed_at") is not None:
            total = (t["pushed_at"] - t["detected_at"]) * 1000 + float(t.get("push_to_ack_ms") or 0)
            tags["lockgate.rollback_ms"] = f"{max(total, 0):.0f}"
        for name, text in key_metrics_text(u.metrics).items():
            tags[f"lockgate.metric.{tag_key(name)}"] = text
        return {k: v[:TAG_VALUE_MAX] for k, v in tags.items()}

    async def report(self, update: RegistryUpdate) -> dict:
        name, mv = await self.resolve_version(update.model, update.version)
        tags = self.tags(update)
        for key, value in tags.items():
            await self._call("POST", "model-versions/set-tag",
                             {"name": name, "version": mv, "key": key, "value": value})
        alias = None
        if update.status == "production" and self.cfg.alias:
            await self._call("POST", "registered-models/alias", {"name": name, "alias": self.cfg.alias, "version": mv})
            alias = self.cfg.alias
        return {"registered_model": name, "mlflow_version": mv, "tags": len(tags), "alias": alias}
