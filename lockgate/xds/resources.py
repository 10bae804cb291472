"""Pure construction of the Envoy resources lockgate serves (listener, routes, clusters, endpoints).

``build_resources(config, weights)`` is a function of the fleet config and the desired canary
weights only; the ADS server streams what it returns. The names, headers, weights and the sticky-key
policy it renders are the routing contract, :mod:`lockgate.routing`:

* listener ``lockgate``; route configuration ``lockgate``;
* one EDS cluster per model version, ``<model>.<version>`` (:func:`lockgate.routing.cluster_name`);
* route names ``<model>/qa/<version>`` and ``<model>/qa/*`` (QA override, see :func:`qa_routes`),
  ``<model>/cohort/<name>?canary=<v>&w=<bp>&stage=<s>`` (cohorts, :func:`cohort_routes`) and
  ``<model>/key/<i>?canary=<v>&w=<bp>&stage=<s>`` (sticky key source i, with the split it carries),
  so the ext_proc server learns from ``xds.route_name`` which model, path, canary weight and stage
  routed each request — exactly, not from a poll (see :func:`lockgate.routing.parse_route_name`).

Every model's split lists the canary first with the total fixed at :data:`lockgate.routing.TOTAL_WEIGHT_BP`.
"""

from __future__ import annotations

from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from envoy.config.accesslog.v3 import accesslog_pb2 as alc
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as als_cfg
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from envoy.type.v3 import percent_pb2

from lockgate.config import LockgateConfig, Model
from lockgate.routing import (ACCESS_LOG_NAME, COHORT_HEADER, COOKIE_HEADER, EXTPROC_FILTER, LOGGED_FLAGS,
                              SHADOW_STAGE_HEADER, request_header_attribute,
                              NO_CANARY, QA_METADATA_KEY,
                              QA_METADATA_NS, REQUEST_ID_HEADER, SAMPLE_CANARY_HEADER, SAMPLE_MODEL_HEADER,
                              TOTAL_WEIGHT_BP, CanaryWeight, canary_salt, cohort_route_name, cookie_match_regex,
                              key_headers, qa_route_name,
                              response_attributes, shadow_cluster_name, sticky_route_name, stripped_request_headers)
from lockgate.xds.sticky import hash_policy, route_header_matcher

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
#: Order in which a new snapshot must reach Envoy: clusters before routes that use them.
TYPE_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)
WILDCARD_TYPES = frozenset({CLUSTER_TYPE, LISTENER_TYPE})

LISTENER_NAME = "lockgate"
ROUTE_CONFIG_NAME = "lockgate"
EXTPROC_CLUSTER = "lockgate_extproc"  # static cluster in the bootstrap (see envoy/bootstrap.yaml.tmpl)
SAMPLER_CLUSTER = "lockgate_sampler"
#: the QA override's token check filter (an ext_proc filter of its own, see :func:`qa_check_filter`); the
#: capture filter keeps the name :data:`lockgate.routing.EXTPROC_FILTER` (its attributes' namespace)
QA_CHECK_FILTER = "lockgate.qa_check"
SAMPLER_CLUSTER_ = None  # static cluster: the controller's sampler (docs/evaluation.md)


