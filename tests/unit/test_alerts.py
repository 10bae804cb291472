"""Alerts: payload formatting (webhook, Slack, Alertmanager v2), backoff, status classification, config
parsing, the outbox's per-channel order, and the asyncio HTTP client against a real local server."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lockgate.config import RetryPolicy, config_from_text
from lockgate.controller.tell.alerts import (Alert, DeliveryError, alert_from_event, alertmanager_payload,
                                        alertmanager_url, backoff_delay, classify_status, describe_beyond,
                                        describe_timings,
                                        describe_verdict, http_request, render, rollback_push_trouble,
                                        send_alert, slack_payload, total_retry_window, trouble_alert,
                                        webhook_payload)
from lockgate.controller.tell.outbox import Outbox
from lockgate.yamlconf import ConfigError

FAIL = {"metric": "error_rate", "kind": "rate", "verdict": "fail", "gating": True, "baseline": 0.02,
        "canary": 0.102, "difference": 0.082, "interval": [0.051, None], "allowed": 0.015,
        "allowed_mode": "absolute", "harmful": "increase", "n_baseline": 3900, "n_canary": 412, "alpha": 0.05}
LAT = {"metric": "latency_p95", "kind": "quantile", "verdict": "continue", "gating": True, "baseline": 790.0,
       "canary": 812.0, "difference": 22.0, "interval": [-10.0, 40.0], "allowed": 79.0, "allowed_mode": "relative",
       "harmful": "increase", "n_baseline": 3900, "n_canary": 412, "alpha": 0.025, "unit": "ms", "n_needed": 900}
TIMINGS = {"detected_at": 1099.990, "pushed_at": 1099.993, "push_to_ack_ms": 11.4, "all_acked": True,
           "envoys": [{"node_id": "envoy-0", "acked": True, "ack_ms": 11.4}, {"node_id": "envoy-1", "acked": True,
                                                                               "ack_ms": 9.0}], "not_acked": []}


def event(kind="rolled_back", **detail):
    d = {"reasons": ["error_rate: canary 10.2% worse than allowed"], "timings": TIMINGS, "verdicts": [LAT, FAIL]}
    d.update(detail)
    return {"kind": kind, "ts": 1_800_000_100.0, "detail": d,
            "rollout": {"id": 3, "model": "chat", "canary": "v2", "baseline": "v1", "started_at": 1_800_000_000.0,
                        "ended_at": 1_800_000_100.0, "spec_hash": "abc"}}


def test_rollback_alert_explains_itself_with_numbers():
    a = alert_from_event(event(), weight_bp=3000)
    assert a.severity == "critical" and a.model == "chat" and a.canary == "v2" and a.rollout_id == 3
    assert a.title == "chat: canary v2 ROLLED BACK to v1 at 30% of traffic (rollout #3, after 100 s)"
    text = a.text
    assert "Why: gating metric error_rate shown worse than baseline beyond the allowance" in text
    # by how much the canary was shown worse, against the rollback line (the allowed change), not against 0
    assert "error_rate: shown worse than baseline by at least +5.10 pp, allowed +1.50 pp" in text.splitlines()
    # which metric, canary vs baseline, change, interval, allowed change
    assert ("error_rate (gating) FAIL: canary 10.20% vs baseline 2.00%, change +8.20 pp, interval [+5.10, +∞] pp"
            in text)
    assert "allowed +1.50 pp (absolute): beyond the allowance" in text
    assert "latency_p95 (gating) continue: canary 812 ms vs baseline 790 ms, change +22 ms" in text
    assert "allowed +79 ms (relative): neither beyond nor within the allowance yet" in text
    assert "(~900 canary needed)" in text
    # rollback timings: detected → pushed → all Envoys ACKed
    assert "detected → pushed 3 ms later → all 2 Envoys ACKed 11 ms after the push (detected → all ACKed: 14 ms)" \
        in text
    # failing gating metric first
    assert text.index("error_rate (gating)") < text.index("latency_p95")


def test_other_outcomes():
    inc = alert_from_event(event("inconclusive", timings=None), 5000)
    assert inc.severity == "warning" and "INCONCLUSIVE after 100 s" in inc.title and "held at 50%" in inc.title
    prom = alert_from_event(event("promoted", timings=None, ack_ms=7.5), 10000)
    assert prom.severity == "info" and "promoted to 100%" in prom.title and "MANUAL" not in prom.title
    assert "ACKed by every Envoy in 8 ms" in prom.text
    manual = alert_from_event(event("promoted", reasons=["manual promotion by cli:bob (not by evidence)"],
                                    verdicts=[], timings=None))
    assert "MANUAL — not by evidence" in manual.title
    ab = alert_from_event(event("aborted", reasons=["aborted by cli:alice"]), 1000)
    assert "aborted at 10% of traffic; traffic back on v1" in ab.title and "Rollback: detected" in ab.text


def test_verdict_decrease_and_unbounded():
    v = dict(FAIL, harmful="decrease", metric="class_recall[fraud]", kind="class_recall", interval=[None, -0.04],
             allowed=0.02, difference=-0.06)
    s = describe_verdict(v)
    assert "allowed -2.00 pp" in s and "interval [-∞, -4.00] pp" in s and "beyond the allowance" in s
    assert describe_beyond(v) == "class_recall[fraud]: shown worse than baseline by at least -4.00 pp, allowed -2.00 pp"


def test_rollback_line_recorded_in_details_is_the_one_stated():
    # the verdict's details["rollback_line"] (signed) wins over +/-allowed; it is also in the JSON summary
    v = dict(FAIL, interval=[0.021, 0.03], allowed=0.005, details={"rollback_line": 0.005})
    a = alert_from_event(event(verdicts=[v]), 3000)
    assert "error_rate: shown worse than baseline by at least +2.10 pp, allowed +0.50 pp" in a.lines
    assert a.metrics[0]["rollback_line"] == 0.005
    dec = dict(FAIL, harmful="decrease", kind="mean", unit="tokens", interval=[-40.0, -12.0], allowed=10.0,
               difference=-20.0, details={"rollback_line": -10.0})
    assert describe_beyond(dec).endswith("by at least -12 tokens, allowed -10 tokens")
    # an evaluation stored before the line was recorded: +allowed for a harmful increase
    assert alert_from_event(event(verdicts=[FAIL])).metrics[0]["rollback_line"] == 0.015


def test_pass_above_zero_within_the_allowance_is_not_harm():
    # worse than the baseline (interval above 0) but below the allowed +1.50 pp: within the allowance
    ok = dict(FAIL, verdict="pass", canary=0.03, difference=0.01, interval=[0.002, 0.012],
              details={"rollback_line": 0.015})
    s = describe_verdict(ok)
    assert s.startswith("error_rate (gating) pass:") and "interval [+0.20, +1.20] pp" in s
    assert s.endswith("allowed +1.50 pp (absolute): within the allowance; n canary 412 / baseline 3,900")
    a = alert_from_event(event("promoted", verdicts=[ok], timings=None), 10000)
    assert "FAIL" not in a.text and "beyond" not in a.text and "Why:" not in a.text


def test_old_any_harm_fail_is_worded_honestly():
    # stored before verdicts respected the allowance: fail meant "interval above 0", here still below +1.50 pp
    old = dict(FAIL, interval=[0.004, 0.03])
    assert "judged by the earlier any-harm rule" in describe_verdict(old)
    assert describe_beyond(old) == ("error_rate: shown worse than baseline by at least +0.40 pp, allowed +1.50 pp "
                                    "(judged by the earlier any-harm rule, not beyond the allowance)")


def test_exceedance_ratio_verdict_is_on_the_exceedance_share_scale_not_ms():
    v = dict(LAT, verdict="fail", allowed_mode="exceedance_ratio", unit="", difference=0.025,
             interval=[0.021, 0.04], allowed=0.01,
             details={"interval_scale": "exceedance share difference", "rollback_line": 0.01})
    s = describe_verdict(v)
    assert "exceedance share change +0.025" in s and "ms" not in s
    assert "interval [+0.021, +0.04] (exceedance share difference, unitless)" in s
    assert "allowed +0.01 (exceedance_ratio): beyond the allowance" in s
    assert describe_beyond(v) == ("latency_p95: shown worse than baseline by at least +0.021, allowed +0.01 "
                                  "(exceedance share difference)")
    # the same verdict kept in ms when the stored unit says so (quantile shift), still no share label
    shift = dict(LAT, verdict="fail", interval=[90.0, 140.0], details={"interval_scale": "quantile shift",
                                                                       "rollback_line": 79.0})
    assert describe_beyond(shift) == "latency_p95: shown worse than baseline by at least +90 ms, allowed +79 ms"
    assert alert_from_event(event(verdicts=[v])).metrics[0]["interval_scale"] == "exceedance share difference"


def test_timings_not_acked_and_failed_push():
    t = dict(TIMINGS, all_acked=False, not_acked=["envoy-1"], push_to_ack_ms=5000.0)
    assert describe_timings(t).endswith("NOT ACKed by envoy-1 after 5000 ms")
    assert "FAILED: control API: UNAVAILABLE" in describe_timings({"detected_at": 1.0,
                                                                  "error": "control API: UNAVAILABLE: down"})
    a = alert_from_event(event(timings=t))
    tr = rollback_push_trouble(a)
    assert tr is not None and tr.kind == "trouble" and tr.component == "rollback_push" and tr.severity == "critical"
    assert "not ACKed by envoy-1" in tr.title
    assert rollback_push_trouble(alert_from_event(event())) is None


def test_webhook_payload_round_trips():
    a = alert_from_event(event(), 3000)
    p = webhook_payload(a)
    assert p["source"] == "lockgate" and p["kind"] == "rolled_back" and p["status"] == "firing"
    assert p["text"] == a.text and p["time"] == "2027-01-15T08:01:40.000Z"
    assert {m["metric"] for m in p["metrics"]} == {"error_rate", "latency_p95"}
    assert Alert.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_slack_payload_shape():
    a = alert_from_event(event(), 3000)
    p = slack_payload(a)
    assert set(p) == {"text", "blocks"}
    assert p["text"].startswith(":red_circle: chat: canary v2 ROLLED BACK")
    types = [b["type"] for b in p["blocks"]]
    assert types[0] == "header" and types[-1] == "context"
    assert len(p["blocks"][0]["text"]["text"]) <= 150
    metrics = next(b for b in p["blocks"] if b["type"] == "section" and "*Metrics*" in b["text"]["text"])
    assert "error_rate (gating) FAIL" in metrics["text"]["text"]
    why = p["blocks"][1]["text"]["text"]
    assert "error_rate: shown worse than baseline by at least +5.10 pp, allowed +1.50 pp" in why
    assert all(len(b.get("text", {}).get("text", "")) <= 3000 for b in p["blocks"])
    esc = slack_payload(trouble_alert("envoy", "Envoy <a> & b"))
    assert "&lt;a&gt; &amp; b" in json.dumps(esc["blocks"][-2:]) or esc["blocks"][0]["text"]["text"] == "Envoy <a> & b"
    resolved = slack_payload(trouble_alert("control_api", "back", resolved=True))
    assert resolved["text"].startswith(":white_check_mark: RESOLVED: back")


def test_alertmanager_payload():
    a = alert_from_event(event(), 3000)
    [p] = alertmanager_payload(a, "http://ctl:18021/v1/rollouts?model=chat", resolve_after_s=600)
    assert p["labels"] == {"alertname": "LockgateCanaryRolledBack", "model": "chat", "canary": "v2",
                           "severity": "critical", "rollout": "3"}
    assert p["annotations"]["summary"] == a.title and "error_rate (gating) FAIL" in p["annotations"]["description"]
    assert p["startsAt"] == "2027-01-15T08:01:40.000Z" and p["endsAt"] == "2027-01-15T08:11:40.000Z"
    assert p["generatorURL"] == "http://ctl:18021/v1/rollouts?model=chat"
    firing = alertmanager_payload(trouble_alert("control_api", "down", severity="critical", ts=100.0))[0]
    assert "endsAt" not in firing and firing["labels"]["component"] == "control_api"
    assert firing["labels"]["alertname"] == "LockgateComponentTrouble" and "generatorURL" not in firing
    resolved = alertmanager_payload(trouble_alert("control_api", "up", resolved=True, ts=200.0))[0]
    assert resolved["endsAt"] == "1970-01-01T00:03:20.000Z"
    assert alertmanager_url("http://am:9093") == "http://am:9093/api/v2/alerts"
    assert alertmanager_url("http://am:9093/prefix/api/v2/alerts") == "http://am:9093/prefix/api/v2/alerts"


def test_render_per_sink_type(monkeypatch):
    monkeypatch.setenv("LG_TEST_SLACK_URL", "https://hooks.slack.example/T/B/x")
    cfg = config_from_text(CONFIG_OK, "c.yaml")
    a = alert_from_event(event(), 3000)
    url, body = render(a, cfg.alerts[1], "http://ctl/v1/rollouts?model={model}")
    assert url == "https://hooks.slack.example/T/B/x" and set(json.loads(body)) == {"text", "blocks"}
    url, body = render(a, cfg.alerts[2], "http://ctl/v1/rollouts?model={model}")
    assert url == "http://127.0.0.1:9093/api/v2/alerts"
    assert json.loads(body)[0]["generatorURL"] == "http://ctl/v1/rollouts?model=chat"


def test_backoff_is_exponential_and_bounded():
    p = RetryPolicy(max_attempts=10, initial_backoff_s=1.0, max_backoff_s=30.0)
    assert [backoff_delay(a, p, jitter=0) for a in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(0, p) == 0.0
    rnd = random.Random(1)
    for a in range(1, 50):
        d = backoff_delay(a, p, jitter=0.1, rnd=rnd)
        assert 0.9 * min(2 ** (a - 1), 30) <= d <= min(2 ** (a - 1), 30)
    assert backoff_delay(10_000, p, jitter=0) == 30.0  # no overflow
    assert total_retry_window(p) == 1 + 2 + 4 + 8 + 16 + 30 * 4


@pytest.mark.parametrize("status,verdict", [(200, "ok"), (202, "ok"), (204, "ok"), (500, "retry"), (503, "retry"),
                                            (429, "retry"), (408, "retry"), (302, "retry"), (400, "permanent"),
                                            (401, "permanent"), (404, "permanent"), (410, "permanent")])
def test_classify_status(status, verdict):
    assert classify_status(status) == verdict


CONFIG_OK = """
state_dir: /tmp/lg
models:
  - name: chat
    stable: v1
    versions: {v1: {endpoints: ["127.0.0.1:1"]}, v2: {endpoints: ["127.0.0.1:2"]}}
