"""``models:`` — each model's match, versions and endpoints, sticky keys and analyzer; ``sticky_keys`` (the
fleet default) and ``qa_override``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lockgate.config.common import COOKIE_RE, HEADER_RE, NAME_RE, RESERVED_HEADER_PREFIX, Address, _endpoint
from lockgate.config.evaluation import EvaluationConfig, _evaluation
from lockgate.routing import DEFAULT_QA_TOKEN_HEADER, DEFAULT_QA_VERSION_HEADER
from lockgate.yamlconf import ErrorCollector, Fields, PathPart


@dataclass(frozen=True)
class KeySource:
    """One sticky-key source. ``kind`` is ``header``, ``cookie`` or ``client_ip``.

    ``name`` is the header or cookie name (empty for client_ip); ``trusted_hops`` is how many
    proxies in front of Envoy append to ``x-forwarded-for`` (client_ip only).
    """

    kind: str
    name: str = ""
    trusted_hops: int = 0

    def describe(self) -> str:
        return f"{self.kind} {self.name}".strip() if self.kind != "client_ip" else "client_ip"


@dataclass(frozen=True)
class QAOverride:
    """A request carrying ``token_header: <token>`` and ``version_header: <version>`` reaches that
    version; without the exact token both headers are ignored (and stripped before the upstream)."""

    token_header: str
    version_header: str
    token: str


@dataclass(frozen=True)
class ModelMatch:
    """How requests are recognised as this model's: a path prefix, and optionally a header value."""

    path_prefix: str = "/"
    header_name: str | None = None
    header_value: str | None = None


@dataclass(frozen=True)
class ModelVersion:
    name: str
    endpoints: tuple[Address, ...]


@dataclass(frozen=True)
class Model:
    name: str
    match: ModelMatch
    stable: str
    versions: dict[str, ModelVersion]
    sticky_keys: tuple[KeySource, ...]
    timeout_s: float
    analyzer: str | None = None
    evaluation: EvaluationConfig | None = None

    def cluster_name(self, version: str) -> str:
        """Envoy cluster of one version: ``<model>.<version>`` (names cannot contain dots)."""
        return f"{self.name}.{version}"


DEFAULT_KEYS = (KeySource("header", "x-user-id"), KeySource("client_ip"))


def _key_sources(f: Fields, key: str, errors: ErrorCollector) -> tuple[KeySource, ...] | None:
    if key not in f.data:
        f.raw(key)
        return None
    out: list[KeySource] = []
    for path, item in f.list(key):
        if not isinstance(item, dict) or len(item) != 1:
            errors.add(path, "must be one of {header: NAME}, {cookie: NAME}, {client_ip: {}}")
            continue
        (kind, value), = item.items()
        if kind == "header":
            if not isinstance(value, str) or not HEADER_RE.match(value):
                errors.add(path + (kind,), f"must be a lower-case header name, got {value!r}")
            elif value.startswith(RESERVED_HEADER_PREFIX) or value.startswith(":"):
                errors.add(path + (kind,), f"{value!r} is reserved for lockgate/Envoy")
            else:
                out.append(KeySource("header", value))
        elif kind == "cookie":
            if not isinstance(value, str) or not COOKIE_RE.match(value):
                errors.add(path + (kind,), f"must be a cookie name, got {value!r}")
            else:
                out.append(KeySource("cookie", value))
        elif kind == "client_ip":
            sub = Fields(value, path + (kind,), errors)
            hops = sub.int("trusted_hops", 0, min=0, max=10) or 0
            sub.finish()
            out.append(KeySource("client_ip", trusted_hops=hops))
        else:
            errors.add(path, f"unknown key source {kind!r} (use header, cookie or client_ip)")
    if not out and not errors.problems:
        errors.add(f.path + (key,), "must list at least one key source")
    kinds = [k.kind for k in out]
    if "client_ip" in kinds and kinds.index("client_ip") != len(kinds) - 1:
        errors.add(f.path + (key,), "client_ip must be the last key source (it is always present)")
    return tuple(out)


