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
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lockgate.auth import AuthConfig, ClientToken, is_loopback_host
from lockgate.yamlconf import ConfigError, ErrorCollector, Fields, PathPart, load_yaml, load_yaml_file

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
HEADER_RE = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
COOKIE_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
#: Header names lockgate itself uses; a model may not match or key on them.
RESERVED_HEADER_PREFIX = "x-lockgate-"


@dataclass(frozen=True)
class Address:
    """A TCP bind or connect address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


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
class JudgeConfig:
    """An OpenAI-compatible chat endpoint used as the evaluator (``evaluator: http``).

    ``api_key_env`` names an environment variable holding a bearer token (never the token itself)."""

    url: str
    model: str
    timeout_s: float = 10.0
    api_key_env: str | None = None


@dataclass(frozen=True)
class EvaluationConfig:
    """Per-model response evaluation (see ``docs/evaluation.md``).

    ``sample_rate`` of the model's sticky-route requests are mirrored by Envoy to the controller's
    sampler, stored (bodies up to ``max_body_bytes``, kept ``retention_hours`` and at most
    ``max_samples`` rows), replayed out of band to the stable and the canary version, and each
    answer is scored by ``evaluator`` (``heuristic``, ``http`` = the ``judge``, or ``pkg.module:Class``);
    ``similarity`` (None = off) compares the two answers (``char3``, ``jaccard`` or ``pkg.module:Class``).
    ``replay_headers``: request headers besides content-type/accept stored with a sample and replayed
    (e.g. ``authorization`` when the model servers need it — stored in the sample database)."""

    sample_rate: float
    evaluator: str = "heuristic"
    judge: JudgeConfig | None = None
    similarity: str | None = "char3"
    retention_hours: float = 24.0
    max_samples: int = 10000
    max_body_bytes: int = 256 * 1024
    replay_timeout_s: float = 60.0
    replay_headers: tuple[str, ...] = ()


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


@dataclass(frozen=True)
class ControllerConfig:
    """The controller process (``lockgate controller``): observation collector (gRPC, ``address``),
    feedback + metrics HTTP API (``http``), and how long observations are kept. ``sampler`` receives
    the requests Envoy mirrors for evaluation (listened on only when a model has ``evaluation``);
    ``evaluation_concurrency`` bounds the replays (and judge calls) in flight."""

    address: Address = Address("127.0.0.1", 18020)
    http: Address = Address("127.0.0.1", 18021)
    retention_days: float = 30.0
    prune_interval_s: float = 3600.0
    sampler: Address = Address("127.0.0.1", 18022)
    evaluation_concurrency: int = 2


#: roles whose responses ``capture.retain_bodies`` may keep
RETAIN_ROLES = ("baseline", "canary")
#: ``retain_bodies.max_bytes`` × ``batch_size`` stays under this, so a batch fits the controller's gRPC limit
MAX_SAMPLE_BYTES_PER_BATCH = 32 << 20


@dataclass(frozen=True)
class RetainBodies:
    """Opt-in response-body retention (``capture.retain_bodies``, docs/observations.md): a
    deterministic ``sample_rate`` of the responses of ``roles`` keep their first ``max_bytes`` raw
    body bytes; the controller keeps at most ``max_count`` per model (oldest pruned) and applies
    the observation retention."""

    sample_rate: float = 0.01
    max_bytes: int = 16384
    max_count: int = 1000
    roles: tuple[str, ...] = ("canary",)


@dataclass(frozen=True)
class CaptureConfig:
    """What the ext_proc server captures from each response and how it ships observations.

    ``refusal_patterns`` None = the analyzers' built-in list; ``extra_refusal_patterns`` are added
    to whichever list is in force. ``queue_size`` bounds observations waiting for the controller
    (beyond it they are dropped and counted); ``batch_size`` is the most sent in one call;
    ``flush_interval_s`` is how long the ext_proc collects a batch before sending it (seconds; a full
    batch goes at once). ``retain_bodies`` None = no response body is kept (the default)."""

    max_body_bytes: int = 1 << 20
    refusal_patterns: tuple[str, ...] | None = None
    extra_refusal_patterns: tuple[str, ...] = ()
    queue_size: int = 100_000
    batch_size: int = 500
    flush_interval_s: float = 0.1
    retain_bodies: RetainBodies | None = None


def _retain_bodies(sub: Fields, batch_size: int) -> RetainBodies | None:
    if sub.data.get("retain_bodies") in (None, False):  # absent, empty or `false`: off
        sub.raw("retain_bodies")
        return None
    d = RetainBodies()
    rb = sub.sub("retain_bodies")
    rate = rb.float("sample_rate", d.sample_rate, min=0.0, max=1.0)
    max_bytes = rb.int("max_bytes", d.max_bytes, min=1, max=1 << 20)
    max_count = rb.int("max_count", d.max_count, min=1, max=1_000_000)
    roles: list[str] = []
    if "roles" not in rb.data:
        rb.raw("roles")
        roles = list(d.roles)
    else:
        for path, item in rb.list("roles"):
            if item not in RETAIN_ROLES:
                rb.errors.add(path, f"must be one of {', '.join(RETAIN_ROLES)}, got {item!r}")
            elif item not in roles:
                roles.append(item)
        if isinstance(rb.data["roles"], list) and not rb.data["roles"]:
            rb.errors.add(rb.path + ("roles",), f"must name at least one of {', '.join(RETAIN_ROLES)}")
    if max_bytes is not None and max_bytes * batch_size > MAX_SAMPLE_BYTES_PER_BATCH:
        rb.errors.add(rb.path + ("max_bytes",),
                      f"max_bytes × capture.batch_size ({max_bytes} × {batch_size}) must be at most "
                      f"{MAX_SAMPLE_BYTES_PER_BATCH} so a batch of observations fits one gRPC message; "
                      f"lower max_bytes or capture.batch_size")
    rb.finish()
    return RetainBodies(d.sample_rate if rate is None else rate, max_bytes or d.max_bytes,
                        max_count or d.max_count, tuple(roles))


def _capture(f: Fields) -> CaptureConfig:
    d = CaptureConfig()
    if "capture" not in f.data:
        f.raw("capture")
        return d
    sub = f.sub("capture")
    max_body = sub.int("max_body_bytes", d.max_body_bytes, min=0, max=1 << 30)
    lists = {}
    for key in ("refusal_patterns", "extra_refusal_patterns"):
        if key not in sub.data:
            sub.raw(key)
            continue
        pats = []
        for path, item in sub.list(key):
            if not isinstance(item, str):
                sub.errors.add(path, "must be a regular expression string")
                continue
            try:
                re.compile(item)
            except re.error as exc:
                sub.errors.add(path, f"invalid regular expression: {exc}")
                continue
            pats.append(item)
        lists[key] = tuple(pats)
    queue = sub.int("queue_size", d.queue_size, min=1, max=10_000_000)
    batch = sub.int("batch_size", d.batch_size, min=1, max=100_000)
    flush = sub.float("flush_interval_s", d.flush_interval_s, min=0.001, max=60.0)
    retain = _retain_bodies(sub, batch or d.batch_size)
    sub.finish()
    return CaptureConfig(max_body if max_body is not None else d.max_body_bytes, lists.get("refusal_patterns"),
                         lists.get("extra_refusal_patterns", ()), queue or d.queue_size, batch or d.batch_size,
                         flush or d.flush_interval_s, retain)


#: outcome kinds an alert sink can subscribe to (``trouble`` = component trouble, docs/alerts-and-registry.md)
ALERT_EVENTS = ("rolled_back", "aborted", "inconclusive", "promoted", "advanced", "trouble")
DEFAULT_ALERT_EVENTS = ("rolled_back", "aborted", "inconclusive", "promoted", "trouble")


@dataclass(frozen=True)
class RetryPolicy:
    """Delivery retries: exponential backoff from ``initial_backoff_s`` doubling up to ``max_backoff_s``,
    at most ``max_attempts`` tries in all (then the item is given up, logged and recorded)."""

    max_attempts: int = 12
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 300.0


@dataclass(frozen=True)
class AlertSink:
    """One alert receiver (``alerts:`` list item). ``url`` may come from ``url_env`` (Slack webhook
    URLs are secrets); ``bearer_token_env`` names a variable holding a bearer token. ``name`` (default
    ``<type>-<n>``) identifies the sink in logs and the deployment log — the URL never appears there."""

    type: str                      #: webhook | slack | alertmanager
    url: str
    name: str
    on: tuple[str, ...] = DEFAULT_ALERT_EVENTS
    timeout_s: float = 5.0
    bearer_token_env: str | None = None
    retry: RetryPolicy = RetryPolicy()
    generator_url: str | None = None   #: alertmanager generatorURL (default: the controller's rollout API)
    resolve_after_s: float = 3600.0    #: alertmanager endsAt of one-shot outcome alerts


@dataclass(frozen=True)
class MlflowModelMap:
    """Which MLflow registered model (and version numbers) a lockgate model's versions are."""

    registered_model: str | None = None
    versions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RegistryConfig:
    """Model registry feedback after promotion / rollback / inconclusive (``registry:``).

    ``file`` (default): ``path`` (default ``<state_dir>/registry``), one JSON file per model.
    ``mlflow``: ``tracking_uri``, ``registered_model`` (default: the lockgate model name), ``versions``
    (lockgate version → MLflow version number), ``version_tag`` (else looked up by this model-version tag),
    ``alias`` set on promotion, per-model overrides in ``models``. ``webhook``: ``url`` (or ``url_env``)."""

    type: str = "file"
    path: Path | None = None
    url: str | None = None
    tracking_uri: str | None = None
    registered_model: str | None = None
    versions: tuple[tuple[str, str], ...] = ()
    version_tag: str = "lockgate.version"
    alias: str | None = "production"
    models: tuple[tuple[str, MlflowModelMap], ...] = ()
    bearer_token_env: str | None = None
    timeout_s: float = 10.0
    retry: RetryPolicy = RetryPolicy()


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
    def db_path(self) -> Path:
        return self.state_dir / "lockgate.db"

    @property
    def observations_db_path(self) -> Path:
        return self.state_dir / "observations.db"


