"""``lockgate.yaml``: the fleet configuration (listener, component ports, state directory, models).

Loaded and validated as a whole; any problem raises :class:`~lockgate.yamlconf.ConfigError` naming the
file, line and field path, and nothing starts. Example::

    listener: {address: 127.0.0.1, port: 10000}
    state_dir: ./lockgate-state
    sticky_keys: [{header: x-user-id}, {cookie: session}, {client_ip: {}}]
    qa_override: {token_header: x-lockgate-qa-token, version_header: x-lockgate-version,
                  token_env: LOCKGATE_QA_TOKEN}
    models:
      - name: chat
        match: {path_prefix: /v1/chat}
        stable: v1
        versions:
          v1: {endpoints: ["127.0.0.1:18001"]}
          v2: {endpoints: ["127.0.0.1:18002"]}

The package, one module per section: :mod:`.common` (addresses, names, URLs), :mod:`.models` (models,
sticky keys, QA override), :mod:`.evaluation`, :mod:`.controller`, :mod:`.capture`, :mod:`.alerts`,
:mod:`.registry`, :mod:`.auth`, :mod:`.limits`, :mod:`.envoy`; this module holds the whole file
(:class:`LockgateConfig`), the rules across sections (bind refusal without auth, port clashes, endpoints
that loop into lockgate, duplicate models and matches) and the loaders. Every public name is importable
from ``lockgate.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lockgate.auth import AuthConfig, is_loopback_host
from lockgate.config.alerts import ALERT_EVENTS, DEFAULT_ALERT_EVENTS, AlertSink, RetryPolicy, _alerts
from lockgate.config.auth import _auth
from lockgate.config.capture import MAX_SAMPLE_BYTES_PER_BATCH, RETAIN_ROLES, CaptureConfig, RetainBodies, _capture
from lockgate.config.common import (
    COOKIE_RE,
    ENV_RE,
    HEADER_RE,
    NAME_RE,
    NODE_ID_RE,
    PLUGIN_RE,
    RESERVED_HEADER_PREFIX,
    Address,
    _address,
)
from lockgate.config.controller import ControllerConfig, _controller
from lockgate.config.database import _database
from lockgate.config.xds_servers import XdsServer, _controllers, _xds_servers
from lockgate.config.envoy import EnvoyConfig, _envoy, derive_extproc_processes
from lockgate.config.evaluation import EvaluationConfig, JudgeConfig
from lockgate.config.limits import RequestLimits, _limits
from lockgate.config.models import (
    DEFAULT_KEYS,
    KeySource,
    Model,
    ModelMatch,
    ModelVersion,
    QAOverride,
    _key_sources,
    _model,
    _qa,
)
from lockgate.config.registry import MlflowModelMap, RegistryConfig, _registry
from lockgate.database import Where, locate
from lockgate.yamlconf import ConfigError, ErrorCollector, Fields, load_yaml, load_yaml_file

_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


@dataclass(frozen=True)
class LockgateConfig:
    source: str
    node_id: str
    listener: Address
    admin: Address
    xds: Address
    control: Address
    extproc: Address
    extproc_metrics: Address
    extproc_message_timeout_ms: int
    state_dir: Path
    qa_override: QAOverride | None
    models: tuple[Model, ...] = field(default_factory=tuple)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    #: ext_proc processes on this host: process i listens on extproc.port + i (metrics: extproc_metrics.port + i);
    #: Envoy's ext_proc cluster lists them all as endpoints (one HTTP/2 connection each).
    extproc_processes: int = 1
    alerts: tuple[AlertSink, ...] = ()
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: "RequestLimits" = field(default_factory=lambda: RequestLimits())
    #: ``envoy:``: Envoy's worker threads (default: the host's cores); ``extproc_processes`` follows it when unset
    envoy: EnvoyConfig = field(default_factory=EnvoyConfig)
    #: ``database:``: a PostgreSQL URL holding every store (lockgate/config/database.py); None = SQLite in state_dir
    database: str | None = None
    #: ``xds_servers:``: every xDS server of the control plane (lockgate/config/xds_servers.py); () = this host's
    xds_servers: "tuple[XdsServer, ...]" = ()

    def xds_fleet(self) -> "tuple[XdsServer, ...]":
        """Every xDS server Envoys and the controller use: ``xds_servers``, or this host's one."""
        return self.xds_servers or (XdsServer(self.xds, self.control),)

    def control_addresses(self) -> "list[Address]":
        """The control APIs to call, in order (the next when one is unreachable)."""
        return [s.control for s in self.xds_fleet()]

    #: ``controllers:``: every controller's observations API, in order of preference; () = ``controller.address``
    controllers: "tuple[Address, ...]" = ()

    def collector_addresses(self) -> "list[Address]":
        """Where each ext_proc sends observations, in order (the next when one is unreachable)."""
        return list(self.controllers) or [self.controller.address]

    def store(self, filename: str) -> "Where":
        """Where the store kept in ``<state_dir>/<filename>`` on SQLite lives with this config."""
        return locate(self.state_dir, filename, self.database)

    def extproc_addresses(self) -> list[Address]:
        return [Address(self.extproc.host, self.extproc.port + i) for i in range(self.extproc_processes)]

    def extproc_metrics_address(self, index: int) -> Address:
        return Address(self.extproc_metrics.host, self.extproc_metrics.port + index)

    def model(self, name: str) -> Model:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def db_path(self) -> "Where":
        """The xDS weight store: ``<state_dir>/lockgate.db``, or its schema in the ``database``."""
        return self.store("lockgate.db")

    @property
    def observations_db_path(self) -> "Where":
        return self.store("observations.db")


