"""The imperative shell of per-host gating (:mod:`lockgate.controller.stats.hosts`): each upstream host of a
running canary tested against its peers, a host shown worse ejected through the control API (EDS without
it, every Envoy ACKed), logged and alerted with its numbers, and the version judged without it.

:class:`HostWatch` is built by the :class:`~.promoter.Promoter`. At each look of a running rollout whose
canary version has at least two endpoints in lockgate.yaml:

1. :meth:`HostWatch.step` (the hosts re-judged at most every :data:`JUDGE_EVERY_S`) reads the endpoints already out (``GetWeights``: the xDS weight store is the one
   truth; a rollback or a new canary empties it), judges the canary's own requests of the rollout per
   ``upstream_host`` (error rate, each host against its pooled active peers, allowed ratio
   :data:`~lockgate.controller.stats.hosts.DEFAULT_HOST_ALLOWED` + 1, alpha
   :data:`~lockgate.controller.stats.hosts.DEFAULT_HOST_ALPHA` split over the version's hosts; its own
   budget: an ejection moves no user off the version and rolls nothing back), and ejects the hosts
   :func:`~lockgate.controller.stats.hosts.ejections` names (never the last): ``host_ejected`` in the
   deployment log and to the alert sinks, with the host's and its peers' numbers; ``host_eject_incomplete``
   when an Envoy did not ACK (retried at the next look);
2. the promoter judges the version on :class:`WithoutHosts` (the store's rows without the ejected hosts'
   canary rows: every look re-reads them, the incremental evidence cannot drop rows);
3. "rolled back only when the harm is not one host's": when that judgement rolls back and
   :func:`~lockgate.controller.stats.hosts.suspect` names one host, the promoter judges again without it;
   when that does not roll back, the rollback is held while the host is tested (``host_suspect`` logged
   once per host).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from lockgate.controller.ingest.schema import ERROR_COLUMNS, error_column
from lockgate.controller.decide.rollouts import Rollout, RolloutStore
from lockgate.controller.ports import ObservationSource
from lockgate.controller.stats.hosts import HostJudgement, HostVerdict, ejections, judge_hosts, suspect

log = logging.getLogger("lockgate.controller.decide.host_watch")

__all__ = ["HostWatch", "JUDGE_EVERY_S", "WithoutHosts", "host_numbers"]

JUDGE_EVERY_S = 2.0  #: a rollout's hosts are re-judged at most this often (data-triggered looks in between reuse it)

HOST_COLUMNS = ("ts", "role", "user_key", "upstream_host", "weight", *ERROR_COLUMNS)


def host_numbers(hv: HostVerdict) -> dict:
    """What the log and the alert say of one host's verdict."""
    v = hv.verdict
    return {"host": hv.host, "peers": list(hv.peers), "host_error_rate": v.canary, "peers_error_rate": v.baseline,
            "host_requests": v.n_canary, "peers_requests": v.n_baseline,
            "host_errors": v.details.get("events_canary"), "peers_errors": v.details.get("events_baseline"),
            "interval": list(v.interval), "allowed": v.allowed, "alpha": v.alpha, "verdict": v.verdict,
            "reason": v.reason}


class WithoutHosts:
    """An :class:`~lockgate.controller.ports.ObservationSource` without the rows ``canary``'s ``hosts`` served."""

    def __init__(self, inner: ObservationSource, canary: str, hosts: Sequence[str]):
        self.inner, self.canary, self.hosts = inner, canary, tuple(hosts)

    def fetch(self, model: str, since_ts: float | None = None, until_ts: float | None = None,
              versions: Sequence[str] | None = None, *, columns: Sequence[str] | None = None, **kw: Any
              ) -> dict[str, np.ndarray]:
        cols = None if columns is None else list(dict.fromkeys([*columns, "version", "upstream_host"]))
        data = self.inner.fetch(model, since_ts, until_ts, versions, columns=cols, **kw)
        if not self.hosts or "upstream_host" not in data:
            return data
        out = (np.asarray(data["version"], dtype=object) == self.canary) & np.isin(
            np.asarray(data["upstream_host"], dtype=object).astype(str), np.asarray(self.hosts, dtype=object).astype(str))
        keep = ~out
        got = {k: (np.asarray(v)[keep] if np.ndim(v) and len(v) == len(keep) else v) for k, v in data.items()}
        if columns is not None:
            got = {k: v for k, v in got.items() if k in columns}
        return got


