"""Evaluation parts without Envoy: heuristic evaluator, similarity, text extraction, judge parsing and
calls, config validation, mirror policies, the sample store's retention and the sampler's HTTP parsing."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lockgate.config import ConfigError, config_from_text
from lockgate.controller.evaluate.evaluation import (
    EvaluationMetrics, EvaluationRow, EvaluationStore, Sample, pick_endpoint, replay_headers,
)
from lockgate.controller.evaluate.evaluators import (
    HeuristicEvaluator, HttpJudgeEvaluator, judge_request, make_evaluator, parse_judge_score, run_score,
)
from lockgate.controller.ingest.export import add_evaluation
from lockgate.controller.evaluate.similarity import CharNgramCosine, TokenJaccard, make_similarity, safe_compare
from lockgate.controller.evaluate.texts import extract_prompt, extract_text, replay_body

PROMPT = "What is the capital of France, and why is it important?"
GOOD = ("Paris is the capital of France. It is important because it is the political, economic and cultural "
        "centre of the country.")


# ----- heuristic evaluator -----
@pytest.mark.parametrize("answer, lo, hi", [
    (GOOD, 0.9, 1.0),
    ("", 0.0, 0.0),
    ("   \n ", 0.0, 0.0),
    ("the the the the the the the the the the the the", 0.0, 0.4),
    ("I like it. I like it. I like it. I like it. I like it. I like it.", 0.0, 0.4),
    ("I'm sorry, but I can't help with that.", 0.0, 0.2),
    ("Bananas are rich in potassium and grow in tropical climates around the world.", 0.5, 0.7),
    ("@@ ## $$ %% ^^ && ** (( )) !! ~~ ++", 0.0, 0.0),
])
def test_heuristic_clear_cases(answer, lo, hi):
    s = HeuristicEvaluator().score(PROMPT, answer)
    assert lo <= s <= hi, (answer, s, HeuristicEvaluator().components(PROMPT, answer))


def test_heuristic_orders_and_is_deterministic():
    h = HeuristicEvaluator()
    on_topic = h.score(PROMPT, GOOD)
    off_topic = h.score(PROMPT, "Bananas are rich in potassium and grow in tropical climates.")
    looping = h.score(PROMPT, "France France France France France France France France France")
    refusal = h.score(PROMPT, "I cannot help with that request about France.")
    assert on_topic > off_topic > looping and off_topic > refusal
    assert h.score(PROMPT, GOOD) == on_topic
    # far too long for a short prompt is penalised, gently
    long = " ".join(f"word{i} capital France" for i in range(400))
    assert 0.3 < h.score(PROMPT, long) < on_topic
    # a prompt without content words does not penalise relevance
    assert h.score("hi", "Hello! How can I help you today?") > 0.9
    for a in (GOOD, "", "x", "the the", "I'm sorry, but I can't help with that."):
        assert 0.0 <= h.score(PROMPT, a) <= 1.0


def test_run_score_is_safe():
    class Broken:
        name = "broken"

        def score(self, prompt, answer):
            raise RuntimeError("boom")

    class Wild:
        name = "wild"

        def __init__(self, v):
            self.v = v

        async def score(self, prompt, answer):
            return self.v

    assert asyncio.run(run_score(Broken(), "p", "a")) is None
    assert asyncio.run(run_score(Wild(7.0), "p", "a")) == 1.0
    assert asyncio.run(run_score(Wild(-1), "p", "a")) == 0.0
    assert asyncio.run(run_score(Wild(math.nan), "p", "a")) is None
    assert asyncio.run(run_score(Wild(None), "p", "a")) is None
    assert asyncio.run(run_score(Wild("x"), "p", "a")) is None
    assert asyncio.run(run_score(HeuristicEvaluator(), PROMPT, GOOD)) == HeuristicEvaluator().score(PROMPT, GOOD)


# ----- similarity -----
def test_char3_cosine():
    sim = CharNgramCosine()
    assert sim.name == "char3"
    assert sim.compare("The canary is healthy.", "the  canary IS healthy.") == pytest.approx(1.0)
    assert sim.compare("", "") == 1.0 and sim.compare("", "x") == 0.0 and sim.compare("ab", "") == 0.0
    close = sim.compare("The canary rollout is healthy", "The canary rollouts are healthy")
    far = sim.compare("The canary rollout is healthy", "Bananas grow in tropical climates")
    assert 0.6 < close < 1.0 and 0.0 <= far < 0.3 and close > far
    assert sim.compare("a", "a") == 1.0  # shorter than n
    assert sim.compare("abc def", "def abc") == sim.compare("def abc", "abc def")  # symmetric


def test_token_jaccard_and_factory():
    j = TokenJaccard()
    assert j.compare("a b c", "b c d") == pytest.approx(2 / 4)
    assert j.compare("", "") == 1.0 and j.compare("a", "") == 0.0
    assert make_similarity(None) is None
    assert isinstance(make_similarity("char3"), CharNgramCosine)
    assert isinstance(make_similarity("jaccard"), TokenJaccard)
    plug = make_similarity("lockgate.controller.evaluate.similarity:TokenJaccard")
    assert plug.compare("x y", "x y") == 1.0
    with pytest.raises(ImportError):
        make_similarity("no.such.module:Thing")

    class Bad:
        def compare(self, a, b):
            raise ValueError

    assert safe_compare(Bad(), "a", "b") is None


# ----- text extraction -----
def test_extract_text_shapes():
    chat = {"choices": [{"message": {"role": "assistant", "content": "Hello there"}}]}
    assert extract_text(json.dumps(chat).encode(), "application/json") == "Hello there"
    parts = {"choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}}]}
    assert extract_text(json.dumps(parts).encode(), None) == "ab"
    refusal = {"choices": [{"message": {"content": None, "refusal": "I can't"}}]}
    assert extract_text(json.dumps(refusal).encode(), None) == "I can't"
    tools = {"choices": [{"message": {"content": None, "tool_calls": []}}]}
    assert extract_text(json.dumps(tools).encode(), None) == ""
    assert extract_text(b'{"choices": [{"text": "legacy"}]}', "application/json") == "legacy"
    assert extract_text(b'{"label": "spam", "score": 0.9}', None) == "spam"
    assert extract_text(b'{"probs": {"ham": 0.2, "spam": 0.8}}', None) == "spam"
    assert extract_text(b'{"probs": [0.1, 0.9], "labels": ["a", "b"]}', None) == "b"
    assert extract_text(b'[[{"label": "x", "score": 0.1}, {"label": "y", "score": 0.7}]]', None) == "y"
    assert extract_text(b'[{"generated_text": "gen"}]', None) == "gen"
    assert extract_text(b"plain words", "text/plain; charset=utf-8") == "plain words"
    sse = (b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
           b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
           b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\ndata: {"choices":[],"usage":{}}\n\ndata: [DONE]\n\n')
    assert extract_text(sse, "text/event-stream") == "Hello"
    assert extract_text(b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\n', None) == "ab"
    # no answer
    assert extract_text(b'{"error": {"message": "bad"}}', "application/json") is None
    assert extract_text(b'{"choices": []}', None) is None
    assert extract_text(b"{not json", "application/json") is None
    assert extract_text(b"\xff\xfe", None) is None
    assert extract_text(b'{"other": 1}', None) is None


def test_extract_prompt_and_replay_body():
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                         {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": [{"type": "text", "text": "second"}]}]}
    assert extract_prompt(json.dumps(chat).encode()) == "second"
    assert extract_prompt(b'{"messages": [{"role": "system", "content": "only system"}]}') == "only system"
    assert extract_prompt(b'{"prompt": ["a", "b"]}') == "a\nb"
    assert extract_prompt(b'{"text": "classify me"}') == "classify me"
    assert extract_prompt(b"raw text") == "raw text"
    assert extract_prompt(b"\xff") == ""
    body, changed = replay_body(b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}')
    assert changed and json.loads(body) == {"model": "m", "stream": False}
    assert replay_body(b'{"model":"m","stream":false}') == (b'{"model":"m","stream":false}', False)
    assert replay_body(b'{"model":"m"}') == (b'{"model":"m"}', False)
    assert replay_body(b"not json") == (b"not json", False)
    s = Sample("rid", "chat", 1.0, "POST", "/", "application/json", "text/event-stream", b"{}",
               headers={"authorization": "Bearer t"})
    assert replay_headers(s, True) == {"authorization": "Bearer t", "x-lockgate-replay": "1", "x-request-id": "rid",
                                       "content-type": "application/json", "accept": "application/json"}
    assert replay_headers(s, False)["accept"] == "text/event-stream"


# ----- HTTP judge -----
@pytest.mark.parametrize("text, want", [
    ("Score: 8", 7 / 9), ("8", 7 / 9), ("8/10", 7 / 9), ("Score: 10/10", 1.0), ("score=1", 0.0),
    ("On a scale of 1 to 10, I give it 7.", 6 / 9), ("Rating (1-10): 9", 8 / 9), ("7.5 out of 10", 6.5 / 9),
    ("0", 0.0), ("Score: 11", None), ("excellent", None), ("", None), (None, None),
])
def test_parse_judge_score(text, want):
    got = parse_judge_score(text)
    assert (got is None and want is None) or got == pytest.approx(want)


class _Judge(BaseHTTPRequestHandler):
    mode = "ok"
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "500":
            self.send_response(500)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        content = {"ok": "Score: 8", "slow": "Score: 8", "garbage": "no idea"}[self.mode]
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # the "slow" judge writes after the client gave up
        pass


@pytest.fixture
def judge_server():
    server = _QuietServer(("127.0.0.1", 0), _Judge)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    _Judge.seen = []
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    server.shutdown()
    server.server_close()


def test_http_judge_scores_and_counts_errors(judge_server):
    _, url = judge_server
    reasons = []
    judge = HttpJudgeEvaluator(url, "judge-m", timeout_s=0.3, api_key="k-123", on_error=reasons.append)
    _Judge.mode = "ok"
    assert asyncio.run(judge.score("Q?", "A.")) == pytest.approx(7 / 9)
    path, headers, body = _Judge.seen[-1]
    assert path == "/v1/chat/completions" and headers["authorization"] == "Bearer k-123"
    assert body == judge_request("judge-m", "Q?", "A.") and body["temperature"] == 0 and not body["stream"]
    assert "QUESTION:\n<<<\nQ?\n>>>" in body["messages"][1]["content"]
    for mode, reason in (("garbage", "unparsable"), ("500", "http_500"), ("slow", "timeout")):
        _Judge.mode = mode
        assert asyncio.run(judge.score("Q?", "A.")) is None, mode
        assert reasons[-1] == reason
    dead = HttpJudgeEvaluator("http://127.0.0.1:1/v1/chat/completions", "m", timeout_s=0.5)
    assert asyncio.run(dead.score("Q?", "A.")) is None and dead.errors["connection"] == 1
    assert judge.errors == {"unparsable": 1, "http_500": 1, "timeout": 1}


# ----- config and routes -----
BASE = """
models:
  - name: chat
    match: {path_prefix: /v1/chat}
    stable: v1
    versions: {v1: {endpoints: ["127.0.0.1:1"]}, v2: {endpoints: ["127.0.0.1:2"]}}
    evaluation: %s
  - name: plain
    stable: v1
    versions: {v1: {endpoints: ["127.0.0.1:3"]}, v2: {endpoints: ["127.0.0.1:4"]}}
