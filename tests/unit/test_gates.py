"""Approval and external gates of a rollout step (issue 17 part 3): the spec fields with file/line errors,
the answer of a check judged, the stage decision with approval and check states, the HTTP adapter against
a real local server (pass, fail, timeout, unreachable), the gatekeeper's log entries, and the approve
action's rules."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from lockgate.config import config_from_text
from lockgate.controller.decide.gates import Approval, CheckResult, GateInputs, gates_json, judge_answer, open_gates
from lockgate.controller.decide.spec import ConfigError, spec_from_text
from lockgate.controller.decide.spec.model import GateCheck
from lockgate.controller.decide.stages import StageState, decide
from lockgate.controller.ports import CheckAnswer, CheckCaller
from lockgate.controller.stats import Judgement

GATED = """\
rollout:
  model: chat
  canary: v2
  steps:
    - weight_percent: 1
      min_duration: 60s
      min_canary_samples: 10
      approval: {required: true}
    - weight_percent: 20
      min_duration: 60s
      min_canary_samples: 10
      checks:
        - name: loadtest
          url: http://ci.internal:8080/loadtest?model=chat
          timeout_s: 2
          interval_s: 10
          expect: {status: 200, field: result.verdict, equals: pass}
        - {name: window, url: "https://cal.internal/window", method: POST}
    - weight_percent: 50
      min_duration: 60s
      min_canary_samples: 10
      approval: {required: true}
  promotion: {max_duration: 1h, preflight: none}
  metrics:
    - {name: error_rate, allowed: {absolute: 0.01}}
"""


def test_gated_spec_parses_with_defaults_and_hashes_only_what_is_set():
    spec = spec_from_text(GATED)
    s1, s2, s3 = spec.steps
    assert s1.approval and not s1.checks and s1.gated
    assert not s2.approval and [c.name for c in s2.checks] == ["loadtest", "window"]
    lt, win = s2.checks
    assert (lt.method, lt.timeout_s, lt.interval_s, lt.expect_status, lt.expect_field, lt.expect_equals) == \
        ("GET", 2.0, 10.0, (200,), "result.verdict", "pass")
    assert (win.method, win.timeout_s, win.interval_s, win.expect_status, win.expect_field) == \
        ("POST", 5.0, 30.0, (200,), None)
    assert lt.describe_expect() == 'HTTP 200 and result.verdict == "pass"'
    # a spec without gates has the hash it had before the fields existed; the gates change it
    plain = GATED.replace("      approval: {required: true}\n", "")
    plain = plain[:plain.index("      checks:")] + plain[plain.index("    - weight_percent: 50"):]
    canon = spec_from_text(plain).canonical()
    assert all(set(s) == {"weight_bp", "min_duration_s", "min_canary_samples"} for s in canon["steps"])
    assert spec_from_text(plain).sha256 != spec.sha256
    assert spec_from_text(GATED.replace("required: true}\n    - weight_percent: 20",
                                        "required: false}\n    - weight_percent: 20")).sha256 != spec.sha256
    # spelling does not change the hash (defaults written out, flow vs block)
    same = GATED.replace('{name: window, url: "https://cal.internal/window", method: POST}',
                         '{name: window, url: "https://cal.internal/window", method: POST, timeout_s: 5, '
                         'interval_s: 30, expect: {status: 200}}')
    assert spec_from_text(same).sha256 == spec.sha256


def test_every_gate_problem_at_once_with_file_line_and_field():
    text = """\
rollout:
  model: chat
  canary: v2
  steps:
    - {weight_percent: 1, approval: true}
    - weight_percent: 2
      approval: {required: "yes", by: ops}
      checks:
        - {name: lt, url: "ftp://x/y", timeout_s: 0, interval_s: 0.5}
        - {name: lt2, url: "http://h/x", timout_s: 3}
        - {url: "http://h/x", expect: {status: 700, field: "a..b"}}
        - {name: w, url: "http://h/x", expect: {field: ok}}
        - {name: v, url: "http://h/x", expect: {equals: 1}}
        - {name: u, url: "http://h/x y", method: PUT, expect: {status: [200, "x"]}}
        - {name: lt2, url: "http://h/z"}
    - {weight_percent: 100, approval: {required: true}}
  metrics:
    - {name: error_rate, allowed: {absolute: 0.01}}
