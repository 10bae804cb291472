"""``alerts:`` — the alert sinks (webhook, Slack, Alertmanager) and their delivery retries."""

from __future__ import annotations

from dataclasses import dataclass

from lockgate.config.common import NAME_RE, _token_env, _url
from lockgate.yamlconf import Fields


#: outcome kinds an alert sink can subscribe to (``trouble`` = component trouble, docs/alerts-and-registry.md)
ALERT_EVENTS = ("rolled_back", "aborted", "inconclusive", "promoted", "advanced", "trouble", "awaiting_approval",
                "host_ejected", "capacity_hold")
DEFAULT_ALERT_EVENTS = ("rolled_back", "aborted", "inconclusive", "promoted", "trouble", "awaiting_approval",
                        "host_ejected", "capacity_hold")


@dataclass(frozen=True)
class RetryPolicy:
    """Delivery retries: exponential backoff from ``initial_backoff_s`` doubling up to ``max_backoff_s``,
    at most ``max_attempts`` tries in all (then the item is given up, logged and recorded)."""

    max_attempts: int = 12
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 300.0


@dataclass(frozen=True)
class AlertSink:
    """One alert receiver (``alerts:`` list item). ``url`` may come from ``url_env`` (Slack webhook
    URLs are secrets); ``bearer_token_env`` names a variable holding a bearer token. ``name`` (default
    ``<type>-<n>``) identifies the sink in logs and the deployment log — the URL never appears there."""

    type: str                      #: webhook | slack | alertmanager
    url: str
    name: str
    on: tuple[str, ...] = DEFAULT_ALERT_EVENTS
    timeout_s: float = 5.0
    bearer_token_env: str | None = None
    retry: RetryPolicy = RetryPolicy()
    generator_url: str | None = None   #: alertmanager generatorURL (default: the controller's rollout API)
    resolve_after_s: float = 3600.0    #: alertmanager endsAt of one-shot outcome alerts


def _retry(f: Fields) -> RetryPolicy:
    d = RetryPolicy()
    if "retry" not in f.data:
        f.raw("retry")
        return d
    sub = f.sub("retry")
    attempts = sub.int("max_attempts", d.max_attempts, min=1, max=1000)
    initial = sub.float("initial_backoff_s", d.initial_backoff_s, min=0.01, max=86400.0)
    maximum = sub.float("max_backoff_s", d.max_backoff_s, min=0.01, max=86400.0)
    sub.finish()
    initial = d.initial_backoff_s if initial is None else initial
    maximum = d.max_backoff_s if maximum is None else maximum
    if maximum < initial:
        f.errors.add(sub.path + ("max_backoff_s",), f"must be at least initial_backoff_s ({initial:g})")
    return RetryPolicy(attempts or d.max_attempts, initial, maximum)


def _alerts(f: Fields) -> tuple[AlertSink, ...]:
    """``alerts:`` — a list of sinks (absent = no alerts)."""
    out: list[AlertSink] = []
    names: dict[str, int] = {}
    for path, item in f.list("alerts"):
        if isinstance(item, dict) and "True" in item and "on" not in item:
            # YAML 1.1 reads a bare `on:` key as the boolean true: take it back as "on" (and its line numbers)
            item = {("on" if k == "True" else k): v for k, v in item.items()}
            marks = f.errors.smap._marks
            for mpath in [m for m in marks if m[:len(path) + 1] == path + ("True",)]:
                marks[path + ("on",) + mpath[len(path) + 1:]] = marks[mpath]
        sub = Fields(item, path, f.errors)
        kind = sub.str("type", required=True)
        if kind is not None and kind not in ("webhook", "slack", "alertmanager"):
            f.errors.add(path + ("type",), f"must be webhook, slack or alertmanager, got {kind!r}")
            kind = None
        url = _url(sub)
        name = sub.str("name")
        if name is not None and not NAME_RE.match(name):
            f.errors.add(path + ("name",), f"must match {NAME_RE.pattern}, got {name!r}")
        on: list[str] = []
        if "on" in sub.data:
            for opath, ev in sub.list("on"):
                if ev not in ALERT_EVENTS:
                    f.errors.add(opath, f"must be one of {', '.join(ALERT_EVENTS)}, got {ev!r}")
                elif ev not in on:
                    on.append(ev)
            if isinstance(sub.data.get("on"), list) and not sub.data["on"]:
                f.errors.add(path + ("on",), "must list at least one event")
        else:
            sub.raw("on")
        timeout = sub.float("timeout_s", 5.0, min=0.01, max=600.0)
        token_env = _token_env(sub)
        retry = _retry(sub)
        generator_url = sub.str("generator_url")
        resolve_after = sub.float("resolve_after_s", 3600.0, min=1.0, max=30 * 86400.0)
        sub.finish()
        if generator_url is not None and kind != "alertmanager":
            f.errors.add(path + ("generator_url",), "is only used with type: alertmanager")
        if kind is None or url is None:
            continue
        name = name or f"{kind}-{len(out)}"
        if name in names:
            f.errors.add(path + ("name",), f"duplicate alert name {name!r} (also alerts[{names[name]}])")
        names[name] = path[-1] if isinstance(path[-1], int) else 0
        out.append(AlertSink(kind, url, name, tuple(on) or DEFAULT_ALERT_EVENTS,
                             5.0 if timeout is None else timeout, token_env, retry, generator_url,
                             3600.0 if resolve_after is None else resolve_after))
    return tuple(out)
