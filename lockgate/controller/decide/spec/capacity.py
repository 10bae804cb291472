"""``rollout.capacity``: what the canary's hosts can take, so that the ramp holds before a step would
overload them (docs/rollout-spec.md, "Capacity").

```yaml
capacity:
  requests_per_s_per_host: 60     # or tokens_per_s_per_host: 2000 (output tokens), or both
  headroom: 0.8                   # use at most this share of it (default 0.8)
  window_s: 60                    # the traffic rate is measured over the last window_s seconds (default 60)
  latency_rise: 1.5               # observed mode: hold when the canary's p50 latency rose beyond x1.5 with load
```

The number of canary hosts is the number of ``endpoints`` of the canary version in lockgate.yaml,
counted when the rule is applied (a host added to the config counts after the controller's restart).
The rule itself (:mod:`lockgate.controller.decide.capacity`) is pure; the rates are read from the
stored observations by the promotion loop.

Parsed here with file/line errors: at least one of the two capacities, each a positive number;
``headroom`` in (0, 1]; ``window_s`` 10 … 3600. (lockgate.yaml requires every version to list its
endpoints, so the canary always has hosts to count.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lockgate.yamlconf import ErrorCollector, Fields

CAPACITY_KEYS = ("requests_per_s_per_host", "tokens_per_s_per_host", "headroom", "window_s", "latency_rise")
DEFAULT_HEADROOM = 0.8
DEFAULT_WINDOW_S = 60.0
MIN_WINDOW_S = 10.0
MAX_WINDOW_S = 3600.0
MAX_RATE = 1e9
MIN_LATENCY_RISE = 1.05
MAX_LATENCY_RISE = 100.0


@dataclass(frozen=True)
class CapacitySpec:
    """The canary hosts' capacity: requests/s and/or output tokens/s per host (None: not limited on
    that), the share of it a step may use (``headroom``) and the rate window in seconds; ``latency_rise``
    (observed mode, None: off): the factor by which the canary's p50 latency may rise with load over its
    p50 at the start of the rollout."""

    requests_per_s_per_host: float | None = None
    tokens_per_s_per_host: float | None = None
    headroom: float = DEFAULT_HEADROOM
    window_s: float = DEFAULT_WINDOW_S
    latency_rise: float | None = None

    def canonical(self) -> dict:
        out: dict[str, Any] = {"headroom": self.headroom, "window_s": self.window_s}
        if self.requests_per_s_per_host is not None:
            out["requests_per_s_per_host"] = self.requests_per_s_per_host
        if self.tokens_per_s_per_host is not None:
            out["tokens_per_s_per_host"] = self.tokens_per_s_per_host
        if self.latency_rise is not None:
            out["latency_rise"] = self.latency_rise
        return out

    def describe(self) -> str:
        """``60 req/s and 2000 tokens/s per host, headroom 0.8``."""
        parts = [f"{v:g} {u}" for v, u in ((self.requests_per_s_per_host, "req/s"),
                                            (self.tokens_per_s_per_host, "tokens/s")) if v is not None]
        rise = f"p50 latency rise at most ×{self.latency_rise:g}" if self.latency_rise is not None else ""
        if not parts:
            return rise
        return f"{' and '.join(parts)} per host, headroom {self.headroom:g}" + (f"; {rise}" if rise else "")


def parse_capacity(f: Fields, errors: ErrorCollector) -> CapacitySpec | None:
    """``rollout.capacity`` (absent: no capacity rule)."""
    if "capacity" not in f.data:
        f.raw("capacity")
        return None
    cf = f.sub("capacity")
    if f.data["capacity"] is None:
        errors.add(cf.path, "is empty: give requests_per_s_per_host and/or tokens_per_s_per_host, or latency_rise "
                            "(or remove it)")
        return None
    before = len(errors.problems)
    rps = cf.float("requests_per_s_per_host")
    tps = cf.float("tokens_per_s_per_host")
    for key, value in (("requests_per_s_per_host", rps), ("tokens_per_s_per_host", tps)):
        if value is not None and not 0 < value <= MAX_RATE:
            errors.add(cf.path + (key,), f"must be greater than 0 and at most {MAX_RATE:g}, got {value:g}")
    headroom = cf.float("headroom", DEFAULT_HEADROOM)
    if headroom is not None and not 0 < headroom <= 1:
        errors.add(cf.path + ("headroom",), f"must be greater than 0 and at most 1 (the share of the capacity a "
                                            f"step may use), got {headroom:g}")
    window = cf.float("window_s", DEFAULT_WINDOW_S, min=MIN_WINDOW_S, max=MAX_WINDOW_S)
    rise = cf.float("latency_rise")
    if rise is not None and not MIN_LATENCY_RISE <= rise <= MAX_LATENCY_RISE:
        errors.add(cf.path + ("latency_rise",), f"must be at least {MIN_LATENCY_RISE:g} and at most "
                                                f"{MAX_LATENCY_RISE:g} (the factor the canary's p50 latency may rise "
                                                f"by with load), got {rise:g}")
    cf.finish()
    if isinstance(cf.data, dict) and not any(k in cf.data for k in ("requests_per_s_per_host", "tokens_per_s_per_host",
                                                                     "latency_rise")):
        errors.add(cf.path, "needs requests_per_s_per_host and/or tokens_per_s_per_host (the canary's capacity per "
                            "host), or latency_rise (observed mode)")
    if len(errors.problems) != before:
        return None
    return CapacitySpec(rps, tps, headroom if headroom is not None else DEFAULT_HEADROOM,
                        window if window is not None else DEFAULT_WINDOW_S, rise)


def canary_hosts(config: Any, model: str, canary: str) -> int:
    """How many hosts serve the canary: its endpoints in lockgate.yaml (0 when unknown)."""
    try:
        version = config.model(model).versions.get(canary)
    except KeyError:
        return 0
    return len(version.endpoints) if version is not None else 0


__all__ = ["CAPACITY_KEYS", "CapacitySpec", "DEFAULT_HEADROOM", "DEFAULT_WINDOW_S", "canary_hosts",
           "parse_capacity"]
