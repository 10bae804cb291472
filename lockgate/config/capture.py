"""``capture:`` — what the ext_proc server captures from each response and how it ships observations,
including opt-in response-body retention (``retain_bodies``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lockgate.yamlconf import Fields


#: ``capture.mode``: how Envoy runs lockgate's ext_proc filter (docs/observations.md, "Capture modes")
CAPTURE_MODES = ("inline", "observability")
#: roles whose responses ``capture.retain_bodies`` may keep
RETAIN_ROLES = ("baseline", "canary")
#: ``retain_bodies.max_bytes`` × ``batch_size`` stays under this, so a batch fits the controller's gRPC limit
MAX_SAMPLE_BYTES_PER_BATCH = 32 << 20


@dataclass(frozen=True)
class RetainBodies:
    """Opt-in response-body retention (``capture.retain_bodies``, docs/observations.md): a
    deterministic ``sample_rate`` of the responses of ``roles`` keep their first ``max_bytes`` raw
    body bytes; the controller keeps at most ``max_count`` per model (oldest pruned) and applies
    the observation retention."""

    sample_rate: float = 0.01
    max_bytes: int = 16384
    max_count: int = 1000
    roles: tuple[str, ...] = ("canary",)


@dataclass(frozen=True)
class CaptureConfig:
    """What the ext_proc server captures from each response and how it ships observations.

    ``refusal_patterns`` None = the analyzers' built-in list; ``extra_refusal_patterns`` are added
    to whichever list is in force. ``queue_size`` bounds observations waiting for the controller
    (beyond it they are dropped and counted); ``batch_size`` is the most sent in one call;
    ``flush_interval_s`` is how long the ext_proc collects a batch before sending it (seconds; a full
    batch goes at once). ``retain_bodies`` None = no response body is kept (the default).

    ``mode``: ``inline`` (Envoy waits for the ext_proc's answer to each message, up to
    ``extproc_message_timeout_ms``; a late answer is counted by Envoy as a message timeout) or
    ``observability`` (Envoy's ``observability_mode``: it sends the messages and never waits; after the
    response it keeps the stream open up to ``deferred_close_ms`` for the ext_proc to read them).
    The QA override's token check runs in a separate, waiting ext_proc filter in both modes."""

    max_body_bytes: int = 1 << 20
    refusal_patterns: tuple[str, ...] | None = None
    extra_refusal_patterns: tuple[str, ...] = ()
    queue_size: int = 100_000
    batch_size: int = 500
    flush_interval_s: float = 0.1
    retain_bodies: RetainBodies | None = None
    mode: str = "inline"
    deferred_close_ms: int = 5000


def _retain_bodies(sub: Fields, batch_size: int) -> RetainBodies | None:
    if sub.data.get("retain_bodies") in (None, False):  # absent, empty or `false`: off
        sub.raw("retain_bodies")
        return None
    d = RetainBodies()
    rb = sub.sub("retain_bodies")
    rate = rb.float("sample_rate", d.sample_rate, min=0.0, max=1.0)
    max_bytes = rb.int("max_bytes", d.max_bytes, min=1, max=1 << 20)
    max_count = rb.int("max_count", d.max_count, min=1, max=1_000_000)
    roles: list[str] = []
    if "roles" not in rb.data:
        rb.raw("roles")
        roles = list(d.roles)
    else:
        for path, item in rb.list("roles"):
            if item not in RETAIN_ROLES:
                rb.errors.add(path, f"must be one of {', '.join(RETAIN_ROLES)}, got {item!r}")
            elif item not in roles:
                roles.append(item)
        if isinstance(rb.data["roles"], list) and not rb.data["roles"]:
            rb.errors.add(rb.path + ("roles",), f"must name at least one of {', '.join(RETAIN_ROLES)}")
    if max_bytes is not None and max_bytes * batch_size > MAX_SAMPLE_BYTES_PER_BATCH:
        rb.errors.add(rb.path + ("max_bytes",),
                      f"max_bytes × capture.batch_size ({max_bytes} × {batch_size}) must be at most "
                      f"{MAX_SAMPLE_BYTES_PER_BATCH} so a batch of observations fits one gRPC message; "
                      f"lower max_bytes or capture.batch_size")
    rb.finish()
    return RetainBodies(d.sample_rate if rate is None else rate, max_bytes or d.max_bytes,
                        max_count or d.max_count, tuple(roles))


def _capture(f: Fields) -> CaptureConfig:
    d = CaptureConfig()
    if "capture" not in f.data:
        f.raw("capture")
        return d
    sub = f.sub("capture")
    max_body = sub.int("max_body_bytes", d.max_body_bytes, min=0, max=1 << 30)
    lists = {}
    for key in ("refusal_patterns", "extra_refusal_patterns"):
        if key not in sub.data:
            sub.raw(key)
            continue
        pats = []
        for path, item in sub.list(key):
            if not isinstance(item, str):
                sub.errors.add(path, "must be a regular expression string")
                continue
            try:
                re.compile(item)
            except re.error as exc:
                sub.errors.add(path, f"invalid regular expression: {exc}")
                continue
            pats.append(item)
        lists[key] = tuple(pats)
    queue = sub.int("queue_size", d.queue_size, min=1, max=10_000_000)
    batch = sub.int("batch_size", d.batch_size, min=1, max=100_000)
    flush = sub.float("flush_interval_s", d.flush_interval_s, min=0.001, max=60.0)
    retain = _retain_bodies(sub, batch or d.batch_size)
    mode = sub.str("mode", d.mode)
    if mode not in CAPTURE_MODES:
        sub.errors.add(sub.path + ("mode",), f"must be one of {', '.join(CAPTURE_MODES)}, got {mode!r}")
        mode = d.mode
    deferred = sub.int("deferred_close_ms", d.deferred_close_ms, min=1, max=600_000)
    sub.finish()
    return CaptureConfig(max_body if max_body is not None else d.max_body_bytes, lists.get("refusal_patterns"),
                         lists.get("extra_refusal_patterns", ()), queue or d.queue_size, batch or d.batch_size,
                         flush or d.flush_interval_s, retain, mode, deferred or d.deferred_close_ms)
