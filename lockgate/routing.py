"""The routing contract: what the xDS server tells Envoy and what the ext_proc server and the controller
read back — one home, imported by ``xds/``, ``extproc/`` and ``controller/`` (which never import each other).

Pure: no Envoy protobufs, no gRPC, no I/O; only strings, integers and small dataclasses. ``xds/`` renders
this contract into Envoy resources; ``extproc/`` parses what Envoy reports; the controller uses the
header names. Contents:

* **Weights**: a model's split is in basis points of :data:`TOTAL_WEIGHT_BP` (10,000 = 100 %;
  1 bp = 0.01 %), canary listed first; :class:`CanaryWeight` is one model's desired split.
* **Names**: an Envoy cluster per model version, ``<model>.<version>`` (:func:`cluster_name`,
  :func:`parse_cluster_name`); route names ``<model>/key/<i>?canary=<v>&w=<bp>&stage=<s>`` (sticky key
  source ``i``, or ``key/none``) carry the split that routed a request, and ``<model>/qa/<version>`` /
  ``<model>/qa/*`` the QA override (:func:`route_name`, :func:`parse_route_name`).
* **Cohorts** (:class:`Cohort`): named groups sent to the canary by a header or cookie value, before the
  split, on routes ``<model>/cohort/<name>?canary=..`` (:func:`cohort_route_name`) that set
  :data:`COHORT_HEADER`; their observations are labelled with the cohort and are neither arm.
* **Sticky keys**: who is "the same user" (:func:`key_source_header`, :func:`cookie_value_regex`,
  :func:`xff_client_regex`, :func:`extract_key`) and the per-canary salt (:func:`canary_salt`) Envoy
  prepends before hashing, so two canaries' user sets are independent and raising a weight only adds users.
* **Headers** lockgate adds (:data:`REQUEST_ID_HEADER`, the mirror's :data:`SAMPLE_MODEL_HEADER` /
  :data:`SAMPLE_CANARY_HEADER`, the replay's :data:`REPLAY_HEADER`) or strips before a model sees the
  request (:func:`stripped_request_headers`); all start with :data:`RESERVED_HEADER_PREFIX`.
* **What Envoy reports to the ext_proc**: the attribute names (:func:`response_attributes`), the QA
  metadata namespace, and the stream-outcome access log (:data:`ACCESS_LOG_NAME`, :data:`OUTCOME_FLAGS`).
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:  # only for hints: this module reads config objects, never loads them
    from lockgate.config import KeySource, LockgateConfig

# --- weights -----------------------------------------------------------------------------------------

TOTAL_WEIGHT_BP = 10000  #: a model's whole traffic in basis points: weight 1 = 0.01 %, 10000 = 100 %


COHORT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  #: a cohort's name (route names, labels)


@dataclass(frozen=True)
class Cohort:
    """A named group of users sent to the canary whatever the weight: requests whose header ``key``
    (``kind`` ``header``) or cookie ``key`` (``kind`` ``cookie``) has exactly ``value``."""

    name: str
    kind: str   #: "header" | "cookie"
    key: str    #: the header name (lower case) or the cookie name
    value: str

    def __post_init__(self) -> None:
        if not COHORT_NAME_RE.match(self.name):
            raise ValueError(f"cohort name {self.name!r}: lower-case letters, digits, '-' and '_' (max 63)")
        if self.kind not in ("header", "cookie"):
            raise ValueError(f"cohort {self.name!r}: kind must be header or cookie, got {self.kind!r}")
        if not self.key or not self.value:
            raise ValueError(f"cohort {self.name!r}: a {self.kind} name and value are required")
        if self.kind == "header" and self.key.lower().startswith(RESERVED_HEADER_PREFIX):
            raise ValueError(f"cohort {self.name!r}: header {self.key!r} is reserved ({RESERVED_HEADER_PREFIX}*)")

    def describe(self) -> str:
        return f"{self.name} ({self.kind} {self.key}={self.value})"

    def to_list(self) -> list[str]:
        """``[name, kind, key, value]``: how the weight store and the control API carry it."""
        return [self.name, self.kind, self.key, self.value]


MILLION = 1_000_000  #: denominator of :attr:`CanaryWeight.mirror_ppm`


@dataclass(frozen=True)
class CanaryWeight:
    """Desired split of one model: ``weight_bp`` basis points of :data:`TOTAL_WEIGHT_BP` to ``canary``
    (None: no canary, weight 0; the stable version gets the rest).

    ``stage`` labels the rollout stage that asked for this weight ("" when set by hand). ``cohorts``
    are sent to the canary whatever the weight (routes before the split, :func:`cohort_route_name`);
    a rollback (weight 0 by :meth:`WeightService.rollback`) drops them. ``ejected``: endpoints of the
    canary version (``ip:port``) taken out of rotation (per-host gating: its EDS leaves them out);
    a rollback drops them too (the version gets no traffic; its next rollout starts with every host).
    ``mirror_ppm``: the shadow stage — that share (parts per million) of the split's requests is mirrored
    to the canary's shadow cluster (:func:`shadow_cluster_name`; the mirror's response is captured there
    and discarded); a rollback drops it."""

    canary: str | None
    weight_bp: int
    stage: str = ""
    cohorts: tuple[Cohort, ...] = ()
    mirror_ppm: int = 0
    ejected: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.weight_bp <= TOTAL_WEIGHT_BP:
            raise ValueError(f"weight_bp must be 0..{TOTAL_WEIGHT_BP}, got {self.weight_bp}")
        if self.canary is None and self.weight_bp:
            raise ValueError("a weight needs a canary version")
        if self.canary is None and self.cohorts:
            raise ValueError("cohorts need a canary version")
        names = [c.name for c in self.cohorts]
        if len(set(names)) != len(names):
            raise ValueError(f"cohort names must be unique, got {names}")
        if not 0 <= self.mirror_ppm <= MILLION:
            raise ValueError(f"mirror_ppm must be 0..{MILLION}, got {self.mirror_ppm}")
        if self.canary is None and self.mirror_ppm:
            raise ValueError("a shadow mirror needs a canary version")
        if self.canary is None and self.ejected:
            raise ValueError("ejected endpoints need a canary version")


NO_CANARY = CanaryWeight(None, 0)  #: a model without a canary: all traffic to its stable version

# --- cluster and route names -------------------------------------------------------------------------


def cluster_name(model: str, version: str) -> str:
    """Envoy cluster of one model version: ``<model>.<version>`` (model names cannot contain dots)."""
    return f"{model}.{version}"


#: suffix of a canary's shadow cluster (the mirror's target): ``<model>.<version>.shadow``. Version names
#: have no dots, so :func:`parse_cluster_name` never mistakes it for a model version's cluster.
SHADOW_SUFFIX = ".shadow"


def shadow_cluster_name(model: str, version: str) -> str:
    """The shadow stage's cluster of one canary version: the same endpoints as :func:`cluster_name`,
    reached only by the mirror, with the capture filter as an upstream filter (the mirror's response
    passes no downstream filter)."""
    return f"{model}.{version}{SHADOW_SUFFIX}"


#: a shadow observation's request id is the mirrored user request's id with this suffix (the store keeps
#: one row per request id): :func:`paired_request_id` gives the user request's id back
SHADOW_ID_SUFFIX = "/shadow"


def shadow_request_id(request_id: str) -> str:
    return request_id + SHADOW_ID_SUFFIX


def paired_request_id(shadow_id: str) -> str | None:
    """The user request a shadow observation mirrors (None for an id that is not a shadow's)."""
    return shadow_id[:-len(SHADOW_ID_SUFFIX)] if shadow_id.endswith(SHADOW_ID_SUFFIX) else None


def parse_shadow_cluster_name(name: str) -> tuple[str, str] | None:
    """``chat.v2.shadow`` → ``(model, version)``; None for any other cluster."""
    if not name.endswith(SHADOW_SUFFIX):
        return None
    parsed = parse_cluster_name(name[:-len(SHADOW_SUFFIX)])
    return parsed if parsed is not None and "." not in parsed[1] else None


@functools.lru_cache(maxsize=4096)
def parse_cluster_name(name: str) -> tuple[str, str] | None:
    """``chat.v2`` → ``(model, version)``; None for clusters that are not lockgate model versions."""
    model, sep, version = name.partition(".")
    return (model, version) if sep and model and version else None


STICKY_PATH = "sticky"  #: :attr:`RouteInfo.path` of a split route (``key/<i>``, ``key/none``)
QA_PATH = "qa"          #: :attr:`RouteInfo.path` of a QA override route (``qa/<version>``, ``qa/*``)
COHORT_PATH = "cohort"  #: :attr:`RouteInfo.path` of a cohort route (``cohort/<name>``)


@dataclass(frozen=True)
class RouteInfo:
    """What a route name tells about the request it routed."""

    model: str
    path: str          #: :data:`STICKY_PATH`, :data:`QA_PATH` or :data:`COHORT_PATH`
    canary: str | None  #: the canary of the split at routing time (None: no canary, or a QA route)
    weight_bp: int     #: the canary's weight at routing time, basis points of :data:`TOTAL_WEIGHT_BP`
    stage: str         #: the rollout stage that set the weight ("" when set by hand)
    cohort: str = ""   #: the cohort of a :data:`COHORT_PATH` route ("" otherwise)


def route_name(model: str, path: str, weight: CanaryWeight) -> str:
    """Name of a split route: ``path`` is ``key/<i>`` (sticky key source i) or ``key/none``; the name
    carries the split (``?canary=<v>&w=<bp>&stage=<s>``) so a request's observation records the exact
    weight that routed it, not one polled later."""
    query = urllib.parse.urlencode({"canary": weight.canary or "", "w": weight.weight_bp, "stage": weight.stage})
    return f"{model}/{path}?{query}"


def sticky_route_name(model: str, source_index: int | None, weight: CanaryWeight) -> str:
    """:func:`route_name` of the route of sticky key source ``source_index`` (None: the keyless route)."""
    return route_name(model, "key/none" if source_index is None else f"key/{source_index}", weight)


def cohort_route_name(model: str, cohort: str, weight: CanaryWeight) -> str:
    """:func:`route_name` of the route of cohort ``cohort`` (``<model>/cohort/<name>?canary=..``)."""
    return route_name(model, f"cohort/{cohort}", weight)


def qa_route_name(model: str, version: str | None) -> str:
    """QA override route to ``version``; None: the token-check route ``<model>/qa/*``."""
    return f"{model}/qa/{version if version is not None else '*'}"


@functools.lru_cache(maxsize=4096)
def parse_route_name(name: str) -> RouteInfo | None:
    """Inverse of :func:`route_name` / :func:`qa_route_name`; None for routes that are not lockgate's."""
    base, _, query = name.partition("?")
    model, _, path = base.partition("/")
    if not model or not path:
        return None
    if path.startswith("qa/"):
        return RouteInfo(model, QA_PATH, None, 0, "")
    q = urllib.parse.parse_qs(query)
    try:
        weight_bp = int(q.get("w", ["0"])[0])
    except ValueError:
        return None
    canary, stage = q.get("canary", [""])[0] or None, q.get("stage", [""])[0]
    if path.startswith("cohort/"):
        return RouteInfo(model, COHORT_PATH, canary, weight_bp, stage, path[len("cohort/"):])
    return RouteInfo(model, STICKY_PATH, canary, weight_bp, stage)


# --- headers -----------------------------------------------------------------------------------------

#: Header names lockgate itself uses; a model may not match, key on or replay them.
RESERVED_HEADER_PREFIX = "x-lockgate-"
#: lockgate's id of a request: a fresh UUID Envoy sets on every routed request (overwriting any a client
#: sent, so it cannot be chosen or reused) and returns on the response; observations, feedback, body
#: samples and evaluation samples are keyed by it. The client's own ``x-request-id`` is kept beside it
#: (``Observation.client_request_id``).
REQUEST_ID_HEADER = "x-lockgate-request-id"
SAMPLE_MODEL_HEADER = "x-lockgate-sample-model"    #: set by Envoy on mirrored requests only: the model
SAMPLE_CANARY_HEADER = "x-lockgate-sample-canary"  #: set by Envoy on mirrored requests only: canary at sampling
#: set (``1``) on the controller's out-of-band replays; stripped from client requests by Envoy
REPLAY_HEADER = "x-lockgate-replay"
DEFAULT_QA_TOKEN_HEADER = "x-lockgate-qa-token"  #: ``qa_override.token_header`` when not configured
DEFAULT_QA_VERSION_HEADER = "x-lockgate-version"  #: ``qa_override.version_header`` when not configured
#: set by Envoy on requests a cohort route sent to the canary: the cohort's name (a client-sent one is
#: removed on every other route and overwritten on cohort routes; observations take the cohort from the
#: route name, never from this header)
SHADOW_STAGE_HEADER = "x-lockgate-shadow-stage"  #: set by Envoy on the shadow stage's mirror only: its stage
COHORT_HEADER = "x-lockgate-cohort"
FORWARDED_FOR_HEADER = "x-forwarded-for"  #: Envoy appends the peer address (``use_remote_address``)
COOKIE_HEADER = "cookie"


def stripped_request_headers(qa_token_header: str | None = None, qa_version_header: str | None = None) -> list[str]:
    """Request headers Envoy removes before a model sees the request: the QA override's two headers
    (when configured) and :data:`REPLAY_HEADER` (only the controller's replays, which bypass the
    listener's routes, carry it)."""
    return [h for h in (qa_token_header, qa_version_header) if h] + [REPLAY_HEADER]


# --- what Envoy reports to the ext_proc ----------------------------------------------------------------

#: the ext_proc HTTP filter's name: also the namespace of the attributes it sends
EXTPROC_FILTER = "envoy.filters.http.ext_proc"
#: dynamic metadata namespace the ext_proc writes when a request's QA token is right: ``{version: <v>}``
QA_METADATA_NS = "lockgate.qa"
QA_METADATA_KEY = "version"  #: the key under :data:`QA_METADATA_NS`
ATTR_CLUSTER = "xds.cluster_name"  #: the cluster that served the request (:func:`parse_cluster_name`)
ATTR_ROUTE = "xds.route_name"      #: the route that routed it (:func:`parse_route_name`)
ATTR_CLIENT_REQUEST_ID = "request.id"  #: the client's x-request-id (Envoy's, if none)
ATTR_REQUEST_TIME = "request.time"  #: request start, RFC 3339 UTC
ATTR_REQUEST_SIZE = "request.size"  #: request body bytes
ATTR_UPSTREAM_ADDRESS = "upstream.address"
ATTR_CODE_DETAILS = "response.code_details"


def request_header_attribute(name: str) -> str:
    """Envoy attribute of request header ``name`` (lower case)."""
    return f"request.headers['{name}']"


ATTR_REQUEST_ID = request_header_attribute(REQUEST_ID_HEADER)  #: lockgate's id (:data:`REQUEST_ID_HEADER`)


def key_source_header(source: KeySource) -> str:
    """The request header a sticky key source reads: the named header, ``cookie``, or ``x-forwarded-for``."""
    return {"header": source.name, "cookie": COOKIE_HEADER}.get(source.kind, FORWARDED_FOR_HEADER)


def key_headers(config: LockgateConfig) -> list[str]:
    """Request headers the sticky-key policy of any model reads, in first-seen order, no duplicates."""
    names: list[str] = []
    for model in config.models:
        for source in model.sticky_keys:
            name = key_source_header(source)
            if name not in names:
                names.append(name)
    return names


def response_attributes(header_names: Iterable[str]) -> list[str]:
    """Attributes Envoy attaches to the response-headers message it sends lockgate's ext_proc: who
    served the request (cluster, route), its ids, start time, size, upstream host, details, and the
    request headers ``header_names`` (those the sticky-key policy reads: hashed into the observation,
    never stored raw)."""
    return [ATTR_CLUSTER, ATTR_ROUTE, ATTR_CLIENT_REQUEST_ID, ATTR_REQUEST_ID, ATTR_REQUEST_TIME,
            ATTR_REQUEST_SIZE, ATTR_UPSTREAM_ADDRESS, ATTR_CODE_DETAILS] + \
        [request_header_attribute(h) for h in header_names]


#: gRPC access log name of the stream-outcome log (Envoy → ext_proc; see ``extproc/outcomes.py``)
ACCESS_LOG_NAME = "lockgate_stream_outcomes"
#: Envoy response flag (ResponseFlags field, short name) → error_kind. Order matters: the first that is
#: set wins, upstream causes before downstream ones (a stream the upstream cut may also see the client go).
OUTCOME_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("upstream_remote_reset", "UR", "upstream_reset"),
    ("upstream_connection_termination", "UC", "upstream_reset"),
    ("upstream_protocol_error", "UPE", "upstream_reset"),
    ("upstream_request_timeout", "UT", "upstream_timeout"),
    ("upstream_max_stream_duration_reached", "UMSDR", "upstream_timeout"),
    ("stream_idle_timeout", "SI", "upstream_timeout"),
    ("downstream_connection_termination", "DC", "client_reset"),
    ("downstream_remote_reset", "DR", "client_reset"),
    ("downstream_protocol_error", "DPE", "client_reset"),
)
#: the flags the access log filter passes (Envoy's short names)
LOGGED_FLAGS = tuple(short for _, short, _ in OUTCOME_FLAGS)

