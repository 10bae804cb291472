"""``make demo``: a whole rollout story on one machine, live, on a compressed clock.

Starts the bundled example model servers (each version a real, different server), ``lockgate up``
(xDS, ext_proc and a real Envoy first, then the controller) on ``examples/lockgate.yaml``, a traffic generator with
many sticky users and a delayed-feedback poster, then plays two rollouts at once:

* **good**: chat v2 ramps 1 → 5 → 20 → 50 → 100 % and is promoted on evidence;
* **bad**: ticket-classifier v2 is better on aggregate accuracy but misses fraud tickets (a minority
  class); its fraud-recall gate rolls it back, and the revert time is shown.
* **host** (optional, ``--story host``): chat v2 runs on three hosts and one of them answers 500 to 30 %
  of its requests (a failing card); lockgate tests each host against its peers, ejects that one through
  EDS (every Envoy ACKed), judges the version without it and promotes it.

The terminal shows each rollout's stage, weight, samples, gating verdicts and ETA every second.
At the end: ``lockgate history``, the HTML reports, and everything started is stopped (Ctrl-C at
any point too).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from lockgate.config import LockgateConfig, load_config
from lockgate.controller.decide.spec import parse_duration
from lockgate.examples.traffic import TrafficGenerator

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "examples" / "lockgate.yaml"
SPECS = {"good": REPO / "examples" / "rollouts" / "demo-chat-v2.yaml",
         "bad": REPO / "examples" / "rollouts" / "demo-classifier-v2.yaml",
         "host": REPO / "examples" / "rollouts" / "demo-chat-v2.yaml"}
#: --story host: chat v2's second host (of three) is bad
BAD_HOST_FLAGS = ["--refusal-rate", "0.02", "--error-rate", "0.3", "--latency-ms", "15", "--tokens-mean", "44",
                  "--seed", "13"]
MARKER = ".lockgate-demo-state"

SERVERS = {  # (model, version) → module and flags
    ("chat", "v1"): ("lockgate.examples.chat_server",
                     ["--refusal-rate", "0.02", "--error-rate", "0.005", "--latency-ms", "15", "--seed", "11"]),
    ("chat", "v2"): ("lockgate.examples.chat_server",
                     ["--refusal-rate", "0.02", "--error-rate", "0.005", "--latency-ms", "15", "--tokens-mean", "44",
                      "--seed", "12"]),
    ("ticket-classifier", "v1"): ("lockgate.examples.classifier_server",
                                  ["--accuracy", "billing=0.90,technical=0.90,account=0.90,fraud=0.92",
                                   "--latency-ms", "5", "--seed", "21"]),
    ("ticket-classifier", "v2"): ("lockgate.examples.classifier_server",
                                  ["--accuracy", "billing=0.97,technical=0.97,account=0.97,fraud=0.60",
                                   "--latency-ms", "5", "--seed", "22"]),
}


def say(msg: str = "") -> None:
    print(msg, flush=True)


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.config_path = str(Path(args.config).resolve())
        self.config: LockgateConfig = load_config(self.config_path)
        self.procs: list[subprocess.Popen] = []
        self.up: subprocess.Popen | None = None
        self.traffic: TrafficGenerator | None = None
        self.t0 = time.monotonic()
        self.state = self.config.state_dir
        self.logs = self.state / "logs"
        self.host_dir: Path | None = None
        self.announced_hosts: set[str] = set()
        if getattr(args, "story", "") == "host":
            self.host_config()

    def host_config(self) -> None:
        """``--story host``: the config with chat v2 on three hosts (its endpoint and two more on free ports),
        written to a temporary directory (the state directory stays the configured one)."""
        data = yaml.safe_load(Path(self.config_path).read_text())
        data["state_dir"] = str(self.state)
        chat = next(m for m in data["models"] if m["name"] == "chat")
        eps = list(chat["versions"]["v2"]["endpoints"])
        host = eps[0].rsplit(":", 1)[0]
        while len(eps) < 3:
            with socket.socket() as sock:
                sock.bind((host, 0))
                eps.append(f"{host}:{sock.getsockname()[1]}")
        chat["versions"]["v2"]["endpoints"] = eps
        self.host_dir = Path(tempfile.mkdtemp(prefix="lockgate-demo-host-"))
        path = self.host_dir / "lockgate.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        self.config_path = str(path)
        self.config = load_config(self.config_path)

    # ----- lifecycle -----
    def fresh_state(self) -> None:
        if self.state.exists() and not self.args.keep_state:
            if not (self.state / MARKER).exists() and any(self.state.iterdir()):
                raise SystemExit(f"demo: {self.state} exists and is not a demo state directory; "
                                 "refusing to delete it (use --keep-state or another state_dir)")
            shutil.rmtree(self.state)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.state / MARKER).touch()

    def start_servers(self) -> None:
        for (model, version), (module, flags) in SERVERS.items():
            for i, ep in enumerate(self.config.model(model).versions[version].endpoints):
                bad = self.host_dir is not None and (model, version) == ("chat", "v2") and i == 1
                log = open(self.logs / f"{model}-{version}{f'-{i}' if i else ''}.log", "ab")
                p = subprocess.Popen([sys.executable, "-m", module, "--host", ep.host, "--port", str(ep.port),
                                      "--version", version, *(BAD_HOST_FLAGS if bad else flags)],
                                     stdout=subprocess.PIPE, stderr=log, start_new_session=True)
                self.procs.append(p)
                line = p.stdout.readline().decode() if p.stdout else ""
                if not line.startswith("ready"):
                    raise RuntimeError(f"{module} {version} did not start (port {ep.port} in use?); see {log.name}")
        say(f"  model servers: chat v1/v2, ticket-classifier v1/v2 (v2 misses fraud tickets) — logs in {self.logs}")
        if self.host_dir is not None:
            eps = self.config.model("chat").versions["v2"].endpoints
            say(f"  chat v2 runs on 3 hosts: {', '.join(f'{e.host}:{e.port}' for e in eps)}; "
                f"{eps[1].host}:{eps[1].port} answers 500 to 30 % of its requests (a failing card)")

    def start_lockgate(self) -> None:
        log = open(self.logs / "lockgate-up.log", "ab")
        self.up = subprocess.Popen([sys.executable, "-m", "lockgate", "-c", self.config_path, "up"],
                                   stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        assert self.up.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.up.stdout.readline().decode()
            if not line and self.up.poll() is not None:
                raise RuntimeError(f"lockgate up exited; see {self.logs}")
            if "serving models" in line:
                say(f"  lockgate: controller, xDS, ext_proc and Envoy up — traffic on http://{self.config.listener}")
                return
        raise RuntimeError(f"lockgate up not ready after 60 s; see {self.logs}")

    def stop(self) -> None:
        if self.traffic is not None:
            self.traffic.close()
            self.traffic = None
        if self.up is not None and self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
            try:
                self.up.wait(20)
            except subprocess.TimeoutExpired:
                self.up.kill()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.host_dir is not None:
            shutil.rmtree(self.host_dir, ignore_errors=True)

    # ----- controller API -----
    def api(self, method: str, path: str, payload: dict | None = None) -> tuple[int, dict]:
        url = f"http://{self.config.controller.http}{path}"
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def spec_text(self, story: str) -> str:
        """The demo spec, with durations stretched by ``--slow``."""
        data = yaml.safe_load(SPECS[story].read_text())
        if self.args.slow != 1:
            r = data["rollout"]
            r["analysis_interval_s"] = r.get("analysis_interval_s", 2) * self.args.slow
            for step in r["steps"]:
                step["min_duration"] = parse_duration(step["min_duration"]) * self.args.slow
            r["promotion"]["max_duration"] = parse_duration(r["promotion"]["max_duration"]) * self.args.slow
        return yaml.safe_dump(data, sort_keys=False)

    def start_rollout(self, story: str) -> str:
        status, body = self.api("POST", "/v1/rollouts/start", {"spec": self.spec_text(story),
                                                              "source": str(SPECS[story]), "actor": "demo"})
        if status != 200:
            raise RuntimeError(f"starting the {story} rollout failed: {body}")
        r = body["rollout"]
        drill = body.get("start", {}).get("drill") or {}
        say(f"  rollout #{r['id']}: {r['model']} {r['baseline']} → {r['canary']} started "
            f"(preflight drill: every Envoy ACKed in {drill.get('elapsed_ms', 0):.1f} ms)")
        return r["model"]

    # ----- live view -----
    def line(self, r: dict) -> str:
        ev = r.get("last_eval") or {}
        verdicts = " ".join(f"{v['metric']}={v['verdict']}" for v in ev.get("verdicts", []) if v.get("gating"))
        weight = r.get("weight_bp")
        eta = ""
        hours = [h for h in (ev.get("plan_hours") or {}).values() if h]
        if hours and r["status"] == "running":
            secs = max(hours) * 3600
            eta = f" ETA {secs:.0f}s" if secs < 600 else f" ETA {secs / 60:.0f}min"
        out = (ev.get("hosts") or {}).get("ejected") or []
        return (f"[{time.monotonic() - self.t0:5.0f}s] {r['model']:<17} {r['status']:<11} "
                f"{r.get('stage_label', ''):<19} {('%g%%' % (weight / 100)) if weight is not None else '?':>5} "
                f"baseline {ev.get('n_baseline', 0):>5} canary {ev.get('n_canary', 0):>5}  {verdicts}{eta}"
                + (f"  hosts out: {', '.join(out)}" if out else ""))

    def announce_hosts(self, r: dict) -> None:
        """The first look that shows a host out of rotation: say so, with the numbers of the log's entry."""
        out = ((r.get("last_eval") or {}).get("hosts") or {}).get("ejected") or []
        for host in out:
            if host in self.announced_hosts:
                continue
            self.announced_hosts.add(host)
            ev = next((e for e in r.get("hosts") or [] if e.get("kind") == "host_ejected"
                       and (e.get("detail") or {}).get("host") == host), None)
            d = (ev or {}).get("detail") or {}
            nums = (f": errors {d['host_errors']:.0f}/{d['host_requests']} vs its peers' "
                    f"{d['peers_errors']:.0f}/{d['peers_requests']}, every Envoy ACKed in {d.get('ack_ms', 0):.1f} ms"
                    if d.get("host_requests") is not None else "")
            say(f"  ==> {r['model']} {r['canary']}: host {host} EJECTED{nums}; the version is judged without it")

    def watch(self, models: list[str], timeout: float) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        final: dict[str, dict] = {}
        while time.monotonic() < deadline and len(final) < len(models):
            _, body = self.api("GET", "/v1/rollouts")
            for r in body.get("rollouts", []):
                if r["model"] not in models or r["model"] in final:
                    continue
                say(self.line(r))
                self.announce_hosts(r)
                if r["status"] in ("promoted", "rolled_back", "aborted", "inconclusive"):
                    final[r["model"]] = r
                    self.announce(r)
            time.sleep(self.args.tick)
        return final

    def announce(self, r: dict) -> None:
        out = r.get("outcome") or {}
        detail = out.get("detail", {})
        if r["status"] == "promoted":
            say(f"  ==> {r['model']} {r['canary']} PROMOTED to 100%: {'; '.join(detail.get('reasons', []))}")
        elif r["status"] == "rolled_back":
            t = detail.get("timings", {})
            say(f"  ==> {r['model']} {r['canary']} ROLLED BACK to {r['baseline']}: "
                f"{'; '.join(detail.get('reasons', []))[:400]}")
            if t.get("detected_at") and t.get("acked_at"):
                say(f"      breach detected → weights pushed in {(t['pushed_at'] - t['detected_at']) * 1000:.1f} ms → "
                    f"every Envoy ACKed weight 0 in {t['push_to_ack_ms']:.1f} ms "
                    f"(total {(t['acked_at'] - t['detected_at']) * 1000:.1f} ms)")
        else:
            say(f"  ==> {r['model']}: {r['status']}: {'; '.join(detail.get('reasons', []))}")

    def epilogue(self, final: dict[str, dict]) -> None:
        say("\nlockgate history:")
        r = subprocess.run([sys.executable, "-m", "lockgate", "-c", self.config_path, "history"], capture_output=True,
                           text=True)
        say(r.stdout.rstrip() if r.returncode == 0 else "  (history unavailable: " + r.stderr.strip() + ")")
        if self.args.no_report:
            return
        reports = []
        for model, ro in final.items():
            out = self.state / "reports" / f"rollout-{ro['id']}-{model}.html"
            out.parent.mkdir(parents=True, exist_ok=True)
            rr = subprocess.run([sys.executable, "-m", "lockgate", "-c", self.config_path, "report", str(ro["id"]),
                                 "-o", str(out)], capture_output=True, text=True)
            if rr.returncode == 0:
                reports.append(str(out))
            else:
                say(f"  (report for rollout #{ro['id']} not written: {rr.stderr.strip()[:200]})")
        if reports:
            say("\nreports (open in a browser; self-contained):\n  " + "\n  ".join(reports))

    def run(self) -> int:
        stories = ["good", "bad"] if self.args.story == "both" else [self.args.story]
        say("lockgate demo — progressive canary rollouts for models, on one machine\n")
        self.fresh_state()
        self.start_servers()
        self.start_lockgate()
        self.traffic = TrafficGenerator(str(self.config.listener), str(self.config.controller.http),
                                        rate=self.args.rate, label_delay_s=2.0).start()
        say(f"  traffic: {self.args.rate:g} req/s from 2,000 sticky users; delayed true-class labels and thumbs "
            "posted as feedback\n")
        time.sleep(self.args.warmup)
        models = [self.start_rollout(s) for s in stories]
        say("")
        final = self.watch(models, self.args.timeout)
        s = self.traffic.stats
        say(f"\ntraffic: {s.sent:,} requests ({s.errors} errors), {s.feedback_sent:,} feedback items posted")
        missing = [m for m in models if m not in final]
        self.epilogue(final)
        if missing:
            say(f"demo: {', '.join(missing)} did not finish within {self.args.timeout:.0f} s")
            return 1
        ok = all((final[m]["status"] == "promoted") == (m == "chat") for m in models)
        if self.host_dir is not None:
            ok = ok and bool(self.announced_hosts)
        say("\ndemo finished: " + ", ".join(f"{m} {final[m]['status']}" for m in models))
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockgate.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--story", choices=("both", "good", "bad", "host"), default="both",
                    help="good: chat v2 promoted; bad: ticket-classifier v2 rolled back (default both, at once); "
                         "host: chat v2 on three hosts, one bad: that host ejected, the version promoted")
    ap.add_argument("--slow", type=float, default=1.0, help="stretch every stage's duration by this factor")
    ap.add_argument("--rate", type=float, default=120.0, help="requests per second over both models")
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds of baseline traffic before the rollouts")
    ap.add_argument("--timeout", type=float, default=240.0, help="give up after this many seconds")
    ap.add_argument("--tick", type=float, default=1.0, help="seconds between progress lines")
    ap.add_argument("--keep-state", action="store_true", help="keep the previous demo's state directory")
    ap.add_argument("--no-report", action="store_true", help="skip the HTML reports")
    args = ap.parse_args(argv)
    demo = Demo(args)
    old = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return demo.run()
    except KeyboardInterrupt:
        say("\ndemo: interrupted; stopping everything it started")
        return 130
    except RuntimeError as exc:
        say(f"demo: {exc}")
        return 1
    finally:
        demo.stop()
        signal.signal(signal.SIGTERM, old)
        say(f"demo: stopped (state and logs in {demo.state})")


if __name__ == "__main__":
    sys.exit(main())
