"""``lockgate analyze``: replay the controller's decisions on recorded observations, offline.

Observations (JSONL from ``lockgate observations export``, see docs/observations.md) are taken in
time order and evaluated at the looks the live controller would have made (every
``analysis_interval_s`` from the first observation), with the same pure core
(:func:`analysis.evaluate_at` + :func:`stages.decide`). The stage in force at a look is the one
whose weight the recorded requests were routed with. The first look that rolls back or promotes
is the answer (found by a coarse pass and a binary search, so 1M observations take seconds, not one
evaluation per look); otherwise the result is ``continue`` at the last look.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lockgate.controller import analysis
from lockgate.controller.export import read_jsonl
from lockgate.controller.spec import RolloutSpec, load_spec
from lockgate.controller.stages import StageState, decide, stage_label

MAX_LOOKS = 500  #: beyond this, looks are thinned evenly (any subset of looks stays anytime-valid)
COARSE_LOOKS = 12  #: looks evaluated before the binary search for the first deciding one


def _stage_of(spec: RolloutSpec, weight_bp: float) -> int:
    """Index of the step whose weight is closest to ``weight_bp`` from below (0 if below the first)."""
    idx = 0
    for i, step in enumerate(spec.steps):
        if weight_bp + 0.5 >= step.weight_bp:
            idx = i
    return idx


def replay(spec: RolloutSpec, data: dict[str, np.ndarray], auto: dict[str, Any] | None = None) -> dict:
    ts = np.asarray(data.get("ts", np.zeros(0)), dtype=float)
    if ts.size == 0:
        raise ValueError("no observations of this model in the file")
    order = np.argsort(ts, kind="stable")
    data = {k: np.asarray(v)[order] if np.asarray(v).shape[:1] == ts.shape else v for k, v in data.items()}
    ts = ts[order]
    start, end = float(ts[0]), float(ts[-1])
    n_looks = max(1, int(math.floor((end - start) / spec.analysis_interval_s)) + 1)
    looks = start + spec.analysis_interval_s * np.arange(1, n_looks + 1)
    looks[-1] = max(looks[-1], end)
    thinned = False
    if looks.size > MAX_LOOKS:
        looks = looks[np.unique(np.linspace(0, looks.size - 1, MAX_LOOKS).round().astype(int))]
        thinned = True
    weight_bp = np.nan_to_num(np.asarray(data.get("weight", np.zeros(ts.size)), dtype=float)) * 10000
    role = np.asarray(data.get("role", np.full(ts.size, None)), dtype=object)
    canary_rows = role == "canary"

    def at(now: float) -> dict:
        upto = ts <= now
        current_bp = float(weight_bp[upto][-1]) if upto.any() else 0.0
        stage = _stage_of(spec, current_bp)
        stage_rows = upto & (np.abs(weight_bp - spec.steps[stage].weight_bp) < 0.5)
        stage_start = float(ts[stage_rows][0]) if stage_rows.any() else float(now)
        judgement = analysis.evaluate_at(spec, data, float(now), auto)
        decision = decide(spec, StageState("running", stage, start, stage_start), judgement, float(now),
                          int(np.count_nonzero(stage_rows & canary_rows)))
        return {
            "decision": {"rollback": "rollback", "promote": "promote"}.get(decision.action, "continue"),
            "at_ts": float(now), "stage": stage_label(spec, stage),
            "reasons": [_reason(v) for v in judgement.verdicts],
            "stage_reasons": list(decision.reasons), "alpha_statement": judgement.alpha_statement,
        }

    # Coarse pass over the looks, then a binary search for the first deciding look between the last
    # coarse look that continued and the first that decided (evidence only accumulates, so once a
    # harm or non-inferiority bound is crossed it stays crossed at later looks).
    cache: dict[int, dict] = {}

    def look(i: int) -> dict:
        if i not in cache:
            cache[i] = at(float(looks[i]))
        return cache[i]

    coarse = sorted(set(np.linspace(0, looks.size - 1, min(looks.size, COARSE_LOOKS)).round().astype(int)))
    result = look(coarse[-1])
    prev = -1
    for i in coarse:
        if look(i)["decision"] != "continue":
            lo, hi = prev + 1, i  # first deciding look is in [lo, hi]
            while lo < hi:
                mid = (lo + hi) // 2
                if look(mid)["decision"] != "continue":
                    hi = mid
                else:
                    lo = mid + 1
            result = look(hi)
            break
        prev = i
    result.update({"looks": int(looks.size), "looks_thinned": thinned, "looks_evaluated": len(cache)})
    return result


def _reason(v) -> dict:
    d = v.to_dict()
    return {"metric": d["metric"], "baseline": d["baseline"], "canary": d["canary"], "interval": d["interval"],
            "allowed": d["allowed"], "verdict": d["verdict"], "gating": d["gating"], "n_baseline": d["n_baseline"],
            "n_canary": d["n_canary"], "reason": d["reason"]}


def analyze_file(spec_path: str, observations_path: str, config_path: str | None = None) -> dict:
    config = None
    if config_path:
        from lockgate.config import load_config

        config = load_config(config_path)
    spec = load_spec(spec_path, config)
    if any(m.allowed_mode == "auto" for m in spec.metrics):
        raise ValueError("the spec uses allowed: auto; offline analysis needs explicit allowed changes "
                         "(auto is derived from the live baseline history at rollout start)")
    with open(Path(observations_path), encoding="utf-8") as f:
        data = read_jsonl(f, spec.model)
    return replay(spec, data)
