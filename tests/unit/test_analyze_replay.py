"""`lockgate analyze`: offline replay of recorded observations with the controller's own core."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.harness import REPO, _env

SPEC = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 60
  alpha: 0.05
  steps:
    - {weight_percent: 5, min_duration: 10m, min_canary_samples: 100}
    - {weight_percent: 20, min_duration: 10m, min_canary_samples: 300}
    - {weight_percent: 50, min_duration: 10m, min_canary_samples: 500}
  promotion: {max_duration: 24h, preflight: none}
  metrics:
    - {name: error_rate, allowed: {absolute: 0.01}}
    - {name: latency_p95, allowed: {relative: 0.2}}
"""


def write_stream(path, canary_error, seed=1, separate_labels=False):
    rng = np.random.default_rng(seed)
    t, rows = 1.8e9, []
    users = 4000
    salt = rng.integers(0, 10000, users)
    for bp, dur in ((500, 1800), (2000, 1800), (5000, 3600)):
        n = int(20000 / 3600 * dur)
        ts = t + np.sort(rng.uniform(0, dur, n))
        t += dur
        u = rng.integers(0, users, n)
        canary = salt[u] < bp
        err = rng.random(n) < np.where(canary, canary_error, 0.01)
        lat = rng.lognormal(5, 0.4, n)
        for i in range(n):
            rows.append({"ts": float(ts[i]), "request_id": f"r{len(rows)}", "model": "chat",
                         "version": "v2" if canary[i] else "v1", "role": "canary" if canary[i] else "baseline",
                         "weight": bp / 10000, "status_code": 500 if err[i] else 200, "timeout": False,
                         "latency_ms": float(lat[i]), "user_key": f"u{u[i]}"})
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def analyze(tmp_path, stream):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    r = subprocess.run([sys.executable, "-m", "lockgate", "-c", str(tmp_path / "none.yaml"), "analyze", "--spec",
                        str(spec), "--observations", str(stream)], capture_output=True, text=True, cwd=REPO,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_bad_canary_rolled_back_early_with_explained_reasons(tmp_path):
    write_stream(tmp_path / "bad.jsonl", canary_error=0.05)
    out = analyze(tmp_path, tmp_path / "bad.jsonl")
    assert out["decision"] == "rollback" and not out["stage"].startswith("stage 3/3")
    err = next(r for r in out["reasons"] if r["metric"] == "error_rate")
    assert err["verdict"] == "fail" and err["canary"] > err["baseline"]
    assert set(err) >= {"metric", "baseline", "canary", "interval", "allowed", "verdict"}
    assert err["interval"][0] > 0 and err["allowed"] == 0.01


def test_good_canary_promoted_at_last_stage(tmp_path):
    write_stream(tmp_path / "good.jsonl", canary_error=0.01, seed=2)
    out = analyze(tmp_path, tmp_path / "good.jsonl")
    assert out["decision"] == "promote" and out["stage"].startswith("stage 3/3")
    assert all(r["verdict"] == "pass" for r in out["reasons"] if r["gating"])


def test_bad_input_names_the_line(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"ts": 1, "request_id": "a", "model": "chat"}\n{not json\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    r = subprocess.run([sys.executable, "-m", "lockgate", "-c", str(tmp_path / "none.yaml"), "analyze", "--spec",
                        str(spec), "--observations", str(tmp_path / "broken.jsonl")], capture_output=True, text=True,
                       cwd=REPO, env=_env(), timeout=60)
    assert r.returncode == 2 and "line 2" in r.stderr, r.stderr


def test_start_and_until_bound_the_looks(tmp_path):
    write_stream(tmp_path / "bad.jsonl", canary_error=0.05)
    full = analyze(tmp_path, tmp_path / "bad.jsonl")
    assert full["looks_evaluated"] <= full["looks"] == 120 and full["looks_thinned"] is False
    spec = tmp_path / "spec.yaml"

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "lockgate", "-c", str(tmp_path / "none.yaml"), "analyze",
                               "--spec", str(spec), "--observations", str(tmp_path / "bad.jsonl"), *extra],
                              capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)

    t0 = 1.8e9
    r = run("--start", str(t0 + 30), "--until", "2027-01-15T08:10:00Z")  # = t0 + 600 s
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["looks"] == 10 and out["at_ts"] == t0 + 30 + 60 * out["looks_evaluated"]
    r = run("--until", "soon")
    assert r.returncode == 2 and "--start/--until" in r.stderr