alerts:
  - {type: webhook, url: "http://127.0.0.1:8080/hook", on: [rolled_back, trouble], retry: {max_attempts: 3, initial_backoff_s: 0.5, max_backoff_s: 2}}
  - type: slack
    url_env: LG_TEST_SLACK_URL
    name: team-slack
    on: [rolled_back, inconclusive, promoted]
  - {type: alertmanager, url: "http://127.0.0.1:9093", bearer_token_env: AM_TOKEN, resolve_after_s: 600}
registry:
  type: mlflow
  tracking_uri: http://127.0.0.1:5000
  versions: {v2: "3"}
  models: {chat: {registered_model: chat-llm, versions: {v1: 2}}}
"""


def test_config_alerts_and_registry(monkeypatch):
    monkeypatch.setenv("LG_TEST_SLACK_URL", "https://hooks.slack.example/T/B/x")
    cfg = config_from_text(CONFIG_OK, "c.yaml")
    hook, slack, am = cfg.alerts
    assert hook.type == "webhook" and hook.on == ("rolled_back", "trouble") and hook.name == "webhook-0"
    assert hook.retry == RetryPolicy(3, 0.5, 2.0)
    assert slack.name == "team-slack" and slack.url == "https://hooks.slack.example/T/B/x"
    assert am.on == ("rolled_back", "aborted", "inconclusive", "promoted", "trouble", "awaiting_approval",
                     "host_ejected", "capacity_hold") \
        and am.resolve_after_s == 600
    assert am.bearer_token_env == "AM_TOKEN"
    r = cfg.registry
    assert r.type == "mlflow" and r.versions == (("v2", "3"),) and r.alias == "production"
    assert dict(r.models)["chat"].registered_model == "chat-llm" and dict(r.models)["chat"].versions == (("v1", "2"),)
    default = config_from_text(CONFIG_OK.split("alerts:")[0], "c.yaml")
    assert default.alerts == () and default.registry.type == "file" and default.registry.path is None


def test_config_errors_name_file_line_field(monkeypatch):
    monkeypatch.delenv("LG_NOPE", raising=False)
    text = CONFIG_OK.split("alerts:")[0] + """alerts:
  - {type: pager, url: "ftp://x", on: [rolled_back, nope], retry: {max_attempts: 0}}
  - {type: slack, url_env: LG_NOPE}
  - {type: webhook, url: "http://a", generator_url: "http://b", timeout: 3}
