"""Rollout metrics read from Prometheus: a ``prometheus:`` block on a metric of the spec.

A metric with a ``prometheus:`` block is not one of the built-in metrics (those read lockgate's own
observations): its values come from PromQL queries, one per arm, against a Prometheus HTTP API. Three
kinds, each fed to the same statistics core as the built-in metrics::

    - name: vllm_error_rate                 # counter: events / total, a rate test
      prometheus:
        kind: counter
        events: 'http_requests_total{version="$version", status="5xx"}'
        total: 'http_requests_total{version="$version"}'
      allowed: {relative: 0.5}
    - name: vllm_slow_share                 # histogram: share of requests above a bucket bound, a rate test
      prometheus:
        kind: histogram
        histogram: 'vllm:e2e_request_latency_seconds{model_name="$model", version="$version"}'
        le: 2.5
      allowed: {absolute: 0.02}
    - name: kv_cache_usage                  # gauge: the mean of its samples over the rollout, a mean test
      prometheus:
        kind: gauge
        query: 'avg(vllm:gpu_cache_usage_perc{version="$version"})'
        step: 15s
      gating: false
      allowed: {absolute: 0.05}

Placeholders: ``$version`` is the arm's version (the canary's in the canary query, the baseline's in the
baseline query), ``$canary`` / ``$baseline`` the two versions, ``$model`` the model (``${version}`` works
too). A query given as one string must contain ``$version`` (else both arms would read the same series);
a query may instead be given per arm, ``{canary: '...$canary...', baseline: '...$baseline...'}``.

Every rule here reports file:line:col through the spec's :class:`~lockgate.yamlconf.ErrorCollector`; the
parser (:mod:`.parsing`) calls :func:`parse_prometheus` for a metric that has the block.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lockgate.controller.decide.spec.catalogue import BUILTIN_METRICS, NAME_RE, MetricDef
from lockgate.yamlconf import ErrorCollector, Fields, PathPart, type_name

if TYPE_CHECKING:  # pragma: no cover
    from lockgate.config import LockgateConfig

PROM_KINDS = ("counter", "histogram", "gauge")
#: the fields of a ``prometheus:`` block (shared with the schema)
PROM_KEYS = ("kind", "events", "total", "histogram", "le", "query", "step", "block", "unit", "url")
#: which query fields each kind takes
KIND_QUERIES = {"counter": ("events", "total"), "histogram": ("histogram",), "gauge": ("query",)}
PLACEHOLDERS = ("version", "canary", "baseline", "model")
DEFAULT_STEP_S = 15.0
DEFAULT_BLOCK_S = 60.0
MAX_QUERY_CHARS = 4000

_PLACEHOLDER_RE = re.compile(r"\$(?:\{(\w*)\}|(\w*))")
#: a plain series selector: a metric name and optional label matchers (what ``histogram:`` takes)
_SELECTOR_RE = re.compile(r"^\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{(.*)\})?\s*$", re.S)
_STEP_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_STEP_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True)
class ArmQuery:
    """A PromQL template per arm (the one-string form has both arms equal, each with ``$version``)."""

    canary: str
    baseline: str

    def render(self, arm: str, *, model: str, canary: str, baseline: str) -> str:
        """The query of ``arm`` (``canary`` or ``baseline``) with its placeholders filled in."""
        version = canary if arm == "canary" else baseline
        values = {"version": version, "canary": canary, "baseline": baseline, "model": model}
        template = self.canary if arm == "canary" else self.baseline
        return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1) or m.group(2)], template)

    def canonical(self) -> dict:
        return {"canary": self.canary, "baseline": self.baseline}


@dataclass(frozen=True)
class PromSource:
    """Where and how a Prometheus-sourced metric is read.

    ``kind``: ``counter`` (``events`` and ``total``: counters; their increase per arm is the event count and
    the request count of a rate test), ``histogram`` (``histogram``: a histogram's series selector; requests
    above the bucket bound ``le`` are the events, the histogram's ``_count`` the requests) or ``gauge``
    (``query``: one series per arm, sampled every ``step_s``; the samples' mean per arm, with samples of one
    ``block_s`` time block treated as correlated). ``url``: this metric's own Prometheus (None: lockgate.yaml's
    ``controller.prometheus.url``). ``endpoint``, ``timeout_s``, ``refresh_s``: resolved from lockgate.yaml
    when the spec was loaded with it — where the controller reads; not part of the spec's hash."""

    kind: str
    events: ArmQuery | None = None
    total: ArmQuery | None = None
    histogram: ArmQuery | None = None
    le: float | None = None
    query: ArmQuery | None = None
    step_s: float = DEFAULT_STEP_S
    block_s: float = DEFAULT_BLOCK_S
    unit: str = ""
    url: str | None = None
    endpoint: str | None = None
    timeout_s: float = 2.0
    refresh_s: float = 5.0

    @property
    def stats_kind(self) -> str:
        """The statistics-core kind: counters and histograms are event counts (``rate``), gauges ``mean``."""
        return "mean" if self.kind == "gauge" else "rate"

    def definition(self, name: str) -> MetricDef:
        """A catalogue entry for the metric (as the built-in metrics have), so the allowance rules apply."""
        what = {"counter": "share of requests counted by the events counter",
                "histogram": f"share of requests above {self.le:g} (histogram bucket le)" if self.le is not None else "",
                "gauge": "mean of the gauge's samples"}[self.kind]
        return MetricDef(name, self.stats_kind, "increase", "", self.unit if self.kind == "gauge" else "",
                         description=f"Prometheus {self.kind}: {what}")

    def canonical(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind}
        for key in KIND_QUERIES[self.kind]:
            out[key] = getattr(self, key).canonical()
        if self.kind == "histogram":
            out["le"] = self.le
        if self.kind == "gauge":
            out.update(step_s=self.step_s, block_s=self.block_s, unit=self.unit)
        if self.url is not None:
            out["url"] = self.url
        return out