DEFAULT_KEYS = (KeySource("header", "x-user-id"), KeySource("client_ip"))


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


def _controller(f: Fields) -> ControllerConfig:
    d = ControllerConfig()
    if "controller" not in f.data:
        f.raw("controller")
        return d
    sub = f.sub("controller")
    address = _host_port(sub, "address", d.address)
    http = _host_port(sub, "http", d.http)
    retention = sub.float("retention_days", d.retention_days, min=0.0001, max=36500.0)
    prune = sub.float("prune_interval_s", d.prune_interval_s, min=0.1, max=86400.0)
    sampler = _host_port(sub, "sampler", d.sampler)
    concurrency = sub.int("evaluation_concurrency", d.evaluation_concurrency, min=1, max=64)
    sub.finish()
    return ControllerConfig(address, http, d.retention_days if retention is None else retention,
                            d.prune_interval_s if prune is None else prune, sampler,
                            concurrency or d.evaluation_concurrency)


#: ``package.module:Class`` (a plug-in evaluator or similarity, imported by the controller).
PLUGIN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _judge(f: Fields) -> JudgeConfig | None:
    sub = f.sub("judge")
    url = sub.str("url", required=True)
    model = sub.str("model", required=True)
    timeout = sub.float("timeout_s", 10.0, min=0.001, max=3600.0)
    key_env = sub.str("api_key_env")
    sub.finish()
    if url is not None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            f.errors.add(sub.path + ("url",), f"must be an http:// or https:// URL, got {url!r}")
            url = None
    if model == "":
        f.errors.add(sub.path + ("model",), "must not be empty")
    if key_env is not None and not ENV_RE.match(key_env):
        f.errors.add(sub.path + ("api_key_env",), f"must be an environment variable name, got {key_env!r}")
    if url is None or not model:
        return None
    return JudgeConfig(url, model, 10.0 if timeout is None else timeout, key_env)


