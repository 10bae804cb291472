"""An alert to one configured sink: :func:`render` picks the sink's payload and URL, :func:`send_alert`
posts it once (retries are the outbox's, :mod:`lockgate.controller.tell.notify`)."""

from __future__ import annotations

import json
import os
import urllib.parse

from lockgate.config import AlertSink
from lockgate.controller.tell.alerts.alertmanager import alertmanager_payload, alertmanager_url
from lockgate.controller.tell.alerts.delivery import DeliveryError, classify_status, http_request
from lockgate.controller.tell.alerts.message import Alert
from lockgate.controller.tell.alerts.slack import slack_payload
from lockgate.controller.tell.alerts.webhook import webhook_payload


def render(alert: Alert, sink: AlertSink, default_generator_url: str | None = None) -> tuple[str, bytes]:
    """(URL, JSON body) of ``alert`` for ``sink``."""
    if sink.type == "slack":
        return sink.url, json.dumps(slack_payload(alert)).encode()
    if sink.type == "alertmanager":
        gen = sink.generator_url or default_generator_url
        if gen and alert.model != "*":
            gen = gen.replace("{model}", urllib.parse.quote(alert.model))
        elif gen:
            gen = gen.replace("{model}", "")
        return alertmanager_url(sink.url), json.dumps(alertmanager_payload(alert, gen, sink.resolve_after_s)).encode()
    return sink.url, json.dumps(webhook_payload(alert), default=str).encode()


async def send_alert(sink: AlertSink, alert: Alert, default_generator_url: str | None = None,
                     env: dict[str, str] | None = None) -> dict:
    """Deliver one alert to one sink; returns ``{"http_status": …}``; raises :class:`DeliveryError`."""
    url, body = render(alert, sink, default_generator_url)
    headers = {}
    if sink.bearer_token_env:
        token = (env if env is not None else os.environ).get(sink.bearer_token_env)
        if not token:
            raise DeliveryError(f"environment variable {sink.bearer_token_env} (bearer token) is not set")
        headers["Authorization"] = f"Bearer {token}"
    res = await http_request("POST", url, body, headers, timeout=sink.timeout_s)
    verdict = classify_status(res.status)
    if verdict != "ok":
        snippet = res.body[:200].decode("utf-8", "replace").strip()
        raise DeliveryError(f"HTTP {res.status}" + (f": {snippet}" if snippet else ""), verdict == "retry", res.status)
    return {"http_status": res.status}


__all__ = ["render", "send_alert"]
