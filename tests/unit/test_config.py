"""lockgate.yaml validation: every problem reported with file, line and field path."""

from __future__ import annotations

import pytest

from lockgate.config import ConfigError, KeySource, config_from_text

GOOD = """
listener: {port: 10000}
state_dir: /tmp/lg-state
sticky_keys: [{header: x-user-id}, {cookie: sid}, {client_ip: {trusted_hops: 1}}]
models:
  - name: chat
    match: {path_prefix: /v1/chat}
    stable: v1
    versions:
      v1: {endpoints: ["127.0.0.1:8001"]}
      v2: {endpoints: ["localhost:8002", "[::1]:8003"]}
  - name: cls
    match: {header: {name: x-model, value: cls}}
    stable: a
    sticky_keys: [{header: x-session}]
    versions: {a: {endpoints: ["10.0.0.1:9000"]}}
"""


def test_good_config_parses():
    cfg = config_from_text(GOOD, "good.yaml")
    chat, cls = cfg.models
    assert chat.sticky_keys == (KeySource("header", "x-user-id"), KeySource("cookie", "sid"),
                                KeySource("client_ip", trusted_hops=1))
    assert cls.sticky_keys == (KeySource("header", "x-session"),)
    assert cls.match.header_name == "x-model" and cls.match.path_prefix == "/"
    assert chat.versions["v2"].endpoints[1].host == "::1"
    assert chat.cluster_name("v2") == "chat.v2"
    assert cfg.qa_override is None and str(cfg.listener) == "127.0.0.1:10000"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config_from_text(text, "f.yaml")
    return str(exc.value).splitlines()


def test_every_problem_is_reported_with_line_and_path():
    lines = problems("""
listener: {port: 70000}
models:
  - name: chat.x
    stabel: v1
    stable: v9
    versions:
      v1: {endpoints: ["host-without-port"]}
  - name: b
    stable: v1
    versions: {}
""")
    text = "\n".join(lines)
    assert "f.yaml:2:" in text and "listener.port: must be between 1 and 65535" in text
    assert "f.yaml:4:" in text and "models[0].name: must match" in text
    assert "f.yaml:5:" in text and "models[0].stabel: unknown field" in text
    assert "f.yaml:6:" in text and "models[0].stable: 'v9' is not one of the versions (v1)" in text
    assert "f.yaml:8:" in text and "models[0].versions.v1.endpoints[0]: must be 'host:port'" in text
    assert "models[1].versions: must list at least one version" in text


@pytest.mark.parametrize("snippet, needle", [
    ("sticky_keys: [{client_ip: {}}, {header: x-user-id}]", "client_ip must be the last key source"),
    ("sticky_keys: [{header: X-User}]", "must be a lower-case header name"),
    ("sticky_keys: [{header: x-lockgate-bucket}]", "reserved for lockgate"),
    ("sticky_keys: [{magic: 1}]", "unknown key source 'magic'"),
    ("qa_override: {token: short}", "at least 16 characters"),
    ("qa_override: {token_env: LOCKGATE_TEST_UNSET_VAR_XYZ}", "is not set"),
    ("qa_override: {}", "set exactly one of token or token_env"),
    ("xds: {port: 10000}", "port 10000 is also used by listener"),
    ("models: []", "must list at least one model"),
])
def test_bad_fields(snippet, needle):
    base = "listener: {port: 10000}\n"
    models = "" if snippet.startswith("models") else (
        "models: [{name: m, stable: v1, versions: {v1: {endpoints: ['127.0.0.1:1']}}}]\n")
    text = "\n".join(problems(base + snippet + "\n" + models))
    assert needle in text, text


def test_yaml_syntax_error_names_line():
    text = "\n".join(problems("models:\n  - name: [unclosed\n"))
    assert "f.yaml:" in text and "invalid YAML" in text


def test_duplicate_keys_rejected():
    text = "\n".join(problems("listener: {port: 1}\nlistener: {port: 2}\n"))
    assert "duplicate key" in text and "f.yaml:2:" in text
