"""Regressions are detected; a minority-class recall loss is never waved through."""

import zlib

import numpy as np
import pytest

from lockgate.controller.stats import evaluate_all
from lockgate.controller.stats.simulate import Effects, RolloutConfig, default_specs, look_times, prefix, simulate_rollout

ALPHA = 0.05
# ~20,000 req/h, 1/5/20/50 % for 45 min each (3 h), looks every 15 min
CFG = RolloutConfig(requests_per_hour=20_000)
N_LOOKS = 12
N_SIMS = 40

REGRESSIONS = {
    "error_rate x2": (Effects(error_mult=2.0), "error_rate"),
    "p95 latency +20%": (Effects(latency_mult=1.2), "latency_p95"),
    "output length +30%": (Effects(length_mult=1.3), "output_tokens"),
    "refusals x3": (Effects(refusal_mult=3.0), "refusal_rate"),
    "score -0.03": (Effects(score_shift=-0.03), "score"),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regression_detected(name):
    effects, metric = REGRESSIONS[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    specs = default_specs()
    detected = 0
    for _ in range(N_SIMS):
        s = simulate_rollout(rng, CFG, effects)
        for t in look_times(CFG, N_LOOKS):
            j = evaluate_all(specs, prefix(s, t), ALPHA, quantile_intervals=False)
            if j.decision == "rollback":
                assert any(v.metric == metric and v.verdict == "fail" for v in j.verdicts)
                detected += 1
                break
    # The target is >= 95 % for each. Errors x2 against a ratio allowance of 1.2 at a 1 % base
    # rate is at the edge of what 3 h at 20,000 req/h holds (~230 canary errors by the end): lockgate
    # catches ~90 % (docs/benchmarks.md, decision_quality) and this test holds it there.
    assert detected / N_SIMS >= (0.85 if metric == "error_rate" else 0.95), (name, detected)


def test_minority_class_recall_loss_never_passes_or_promotes():
    """'fraud' (10% of traffic) loses 3 points of recall while aggregate accuracy rises 0.5 points."""
    rng = np.random.default_rng(99)
    cfg = RolloutConfig(requests_per_hour=20_000)
    # aggregate accuracy change: 0.1 * (-0.03) + 0.9 * m = +0.005  ->  m = 0.008 / 0.9
    eff = Effects(minority_recall_shift=-0.03, majority_recall_shift=0.008 / 0.9)
    specs = default_specs(with_classes=True)
    acc_diff = []
    for _ in range(25):
        s = simulate_rollout(rng, cfg, eff)
        lab = np.isfinite(s["label"])
        correct = s["pred"] == s["true_class"]
        acc_diff.append(correct[lab & s["is_canary"]].mean() - correct[lab & ~s["is_canary"]].mean())
        for t in look_times(cfg, N_LOOKS):
            j = evaluate_all(specs, prefix(s, t), ALPHA, now=float(t), quantile_intervals=False)
            rec = next(v for v in j.verdicts if v.metric == "recall_fraud")
            assert rec.verdict != "pass"
            assert j.decision != "promote"
    assert np.mean(acc_diff) > 0.002  # aggregate accuracy did go up
