"""The sticky-key policy (:mod:`lockgate.routing`) rendered for Envoy: route conditions and hash policies.

lockgate never lets a process of its own sit on the routing decision: Envoy computes the split itself,
so traffic stays split and sticky when the ext_proc server is down. One route per key source, in the
configured order: a route matches when its source is present (header present / cookie present /
always for client IP) and carries a single ``hash_policy`` over that source with
``weighted_clusters.use_hash_policy``. Envoy picks ``hash % TOTAL_WEIGHT_BP`` in list order, the canary
listed first, so raising the canary weight only adds users (monotone ramp). The hash policy rewrites
the key with ``regex_rewrite`` to ``<salt>|<key>`` (:func:`lockgate.routing.canary_salt`) before
hashing. Cookies are read from the ``cookie`` header with a regex (Envoy's cookie hash has no rewrite),
the client IP from the ``x-forwarded-for`` entry Envoy appends (``use_remote_address``). The ext_proc
finds the same key with :func:`lockgate.routing.extract_key`.
"""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from lockgate.config import KeySource
from lockgate.routing import cookie_value_regex, key_source_header, xff_client_regex


def _regex(pattern: str) -> regex_pb2.RegexMatcher:
    return regex_pb2.RegexMatcher(regex=pattern)


def route_header_matcher(source: KeySource) -> rc.HeaderMatcher | None:
    """The route header condition under which ``source`` yields a key (None: always present)."""
    if source.kind == "header":
        return rc.HeaderMatcher(name=source.name, present_match=True)
    if source.kind == "cookie":
        return rc.HeaderMatcher(
            name=key_source_header(source),
            string_match=string_pb2.StringMatcher(safe_regex=_regex(cookie_value_regex(source.name))))
    return None  # client_ip: Envoy always appends the peer address to x-forwarded-for


def hash_policy(source: KeySource, salt: str) -> rc.RouteAction.HashPolicy:
    """Envoy hash policy hashing ``<salt>|<key of source>``."""
    salt_sub = salt.replace("\\", "\\\\")
    if source.kind == "header":
        pattern = r"^(.*)$"
    elif source.kind == "cookie":
        pattern = cookie_value_regex(source.name)
    else:
        pattern = xff_client_regex(source.trusted_hops)
    return rc.RouteAction.HashPolicy(
        header=rc.RouteAction.HashPolicy.Header(
            header_name=key_source_header(source),
            regex_rewrite=regex_pb2.RegexMatchAndSubstitute(pattern=_regex(pattern),
                                                            substitution=salt_sub + "|\\1")),
        terminal=True)