def parse_prometheus(f: Fields, name: str | None, errors: ErrorCollector) -> PromSource | None:
    """The ``prometheus:`` block of the metric ``f`` (named ``name``); None (with the problems recorded) when
    it is invalid. Also checks what the block implies for the rest of the metric: a name of its own (not a
    built-in metric's) and no ``class``."""
    path = f.path
    ok = True
    if name is not None:
        if name in BUILTIN_METRICS:
            errors.add(path + ("name",), f"{name!r} is a built-in metric (read from lockgate's own observations); "
                                         "give the Prometheus metric a name of its own")
            ok = False
        elif not NAME_RE.match(name):
            errors.add(path + ("name",), f"a Prometheus metric's name must match {NAME_RE.pattern} (letters, digits, "
                                         f"_ and -), got {name!r}")
            ok = False
    if "class" in f.data:
        errors.add(path + ("class",), "only class_recall and class_precision take a class, not a Prometheus metric")
        f.raw("class")
    raw = f.raw("prometheus")
    if not isinstance(raw, dict):
        errors.add(path + ("prometheus",), f"must be a mapping with kind: {', '.join(PROM_KINDS)} and its queries, "
                                           f"got {type_name(raw)}")
        return None
    pf = Fields(raw, path + ("prometheus",), errors)
    kind = pf.raw("kind", required=True)
    if kind is not None and kind not in PROM_KINDS:
        errors.add(pf.path + ("kind",), f"must be one of {', '.join(PROM_KINDS)}, got {kind!r}")
        kind = None
    if kind is None:
        for key in PROM_KEYS:
            pf.raw(key)
        _finish(pf)
        return None
    wanted = KIND_QUERIES[kind]
    queries: dict[str, ArmQuery | None] = {}
    for key in ("events", "total", "histogram", "query"):
        if key in wanted:
            _null_required(pf, key)
            queries[key] = _arm_query(pf, key, errors, selector=key == "histogram")
            ok = ok and queries[key] is not None
        elif key in pf.data:
            errors.add(pf.path + (key,), f"a {kind} takes {' and '.join(wanted)}, not {key}")
            pf.raw(key)
            ok = False
    le = None
    if kind == "histogram":
        le = _le(pf, errors)
        ok = ok and le is not None
    elif "le" in pf.data:
        errors.add(pf.path + ("le",), f"le is the histogram's bucket bound: only kind histogram takes it, not {kind}")
        pf.raw("le")
        ok = False
    step, block, unit = DEFAULT_STEP_S, DEFAULT_BLOCK_S, ""
    for key in ("step", "block", "unit"):
        if key in pf.data and kind != "gauge":
            errors.add(pf.path + (key,), f"{key} is for gauges (how they are sampled), not a {kind}")
            pf.raw(key)
            ok = False
    if kind == "gauge":
        step = _seconds(pf, "step", DEFAULT_STEP_S, lo=0.01, hi=3600.0)
        block = _seconds(pf, "block", DEFAULT_BLOCK_S, lo=0.01, hi=86400.0)
        unit = pf.str("unit", "") or ""
        if step is None or block is None:
            ok = False
        elif block < step:
            errors.add(pf.path + ("block",), f"must be at least the step ({step:g} s): a block is a run of samples "
                                             "treated as correlated")
            ok = False
    url = _url(pf, errors)
    if "url" in pf.data and url is None:
        ok = False
    _finish(pf)
    if not ok:
        return None
    return PromSource(kind=kind, events=queries.get("events"), total=queries.get("total"),
                      histogram=queries.get("histogram"), le=le, query=queries.get("query"),
                      step_s=step or DEFAULT_STEP_S, block_s=block or DEFAULT_BLOCK_S, unit=unit, url=url)