def parse_config(data: Any, smap, source: str, base_dir: Path) -> LockgateConfig:
    """Validate parsed YAML into a :class:`LockgateConfig`; raises ConfigError listing every problem."""
    errors = ErrorCollector(source, smap)
    f = Fields(data, (), errors)
    node_id = f.str("node_id", "lockgate-envoy-0") or "lockgate-envoy-0"
    if not NODE_ID_RE.match(node_id):
        errors.add(("node_id",), f"must be 1-128 characters of letters, digits, '.', '_' and '-' (it is written "
                                 f"into Envoy's bootstrap), got {node_id!r}")
    listener = _address(f, "listener", 10000)
    admin = _address(f, "admin", 9901)
    xds = _address(f, "xds", 18000)
    control = _address(f, "control", 18010)
    extproc = _address(f, "extproc", 18080)
    extproc_metrics = _address(f, "extproc_metrics", 18090)
    ep_timeout = f.int("extproc_message_timeout_ms", 500, min=1, max=60000) or 500
    envoy = _envoy(f)
    ep_explicit = f.int("extproc_processes", None, min=1, max=64)
    state_dir = Path(f.str("state_dir", "./lockgate-state") or "./lockgate-state")
    if not state_dir.is_absolute():
        state_dir = (base_dir / state_dir).resolve()
    default_keys = _key_sources(f, "sticky_keys", errors) or DEFAULT_KEYS
    qa = _qa(f, errors)
    controller = _controller(f)
    capture = _capture(f)
    models: list[Model] = []
    for path, item in f.list("models", required=True):
        model = _model(item, path, errors, default_keys)
        if model is not None:
            models.append(model)
    alerts = _alerts(f)
    registry = _registry(f, base_dir, models)
    auth = _auth(f, base_dir)
    limits = _limits(f)
    database = _database(f)
    xds_servers = _xds_servers(f)
    controllers = _controllers(f)
    ep_processes = ep_explicit or 1
    if ep_explicit is None and "extproc_processes" not in f.data:  # follows envoy.concurrency
        ep_processes, rule = derive_extproc_processes(envoy.concurrency, extproc, extproc_metrics, [
            listener, admin, xds, control, controller.address, controller.http, controller.sampler])
        envoy = replace(envoy, extproc_rule=rule)
    # Off loopback only with callers to check: auth.tokens, or auth.insecure (then each process warns loudly at
    # startup). Envoy's traffic listener is meant to be reached; its admin serves /config_dump and /quitquitquit.
    if not auth.insecure:
        binds = [("admin", admin), ("xds", xds), ("control", control), ("extproc", extproc),
                 ("extproc_metrics", extproc_metrics), ("controller.address", controller.address),
                 ("controller.http", controller.http)]
        if any(m.evaluation for m in models):
            binds.append(("controller.sampler", controller.sampler))
        for label, addr in binds:
            if is_loopback_host(addr.host):
                continue
            path = ("controller", label.partition(".")[2]) if label.startswith("controller.") else (label, "address")
            if label == "admin":
                errors.add(path, f"Envoy's admin must listen on loopback, got {addr.host}: it serves /config_dump "
                                 f"(routes, clusters) and can stop Envoy to anyone who reaches it (auth.insecure: true "
                                 f"allows it anyway)")
            elif not auth.enabled:
                errors.add(path, f"{label} listens on {addr.host}, off loopback, but no auth.tokens are configured: "
                                 f"anyone who reaches it could call it unauthenticated; configure auth.tokens (and "
                                 f"auth.token_file), bind to 127.0.0.1, or set auth.insecure: true")
    f.finish()
    if "models" in f.data and not models and not errors.problems:
        errors.add(("models",), "must list at least one model")
    seen: dict[str, int] = {}
    for i, model in enumerate(models):
        if model.name in seen:
            errors.add(("models", i, "name"), f"duplicate model name {model.name!r} (also models[{seen[model.name]}])")
        seen[model.name] = i
    ports: dict[tuple[str, int], str] = {}
    sampler = (("controller.sampler", controller.sampler),) if any(m.evaluation for m in models) else ()
    for label, addr in (("listener", listener), ("admin", admin), ("xds", xds), ("control", control),
                        *((("extproc" if i == 0 else f"extproc (process {i})"), Address(extproc.host, extproc.port + i))
                          for i in range(ep_processes)),
                        *((("extproc_metrics" if i == 0 else f"extproc_metrics (process {i})"),
                           Address(extproc_metrics.host, extproc_metrics.port + i)) for i in range(ep_processes)),
                        ("controller.address", controller.address), ("controller.http", controller.http),
                        *sampler):
        # 0.0.0.0:P (or [::]:P) takes port P on every address, so it collides with 127.0.0.1:P too
        clash = ports.get((addr.host, addr.port)) or next(
            (other for (h, p), other in ports.items()
             if p == addr.port and (h in _WILDCARD_HOSTS or addr.host in _WILDCARD_HOSTS)), None)
        if clash:
            errors.add(tuple(label.split(" ")[0].split(".")) + (() if label.startswith("controller.") else ("port",)),
                       f"port {addr.port} is also used by {clash}")
        ports[(addr.host, addr.port)] = label
    own = ports  # (host, port) → which lockgate address
    for i, model in enumerate(models):
        for vname, version in model.versions.items():
            for addr in version.endpoints:
                hit = own.get((addr.host, addr.port)) or next(
                    (lbl for (h, p), lbl in own.items() if p == addr.port and h in _WILDCARD_HOSTS
                     and (is_loopback_host(addr.host) or addr.host in _WILDCARD_HOSTS)), None)
                if hit:
                    errors.add(("models", i, "versions", vname, "endpoints"),
                               f"{addr.host}:{addr.port} is lockgate's own {hit} address: requests would loop "
                               f"into lockgate instead of reaching the model server")
    routes: dict[tuple[str, str | None, str | None], int] = {}
    for i, model in enumerate(models):
        key = (model.match.path_prefix, model.match.header_name, model.match.header_value)
        if key in routes:
            j = routes[key]
            errors.add(("models", i, "match"), f"same match as models[{j}] ({models[j].name}): path_prefix "
                                               f"{model.match.path_prefix!r}"
                                               + (f" and header {model.match.header_name}" if model.match.header_name
                                                  else "")
                                               + f" — every request would go to {models[j].name}; make them differ")
        else:
            routes[key] = i
    errors.raise_if_any()
    return LockgateConfig(source, node_id, listener, admin, xds, control, extproc, extproc_metrics, ep_timeout,
                          state_dir, qa, tuple(models), controller, capture, ep_processes, alerts, registry, auth,
                          limits, envoy=envoy, database=database, xds_servers=xds_servers,
                          controllers=controllers)


