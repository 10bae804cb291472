"""The shadow stage (``rollout.shadow``, docs/rollout-spec.md "Shadow stage"): before any user sees the
canary, Envoy mirrors a share of the model's requests to it (weight 0, the canary's shadow cluster) and
the gates compare the canary's answer to the baseline's answer *of the same request*.

A rollout with a shadow stage stays ``pending`` while in shadow (no user-facing stage has started;
``stage_started_at`` of the first step is set when it does). The promotion loop calls
:meth:`ShadowStage.step` for it at every look:

1. the first call pushes weight 0 with the mirror (``mirror_ppm``: ``min(mirror_percent,
   max_rps / the baseline's observed requests/s)``, re-pushed when the traffic moves it by more than a
   quarter) under the stage label ``#<id>:shadow`` and logs a ``shadow`` event;
2. each later call pairs every ``shadow`` row with the baseline row of the user request it mirrors
   (:func:`lockgate.routing.paired_request_id`) and judges the rollout's own gating metrics with the
   statistics core on the pairs (:func:`paired_columns`: each pair is one cluster, the canary share 0.5:
   the cluster-robust tests then compare the two answers to the same input);
3. a gating metric shown worse beyond its allowance rolls the canary back (the mirror goes with the
   weight: no user ever saw it); ``min_duration`` and ``min_pairs`` reached with no failure: the first
   user-facing step starts (its push carries no mirror).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from lockgate.controller.decide import analysis
from lockgate.controller.decide.spec import RolloutSpec
from lockgate.controller.ingest.schema import DECISION_COLUMNS
from lockgate.routing import MILLION, paired_request_id

#: the mirror share is pushed again only when the traffic moves the wanted share by more than this ratio
REPUSH_RATIO = 1.25
RATE_WINDOW_S = 60.0


def mirror_ppm(mirror_percent: float, max_rps: float, baseline_rps: float | None) -> int:
    """The share of requests to mirror, parts per million: ``mirror_percent``, lowered so that the
    mirrored requests stay at or below ``max_rps`` at the observed rate (None or 0: not known yet)."""
    want = mirror_percent / 100
    if baseline_rps:
        want = min(want, max_rps / baseline_rps)
    return max(1, min(MILLION, round(want * MILLION)))


def baseline_rate(data: Mapping[str, np.ndarray], now: float, window_s: float = RATE_WINDOW_S) -> float | None:
    """Baseline requests/s over the last ``window_s`` (None before any baseline row)."""
    ts = np.asarray(data.get("ts", []), dtype=float)
    role = np.asarray(data.get("role", []), dtype=object)
    base = ts[role == "baseline"]
    if base.size == 0:
        return None
    start = max(now - window_s, float(base.min()))
    recent = np.count_nonzero(base >= start)
    return recent / max(1.0, now - start)


def paired_columns(data: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """The pairs of ``data`` as the statistics core's two arms: every ``shadow`` row whose user request's
    baseline row is present (role ``baseline`` → the baseline arm, the shadow → ``canary``), both with
    ``user_key`` = that request id (one cluster per pair) and ``weight`` 0.5; other rows are left out.
    Returns the columns and the number of pairs."""
    n = int(np.asarray(data.get("ts", [])).size)
    role = np.asarray(data.get("role", [None] * n), dtype=object)
    rid = np.asarray(data.get("request_id", [None] * n), dtype=object)
    base_at = {r: i for i, r in enumerate(rid) if role[i] == "baseline"}
    b_idx, s_idx = [], []
    for i in np.flatnonzero(role == "shadow"):
        j = base_at.get(paired_request_id(rid[i]) or "")
        if j is not None:
            b_idx.append(j)
            s_idx.append(int(i))
    idx = np.asarray(b_idx + s_idx, dtype=np.int64)
    k = len(b_idx)
    out: dict[str, np.ndarray] = {}
    for name, col in data.items():
        arr = np.asarray(col)
        if arr.shape[:1] == (n,):
            out[name] = arr[idx]
    out["role"] = np.asarray(["baseline"] * k + ["canary"] * k, dtype=object)
    out["user_key"] = np.asarray([rid[j] for j in b_idx] * 2, dtype=object)
    out["weight"] = np.full(2 * k, 0.5)
    return out, k


def judge_pairs(spec: RolloutSpec, data: Mapping[str, np.ndarray], now: float,
                auto: Mapping[str, Any] | None = None) -> tuple[Any, int]:
    """The statistics core's judgement of ``spec``'s metrics on the paired answers, and the pair count."""
    paired, k = paired_columns(data)
    return analysis.evaluate_at(spec, paired, now, auto), k


def shadow_decision(spec: RolloutSpec, judgement: Any, pairs: int, started_at: float, now: float
                    ) -> tuple[str, tuple[str, ...]]:
    """``rollback`` | ``advance`` (to the first user-facing step) | ``hold``, with the reasons."""
    sh = spec.shadow
    failed = [v for v in judgement.verdicts if v.gating and v.verdict == "fail"]
    if judgement.decision == "rollback":
        names = ", ".join(v.metric for v in failed) or "a gating metric"
        return "rollback", (f"shadow: {names} shown worse than the baseline beyond the allowance on {pairs} "
                            f"paired answers; no user saw the canary",)
    elapsed = now - started_at
    missing = []
    if elapsed < sh.min_duration_s:
        missing.append(f"{elapsed:.0f} of {sh.min_duration_s:g} s in shadow")
    if pairs < sh.min_pairs:
        missing.append(f"{pairs} of {sh.min_pairs} paired answers")
    if missing:
        return "hold", ("shadow: " + ", ".join(missing),)
    return "advance", (f"shadow passed: {pairs} paired answers over {elapsed:.0f} s, no gating metric shown worse "
                       f"beyond its allowance",)


class ShadowStage:
    """The promoter's shadow-stage step (state kept per rollout: the pushed share and the last look)."""

    def __init__(self) -> None:
        self._pushed: dict[int, int] = {}
        self._looked: dict[int, float] = {}

    async def step(self, promoter: Any, rollout: Any, spec: RolloutSpec) -> dict | None:
        """One look at a pending rollout with a shadow stage. Returns a dict to answer the caller with
        while the rollout stays in shadow (or was rolled back), None when the shadow passed (the caller
        then starts the first user-facing step)."""
        rollouts, now = promoter.rollouts, time.time()
        sh = spec.shadow
        started = rollouts.last_event(rollout.id, "shadow")
        label = f"#{rollout.id}:shadow"
        if started is None:
            ppm = mirror_ppm(sh.mirror_percent, sh.max_rps, None)
            resp = await promoter.weights.set_weight(rollout.model, rollout.canary, 0, actor="controller",
                                                     reason=f"rollout #{rollout.id} shadow", stage=label,
                                                     timeout_s=5.0, deadline_s=10.0, mirror_ppm=ppm)
            if not resp.all_acked:
                rollouts.event(rollout.id, "push_incomplete", "controller",
                               {"wanted_bp": 0, "mirror_ppm": ppm, "not_acked": list(resp.not_acked),
                                "message": resp.message}, 0)
                return {"shadow": {"all_acked": False, "not_acked": list(resp.not_acked)}}
            self._pushed[rollout.id] = ppm
            detail = {"mirror_ppm": ppm, "ack_ms": resp.elapsed_ms, "shadow": sh.canonical(),
                      "reasons": [sh.describe()]}
            rollouts.event(rollout.id, "shadow", "controller", detail, 0)
            promoter.emit("shadow", rollout.id, detail)
            return {"shadow": {"all_acked": True, "mirror_ppm": ppm, "elapsed_ms": resp.elapsed_ms}}
        if now - self._looked.get(rollout.id, 0.0) < spec.analysis_interval_s:
            return {"shadow": "waiting"}
        self._looked[rollout.id] = now
        data = promoter.observations.fetch(rollout.model, since_ts=started["ts"],
                                           versions=[rollout.baseline, rollout.canary],
                                           columns=list(DECISION_COLUMNS))
        judgement, pairs = judge_pairs(spec, data, now, rollout.auto_values())
        action, reasons = shadow_decision(spec, judgement, pairs, started["ts"], now)
        summary = judgement.to_dict()
        summary["shadow"] = {"pairs": pairs, "action": action, "mirror_ppm": self._pushed.get(rollout.id)}
        summary["stage_decision"] = {"action": action, "reasons": list(reasons)}
        summary["n_baseline"] = summary["n_canary"] = pairs  # the two answers of each pair
        summary["canary_samples_in_stage"] = pairs
        summary["requests_per_hour"] = (baseline_rate(data, now) or 0.0) * 3600
        rollouts.record_evaluation(rollout.id, now, 0, 0, summary)
        if action == "rollback":
            from lockgate.controller.decide.stages import StageDecision

            await promoter.revert(rollout, spec, StageDecision("rollback", 0, 0, reasons), summary, time.time(),
                                  actor="controller")
            self._forget(rollout.id)
            return {"shadow": {"rolled_back": True, "reasons": list(reasons)}}
        if action == "advance":
            rollouts.event(rollout.id, "shadow_passed", "controller",
                           {"reasons": list(reasons), "pairs": pairs, "verdicts": summary.get("verdicts")}, 0)
            self._forget(rollout.id)
            return None
        rate = baseline_rate(data, now)
        ppm = mirror_ppm(sh.mirror_percent, sh.max_rps, rate)
        pushed = self._pushed.get(rollout.id)
        if pushed is None or not pushed / REPUSH_RATIO <= ppm <= pushed * REPUSH_RATIO:
            resp = await promoter.weights.set_weight(
                rollout.model, rollout.canary, 0, actor="controller", stage=label, timeout_s=5.0, deadline_s=10.0,
                reason=f"rollout #{rollout.id} shadow: {rate or 0:.1f} baseline requests/s, mirror at most "
                       f"{sh.max_rps:g}/s", mirror_ppm=ppm)
            if resp.all_acked:
                self._pushed[rollout.id] = ppm
        return {"shadow": {"hold": list(reasons), "pairs": pairs}}

    def _forget(self, rollout_id: int) -> None:
        self._pushed.pop(rollout_id, None)
        self._looked.pop(rollout_id, None)


def in_shadow(spec: RolloutSpec, rollouts: Any, rollout_id: int) -> bool:
    """The rollout has a shadow stage that has not passed yet."""
    return spec.shadow is not None and rollouts.last_event(rollout_id, "shadow_passed") is None


__all__ = ["ShadowStage", "baseline_rate", "in_shadow", "judge_pairs", "mirror_ppm", "paired_columns",
           "shadow_decision"]