def _finish(f: Fields) -> None:
    import difflib

    known = sorted(f._seen | set(PROM_KEYS)) if f.path[-1:] == ("prometheus",) else sorted(f._seen)
    for key in [k for k in f.data if k not in f._seen]:
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        f.errors.add(f.path + (key,), f"unknown field ({hint}known: {', '.join(known)})")
    f._seen.update(f.data)


def _null_required(f: Fields, key: str) -> None:
    if key in f.data and f.data[key] is None:
        f.errors.add(f.path + (key,), "is required (it is empty)")


def _template(value: Any, path: tuple[PathPart, ...], errors: ErrorCollector, *, need: tuple[str, ...],
              forbid: tuple[str, ...], selector: bool) -> str | None:
    """One query template: a non-empty string whose placeholders are known, with one of ``need`` and none of
    ``forbid``; a plain series selector when ``selector``."""
    if not isinstance(value, str) or not value.strip():
        errors.add(path, f"must be a PromQL query (a string), got {type_name(value) if not isinstance(value, str) else 'an empty string'}")
        return None
    if len(value) > MAX_QUERY_CHARS:
        errors.add(path, f"at most {MAX_QUERY_CHARS} characters, got {len(value)}")
        return None
    names = [m.group(1) if m.group(1) is not None else m.group(2) for m in _PLACEHOLDER_RE.finditer(value)]
    unknown = sorted({n for n in names if n not in PLACEHOLDERS})
    if unknown:
        shown = ", ".join(f"${n}" if n else "a bare $" for n in unknown)
        errors.add(path, f"unknown placeholder {shown} (known: {', '.join('$' + p for p in PLACEHOLDERS)})")
        return None
    if not any(n in need for n in names):
        errors.add(path, f"needs {' or '.join('$' + n for n in need)}: without it the query does not select the "
                         f"arm (e.g. {{version=\"${need[0]}\"}}), and both arms would read the same series")
        return None
    bad = [n for n in names if n in forbid]
    if bad:
        errors.add(path, f"the {'canary' if 'baseline' in forbid else 'baseline'} query must not select the other "
                         f"arm (${bad[0]})")
        return None
    if selector:
        m = _SELECTOR_RE.match(value)
        if m is None or "(" in value or "[" in value:
            errors.add(path, "must be a histogram's series selector: its name and label matchers, e.g. "
                             "vllm:e2e_request_latency_seconds{version=\"$version\"} (lockgate reads its _bucket "
                             "and _count series); write no function or range")
            return None
        if m.group(1).endswith(("_bucket", "_count", "_sum")):
            errors.add(path, f"name the histogram without its suffix ({m.group(1).rsplit('_', 1)[0]}): lockgate "
                             "reads the _bucket and _count series itself")
            return None
        if m.group(2) and re.search(r"(^|[\s,{])le\s*(=|!=|=~|!~)", m.group(2)):
            errors.add(path, "must not match le itself: the bucket is chosen by prometheus.le")
            return None
    return value


