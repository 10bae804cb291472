"""Per-response capture: from Envoy's ext_proc messages to one :class:`Observation`.

Pure apart from the clock values passed in. ``ResponseCapture.start`` reads the response-headers
message (Envoy's attributes say which cluster and route served the request, its id, status, start
time, upstream host and the request headers lockgate keys on); body chunks are fed to the
model's analyzer as they stream past; ``finish`` builds the observation. Nothing here mutates a
request or response: the ext_proc server always answers "continue unchanged".

Opt-in body retention (``capture.retain_bodies``): :class:`BodySampler` decides once, at response
headers, from a hash of the request id; a sampled response is a :class:`SampledCapture`, which also
appends the raw body bytes (up to ``max_bytes``) to a bytearray. Unsampled responses are plain
:class:`ResponseCapture` objects: their per-chunk path is unchanged.
"""

from __future__ import annotations

import calendar
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from lockgate.config import LockgateConfig, Model, RetainBodies
from lockgate.extproc.analyzers import AnalyzerConfig, BodyAnalyzer, make_analyzer
from lockgate.extproc.keys import hash_key
from lockgate.proto.v1 import observations_pb2 as obs_pb2
from lockgate.refusal import DEFAULT_REFUSAL_PATTERNS
from lockgate.routing import (ATTR_CLIENT_REQUEST_ID, ATTR_CLUSTER, ATTR_CODE_DETAILS, ATTR_REQUEST_ID,
                              ATTR_REQUEST_SIZE, ATTR_REQUEST_TIME, ATTR_ROUTE, ATTR_UPSTREAM_ADDRESS,
                              EXTPROC_FILTER, REQUEST_ID_HEADER, SHADOW_STAGE_HEADER, STICKY_PATH, COHORT_PATH, extract_key, parse_cluster_name,
                              parse_route_name, parse_shadow_cluster_name, request_header_attribute, shadow_request_id)

SHADOW_ROUTE = "shadow"  #: :attr:`Attribution.route` of a shadow-stage mirror's response

ATTR_NS = EXTPROC_FILTER  #: the namespace of the attributes Envoy sends (the filter's name)


def mint_request_id() -> str:
    """A request id when Envoy did not set :data:`REQUEST_ID_HEADER` (an Envoy config without lockgate's
    routes): random, so still never a client's choice (the client cannot learn it; its feedback then
    goes by ``client_request_id``)."""
    return "lg-" + os.urandom(16).hex()


def analyzer_config(config: LockgateConfig) -> AnalyzerConfig:
    cap = config.capture
    base = DEFAULT_REFUSAL_PATTERNS if cap.refusal_patterns is None else cap.refusal_patterns
    return AnalyzerConfig(max_body_bytes=cap.max_body_bytes, refusal_patterns=tuple(base) + cap.extra_refusal_patterns)


class BodySampler:
    """Which responses keep a body sample: ``roles`` only, and a request id whose 64-bit blake2b hash
    is below ``sample_rate`` × 2⁶⁴ — deterministic (every ext_proc process and every retry of the same
    request id decides alike), uniform, and computed only for responses of a sampled role."""

    __slots__ = ("roles", "threshold", "max_bytes")

    def __init__(self, rb: RetainBodies):
        self.roles = frozenset(rb.roles)
        self.threshold = int(rb.sample_rate * (1 << 64))  # 1.0 → 2⁶⁴: above every hash
        self.max_bytes = rb.max_bytes

    def sampled(self, request_id: str) -> bool:
        if not request_id:
            return False
        h = hashlib.blake2b(request_id.encode("utf-8", "surrogateescape"), digest_size=8, person=b"lg-body")
        return int.from_bytes(h.digest(), "big") < self.threshold


def body_sampler(config: LockgateConfig) -> BodySampler | None:
    """None when ``capture.retain_bodies`` is off (or its rate is 0): then nothing is even hashed."""
    rb = config.capture.retain_bodies
    return BodySampler(rb) if rb is not None and rb.sample_rate > 0 else None


def _str(fields, key: str) -> str:
    v = fields.get(key)
    return v.string_value if v is not None and v.WhichOneof("kind") == "string_value" else ""