registry:
  type: mlflow
  versions: {v7: "3", v2: abc}
  path: /tmp
"""
    with pytest.raises(ConfigError) as e:
        config_from_text(text, "c.yaml")
    msgs = [p.render("c.yaml") for p in e.value.problems]
    joined = "\n".join(msgs)
    assert "c.yaml:8:12: alerts[0].type: must be webhook, slack or alertmanager, got 'pager'" in joined
    assert "alerts[0].url: must be an http:// or https:// URL, got 'ftp://x'" in joined
    assert "alerts[0].on[1]: must be one of" in joined and "got 'nope'" in joined
    assert "alerts[0].retry.max_attempts: must be between 1 and 1000" in joined
    assert "c.yaml:9:" in joined and "alerts[1].url_env: environment variable LG_NOPE is not set" in joined
    assert "alerts[2].generator_url: is only used with type: alertmanager" in joined
    assert "alerts[2].timeout: unknown field" in joined
    assert "registry.tracking_uri: is required" in joined
    assert "registry.versions.v7: 'v7' is not a version of chat" in joined
    assert "registry.versions.v2: must be an MLflow version number, got 'abc'" in joined
    assert "registry.path: unknown field for registry type mlflow" in joined


def test_outbox_orders_per_channel_and_persists(tmp_path):
    ob = Outbox(tmp_path / "n.db")
    a1 = ob.add("alert:a", "rolled_back", 1, {"n": 1}, now=100.0)
    a2 = ob.add("alert:a", "promoted", 2, {"n": 2}, now=101.0)
    b1 = ob.add("alert:b", "rolled_back", 1, {"n": 3}, now=102.0)
    assert [i.id for i in ob.due(200.0)] == [a1, b1]           # heads only: a2 waits behind a1
    assert [i.id for i in ob.due(200.0, frozenset({"alert:a"}))] == [b1]
    ob.retry(a1, 1, 300.0, "HTTP 503")
    assert [i.id for i in ob.due(200.0)] == [b1]                # a1 backs off, a2 still waits behind it
    assert ob.next_at() == 102.0
    ob.delivered(b1, 1, 200.0)
    assert ob.next_at() == 300.0
    ob.close()
    ob = Outbox(tmp_path / "n.db")                              # a restart keeps what is pending
    [i] = ob.due(300.0)
    assert (i.id, i.attempts, i.last_error, i.payload) == (a1, 1, "HTTP 503", {"n": 1})
    ob.failed(a1, 2, 301.0, "gave up")
    assert [i.id for i in ob.due(400.0)] == [a2]
    assert ob.prune(1000.0) == 2 and len(ob.items()) == 1
    ob.meta_set("k", {"x": 1})
    assert ob.meta_get("k") == {"x": 1} and ob.meta_get("missing", 5) == 5


class _Server:
    def __init__(self, answers):
        self.requests = []
        self.answers = list(answers)
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.requests.append((self.path, dict(self.headers), body))
                status, chunked = outer.answers.pop(0) if outer.answers else (200, False)
                self.send_response(status)
                if chunked:
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"5\r\nhello\r\n3\r\n!!!\r\n0\r\n\r\n")
                else:
                    data = b'{"ok": true}'
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_client_and_send_alert_against_a_real_server(monkeypatch):
    srv = _Server([(200, True), (503, False), (400, False), (202, False)])
    try:
        res = asyncio.run(http_request("POST", f"http://u:p%40ss@127.0.0.1:{srv.port}/x?q=1", b"{}", timeout=5))
        assert res.status == 200 and res.body == b"hello!!!"
        path, headers, body = srv.requests[0]
        assert path == "/x?q=1" and headers["Authorization"] == "Basic dTpwQHNz" and body == b"{}"
        cfg = config_from_text(CONFIG_OK.split("alerts:")[0] + f"""alerts:
  - {{type: webhook, url: "http://127.0.0.1:{srv.port}/hook", bearer_token_env: LG_T}}
