"""No observation lost *silently* under steady load: 500 rps for 60 s through the real Envoy with full
capture (``capture.mode: inline``, the default; observability mode has no such guarantee, see
docs/observations.md "Capture modes").

Open-loop load (``bench/_loadgen.py``): request *i* is due at ``i / 500`` s whatever the server does, on
keep-alive connections (more are opened when all are busy), each with a unique ``x-request-id``. Then:
every request answered 200, the controller stored at most one observation per request sent (matched by
request id), and every request without one is counted — by Envoy (ext_proc message timeouts,
failure-mode-allowed, failed streams) or by the ext_proc's shipper (dropped). On a busy machine the ext_proc
may be starved past ``extproc_message_timeout_ms`` and Envoy then lets responses pass unobserved: that is
by design and counted, so this test does not require zero loss; the 0-loss figure at 1,000 rps for 5 min
is measured by ``bench/capture.py`` (docs/benchmarks.md). The achieved rate is printed, not asserted.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench._loadgen import OpenLoop
from tests.harness import PY, Fleet, Proc, requires_envoy

pytestmark = [requires_envoy, pytest.mark.envoy, pytest.mark.slow, pytest.mark.timeout(180)]

RPS = 500
DURATION_S = 60


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                total += s.value
    return total


def stored_ids(fleet: Fleet, prefix: str) -> set[str]:
    db = sqlite3.connect(f"file:{fleet.tmp / 'state' / 'observations.db'}?mode=ro", uri=True, timeout=10)
    try:
        return {rid for (rid,) in db.execute("SELECT client_request_id FROM observations "
                                             "WHERE client_request_id LIKE ?", (prefix + "-%",))}
    finally:
        db.close()


def envoy_extproc_stats(fleet: Fleet) -> dict[str, int]:
    out = {}
    for line in fleet.admin(0, "/stats?filter=ext_proc").splitlines():
        k, _, v = line.partition(": ")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def chat_fleet(tmp_path):
    up = Proc([PY, "-m", "lockgate.examples.chat_server", "--port", "0", "--version", "v1", "--seed", "1",
               "--latency-ms", "0", "--latency-jitter-ms", "0", "--tokens-mean", "10", "--tokens-sd", "0"],
              tmp_path / "chat.log")
    port = int(up.ready_text.split()[1])
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{port}"]}}}]
    fleet = Fleet(tmp_path, models, with_controller=True)
    try:
        fleet.start()
        fleet.procs["upstream"] = up
        yield fleet
    finally:
        fleet.stop()
        up.stop()


def counted_unobserved(fleet: Fleet) -> dict[str, int]:
    """What Envoy counts as responses it let pass without the ext_proc seeing them whole (the counters
    the controller exports as ``lockgate_envoy_extproc_unobserved``)."""
    stats = envoy_extproc_stats(fleet)
    return {n: stats.get(f"http.lockgate.ext_proc.lockgate.{n}", 0)
            for n in ("message_timeouts", "failure_mode_allowed", "streams_failed")}


def test_no_observation_lost_silently_at_500_rps(chat_fleet):
    f = chat_fleet
    port = f.ports["listener"]
    # warm-up (connections, Envoy's ext_proc stream, the controller's store); not counted below
    warm = OpenLoop("127.0.0.1", port, 100, 1, connections=4, id_prefix="warm").run()
    assert warm.status_counts == {200: warm.sent}, warm.summary()

    pids = {n: p.pid for n, p in f.procs.items()}
    cpu0 = {n: cpu_s(pid) for n, pid in pids.items()}
    load0 = os.getloadavg()
    r = OpenLoop("127.0.0.1", port, RPS, DURATION_S, connections=16, id_prefix="load", timeout_s=10).run()
    s = r.summary()
    s["cpu_pct_of_one_core"] = {n: round(100 * (cpu_s(pid) - cpu0[n]) / r.wall_s, 1) for n, pid in pids.items()}
    s["loadavg_before_after"] = (load0, os.getloadavg())
    print("load:", s)
    assert r.sent == r.planned == RPS * DURATION_S, s
    assert r.failures == 0, s
    assert r.status_counts == {200: r.sent}, s

    # every sent request is stored once; wait while the shipper drains (progress-bounded)
    want = set(r.ids)
    deadline = time.monotonic() + 30
    got: set[str] = set()
    last_n, last_progress = -1, time.monotonic()
    while time.monotonic() < deadline:
        try:
            got = stored_ids(f, "load")
        except sqlite3.OperationalError:  # store busy/absent: retry
            got = set()
        if len(got) >= len(want):
            break
        if len(got) != last_n:
            last_n, last_progress = len(got), time.monotonic()
        elif time.monotonic() - last_progress > 10:
            break
        time.sleep(0.25)

    metrics_port = f.ports["extproc_metrics"]
    dropped = metric(metrics_port, "lockgate_observations_dropped_total")
    queued = metric(metrics_port, "lockgate_observations_queued")
    missing = want - got
    unexpected = got - want
    diag = (f"sent {r.sent}, stored {len(got)}, missing {len(missing)} (e.g. {sorted(missing)[:5]}), "
            f"dropped {dropped}, queued {queued}, envoy ext_proc stats {envoy_extproc_stats(f)}, load {s}")
    assert not unexpected, diag
    counted = counted_unobserved(f)
    counted_total = sum(counted.values()) + int(dropped)
    print(f"stored {len(got)} of {r.sent} observations (achieved {r.achieved_rps:.1f} rps, lateness "
          f"p99 {r.lateness_ms(99):.2f} ms); missing {len(missing)}; counted by Envoy {counted}, dropped {dropped}; "
          f"latency p50 {r.latency_ms(50):.2f} ms p99 {r.latency_ms(99):.2f} ms")
    # a response Envoy let pass unobserved (failure_mode_allow) is counted there; one the shipper could not
    # queue is counted as dropped. A counted stream may still have given a (partial) observation, so
    # counted ≥ missing, not equal.
    assert len(missing) <= counted_total, f"{len(missing)} observations lost without being counted — {diag}"