def load_config(path: str | Path) -> LockgateConfig:
    """Load and validate ``lockgate.yaml``. Raises ConfigError (file, line, field, message)."""
    data, smap, source = load_yaml_file(path)
    return parse_config(data, smap, source, Path(path).resolve().parent)


def config_from_text(text: str, source: str = "<string>", base_dir: Path | None = None) -> LockgateConfig:
    data, smap = load_yaml(text, source)
    return parse_config(data, smap, source, base_dir or Path.cwd())


__all__ = ["ALERT_EVENTS", "AlertSink", "Address", "AuthConfig", "COOKIE_RE", "CaptureConfig", "ConfigError",
           "ControllerConfig", "DEFAULT_ALERT_EVENTS", "DEFAULT_KEYS", "ENV_RE", "EnvoyConfig", "EvaluationConfig",
           "HEADER_RE",
           "JudgeConfig", "KeySource", "LockgateConfig", "MAX_SAMPLE_BYTES_PER_BATCH", "MlflowModelMap", "Model",
           "ModelMatch", "ModelVersion", "NAME_RE", "NODE_ID_RE", "PLUGIN_RE", "QAOverride", "RESERVED_HEADER_PREFIX",
           "RETAIN_ROLES", "RegistryConfig", "XdsServer", "RequestLimits", "RetainBodies", "RetryPolicy", "config_from_text",
           "load_config", "parse_config"]
