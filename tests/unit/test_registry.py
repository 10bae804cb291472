"""Registry feedback: the event → update mapping, the file registry (atomic, history, idempotent), the
MLflow tags, and the notifier's outbox delivery (retries with backoff, give-up, registry down) fed outcome
events directly, with a real local HTTP receiver."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lockgate.config import config_from_text
from lockgate.controller.tell.registry import RegistryUpdate, make_registry, update_from_event
from lockgate.controller.tell.registry.file import FileRegistry
from lockgate.controller.tell.registry.mlflow import MlflowRegistry, tag_key
from lockgate.controller.decide.rollouts import RolloutStore

VERDICT = {"metric": "error_rate", "kind": "rate", "verdict": "fail", "gating": True, "baseline": 0.02,
           "canary": 0.1, "difference": 0.08, "interval": [0.05, 0.11], "allowed": 0.015, "allowed_mode": "absolute",
           "harmful": "increase", "n_baseline": 3900, "n_canary": 400, "alpha": 0.05, "reason": "…"}


def event(kind, rid=3, canary="v2", **detail):
    d = {"reasons": ["r1"], "verdicts": [VERDICT]}
    d.update(detail)
    return {"kind": kind, "ts": 1_800_000_000.0 + rid, "detail": d,
            "rollout": {"id": rid, "model": "chat", "canary": canary, "baseline": "v1", "started_at": 1.0,
                        "ended_at": 2.0, "spec_hash": "h"}}


def test_update_from_event():
    u = update_from_event(event("rolled_back", timings={"all_acked": True}))
    assert (u.status, u.version, u.baseline, u.rollout_id, u.by_evidence) == ("failed-canary", "v2", "v1", 3, True)
    assert u.metrics["error_rate"]["canary"] == 0.1 and "reason" not in u.metrics["error_rate"]
    assert update_from_event(event("promoted")).status == "production"
    assert update_from_event(event("inconclusive")).status == "inconclusive"
    assert update_from_event(event("aborted")).status == "aborted"
    assert update_from_event(event("advanced")) is None
    manual = update_from_event(event("promoted", reasons=["manual promotion by cli:x (not by evidence)"]))
    assert manual.by_evidence is False
    assert RegistryUpdate.from_dict(json.loads(json.dumps(u.to_dict()))) == u


def test_file_registry_history_production_and_idempotence(tmp_path):
    reg = FileRegistry(tmp_path / "registry")
    reg.apply(update_from_event(event("promoted", rid=1, canary="v2")))
    doc = reg.read("chat")
    assert doc["production"] == "v2" and doc["versions"]["v2"]["status"] == "production"
    assert doc["versions"]["v2"]["metrics"]["error_rate"]["baseline"] == 0.02
    reg.apply(update_from_event(event("rolled_back", rid=2, canary="v3", timings={"all_acked": True})))
    again = reg.apply(update_from_event(event("rolled_back", rid=2, canary="v3")))  # a retry: no change
    assert again["already_recorded"]
    reg.apply(update_from_event(event("promoted", rid=4, canary="v4")))
    doc = reg.read("chat")
    assert doc["production"] == "v4" and doc["versions"]["v2"]["superseded_by"] == "v4"
    assert doc["versions"]["v3"]["status"] == "failed-canary" and doc["versions"]["v3"]["timings"] == {"all_acked": True}
    assert [(h["version"], h["status"], h["rollout_id"]) for h in doc["history"]] == \
        [("v2", "production", 1), ("v3", "failed-canary", 2), ("v4", "production", 4)]
    assert sorted(p.name for p in (tmp_path / "registry").iterdir()) == ["chat.json"]  # no temp files left


def test_make_registry_default_is_file(tmp_path):
    cfg = config_from_text(f"""
state_dir: {tmp_path}
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:1"]}}}}}}]
""")
    reg = make_registry(cfg)
    assert isinstance(reg, FileRegistry) and reg.directory == tmp_path / "registry"


def test_mlflow_tags():
    cfg = config_from_text("""
state_dir: /tmp/x
models: [{name: chat, stable: v1, versions: {v1: {endpoints: ["127.0.0.1:1"]}, v2: {endpoints: ["127.0.0.1:2"]}}}]
registry: {type: mlflow, tracking_uri: "http://127.0.0.1:1", versions: {v2: 7}}
""")
    reg = MlflowRegistry(cfg.registry)
    u = update_from_event(event("rolled_back", timings={"all_acked": True, "detected_at": 10.0, "pushed_at": 10.004,
                                                        "push_to_ack_ms": 11.0}))
    tags = reg.tags(u)
    assert tags["lockgate.status"] == "failed-canary" and tags["lockgate.rollout_id"] == "3"
    assert tags["lockgate.rollback_ms"] == "15" and tags["lockgate.baseline"] == "v1"
    assert tags["lockgate.metric.error_rate"].startswith("verdict=fail canary=0.1 baseline=0.02 diff=+0.08 "
                                                         "interval=[0.05,0.11] allowed=0.015 n=400/3900")
    assert tag_key("class_recall[fraud]") == "class_recall_fraud_"
    assert asyncio.run(reg.resolve_version("chat", "v2")) == ("chat", "7")


# ---------------------------------------------------------------------------------------------- notifier
class Receiver:
    """Records POSTs; answers ``fail`` 503s first, then 200 (or hangs when ``hang``)."""

    def __init__(self, fail=0, hang=False, status=503):
        self.requests, self.fail, self.hang, self.status = [], fail, hang, status
        self.times = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.times.append(time.monotonic())
                if outer.hang:
                    time.sleep(5)
                    return
                if outer.fail > 0:
                    outer.fail -= 1
                    self.send_response(outer.status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                outer.requests.append(json.loads(body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def fake_rollout(tmp_path, alerts_yaml, registry_yaml=""):
    cfg = config_from_text(f"""