def _any(msg: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def processing_mode() -> processing_mode_pb2.ProcessingMode:
    """What Envoy sends lockgate's capture filter: response headers and STREAMED body chunks (each chunk
    passes on as soon as it is sent, and, in ``inline`` mode, answered; SSE is never held back)."""
    mode = processing_mode_pb2.ProcessingMode
    return mode(request_header_mode=mode.SKIP, response_header_mode=mode.SEND, request_body_mode=mode.NONE,
                response_body_mode=mode.STREAMED, request_trailer_mode=mode.SKIP, response_trailer_mode=mode.SKIP)


def qa_check_mode() -> processing_mode_pb2.ProcessingMode:
    """What the QA check filter sends on the ``<model>/qa/*`` route: the request headers, nothing else."""
    mode = processing_mode_pb2.ProcessingMode
    return mode(request_header_mode=mode.SEND, response_header_mode=mode.SKIP, request_body_mode=mode.NONE,
                response_body_mode=mode.NONE, request_trailer_mode=mode.SKIP, response_trailer_mode=mode.SKIP)


def access_log(cluster_name: str) -> alc.AccessLog:
    """The HCM access log that reports cut streams to lockgate's ext_proc cluster
    (``lockgate/extproc/outcomes.py`` receives it): gRPC, unbuffered (``buffer_size_bytes: 0``; it only
    carries the rare flagged streams), for a status in 100–499 with one of
    :data:`lockgate.routing.LOGGED_FLAGS`."""
    def status(op, value: int) -> alc.AccessLogFilter:
        return alc.AccessLogFilter(status_code_filter=alc.StatusCodeFilter(comparison=alc.ComparisonFilter(
            op=op, value=base_pb2.RuntimeUInt32(default_value=value, runtime_key=f"lockgate.als_status_{value}"))))

    config = als_cfg.HttpGrpcAccessLogConfig(
        common_config=als_cfg.CommonGrpcAccessLogConfig(
            log_name=ACCESS_LOG_NAME,
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster_name)),
            transport_api_version=config_source_pb2.V3,
            buffer_size_bytes=wrappers_pb2.UInt32Value(value=0)),
        additional_request_headers_to_log=[REQUEST_ID_HEADER])
    return alc.AccessLog(
        name="envoy.access_loggers.http_grpc",
        filter=alc.AccessLogFilter(and_filter=alc.AndFilter(filters=[
            alc.AccessLogFilter(response_flag_filter=alc.ResponseFlagFilter(flags=list(LOGGED_FLAGS))),
            status(alc.ComparisonFilter.GE, 100),
            status(alc.ComparisonFilter.LE, 499)])),
        typed_config=_any(config))


def _extproc_service() -> grpc_service_pb2.GrpcService:
    return grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=EXTPROC_CLUSTER))


def capture_filter(config: LockgateConfig) -> ext_proc_pb2.ExternalProcessor:
    """The capture filter (``capture.mode``, docs/observations.md "Capture modes"). ``inline``: Envoy waits
    for each answer up to ``extproc_message_timeout_ms``, then lets the response pass and counts a message
    timeout. ``observability``: Envoy's ``observability_mode`` — messages are sent and never waited for
    (the ext_proc server does not answer them); after the response, the stream stays open up to
    ``capture.deferred_close_ms`` for the server to read it (the server ends it itself at the last message).
    Either way ``failure_mode_allow``: a dead ext_proc never fails a request."""
    cap = config.capture
    ext_proc = ext_proc_pb2.ExternalProcessor(
        grpc_service=_extproc_service(),
        failure_mode_allow=True,
        message_timeout=_duration(config.extproc_message_timeout_ms / 1000),
        processing_mode=processing_mode(),
        response_attributes=response_attributes(key_headers(config)),
        stat_prefix="lockgate")
    if cap.mode == "observability":
        ext_proc.observability_mode = True
        ext_proc.deferred_close_timeout.CopyFrom(_duration(cap.deferred_close_ms / 1000))
    return ext_proc


def qa_check_filter(config: LockgateConfig) -> ext_proc_pb2.ExternalProcessor:
    """The QA override's token check: a second ext_proc filter, off except on ``<model>/qa/*`` routes
    (:func:`qa_routes`), that always waits for its answer (header removal, route-cache clear, metadata) —
    whatever ``capture.mode`` is, since an observability-mode filter cannot mutate a request. Its own
    ``stat_prefix`` keeps its counters apart from capture's (a QA check is not an observation)."""
    ext_proc = ext_proc_pb2.ExternalProcessor(
        grpc_service=_extproc_service(),
        failure_mode_allow=True,  # no answer: the request stays on qa/*, which answers 503
        message_timeout=_duration(config.extproc_message_timeout_ms / 1000),
        processing_mode=qa_check_mode(),
        stat_prefix="lockgate_qa")
    ext_proc.metadata_options.receiving_namespaces.untyped.append(QA_METADATA_NS)
    return ext_proc