# --- sticky keys ---------------------------------------------------------------------------------------


def canary_salt(model: str, canary_version: str) -> str:
    """The per-canary salt Envoy prepends (``<salt>|<key>``) to every sticky key before hashing: each
    canary (model + canary version, or the stable version when there is none) splits users independently."""
    return f"lockgate:{model}:{canary_version}"


def cookie_value_regex(name: str) -> str:
    """Full match of a ``cookie`` header that contains ``NAME=VALUE``; group 1 is VALUE (RE2 and Python)."""
    return r"^(?:.*;\s*)?" + re.escape(name) + r"=([^;]+).*$"


def cookie_match_regex(name: str, value: str) -> str:
    """Full match of a ``cookie`` header that holds the cookie ``NAME=VALUE`` exactly (RE2 and Python)."""
    return r"^(?:.*;\s*)?" + re.escape(name) + "=" + re.escape(value) + r"(?:;.*)?$"


def xff_client_regex(trusted_hops: int) -> str:
    """Full match of ``x-forwarded-for``; group 1 is the address ``trusted_hops`` entries from the right
    (0: the peer Envoy appended). RE2 and Python."""
    skip = r"(?:\s*,\s*[^,]*)" + (f"{{{trusted_hops}}}" if trusted_hops else "{0}")
    return r"^(?:.*,)?\s*([^,\s]+)" + skip + r"\s*$"


_COOKIE_SPLIT = re.compile(r";\s*")


def extract_key(source_list: Iterable[KeySource], headers: Mapping[str, str]) -> tuple[str, str] | None:
    """The sticky key Envoy used for a request: ``(source description, raw key)``, or None — the first
    source present, in the configured order (as Envoy's routes match).

    ``headers`` are the request headers, lower-case names (``x-forwarded-for`` as Envoy forwarded it).
    """
    for source in source_list:
        if source.kind == "header":
            value = headers.get(source.name)
            if value is not None:
                return source.describe(), value
        elif source.kind == "cookie":
            cookie = headers.get(COOKIE_HEADER)
            if cookie:
                for part in _COOKIE_SPLIT.split(cookie):
                    name, _, value = part.partition("=")
                    if name == source.name and value:
                        return source.describe(), value
        else:
            xff = headers.get(FORWARDED_FOR_HEADER)
            if xff:
                m = re.match(xff_client_regex(source.trusted_hops), xff)
                if m:
                    return source.describe(), m.group(1)
    return None
