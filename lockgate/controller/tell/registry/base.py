"""The model-registry feedback interface (one adapter per file, Flagger-style).

After a rollout ends the controller tells the model registry what happened to the canary version:

=================  ==================  =====================================================
rollout outcome    registry status     meaning
=================  ==================  =====================================================
``promoted``       ``production``      serves 100% of the model's traffic (by evidence, or manually)
``rolled_back``    ``failed-canary``   a gating metric was worse than allowed; traffic is back on baseline
``inconclusive``   ``inconclusive``    the evidence did not decide within ``max_duration``; weight held
``aborted``        ``aborted``         stopped by an operator (``lockgate rollout abort``)
=================  ==================  =====================================================

with the key metrics attached (:class:`RegistryUpdate`). Adapters implement :meth:`ModelRegistry.report`;
it may raise :class:`RegistryError` (``retryable`` False for requests that can never succeed, such as an
unknown model version). Reports run from the notifier's outbox (:mod:`lockgate.controller.tell.notify`):
persisted, retried with backoff, logged — never on the rollback path.
"""

from __future__ import annotations

import abc
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from lockgate.controller.tell.verdicts import is_gating

STATUS_FOR_KIND = {"promoted": "production", "rolled_back": "failed-canary", "inconclusive": "inconclusive",
                   "aborted": "aborted"}
METRIC_KEYS = ("kind", "verdict", "gating", "baseline", "canary", "difference", "interval", "allowed",
               "allowed_mode", "harmful", "n_baseline", "n_canary", "unit")


class RegistryError(Exception):
    """A registry update failed; ``retryable`` False = trying again cannot help."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class RegistryUpdate:
    """What the registry learns about one version after one rollout."""

    model: str
    version: str                   #: the canary version (lockgate name)
    baseline: str
    status: str                    #: production | failed-canary | inconclusive | aborted
    rollout_id: int
    kind: str                      #: the rollout outcome (promoted, rolled_back, …)
    ts: float = field(default_factory=time.time)
    by_evidence: bool = True       #: False for a manual promotion
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)   #: metric key → baseline/canary/interval/verdict …
    timings: dict | None = None    #: rollback: detected/pushed/ACKed timestamps and ms
    spec_hash: str | None = None
    started_at: float | None = None
    ended_at: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RegistryUpdate":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def headline(self) -> str:
        return f"{self.model} {self.version}: {self.status} (rollout #{self.rollout_id})"


def update_from_event(event: dict) -> RegistryUpdate | None:
    """The registry update for a promoter outcome event, or None (events that change no status)."""
    kind = event.get("kind")
    status = STATUS_FOR_KIND.get(kind or "")
    r = event.get("rollout") or {}
    if status is None or not r.get("model"):
        return None
    d = event.get("detail") or {}
    reasons = [str(x) for x in d.get("reasons") or []]
    metrics = {}
    for v in d.get("verdicts") or []:
        metrics[str(v.get("metric"))] = {k: v.get(k) for k in METRIC_KEYS if k in v}
    return RegistryUpdate(model=r["model"], version=r.get("canary", ""), baseline=r.get("baseline", ""),
                          status=status, rollout_id=int(r.get("id") or 0), kind=kind, ts=float(event.get("ts") or time.time()),
                          by_evidence=not any("manual promotion" in x for x in reasons), reasons=reasons,
                          metrics=metrics, timings=d.get("timings"), spec_hash=r.get("spec_hash"),
                          started_at=r.get("started_at"), ended_at=r.get("ended_at"))


def key_metrics_text(metrics: dict[str, dict]) -> dict[str, str]:
    """metric → ``verdict=fail canary=0.1 baseline=0.02 diff=+0.08 interval=[0.05,0.11] allowed=0.15 n=400/3600``."""
    def f(x: Any) -> str:
        if x is None:
            return "n/a"
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    out = {}
    for name, m in metrics.items():
        lo, hi = (m.get("interval") or [None, None])[:2]
        diff = m.get("difference")
        out[name] = (f"verdict={m.get('verdict')} canary={f(m.get('canary'))} baseline={f(m.get('baseline'))} "
                     f"diff={'n/a' if diff is None else f'{diff:+.4g}'} interval=[{f(lo)},{f(hi)}] "
                     f"allowed={f(m.get('allowed'))} n={m.get('n_canary', 0)}/{m.get('n_baseline', 0)}"
                     + ("" if is_gating(m) else " gating=false"))
    return out


class ModelRegistry(abc.ABC):
    """One registry backend."""

    type: str = "?"

    @abc.abstractmethod
    async def report(self, update: RegistryUpdate) -> dict:
        """Record ``update``; returns what was done (kept in the deployment log). Idempotent: a retry of an
        update that was already applied must not corrupt anything. Raises :class:`RegistryError`."""

    def describe(self) -> str:
        return self.type

    async def close(self) -> None:
        return None