def build_listener(config: LockgateConfig) -> listener_pb2.Listener:
    limits = config.limits
    manager = hcm.HttpConnectionManager(
        stat_prefix="lockgate",
        codec_type=hcm.HttpConnectionManager.AUTO,
        # streams cut mid-way (upstream reset or timeout, client gone) are reported to the ext_proc
        # server, which labels their observations (lockgate/extproc/outcomes.py); no other request is logged
        access_log=[access_log(EXTPROC_CLUSTER)],
        rds=hcm.Rds(config_source=_ads(), route_config_name=ROUTE_CONFIG_NAME),
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        # The client's x-request-id is kept (and returned) as it is: lockgate records it as
        # client_request_id. Observations are keyed by REQUEST_ID_HEADER, which the routes set.
        preserve_external_request_id=True,
        always_set_request_id_in_response=True,
        http_filters=[
            *([hcm.HttpFilter(name="envoy.filters.http.buffer", typed_config=_any(buffer_pb2.Buffer(
                max_request_bytes=wrappers_pb2.UInt32Value(value=limits.max_request_body_bytes))))]
              if limits.max_request_body_bytes else []),
            # disabled by default: the qa/* routes enable it (typed_per_filter_config)
            *([hcm.HttpFilter(name=QA_CHECK_FILTER, typed_config=_any(qa_check_filter(config)), disabled=True)]
              if config.qa_override is not None else []),
            hcm.HttpFilter(name=EXTPROC_FILTER, typed_config=_any(capture_filter(config))),
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())),
        ],
        # what one request may cost (lockgate.yaml limits:): Envoy answers 431 / 408 / 413
        max_request_headers_kb=wrappers_pb2.UInt32Value(value=limits.max_request_headers_kb),
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            max_headers_count=wrappers_pb2.UInt32Value(value=limits.max_headers_count)),
        **({"request_headers_timeout": _duration(limits.request_headers_timeout_s)}
           if limits.request_headers_timeout_s else {}))
    return listener_pb2.Listener(
        name=LISTENER_NAME,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address=config.listener.host, port_value=config.listener.port)),
        filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=_any(manager))])])


def build_cluster(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_duration(1.0),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN)


def endpoint_address(ep) -> str:
    """An endpoint as EDS serves it and Envoy reports it (``upstream.address``): ``ip:port``."""
    return f"{'127.0.0.1' if ep.host == 'localhost' else ep.host}:{ep.port}"


#: at most this many mirrored requests in flight per Envoy to one canary's shadow cluster (its circuit
#: breaker): beyond it Envoy drops the mirror before it reaches a host (``upstream_rq_pending_overflow``)
SHADOW_MAX_REQUESTS = 64


def build_shadow_cluster(config: LockgateConfig, name: str, max_requests: int = SHADOW_MAX_REQUESTS) -> cluster_pb2.Cluster:
    """A canary's shadow cluster (:func:`lockgate.routing.shadow_cluster_name`): the canary's endpoints
    (EDS), reached only by the shadow stage's mirror. The mirror's response passes none of the listener's
    filters, so the capture filter runs here as an *upstream* filter (Envoy 1.40 accepts ext_proc in a
    cluster's ``HttpProtocolOptions.http_filters``, before ``upstream_codec``): the ext_proc sees the
    shadow's response with the cluster and route names and the user request's
    ``x-lockgate-request-id`` (the mirror copies the request headers). Bounded: no retries, a circuit
    breaker of ``max_requests`` in flight and no queue (``max_pending_requests`` 1)."""
    from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
    cluster = build_cluster(name)
    capture = capture_filter(config)
    capture.response_attributes.append(request_header_attribute(SHADOW_STAGE_HEADER))
    options = hpo.HttpProtocolOptions(
        explicit_http_config=hpo.HttpProtocolOptions.ExplicitHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions()),
        http_filters=[
            hcm.HttpFilter(name=EXTPROC_FILTER, typed_config=_any(capture)),
            hcm.HttpFilter(name="envoy.filters.http.upstream_codec",
                           typed_config=_any(upstream_codec_pb2.UpstreamCodec()))])
    cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(options)
    cluster.circuit_breakers.thresholds.append(circuit_breaker_pb2.CircuitBreakers.Thresholds(
        max_requests=wrappers_pb2.UInt32Value(value=max_requests),
        max_pending_requests=wrappers_pb2.UInt32Value(value=1),
        max_retries=wrappers_pb2.UInt32Value(value=0)))
    return cluster


