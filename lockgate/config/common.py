"""Shared pieces of ``lockgate.yaml`` validation: name rules, addresses (``{address, port}`` sections and
``host:port`` endpoints), URLs given directly or through an environment variable, and environment variable
names."""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from lockgate.routing import RESERVED_HEADER_PREFIX  # noqa: F401  (re-exported: one home, the routing contract)
from lockgate.yamlconf import ErrorCollector, Fields, PathPart

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
HEADER_RE = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
COOKIE_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
#: Header names lockgate itself uses (lockgate.routing, the routing contract); a model may not match or key on them.


@dataclass(frozen=True)
class Address:
    """A TCP bind or connect address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


#: ``package.module:Class`` (a plug-in evaluator or similarity, imported by the controller).
PLUGIN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _address(f: Fields, key: str, default_port: int) -> Address:
    sub = f.sub(key)
    host = sub.str("address", "127.0.0.1") or "127.0.0.1"
    port = sub.int("port", default_port, min=1, max=65535) or default_port
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            f.errors.add(sub.path + ("address",), f"must be an IP address, got {host!r}")
    sub.finish()
    return Address(host, port)


def _host_port(f: Fields, key: str, default: Address) -> Address:
    """``key: "host:port"`` (or ``{address: HOST, port: PORT}``, like the top-level sections)."""
    if key not in f.data:
        f.raw(key)
        return default
    value = f.raw(key)
    if isinstance(value, dict):
        return _address(f, key, default.port)
    addr = _endpoint(value, f.path + (key,), f.errors)
    return addr if addr is not None else default


def _endpoint(value: Any, path: tuple[PathPart, ...], errors: ErrorCollector) -> Address | None:
    if not isinstance(value, str) or ":" not in value:
        errors.add(path, f"must be 'host:port', got {value!r}")
        return None
    host, _, port_s = value.rpartition(":")
    if not port_s.isdigit() or not (1 <= int(port_s) <= 65535):
        errors.add(path, f"port must be 1-65535, got {port_s!r}")
        return None
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            errors.add(path, f"host must be an IP address (Envoy EDS endpoints are not resolved), got {host!r}")
            return None
    return Address(host, int(port_s))


def _url(f: Fields, required: bool = True) -> str | None:
    """``url`` or ``url_env`` (exactly one): an http(s) URL."""
    url = f.str("url")
    url_env = f.str("url_env")
    if url is not None and url_env is not None:
        f.errors.add(f.path + ("url",), "set url or url_env, not both")
        return None
    key = "url"
    if url_env is not None:
        key = "url_env"
        if not ENV_RE.match(url_env):
            f.errors.add(f.path + ("url_env",), f"must be an environment variable name, got {url_env!r}")
            return None
        url = os.environ.get(url_env)
        if not url:
            f.errors.add(f.path + ("url_env",), f"environment variable {url_env} is not set")
            return None
    if url is None:
        if required:
            f.errors.add(f.path + ("url",), "is required (or url_env)")
        return None
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        shown = url if key == "url" else f"${url_env}"
        f.errors.add(f.path + (key,), f"must be an http:// or https:// URL, got {shown!r}")
        return None
    return url


def _token_env(f: Fields) -> str | None:
    env = f.str("bearer_token_env")
    if env is not None and not ENV_RE.match(env):
        f.errors.add(f.path + ("bearer_token_env",), f"must be an environment variable name, got {env!r}")
        return None
    return env