def _evaluation(f: Fields) -> EvaluationConfig | None:
    """``evaluation:`` of one model (absent = off: nothing mirrored, nothing stored)."""
    if "evaluation" not in f.data:
        f.raw("evaluation")
        return None
    sub = f.sub("evaluation")
    d = EvaluationConfig(0.0)
    rate = sub.float("sample_rate", required=True, min=0.0, max=1.0)
    evaluator = sub.str("evaluator", d.evaluator) or d.evaluator
    if evaluator not in ("heuristic", "http") and not PLUGIN_RE.match(evaluator):
        sub.errors.add(sub.path + ("evaluator",),
                       f"must be heuristic, http or a plug-in 'package.module:Class', got {evaluator!r}")
    judge = None
    if "judge" in sub.data:
        judge = _judge(sub)
        if evaluator != "http":
            sub.errors.add(sub.path + ("judge",), "is only used with evaluator: http")
    else:
        sub.raw("judge")
        if evaluator == "http":
            sub.errors.add(sub.path + ("judge",), "is required with evaluator: http")
    similarity: str | None = d.similarity
    sim_raw = sub.raw("similarity")
    if isinstance(sim_raw, bool):
        similarity = d.similarity if sim_raw else None
    elif isinstance(sim_raw, dict):
        sf = sub.sub("similarity")
        impl = sf.str("impl", required=True)
        sf.finish()
        if impl is not None:
            if impl not in ("char3", "jaccard") and not PLUGIN_RE.match(impl):
                sub.errors.add(sf.path + ("impl",),
                               f"must be char3, jaccard or a plug-in 'package.module:Class', got {impl!r}")
            similarity = impl
    elif sim_raw is not None:
        sub.errors.add(sub.path + ("similarity",),
                       "must be true, false or {impl: char3 | jaccard | package.module:Class}")
    retention = sub.float("retention_hours", d.retention_hours, min=0.0001, max=24.0 * 3650)
    max_samples = sub.int("max_samples", d.max_samples, min=1, max=10_000_000)
    max_body = sub.int("max_body_bytes", d.max_body_bytes, min=1, max=64 << 20)
    replay_timeout = sub.float("replay_timeout_s", d.replay_timeout_s, min=0.001, max=3600.0)
    replay_headers: list[str] = []
    for hpath, name in sub.list("replay_headers"):
        if not isinstance(name, str) or not HEADER_RE.match(name):
            sub.errors.add(hpath, f"must be a lower-case header name, got {name!r}")
        elif name.startswith(RESERVED_HEADER_PREFIX) or name in _NOT_REPLAYED:
            sub.errors.add(hpath, f"{name!r} cannot be replayed (set by lockgate or the HTTP client)")
        elif name not in replay_headers:
            replay_headers.append(name)
    sub.finish()
    if rate is None:
        return None
    return EvaluationConfig(rate, evaluator, judge, similarity,
                            d.retention_hours if retention is None else retention,
                            max_samples or d.max_samples, max_body or d.max_body_bytes,
                            d.replay_timeout_s if replay_timeout is None else replay_timeout, tuple(replay_headers))