def shadow_mirror(model: Model, weight: CanaryWeight) -> list[rc.RouteAction.RequestMirrorPolicy]:
    """The shadow stage: ``weight.mirror_ppm`` of the split's requests mirrored (fire and forget: the
    user's response never waits for it) to the canary's shadow cluster, carrying the stage in
    :data:`SHADOW_STAGE_HEADER` (the route's name is not known to an upstream filter). None without a canary."""
    if weight.mirror_ppm <= 0 or weight.canary is None or weight.canary == model.stable \
            or weight.canary not in model.versions:
        return []
    return [rc.RouteAction.RequestMirrorPolicy(
        cluster=shadow_cluster_name(model.name, weight.canary),
        runtime_fraction=base_pb2.RuntimeFractionalPercent(default_value=percent_pb2.FractionalPercent(
            numerator=weight.mirror_ppm, denominator=percent_pb2.FractionalPercent.MILLION)),
        trace_sampled=wrappers_pb2.BoolValue(value=False),
        request_headers_mutations=[mutation_rules_pb2.HeaderMutation(append=_set_header(SHADOW_STAGE_HEADER, weight.stage))])]


def build_load_assignment(model: Model, version: str, ejected: tuple[str, ...] = ()) -> endpoint_pb2.ClusterLoadAssignment:
    """The version's endpoints, without the ``ejected`` ones (per-host gating: out of rotation; Envoy
    refuses an EDS weight of 0, and a removed endpoint without health checks gets no new request)."""
    endpoints = [
        endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
                address="127.0.0.1" if ep.host == "localhost" else ep.host, port_value=ep.port))))
        for ep in model.versions[version].endpoints if endpoint_address(ep) not in ejected]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=model.cluster_name(version),
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=endpoints)])


def _split(model: Model, weight: CanaryWeight) -> rc.WeightedCluster:
    if weight.canary is None or weight.canary == model.stable:
        clusters = [rc.WeightedCluster.ClusterWeight(name=model.cluster_name(model.stable),
                                                     weight=wrappers_pb2.UInt32Value(value=TOTAL_WEIGHT_BP))]
    else:
        clusters = [
            rc.WeightedCluster.ClusterWeight(name=model.cluster_name(weight.canary),
                                             weight=wrappers_pb2.UInt32Value(value=weight.weight_bp)),
            rc.WeightedCluster.ClusterWeight(name=model.cluster_name(model.stable),
                                             weight=wrappers_pb2.UInt32Value(value=TOTAL_WEIGHT_BP - weight.weight_bp)),
        ]
    return rc.WeightedCluster(clusters=clusters, use_hash_policy=wrappers_pb2.BoolValue(value=True))


def _match(model: Model, extra: list[rc.HeaderMatcher]) -> rc.RouteMatch:
    headers = list(extra)
    if model.match.header_name:
        headers.insert(0, rc.HeaderMatcher(
            name=model.match.header_name,
            string_match=string_pb2.StringMatcher(exact=model.match.header_value or "")))
    return rc.RouteMatch(prefix=model.match.path_prefix, headers=headers)


def mirror_policies(model: Model, weight: CanaryWeight) -> list[rc.RouteAction.RequestMirrorPolicy]:
    """Evaluation sampling: ``evaluation.sample_rate`` of a sticky route's requests are mirrored
    (fire and forget, the response ignored) to the controller's sampler — only while the model has
    a canary, since there is nothing to compare otherwise. The mirror alone carries the model and
    canary in ``x-lockgate-sample-*`` headers (overwriting any a client sent)."""
    ev = model.evaluation
    if ev is None or weight.canary is None or weight.canary == model.stable:
        return []
    numerator = round(ev.sample_rate * 1_000_000)
    if numerator <= 0:
        return []

    def header(name: str, value: str) -> base_pb2.HeaderValueOption:
        return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value),
                                          append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)

    return [rc.RouteAction.RequestMirrorPolicy(
        cluster=SAMPLER_CLUSTER,
        runtime_fraction=base_pb2.RuntimeFractionalPercent(default_value=percent_pb2.FractionalPercent(
            numerator=numerator, denominator=percent_pb2.FractionalPercent.MILLION)),
        trace_sampled=wrappers_pb2.BoolValue(value=False),
        request_headers_mutations=[
            mutation_rules_pb2.HeaderMutation(append=header(SAMPLE_MODEL_HEADER, model.name)),
            mutation_rules_pb2.HeaderMutation(append=header(SAMPLE_CANARY_HEADER, weight.canary)),
        ])]