"""
    with pytest.raises(ConfigError) as err:
        spec_from_text(text, "g.yaml")
    lines = [p.render("g.yaml") for p in err.value.problems]
    out = "\n".join(lines)
    expect = [
        "g.yaml:5:37: rollout.steps[0].approval: must be a mapping: write approval: {required: true}",
        "g.yaml:7:28: rollout.steps[1].approval.required: must be true or false, got a string",
        "g.yaml:7:39: rollout.steps[1].approval.by: unknown field (known: required)",
        "g.yaml:9:27: rollout.steps[1].checks[0].url: must be an http:// or https:// URL with a host, got 'ftp://x/y'",
        "g.yaml:9:51: rollout.steps[1].checks[0].timeout_s: must be greater than 0 and at most 60 seconds",
        "g.yaml:9:66: rollout.steps[1].checks[0].interval_s: must be at least 1 and at most 3600 seconds",
        "g.yaml:10:52: rollout.steps[1].checks[1].timout_s: unknown field (did you mean 'timeout_s'? known: expect, "
        "interval_s, method, name, timeout_s, url)",
        "g.yaml:11:11: rollout.steps[1].checks[2].name: is required",
        "g.yaml:11:39: rollout.steps[1].checks[2].expect: field needs equals",
        "g.yaml:11:48: rollout.steps[1].checks[2].expect.status: must be an HTTP status (100-599) or a list of them, "
        "got 700",
        "g.yaml:11:60: rollout.steps[1].checks[2].expect.field: must be a field of the JSON answer",
        "g.yaml:12:48: rollout.steps[1].checks[3].expect: field needs equals",
        "g.yaml:13:57: rollout.steps[1].checks[4].expect.equals: equals needs field",
        "g.yaml:14:26: rollout.steps[1].checks[5].url: must be one http(s) URL of at most 2000 characters, without "
        "spaces",
        "g.yaml:14:50: rollout.steps[1].checks[5].method: must be one of GET, POST, got 'PUT'",
        "g.yaml:14:72: rollout.steps[1].checks[5].expect.status: must be an HTTP status (100-599) or a list of them",
        "g.yaml:15:18: rollout.steps[1].checks[6].name: duplicate check name 'lt2' (also checks[1])",
        "g.yaml:16:7: rollout.steps[2]: the 100 % step is the promotion: put approval/checks on the step before it",
    ]
    for e in expect:
        assert any(line.startswith(e) for line in lines), f"missing: {e}\n--- got:\n{out}"
    assert len(lines) == len(expect), out


def test_gated_example_validates_against_the_document_models_and_schema():
    from lockgate.controller.decide.spec.document import SpecDocument
    from lockgate.controller.decide.spec_schema import rollout_schema

    doc = SpecDocument.model_validate(yaml.safe_load(GATED))
    assert doc.rollout.steps[0].approval.required and doc.rollout.steps[1].checks[0].expect.field == "result.verdict"
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (optional)")
    v = jsonschema.Draft202012Validator(rollout_schema())
    assert not list(v.iter_errors(yaml.safe_load(GATED)))
    bad = yaml.safe_load(GATED)
    bad["rollout"]["steps"][1]["checks"][0]["timeout_s"] = 0
    bad["rollout"]["steps"][0]["approval"] = {"required": True, "by": "x"}
    assert len(list(v.iter_errors(bad))) == 2


# ----------------------------------------------------------------------------- judging one answer

LT = GateCheck("loadtest", "http://h/x", timeout_s=2, interval_s=10, expect_status=(200,),
               expect_field="result.ok", expect_equals=True)


def test_judge_answer_passes_only_on_the_expected_answer():
    ok = judge_answer(LT, CheckAnswer(200, b'{"result": {"ok": true}}', 12.0), at=5.0)
    assert ok.passed and ok.reason.startswith("check loadtest passed: HTTP 200 and result.ok == true") and ok.at == 5.0
    cases = {
        "wrong status": (CheckAnswer(503, b'{"result": {"ok": true}}'), "fail", "HTTP 503, expected HTTP 200"),
        "field false": (CheckAnswer(200, b'{"result": {"ok": false}}'), "fail", "result.ok is false, expected true"),
        "1 is not true": (CheckAnswer(200, b'{"result": {"ok": 1}}'), "fail", "result.ok is 1, expected true"),
        "not json": (CheckAnswer(200, b"<html>ok</html>"), "fail", "not JSON"),
        "no field": (CheckAnswer(200, b'{"result": {}}'), "fail", "no field result.ok"),
        "timeout": (CheckAnswer(None, timed_out=True, error="x"), "timeout", "no answer within 2 s (timeout)"),
        "refused": (CheckAnswer(None, error="ConnectionRefusedError: [Errno 111]"), "unreachable",
                    "unreachable: ConnectionRefusedError"),
    }
    for what, (answer, state, text) in cases.items():
        r = judge_answer(LT, answer, at=1.0)
        assert (r.state, r.passed) == (state, False), what
        assert text in r.reason, (what, r.reason)
    # the answer is shown, truncated, on one line
    long = judge_answer(LT, CheckAnswer(500, b'{"error":\n "' + b"x" * 5000 + b'"}'), at=1.0)
    assert "\n" not in long.reason and long.answer.endswith("…") and len(long.answer) == 200
    # numbers compare as numbers; strings as strings; a list index in the path
    num = GateCheck("n", "http://h", expect_field="runs.0.score", expect_equals=1)
    assert judge_answer(num, CheckAnswer(200, b'{"runs": [{"score": 1.0}]}'), 0).passed
    assert not judge_answer(num, CheckAnswer(200, b'{"runs": [{"score": "1"}]}'), 0).passed
    # credentials in a check's URL are never shown
    secret = GateCheck("c", "https://ci:s3cret@ci.internal:8443/x?y=1", timeout_s=1)
    for a in (CheckAnswer(None, timed_out=True), CheckAnswer(None, error="refused")):
        r = judge_answer(secret, a, 0)
        assert "s3cret" not in r.reason and "https://***@ci.internal:8443/x?y=1" in r.reason, r.reason
    several = GateCheck("s", "http://h", expect_status=(200, 204))
    assert judge_answer(several, CheckAnswer(204), 0).passed and not judge_answer(several, CheckAnswer(202), 0).passed


# ----------------------------------------------------------------------------- the stage decision

SPEC = spec_from_text(GATED)


class V:
    def __init__(self, metric, verdict, gating=True):
        self.metric, self.verdict, self.gating = metric, verdict, gating


def J(decision, verdict="not-yet"):
    return Judgement(decision, ("why",), 0.05, 0.05, 1, "stmt", (V("error_rate", verdict),))


def st(stage=0, status="running"):
    return StageState(status, stage, 0.0, 0.0)


def result(name, state, at):
    return CheckResult(name, state, f"check {name}: {state}", at, 5.0)


def test_approval_holds_a_done_stage_and_never_overrides_harm_or_minimums():
    none = GateInputs()
    d = decide(SPEC, st(), J("continue"), 90, 10, none)
    assert d.action == "hold" and d.awaiting_approval and d.weight_bp == 100
    assert d.reasons[0].startswith("waiting for approval of stage 1/3 (1%) since 1970-01-01T00:01:30Z "
                                   "(lockgate rollout approve chat)")
    d = decide(SPEC, st(), J("continue"), 95, 10, GateInputs(awaiting_since=80.0))
    assert "since 1970-01-01T00:01:20Z" in d.reasons[0]
    # the stage's own minimums first: nothing is asked of people before the stage is done
    d = decide(SPEC, st(), J("continue"), 30, 10, none)
    assert d.action == "hold" and not d.awaiting_approval and "minimum duration" in d.reasons[0]
    approved = GateInputs(approval=Approval("alice", 60.0, False))
    d = decide(SPEC, st(), J("continue"), 30, 10, approved)  # approved early: still the minimums
    assert d.action == "hold" and "minimum duration" in d.reasons[0]
    d = decide(SPEC, st(), J("continue"), 90, 10, approved)
    assert (d.action, d.stage, d.weight_bp) == ("advance", 1, 2000)
    assert "stage 1/3 (1%) approved by alice, unauthenticated at 1970-01-01T00:01:00Z" in d.reasons
    # harm rolls back while waiting for (or with) an approval
    for g in (none, approved):
        assert decide(SPEC, st(), J("rollback", "fail"), 90, 10, g).action == "rollback"
    # the last step's approval gates the promotion, which still needs its evidence
    last = GateInputs(approval=Approval("bob", 1.0, True))
    d = decide(SPEC, st(2), J("continue"), 200, 10, last)
    assert d.action == "hold" and "promotion needs every gating metric" in " ".join(d.reasons)
    d = decide(SPEC, st(2), J("promote", "pass"), 200, 10, none)
    assert d.action == "hold" and d.awaiting_approval and "waiting for approval of stage 3/3" in d.reasons[0]
    d = decide(SPEC, st(2), J("promote", "pass"), 200, 10, last)
    assert d.action == "promote" and any("approved by bob at" in r for r in d.reasons)
    # max_duration runs out while waiting: inconclusive, for a human (never promoted silently)
    d = decide(SPEC, st(2), J("promote", "pass"), 3600, 10, none)
    assert d.action == "inconclusive" and "waiting for approval" in " ".join(d.reasons)
    # paused holds whatever the approval
    assert decide(SPEC, st(status="paused"), J("continue"), 90, 10, approved).action == "hold"
    # offline replay (gates=None) has no approvals to replay: the gates are left out
    assert decide(SPEC, st(), J("continue"), 90, 10).action == "advance"


def test_checks_are_called_when_due_hold_until_a_fresh_pass_and_go_stale():
    now = 100.0
    d = decide(SPEC, st(1), J("continue"), now, 10, GateInputs())
    assert d.action == "hold" and d.due_checks == ("loadtest", "window") and not d.awaiting_approval
    assert "check loadtest: not called yet (GET http://ci.internal:8080/loadtest?model=chat" in d.reasons[0]
    # being called: not due again, said so
    d = decide(SPEC, st(1), J("continue"), now, 10, GateInputs(running=frozenset({"loadtest", "window"})))
    assert d.due_checks == () and d.reasons[0].startswith("check loadtest: calling")
    # before the stage is done nothing is called
    assert decide(SPEC, st(1), J("continue"), 30, 10, GateInputs()).due_checks == ()
    # a fresh failure holds and is retried after its interval (10 s for loadtest, 30 s for window)
    fails = {"loadtest": result("loadtest", "fail", 95.0), "window": result("window", "timeout", 95.0)}
    d = decide(SPEC, st(1), J("continue"), now, 10, GateInputs(checks=fails))
    assert d.action == "hold" and d.due_checks == ()
    assert d.reasons[0].startswith("check loadtest: fail (again in 5 s)") and "check window: timeout" in d.reasons[1]
    d = decide(SPEC, st(1), J("continue"), 106.0, 10, GateInputs(checks=fails))
    assert d.due_checks == ("loadtest",)
    # one passes, the other fails: hold; both pass: advance, with the passes in the reasons
    mixed = {"loadtest": result("loadtest", "pass", 99.0), "window": result("window", "unreachable", 99.0)}
    d = decide(SPEC, st(1), J("continue"), now, 10, GateInputs(checks=mixed))
    assert d.action == "hold" and d.reasons == ("check window: unreachable (again in 29 s)",)
    both = {"loadtest": result("loadtest", "pass", 99.0), "window": result("window", "pass", 99.0)}
    d = decide(SPEC, st(1), J("continue"), now, 10, GateInputs(checks=both))
    assert (d.action, d.weight_bp) == ("advance", 5000)
    assert d.reasons[1:] == ("check loadtest: pass", "check window: pass")
    # a pass older than its interval no longer counts: called again, held meanwhile
    d = decide(SPEC, st(1), J("continue"), 115.0, 10, GateInputs(checks=both))
    assert d.action == "hold" and d.due_checks == ("loadtest",)
    assert d.reasons[0].startswith("check loadtest: passed 16 s ago, calling it again")
    # harm rolls back whatever the checks say
    assert decide(SPEC, st(1), J("rollback", "fail"), now, 10, GateInputs(checks=both)).action == "rollback"


def test_gates_json_for_status_log_and_report():
    assert gates_json(SPEC, 0, GateInputs()) == {"stage": 0, "approval": {
        "required": True, "approved_by": None, "approved_at": None, "authenticated": None, "waiting_since": None}}
    g = gates_json(SPEC, 1, GateInputs(checks={"loadtest": result("loadtest", "fail", 3.0)},
                                      running=frozenset({"window"})))
    assert [(c["name"], c["state"], c["running"]) for c in g["checks"]] == [("loadtest", "fail", False),
                                                                           ("window", "not called", True)]
    assert g["checks"][0]["expect"] == 'HTTP 200 and result.verdict == "pass"' and "approval" not in g
    json.dumps(g)
    plain = spec_from_text(GATED.replace("      approval: {required: true}\n", ""))
    assert gates_json(plain, 0, GateInputs()) is None


# ----------------------------------------------------------------------------- the HTTP adapter


class _Server:
    """A real HTTP server on 127.0.0.1: ``/ok`` 200 JSON, ``/bad`` 503, ``/slow`` answers after 2 s."""

    def __init__(self):
        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/slow":
                    time.sleep(2.0)
                body = b'{"verdict": "pass"}' if self.path != "/bad" else b'{"verdict": "fail"}'
                self.send_response(503 if self.path == "/bad" else 200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            do_POST = do_GET

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_http_adapter_pass_fail_timeout_unreachable(server):
    from lockgate.controller.tell.checks import HttpCheckCaller
    from tests.harness import free_port

    caller = HttpCheckCaller()
    assert isinstance(caller, CheckCaller)
    base = f"http://127.0.0.1:{server.port}"

    async def main():
        return await asyncio.gather(
            caller.call("GET", base + "/ok", body=None, timeout_s=5),
            caller.call("GET", base + "/bad", body=None, timeout_s=5),
            caller.call("GET", base + "/slow", body=None, timeout_s=0.3),
            caller.call("POST", base + "/ok", body=b"{}", timeout_s=5),
            caller.call("GET", f"http://127.0.0.1:{free_port()}/x", body=None, timeout_s=5))

    ok, bad, slow, post, refused = asyncio.run(main())
    assert (ok.status, json.loads(ok.body), ok.timed_out) == (200, {"verdict": "pass"}, False)
    assert (bad.status, bad.timed_out) == (503, False)
    assert slow.status is None and slow.timed_out and slow.elapsed_ms < 2000
    assert post.status == 200
    assert refused.status is None and not refused.timed_out and refused.error
    check = GateCheck("c", base, timeout_s=0.3, expect_field="verdict", expect_equals="pass")
    assert [judge_answer(check, a, 0).state for a in (ok, bad, slow, refused)] == \
        ["pass", "fail", "timeout", "unreachable"]


# ----------------------------------------------------------------------------- gatekeeper and approve


def _config(tmp_path):
    return config_from_text(f"""
