"""``lockgate rollout diagnose``: per-host breakdown and first failures on synthetic columns."""

from __future__ import annotations

import numpy as np
import pytest

from lockgate.controller.tell import diagnose as dg
def columns():
    rng = np.random.default_rng(7)
    rows = []
    t = 100.0
    for i in range(400):
        t += 0.01
        rows.append(("baseline", "v1", "10.0.0.1:80", 200, False, rng.normal(20, 2), 40, None))
    for i in range(100):  # canary on the good host (same GPU type)
        t += 0.01
        rows.append(("canary", "v2", "10.0.0.2:80", 200, False, rng.normal(21, 2), 41, None))
    for i in range(100):  # canary on "another GPU type": slow, every 4th fails, some unparseable 200s
        t += 0.01
        status = 500 if i % 4 == 0 else 200
        parse = "error_response" if status == 500 else ("bad_json" if i % 10 == 1 else None)
        rows.append(("canary", "v2", "10.0.0.3:80", status, i == 2, rng.normal(80, 5), 12, parse))
    n = len(rows)
    ts = 100.0 + np.arange(n) * 0.01
    ts = ts[::-1].copy()  # deliberately not in time order
    role, version, host, status, timeout, lat, tok, parse = zip(*rows)
    obj = lambda xs: np.array(xs, dtype=object)  # noqa: E731
    return {"ts": ts, "request_id": obj([f"r{i}" for i in range(n)]), "role": obj(role), "version": obj(version),
            "upstream_host": obj(host), "status_code": np.array(status, dtype=float),
            "timeout": np.array(timeout, dtype=bool), "latency_ms": np.array(lat, dtype=float),
            "output_tokens": np.array(tok, dtype=float), "parse_error": obj(parse)}


def test_per_host_breakdown():
    hosts = dg.per_host(columns())
    assert [(h["role"], h["host"]) for h in hosts] == [("baseline", "10.0.0.1:80"), ("canary", "10.0.0.2:80"),
                                                       ("canary", "10.0.0.3:80")]
    base, good, bad = hosts
    assert base["requests"] == 400 and base["errors"] == 0 and base["error_rate"] == 0
    assert good["error_rate"] == 0 and bad["requests"] == 100
    assert bad["errors"] == 26 and bad["error_rate"] == pytest.approx(0.26)  # 25 × 500 + one timeout
    assert bad["parse_errors"] == 10  # unparseable bodies among the non-5xx responses
    assert bad["latency_p50_ms"] == pytest.approx(80, abs=2) and good["latency_p50_ms"] == pytest.approx(21, abs=1)
    assert bad["latency_p95_ms"] > bad["latency_p50_ms"]
    assert bad["output_tokens_mean"] == 12 and good["output_tokens_mean"] == 41
    lines = dg.host_rows(hosts)
    assert "10.0.0.3:80" in lines[3] and "26.00%" in lines[3]


def test_per_host_unknown_status_and_missing_host():
    data = {"ts": np.array([1.0, 2.0]), "role": np.array(["canary", "canary"], dtype=object),
            "upstream_host": np.array([None, None], dtype=object), "status_code": np.array([np.nan, np.nan])}
    (h,) = dg.per_host(data)
    assert h["host"] == "(unknown)" and h["requests"] == 2 and h["error_rate"] is None
    assert h["latency_p50_ms"] is None and h["output_tokens_mean"] is None
    assert dg.per_host({"ts": np.zeros(0)}) == []


def test_first_failures_are_the_earliest_canary_failures():
    data = columns()
    ff = dg.first_failures(data, "canary", limit=5)
    assert len(ff) == 5
    assert [f["ts"] for f in ff] == sorted(f["ts"] for f in ff)
    assert all(f["host"] == "10.0.0.3:80" for f in ff)
    assert all(f["status"] == 500 or f["timeout"] or f["parse_error"] for f in ff)
    mask = dg.failed_mask(data) & (data["role"] == "canary")
    assert ff[0]["ts"] == data["ts"][mask].min()
    assert dg.first_failures(data, "baseline") == []


def test_render():
    data = columns()
    d = {"rollout": {"id": 3, "model": "chat", "baseline": "v1", "canary": "v2", "status": "rolled_back",
                     "stage": 0, "started_at": 0.0, "ended_at": 10.0},
         "window": {"since": 0.0, "until": 15.0}, "last_evaluation_at": 9.0, "decision": "rollback",
         "stage_decision": {"action": "rollback"},
         "verdicts": [{"metric": "error_rate", "verdict": "fail", "baseline": 0.0, "canary": 0.13,
                       "interval": [0.08, 0.2], "allowed": 0.05, "gating": True, "harmful": "increase",
                       "n_baseline": 400, "n_canary": 200, "reason": "worse beyond the allowance",
                       "details": {"rollback_line": 0.05}},
                      {"metric": "latency_mean", "verdict": "pass", "baseline": 20.0, "canary": 21.0,
                       "interval": [0.2, 1.5], "allowed": 2.0, "gating": True, "harmful": "increase",
                       "n_baseline": 400, "n_canary": 200, "reason": "within the allowance",
                       "details": {"rollback_line": 2.0}}],
         "hosts": dg.per_host(data), "first_failures": dg.first_failures(data), "observations": 600, "note": None}
    text = dg.render(d)
    assert "evidence per metric" in text and "allowed (rollback line)" in text
    # the failing metric: by how much it was shown worse, against the allowance (not against 0)
    assert "error_rate: shown worse than baseline by at least +0.08, allowed +0.05" in text
    assert "    worse beyond the allowance" in text and "fail (beyond the allowance)" in text
    # worse than the baseline (interval above 0) but within the allowed +2: a pass, no "worse" line for it
    assert "pass (within the allowance)" in text and "latency_mean: shown worse" not in text
    assert "per upstream host:" in text and "10.0.0.3:80" in text and "first failing canary requests:" in text
    assert "parse_error" in text


def test_diagnose_after_retention_says_pruned(tmp_path):
    from lockgate.controller.ingest.observations import ObservationStore
    from tests.unit.test_history import T0, build

    build(tmp_path)
    ObservationStore(tmp_path / "observations.db").close()
    d = dg.diagnose(tmp_path, 2, retention_days=30, now=T0 + 40 * 86400)
    assert d["observations"] == 0 and "pruned (retention 30 days)" in d["note"]
    assert d["verdicts"][0]["verdict"] == "fail"  # the recorded evidence stays
    fresh = dg.diagnose(tmp_path, 2, retention_days=30, now=T0 + 300)
    assert fresh["note"] == "no observations stored for this rollout's window"
    assert "pruned" in dg.render(d)
