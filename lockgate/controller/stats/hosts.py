"""Per-host gating: each upstream host of one version tested against its peers (:func:`judge_hosts`).

On GPU fleets one bad host (a failing card, a wrong driver, a mis-loaded weight file) looks like a bad
model. Here each *active* host ``h`` of a version is the "canary" arm and the pooled other active hosts
of the same version are the "baseline" arm of the ordinary rate test (:func:`~.rates.evaluate_rate`: the
conditional-binomial count test and the cluster-robust confidence sequence must agree) -- no second
copy of the statistics. A host is *shown worse* when its verdict is ``fail``: its rate is shown above
``1 + allowed`` times its peers' (relative allowance; default ratio 1.5), anytime-valid.

Multiplicity: the version's host budget ``alpha`` is split evenly (Bonferroni) over the hosts the
version has (``n_hosts``, fixed for the rollout, ejected ones included: their share stays spent), so
on a healthy fleet P(any host of the version is ever falsely shown worse, at any look) <= ``alpha``.
After a true ejection the peer pool changes and the remaining hosts are tested against the new pool
at the same per-host share (a further false ejection is bounded by the per-host share each).

Users: Envoy balances a version's requests over its hosts round-robin, so one sticky user's requests
reach several hosts. The cluster-robust test clusters by user as usual; a user in both arms correlates
them positively, which the test's variance ignores -- that only makes it conservative.

Requests are stratified by ``stratum`` (the rollout stage): within a stage the hosts' shares are
steady; across stages the realised per-stage share is used by the count test.

:func:`ejections` picks the hosts to take out: shown-worse ones, worst (largest lower bound on the
ratio) first, never the last active host of a version (then the version's own verdict decides).

"Rolled back only when the harm is not one host's": a version's own test (canary vs baseline, with
the whole baseline behind it) usually has more power than a host-vs-peers test, so with one bad host
of three the version would be shown worse before the host is. :func:`suspect` names the host whose
point estimate is beyond the host allowance against its peers (the one outlier); the caller then
re-runs the version's failing gate on the rows *without* that host: when that does not fail, the
rollback is held ("the harm may be one host's") and the host test keeps running. A rollback needs
both the version test and the version-without-the-suspect test to fail, so this hold never adds a
false rollback; it delays a true one while one host looks like the cause (measured in
bench/host_ejection.py: the all-hosts-bad fleet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .arms import DEFAULT_MIN_CLUSTERS
from .rates import evaluate_rate
from .verdict import MetricSpec, MetricVerdict, fmt_num

__all__ = ["HOST_ERROR_SPEC", "HostVerdict", "HostJudgement", "judge_hosts", "ejections", "host_spec", "rows_without", "suspect"]

DEFAULT_HOST_ALLOWED = 0.5  # relative: a host is shown worse when its error rate is shown above 1.5x its peers'
DEFAULT_HOST_ALPHA = 0.01


def host_spec(allowed: float = DEFAULT_HOST_ALLOWED, column: str = "error", name: str = "host_error_rate") -> MetricSpec:
    """The host-vs-peers rate spec: harmful increase, relative allowance ``allowed`` (ratio ``1 + allowed``)."""
    return MetricSpec(name, "rate", "increase", allowed=allowed, allowed_mode="relative", column=column)


HOST_ERROR_SPEC = host_spec()


@dataclass(frozen=True)
class HostVerdict:
    """One host against its peers: ``verdict`` is a :class:`MetricVerdict` whose "canary" is the host and
    whose "baseline" is the pooled other active hosts of the version."""

    host: str
    verdict: MetricVerdict
    peers: tuple[str, ...]

    @property
    def shown_worse(self) -> bool:
        return self.verdict.verdict == "fail"

    def summary(self) -> str:
        v = self.verdict
        unit = v.unit
        return (f"host {self.host}: {v.metric} {fmt_num(v.canary, unit)} ({v.n_canary} requests) vs its "
                f"{len(self.peers)} peer(s) {fmt_num(v.baseline, unit)} ({v.n_baseline} requests): {v.verdict} "
                f"at alpha {v.alpha:.3g}; {v.reason}")

    def to_dict(self) -> dict:
        return {"host": self.host, "peers": list(self.peers), "shown_worse": self.shown_worse,
                "verdict": self.verdict.to_dict()}


@dataclass(frozen=True)
class HostJudgement:
    """Every active host's verdict at one look (``hosts`` empty when fewer than two hosts are active)."""

    hosts: tuple[HostVerdict, ...]
    alpha: float
    alpha_per_host: float
    n_hosts: int
    active: tuple[str, ...]
    ejected: tuple[str, ...] = field(default=())

    def alpha_statement(self) -> str:
        return (f"each of the version's {self.n_hosts} host(s) against its peers at alpha {self.alpha_per_host:.3g} "
                f"(Bonferroni split of {self.alpha:.3g}): P(any healthy host is ever ejected) <= {self.alpha:.3g}")

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "alpha_per_host": self.alpha_per_host, "n_hosts": self.n_hosts,
                "active": list(self.active), "ejected": list(self.ejected),
                "alpha_statement": self.alpha_statement(), "hosts": [h.to_dict() for h in self.hosts]}