state_dir: {tmp_path}
control: {{port: 1}}
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:11"]}}, v2: {{endpoints: ["127.0.0.1:12"]}}}}}}]
""")


def test_gatekeeper_calls_due_checks_in_the_background_and_logs_changes(tmp_path, server):
    from lockgate.controller.decide.gatekeeper import GateKeeper
    from lockgate.controller.decide.rollouts import RolloutStore
    from lockgate.controller.tell.checks import HttpCheckCaller

    text = GATED.replace("http://ci.internal:8080/loadtest?model=chat", f"http://127.0.0.1:{server.port}/bad") \
        .replace("https://cal.internal/window", f"http://127.0.0.1:{server.port}/ok")
    spec = spec_from_text(text)
    store = RolloutStore(tmp_path / "rollouts.db")
    woken, emitted = [], []
    keeper = GateKeeper(store, HttpCheckCaller(), woken.append, lambda *a: emitted.append(a))

    async def main():
        r = store.create(model="chat", canary="v2", baseline="v1", spec_text=text, spec_source="x",
                         spec_hash=spec.sha256, created_by="t", auto={})
        r = store.transition(r.id, expect=("pending",), status="running", stage=1, kind="started", actor="t")
        g = keeper.inputs(r, spec)
        assert g == GateInputs()
        d = decide(spec, StageState("running", 1, 0.0, 0.0), J("continue"), 1000.0, 10, g)
        assert keeper.after(r, spec, d, g, 1000.0).running == {"loadtest", "window"}
        assert keeper.inputs(r, spec).running == {"loadtest", "window"}
        keeper.after(r, spec, d, g, 1000.0)  # already running: not called twice
        for _ in range(100):
            if not keeper.inputs(r, spec).running:
                break
            await asyncio.sleep(0.05)
        g = keeper.inputs(r, spec)
        assert {n: c.state for n, c in g.checks.items()} == {"loadtest": "fail", "window": "pass"}
        # stage 0's approval, read from the log; the first wait logged once
        r0 = store.transition(r.id, expect=("running",), status="running", stage=0, kind="advanced", actor="t")
        g0 = keeper.inputs(r0, spec)
        d0 = decide(spec, StageState("running", 0, 0.0, 0.0), J("continue"), 1000.0, 10, g0)
        assert d0.awaiting_approval and g0.awaiting_since is None
        assert keeper.after(r0, spec, d0, g0, 1000.0).awaiting_since == 1000.0
        keeper.after(r0, spec, d0, g0, 1001.0)
        assert keeper.inputs(r0, spec).awaiting_since == 1000.0
        store.event(r.id, "approved", "alice", {"authenticated": True}, stage=0)
        assert keeper.inputs(r0, spec).approval.actor == "alice"
        return r.id

    rid = asyncio.run(main())
    events = store.events(rid)
    store.close()
    assert woken == [{"chat"}, {"chat"}]
    # the first wait for an approval is an outcome event (an alert), once
    assert [(k, r) for k, r, _ in emitted] == [("awaiting_approval", rid)]
    from lockgate.controller.tell.alerts.message import alert_from_event

    alert = alert_from_event({"kind": "awaiting_approval", "detail": emitted[0][2], "ts": 1.0,
                              "rollout": {"id": rid, "model": "chat", "canary": "v2", "baseline": "v1"}}, 2000)
    assert alert.title == (f"chat: rollout #{rid} of v2 waits for an approval at 20% of traffic: "
                           "lockgate rollout approve chat") and alert.severity == "warning"
    assert alert.lines == ["Reason: stage 1/3 (1%) is done and waits for an approval (lockgate rollout approve chat)"]
    logged = [(e["kind"], e["detail"].get("name"), e["detail"].get("state")) for e in events
              if e["kind"] in ("check", "awaiting_approval")]
    assert sorted(logged, key=str) == sorted([("check", "loadtest", "fail"), ("check", "window", "pass"),
                                              ("awaiting_approval", None, None)], key=str)
    lt = next(e for e in events if e["kind"] == "check" and e["detail"]["name"] == "loadtest")
    assert "HTTP 503" in lt["detail"]["reasons"][0] and lt["detail"]["answer"] == '{"verdict": "fail"}'


def test_approve_rules_and_who_is_recorded(tmp_path):
    from lockgate.controller.decide.actions import RolloutActions
    from lockgate.controller.decide.promoter import Promoter, RolloutError
    from lockgate.controller.decide.rollouts import RolloutConflict, RolloutStore

    config = _config(tmp_path)
    store = RolloutStore(tmp_path / "rollouts.db")
    spec = spec_from_text(GATED, "g.yaml", config)

    async def main():
        promoter = Promoter(config, store, weights=None, observations=None)  # no weight moves here
        actions = RolloutActions(config, store, promoter, None)
        with pytest.raises(RolloutError) as e:
            await actions.approve("chat", None, "alice", False)
        assert e.value.status == 404
        r = store.create(model="chat", canary="v2", baseline="v1", spec_text=GATED, spec_source="g.yaml",
                         spec_hash=spec.sha256, created_by="t", auto={})
        store.transition(r.id, expect=("pending",), status="running", stage=0, kind="started", actor="t")
        with pytest.raises(RolloutConflict, match=r"stage 2/3 \(20%\) needs no approval \(stages that need one: 1, 3\)"):
            await actions.approve("chat", 2, "alice", False)
        with pytest.raises(RolloutError, match="has stages 1 to 3"):
            await actions.approve("chat", 4, "alice", False)
        out = await actions.approve("chat", None, "alice", False, note="ok by ops")
        assert (out["stage"], out["approved_by"], out["authenticated"], out["already"]) == (1, "alice", False, False)
        again = await actions.approve("chat", 1, "bob", True)
        assert again["already"] and again["approved_by"] == "alice"
        ahead = await actions.approve("chat", 3, "carol", True)  # a later stage, in advance
        assert ahead["stage"] == 3 and not ahead["already"]
        store.transition(r.id, expect=("running",), status="running", stage=1, kind="advanced", actor="t")
        with pytest.raises(RolloutConflict, match="is past stage 1/3"):
            await actions.approve("chat", 1, "alice", False)
        assert [a["approved_by"] for a in actions.status("chat")[0]["approvals"]] == ["alice", "carol"]
        return r.id

    rid = asyncio.run(main())
    approved = [e for e in store.events(rid) if e["kind"] == "approved"]
    store.close()
    assert [(e["actor"], e["stage"], e["detail"]["authenticated"]) for e in approved] == \
        [("alice", 0, False), ("carol", 2, True)]
    assert approved[0]["detail"]["note"] == "ok by ops"
    assert approved[0]["detail"]["reasons"] == ["stage 1/3 (1%) approved by alice (unauthenticated): the move to "
                                                "20% may go ahead once the stage's other conditions hold"]