def _epoch(value: struct_pb2.Value | None) -> float | None:
    """``request.time`` arrives as an RFC 3339 string (``2026-11-27T11:02:03.123456+00:00``); epoch seconds.

    Envoy's fixed UTC layout is parsed by hand (≈20x faster than ``Timestamp.FromJsonString``, which
    goes through strptime); anything else falls back to the protobuf parser."""
    if value is None:
        return None
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind != "string_value":
        return None
    s = value.string_value
    # Envoy 1.40 writes UTC as "+00:00" (e.g. 2026-11-27T13:08:42.827874+00:00); "Z" is accepted too.
    zone = 1 if s.endswith("Z") else 6 if s.endswith("+00:00") else 0
    if zone and len(s) >= 19 + zone and s[4] == "-" and s[10] == "T" and s[13] == ":" and s[16] == ":":
        try:
            secs = calendar.timegm((int(s[0:4]), int(s[5:7]), int(s[8:10]), int(s[11:13]), int(s[14:16]),
                                    int(s[17:19])))
            frac = s[19:-zone]
            return secs + (float("0" + frac) if frac else 0.0)
        except ValueError:
            pass
    ts = timestamp_pb2.Timestamp()
    try:
        ts.FromJsonString(s)
    except ValueError:
        return None
    return ts.seconds + ts.nanos / 1e9


@dataclass
class Attribution:
    """Who served a request, from Envoy's own routing (never re-computed)."""

    model: Model
    version: str
    role: str           #: "baseline" | "canary" | "shadow" | "other"
    route: str          #: "sticky" | "qa" | "cohort" | "shadow"
    weight_bp: int
    stage: str
    cohort: str = ""    #: the cohort of a cohort route (its requests are role "other": neither arm)


def attribute(config_models: dict[str, Model], cluster_name: str, route_name: str) -> Attribution | None:
    shadow = parse_shadow_cluster_name(cluster_name)
    if shadow is not None:
        # the shadow stage's mirror (captured by the shadow cluster's upstream filter): the canary's
        # answer to a baseline user's request, which no user saw; paired with it by request id
        if shadow[0] not in config_models:
            return None
        info = parse_route_name(route_name)
        return Attribution(config_models[shadow[0]], shadow[1], "shadow", SHADOW_ROUTE,
                           info.weight_bp if info else 0, info.stage if info else "")
    parsed = parse_cluster_name(cluster_name)
    if parsed is None or parsed[0] not in config_models:
        return None
    model = config_models[parsed[0]]
    version = parsed[1]
    info = parse_route_name(route_name)
    canary = info.canary if info else None
    if info is not None and info.path == COHORT_PATH:
        role = "other"  # a cohort is chosen, not a random sample: never either arm of the gates' comparison
    elif version == model.stable:
        role = "baseline"
    elif version == canary:
        role = "canary"
    else:
        role = "other"  # e.g. a QA-forced version that is not the current canary
    return Attribution(model, version, role, info.path if info else STICKY_PATH, info.weight_bp if info else 0,
                       info.stage if info else "", info.cohort if info else "")