"""


def test_evaluation_config():
    cfg = config_from_text(BASE % "{sample_rate: 0.02}")
    ev = cfg.models[0].evaluation
    assert ev.sample_rate == 0.02 and ev.evaluator == "heuristic" and ev.similarity == "char3"
    assert (ev.retention_hours, ev.max_samples, ev.max_body_bytes) == (24.0, 10000, 262144)
    assert cfg.models[1].evaluation is None and str(cfg.controller.sampler) == "127.0.0.1:18022"
    cfg = config_from_text(BASE % ("{sample_rate: 1, evaluator: http, similarity: false, replay_headers: [authorization],"
                                   " judge: {url: 'http://127.0.0.1:9/v1/chat/completions', model: j, timeout_s: 3,"
                                   " api_key_env: JUDGE_KEY}}"))
    ev = cfg.models[0].evaluation
    assert ev.judge.url.endswith(":9/v1/chat/completions") and ev.judge.timeout_s == 3 and ev.similarity is None
    assert ev.judge.api_key_env == "JUDGE_KEY" and ev.replay_headers == ("authorization",)
    assert config_from_text(BASE % "{sample_rate: 0.1, similarity: {impl: 'my.mod:Sim'}}").models[0] \
        .evaluation.similarity == "my.mod:Sim"


@pytest.mark.parametrize("section, message", [
    ("{sample_rate: 1.5}", "evaluation.sample_rate: must be between 0.0 and 1.0"),
    ("{evaluator: heuristic}", "evaluation.sample_rate: is required"),
    ("{sample_rate: 0.1, evaluator: magic}", "evaluation.evaluator: must be heuristic, http or a plug-in"),
    ("{sample_rate: 0.1, evaluator: http}", "evaluation.judge: is required with evaluator: http"),
    ("{sample_rate: 0.1, judge: {url: 'http://x:1/', model: m}}", "evaluation.judge: is only used with evaluator: http"),
    ("{sample_rate: 0.1, evaluator: http, judge: {url: 'ftp://x', model: m}}", "evaluation.judge.url: must be an http"),
    ("{sample_rate: 0.1, evaluator: http, judge: {url: 'http://x:1/'}}", "evaluation.judge.model: is required"),
    ("{sample_rate: 0.1, similarity: 3}", "evaluation.similarity: must be true, false"),
    ("{sample_rate: 0.1, similarity: {impl: nope}}", "evaluation.similarity.impl: must be char3, jaccard"),
    ("{sample_rate: 0.1, max_samples: 0}", "evaluation.max_samples: must be between 1"),
    ("{sample_rate: 0.1, retention_hours: -1}", "evaluation.retention_hours: must be between"),
    ("{sample_rate: 0.1, replay_headers: [x-lockgate-version]}", "evaluation.replay_headers[0]: 'x-lockgate-version'"),
    ("{sample_rate: 0.1, replay_headers: [Host]}", "evaluation.replay_headers[0]: must be a lower-case header name"),
    ("{sample_rate: 0.1, sample: 1}", "evaluation.sample: unknown field"),
])
def test_evaluation_config_errors_name_file_line_and_field(section, message):
    with pytest.raises(ConfigError) as exc:
        config_from_text(BASE % section, "f.yaml")
    text = str(exc.value)
    assert f"models[0].{message}" in text and "f.yaml:7:" in text, text


def test_sampler_port_clash_only_checked_when_evaluation_is_on():
    clash = "controller: {http: '127.0.0.1:18022'}\n"
    with pytest.raises(ConfigError, match="controller.sampler: port 18022 is also used by controller.http"):
        config_from_text(clash + BASE % "{sample_rate: 0.1}", "f.yaml")
    no_eval = clash + BASE.replace("    evaluation: %s\n", "")
    assert config_from_text(no_eval).controller.http.port == 18022


def test_mirror_policy_only_on_sticky_routes_of_evaluated_models_with_a_canary():
    from lockgate.routing import CanaryWeight, parse_route_name
    from lockgate.xds.resources import SAMPLER_CLUSTER, build_routes

    cfg = config_from_text(BASE % "{sample_rate: 0.02}" + """
