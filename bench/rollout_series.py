"""Cost of the rollout state on the controller's /metrics (lockgate/controller/decide/rollout_series.py).

    .venv/bin/python bench/rollout_series.py [--models 10] [--gates 5] [--rounds 5]

* **per look**: ``RolloutSeries.looked`` as the promoter calls it after every judgement (a real spec, a
  ``StageDecision``, a summary with ``--gates`` verdicts), on the promotion loop;
* **per scrape**: rendering the registry holding only the rollout series for ``--models`` models with
  ``--gates`` gates each (``generate_latest``), on an HTTP worker thread.

Each is timed ``--rounds`` times with ``timeit`` (20,000 looks, 500 scrapes per round); the median and the
worst round are reported. Writes ``bench/results/rollout_series.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, save_json  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from lockgate.config import config_from_text  # noqa: E402
from lockgate.controller.decide.rollout_series import RolloutSeries  # noqa: E402
from lockgate.controller.decide.rollouts import Rollout  # noqa: E402
from lockgate.controller.decide.spec import spec_from_text  # noqa: E402
from lockgate.controller.decide.stages import StageDecision  # noqa: E402

SPEC = """
rollout:
  model: {model}
  canary: v2
  steps: [{{weight_percent: 1}}, {{weight_percent: 10}}, {{weight_percent: 50}}]
  metrics: [{{name: error_rate, allowed: {{absolute: 0.01}}}}]
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--gates", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    models = [f"m{i}" for i in range(a.models)]
    cfg = config_from_text("models:\n" + "".join(
        f"  - {{name: {m}, match: {{path_prefix: /{m}}}, stable: v1, versions: {{v1: {{endpoints: [\"127.0.0.1:1\"]}}, "
        f"v2: {{endpoints: [\"127.0.0.1:2\"]}}}}}}\n" for m in models))
    registry = CollectorRegistry()
    series = RolloutSeries(registry, models)
    verdict = {"verdict": "not-yet", "gating": True, "baseline": 0.02, "canary": 0.025, "n_baseline": 90000,
               "n_canary": 10000, "difference": 0.005, "allowed": 0.01}
    summary = {"verdicts": [dict(verdict, metric=f"gate_{g}") for g in range(a.gates)]}
    decision = StageDecision("hold", 1, 1000, ("minimum duration",))
    rollouts = []
    for i, m in enumerate(models):
        spec = spec_from_text(SPEC.format(model=m), f"{m}.yaml", cfg)
        r = Rollout(id=i + 1, model=m, canary="v2", baseline="v1", spec_text="", spec_source="", spec_hash="",
                    status="running", stage=1, started_at=0.0, stage_started_at=0.0, ended_at=None, created_by="b",
                    auto={}, last_eval=None, last_eval_at=None)
        rollouts.append((r, spec))
        series.looked(r, spec, decision, summary, 1.0)
    r0, spec0 = rollouts[0]
    look_us, scrape_ms = [], []
    for _ in range(a.rounds):
        look_us.append(timeit.timeit(lambda: series.looked(r0, spec0, decision, summary, 1.0), number=20000) / 20000 * 1e6)
        scrape_ms.append(timeit.timeit(lambda: generate_latest(registry), number=500) / 500 * 1e3)
    out = {"machine": machine(), "load": os.getloadavg(), "models": a.models, "gates": a.gates,
           "look_us": {"median": median(look_us), "max": max(look_us), "rounds": look_us},
           "scrape_ms": {"median": median(scrape_ms), "max": max(scrape_ms), "rounds": scrape_ms},
           "scrape_bytes": len(generate_latest(registry))}
    path = save_json("rollout_series.json", out)
    print(f"looked(): median {out['look_us']['median']:.1f} us (worst round {out['look_us']['max']:.1f}); "
          f"scrape of {a.models} models x {a.gates} gates: median {out['scrape_ms']['median']:.2f} ms "
          f"(worst {out['scrape_ms']['max']:.2f}), {out['scrape_bytes']} bytes; load {out['load']}; {path}")


if __name__ == "__main__":
    main()