class ResponseCapture:
    """State of one response between its headers and its last body chunk."""

    __slots__ = ("obs", "analyzer", "start_ts")

    def __init__(self, obs: obs_pb2.Observation, analyzer: BodyAnalyzer, start_ts: float | None):
        self.obs = obs
        self.analyzer = analyzer
        self.start_ts = start_ts

    @classmethod
    def start(cls, headers_msg, attrs: struct_pb2.Struct | None, now: float, models: dict[str, Model],
              analyzer_cfg: AnalyzerConfig, key_secret: bytes, header_names: list[str],
              sampler: BodySampler | None = None) -> "ResponseCapture | None":
        """None when the response is not a lockgate model's (then nothing is captured)."""
        if attrs is None:
            return None
        fields = attrs.fields
        who = attribute(models, _str(fields, ATTR_CLUSTER), _str(fields, ATTR_ROUTE))
        if who is None:
            return None
        status = 0
        content_type = content_encoding = None
        for h in headers_msg.headers.headers:
            key = h.key
            if key == ":status":
                status = int(h.raw_value or b"0")
            elif key == "content-type":
                content_type = h.raw_value.decode("latin-1")
            elif key == "content-encoding":
                content_encoding = h.raw_value.decode("latin-1")
        start_ts = _epoch(fields.get(ATTR_REQUEST_TIME))
        req_headers = {}
        for name in header_names:
            v = _str(fields, request_header_attribute(name))
            if v:
                req_headers[name] = v
        key = extract_key(who.model.sticky_keys, req_headers)
        obs = obs_pb2.Observation(
            request_id=_str(fields, ATTR_REQUEST_ID) or mint_request_id(),
            client_request_id=_str(fields, ATTR_CLIENT_REQUEST_ID),
            ts=now, model=who.model.name, version=who.version, role=who.role,
            weight_bp=who.weight_bp, stage=who.stage, route=who.route, cohort=who.cohort,
            upstream_host=_str(fields, ATTR_UPSTREAM_ADDRESS), status_code=status,
            user_key=hash_key(key[1], key_secret) if key else "",
            timeout=_str(fields, ATTR_CODE_DETAILS) == "upstream_response_timeout")
        if who.role == "shadow":  # its own row, paired with the user's by the id (routing.paired_request_id)
            obs.request_id = shadow_request_id(obs.request_id)
            obs.stage = _str(fields, request_header_attribute(SHADOW_STAGE_HEADER))
        if start_ts is not None:
            obs.ttfb_ms = max(0.0, (now - start_ts) * 1000)
        size = fields.get(ATTR_REQUEST_SIZE)
        if size is not None and size.WhichOneof("kind") == "number_value" and size.number_value >= 0:
            obs.request_bytes = int(size.number_value)
        analyzer = make_analyzer(who.model.analyzer, content_type, content_encoding, analyzer_cfg)
        if sampler is not None and who.role in sampler.roles and sampler.sampled(obs.request_id):
            obs.body_sample_content_type = content_type or ""
            obs.body_sample_content_encoding = content_encoding or ""
            return SampledCapture(obs, analyzer, start_ts, sampler.max_bytes)
        return cls(obs, analyzer, start_ts)

    def feed(self, chunk: bytes) -> None:
        self.analyzer.feed(chunk)

    def finish(self, now: float, end_of_stream: bool) -> obs_pb2.Observation:
        obs = self.obs
        if self.start_ts is not None:
            obs.duration_ms = max(0.0, (now - self.start_ts) * 1000)
        a = self.analyzer.finish(end_of_stream)
        obs.response_bytes = a.body_bytes
        obs.analyzer = a.analyzer
        obs.truncated = a.truncated
        obs.parse_error = a.parse_error or ""
        _set(obs, "output_tokens", a.output_tokens)
        obs.output_tokens_estimated = a.output_tokens_estimated
        _set(obs, "output_chars", a.output_chars)
        obs.finish_reason = a.finish_reason or ""
        if a.refusal is not None:
            obs.refusal = a.refusal
        _set(obs, "entropy", a.entropy)
        obs.predicted_class = a.predicted_class or ""
        _set(obs, "confidence", a.confidence)
        _set(obs, "class_entropy", a.class_entropy)
        _set(obs, "events", a.events)
        return obs


class SampledCapture(ResponseCapture):
    """A sampled response: also keeps its first ``max_bytes`` raw body bytes (as Envoy passed them,
    still compressed if the upstream compressed them) for ``Observation.body_sample``."""

    __slots__ = ("sample", "sample_max", "sample_truncated")

    def __init__(self, obs: obs_pb2.Observation, analyzer: BodyAnalyzer, start_ts: float | None, max_bytes: int):
        super().__init__(obs, analyzer, start_ts)
        self.sample = bytearray()
        self.sample_max = max_bytes
        self.sample_truncated = False

    def feed(self, chunk: bytes) -> None:
        self.analyzer.feed(chunk)
        room = self.sample_max - len(self.sample)
        if len(chunk) <= room:
            self.sample += chunk
        else:
            if room > 0:
                self.sample += chunk[:room]
            self.sample_truncated = True

    def finish(self, now: float, end_of_stream: bool) -> obs_pb2.Observation:
        obs = super().finish(now, end_of_stream)
        obs.body_sample = bytes(self.sample)
        obs.body_sample_truncated = self.sample_truncated
        return obs


def _set(obs: obs_pb2.Observation, name: str, value: Any) -> None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return
    setattr(obs, name, value)