#: headers a replay sets itself (``replay_headers`` may not name them)
_NOT_REPLAYED = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
                           "te", "trailer", "expect", "content-type", "accept", "x-request-id"})


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


def _retry(f: Fields) -> RetryPolicy:
    d = RetryPolicy()
    if "retry" not in f.data:
        f.raw("retry")
        return d
    sub = f.sub("retry")
    attempts = sub.int("max_attempts", d.max_attempts, min=1, max=1000)
    initial = sub.float("initial_backoff_s", d.initial_backoff_s, min=0.01, max=86400.0)
    maximum = sub.float("max_backoff_s", d.max_backoff_s, min=0.01, max=86400.0)
    sub.finish()
    initial = d.initial_backoff_s if initial is None else initial
    maximum = d.max_backoff_s if maximum is None else maximum
    if maximum < initial:
        f.errors.add(sub.path + ("max_backoff_s",), f"must be at least initial_backoff_s ({initial:g})")
    return RetryPolicy(attempts or d.max_attempts, initial, maximum)


def _token_env(f: Fields) -> str | None:
    env = f.str("bearer_token_env")
    if env is not None and not ENV_RE.match(env):
        f.errors.add(f.path + ("bearer_token_env",), f"must be an environment variable name, got {env!r}")
        return None
    return env


