"""Capacity-aware ramps, as a pure function (no I/O, no clock): can the canary's hosts take the next step?

A spec with ``capacity:`` (:class:`~.spec.capacity.CapacitySpec`) says what one canary host can serve
(requests/s and/or output tokens/s) and the share of it a step may use (``headroom``). Before the ramp
leaves a stage — the next stage, or the promotion to 100 % after the last one — the promotion loop
measures the model's traffic over the last ``window_s`` seconds (:class:`LoadInputs`, read from the
stored observations by :mod:`.capacity_watch`) and :func:`judge_capacity` projects it onto the canary:

* requests: ``total req/s × next share`` (all of the model's traffic, baseline and canary, so the
  projection does not depend on the few canary requests of a small stage);
* output tokens: that request rate × the canary's mean output tokens per request in the window
  (the whole model's mean while the canary has fewer than :data:`MIN_TOKEN_SAMPLES` counted responses);

and compares each with ``hosts × capacity per host × headroom`` (hosts: the canary version's
endpoints in lockgate.yaml). **Observed mode** (``latency_rise: F``, alone or with the above): the
canary's p50 latency over the last ``window_s`` seconds against its p50 over the first ``window_s``
seconds of the rollout (the first stage: its lightest load); beyond ``F`` times that, its hosts already
slow down with load and the next step would add more. When a projection exceeds its limit, or the
latency rose beyond ``F``, the step is not taken: the rollout *holds* at its current weight with the
numbers in the reason. A capacity hold never promotes and never
rolls back by itself; harm shown by a gating metric still rolls back (:func:`.stages.decide` asks the
capacity only when it would otherwise move the weight). :func:`capacity_json` is what ``rollout
status``, the deployment log and the report show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lockgate.controller.decide.spec import RolloutSpec
from lockgate.routing import TOTAL_WEIGHT_BP

#: counted canary responses (with output tokens) needed before the canary's own tokens per request is used
MIN_TOKEN_SAMPLES = 20
#: canary responses with a latency needed in each window before the observed mode compares p50s
MIN_LATENCY_SAMPLES = 30
#: a start p50 below this counts as this (ratios of sub-millisecond latencies are noise)
MIN_REFERENCE_MS = 1.0

__all__ = ["CapacityVerdict", "LoadInputs", "MIN_LATENCY_SAMPLES", "MIN_REFERENCE_MS", "MIN_TOKEN_SAMPLES",
           "capacity_json", "judge_capacity"]


@dataclass(frozen=True)
class LoadInputs:
    """The model's traffic over the last ``window_s`` seconds: every request (``requests``), the canary's
    (``canary_requests``), and the output tokens of the responses that report them (``tokens`` over
    ``token_responses``; the canary's ``canary_tokens`` over ``canary_token_responses``); ``hosts``: the
    canary version's endpoints in lockgate.yaml. Observed mode: the canary's p50 latency over the window
    (``canary_p50_ms`` of ``canary_latency_n`` responses) and over the first ``window_s`` seconds of the
    rollout (``start_p50_ms`` of ``start_latency_n``)."""

    window_s: float
    hosts: int
    requests: int = 0
    canary_requests: int = 0
    tokens: float = 0.0
    token_responses: int = 0
    canary_tokens: float = 0.0
    canary_token_responses: int = 0
    canary_p50_ms: float | None = None
    canary_latency_n: int = 0
    start_p50_ms: float | None = None
    start_latency_n: int = 0


@dataclass(frozen=True)
class CapacityVerdict:
    """``fits``: the next step's projected load is within the canary hosts' capacity (else: hold).
    ``reason``: one line with the numbers; ``numbers``: the same as data (status, log, report)."""

    fits: bool
    reason: str
    numbers: dict[str, Any]


def _share(bp: int) -> str:
    return f"{bp / 100:g}%"


def _rate(x: float) -> str:
    return f"{x:,.1f}" if x < 10 else f"{x:,.0f}"


def judge_capacity(spec: RolloutSpec, stage: int, load: LoadInputs) -> CapacityVerdict | None:
    """Whether the canary's hosts can take the step after ``stage`` (None: the spec has no capacity rule,
    or there is no next step). See the module docstring for the rule."""
    cap = spec.capacity
    if cap is None or stage >= len(spec.steps):
        return None
    current_bp = spec.steps[stage].weight_bp
    last = stage == len(spec.steps) - 1
    next_bp = TOTAL_WEIGHT_BP if last else spec.steps[stage + 1].weight_bp
    step_name = f"promotion to {_share(next_bp)}" if last else f"next step {_share(next_bp)}"
    window = max(load.window_s, 1e-9)
    total_rps = load.requests / window
    projected_rps = total_rps * next_bp / TOTAL_WEIGHT_BP
    if load.canary_token_responses >= MIN_TOKEN_SAMPLES:
        tokens_per_request, per_whom = load.canary_tokens / load.canary_token_responses, "the canary's"
    elif load.token_responses:
        tokens_per_request, per_whom = load.tokens / load.token_responses, "the model's"
    else:
        tokens_per_request, per_whom = None, ""
    numbers: dict[str, Any] = {
        "stage": stage, "current_bp": current_bp, "next_bp": next_bp, "hosts": load.hosts,
        "window_s": load.window_s, "requests": load.requests, "canary_requests": load.canary_requests,
        "total_rps": round(total_rps, 3), "canary_rps": round(load.canary_requests / window, 3),
        "projected_rps": round(projected_rps, 3), "headroom": cap.headroom,
        "requests_per_s_per_host": cap.requests_per_s_per_host, "tokens_per_s_per_host": cap.tokens_per_s_per_host,
    }
    where = f"holding at {_share(current_bp)}: "
    traffic = f"(traffic {_rate(total_rps)} req/s over the last {load.window_s:g} s)"
    if load.hosts <= 0:
        return CapacityVerdict(False, f"capacity: {where}{step_name} cannot be checked: the canary {spec.canary} "
                                      f"lists no hosts (endpoints) in lockgate.yaml", numbers)
    over: list[str] = []
    within: list[str] = []
    hosts = f"{load.hosts} canary host{'s' * (load.hosts != 1)}"
    if cap.requests_per_s_per_host is not None:
        limit = load.hosts * cap.requests_per_s_per_host * cap.headroom
        numbers["limit_rps"] = round(limit, 3)
        text = (f"{_rate(projected_rps)} req/s onto {hosts}, capacity {load.hosts} × "
                f"{cap.requests_per_s_per_host:g} × {cap.headroom:g} = {_rate(limit)} req/s")
        (over if projected_rps > limit else within).append(text)
    if cap.tokens_per_s_per_host is not None:
        limit = load.hosts * cap.tokens_per_s_per_host * cap.headroom
        numbers["limit_tps"] = round(limit, 3)
        if tokens_per_request is None:
            within.append("no output tokens reported in the window (tokens/s not projected)")
        else:
            projected_tps = projected_rps * tokens_per_request
            numbers["tokens_per_request"] = round(tokens_per_request, 3)
            numbers["projected_tps"] = round(projected_tps, 3)
            text = (f"{_rate(projected_tps)} tokens/s onto {hosts} ({_rate(projected_rps)} req/s × "
                    f"{tokens_per_request:.0f} tokens, {per_whom} mean), capacity {load.hosts} × "
                    f"{cap.tokens_per_s_per_host:g} × {cap.headroom:g} = {_rate(limit)} tokens/s")
            (over if projected_tps > limit else within).append(text)
    rose, latency = _latency(cap.latency_rise, spec, load, numbers)
    if over or rose:
        parts = ([f"{step_name} projects {'; and '.join(over)} {traffic}"] if over else
                 [f"before the {step_name}"]) + ([latency] if rose else [])
        return CapacityVerdict(False, f"capacity: {where}" + (": " if not over else "; and ").join(parts), numbers)
    parts = ([f"{step_name} projects {'; '.join(within)} {traffic}"] if within else [f"before the {step_name}"]) \
        + ([latency] if latency else [])
    return CapacityVerdict(True, "capacity: " + (": " if not within else "; ").join(parts) + ": fits", numbers)


def _latency(rise: float | None, spec: RolloutSpec, load: LoadInputs, numbers: dict[str, Any]) -> tuple[bool, str]:
    """Observed mode: (whether the canary's p50 latency rose beyond ``rise``, the sentence saying so)."""
    if rise is None:
        return False, ""
    numbers.update(latency_rise=rise, canary_p50_ms=load.canary_p50_ms, canary_latency_n=load.canary_latency_n,
                   start_p50_ms=load.start_p50_ms, start_latency_n=load.start_latency_n)
    if (load.canary_p50_ms is None or load.start_p50_ms is None or load.canary_latency_n < MIN_LATENCY_SAMPLES
            or load.start_latency_n < MIN_LATENCY_SAMPLES):
        return False, (f"the canary's p50 latency is not compared yet ({load.start_latency_n} of "
                       f"{MIN_LATENCY_SAMPLES} responses in the first {load.window_s:g} s of the rollout, "
                       f"{load.canary_latency_n} of {MIN_LATENCY_SAMPLES} in the last {load.window_s:g} s)")
    ratio = load.canary_p50_ms / max(load.start_p50_ms, MIN_REFERENCE_MS)
    numbers["latency_ratio"] = round(ratio, 3)
    start = f"the first {load.window_s:g} s of the rollout, at {_share(spec.steps[0].weight_bp)}"
    if ratio > rise:
        return True, (f"the canary's p50 latency rose from {load.start_p50_ms:.0f} ms ({start}) to "
                      f"{load.canary_p50_ms:.0f} ms over the last {load.window_s:g} s (×{ratio:.2f}, more than the "
                      f"allowed ×{rise:g}): its hosts slow down with load")
    return False, (f"the canary's p50 latency {load.canary_p50_ms:.0f} ms over the last {load.window_s:g} s vs "
                   f"{load.start_p50_ms:.0f} ms in {start} (×{ratio:.2f}, within ×{rise:g})")


def capacity_json(verdict: CapacityVerdict | None, held: bool) -> dict[str, Any] | None:
    """The capacity of the current stage for ``rollout status``, the log and the report (None: no rule).
    ``held``: the look's decision is a hold because of it."""
    if verdict is None:
        return None
    return {"fits": verdict.fits, "holding": held, "reason": verdict.reason, **verdict.numbers}