def qa_routes(config: LockgateConfig, model: Model, timeout: duration_pb2.Duration) -> list[rc.Route]:
    """The QA override (``qa_override``) of one model, without the token in Envoy's config.

    Routes are readable in Envoy's ``/config_dump``, so they never hold the QA token. A request that
    carries both QA headers takes ``<model>/qa/*``, which enables the QA check filter
    (:func:`qa_check_filter`): it sends the request headers to lockgate's ext_proc and waits for the
    answer — only these requests pay that round trip, in either ``capture.mode``. The ext_proc compares
    the token's sha256 in constant time, removes the token header and clears the route cache; on a
    match it first sets dynamic metadata ``lockgate.qa: {version: <version header>}``. Routed again,
    the request takes ``<model>/qa/<version>`` (matched on that metadata, which no client can set) or,
    with a wrong token or an unknown version, the model's normal split. If the ext_proc does not
    answer, ``qa/*`` answers 503: a QA request is never served a version it was not checked for.
    """
    qa = config.qa_override
    assert qa is not None
    out = []
    for version in model.versions:
        match = _match(model, [])
        match.dynamic_metadata.append(metadata_pb2.MetadataMatcher(
            filter=QA_METADATA_NS, path=[metadata_pb2.MetadataMatcher.PathSegment(key=QA_METADATA_KEY)],
            value=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=version))))
        out.append(rc.Route(name=qa_route_name(model.name, version), match=match,
                            route=rc.RouteAction(cluster=model.cluster_name(version), timeout=timeout),
                            request_headers_to_remove=[COHORT_HEADER]))
    check = ext_proc_pb2.ExtProcPerRoute(overrides=ext_proc_pb2.ExtProcOverrides(processing_mode=qa_check_mode()))
    out.append(rc.Route(
        name=qa_route_name(model.name, None),
        match=_match(model, [rc.HeaderMatcher(name=qa.token_header, present_match=True),
                             rc.HeaderMatcher(name=qa.version_header, present_match=True)]),
        direct_response=rc.DirectResponseAction(status=503, body=base_pb2.DataSource(
            inline_string="lockgate: the QA override could not be checked (ext_proc unavailable)\n")),
        typed_per_filter_config={QA_CHECK_FILTER: _any(check)}))
    return out


def cohort_routes(model: Model, weight: CanaryWeight, timeout: duration_pb2.Duration) -> list[rc.Route]:
    """One route per cohort of ``weight`` (in its order), placed after the QA override and before the
    split: a request whose header (or cookie) has the cohort's value goes to the canary's cluster
    whatever the weight and its hash, named ``<model>/cohort/<name>?canary=..`` (the ext_proc labels its
    observation from that name) and carrying :data:`COHORT_HEADER` ``<name>`` (a client-sent one is
    overwritten here and removed on every other route). No evaluation mirror: a cohort's responses are
    not a sample of the model's traffic. None without a canary (a rollback drops the cohorts)."""
    if weight.canary is None or weight.canary == model.stable or weight.canary not in model.versions:
        return []
    out = []
    for cohort in weight.cohorts:
        if cohort.kind == "header":
            cond = rc.HeaderMatcher(name=cohort.key, string_match=string_pb2.StringMatcher(exact=cohort.value))
        else:
            cond = rc.HeaderMatcher(name=COOKIE_HEADER, string_match=string_pb2.StringMatcher(
                safe_regex=regex_pb2.RegexMatcher(regex=cookie_match_regex(cohort.key, cohort.value))))
        out.append(rc.Route(
            name=cohort_route_name(model.name, cohort.name, weight), match=_match(model, [cond]),
            route=rc.RouteAction(cluster=model.cluster_name(weight.canary), timeout=timeout),
            request_headers_to_add=[_set_header(COHORT_HEADER, cohort.name)]))
    return out


