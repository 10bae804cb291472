"""``rollout.shadow``: an optional first stage at 0 % served, in which Envoy mirrors a share of the
baseline's requests to the canary and the gates compare the two answers to the same request
(docs/rollout-spec.md, "Shadow stage").

```yaml
shadow:
  mirror_percent: 10      # mirror this share of the model's requests (0 < p <= 100)
  max_rps: 50             # and never more than this many mirrored requests/s in all (the canary hosts' bound)
  min_duration: 10m       # at least this long in shadow before the first user-facing step
  min_pairs: 200          # and at least this many paired answers (default 200)
```

The share pushed to Envoy is ``min(mirror_percent, max_rps / the baseline's observed requests/s)``,
recomputed at each look (:func:`lockgate.controller.decide.shadow.mirror_ppm`); the mirror's shadow
cluster also has a circuit breaker (a fixed number of mirrored requests in flight per Envoy).

Parsed here with file/line errors, as the rest of the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from lockgate.yamlconf import ErrorCollector, Fields

SHADOW_KEYS = ("mirror_percent", "max_rps", "min_duration", "min_pairs")
DEFAULT_MIN_DURATION_S = 600.0
DEFAULT_MIN_PAIRS = 200
MAX_RPS = 1e6


@dataclass(frozen=True)
class ShadowSpec:
    mirror_percent: float
    max_rps: float
    min_duration_s: float = DEFAULT_MIN_DURATION_S
    min_pairs: int = DEFAULT_MIN_PAIRS

    def canonical(self) -> dict:
        return {"mirror_percent": self.mirror_percent, "max_rps": self.max_rps,
                "min_duration_s": self.min_duration_s, "min_pairs": self.min_pairs}

    def describe(self) -> str:
        return (f"shadow: {self.mirror_percent:g}% of requests mirrored to the canary (at most {self.max_rps:g}/s), "
                f"at least {self.min_duration_s:g} s and {self.min_pairs} paired answers")


def parse_shadow(f: Fields, errors: ErrorCollector) -> ShadowSpec | None:
    """``rollout.shadow`` (absent: no shadow stage)."""
    from lockgate.controller.decide.spec.parsing import parse_duration

    if "shadow" not in f.data:
        f.raw("shadow")
        return None
    sf = f.sub("shadow")
    if f.data["shadow"] is None:
        errors.add(sf.path, "is empty: give mirror_percent and max_rps (or remove it)")
        return None
    before = len(errors.problems)
    percent = sf.float("mirror_percent", required=True)
    if percent is not None and not 0 < percent <= 100:
        errors.add(sf.path + ("mirror_percent",), f"must be greater than 0 and at most 100, got {percent:g}")
    rps = sf.float("max_rps", required=True)
    if rps is not None and not 0 < rps <= MAX_RPS:
        errors.add(sf.path + ("max_rps",), f"must be greater than 0 and at most {MAX_RPS:g} (mirrored requests/s "
                                           f"in all), got {rps:g}")
    duration = DEFAULT_MIN_DURATION_S
    raw = sf.raw("min_duration")
    if raw is not None:
        try:
            duration = parse_duration(raw)
        except ValueError as exc:
            errors.add(sf.path + ("min_duration",), str(exc))
    pairs = sf.int("min_pairs", DEFAULT_MIN_PAIRS, min=1, max=10_000_000)
    sf.finish()
    if len(errors.problems) > before or percent is None or rps is None or pairs is None:
        return None
    return ShadowSpec(percent, rps, duration, pairs)


__all__ = ["SHADOW_KEYS", "ShadowSpec", "parse_shadow"]
