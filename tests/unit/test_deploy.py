"""deploy/: the systemd units run real CLI commands with flags the CLI accepts (and pass `systemd-analyze
verify`); the Envoy unit's bootstrap is valid for the real Envoy; every metric the Grafana dashboard and
the Prometheus alert rules query is one lockgate really exports — the names are collected from a
controller started in process and scraped over HTTP, and from the ext_proc's metrics, never from a
hand-kept list; the alert rules pass `promtool check rules` and their own `promtool test rules`."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lockgate import cli
from lockgate.config import config_from_text

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
DASHBOARD = DEPLOY / "grafana" / "lockgate.json"
RULES = DEPLOY / "prometheus" / "lockgate-rules.yml"
INSTALLED = "/opt/lockgate/bin/"  #: where docs/install.md installs lockgate (a venv)
#: what each unit must run: the CLI function its ExecStart reaches
COMMANDS = {"lockgate-xds.service": cli.cmd_xds, "lockgate-controller.service": cli.cmd_controller,
            "lockgate-extproc@.service": cli.cmd_extproc, "lockgate-envoy.service": cli.cmd_envoy,
            "lockgate.service": cli.cmd_up}
#: systemd specifiers the units use, with a value for parsing the command line
SPECIFIERS = {"%i": "0", "%H": "gpu-host-1.example", "%%": "%"}


# ------------------------------------------------------------------------------------------ systemd units
def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]} (keys may repeat, as EnvironmentFile= does)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        if s.startswith("[") and s.endswith("]"):
            current = sections.setdefault(s[1:-1], [])
            continue
        assert current is not None and "=" in s, f"{path.name}:{n}: not a key=value line in a section: {line!r}"
        assert not s.endswith("\\"), f"{path.name}:{n}: keep each setting on one line"
        key, _, value = s.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def expand(arg: str) -> str:
    return re.sub(r"%.", lambda m: SPECIFIERS[m.group(0)], arg)


def test_every_service_runs_a_real_cli_command_with_accepted_flags():
    services = sorted(p.name for p in UNITS.glob("*.service"))
    assert services == sorted(COMMANDS), services
    parser = cli.build_parser()
    for name, fn in COMMANDS.items():
        unit = parse_unit(UNITS / name)
        (exec_start,) = values(unit, "Service", "ExecStart")
        argv = [expand(a) for a in shlex.split(exec_start)]
        assert argv[0] == INSTALLED + "lockgate", (name, argv)
        args = parser.parse_args(argv[1:])  # argparse exits (SystemExit) on an unknown command or flag
        assert args.fn is fn, (name, argv)
        assert args.config == "/etc/lockgate/lockgate.yaml", name
        if fn is cli.cmd_extproc:
            assert args.index == 0  # the instance name is the index
        if fn is cli.cmd_envoy:
            assert args.node_id == SPECIFIERS["%H"] and not args.print_bootstrap  # unique per host: its name


def test_services_restart_run_unprivileged_and_are_hardened():
    for name in COMMANDS:
        unit = parse_unit(UNITS / name)
        svc = dict(unit["Service"])  # last value wins, as in systemd
        assert svc["Restart"] == "always" and float(svc["RestartSec"]) <= 2, name
        assert svc["User"] == "lockgate" and svc["Group"] == "lockgate", name
        assert svc["StateDirectory"] == "lockgate", name  # /var/lib/lockgate: state_dir in docs/install.md
        assert values(unit, "Service", "EnvironmentFile")[0] == "-/etc/lockgate/lockgate.env", name
        for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                          ("PrivateTmp", "yes"), ("PrivateDevices", "yes"), ("RestrictSUIDSGID", "yes"),
                          ("SystemCallArchitectures", "native")):
            assert svc.get(key) == want, (name, key, svc.get(key))
        caps = svc["CapabilityBoundingSet"].split()
        assert set(caps) <= {"CAP_NET_BIND_SERVICE"}, (name, caps)  # Envoy (a listener on :80/:443), nothing else
        assert values(unit, "Install", "WantedBy"), name
    for target in ("lockgate-sidecar.target", "lockgate-control-plane.target"):
        assert values(parse_unit(UNITS / target), "Install", "WantedBy") == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_is_silent(tmp_path):
    """`systemd-analyze verify` on the units with the venv's lockgate in place of /opt/lockgate: no unknown
    key, bad value or missing executable (it prints those and only a missing executable fails its status)."""
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "lockgate").exists(), "lockgate is not installed in this venv"
    names = []
    for unit in sorted(UNITS.glob("*.service")) + sorted(UNITS.glob("*.target")):
        text = unit.read_text().replace(INSTALLED, f"{venv_bin}/")
        name = unit.name.replace("@.service", "@0.service")  # an instance of the template
        (tmp_path / name).write_text(text)
        names.append(name)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "SYSTEMD_LOG_LEVEL": "notice"})
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("envoy", path=str(Path(sys.executable).parent)) is None and
                    shutil.which("envoy") is None, reason="no envoy binary")
def test_the_envoy_unit_bootstrap_is_valid_for_envoy(tmp_path):
    """The Envoy unit's command with --print-bootstrap, for a config with auth tokens, validated by Envoy."""
    import hashlib

    token = "t0ken-for-envoy-on-gpu-host-1"
    (tmp_path / "token").write_text(token)
    (tmp_path / "lockgate.yaml").write_text(f"""
state_dir: {tmp_path}/state
xds: {{address: 10.0.0.2, port: 18000}}
auth:
  token_file: {tmp_path}/token
  tokens: [{{name: gpu-host-1, sha256: {hashlib.sha256(token.encode()).hexdigest()}}}]
models:
  - {{name: chat, stable: v1, versions: {{v1: {{endpoints: ["127.0.0.1:1"]}}}}}}
""")
    (exec_start,) = values(parse_unit(UNITS / "lockgate-envoy.service"), "Service", "ExecStart")
    argv = [expand(a) for a in shlex.split(exec_start)]
    argv = [sys.executable, "-m", "lockgate", "-c", str(tmp_path / "lockgate.yaml")] + argv[3:] + ["--print-bootstrap"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    boot = yaml.safe_load(r.stdout)
    assert boot["node"]["id"] == SPECIFIERS["%H"]
    assert token not in r.stdout  # in the 0600 credential file, never in the bootstrap
    (tmp_path / "envoy.yaml").write_text(r.stdout)
    from lockgate.envoy_proc import envoy_binary

    v = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and "OK" in v.stdout + v.stderr, v.stdout + v.stderr


# ------------------------------------------------------------------------------------- exported metric names
def exposed_names(text: str) -> set[str]:
    """Sample names a Prometheus exposition can carry, from its families' names and types (a labelled
    family with no child yet has no sample, but its HELP/TYPE lines are there)."""
    out = set()
    for fam in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "summary": ("_sum", "_count", "_created", ""), "info": ("_info",)}.get(fam.type, ("",))
        out |= {fam.name + s for s in suffixes}
        out |= {s.name for s in fam.samples}
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Every metric name lockgate exports: a controller started in process (the composition root, with
    evaluation on) scraped over its HTTP /metrics, and the ext_proc's metrics registry."""
    from lockgate.controller.app import Controller
    from lockgate.extproc.server import CaptureMetrics
    from tests.harness import free_ports

    tmp = tmp_path_factory.mktemp("exported")
    grpc_port, http_port, sampler_port = free_ports(3)
    cfg = config_from_text(f"""
state_dir: {tmp}
control: {{port: 1}}
controller:
  address: 127.0.0.1:{grpc_port}
  http: 127.0.0.1:{http_port}
  sampler: 127.0.0.1:{sampler_port}
models:
  - name: chat
    stable: v1
    versions: {{v1: {{endpoints: ["127.0.0.1:11"]}}, v2: {{endpoints: ["127.0.0.1:12"]}}}}
    evaluation: {{sample_rate: 0.1, evaluator: heuristic}}
""")

    async def scrape() -> str:
        c = Controller(cfg)
        try:
            await c.start()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode())
        finally:
            await c.close()

    text = asyncio.run(scrape())
    registry = CollectorRegistry()
    CaptureMetrics(registry)
    names = exposed_names(text) | exposed_names(generate_latest(registry).decode())
    # the collection itself is real: the rollout series and the shared traffic series are among them
    assert {"lockgate_rollout_stage_index", "lockgate_rollbacks_total", "lockgate_requests_total",
            "lockgate_controller_http_connections"} <= names, sorted(names)
    return names