class HostWatch:
    """Per-host gating of the running rollouts (see the module docstring)."""

    def __init__(self, observations: ObservationSource, rollouts: RolloutStore, weights: Any, config: Any,
                 emit: Callable[[str, int, dict], None]):
        self.observations = observations
        self.rollouts = rollouts
        self.weights = weights
        self.config = config
        self.emit = emit
        self.last: dict[int, HostJudgement] = {}  #: rollout id → its last host judgement
        self._suspected: set[tuple[int, str]] = set()
        self._judged_at: dict[int, float] = {}  #: rollout id → when its hosts were last judged (monotonic)

    def n_hosts(self, rollout: Rollout) -> int:
        try:
            return len(self.config.model(rollout.model).versions[rollout.canary].endpoints)
        except (KeyError, AttributeError):
            return 0

    async def ejected(self, rollout: Rollout) -> tuple[str, ...]:
        """The canary's endpoints out of rotation now (the xDS weight store's), () when none or unknown."""
        if self.n_hosts(rollout) < 2:
            return ()
        resp = await self.weights.get_weights(rollout.model, deadline_s=5.0)
        live = resp.models[0] if resp.models else None
        return tuple(live.ejected) if live is not None and live.canary == rollout.canary else ()

    def judge(self, rollout: Rollout, ejected: Sequence[str]) -> HostJudgement | None:
        """The canary's hosts against each other (blocking: a worker thread)."""
        n = self.n_hosts(rollout)
        if n < 2:
            return None
        d = self.observations.fetch(rollout.model, since_ts=rollout.started_at, versions=[rollout.canary],
                                    columns=list(HOST_COLUMNS))
        c = np.asarray(d.get("role", []), dtype=object) == "canary"
        err = error_column(np.asarray(d["status_code"], dtype=float)[c], np.asarray(d["timeout"])[c],
                           np.asarray(d["error_kind"], dtype=object)[c] if "error_kind" in d else None)
        hj = judge_hosts(err, np.asarray(d["upstream_host"], dtype=object)[c], np.asarray(d["user_key"], dtype=object)[c],
                         np.asarray(d["weight"], dtype=float)[c], n_hosts=n, ejected=ejected)
        self.last[rollout.id] = hj
        return hj

    async def step(self, rollout: Rollout, now: float, act: bool = True) -> tuple[str, ...]:
        """Judge the canary's hosts and (``act``: a running rollout; a paused one is only judged) eject the ones
        shown worse; the endpoints out afterwards."""
        if self.n_hosts(rollout) < 2:
            return ()
        try:
            ejected = await self.ejected(rollout)
        except Exception as exc:  # the control API is down: judge the version as it is, eject nothing
            log.warning("rollout #%d: cannot read the ejected hosts (%s)", rollout.id, exc)
            return ()
        loop = asyncio.get_running_loop()
        hj = self.last.get(rollout.id)
        if hj is None or hj.ejected != tuple(sorted(ejected)) or \
                time.monotonic() - self._judged_at.get(rollout.id, -1e9) >= JUDGE_EVERY_S:
            hj = await loop.run_in_executor(None, self.judge, rollout, ejected)
            self._judged_at[rollout.id] = time.monotonic()
        if hj is None:
            return ejected
        for hv in ejections(hj) if act else ():
            numbers = host_numbers(hv)
            reason = (f"host {hv.host} of {rollout.canary} shown worse than its peers: {hv.summary()}")
            try:
                resp = await self.weights.eject_host(rollout.model, rollout.canary, hv.host, actor="controller",
                                                     reason=reason[:500], timeout_s=5.0, deadline_s=10.0)
            except Exception as exc:
                log.error("rollout #%d: ejecting %s failed: %s", rollout.id, hv.host, exc)
                self.rollouts.event(rollout.id, "host_eject_incomplete", "controller",
                                    {**numbers, "error": str(exc)}, rollout.stage)
                continue
            detail = {"reasons": [reason], **numbers, "ack_ms": resp.elapsed_ms,
                      "not_acked": list(resp.not_acked), "ejected": list(resp.model.ejected),
                      "alpha_statement": hj.alpha_statement()}
            if not resp.all_acked:
                self.rollouts.event(rollout.id, "host_eject_incomplete", "controller", detail, rollout.stage)
                log.error("rollout #%d: ejecting %s not ACKed by %s; retried at the next look", rollout.id, hv.host,
                          list(resp.not_acked))
            else:
                self.rollouts.event(rollout.id, "host_ejected", "controller", detail, rollout.stage)
                log.warning("rollout #%d %s: %s", rollout.id, rollout.model, reason)
                self.emit("host_ejected", rollout.id, detail)
            ejected = tuple(resp.model.ejected)
        return ejected

    def suspect(self, rollout: Rollout) -> HostVerdict | None:
        hj = self.last.get(rollout.id)
        return suspect(hj) if hj is not None else None

    def held(self, rollout: Rollout, hv: HostVerdict) -> str:
        """Log ``host_suspect`` once per host; the hold's reason."""
        reason = (f"rollback held: the harm may be one host's ({hv.host}); the version without it is not shown "
                  f"worse; {hv.summary()}")
        if (rollout.id, hv.host) not in self._suspected:
            self._suspected.add((rollout.id, hv.host))
            self.rollouts.event(rollout.id, "host_suspect", "controller", {"reasons": [reason], **host_numbers(hv)},
                                rollout.stage)
        return reason

    def summary(self, rollout: Rollout, ejected: Sequence[str]) -> dict | None:
        hj = self.last.get(rollout.id)
        if hj is None:
            return None
        return {"ejected": list(ejected), "alpha_statement": hj.alpha_statement(),
                "hosts": [host_numbers(hv) for hv in hj.hosts]}
