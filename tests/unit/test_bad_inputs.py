"""A corpus of bad inputs: each is refused quickly with a message naming what is wrong and where.

lockgate.yaml and rollout specs (the parsers), the CLI (in-process and a handful as real
``python -m lockgate`` processes), the controller's HTTP API (a real ``lockgate controller`` process on
loopback, without and with auth tokens, plus an in-process server with short timeouts for the slow
clients) and response bodies (the ext_proc analyzers: never raise, never alter the body).

Every case asserts its expected error text and a generous time bound (``BOUND_S``; the cases take
milliseconds, the machine is shared); the slowest case is printed at the end of the module
(``pytest -s``). No HTTP answer here is ever a 500.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from lockgate.auth import hash_token
from lockgate.cli import main
from lockgate.config import ConfigError, config_from_text, load_config
from lockgate.controller.ingest.collector import ControllerMetrics
from lockgate.controller.api.http import ControllerHTTP, HttpLimits
from lockgate.controller.ingest.observations import ObservationStore
from lockgate.controller.decide.spec import load_spec, spec_from_text
from lockgate.extproc.analyzers import AnalyzerConfig, make_analyzer
from tests.harness import PY, REPO, Proc, _env, free_port

BOUND_S = 5.0
TIMES: dict[str, float] = {}

CONFIG = """
state_dir: {state}
models:
  - name: chat
    stable: v1
    versions:
      v1: {{endpoints: ["127.0.0.1:8001"]}}
      v2: {{endpoints: ["127.0.0.1:8002"]}}