@dataclass(frozen=True)
class RequestLimits:
    """What one client request may cost Envoy (``limits:`` in lockgate.yaml; Envoy answers 431/413/408).

    ``max_request_headers_kb``: the request's headers together (Envoy's default 60);
    ``max_headers_count``: how many (Envoy's default 100); ``request_headers_timeout_s``: time to
    receive them (0 = none; slow-header clients are cut after it); ``max_request_body_bytes``: 0 = no
    limit (requests stream through); otherwise Envoy buffers each request body up to this size and
    answers 413 beyond it — fine for model APIs, whose requests are small JSON.
    """

    max_request_headers_kb: int = 60
    max_headers_count: int = 100
    request_headers_timeout_s: float = 10.0
    max_request_body_bytes: int = 0


def _limits(f: Fields) -> RequestLimits:
    d = RequestLimits()
    if "limits" not in f.data:
        f.raw("limits")
        return d
    sub = f.sub("limits")
    out = RequestLimits(
        max_request_headers_kb=sub.int("max_request_headers_kb", d.max_request_headers_kb, min=1, max=8192)
        or d.max_request_headers_kb,
        max_headers_count=sub.int("max_headers_count", d.max_headers_count, min=1, max=10000) or d.max_headers_count,
        request_headers_timeout_s=sub.float("request_headers_timeout_s", d.request_headers_timeout_s, min=0.0,
                                            max=3600.0) or 0.0,
        max_request_body_bytes=sub.int("max_request_body_bytes", d.max_request_body_bytes, min=0,
                                       max=4 * 1024**3 - 1) or 0)
    sub.finish()
    return out


_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def _file_text(f: Fields, key: str, base_dir: Path) -> str | None:
    """The stripped contents of the file named by ``key`` (relative to the config), or None + an error."""
    name = f.str(key)
    if name is None:
        return None
    path = Path(name) if Path(name).is_absolute() else base_dir / name
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        f.errors.add(f.path + (key,), f"cannot read {path}: {exc.strerror or exc}")
        return None


def _auth(f: Fields, base_dir: Path) -> AuthConfig:
    """``auth:`` — named client tokens (stored as sha256), lockgate's own token, mTLS, insecure."""
    if "auth" not in f.data:
        f.raw("auth")
        return AuthConfig()
    sub = f.sub("auth")
    tokens: list[ClientToken] = []
    names: dict[str, int] = {}
    hashes: dict[str, str] = {}
    for path, item in sub.list("tokens"):
        tf = Fields(item, path, f.errors)
        name = tf.str("name", required=True)
        digest = tf.str("sha256")
        from_file = _file_text(tf, "sha256_file", base_dir) if "sha256_file" in tf.data else None
        tf.finish()
        if name is not None and not NAME_RE.match(name):
            f.errors.add(path + ("name",), f"must match {NAME_RE.pattern}, got {name!r}")
            name = None
        if (digest is None) == ("sha256_file" not in tf.data):
            f.errors.add(path, "give exactly one of sha256 (the token's sha256, hex) or sha256_file "
                               "(never the token itself)")
            continue
        digest = digest if digest is not None else from_file
        if digest is None:
            continue
        if not _SHA256_RE.match(digest):
            key = "sha256" if "sha256" in tf.data else "sha256_file"
            f.errors.add(path + (key,), "must be 64 hex digits: the sha256 of the token "
                                        "(`printf %s TOKEN | sha256sum`), not the token")
            continue
        if name is None:
            continue
        if name in names:
            f.errors.add(path + ("name",), f"duplicate client name {name!r} (also auth.tokens[{names[name]}])")
            continue
        if digest.lower() in hashes:
            f.errors.add(path, f"same token as client {hashes[digest.lower()]!r}: each client needs its own token")
            continue
        names[name] = path[-1]  # type: ignore[assignment]
        hashes[digest.lower()] = name
        tokens.append(ClientToken(name, digest.lower()))
    token_file = sub.str("token_file")
    if token_file is not None and not Path(token_file).is_absolute():
        token_file = str(base_dir / token_file)
    insecure = sub.bool("insecure", False)
    tls = sub.sub("tls")
    cert, key, ca = tls.str("cert"), tls.str("key"), tls.str("client_ca")
    tls.finish()
    if (cert is None) != (key is None):
        f.errors.add(tls.path, "cert and key go together")
    if ca is not None and cert is None:
        f.errors.add(tls.path + ("client_ca",), "client_ca (mTLS) needs the server's cert and key too")
    sub.finish()

    def _abs(x: str | None) -> str | None:
        return None if x is None else (x if Path(x).is_absolute() else str(base_dir / x))

    return AuthConfig(tuple(tokens), token_file, insecure, _abs(cert), _abs(key), _abs(ca))


