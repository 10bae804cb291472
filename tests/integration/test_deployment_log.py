"""The deployment log on a real rollout: history / show / annotate / causes / diagnose / report.

One fleet (real Envoy, controller, example chat servers) runs two rollouts side by side on a
compressed schedule: ``chat`` v1 → v2 (a good canary, promoted) and ``chat-b`` v1 → v3 (a bad
canary, rolled back). v3 runs on two hosts, both failing more than v1: one at 15 %, one "on a different GPU
type" (slow and failing 60 % of requests) — ``diagnose`` has to point at that host. The harm is not one
host's (per-host gating may eject the worse host, the version is still worse without it), so the version
is rolled back. Together v3 fails ~37 % of requests against v1's 2 %: chat-b's spec allows +2 points, so
that is clearly beyond its allowance (with the
+15 points ``chat`` allows, it would be worse but within it, and not rolled back). Then everything stops and the
deployment-log commands are run against the state dir alone (no controller running).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest

from tests.harness import Client, Fleet, requires_envoy
from tests.integration.test_rollout_e2e import SPEC, chat_server

pytestmark = [requires_envoy, pytest.mark.envoy]

FINAL = ("promoted", "rolled_back", "inconclusive", "aborted")


class TwoModelTraffic:
    """Sticky users sending chat requests to ``chat`` and (with ``x-tenant: b``) to ``chat-b``."""

    def __init__(self, port: int, users: int = 600, threads: int = 4, max_s: float = 120):
        self.port, self.users, self.max_s = port, users, max_s
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i, threads), daemon=True) for i in range(threads)]

    def _run(self, i: int, n: int) -> None:
        c = Client(self.port)
        k = i
        deadline = time.monotonic() + self.max_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            tenant_b = k % 2 == 1
            body = json.dumps({"model": "chat-b" if tenant_b else "chat",
                               "messages": [{"role": "user", "content": "hello"}]}).encode()
            headers = {"x-user-id": f"user-{(k // 2) % self.users}", "content-type": "application/json"}
            if tenant_b:
                headers["x-tenant"] = "b"
            c.request("/v1/chat/completions", headers, "POST", body)
            k += n
            time.sleep(0.002)
        c.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def _status(fleet, model):
    r = fleet.cli("rollout", "status", model, "--json", check=True)
    return json.loads(r.stdout)["rollouts"][0]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploylog")
    servers = []
    try:
        v1, p1 = chat_server(tmp, "v1", "--error-rate", "0.02", "--seed", "1")
        v2, p2 = chat_server(tmp, "v2", "--error-rate", "0.02", "--seed", "2")
        b1, pb1 = chat_server(tmp, "b1", "--error-rate", "0.02", "--seed", "3")
        servers += [v1, v2, b1]
        # v3: bad everywhere (15 % errors), worse on one replica on "another GPU type" (slow, 60 % errors): with
        # one healthy replica, per-host gating would eject the bad one and rightly promote the version
        good, pg = chat_server(tmp, "v3", "--error-rate", "0.15", "--seed", "4")
        servers.append(good)
        bad, pbad = chat_server(tmp, "v3", "--error-rate", "0.60", "--seed", "5", "--latency-ms", "15")
        servers.append(bad)
        models = [
            {"name": "chat-b", "match": {"path_prefix": "/v1/chat", "header": {"name": "x-tenant", "value": "b"}},
             "stable": "v1", "versions": {"v1": {"endpoints": [f"127.0.0.1:{pb1}"]},
                                          "v3": {"endpoints": [f"127.0.0.1:{pg}", f"127.0.0.1:{pbad}"]}}},
            {"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
             "versions": {"v1": {"endpoints": [f"127.0.0.1:{p1}"]}, "v2": {"endpoints": [f"127.0.0.1:{p2}"]}}},
        ]
        good_spec = tmp / "good.yaml"
        good_spec.write_text(SPEC.format(max_duration="10m"))
        bad_spec = tmp / "bad.yaml"
        bad_spec.write_text(SPEC.format(max_duration="10m").replace("model: chat", "model: chat-b")
                            .replace("canary: v2", "canary: v3")
                            .replace("error_rate, gating: true, allowed: {absolute: 0.15}",
                                     "error_rate, gating: true, allowed: {absolute: 0.02}"))
        fleet = Fleet(tmp, models, with_controller=True)
        with fleet, TwoModelTraffic(fleet.ports["listener"]):
            time.sleep(1.0)
            for spec in (good_spec, bad_spec):
                r = fleet.cli("rollout", "start", str(spec))
                assert r.returncode == 0, r.stderr + r.stdout
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                st = {m: _status(fleet, m)["status"] for m in ("chat", "chat-b")}
                if all(s in FINAL for s in st.values()):
                    break
                time.sleep(0.5)
            weights_b = fleet.route_weights(0)
    finally:
        for s in servers:
            s.stop()
    # the controller and everything else is stopped now: the log is read from the state dir alone
    ids = {}
    from lockgate.controller.decide.rollouts import RolloutStore

    store = RolloutStore(tmp / "state" / "rollouts.db")
    for r in store.history():
        ids[r.model] = r.id
    statuses = {r.model: r.status for r in store.history()}
    store.close()
    assert statuses == {"chat": "promoted", "chat-b": "rolled_back"}, statuses
    yield {"fleet": fleet, "tmp": tmp, "good": ids["chat"], "bad": ids["chat-b"], "weights": weights_b,
           "bad_host": f"127.0.0.1:{pbad}", "good_host": f"127.0.0.1:{pg}"}
    keep = os.environ.get("LOCKGATE_KEEP_DEPLOYLOG")
    if keep:  # for looking at the artefacts by hand
        shutil.copytree(tmp, keep, dirs_exist_ok=True)


def test_rollback_leaves_canary_at_zero(deployment):
    w = deployment["weights"]
    chat_b = [v for k, v in w.items() if k.startswith("chat-b/")]
    assert chat_b and all(dict(clusters).get("chat-b.v3", 0) == 0 for clusters in chat_b), w


def test_history(deployment):
    fleet = deployment["fleet"]
    r = fleet.cli("history", check=True)
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["ID", "MODEL", "CHANGE", "STATUS"]
    good = next(line for line in lines if line.startswith(f"#{deployment['good']} "))
    bad = next(line for line in lines if line.startswith(f"#{deployment['bad']} "))
    assert "v1→v2" in good and "PROMOTED" in good and "3/3 → 100%" in good and "promoting to 100%" in good
    assert "v1→v3" in bad and "ROLLED_BACK" in bad and "harm: error_rate canary" in bad and " ms " in bad
    only = fleet.cli("history", "--model", "chat", "--json", check=True)
    rows = json.loads(only.stdout)
    assert [x["model"] for x in rows] == ["chat"]
    assert rows[0]["revert_ms"] is None and rows[0]["duration_s"] > 0
    rb = json.loads(fleet.cli("history", "--model", "chat-b", "--json", check=True).stdout)[0]
    assert rb["status"] == "rolled_back" and rb["revert_ms"] is not None and rb["revert_ms"] >= 0
    assert rb["decided_by"] == "controller"


def test_show(deployment):
    fleet = deployment["fleet"]
    text = fleet.cli("show", str(deployment["bad"]), check=True).stdout
    assert "ROLLED_BACK" in text and "spec sha256" in text and "decision: rolled_back by controller" in text
    assert "revert:" in text and "push→ACK" in text and "envoy-0" in text
    assert "error_rate" in text and "actions:" in text and "started stage 1 10% by controller" in text
    d = json.loads(fleet.cli("show", str(deployment["bad"]), "--json", check=True).stdout)
    assert len(d["rollout"]["spec_hash"]) == 64 and "rollout:" in d["rollout"]["spec_text"]
    assert d["decision"]["kind"] == "rolled_back" and d["decision"]["reasons"][0].startswith("harm shown")
    rb = d["rollback"]
    assert rb["pushed_at"] >= rb["detected_at"] - 1 and rb["push_to_ack_ms"] >= 0 and rb["all_acked"]
    assert rb["envoys"][0]["node_id"] == "envoy-0"
    assert d["stages"] and d["stages"][-1]["last_evaluation"]["decision"] == "rollback"
    fail = {v["metric"]: v for v in d["stages"][-1]["last_evaluation"]["verdicts"]}
    assert fail["error_rate"]["verdict"] == "fail"
    actors = {a["kind"]: a["actor"] for a in d["actions"]}
    assert actors["created"].startswith("cli") and actors["rolled_back"] == "controller"
    good = json.loads(fleet.cli("show", str(deployment["good"]), "--json", check=True).stdout)
    assert [s["stage"] for s in good["stages"]] == [0, 1, 2]
    assert all(s["last_evaluation"] for s in good["stages"])
    assert good["decision"]["kind"] == "promoted" and good["rollback"] is None
    missing = fleet.cli("show", "999")
    assert missing.returncode == 2 and "no rollout #999" in missing.stderr


def test_annotate_append_only_and_causes(deployment):
    fleet = deployment["fleet"]
    bad = str(deployment["bad"])
    before = fleet.cli("history", "--causes", check=True).stdout
    assert "unannotated" in before and "1 failed rollout(s) of 2" in before
    r = fleet.cli("annotate", bad, "--root-cause", "tokenizer mismatch", "--category", "tokenizer", check=True)
    assert "tokenizer" in r.stdout
    fleet.cli("annotate", bad, "--root-cause", "canary replica on a different GPU type", "--category", "hardware",
              check=True)
    bad_cat = fleet.cli("annotate", bad, "--root-cause", "x", "--category", "cosmic-rays")
    assert bad_cat.returncode == 2
    d = json.loads(fleet.cli("show", bad, "--json", check=True).stdout)
    assert d["annotation"]["category"] == "hardware"  # the latest wins
    assert [a["category"] for a in d["annotations"]] == ["tokenizer", "hardware"]  # nothing rewritten
    assert "[hardware]" in fleet.cli("show", bad, check=True).stdout
    c = json.loads(fleet.cli("history", "--causes", "--json", check=True).stdout)
    assert c["failures"] == 1 and c["by_category"] == {"hardware": 1} and c["unannotated"] == 0
    assert c["by_model"] == {"chat-b": {"hardware": 1}}
    assert c["recent"][0]["root_cause"] == "canary replica on a different GPU type"
    text = fleet.cli("history", "--causes", check=True).stdout
    assert "hardware" in text and "chat-b" in text
    assert "[cause: hardware]" in fleet.cli("history", check=True).stdout


def test_diagnose_points_at_the_bad_host(deployment):
    fleet = deployment["fleet"]
    d = json.loads(fleet.cli("rollout", "diagnose", str(deployment["bad"]), "--json", check=True).stdout)
    assert d["observations"] > 0 and d["note"] is None  # a rolled back canary keeps its observations
    verdicts = {v["metric"]: v for v in d["verdicts"]}
    assert verdicts["error_rate"]["verdict"] == "fail"
    hosts = {(h["role"], h["host"]): h for h in d["hosts"]}
    bad = hosts[("canary", deployment["bad_host"])]
    good = hosts[("canary", deployment["good_host"])]
    assert bad["requests"] > 5 and good["requests"] > 5
    assert bad["error_rate"] > good["error_rate"]
    assert bad["latency_p50_ms"] > good["latency_p50_ms"] + 5
    assert ("baseline", next(h for r, h in hosts if r == "baseline")) in hosts
    assert all(h["latency_p50_ms"] is not None and h["output_tokens_mean"] for h in d["hosts"] if h["requests"])
    ff = d["first_failures"]
    assert ff and all(f["status"] >= 500 or f["timeout"] or f["parse_error"] for f in ff)
    assert [f["ts"] for f in ff] == sorted(f["ts"] for f in ff)
    assert {f["host"] for f in ff} <= {deployment["bad_host"], deployment["good_host"]}
    text = fleet.cli("rollout", "diagnose", str(deployment["bad"]), check=True).stdout
    assert "per upstream host:" in text and deployment["bad_host"] in text and "first failing canary" in text
    assert ff[0]["request_id"] in text


# ------------------------------------------------------------------------------ report + Chromium
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chrome(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    exe = _chromium()
    assert exe
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chrome-profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def _png_pixels(data: bytes) -> tuple[int, int, set[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG (as Chromium writes) enough to count distinct colours."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    w = h = 0
    color_type = 2
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        tag = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            w, h, depth, color_type = struct.unpack(">IIBB", body[:10])
            assert depth == 8
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    bpp = {2: 3, 6: 4}[color_type]
    raw = zlib.decompress(idat)
    stride = w * bpp
    prev = bytearray(stride)
    colours: set[bytes] = set()
    i = 0
    for _ in range(h):
        f = raw[i]
        line = bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = line
        for x in range(0, stride, bpp * 7):
            colours.add(bytes(line[x:x + 3]))
    return w, h, colours


def test_report_renders_in_headless_chromium(deployment):
    fleet, tmp = deployment["fleet"], deployment["tmp"]
    out = tmp / "report-bad.html"
    r = fleet.cli("report", str(deployment["bad"]), "-o", str(out), check=True)
    assert "report-bad.png" in r.stdout
    html = out.read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    png = (tmp / "report-bad.png").read_bytes()
    w, h, colours = _png_pixels(png)
    assert w >= 1000 and h >= 600 and len(colours) > 5  # not blank: axes, two arms, interval, markers
    good_out = tmp / "report-good.html"
    fleet.cli("report", str(deployment["good"]), "-o", str(good_out), check=True)

    if _chromium() is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium) — cannot check the page renders")
    from lockgate.controller.decide.rollouts import RolloutStore

    store = RolloutStore(tmp / "state" / "rollouts.db")

    def finite(k, arm):
        return sum(1 for ev in store.evaluations(deployment[k]) for v in ev["judgement"]["verdicts"]
                   if v["metric"] == "error_rate" and v[arm] is not None)

    n_points = {(k, arm): finite(k, arm) for k in ("bad", "good") for arm in ("baseline", "canary")}
    n_markers = {k: sum(1 for e in store.events(deployment[k]) if e["kind"] in
                        ("started", "advanced", "promoted", "rolled_back", "aborted", "inconclusive", "paused",
                         "resumed")) for k in ("bad", "good")}
    store.close()
    for key, page in (("bad", out), ("good", good_out)):
        dom = _chrome(["--dump-dom", page.as_uri()], tmp)
        assert dom.returncode == 0, dom.stderr[-2000:]
        doc = dom.stdout
        assert 'data-charts="3"' in doc  # the inline script ran: traffic + error_rate + output_tokens
        # error_rate figure: a point per judgement with a value, per arm; a line through them; the interval band
        fig = re.search(r'<svg[^>]*data-figure="error_rate".*?</svg>', doc, re.S).group(0)
        for arm in ("baseline", "canary"):
            got = len(re.findall(rf'<circle class="pt"[^>]*data-series="{arm}"', fig))
            assert got == n_points[key, arm] > 0, (key, arm, got)
        assert len(re.findall(r'<path class="marker"', fig)) == n_markers[key]
        if n_points[key, "canary"] >= 2:  # a line and a band need two judgements (a fast rollback may have one)
            assert len(re.findall(r'<path class="series"[^>]*data-series="canary"', fig)) >= 1
            assert re.search(r'<path class="band"', fig)
        assert len(re.findall(r'<tr class="verdict-row">', doc)) >= 2
    assert n_points["good", "canary"] >= 2  # the promoted rollout's figure always has its line and band
    shot = tmp / "screenshot.png"
    res = _chrome([f"--screenshot={shot}", "--window-size=1100,1600", "--hide-scrollbars", out.as_uri()], tmp)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    w, h, colours = _png_pixels(shot.read_bytes())
    assert (w, h) == (1100, 1600) and len(colours) > 20, len(colours)