qa_override: {token: 0123456789abcdef0123}
""")
    routes = build_routes(cfg, {"chat": CanaryWeight("v2", 500), "plain": CanaryWeight("v2", 500)}) \
        .virtual_hosts[0].routes
    mirrored = {r.name.partition("?")[0]: list(r.route.request_mirror_policies) for r in routes}
    for name, pols in mirrored.items():
        info = parse_route_name(name)
        if info.model == "chat" and info.path == "sticky":
            (p,) = pols
            assert p.cluster == SAMPLER_CLUSTER
            assert p.runtime_fraction.default_value.numerator == 20000
            assert p.runtime_fraction.default_value.denominator == 2  # MILLION
            headers = {m.append.header.key: m.append.header.value for m in p.request_headers_mutations}
            assert headers == {"x-lockgate-sample-model": "chat", "x-lockgate-sample-canary": "v2"}
        else:
            assert pols == [], name
    assert any(parse_route_name(n).path == "qa" for n in mirrored)
    # no canary (or the stable as canary): nothing to compare, nothing mirrored
    for w in ({}, {"chat": CanaryWeight("v1", 0)}):
        assert not any(r.route.request_mirror_policies for r in build_routes(cfg, w).virtual_hosts[0].routes)
    zero = config_from_text(BASE % "{sample_rate: 0}")
    assert not any(r.route.request_mirror_policies
                   for r in build_routes(zero, {"chat": CanaryWeight("v2", 500)}).virtual_hosts[0].routes)


def test_bootstrap_has_the_sampler_cluster():
    import yaml

    from lockgate.envoy_proc import render_bootstrap

    cfg = config_from_text("controller: {sampler: 'localhost:19022'}\n" + BASE % "{sample_rate: 0.1}")
    boot = yaml.safe_load(render_bootstrap(cfg))
    (c,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == "lockgate_sampler"]
    sa = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert sa == {"address": "127.0.0.1", "port_value": 19022}


# ----- sample store -----
def _sample(rid: str, ts: float, model: str = "chat") -> Sample:
    return Sample(rid, model, ts, "POST", "/v1/chat/completions", "application/json", None, b"{}", "v2")


def test_sample_retention_by_age_and_count(tmp_path):
    store = EvaluationStore(tmp_path / "evaluation.db")
    now = 1_000_000.0
    assert store.insert_sample(_sample("a", now - 7200), 3600, 10, now=now - 7200) == (True, 0)
    assert store.insert_sample(_sample("a", now - 7200), 3600, 10, now=now - 7200) == (False, 0)  # duplicate
    # a newer insert prunes the one older than the retention
    assert store.insert_sample(_sample("b", now), 3600, 10, now=now) == (True, 1)
    for i in range(5):
        store.insert_sample(_sample(f"c{i}", now + i), 3600, 3, now=now + i)
    assert [s["request_id"] for s in store.samples()] == ["c2", "c3", "c4"]
    store.insert_sample(_sample("o1", now, "other"), 3600, 3, now=now)
    assert store.prune_samples({"chat": (3600, 2)}, now=now + 5) == {"chat": 1, "other": 1}
    assert [s["request_id"] for s in store.samples()] == ["c3", "c4"]
    pend = store.pending()
    assert [p.request_id for p in pend] == ["c3", "c4"] and pend[0].canary == "v2" and pend[0].body == b"{}"
    store.add_evaluations([EvaluationRow("c3", "chat", "v1", "baseline", "heuristic", 0.5, 0.9, now, now),
                           EvaluationRow("c3", "chat", "v2", "canary", "heuristic", None, 0.9, now, now, "no_score")],
                          pend[0].id)
    assert [p.request_id for p in store.pending()] == ["c4"]
    cols = store.fetch_evaluations("chat", since_ts=now - 1)
    assert list(cols["role"]) == ["baseline", "canary"] and list(cols["is_canary"]) == [False, True]
    assert cols["score"][0] == 0.5 and math.isnan(cols["score"][1]) and list(cols["similarity"]) == [0.9, 0.9]
    assert len(store.fetch_evaluations("chat", since_ts=now + 1)["ts"]) == 0
    found = store.lookup(["c3", "zz"])
    assert set(found) == {("c3", "v1"), ("c3", "v2")} and found[("c3", "v2")]["error"] == "no_score"
    assert store.prune_evaluations(now + 1) == 2
    store.close()


def test_export_evaluation_fields():
    ev = {"evaluator": "heuristic", "score": 0.7, "similarity": 0.4, "ts": 5.0}
    assert add_evaluation({"request_id": "r"}, ev) == {
        "request_id": "r", "evaluator": "heuristic", "evaluator_score": 0.7, "evaluator_score_arrival_ts": 5.0,
        "similarity": 0.4}
    fb = add_evaluation({"evaluator_score": 0.1, "evaluator_score_arrival_ts": 1.0}, ev)  # feedback wins
    assert fb["evaluator_score"] == 0.1 and fb["evaluator_score_arrival_ts"] == 1.0 and fb["similarity"] == 0.4
    assert add_evaluation({"a": 1}, None) == {"a": 1}


def test_pick_endpoint_is_deterministic_and_spreads():
    from lockgate.config import Address

    eps = [Address("127.0.0.1", p) for p in (1, 2, 3)]
    assert pick_endpoint(eps, "abc") == pick_endpoint(eps, "abc")
    assert len({pick_endpoint(eps, f"r{i}") for i in range(100)}) == 3


def test_make_evaluator_kinds():
    cfg = config_from_text(BASE % ("{sample_rate: 1, evaluator: http, judge: {url: 'http://127.0.0.1:9/x', model: j}}"))
    assert isinstance(make_evaluator(cfg.models[0].evaluation), HttpJudgeEvaluator)
    cfg = config_from_text(BASE % "{sample_rate: 1, evaluator: 'lockgate.controller.evaluate.evaluators:HeuristicEvaluator'}")
    assert make_evaluator(cfg.models[0].evaluation).score(PROMPT, GOOD) > 0.9


# ----- sampler HTTP parsing (in process) -----
def test_sampler_stores_mirrored_requests(tmp_path):
    from prometheus_client import CollectorRegistry

    from lockgate.controller.evaluate.sampler import SamplerServer, match_model
    from tests.harness import free_port

    port = free_port()
    cfg = config_from_text(f"controller: {{sampler: '127.0.0.1:{port}'}}\n"
                           + BASE % "{sample_rate: 1, max_body_bytes: 64, replay_headers: [x-seed]}")
    assert match_model(cfg, "/v1/chat/completions", {}).name == "chat"
    assert match_model(cfg, "/other", {}).name == "plain"
    assert match_model(cfg, "/other", {"x-lockgate-sample-model": "chat"}).name == "chat"
    store = EvaluationStore(tmp_path / "evaluation.db")
    metrics = EvaluationMetrics(CollectorRegistry())
    import concurrent.futures

    db = concurrent.futures.ThreadPoolExecutor(1)
    woke = []

    async def main():
        server = SamplerServer(cfg, store, metrics, db, on_stored=lambda: woke.append(1))
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        reqs = [
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x-shadow\r\nx-request-id: r1\r\n"
            b"content-type: application/json\r\nx-seed: 5\r\nx-lockgate-sample-canary: v2\r\n"
            b"content-length: 11\r\n\r\n{\"a\": true}",
            b"POST /v1/chat/completions HTTP/1.1\r\nx-request-id: r2\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\n{\"b\r\n5\r\n\": 1}\r\n0\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nx-request-id: big\r\ncontent-length: 100\r\n\r\n" + b"x" * 100,
            b"GET /v1/chat/x HTTP/1.1\r\n\r\n",  # no request id
            b"GET /other HTTP/1.1\r\nx-request-id: p1\r\n\r\n",  # a model without evaluation
        ]
        for req in reqs:
            writer.write(req)
            await writer.drain()
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 204 No Content\r\nserver: lockgate-sampler\r\n\r\n"
        writer.write(b"garbage\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 400")
        writer.close()
        for _ in range(100):
            if len(store.samples()) >= 2:
                break
            await asyncio.sleep(0.02)
        await server.close()

    asyncio.run(main())
    db.shutdown()
    got = {s["request_id"]: s for s in store.samples()}
    assert set(got) == {"r1", "r2"} and len(woke) == 2
    assert got["r1"]["body"] == b'{"a": true}' and got["r1"]["canary"] == "v2"
    assert json.loads(got["r1"]["headers"]) == {"x-seed": "5"} and got["r1"]["content_type"] == "application/json"
    assert got["r2"]["body"] == b'{"b": 1}' and got["r2"]["canary"] is None and got["r2"]["headers"] is None
    for reason, n in (("too_large", 1), ("no_request_id", 1), ("not_enabled", 1), ("bad_request", 1)):
        assert metrics.dropped.labels(reason)._value.get() == n, reason
    assert metrics.stored.labels("chat")._value.get() == 2
    store.close()


# ----- worker (in process, stdlib model servers) -----
class _Model(BaseHTTPRequestHandler):
    answers: dict = {}
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        port = self.server.server_address[1]
        type(self).seen.append((port, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        out = json.dumps({"choices": [{"message": {"content": type(self).answers[port]}}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_worker_replays_evaluates_and_skips(tmp_path):
    import concurrent.futures

    from prometheus_client import CollectorRegistry

    from lockgate.controller.evaluate.canaries import DesiredCanaries
    from lockgate.controller.evaluate.evaluation import EvaluationWorker
    from tests.harness import free_port

    servers = [_QuietServer(("127.0.0.1", 0), _Model) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    p1, p2 = (s.server_address[1] for s in servers)
    dead = free_port()
    _Model.answers = {p1: GOOD, p2: "I'm sorry, but I can't help with that."}
    _Model.seen = []
    text = f"""