def _alerts(f: Fields) -> tuple[AlertSink, ...]:
    """``alerts:`` — a list of sinks (absent = no alerts)."""
    out: list[AlertSink] = []
    names: dict[str, int] = {}
    for path, item in f.list("alerts"):
        if isinstance(item, dict) and "True" in item and "on" not in item:
            # YAML 1.1 reads a bare `on:` key as the boolean true: take it back as "on" (and its line numbers)
            item = {("on" if k == "True" else k): v for k, v in item.items()}
            marks = f.errors.smap._marks
            for mpath in [m for m in marks if m[:len(path) + 1] == path + ("True",)]:
                marks[path + ("on",) + mpath[len(path) + 1:]] = marks[mpath]
        sub = Fields(item, path, f.errors)
        kind = sub.str("type", required=True)
        if kind is not None and kind not in ("webhook", "slack", "alertmanager"):
            f.errors.add(path + ("type",), f"must be webhook, slack or alertmanager, got {kind!r}")
            kind = None
        url = _url(sub)
        name = sub.str("name")
        if name is not None and not NAME_RE.match(name):
            f.errors.add(path + ("name",), f"must match {NAME_RE.pattern}, got {name!r}")
        on: list[str] = []
        if "on" in sub.data:
            for opath, ev in sub.list("on"):
                if ev not in ALERT_EVENTS:
                    f.errors.add(opath, f"must be one of {', '.join(ALERT_EVENTS)}, got {ev!r}")
                elif ev not in on:
                    on.append(ev)
            if isinstance(sub.data.get("on"), list) and not sub.data["on"]:
                f.errors.add(path + ("on",), "must list at least one event")
        else:
            sub.raw("on")
        timeout = sub.float("timeout_s", 5.0, min=0.01, max=600.0)
        token_env = _token_env(sub)
        retry = _retry(sub)
        generator_url = sub.str("generator_url")
        resolve_after = sub.float("resolve_after_s", 3600.0, min=1.0, max=30 * 86400.0)
        sub.finish()
        if generator_url is not None and kind != "alertmanager":
            f.errors.add(path + ("generator_url",), "is only used with type: alertmanager")
        if kind is None or url is None:
            continue
        name = name or f"{kind}-{len(out)}"
        if name in names:
            f.errors.add(path + ("name",), f"duplicate alert name {name!r} (also alerts[{names[name]}])")
        names[name] = path[-1] if isinstance(path[-1], int) else 0
        out.append(AlertSink(kind, url, name, tuple(on) or DEFAULT_ALERT_EVENTS,
                             5.0 if timeout is None else timeout, token_env, retry, generator_url,
                             3600.0 if resolve_after is None else resolve_after))
    return tuple(out)


def _version_map(f: Fields, key: str) -> tuple[tuple[str, str], ...]:
    if key not in f.data:
        f.raw(key)
        return ()
    sub = f.sub(key)
    out = []
    for name, value in sub.data.items():
        sub.raw(name)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.isdigit():
            f.errors.add(sub.path + (name,), f"must be an MLflow version number, got {value!r}")
            continue
        out.append((str(name), value))
    return tuple(out)


