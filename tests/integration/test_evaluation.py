"""Response evaluation through the real Envoy: mirrored samples, out-of-band replays, evaluators,
similarity, retention, export (docs/evaluation.md). Every process started here is stopped by PID."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lockgate.controller.evaluate.evaluation import EvaluationStore
from tests.harness import Client, Fleet, Proc, PY, requires_envoy

pytestmark = [requires_envoy, pytest.mark.envoy]

#: a tiny OpenAI-compatible judge: every chat completion answers "Score: 8"; logs one line per request
JUDGE = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
log = open(sys.argv[1], "a")
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        log.write(json.dumps({"path": self.path, "model": body.get("model"),
                              "messages": body.get("messages")}) + "\n"); log.flush()
        out = json.dumps({"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": "Score: 8"}}]}).encode()
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out))); self.end_headers(); self.wfile.write(out)
    def log_message(self, *a): pass
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print("ready", s.server_address[1], flush=True)
s.serve_forever()
'''


def chat_server(tmp: Path, version: str, *extra: str) -> tuple[Proc, int, Path]:
    log = tmp / f"requests-{version}.jsonl"
    p = Proc([PY, "-m", "lockgate.examples.chat_server", "--port", "0", "--version", version, "--latency-ms", "0",
              "--latency-jitter-ms", "0", "--seed", "7", "--log-requests", str(log), *extra],
             tmp / f"chat-{version}.log")
    return p, int(p.ready_text.split()[1]), log


def log_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["request_id"] for line in path.read_text().splitlines() if line.strip()]


def chat_body(text: str, stream: bool = False) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def evaluations(fleet: Fleet) -> dict[tuple[str, str], dict]:
    try:
        store = EvaluationStore(fleet.tmp / "state" / "evaluation.db", read_only=True)
    except FileNotFoundError:
        return {}
    try:
        cols = store.fetch_evaluations("chat")
    finally:
        store.close()
    n = len(cols["request_id"])
    return {(cols["request_id"][i], cols["role"][i]): {k: v[i] for k, v in cols.items()} for i in range(n)}


def samples(fleet: Fleet) -> list[dict]:
    try:
        store = EvaluationStore(fleet.tmp / "state" / "evaluation.db", read_only=True)
    except FileNotFoundError:
        return []
    try:
        return store.samples()
    finally:
        store.close()


def wait_for(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def metrics(fleet: Fleet) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.ports['controller_http']}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def test_sampled_requests_are_replayed_to_both_versions_and_evaluated(tmp_path, procs):
    v1, p1, log1 = chat_server(tmp_path, "v1")
    v2, p2, log2 = chat_server(tmp_path, "v2", "--refusal-rate", "1.0")  # a canary that refuses everything
    procs += [v1, v2]
    versions = {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}
    models = [
        {"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1", "versions": versions,
         "evaluation": {"sample_rate": 1.0, "evaluator": "heuristic", "replay_headers": ["x-request-seed"]}},
        {"name": "legacy", "match": {"path_prefix": "/v1/completions"}, "stable": "v1", "versions": versions},
    ]
    fleet = Fleet(tmp_path, models, with_controller=True)
    procs.append(fleet)  # type: ignore[arg-type]  # stop() by PID at the end, like the others
    fleet.start()
    assert "sampler=" in fleet.procs["controller"].ready_text
    c = Client(fleet.ports["listener"])
    prompt = "Which canary rollout metric should the release team watch first?"

    # no canary yet: nothing to compare, nothing mirrored
    r = c.request("/v1/chat/completions", {"x-request-id": "before-canary", "x-user-id": "u0",
                                           "content-type": "application/json"}, "POST", chat_body(prompt))
    assert r.status == 200 and r.version == "v1"

    fleet.set_weight("chat", "v2", 50)
    fleet.set_weight("legacy", "v2", 50)
    ids = [f"eval-{i}" for i in range(8)]
    served = {}
    lg = {}  # the client's x-request-id -> lockgate's request id (samples and evaluations are keyed by it)
    for i, rid in enumerate(ids):
        r = c.request("/v1/chat/completions",
                      {"x-request-id": rid, "x-user-id": f"user-{i}", "x-request-seed": str(i),
                       "content-type": "application/json"}, "POST", chat_body(prompt, stream=(i == 0)))
        assert r.status == 200
        served[rid] = r.version
        lg[rid] = r.headers["x-lockgate-request-id"]
    for i in range(4):
        r = c.request("/v1/completions", {"x-request-id": f"legacy-{i}", "x-user-id": f"user-{i}",
                                          "content-type": "application/json"}, "POST",
                      json.dumps({"model": "m", "prompt": prompt}).encode())
        assert r.status == 200
    c.close()
    assert set(served.values()) == {"v1", "v2"}, served  # both versions served users

    evs = wait_for(lambda: (lambda e: e if len(e) >= 2 * len(ids) else None)(evaluations(fleet)))
    assert evs, (evaluations(fleet), (tmp_path / "controller.log").read_text()[-3000:])

    # samples: exactly the sampled chat requests, with the request id of their observation
    got = samples(fleet)
    assert sorted(s["request_id"] for s in got) == sorted(lg[rid] for rid in ids)
    assert all(s["model"] == "chat" and s["canary"] == "v2" and s["state"] == "done" for s in got)
    assert all(s["path"] == "/v1/chat/completions" and s["content_type"] == "application/json" for s in got)
    first = next(s for s in got if s["request_id"] == lg["eval-0"])
    assert json.loads(first["body"])["stream"] is True  # stored as sent
    assert json.loads(first["headers"]) == {"x-request-seed": "0"}
    obs = {o["client_request_id"]: o for o in fleet.wait_observations(len(ids) + 5)}
    for rid in ids:
        assert obs[rid]["model"] == "chat" and obs[rid]["version"] == served[rid]
        assert obs[rid]["request_id"] == lg[rid]

    # replays reached both versions directly (never through Envoy: no observation, not traffic)
    seen1, seen2 = log_ids(log1), log_ids(log2)
    for rid in ids:  # the original carries the client's x-request-id, each replay lockgate's id
        assert (seen1.count(rid), seen1.count(lg[rid])) == (int(served[rid] == "v1"), 1), (rid, served[rid])
        assert (seen2.count(rid), seen2.count(lg[rid])) == (int(served[rid] == "v2"), 1), (rid, served[rid])
    assert len(fleet.observations(model="chat")) == len(ids) + 1
    assert not any(o["replay"] for o in fleet.observations())

    # evaluations: one per version and request; the refusing canary scores lower on every request
    for rid in ids:
        base, can = evs[(lg[rid], "baseline")], evs[(lg[rid], "canary")]
        assert (base["version"], can["version"]) == ("v1", "v2")
        assert base["evaluator"] == "heuristic" and base["error"] is None and can["error"] is None
        assert 0.0 <= can["score"] <= 0.2 and can["score"] < base["score"] <= 1.0, (base, can)
        assert 0.0 <= base["similarity"] < 0.5 and base["similarity"] == can["similarity"]
        assert not base["is_canary"] and can["is_canary"]

    # a model without `evaluation` mirrors nothing; the model with it mirrored only after its canary
    assert fleet.stat(0, "cluster.lockgate_sampler.upstream_rq_total") == len(ids)
    assert seen1.count("before-canary") == 1 and "before-canary" not in seen2  # served, never replayed
    assert all(seen1.count(f"legacy-{i}") + seen2.count(f"legacy-{i}") == 1 for i in range(4))

    m = metrics(fleet)
    assert m[("lockgate_evaluation_samples_stored_total", frozenset({("model", "chat")}))] == len(ids)
    for role, version in (("baseline", "v1"), ("canary", "v2")):
        assert m[("lockgate_evaluation_replays_total", frozenset(
            {("model", "chat"), ("version", version), ("role", role), ("result", "ok")}))] == len(ids)
        assert m[("lockgate_evaluations_total", frozenset(
            {("model", "chat"), ("version", version), ("role", role), ("evaluator", "heuristic"),
             ("result", "scored")}))] == len(ids)

    # export: each chat observation carries its version's evaluator score and the similarity
    r = fleet.cli("observations", "export", "--model", "chat", check=True)
    lines = {o["client_request_id"]: o for o in map(json.loads, r.stdout.splitlines())}
    for rid in ids:
        role = "canary" if served[rid] == "v2" else "baseline"
        assert lines[rid]["evaluator_score"] == pytest.approx(evs[(lg[rid], role)]["score"])
        assert lines[rid]["similarity"] == pytest.approx(evs[(lg[rid], role)]["similarity"])
        assert lines[rid]["evaluator"] == "heuristic" and lines[rid]["evaluator_score_arrival_ts"] > 0
    assert "evaluator_score" not in lines["before-canary"]


def test_http_judge_similarity_and_retention_limit(tmp_path, procs):
    v1, p1, log1 = chat_server(tmp_path, "v1")
    v2, p2, log2 = chat_server(tmp_path, "v2")  # same seed: with x-request-seed replayed, same answers
    judge_log = tmp_path / "judge.jsonl"
    judge = Proc([PY, "-c", JUDGE, str(judge_log)], tmp_path / "judge.log")
    procs += [v1, v2, judge]
    judge_port = int(judge.ready_text.split()[1])
    models = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
               "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}},
               "evaluation": {"sample_rate": 1.0, "evaluator": "http", "max_samples": 3,
                              "replay_headers": ["x-request-seed"],
                              "judge": {"url": f"http://127.0.0.1:{judge_port}/v1/chat/completions",
                                        "model": "judge-1", "timeout_s": 5}}}]
    fleet = Fleet(tmp_path, models, with_controller=True)
    procs.append(fleet)  # type: ignore[arg-type]
    fleet.start()
    fleet.set_weight("chat", "v2", 30)
    c = Client(fleet.ports["listener"])
    ids = []  # lockgate's request ids
    for i in range(3):
        r = c.request("/v1/chat/completions", {"x-request-id": f"judge-{i}", "x-user-id": f"u{i}",
                                               "x-request-seed": str(i), "content-type": "application/json"}, "POST",
                      chat_body(f"Explain the rollout step number {i}."))
        assert r.status == 200
        ids.append(r.headers["x-lockgate-request-id"])
    evs = wait_for(lambda: (lambda e: e if len(e) >= 6 else None)(evaluations(fleet)))
    assert evs, (tmp_path / "controller.log").read_text()[-3000:]
    for rid in ids:
        for role in ("baseline", "canary"):
            e = evs[(rid, role)]
            assert e["evaluator"] == "http" and e["score"] == pytest.approx(7 / 9) and e["error"] is None
            assert e["similarity"] == 1.0  # same seed and replayed x-request-seed: identical answers
    calls = [json.loads(line) for line in judge_log.read_text().splitlines()]
    assert len(calls) == 6 and all(cl["model"] == "judge-1" and cl["path"] == "/v1/chat/completions"
                                   for cl in calls)
    assert any("Explain the rollout step number 1." in cl["messages"][-1]["content"] for cl in calls)

    # retention: at most max_samples rows, the oldest pruned first
    more = []
    for i in range(4):
        r = c.request("/v1/chat/completions", {"x-request-id": f"later-{i}", "x-user-id": f"w{i}",
                                               "content-type": "application/json"}, "POST",
                      chat_body("Summarize the canary."))
        assert r.status == 200
        more.append(r.headers["x-lockgate-request-id"])
    c.close()
    stored = wait_for(lambda: (lambda s: s if [x["request_id"] for x in s] == more[-3:] else None)(samples(fleet)),
                      timeout=10)
    assert [x["request_id"] for x in stored] == more[-3:], samples(fleet)
    m = metrics(fleet)
    assert m[("lockgate_evaluation_samples_pruned_total", frozenset({("model", "chat")}))] >= 4