state_dir: {tmp_path}
models:
  - name: chat
    stable: v1
    versions: {{v1: {{endpoints: ["127.0.0.1:{p1}"]}}, v2: {{endpoints: ["127.0.0.1:{p2}"]}},
               v3: {{endpoints: ["127.0.0.1:{dead}"]}}}}
    evaluation: {{sample_rate: 1, replay_timeout_s: 2}}
"""
    cfg = config_from_text(text)
    store = EvaluationStore(tmp_path / "evaluation.db")
    db = concurrent.futures.ThreadPoolExecutor(1)
    control: dict = {}  # what the control API's GetWeights answers; "down" key: it is unreachable

    async def get_weights() -> dict:
        if "down" in control:
            raise ConnectionError("control API unreachable")
        if "canaries" not in control:
            raise ConnectionError("not started yet")
        return dict(control["canaries"])

    desired = DesiredCanaries(get_weights)
    worker = EvaluationWorker(cfg, store, EvaluationMetrics(CollectorRegistry()), db, weights=desired)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": PROMPT}], "stream": True}).encode()

    def sample(rid: str, canary: str | None) -> Sample:
        store.insert_sample(Sample(rid, "chat", time.time(), "POST", "/v1/chat/completions", "application/json",
                                   "text/event-stream", body, canary, headers={"x-seed": "1"}), 3600, 100)
        return next(s for s in store.pending(100) if s.request_id == rid)

    def weights(canary: str | None) -> None:
        control["canaries"] = {"chat": canary}
        desired.invalidate()

    try:
        # the control API has not answered yet: the mirror's canary header is trusted
        rows = asyncio.run(worker.process(sample("r1", "v2")))
        assert [(r.role, r.version) for r in rows] == [("baseline", "v1"), ("canary", "v2")]
        assert rows[0].score > 0.9 and rows[1].score <= 0.2 and rows[0].similarity == rows[1].similarity < 0.5
        assert {(port, path) for port, path, _, _ in _Model.seen} == {(p1, "/v1/chat/completions"),
                                                                       (p2, "/v1/chat/completions")}
        for _, _, headers, sent in _Model.seen:
            assert headers["x-lockgate-replay"] == "1" and headers["x-request-id"] == "r1"
            assert headers["x-seed"] == "1" and headers["accept"] == "application/json"
            assert sent["stream"] is False
        assert store.samples()[0]["state"] == "done"
        # the control API says the canary is v3 (dead): a sample from v2's time is skipped
        weights("v3")
        assert asyncio.run(worker.process(sample("r2", "v2"))) == []
        assert {s["request_id"]: s["state"] for s in store.samples()}["r2"] == "canary_changed"
        rows = asyncio.run(worker.process(sample("r3", "v3")))
        assert rows[0].score > 0.9 and rows[0].error is None
        assert rows[1].score is None and rows[1].error == "replay_connection" and rows[1].similarity is None
        weights(None)  # rolled back
        assert asyncio.run(worker.process(sample("r4", "v3"))) == []
        assert {s["request_id"]: s["state"] for s in store.samples()}["r4"] == "no_canary"
        control["down"] = True  # unreachable: the last known value (no canary) stays
        desired.invalidate()
        assert asyncio.run(worker.process(sample("r5", "v3"))) == []
        assert {s["request_id"]: s["state"] for s in store.samples()}["r5"] == "no_canary"
        assert set(store.lookup(["r1", "r3"])) == {("r1", "v1"), ("r1", "v2"), ("r3", "v1"), ("r3", "v3")}
    finally:
        worker.close()
        db.shutdown()
        store.close()
        for s in servers:
            s.shutdown()
            s.server_close()