def _registry(f: Fields, base_dir: Path, models: list["Model"]) -> RegistryConfig:
    """``registry:`` (absent = the file registry in ``<state_dir>/registry``)."""
    d = RegistryConfig()
    if "registry" not in f.data:
        f.raw("registry")
        return d
    sub = f.sub("registry")
    kind = sub.str("type", "file") or "file"
    if kind not in ("file", "mlflow", "webhook"):
        f.errors.add(sub.path + ("type",), f"must be file, mlflow or webhook, got {kind!r}")
    timeout = sub.float("timeout_s", d.timeout_s, min=0.01, max=600.0)
    retry = _retry(sub)
    allowed = {"type", "timeout_s", "retry"}
    path = url = tracking_uri = registered_model = token_env = None
    versions: tuple[tuple[str, str], ...] = ()
    per_model: list[tuple[str, MlflowModelMap]] = []
    version_tag, alias = d.version_tag, d.alias
    known = {m.name: m for m in models}

    def check_versions(vmap, where, model_names):
        for vname, _ in vmap:
            if model_names and not any(vname in known[m].versions for m in model_names if m in known):
                f.errors.add(where + (vname,), f"{vname!r} is not a version of {', '.join(model_names)}")

    if kind == "file":
        allowed |= {"path"}
        p = sub.str("path")
        if p is not None:
            path = Path(p) if Path(p).is_absolute() else (base_dir / p).resolve()
    elif kind == "webhook":
        allowed |= {"url", "url_env", "bearer_token_env"}
        url = _url(sub)
        token_env = _token_env(sub)
    elif kind == "mlflow":
        allowed |= {"tracking_uri", "registered_model", "versions", "version_tag", "alias", "models",
                    "bearer_token_env"}
        tracking_uri = sub.str("tracking_uri", required=True)
        if tracking_uri is not None:
            parsed = urllib.parse.urlsplit(tracking_uri)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                f.errors.add(sub.path + ("tracking_uri",),
                             f"must be the http:// or https:// URL of an MLflow tracking server, got {tracking_uri!r}")
                tracking_uri = None
        registered_model = sub.str("registered_model")
        versions = _version_map(sub, "versions")
        check_versions(versions, sub.path + ("versions",), list(known))
        version_tag = sub.str("version_tag", d.version_tag) or d.version_tag
        alias_raw = sub.raw("alias")
        if alias_raw is False:
            alias = None
        elif isinstance(alias_raw, str) and re.match(r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$", alias_raw):
            alias = alias_raw
        elif alias_raw is not None:
            f.errors.add(sub.path + ("alias",), f"must be an alias name (letters, digits, _ and -) or false, "
                                                f"got {alias_raw!r}")
        token_env = _token_env(sub)
        if "models" in sub.data:
            msub = sub.sub("models")
            for mname, mdata in msub.data.items():
                msub.raw(mname)
                mpath = msub.path + (mname,)
                if known and mname not in known:
                    f.errors.add(mpath, f"{mname!r} is not a model in this file ({', '.join(known)})")
                mf = Fields(mdata, mpath, f.errors)
                rm = mf.str("registered_model")
                vm = _version_map(mf, "versions")
                mf.finish()
                check_versions(vm, mpath + ("versions",), [mname])
                per_model.append((mname, MlflowModelMap(rm, vm)))
        else:
            sub.raw("models")
    for key in list(sub.data):
        if key not in allowed:
            sub.raw(key)
            f.errors.add(sub.path + (key,), f"unknown field for registry type {kind} "
                                            f"(known: {', '.join(sorted(allowed))})")
    sub.finish()
    return RegistryConfig(kind, path, url, tracking_uri, registered_model, versions, version_tag, alias,
                          tuple(per_model), token_env, d.timeout_s if timeout is None else timeout, retry)


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
    token_header = sub.str("token_header", "x-lockgate-qa-token") or ""
    version_header = sub.str("version_header", "x-lockgate-version") or ""
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
    ep_processes = f.int("extproc_processes", 1, min=1, max=64) or 1
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
                          limits)


def load_config(path: str | Path) -> LockgateConfig:
    """Load and validate ``lockgate.yaml``. Raises ConfigError (file, line, field, message)."""
    data, smap, source = load_yaml_file(path)
    return parse_config(data, smap, source, Path(path).resolve().parent)


def config_from_text(text: str, source: str = "<string>", base_dir: Path | None = None) -> LockgateConfig:
    data, smap = load_yaml(text, source)
    return parse_config(data, smap, source, base_dir or Path.cwd())


__all__ = ["AlertSink", "Address", "ConfigError", "RegistryConfig", "RetryPolicy", "ControllerConfig", "EvaluationConfig", "JudgeConfig", "KeySource", "LockgateConfig", "Model", "ModelMatch", "ModelVersion",
           "QAOverride", "RetainBodies", "load_config", "config_from_text"]