def judge_hosts(
    events: np.ndarray,
    hosts: np.ndarray,
    cluster: np.ndarray,
    stratum: np.ndarray,
    *,
    alpha: float = DEFAULT_HOST_ALPHA,
    spec: MetricSpec = HOST_ERROR_SPEC,
    n_hosts: int | None = None,
    ejected: Iterable[str] = (),
    min_clusters: int = DEFAULT_MIN_CLUSTERS,
) -> HostJudgement:
    """Test each active host of one version against its pooled active peers.

    ``events``: 0/1 per request of the version (float NaN = not measured); ``hosts``: the upstream host
    that served each request (``None``/empty = unknown: left out); ``cluster``: the sticky-user key;
    ``stratum``: the stage of each request. ``n_hosts``: the version's host count for the alpha split
    (default: the distinct hosts seen). ``ejected``: hosts already out (their rows are left out).
    """
    if not (0.0 < alpha < 1.0):
        raise ValueError("alpha must be in (0, 1)")
    h = np.asarray(hosts, dtype=object).reshape(-1)
    gone = set(ejected)
    known = np.array([bool(x) for x in h], dtype=bool) if h.size else np.zeros(0, dtype=bool)
    seen = sorted({str(x) for x in h[known]})
    n = max(int(n_hosts or 0), len(set(seen) | gone))
    per = alpha / max(1, n)
    active = tuple(x for x in seen if x not in gone)
    out: list[HostVerdict] = []
    if len(active) >= 2:
        hs = h.astype(str)
        keep = known & np.isin(hs, np.asarray(active, dtype=object).astype(str))
        ev = np.asarray(events)[keep]
        hk = hs[keep]
        cl = np.asarray(cluster)[keep]
        st = np.asarray(stratum)[keep]
        for x in active:
            is_x = hk == x
            v = evaluate_rate(ev, is_x, st, cl, spec, per, stratum=st, min_clusters=min_clusters)
            out.append(HostVerdict(x, v, tuple(p for p in active if p != x)))
    return HostJudgement(tuple(out), float(alpha), float(per), n, active, tuple(sorted(gone)))


def ejections(judgement: HostJudgement) -> list[HostVerdict]:
    """The hosts to eject now: shown worse, worst first (largest lower bound on host - peers), keeping at
    least one active host (never the last one: then the version's own verdict decides)."""
    worse = [hv for hv in judgement.hosts if hv.shown_worse]
    worse.sort(key=lambda hv: -(hv.verdict.interval[0] if hv.verdict.interval[0] is not None else 0.0))
    room = max(0, len(judgement.active) - 1)
    return worse[:room]


def suspect(judgement: HostJudgement) -> HostVerdict | None:
    """The one host that may carry the version's harm: the active host with the highest point ratio of
    its rate to its peers', when that ratio is beyond the host allowance (``1 + allowed``) and the host
    has events; ``None`` when no host stands out (or fewer than two are active)."""
    best, best_ratio = None, 0.0
    for hv in judgement.hosts:
        v = hv.verdict
        if v.canary is None or v.baseline is None or not (v.canary > 0):
            continue
        limit = float(v.details.get("count_test_rate_ratio", 1.0 + DEFAULT_HOST_ALLOWED))  # 1 + the host allowance
        ratio = v.canary / v.baseline if v.baseline > 0 else float("inf")
        if ratio >= limit and ratio > best_ratio:
            best, best_ratio = hv, ratio
    return best


def rows_without(hosts: np.ndarray, ejected: Sequence[str]) -> np.ndarray:
    """Mask of the rows not served by an ejected host (the version's verdict is computed on these)."""
    h = np.asarray(hosts, dtype=object).reshape(-1)
    if not ejected:
        return np.ones(h.size, dtype=bool)
    return ~np.isin(h.astype(str), np.asarray(list(ejected), dtype=object).astype(str))