""", "c.yaml")
        sink = cfg.alerts[0]
        alert = alert_from_event(event(), 3000)
        monkeypatch.setenv("LG_T", "s3cret")
        with pytest.raises(DeliveryError) as e:
            asyncio.run(send_alert(sink, alert))
        assert e.value.retryable and e.value.status == 503
        with pytest.raises(DeliveryError) as e:
            asyncio.run(send_alert(sink, alert))
        assert not e.value.retryable and e.value.status == 400
        assert asyncio.run(send_alert(sink, alert)) == {"http_status": 202}
        path, headers, body = srv.requests[-1]
        assert path == "/hook" and headers["Authorization"] == "Bearer s3cret"
        assert json.loads(body)["title"] == alert.title
    finally:
        srv.close()


def test_http_client_timeout_and_refused():
    import socket

    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(1)  # accepts the connection, never answers
    port = lsn.getsockname()[1]
    try:
        with pytest.raises(DeliveryError, match="no answer within 0.3 s") as e:
            asyncio.run(http_request("POST", f"http://127.0.0.1:{port}/", b"{}", timeout=0.3))
        assert e.value.retryable
    finally:
        lsn.close()
    with pytest.raises(DeliveryError) as e:
        asyncio.run(http_request("POST", f"http://127.0.0.1:{port}/", b"{}", timeout=2))
    assert e.value.retryable
