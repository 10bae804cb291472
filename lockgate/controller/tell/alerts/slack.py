"""The Slack sink: a Slack-compatible incoming-webhook body (``{"text", "blocks"}``, Block Kit)."""

from __future__ import annotations

from lockgate.controller.tell.alerts.delivery import iso
from lockgate.controller.tell.alerts.message import Alert


def _mrkdwn(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


SLACK_EMOJI = {"critical": ":red_circle:", "warning": ":warning:", "info": ":large_green_circle:"}


def slack_payload(alert: Alert) -> dict:
    """Slack-compatible incoming webhook body: ``text`` (fallback / notifications) and Block Kit ``blocks``."""
    icon = ":white_check_mark:" if alert.status == "resolved" else SLACK_EMOJI.get(alert.severity, "")
    title = ("RESOLVED: " if alert.status == "resolved" else "") + alert.title
    blocks: list[dict] = [{"type": "header", "text": {"type": "plain_text", "text": title[:150], "emoji": True}}]
    if len(title) > 150:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(title)[:3000]}})
    why = [x for x in alert.lines if not x.startswith(tuple(m.get("metric", "\0") + " (" for m in alert.metrics))]
    if why:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn("\n".join(why))[:3000]}})
    metric_lines = [x for x in alert.lines if x not in why]
    if metric_lines:
        body = "\n".join(f"• {_mrkdwn(x)}" for x in metric_lines)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": ("*Metrics*\n" + body)[:3000]}})
    ctx = [f"lockgate · {alert.kind}" + (f" ({alert.component})" if alert.component else ""),
           f"severity {alert.severity}", iso(alert.ts)]
    if alert.rollout_id is not None:
        ctx.insert(1, f"rollout #{alert.rollout_id}")
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _mrkdwn(" · ".join(ctx))}]})
    return {"text": f"{icon} {title}\n" + "\n".join(alert.lines), "blocks": blocks[:50]}



__all__ = ["SLACK_EMOJI", "slack_payload"]