_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
             "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed): identifiers that are not
    functions, keywords, label names in matchers or groupings, durations or strings."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "", e)         # Grafana variables
    e = re.sub(r"\{[^}]*\}", "", e)                  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                 # ranges
    e = _GROUPING.sub("", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue  # a function or aggregation, a keyword
        if m.start() > 0 and (e[m.start() - 1].isdigit() or e[m.start() - 1] == "."):
            continue  # the exponent or unit of a number (1e3)
        names.add(m.group(0))
    return names


def test_metric_names_are_extracted_from_promql():
    assert metric_names('sum by (model, le) (rate(lockgate_x_bucket{job="$job", model=~"a|b"}[$__rate_interval]))') \
        == {"lockgate_x_bucket"}
    assert metric_names('(a_b{m="x"} + 1) < c or on (model) d unless time() - e offset 5m > 1e3') == \
        {"a_b", "c", "d", "e"}
    assert metric_names('histogram_quantile(0.95, sum without (instance) (rate(h_bucket[5m])))') == {"h_bucket"}


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every query in the dashboard: panel targets (rows' nested panels too), template
    variables and annotations."""
    d = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
            walk(p.get("panels", []))

    walk(d["panels"])
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
            assert m, q
            out.append((f"variable {v['name']}", m.group(1)))
    for a in d["annotations"]["list"]:
        if "expr" in a:
            out.append((f"annotation {a['name']}", a["expr"]))
    return out


def test_every_dashboard_metric_is_exported(exported):
    exprs = dashboard_exprs()
    used = {}
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for n in names:
            used.setdefault(n, where)
    missing = {n: where for n, where in used.items() if n not in exported}
    assert not missing, f"the dashboard queries series lockgate does not export: {missing}"
    # the four things the dashboard is for
    assert {"lockgate_rollout_canary_weight_ratio", "lockgate_requests_total", "lockgate_rollout_stage_index",
            "lockgate_gate_value", "lockgate_gate_verdict", "lockgate_rollbacks_total"} <= set(used)


def test_the_dashboard_is_a_grafana_dashboard():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] == "lockgate-rollouts" and d["schemaVersion"] >= 36
    ids = []
    titles = []

    def walk(panels):
        for p in panels:
            ids.append(p["id"])
            titles.append(p["title"].lower())
            assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
                assert p["targets"], p["title"]
                assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
            walk(p.get("panels", []))

    walk(d["panels"])
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "job", "model", "metric"} <= variables
    repeated = [p for p in d["panels"] if p.get("repeat")]
    assert [p["repeat"] for p in repeated] == ["metric"] and "baseline vs canary" in repeated[0]["title"]
    for want in ("traffic share", "stage", "baseline vs canary", "rollbacks"):
        assert any(want in t for t in titles), want


# ------------------------------------------------------------------------------------------- alert rules
def test_every_alert_rule_metric_is_exported(exported):
    rules = yaml.safe_load(RULES.read_text())
    exprs = [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) >= 4
    for alert, expr in exprs:
        names = metric_names(expr)
        assert names and names <= exported, (alert, names - exported)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) not installed")
def test_alert_rules_pass_promtool_check_and_their_tests():
    r = subprocess.run(["promtool", "check", "rules", RULES.name], cwd=RULES.parent, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["promtool", "test", "rules", "lockgate-rules.test.yml"], cwd=RULES.parent,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr


# ------------------------------------------------------------------------------------ OCI image, install doc
def test_the_containerfile_copies_what_exists_and_runs_a_cli_command():
    """Not built here (no image registry, no container engine: docs/install.md says so); checked statically."""
    lines = (DEPLOY / "Containerfile").read_text().splitlines()
    copies = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY ")]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), src
    assert any("make install VENV=/opt/lockgate" in ln for ln in lines)
    entry = json.loads(next(ln for ln in lines if ln.startswith("ENTRYPOINT "))[len("ENTRYPOINT "):])
    cmd = json.loads(next(ln for ln in lines if ln.startswith("CMD "))[len("CMD "):])
    assert entry[0] == INSTALLED + "lockgate"
    assert cli.build_parser().parse_args(entry[1:] + cmd).fn is cli.cmd_up
    for role in (["controller"], ["xds"], ["extproc", "--index", "1"], ["envoy", "--node-id", "gpu-1"]):
        cli.build_parser().parse_args(entry[1:] + role)


def test_the_install_doc_lists_every_rollout_series():
    from lockgate.controller.decide.rollout_series import SERIES

    doc = (ROOT / "docs" / "install.md").read_text()
    listed = set(re.findall(r"`(lockgate_(?:rollout|gate|rollbacks|promotions)\w*)\{", doc))
    assert listed == set(SERIES), (set(SERIES) - listed, listed - set(SERIES))
    for name, (_, labels) in SERIES.items():
        assert f"`{name}{{{', '.join(labels)}}}`" in doc, name
    for unit in COMMANDS:
        assert unit.removesuffix(".service") in doc, unit
