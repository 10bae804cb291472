"""The generic webhook sink: every field of the alert as JSON."""

from __future__ import annotations

from lockgate.controller.tell.alerts.delivery import iso
from lockgate.controller.tell.alerts.message import Alert


def webhook_payload(alert: Alert) -> dict:
    """Generic JSON: every field of the alert, plus ``text`` (title + lines) and ``time`` (ISO 8601)."""
    d = alert.to_dict()
    d.update({"source": "lockgate", "schema": 1, "text": alert.text, "time": iso(alert.ts)})
    return d



__all__ = ["webhook_payload"]