"""
SPEC = "rollout:\n  model: chat\n  canary: v2\n  metrics:\n    - {name: error_rate, allowed: {absolute: 0.01}}\n"
BOMB = ('a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
        'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n')
DEEP = "[" * 5000 + "]" * 5000
TOKEN, OTHER = "tok-ci-deployer-0123456789", "tok-someone-else-0123456789"


@pytest.fixture(scope="module", autouse=True)
def report_times():
    yield
    for label, keep in (("parsers, CLI in-process, HTTP API, bodies",
                         lambda k: not k.startswith(("cli-process:", "slow:"))),
                        ("CLI processes (interpreter start included)", lambda k: k.startswith("cli-process:")),
                        ("slow clients (0.5 s timeouts on purpose)", lambda k: k.startswith("slow:"))):
        times = {k: v for k, v in TIMES.items() if keep(k)}
        if times:
            worst = max(times, key=times.get)
            print(f"\nbad-input corpus, {label}: {len(times)} cases, slowest {times[worst] * 1000:.1f} ms ({worst})")


class timed:
    """``with timed(case_id):`` records how long the case took and asserts it is under BOUND_S."""

    def __init__(self, case: str, bound: float = BOUND_S):
        self.case, self.bound = case, bound

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        TIMES[self.case] = dt = time.perf_counter() - self.t0
        assert dt < self.bound, f"{self.case} took {dt:.2f} s"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return config_from_text(CONFIG.format(state=tmp_path_factory.mktemp("state")), "lg.yaml")


# ----------------------------------------------------------------------------- lockgate.yaml
GOOD_CFG = CONFIG.format(state="/tmp/lg-bad-inputs")
CONFIG_CASES = [
    ("alias-bomb", BOMB, "lg.yaml:2:8: b[0]: aliases are not allowed"),
    ("alias-in-models", GOOD_CFG + "x: &m 1\ny: *m\n", "lg.yaml:10:4: y: aliases are not allowed"),
    ("deep-nesting", "models: " + DEEP, "lg.yaml:1:"),
    ("deep-block", "".join("  " * i + "k:\n" for i in range(200)), "lg.yaml:65:129: k.k.k"),
    ("huge", "models: []\n" + "# " + "x" * (1024 * 1024), "lg.yaml:2:"),
    ("number", "42", "lg.yaml:1:1: <root>: must be a mapping, got an integer"),
    ("list", "[1, 2]", "lg.yaml:1:1: <root>: must be a mapping, got a list"),
    ("second-document", GOOD_CFG + "---\nmodels: []\n", "lg.yaml:9:1: <root>: expected a single document"),
    ("port-range", GOOD_CFG + "listener: {address: 0.0.0.0, port: 99999}\n",
     "lg.yaml:9:36: listener.port: must be between 1 and 65535"),
    ("port-type", GOOD_CFG + "listener: {address: 0.0.0.0, port: abc}\n", "listener.port: must be an integer"),
    ("models-string", "state_dir: /tmp/x\nmodels: chat\n", "lg.yaml:2:9: models: must be a list, got a string"),
    ("unknown-field", GOOD_CFG + "colour: blue\n", "lg.yaml:9:9: colour: unknown field"),
    ("endpoint", GOOD_CFG.replace('"127.0.0.1:8001"', '"nohostport"'),
     "models[0].versions.v1.endpoints[0]: must be 'host:port'"),
    ("token-in-clear", GOOD_CFG + "auth: {tokens: [{name: ci, sha256: secret}]}\n",
     "auth.tokens[0].sha256: must be 64 hex digits"),
    ("python-tag", GOOD_CFG + "node_id: !!python/object/apply:os.system [id]\n",
     "lg.yaml:9:10: node_id: invalid value: the tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
    ("huge-int", GOOD_CFG + "extproc_processes: " + "9" * 5000 + "\n", "lg.yaml:9:20: extproc_processes: invalid value"),
    ("control-char", GOOD_CFG + "node_id: a\x00b\n", "lg.yaml:9:11: <root>: invalid YAML: unacceptable character"),
    ("tab-indent", "models:\n\t- name: chat\n", "lg.yaml:2:1: <root>: invalid YAML"),
    ("merge-key", GOOD_CFG + "controller:\n  <<: {retention_days: 3}\n", "lg.yaml:10:3: controller: merge keys"),
]


@pytest.mark.parametrize("case, text, needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_lockgate_yaml(case, text, needle):
    with timed(f"config:{case}"), pytest.raises(ConfigError) as info:
        config_from_text(text, "lg.yaml")
    assert needle in str(info.value), str(info.value)


def test_lockgate_yaml_files(tmp_path):
    bad = tmp_path / "lg.yaml"
    bad.write_bytes(GOOD_CFG.encode() + b"node_id: caf\xe9\n")
    with timed("config-file:not-utf8"), pytest.raises(ConfigError, match=r"lg\.yaml:9:13: <root>: file is not UTF-8"):
        load_config(bad)
    with timed("config-file:dev-zero"), pytest.raises(ConfigError, match=r"zero:1:1048577: <root>: larger than"):
        load_config("/dev/zero")  # read no further than the limit
    with timed("config-file:missing"), pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- rollout specs
SPEC_CASES = [
    ("alias-bomb", BOMB, "s.yaml:2:8: b[0]: aliases are not allowed"),
    ("deep-nesting", "rollout: " + DEEP, "s.yaml:1:"),
    ("number", "5", "s.yaml:1:1: <root>: must be a mapping, got an integer"),
    ("list", "[]", "s.yaml:1:1: <root>: must be a mapping, got a list"),
    ("empty", "", "rollout: is required"),
    ("unknown-canary", SPEC.replace("canary: v2", "canary: v9"), "s.yaml:3:11: rollout.canary: chat has no version 'v9'"),
    ("canary-is-stable", SPEC.replace("canary: v2", "canary: v1"), "rollout.canary: 'v1' is chat's stable version"),
    ("unknown-model", SPEC.replace("model: chat", "model: nope"), "s.yaml:2:10: rollout.model: model 'nope' is not"),
    ("weight", SPEC + "  steps:\n    - {weight_percent: 150}\n", "s.yaml:7:24: rollout.steps[0].weight_percent"),
    ("duration", SPEC + "  steps:\n    - {weight_percent: 5, min_duration: 5 parsecs}\n",
     "rollout.steps[0].min_duration: must be a duration"),
    ("metrics-string", SPEC.split("  metrics:")[0] + "  metrics: error_rate\n", "rollout.metrics: must be a list"),
    ("unknown-metric", SPEC.replace("error_rate", "made_up"), "s.yaml:5:14: rollout.metrics[0].name: unknown metric"),
    ("alpha", SPEC + "  alpha: 2\n", "s.yaml:6:10: rollout.alpha: must be greater than 0"),
    ("nan", SPEC.replace("0.01", ".nan"), "rollout.metrics[0].allowed.absolute: must be a finite number"),
    ("huge-int", SPEC + "  analysis_interval_s: " + "9" * 5000 + "\n", "s.yaml:6:24: rollout.analysis_interval_s"),
    ("unknown-field", SPEC + "  colour: blue\n", "s.yaml:6:11: rollout.colour: unknown field"),
    ("preflight", SPEC + "  promotion: {preflight: pray}\n", "rollout.promotion.preflight: must be one of"),
]


@pytest.mark.parametrize("case, text, needle", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_rollout_spec(case, text, needle, cfg):
    with timed(f"spec:{case}"), pytest.raises(ConfigError) as info:
        spec_from_text(text, "s.yaml", cfg)
    assert needle in str(info.value), str(info.value)


def test_spec_given_as_a_number_not_text(cfg):
    with timed("spec:not-text"), pytest.raises(ConfigError, match="must be YAML text"):
        spec_from_text(5, "s.yaml", cfg)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def files(tmp_path):
    (tmp_path / "lg.yaml").write_text(CONFIG.format(state=tmp_path / "state"))
    (tmp_path / "bomb.yaml").write_text(BOMB)
    (tmp_path / "deep.yaml").write_text("rollout: " + DEEP)
    (tmp_path / "latin1.yaml").write_bytes(SPEC.encode() + b"# caf\xe9\n")
    (tmp_path / "v9.yaml").write_text(SPEC.replace("canary: v2", "canary: v9"))
    return tmp_path


CLI_CASES = [
    ("check-config-bomb", ["-c", "{d}/bomb.yaml", "check-config"], "bomb.yaml:2:8: b[0]: aliases are not allowed"),
    ("validate-bomb", ["-c", "{d}/lg.yaml", "validate", "{d}/bomb.yaml"], "aliases are not allowed"),
    ("validate-deep", ["-c", "{d}/lg.yaml", "validate", "{d}/deep.yaml"], "deep.yaml:1:"),
    ("validate-latin1", ["-c", "{d}/lg.yaml", "validate", "{d}/latin1.yaml"], "latin1.yaml:6:6: <root>: file is not UTF-8"),
    ("validate-v9", ["-c", "{d}/lg.yaml", "validate", "{d}/v9.yaml"], "v9.yaml:3:11: rollout.canary"),
    ("validate-missing", ["-c", "{d}/lg.yaml", "validate", "{d}/nope.yaml"], "cannot read file"),
    ("check-config-dir", ["-c", "{d}", "check-config"], "cannot read file"),
]


@pytest.mark.parametrize("case, argv, needle", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_in_process(case, argv, needle, files, capsys):
    with timed(f"cli:{case}"):
        code = main([a.format(d=files) for a in argv])
    err = capsys.readouterr().err
    assert code != 0 and needle in err, err


SUBPROCESS_CASES = [
    ("check-config-bomb", ["-c", "{d}/bomb.yaml", "check-config"], "aliases are not allowed"),
    ("validate-deep", ["-c", "{d}/lg.yaml", "validate", "{d}/deep.yaml"], "deep.yaml:1:"),
    ("check-config-dev-zero", ["-c", "/dev/zero", "check-config"], "larger than 1024 KiB"),
    ("set-weight-not-a-number", ["-c", "{d}/lg.yaml", "set-weight", "chat", "v2", "lots"],
     "PERCENT must be a number between 0 and 100, got 'lots'"),
    ("unknown-command", ["-c", "{d}/lg.yaml", "explode"], "invalid choice"),
]


@pytest.mark.parametrize("case, argv, needle", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_cli_subprocess(case, argv, needle, files):
    import subprocess

    with timed(f"cli-process:{case}", bound=20.0):  # includes the interpreter's start
        out = subprocess.run([PY, "-m", "lockgate", *[a.format(d=files) for a in argv]], capture_output=True,
                             text=True, cwd=REPO, env=_env(), timeout=60)
    assert out.returncode != 0 and needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- the controller's HTTP API
def raw_request(port: int, data: bytes, half_close: bool = False, timeout: float = 10.0) -> tuple[int, bytes, dict]:
    """Send ``data`` as is; the answer's status, body and headers (read to the end of the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while True:
                c = s.recv(65536)
                if not c:
                    break
                chunks.append(c)
                got = b"".join(chunks)
                if b"\r\n\r\n" in got:
                    head, _, body = got.partition(b"\r\n\r\n")
                    lengths = [ln.split(b":", 1)[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                    if lengths and len(body) >= int(lengths[0]):
                        break
        except ConnectionResetError:
            pass
    got = b"".join(chunks)
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith(b"HTTP/") else 0
    headers = {k.strip().lower().decode(): v.strip().decode() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    return status, body, headers


def request(method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            token: str | None = None) -> bytes:
    hs = {"Host": "127.0.0.1", "Connection": "close", **(headers or {})}
    if token:
        hs["Authorization"] = f"Bearer {token}"
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding") for k in hs):
        hs["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs.items()) + "\r\n"
    return head.encode("latin-1") + (body or b"")


def jbody(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.fixture(scope="module")
def controllers(tmp_path_factory):
    """Two real controllers on loopback: "open" (no tokens, today's behaviour) and "auth" (tokens)."""
    out, procs = {}, []
    for name in ("open", "auth"):
        d = tmp_path_factory.mktemp(f"ctl-{name}")
        ports = {"grpc": free_port(), "http": free_port(), "xds": free_port(), "control": free_port()}
        cfg = yaml.safe_load(CONFIG.format(state=d / "state"))
        cfg["xds"] = {"port": ports["xds"]}
        cfg["control"] = {"port": ports["control"]}
        cfg["controller"] = {"address": f"127.0.0.1:{ports['grpc']}", "http": f"127.0.0.1:{ports['http']}"}
        if name == "auth":
            (d / "lockgate.token").write_text(TOKEN + "\n")  # lockgate's own processes present it too
            cfg["auth"] = {"tokens": [{"name": "ci-deployer", "sha256": hash_token(TOKEN)}],
                           "token_file": str(d / "lockgate.token")}
        (d / "lockgate.yaml").write_text(yaml.safe_dump(cfg))
        p = Proc([PY, "-m", "lockgate", "-c", str(d / "lockgate.yaml"), "controller"], d / "controller.log")
        procs.append(p)
        out[name] = ports["http"]
        deadline = time.monotonic() + 30  # the rollout routes are added once the promotion loop runs
        while raw_request(ports["http"], request("GET", "/v1/rollouts", token=TOKEN))[0] != 200:
            assert time.monotonic() < deadline, (d / "controller.log").read_text()
            time.sleep(0.1)
    yield out
    for p in procs:
        p.stop()


SPEC_BODY = {"spec": SPEC, "source": "s.yaml"}
HTTP_CASES = [
    # feedback
    ("feedback-invalid-json", "open", request("POST", "/v1/feedback", b'{"request_id": '), 400, "<body>: invalid JSON"),
    ("feedback-empty-list", "open", request("POST", "/v1/feedback", b"[]"), 400, "<body>: empty list"),
    ("feedback-number", "open", request("POST", "/v1/feedback", b"5"), 400, "<body>: must be a JSON object"),
    ("feedback-string", "open", request("POST", "/v1/feedback", b'"up"'), 400, "<body>: must be a JSON object"),
    ("feedback-deep-json", "open", request("POST", "/v1/feedback", b"[" * 100000 + b"]" * 100000), 400,
     "<body>: invalid JSON"),
    ("feedback-not-utf8", "open", request("POST", "/v1/feedback", b'{"request_id": "caf\xe9"}'), 400,
     "<body>: is not UTF-8"),
    ("feedback-nan", "open", request("POST", "/v1/feedback", b'{"request_id": "a", "evaluator_score": NaN}'), 400,
     "NaN is not allowed"),
    ("feedback-score-out-of-range", "open",
     request("POST", "/v1/feedback", jbody({"request_id": "a", "evaluator_score": 7.5})), 400,
     "evaluator_score: must be between 0 and 1"),
    ("feedback-unknown-field", "open", request("POST", "/v1/feedback", jbody({"request_id": "a", "stars": 5})), 400,
     "stars: unknown field"),
    ("feedback-wrong-type", "open", request("POST", "/v1/feedback", jbody({"request_id": "a", "thumbs": 1})), 400,
     'thumbs: must be "up" or "down", got 1'),
    ("feedback-id-type", "open", request("POST", "/v1/feedback", jbody({"request_id": 7, "thumbs": "up"})), 400,
     "request_id: is required (a non-empty string)"),
    ("feedback-item-type", "open", request("POST", "/v1/feedback", jbody([{"request_id": "a", "thumbs": "up"}, 3])),
     400, "[1]: must be a JSON object"),
    ("feedback-too-many", "open", request("POST", "/v1/feedback", jbody([{"request_id": "a", "thumbs": "up"}] * 10001)),
     400, "at most 10000 items"),
    ("feedback-huge-body", "open", request("POST", "/v1/feedback", b"[" + b" " * (9 * 1024 * 1024) + b"]"), 413,
     "larger than the limit of 8388608 bytes"),
    ("feedback-no-length", "open", b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 411,
     "Content-Length required"),
    ("feedback-chunked", "open", request("POST", "/v1/feedback", b"5\r\nhello\r\n0\r\n\r\n",
                                         {"Transfer-Encoding": "chunked"}), 411, "chunked bodies are not accepted"),
    ("feedback-bad-length", "open", request("POST", "/v1/feedback", b"{}", {"Content-Length": "two"}), 400,
     "Content-Length must be a number of bytes, got 'two'"),
    ("feedback-conflicting-lengths", "open",
     b"POST /v1/feedback HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400,
     "conflicting Content-Length"),
    ("feedback-get", "open", request("GET", "/v1/feedback"), 405, "use POST"),
    # rollout start
    ("start-spec-number", "open", request("POST", "/v1/rollouts/start", jbody({"spec": 5})), 400,
     "spec: must be the rollout spec's YAML text (a string), got an integer"),
    ("start-spec-missing", "open", request("POST", "/v1/rollouts/start", jbody({"source": "s.yaml"})), 400,
     "spec: must be the rollout spec's YAML text (a string), got nothing"),
    ("start-body-list", "open", request("POST", "/v1/rollouts/start", b"[]"), 400,
     "body must be a JSON object"),
    ("start-body-number", "open", request("POST", "/v1/rollouts/start", b"5"), 400, "got an integer"),
    ("start-invalid-json", "open", request("POST", "/v1/rollouts/start", b"{spec: x}"), 400, "body is not valid JSON"),
    ("start-not-utf8", "open", request("POST", "/v1/rollouts/start", b'{"spec": "\xff"}'), 400, "body is not UTF-8"),
    ("start-alias-bomb", "open", request("POST", "/v1/rollouts/start", jbody({"spec": BOMB, "source": "bomb.yaml"})),
     400, "bomb.yaml:2:8: b[0]: aliases are not allowed"),
    ("start-deep", "open", request("POST", "/v1/rollouts/start", jbody({"spec": "rollout: " + DEEP, "source": "d.yaml"})),
     400, "d.yaml:1:"),
    ("start-huge-spec", "open", request("POST", "/v1/rollouts/start", jbody({"spec": "#" * (2 * 1024 * 1024)})), 400,
     "<request>:1:1048577: <root>: larger than 1024 KiB"),
    ("start-source-type", "open", request("POST", "/v1/rollouts/start", jbody({"spec": SPEC, "source": ["x"]})), 400,
     "source: must be a one-line file name"),
    ("start-canary-v9", "open",
     request("POST", "/v1/rollouts/start", jbody({"spec": SPEC.replace("v2", "v9"), "source": "s.yaml"})), 400,
     "s.yaml:3:11: rollout.canary: chat has no version 'v9'"),
    ("start-actor-type", "open", request("POST", "/v1/rollouts/start", jbody({**SPEC_BODY, "actor": {"x": 1}})), 400,
     "actor: must be a one-line string"),
    # rollout actions
    ("pause-list", "open", request("POST", "/v1/rollouts/chat/pause", b"[]"), 400,
     "body must be a JSON object {\"actor\": …} (or an empty body), got a list"),
    ("pause-number", "open", request("POST", "/v1/rollouts/chat/pause", b"42"), 400, "got an integer"),
    ("pause-actor-number", "open", request("POST", "/v1/rollouts/chat/pause", jbody({"actor": 5})), 400,
     "actor: must be a one-line string"),
    ("pause-nothing-running", "open", request("POST", "/v1/rollouts/chat/pause", b"{}"), 404,
     "model 'chat' has no active rollout"),
    ("unknown-action", "open", request("POST", "/v1/rollouts/chat/explode", b"{}"), 400,
     "unknown action 'explode' (one of: pause, resume, abort, promote, approve)"),
    ("approve-stage-not-a-number", "open", request("POST", "/v1/rollouts/chat/approve", b'{"stage": "two"}'), 400,
     "stage: must be a stage number (1 = the first), got a string"),
    ("approve-stage-zero", "open", request("POST", "/v1/rollouts/chat/approve", b'{"stage": 0}'), 400,
     "stage: must be a stage number"),
    ("approve-note-too-long", "open", request("POST", "/v1/rollouts/chat/approve",
                                              json.dumps({"note": "x" * 501}).encode()), 400,
     "note: must be a string of at most 500 characters"),
    ("approve-unknown-model", "open", request("POST", "/v1/rollouts/nope/approve", b"{}"), 404, "unknown model 'nope'"),
    ("approve-nothing-running", "open", request("POST", "/v1/rollouts/chat/approve", b"{}"), 404,
     "model 'chat' has no active rollout"),
    ("approve-without-token", "auth", request("POST", "/v1/rollouts/chat/approve", b'{"actor": "mallory"}'), 401,
     "authentication required"),
    ("action-extra-segment", "open", request("POST", "/v1/rollouts/chat/pause/now", b"{}"), 404, "no such endpoint"),
    ("status-unknown-model", "open", request("GET", "/v1/rollouts?model=nope"), 404, "unknown model 'nope'"),
    ("status-too-many-params", "open", request("GET", "/v1/rollouts?" + "&".join(f"a{i}=1" for i in range(100))), 400,
     "too many query parameters"),
    ("observation-unknown", "open", request("GET", "/v1/observations/%ff%fe"), 404, "unknown request_id"),
    # the protocol
    ("garbage-request-line", "open", b"HELLO\r\n\r\n", 400, "malformed request line"),
    ("http-2", "open", b"GET /healthz HTTP/2.0\r\n\r\n", 505, "HTTP version 'HTTP/2.0' not supported"),
    ("header-without-colon", "open", b"GET /healthz HTTP/1.1\r\nNoColonHere\r\n\r\n", 400, "header line 2: malformed"),
    ("folded-header", "open", b"GET /healthz HTTP/1.1\r\nX-A: 1\r\n  continued\r\n\r\n", 400, "folded header"),
    ("too-many-headers", "open", b"GET /healthz HTTP/1.1\r\n" + b"X-A: 1\r\n" * 200 + b"\r\n", 431,
     "more than 100 header lines"),
    ("huge-head", "open", b"GET /healthz HTTP/1.1\r\nX-A: " + b"a" * 70000 + b"\r\n\r\n", 431,
     "request head larger than 65536 bytes"),
    ("method-put", "open", request("PUT", "/v1/feedback", b"{}"), 405, "method PUT not allowed"),
    ("non-ascii-target", "open", "GET /v1/observations/é HTTP/1.1\r\n\r\n".encode(), 400, "not ASCII"),
    ("absolute-target", "open", b"GET http://evil/healthz HTTP/1.1\r\n\r\n", 400, "must be an absolute path"),
    ("unknown-path", "open", request("POST", "/v1/nothing", b"{}"), 404, "no POST endpoint /v1/nothing"),
    # authentication
    ("auth-feedback-no-token", "auth", request("POST", "/v1/feedback", jbody({"request_id": "a", "thumbs": "up"})),
     401, "authentication required: send 'authorization: Bearer <token>'"),
    ("auth-feedback-wrong-token", "auth",
     request("POST", "/v1/feedback", jbody({"request_id": "a", "thumbs": "up"}), token=OTHER), 401, "invalid token"),
    ("auth-basic-scheme", "auth", request("POST", "/v1/rollouts/chat/pause", b"{}", {"Authorization": "Basic eDp5"}),
     401, "invalid token"),
    ("auth-start-no-token", "auth", request("POST", "/v1/rollouts/start", jbody(SPEC_BODY)), 401,
     "authentication required"),
    ("auth-metrics-no-token", "auth", request("GET", "/metrics"), 401, "authentication required"),
    ("auth-status-no-token", "auth", request("GET", "/v1/rollouts"), 401, "authentication required"),
    ("auth-observations-no-token", "auth", request("GET", "/v1/observations/a"), 401, "authentication required"),
    ("auth-huge-body-no-token", "auth", request("POST", "/v1/feedback", b"x" * (4 * 1024 * 1024)), 401,
     "authentication required"),
    ("auth-pause-list", "auth", request("POST", "/v1/rollouts/chat/pause", b"[]", token=TOKEN), 400,
     "body must be a JSON object"),
    ("auth-pause-ignores-actor", "auth",
     request("POST", "/v1/rollouts/chat/pause", jbody({"actor": ["not", "checked"]}), token=TOKEN), 404,
     "no active rollout"),
]


@pytest.mark.parametrize("case, server, data, status, needle", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_api(case, server, data, status, needle, controllers):
    with timed(f"http:{case}"):
        got, body, headers = raw_request(controllers[server], data)
    assert got == status, (got, body[:300])
    assert body.endswith(b"\n") and body.count(b"\n") == 1, body[:300]  # one line of JSON
    answer = json.loads(body)
    assert needle in answer["error"] or needle in json.dumps(answer.get("detail")), answer
    assert "Traceback" not in body.decode("utf-8", "replace")
    if status == 401:
        assert headers.get("www-authenticate", "").startswith("Bearer")


def test_http_short_body_then_close(controllers):
    """The client sends less than its Content-Length and stops sending: 400 at once."""
    data = request("POST", "/v1/feedback", b'{"request_id": "a"', {"Content-Length": "100"})
    with timed("http:short-body-half-closed"):
        status, body, _ = raw_request(controllers["open"], data, half_close=True)
    assert status == 400 and "body shorter than its Content-Length (got 18 of 100 bytes" in json.loads(body)["error"]


def test_http_good_requests_still_work(controllers):
    assert raw_request(controllers["open"], request("GET", "/healthz"))[:2] == (200, b"ok\n")
    assert raw_request(controllers["auth"], request("GET", "/healthz", token=TOKEN))[:2] == (200, b"ok\n")
    status, body, _ = raw_request(controllers["auth"], request("GET", "/metrics", token=TOKEN))
    assert status == 200 and b"lockgate_controller_http_rejected_total" in body
    status, body, _ = raw_request(controllers["auth"], request("GET", "/v1/rollouts?model=chat", token=TOKEN))
    assert status == 200 and json.loads(body) == {"rollouts": []}
    head = raw_request(controllers["open"], request("HEAD", "/healthz"))
    assert head[0] == 200 and head[1] == b"" and head[2]["content-length"] == "3"


# ----------------------------------------------------------------------------- slow clients (in-process server)
@pytest.fixture
def fast_limits_server(tmp_path):
    store = ObservationStore(tmp_path / "obs.db")
    limits = HttpLimits(head_timeout_s=0.5, body_timeout_s=0.5, keepalive_timeout_s=0.5, max_connections=40,
                        workers=4)
    api = ControllerHTTP("127.0.0.1", 0, store, ControllerMetrics(), retention_s=86400, unknown_grace_s=0.0,
                         limits=limits)
    api.start()
    yield api
    api.stop()
    store.close()


def test_stalled_head_and_body_are_answered_408(fast_limits_server):
    port = fast_limits_server.address[1]
    with timed("slow:stalled-head"):
        status, body, _ = raw_request(port, b"POST /v1/feedback HTTP/1.1\r\nContent-Le")
    assert status == 408 and "request head not complete within 0.5 s" in json.loads(body)["error"]
    with timed("slow:short-body-stalled"):
        status, body, _ = raw_request(port, request("POST", "/v1/feedback", b"{}", {"Content-Length": "50"}))
    assert status == 408 and "body not received within 0.5 s (got 2 of 50 bytes)" in json.loads(body)["error"]


def test_idle_keepalive_connection_is_closed_quietly(fast_limits_server):
    port = fast_limits_server.address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, timed("slow:idle-keepalive"):
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while not got.endswith(b"ok\n"):
            got += s.recv(4096)
        assert s.recv(4096) == b""  # closed after the idle limit, nothing more sent


def test_stalled_uploads_cost_no_threads_and_the_connection_cap_holds(fast_limits_server):
    """The issue's 400 stalled uploads made 414 threads: here they cost sockets, and the cap answers 503."""
    api = fast_limits_server
    port = api.address[1]
    before = threading.active_count()
    socks = []
    try:
        with timed("slow:60-stalled-uploads"):
            for _ in range(60):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"POST /v1/feedback HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
                socks.append(s)
            time.sleep(0.2)
            assert threading.active_count() <= before + 1  # no thread per connection
            answers = []
            for s in socks:
                got = b""
                try:
                    while c := s.recv(4096):
                        got += c
                except ConnectionResetError:  # possible when the 503 went out before our upload was read
                    pass
                answers.append(int(got.split()[1]) if got else 0)
        assert answers.count(408) == 40 and answers.count(503) + answers.count(0) == 20, answers  # 20 over the cap
        assert answers.count(503) >= 15, answers
        assert api.m_rejected.labels("too_many_connections")._value.get() == 20
    finally:
        for s in socks:
            s.close()
    assert raw_request(port, request("GET", "/healthz"))[0] == 200  # still serving


def test_actor_is_the_authenticated_client(tmp_path):
    """With auth on, the actor recorded for a rollout action is the token's client name, never the body's
    ``actor``; with auth off, the body's actor as before."""
    from lockgate.auth import ClientToken, TokenRegistry
    from lockgate.controller.api.rollouts import register_routes

    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    calls = []

    class FakeCommands:  # a RolloutCommands
        async def action(self, model, action, actor):
            calls.append((model, action, actor))
            return {"rollout": {"model": model}}

        async def start(self, spec_text, source, actor):
            calls.append(("start", source, actor))
            return {"rollout": {}}

        def status(self, model=None):
            return []

    fake = FakeCommands()
    models = {m.name for m in config_from_text(GOOD_CFG, "lg.yaml").models}
    store = ObservationStore(tmp_path / "obs.db")
    servers = {}
    try:
        for name, auth in (("auth", TokenRegistry((ClientToken("ci-deployer", hash_token(TOKEN)),))), ("open", None)):
            api = ControllerHTTP("127.0.0.1", 0, store, ControllerMetrics(), retention_s=86400, auth=auth)
            register_routes(api, fake, loop, models)
            api.start()
            servers[name] = api
        a, o = servers["auth"].address[1], servers["open"].address[1]
        body = jbody({"actor": "mallory"})
        with timed("actor:auth"):
            assert raw_request(a, request("POST", "/v1/rollouts/chat/pause", body, token=TOKEN))[0] == 200
        assert raw_request(a, request("POST", "/v1/rollouts/chat/pause", body))[0] == 401
        assert raw_request(a, request("POST", "/v1/rollouts/start", jbody({**SPEC_BODY, "actor": "mallory"}),
                                      token=TOKEN))[0] == 200
        assert raw_request(o, request("POST", "/v1/rollouts/chat/abort", body))[0] == 200
        assert raw_request(o, request("POST", "/v1/rollouts/chat/resume", b""))[0] == 200
        assert calls == [("chat", "pause", "ci-deployer"), ("start", "s.yaml", "ci-deployer"),
                         ("chat", "abort", "mallory"), ("chat", "resume", "unknown")]
    finally:
        for api in servers.values():
            api.stop()
        store.close()
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


def test_cli_sends_its_token(tmp_path, monkeypatch):
    """``_controller_http`` presents $LOCKGATE_TOKEN, else the config's auth.token_file."""
    from lockgate import cli

    seen = []

    class Answer:
        status = 200

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return b"{}"

    def fake_urlopen(req, timeout):
        seen.append(req.get_header("Authorization"))
        return Answer()

    token_file = tmp_path / "lockgate.token"
    token_file.write_text(OTHER + "\n")
    cfg_path = tmp_path / "lg.yaml"
    cfg_path.write_text(GOOD_CFG + f"auth:\n  token_file: {token_file}\n")
    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)

    class Args:
        config = str(cfg_path)

    monkeypatch.setenv("LOCKGATE_TOKEN", TOKEN)
    cli._controller_http(Args(), "GET", "/v1/rollouts")
    monkeypatch.delenv("LOCKGATE_TOKEN")
    cli._controller_http(Args(), "GET", "/v1/rollouts")
    assert seen == [f"Bearer {TOKEN}", f"Bearer {OTHER}"]


# ----------------------------------------------------------------------------- response bodies (ext_proc)
BODY_CASES = [
    ("json-cut-off", None, "application/json", None, b'{"choices": [{"message": {"content": "hi"', "cut_off"),
    ("json-binary", None, "application/json", None, b"\xff\xfe\x00garbage", "binary"),
    ("json-latin1", None, "application/json", None, b'{"a": "caf\xe9"}', "not_utf8"),
    ("json-deep", None, "application/json", None, b"[" * 100000 + b"]" * 100000, "malformed_json"),
    ("json-huge-int", None, "application/json", None,
     b'{"usage": {"completion_tokens": 1' + b"0" * 5000 + b"}}", "malformed_json"),
    ("json-negative-tokens", None, "application/json", None, b'{"usage": {"completion_tokens": -5}}',
     "unrecognized_shape"),
    ("json-tokens-string", None, "application/json", None, b'{"usage": {"completion_tokens": "lots"}}',
     "unrecognized_shape"),
    ("json-choices-string", None, "application/json", None, b'{"choices": "nope"}', "unrecognized_shape"),
    ("json-empty", None, "application/json", None, b"", "empty"),
    ("json-number", None, "application/json", None, b"5", "unrecognized_shape"),
    ("json-two-documents", None, "application/json", None, b'{"a": 1}{"a": 1}', "malformed_json"),
    ("json-too-big", None, "application/json", None, b"x" * (20 * 1024 * 1024), "truncated"),
    ("sse-broken-json", None, "text/event-stream", None, b'data: {"choices": [\n\n', "malformed_json"),
    ("sse-not-utf8", None, "text/event-stream", None, b"data: \xff\xfe\n\n", "not_utf8"),
    ("sse-no-data", None, "text/event-stream", None, b"event: x\n" * 1000, "cut_off"),
    ("gzip-garbage", None, "application/json", "gzip", b"\x1f\x8bgarbage", "compressed"),
    ("classifier-null-label", "classifier", "application/json", None, b'{"label": null, "confidence": 7}',
     "unrecognized_shape"),
    ("latin1-charset", None, "application/json; charset=latin-1", None,
     b'{"choices": [{"message": {"content": "\xe9"}}]}', "not_utf8"),
]


@pytest.mark.parametrize("case, kind, ctype, enc, body, parse_error", BODY_CASES, ids=[c[0] for c in BODY_CASES])
def test_response_bodies_never_raise_or_alter(case, kind, ctype, enc, body, parse_error):
    for cfg in (AnalyzerConfig(strict=True), AnalyzerConfig()):  # strict: an internal error would raise here
        original = bytes(body)
        with timed(f"body:{case}"):
            a = make_analyzer(kind, ctype, enc, cfg)
            for i in range(0, len(body), 7777):  # split anywhere, as Envoy streams it
                chunk = body[i:i + 7777]
                a.feed(chunk)
            result = a.finish()
        assert body == original  # never altered
        assert result.parse_error == parse_error, result
        assert result.body_bytes == len(body)
        assert result.output_tokens is None and result.refusal in (None, False)
        json.dumps(result.to_dict())  # a flat, serialisable record


def test_corpus_size():
    n = (len(CONFIG_CASES) + 3 + len(SPEC_CASES) + 1 + len(CLI_CASES) + len(SUBPROCESS_CASES) + len(HTTP_CASES) + 1
         + 4 + 1 + len(BODY_CASES))
    assert n >= 60, n


def test_a_standby_controller_answers_feedback_503_naming_why(tmp_path):
    store = ObservationStore(tmp_path / "obs.db")
    api = ControllerHTTP("127.0.0.1", 0, store, ControllerMetrics(), retention_s=86400, unknown_grace_s=0.0)
    try:
        api.accept_checks.append(lambda: "standby controller: another controller drives rollout(s) #3")
        status, body = api.feedback(b'{"request_id": "r1", "thumbs": "up"}')
        assert status == 503 and body["retry"] is True
        assert body["error"].startswith("standby controller: another controller drives rollout(s) #3")
        api.accept_checks[:] = [lambda: None]
        assert api.feedback(b'{"request_id": "r1", "thumbs": "up"}')[0] != 503
    finally:
        store.close()
