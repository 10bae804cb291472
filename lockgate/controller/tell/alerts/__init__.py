"""Alerts: what a rollout outcome or a component problem looks like on the wire, and how it gets there.

One module per part:

* :mod:`.message` — the :class:`Alert` model, built from a promoter outcome event
  (:func:`alert_from_event`) or for component trouble (:func:`trouble_alert`), and its text;
* one module per sink, each its payload and URL rules: :mod:`.webhook` (generic JSON), :mod:`.slack`
  (Slack-compatible incoming webhook), :mod:`.alertmanager` (Alertmanager v2 ``POST /api/v2/alerts``);
* :mod:`.delivery` — the asyncio HTTP/1.1 client, :func:`classify_status` (retry or give up) and
  :func:`backoff_delay` (bounded exponential backoff), shared with the registry adapters;
* :mod:`.send` — :func:`render` / :func:`send_alert`: one alert to one configured sink.

Queuing, persistence and the retry loop live in :mod:`lockgate.controller.tell.notify`. This package
re-exports every public name, so ``from lockgate.controller.tell.alerts import X`` keeps working.
"""

from __future__ import annotations

from lockgate.controller.tell.alerts.alertmanager import alertmanager_payload, alertmanager_url, alertname
from lockgate.controller.tell.alerts.delivery import (MAX_RESPONSE, DeliveryError, HTTPResult, backoff_delay,
                                                      classify_status, http_request, iso, total_retry_window)
from lockgate.controller.tell.alerts.message import (SEVERITY, Alert, alert_from_event,
                                                     describe_beyond, describe_timings, describe_verdict,
                                                     rollback_push_trouble, trouble_alert)
from lockgate.controller.tell.alerts.send import render, send_alert
from lockgate.controller.tell.alerts.slack import SLACK_EMOJI, slack_payload
from lockgate.controller.tell.alerts.webhook import webhook_payload
from lockgate.controller.tell.verdicts import PROPORTION_KINDS

__all__ = ["MAX_RESPONSE", "PROPORTION_KINDS", "SEVERITY", "SLACK_EMOJI", "Alert", "DeliveryError", "HTTPResult",
           "alert_from_event", "alertmanager_payload", "alertmanager_url", "alertname", "backoff_delay",
           "classify_status", "describe_beyond", "describe_timings", "describe_verdict", "http_request", "iso",
           "render", "rollback_push_trouble", "send_alert", "slack_payload", "total_retry_window", "trouble_alert",
           "webhook_payload"]
