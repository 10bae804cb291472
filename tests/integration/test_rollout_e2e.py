"""End to end through the real Envoy, on a compressed schedule driven by the controller's promotion loop:
a good canary is promoted to 100%; one worse than the baseline but within its allowance (errors 2 % → 8 %,
+15 points allowed) is promoted too — the allowance is the contract; a bad one beyond it (2 % → 42 %) is
rolled back."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.harness import Client, Fleet, Proc, PY, requires_envoy

pytestmark = [requires_envoy, pytest.mark.envoy]

SPEC = """
rollout:
  model: chat
  canary: v2
  analysis_interval_s: 1
  alpha: 0.05
  steps:
    - {{weight_percent: 10, min_duration: 2s, min_canary_samples: 40}}
    - {{weight_percent: 30, min_duration: 2s, min_canary_samples: 80}}
    - {{weight_percent: 50, min_duration: 2s, min_canary_samples: 150}}
  promotion: {{max_duration: {max_duration}, preflight: drill}}
  metrics:
    - {{name: error_rate, gating: true, allowed: {{absolute: 0.15}}}}
    - {{name: output_tokens, gating: false, allowed: {{relative: 0.5}}}}
"""


def chat_server(tmp, version, *flags):
    p = Proc([PY, "-m", "lockgate.examples.chat_server", "--port", "0", "--version", version, "--latency-ms", "0",
              "--latency-jitter-ms", "0", "--tokens-mean", "20", "--tokens-sd", "3", *flags], tmp / f"chat-{version}.log")
    return p, int(p.ready_text.split()[1])


class Traffic:
    """Sticky users sending chat requests through Envoy until stopped (bounded by ``max_s``)."""

    def __init__(self, port: int, users: int = 600, threads: int = 3, max_s: float = 90):
        self.port, self.users, self.max_s = port, users, max_s
        self.stop = threading.Event()
        self.sent = 0
        self.threads = [threading.Thread(target=self._run, args=(i, threads), daemon=True) for i in range(threads)]

    def _run(self, i: int, n: int) -> None:
        c = Client(self.port)
        body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hello"}]}).encode()
        k = i
        deadline = time.monotonic() + self.max_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            c.request("/v1/chat/completions", {"x-user-id": f"user-{k % self.users}",
                                               "content-type": "application/json"}, "POST", body)
            self.sent += 1
            k += n
            time.sleep(0.004)
        c.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def status(fleet, model="chat"):
    r = fleet.cli("rollout", "status", model, "--json", check=True)
    return json.loads(r.stdout)["rollouts"][0]


def wait_status(fleet, wanted, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(fleet)
        if st["status"] in wanted:
            return st
        time.sleep(0.5)
    return status(fleet)


@pytest.mark.parametrize("canary_errors, bad", [("0.02", False), ("0.08", False), ("0.42", True)],
                         ids=["good-canary-promoted", "worse-within-allowance-promoted", "bad-canary-rolled-back"])
def test_rollout_end_to_end(tmp_path, canary_errors, bad):
    v1, p1 = chat_server(tmp_path, "v1", "--error-rate", "0.02", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--error-rate", canary_errors, "--seed", "2")
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}}]
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC.format(max_duration="10m"))
    try:
        with Fleet(tmp_path, models, with_controller=True) as fleet, Traffic(fleet.ports["listener"]):
            time.sleep(1.0)
            r = fleet.cli("rollout", "start", str(spec))
            assert r.returncode == 0, r.stderr + r.stdout
            assert "preflight drill: every Envoy ACKed" in r.stdout
            final = wait_status(fleet, ("promoted", "rolled_back", "inconclusive", "aborted"), 75)
            weights = fleet.route_weights(0)
            text = fleet.cli("rollout", "status", "chat").stdout
    finally:
        v1.stop()
        v2.stop()
    ev = final["last_eval"]
    verdicts = {v["metric"]: v for v in ev["verdicts"]}
    err = verdicts["error_rate"]
    assert err["allowed"] == pytest.approx(0.15)  # the rollback line: baseline + 15 points
    lo, hi = err["interval"]
    if bad:
        assert final["status"] == "rolled_back", text
        # shown worse beyond the allowance: the whole interval on canary - baseline lies above +0.15
        assert err["verdict"] == "fail" and lo > err["allowed"], err
        assert weights["chat/key/0"][0] == ("chat.v2", 0)
    else:
        assert final["status"] == "promoted", text
        # shown within the allowance: the whole interval lies below +0.15
        assert err["verdict"] == "pass" and hi < err["allowed"], err
        assert weights["chat/key/0"][0] == ("chat.v2", 10000)
        if canary_errors == "0.08":  # visibly worse than the baseline, and promoted all the same
            assert err["canary"] > err["baseline"] + 0.02, err
    assert "error_rate" in text and "verdict" in text


def test_controller_killed_mid_stage_resumes_same_stage_same_evidence(tmp_path):
    v1, p1 = chat_server(tmp_path, "v1", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--seed", "2")
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}}]
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC.format(max_duration="10m").replace("min_duration: 2s, min_canary_samples: 80",
                                                            "min_duration: 8s, min_canary_samples: 80"))
    try:
        with Fleet(tmp_path, models, with_controller=True) as fleet, Traffic(fleet.ports["listener"]):
            time.sleep(1.0)
            assert fleet.cli("rollout", "start", str(spec)).returncode == 0
            deadline = time.monotonic() + 40
            while (st := status(fleet))["stage"] < 1:
                assert time.monotonic() < deadline, st
                time.sleep(0.3)
            assert st["status"] == "running" and st["stage"] == 1
            fleet.procs["controller"].kill()
            # Weights stay where the decision left them while the controller is away.
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 3000)
            time.sleep(1.0)
            fleet.start_controller()
            again = status(fleet)
            assert (again["stage"], again["stage_started_at"], again["started_at"]) == \
                (st["stage"], st["stage_started_at"], st["started_at"])
            final = wait_status(fleet, ("promoted", "rolled_back", "inconclusive", "aborted"), 60)
    finally:
        v1.stop()
        v2.stop()
    assert final["status"] == "promoted"
    from lockgate.controller.decide.rollouts import RolloutStore

    store = RolloutStore(tmp_path / "state" / "rollouts.db")
    kinds = [(e["kind"], e["stage"]) for e in store.events(final["id"]) if e["kind"] not in ("alert", "registry")]
    store.close()
    advanced = [s for k, s in kinds if k == "advanced"]
    assert advanced == [1, 2], kinds  # each stage entered once: none skipped, none repeated
    assert kinds[-1] == ("promoted", 3)


def test_manual_pause_resume_abort_and_one_rollout_per_model(tmp_path):
    v1, p1 = chat_server(tmp_path, "v1", "--seed", "1")
    v2, p2 = chat_server(tmp_path, "v2", "--seed", "2")
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}}]
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC.format(max_duration="1h").replace("min_duration: 2s", "min_duration: 5m"))
    try:
        with Fleet(tmp_path, models, with_controller=True) as fleet, Traffic(fleet.ports["listener"], max_s=30):
            assert fleet.cli("rollout", "start", str(spec)).returncode == 0
            again = fleet.cli("rollout", "start", str(spec))
            assert again.returncode == 2 and "already has rollout #1" in again.stderr
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 1000)
            r = fleet.cli("rollout", "pause", "chat")
            assert r.returncode == 0 and "paused" in r.stdout
            assert status(fleet)["status"] == "paused"
            assert fleet.cli("rollout", "resume", "chat").returncode == 0
            assert status(fleet)["status"] == "running"
            r = fleet.cli("rollout", "abort", "chat")
            assert r.returncode == 0 and "aborted" in r.stdout and "reverted to v1 in" in r.stdout, r.stdout
            assert status(fleet)["status"] == "aborted"
            assert fleet.route_weights(0)["chat/key/0"][0] == ("chat.v2", 0)
            r = fleet.cli("rollout", "pause", "chat")
            assert r.returncode == 2 and "no active rollout" in r.stderr
            bad = tmp_path / "bad.yaml"
            bad.write_text("rollout:\n  model: chat\n  canary: v9\n  metrics: []\n")
            r = fleet.cli("rollout", "start", str(bad))
            assert r.returncode == 2 and "bad.yaml:3" in r.stderr and "v9" in r.stderr, r.stderr
    finally:
        v1.stop()
        v2.stop()