state_dir: {tmp_path}
control: {{port: 1}}
models: [{{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:11"]}}, v2: {{endpoints: ["127.0.0.1:12"]}}}}}}]
{alerts_yaml}
{registry_yaml}
""")
    store = RolloutStore(tmp_path / "rollouts.db")
    r = store.create(model="chat", canary="v2", baseline="v1", spec_text="x", spec_source="s", spec_hash="h",
                     created_by="t", auto={})
    store.transition(r.id, expect=("pending",), status="running", kind="started", actor="t", weight_bp=1000)
    return cfg, store, r.id


def start_notifier(cfg):
    """A notifier delivering in the background until the returned stop event is set (no trouble checks)."""
    from lockgate.controller.tell.notify import Notifier

    notifier = Notifier(cfg)
    stop = asyncio.Event()
    return notifier, stop, asyncio.ensure_future(notifier.run(stop))


def test_notifier_retries_with_backoff_then_delivers_and_logs(tmp_path):
    ok, flaky, perm = Receiver(), Receiver(fail=2), Receiver(fail=99, status=400)
    try:
        async def main():
            cfg, store, rid = fake_rollout(tmp_path, f"""alerts:
  - {{type: webhook, url: "{ok.url}/a", name: ok}}
  - {{type: slack, url: "{flaky.url}/b", name: flaky, retry: {{initial_backoff_s: 0.2, max_backoff_s: 1}}}}
  - {{type: webhook, url: "{perm.url}/c", name: perm}}
""", f"registry: {{type: webhook, url: '{ok.url}/registry'}}")
            notifier, stop, running = start_notifier(cfg)
            await notifier.on_event(event("rolled_back", rid=rid))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(flaky.requests) < 1:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            stop.set()
            await running
            return store, rid

        store, rid = asyncio.run(main())
        assert [r["title"] for r in ok.requests if "title" in r] == ["chat: canary v2 ROLLED BACK to v1 at 10% of "
                                                                      "traffic (rollout #1, after 1 s)"]
        reg = [r for r in ok.requests if r.get("type") == "registry_update"]
        assert reg and reg[0]["status"] == "failed-canary" and reg[0]["metrics"]["error_rate"]["canary"] == 0.1
        assert len(flaky.requests) == 1 and set(flaky.requests[0]) == {"text", "blocks"}
        gaps = [b - a for a, b in zip(flaky.times, flaky.times[1:])]
        assert len(gaps) == 2 and 0.17 <= gaps[0] and 0.35 <= gaps[1], gaps   # 0.2 s, then 0.4 s (-10% jitter)
        assert len(perm.times) == 1                                           # a 400 is not retried
        events = [e for e in store.events(rid) if e["kind"] in ("alert", "registry")]
        outcomes = sorted((e["detail"].get("sink") or "registry", e["detail"]["outcome"], e["detail"]["attempts"])
                          for e in events)
        assert outcomes == [("flaky", "delivered", 3), ("flaky", "retrying", 1), ("ok", "delivered", 1),
                            ("perm", "gave_up", 1), ("registry", "delivered", 1)]
        assert all("url" not in json.dumps(e["detail"]) or "127.0.0.1" not in json.dumps(e["detail"]) for e in events)
        perm_ev = next(e for e in events if e["detail"].get("sink") == "perm")
        assert perm_ev["detail"]["error"].startswith("HTTP 400") and perm_ev["detail"]["why"] == "permanent error"
    finally:
        for r in (ok, flaky, perm):
            r.close()


def test_notifier_gives_up_after_max_attempts_and_a_hanging_sink_blocks_nothing(tmp_path):
    from lockgate.controller.tell.outbox import Outbox

    down, hang, ok = Receiver(fail=99), Receiver(hang=True), Receiver()
    try:
        async def main():
            cfg, store, rid = fake_rollout(tmp_path, f"""alerts:
  - {{type: webhook, url: "{down.url}", name: down, retry: {{max_attempts: 3, initial_backoff_s: 0.05, max_backoff_s: 0.1}}}}
  - {{type: webhook, url: "{hang.url}", name: hang, timeout_s: 3}}
  - {{type: webhook, url: "{ok.url}", name: ok}}
""")
            notifier, stop, running = start_notifier(cfg)
            t0 = time.monotonic()
            await notifier.on_event(event("promoted", rid=rid))
            queued = time.monotonic() - t0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (len(down.times) < 3 or not ok.requests):
                await asyncio.sleep(0.02)
            delivered_after = time.monotonic() - t0
            await asyncio.sleep(0.2)
            stop.set()
            await running
            return rid, queued, delivered_after

        rid, queued, delivered_after = asyncio.run(main())
        assert queued < 0.5                      # the listener only queues
        assert ok.requests and delivered_after < 2.5   # not held up by the hanging sink (3 s timeout)
        assert len(down.times) == 3
        ob = Outbox(tmp_path / "notify.db")
        states = {i.channel: (i.state, i.attempts) for i in ob.items()}
        ob.close()
        assert states["alert:down"] == ("failed", 3) and states["alert:ok"] == ("delivered", 1)
        assert states["alert:hang"] == ("pending", 0)   # cut off by the stop: retried after a restart
        assert states["registry"] == ("delivered", 1)   # the file registry
        doc = json.loads((tmp_path / "registry" / "chat.json").read_text())
        assert doc["production"] == "v2"
    finally:
        for r in (down, hang, ok):
            r.close()
