"""The Alertmanager sink: Alertmanager v2 ``POST /api/v2/alerts`` bodies and the URL they go to."""

from __future__ import annotations

import urllib.parse
from typing import Any

from lockgate.controller.tell.alerts.delivery import iso
from lockgate.controller.tell.alerts.message import Alert


def alertname(alert: Alert) -> str:
    if alert.kind == "trouble":
        return "LockgateComponentTrouble"
    return "LockgateCanary" + "".join(p.capitalize() for p in alert.kind.split("_"))


def alertmanager_payload(alert: Alert, generator_url: str | None = None, resolve_after_s: float = 3600.0) -> list[dict]:
    """Alertmanager v2 ``POST /api/v2/alerts`` body (a list with one alert).

    Labels: alertname, model, canary, severity (+ rollout, component when known). One-shot outcomes carry
    ``endsAt = startsAt + resolve_after_s``; a resolved condition carries ``endsAt`` = when it cleared; a
    firing condition none (the notifier re-sends it while it lasts)."""
    labels = {"alertname": alertname(alert), "model": alert.model, "canary": alert.canary,
              "severity": alert.severity}
    if alert.rollout_id is not None:
        labels["rollout"] = str(alert.rollout_id)
    if alert.component:
        labels["component"] = alert.component
    out: dict[str, Any] = {"labels": labels,
                           "annotations": {"summary": alert.title, "description": "\n".join(alert.lines)},
                           "startsAt": iso(alert.ts)}
    if alert.status == "resolved":
        out["endsAt"] = iso(alert.ts)
        out["startsAt"] = iso(alert.ts - 1)
    elif alert.kind != "trouble" or alert.component not in ("control_api", "envoy"):
        out["endsAt"] = iso(alert.ts + resolve_after_s)
    if generator_url:
        out["generatorURL"] = generator_url
    return [out]


def alertmanager_url(url: str) -> str:
    """``http://am:9093`` → ``http://am:9093/api/v2/alerts`` (a URL already ending so is kept)."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    if not path.endswith("/api/v2/alerts"):
        path += "/api/v2/alerts"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))



__all__ = ["alertmanager_payload", "alertmanager_url", "alertname"]
