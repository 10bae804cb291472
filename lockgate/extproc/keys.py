"""The sticky-key policy: who is "the same user", and how Envoy turns that into a version pick.

lockgate never lets a process of its own sit on the routing decision: Envoy computes the split
itself, so traffic stays split and sticky when the ext_proc server is down. This module owns the
policy and renders it in both forms:

* for Envoy (used by the xDS server): one route per key source, in the configured order. A route
  matches when its source is present (header present / cookie present / always for client IP) and
  carries a single ``hash_policy`` over that source with ``weighted_clusters.use_hash_policy``.
  Envoy picks ``hash % 10000`` in list order, the canary listed first with total weight 10000, so
  raising the canary weight only adds users (monotone ramp).
* each canary (model + canary version) has its own salt: the hash policy rewrites the key with
  ``regex_rewrite`` to ``<salt>|<key>`` before hashing, so two canaries' user sets are independent.
  Cookies are read from the ``cookie`` header with a regex (Envoy's cookie hash has no rewrite), the
  client IP from the ``x-forwarded-for`` entry Envoy appends (``use_remote_address``).
* for observations (used by the ext_proc server): :func:`extract_key` finds the same key in request
  headers so observations carry a hashed key (never the raw id) for per-user statistics.
"""

from __future__ import annotations

import hashlib
import re
from typing import Mapping

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from lockgate.config import KeySource


def canary_salt(model: str, canary_version: str) -> str:
    """The per-canary salt prepended to every key before Envoy hashes it."""
    return f"lockgate:{model}:{canary_version}"


def _cookie_value_regex(name: str) -> str:
    # Full match of a cookie header that contains NAME=VALUE; group 1 is VALUE.
    return r"^(?:.*;\s*)?" + re.escape(name) + r"=([^;]+).*$"


def _xff_client_regex(trusted_hops: int) -> str:
    # Group 1 is the address ``trusted_hops`` entries from the right of x-forwarded-for.
    skip = r"(?:\s*,\s*[^,]*)" + (f"{{{trusted_hops}}}" if trusted_hops else "{0}")
    return r"^(?:.*,)?\s*([^,\s]+)" + skip + r"\s*$"


def _regex(pattern: str) -> regex_pb2.RegexMatcher:
    return regex_pb2.RegexMatcher(regex=pattern)


def route_header_matcher(source: KeySource) -> rc.HeaderMatcher | None:
    """The route header condition under which ``source`` yields a key (None: always present)."""
    if source.kind == "header":
        return rc.HeaderMatcher(name=source.name, present_match=True)
    if source.kind == "cookie":
        return rc.HeaderMatcher(
            name="cookie",
            string_match=string_pb2.StringMatcher(safe_regex=_regex(_cookie_value_regex(source.name))))
    return None  # client_ip: Envoy always appends the peer address to x-forwarded-for


def hash_policy(source: KeySource, salt: str) -> rc.RouteAction.HashPolicy:
    """Envoy hash policy hashing ``<salt>|<key of source>``."""
    salt_sub = salt.replace("\\", "\\\\")
    if source.kind == "header":
        header, pattern = source.name, r"^(.*)$"
    elif source.kind == "cookie":
        header, pattern = "cookie", _cookie_value_regex(source.name)
    else:
        header, pattern = "x-forwarded-for", _xff_client_regex(source.trusted_hops)
    return rc.RouteAction.HashPolicy(
        header=rc.RouteAction.HashPolicy.Header(
            header_name=header,
            regex_rewrite=regex_pb2.RegexMatchAndSubstitute(pattern=_regex(pattern),
                                                            substitution=salt_sub + "|\\1")),
        terminal=True)


_COOKIE_SPLIT = re.compile(r";\s*")


def extract_key(source_list: tuple[KeySource, ...], headers: Mapping[str, str]) -> tuple[str, str] | None:
    """The sticky key Envoy used for a request: (source description, raw key), or None.

    ``headers`` are the request headers, lower-case names (``x-forwarded-for`` as Envoy forwarded it).
    """
    for source in source_list:
        if source.kind == "header":
            value = headers.get(source.name)
            if value is not None:
                return source.describe(), value
        elif source.kind == "cookie":
            cookie = headers.get("cookie")
            if cookie:
                for part in _COOKIE_SPLIT.split(cookie):
                    name, _, value = part.partition("=")
                    if name == source.name and value:
                        return source.describe(), value
        else:
            xff = headers.get("x-forwarded-for")
            if xff:
                m = re.match(_xff_client_regex(source.trusted_hops), xff)
                if m:
                    return source.describe(), m.group(1)
    return None


def hash_key(raw_key: str, secret: bytes) -> str:
    """Pseudonymous user id for observations: 16 hex chars of keyed BLAKE2b. Never the raw key."""
    return hashlib.blake2b(raw_key.encode("utf-8", "surrogateescape"), key=secret[:64], digest_size=8).hexdigest()
