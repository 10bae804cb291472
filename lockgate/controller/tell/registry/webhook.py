"""Generic webhook registry: ``POST`` the update as JSON to ``url``; any 2xx is success.

Body: ``{"source": "lockgate", "type": "registry_update", "model", "version", "baseline", "status",
"rollout_id", "kind", "ts", "time", "by_evidence", "reasons", "metrics", "key_metrics", "timings", …}``.
5xx / 408 / 429 / connection problems are retried; other 4xx are given up (and logged).
"""

from __future__ import annotations

import json
import os

from lockgate.controller.tell.alerts.delivery import DeliveryError, classify_status, http_request, iso
from lockgate.controller.tell.registry.base import ModelRegistry, RegistryError, RegistryUpdate, key_metrics_text


class WebhookRegistry(ModelRegistry):
    type = "webhook"

    def __init__(self, url: str, timeout_s: float = 10.0, bearer_token_env: str | None = None):
        self.url = url
        self.timeout_s = timeout_s
        self.bearer_token_env = bearer_token_env

    def payload(self, u: RegistryUpdate) -> dict:
        d = u.to_dict()
        d.update({"source": "lockgate", "type": "registry_update", "time": iso(u.ts),
                  "key_metrics": key_metrics_text(u.metrics)})
        return d

    async def report(self, update: RegistryUpdate) -> dict:
        headers = {}
        if self.bearer_token_env:
            token = os.environ.get(self.bearer_token_env)
            if not token:
                raise RegistryError(f"environment variable {self.bearer_token_env} (bearer token) is not set")
            headers["Authorization"] = f"Bearer {token}"
        try:
            res = await http_request("POST", self.url, json.dumps(self.payload(update), default=str).encode(),
                                     headers, self.timeout_s)
        except DeliveryError as exc:
            raise RegistryError(str(exc), exc.retryable) from None
        verdict = classify_status(res.status)
        if verdict != "ok":
            raise RegistryError(f"HTTP {res.status}: {res.body[:200].decode('utf-8', 'replace')}", verdict == "retry")
        return {"http_status": res.status}