def build_routes(config: LockgateConfig, weights: dict[str, CanaryWeight]) -> route_pb2.RouteConfiguration:
    routes: list[rc.Route] = []
    for model in config.models:
        weight = weights.get(model.name, NO_CANARY)
        timeout = _duration(model.timeout_s)
        if config.qa_override is not None:
            routes.extend(qa_routes(config, model, timeout))
        routes.extend(cohort_routes(model, weight, timeout))  # first match wins: cohorts before the split
        salt = canary_salt(model.name, weight.canary or model.stable)
        mirrors = mirror_policies(model, weight) + shadow_mirror(model, weight)
        for i, source in enumerate(model.sticky_keys):
            cond = route_header_matcher(source)
            routes.append(rc.Route(
                name=sticky_route_name(model.name, i, weight),
                match=_match(model, [cond] if cond is not None else []),
                route=rc.RouteAction(weighted_clusters=_split(model, weight), hash_policy=[hash_policy(source, salt)],
                                     timeout=timeout, request_mirror_policies=mirrors),
                request_headers_to_remove=[COHORT_HEADER]))
        if model.sticky_keys[-1].kind != "client_ip":
            # No key at all: still split by weight (random per request), never unrouted.
            routes.append(rc.Route(name=sticky_route_name(model.name, None, weight), match=_match(model, []),
                                   route=rc.RouteAction(weighted_clusters=_split(model, weight), timeout=timeout,
                                                        request_mirror_policies=mirrors),
                                   request_headers_to_remove=[COHORT_HEADER]))
    qa = config.qa_override
    strip = stripped_request_headers(qa.token_header if qa else None, qa.version_header if qa else None)
    vhost = rc.VirtualHost(name="lockgate", domains=["*"], routes=routes, request_headers_to_remove=strip,
                           request_headers_to_add=[_set_header(REQUEST_ID_HEADER, "%UNIQUE_ID%")],
                           response_headers_to_add=[_set_header(REQUEST_ID_HEADER, f"%REQ({REQUEST_ID_HEADER})%")])
    return route_pb2.RouteConfiguration(name=ROUTE_CONFIG_NAME, virtual_hosts=[vhost])


def _set_header(name: str, value: str) -> base_pb2.HeaderValueOption:
    """A header Envoy sets (a client-sent one of that name is overwritten); ``value`` may use Envoy's
    formatter (``%UNIQUE_ID%``: a fresh UUID per request; ``%REQ(h)%``: a request header)."""
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value),
                                      append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)


def build_resources(config: LockgateConfig, weights: dict[str, CanaryWeight]) -> dict[str, dict[str, Message]]:
    """All resources by type URL and name, for the given desired weights."""
    clusters: dict[str, Message] = {}
    endpoints: dict[str, Message] = {}
    for model in config.models:
        for version in model.versions:
            name = model.cluster_name(version)
            clusters[name] = build_cluster(name)
            w = weights.get(model.name)
            out = w.ejected if w is not None and w.canary == version else ()
            endpoints[name] = build_load_assignment(model, version, out)
        weight = weights.get(model.name, NO_CANARY)
        if shadow_mirror(model, weight):
            shadow = shadow_cluster_name(model.name, weight.canary)
            clusters[shadow] = build_shadow_cluster(config, shadow)
            endpoints[shadow] = build_load_assignment(model, weight.canary, weight.ejected)
            endpoints[shadow].cluster_name = shadow
    return {
        CLUSTER_TYPE: clusters,
        ENDPOINT_TYPE: endpoints,
        LISTENER_TYPE: {LISTENER_NAME: build_listener(config)},
        ROUTE_TYPE: {ROUTE_CONFIG_NAME: build_routes(config, weights)},
    }