def _arm_query(pf: Fields, key: str, errors: ErrorCollector, *, selector: bool) -> ArmQuery | None:
    raw = pf.raw(key, required=True)
    path = pf.path + (key,)
    if raw is None:
        return None
    if isinstance(raw, dict):
        af = Fields(raw, path, errors)
        c = af.raw("canary", required=True)
        b = af.raw("baseline", required=True)
        for extra in [k for k in raw if k not in ("canary", "baseline")]:
            errors.add(path + (extra,), "unknown field (known: baseline, canary)")
        tc = _template(c, path + ("canary",), errors, need=("canary", "version"), forbid=("baseline",),
                       selector=selector) if c is not None else None
        tb = _template(b, path + ("baseline",), errors, need=("baseline", "version"), forbid=("canary",),
                       selector=selector) if b is not None else None
        if tc is None or tb is None:
            return None
        return ArmQuery(tc, tb)
    t = _template(raw, path, errors, need=("version",), forbid=(), selector=selector)
    return ArmQuery(t, t) if t is not None else None


def _le(pf: Fields, errors: ErrorCollector) -> float | None:
    _null_required(pf, "le")
    raw = pf.raw("le", required=True)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        try:
            value = float(raw) if isinstance(raw, str) else None
        except ValueError:
            value = None
        if value is None:
            errors.add(pf.path + ("le",), f"must be a number, one of the histogram's bucket bounds (e.g. 2.5), got "
                                          f"{type_name(raw)}")
            return None
        raw = value
    x = float(raw)
    if not (x > 0) or x == float("inf"):
        errors.add(pf.path + ("le",), f"must be a finite bucket bound greater than 0 (every request is at or below "
                                      f"+Inf), got {raw!r}")
        return None
    return x


def _seconds(pf: Fields, key: str, default: float, *, lo: float, hi: float) -> float | None:
    raw = pf.raw(key)
    if raw is None:
        return default
    if isinstance(raw, bool):
        x = None
    elif isinstance(raw, (int, float)):
        x = float(raw)
    else:
        m = _STEP_RE.match(str(raw).strip())
        x = float(m.group(1)) * _STEP_UNIT[m.group(2)] if m else None
    if x is None or not (lo <= x <= hi):
        errors = pf.errors
        errors.add(pf.path + (key,), f"must be a duration from {lo:g} s to {hi:g} s (15s, 1m, or seconds), got {raw!r}")
        return None
    return x


def _url(pf: Fields, errors: ErrorCollector) -> str | None:
    raw = pf.raw("url")
    if raw is None:
        return None
    path = pf.path + ("url",)
    if not isinstance(raw, str) or any(ch.isspace() for ch in raw) or len(raw) > 2000:
        errors.add(path, f"must be the http(s) URL of a Prometheus server, got {raw!r}"[:300])
        return None
    try:
        parts = urllib.parse.urlsplit(raw)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        errors.add(path, f"not a valid URL: {exc}")
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        errors.add(path, f"must be an http:// or https:// URL with a host (the Prometheus server, e.g. "
                         f"http://prometheus:9090), got {raw!r}")
        return None
    if parts.query or parts.fragment:
        errors.add(path, "must be the server's base URL, without a query or fragment (lockgate adds /api/v1/query)")
        return None
    return raw.rstrip("/")


def check_against_config(config: "LockgateConfig", metrics_path: tuple[PathPart, ...], metrics: tuple,
                         errors: ErrorCollector) -> None:
    """A Prometheus metric needs a Prometheus: its own ``url`` or lockgate.yaml's ``controller.prometheus``."""
    prom = getattr(config.controller, "prometheus", None)
    for i, m in enumerate(metrics):
        src = getattr(m, "prometheus", None)
        if src is not None and src.url is None and prom is None:
            errors.add(metrics_path + (i, "prometheus"),
                       f"{m.name} reads Prometheus but {config.source} has no controller.prometheus.url (and the "
                       "metric no prometheus.url of its own)")


def resolved(src: PromSource, config: "LockgateConfig | None") -> PromSource:
    """``src`` with the endpoint the controller reads (its own url, else lockgate.yaml's) and the timeouts."""
    from dataclasses import replace

    prom = getattr(config.controller, "prometheus", None) if config is not None else None
    endpoint = src.url or (prom.url if prom is not None else None)
    if prom is None:
        return replace(src, endpoint=endpoint)
    return replace(src, endpoint=endpoint, timeout_s=prom.timeout_s, refresh_s=prom.refresh_s)


__all__ = ["ArmQuery", "DEFAULT_BLOCK_S", "DEFAULT_STEP_S", "KIND_QUERIES", "PLACEHOLDERS", "PROM_KEYS", "PROM_KINDS",
           "PromSource", "check_against_config", "parse_prometheus", "resolved"]