def _qa(f: Fields, errors: ErrorCollector) -> QAOverride | None:
    if "qa_override" not in f.data:
        f.raw("qa_override")
        return None
    sub = f.sub("qa_override")
    token_header = sub.str("token_header", DEFAULT_QA_TOKEN_HEADER) or ""
    version_header = sub.str("version_header", DEFAULT_QA_VERSION_HEADER) or ""
    token = sub.str("token")
    token_env = sub.str("token_env")
    sub.finish()
    for name, value in (("token_header", token_header), ("version_header", version_header)):
        if not HEADER_RE.match(value):
            errors.add(sub.path + (name,), f"must be a lower-case header name, got {value!r}")
    if (token is None) == (token_env is None):
        errors.add(sub.path, "set exactly one of token or token_env")
        return None
    if token_env is not None:
        token = os.environ.get(token_env)
        if not token:
            errors.add(sub.path + ("token_env",), f"environment variable {token_env} is not set")
            return None
    assert token is not None
    if len(token) < 16:
        errors.add(sub.path + ("token" if token_env is None else "token_env",),
                   "the QA token must be at least 16 characters")
    return QAOverride(token_header, version_header, token)


def _model(value: Any, path: tuple[PathPart, ...], errors: ErrorCollector,
           default_keys: tuple[KeySource, ...]) -> Model | None:
    f = Fields(value, path, errors)
    name = f.str("name", required=True) or ""
    if name and not NAME_RE.match(name):
        errors.add(path + ("name",), f"must match {NAME_RE.pattern} (letters, digits, _ and -), got {name!r}")
    m = f.sub("match")
    prefix = m.str("path_prefix", "/") or "/"
    if not prefix.startswith("/"):
        errors.add(m.path + ("path_prefix",), f"must start with '/', got {prefix!r}")
    header_name = header_value = None
    if "header" in m.data:
        h = m.sub("header")
        header_name = h.str("name", required=True)
        header_value = h.str("value", required=True)
        h.finish()
        if header_name and not HEADER_RE.match(header_name):
            errors.add(h.path + ("name",), f"must be a lower-case header name, got {header_name!r}")
    m.finish()
    stable = f.str("stable", required=True) or ""
    versions: dict[str, ModelVersion] = {}
    vmap = f.sub("versions", required=True)
    for vname, vdata in vmap.data.items():
        vmap.raw(vname)
        vpath = vmap.path + (vname,)
        if not NAME_RE.match(vname):
            errors.add(vpath, f"version name must match {NAME_RE.pattern}, got {vname!r}")
        vf = Fields(vdata, vpath, errors)
        eps = [_endpoint(ep, p, errors) for p, ep in vf.list("endpoints", required=True)]
        vf.finish()
        if "endpoints" in vf.data and not eps:
            errors.add(vpath + ("endpoints",), "must list at least one endpoint")
        versions[vname] = ModelVersion(vname, tuple(e for e in eps if e is not None))
    vmap.finish()
    if "versions" in f.data and isinstance(vmap.data, dict) and not vmap.data:
        errors.add(path + ("versions",), "must list at least one version")
    if vmap.data and stable and stable not in versions:
        errors.add(path + ("stable",), f"{stable!r} is not one of the versions ({', '.join(versions)})")
    keys = _key_sources(f, "sticky_keys", errors) or default_keys
    timeout = f.float("timeout_s", 300.0, min=0.001, max=86400.0) or 300.0
    analyzer = f.str("analyzer")
    if analyzer is not None and analyzer not in ("auto", "openai", "sse", "classifier", "none"):
        errors.add(path + ("analyzer",), f"must be auto, openai, sse, classifier or none, got {analyzer!r}")
    evaluation = _evaluation(f)
    f.finish()
    return Model(name, ModelMatch(prefix, header_name, header_value), stable, versions, keys, timeout,
                 None if analyzer in (None, "auto") else analyzer, evaluation)
