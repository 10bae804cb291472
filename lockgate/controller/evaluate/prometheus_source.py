"""Reading a rollout metric's numbers from a Prometheus HTTP API (``/api/v1/query``, ``/api/v1/query_range``).

Pure I/O and PromQL, no statistics: :mod:`lockgate.controller.decide.prometheus_evidence` turns what is read
here into the statistics core's input.

**Counters: instant values differenced at the stage boundaries, not ``increase()``.** For a counter (and a
histogram's ``_count`` and ``_bucket{le}`` series, which are counters) lockgate reads ``sum(Q)`` evaluated
*at* each stage boundary and at ``now`` (``/api/v1/query?time=T``) and takes the differences: the requests
and events of each stage, per arm. Prometheus's ``increase(Q[w])`` would be one query, but it extrapolates
the first and last samples to the ends of the window, so it returns fractional counts (e.g. 1030.9 requests
for 1000) that differ from the true ones by up to a scrape interval's worth of traffic at each end; the
rate tests count events, and a verdict should rest on the counts the servers really counted. Reading at
past times needs no state of ours (Prometheus keeps the history), so a restarted controller reads the same
numbers. A counter reset in a window (a server restarted and its counter began again; ``resets()`` says so)
makes the difference meaningless; then that window is summed from the raw samples, each drop counting the
new value (exact: ``increase()`` without its extrapolation), and the verdict says so. A value at ``T`` is the last sample at or before ``T`` within
Prometheus's lookback (5 min by default); a series that did not exist yet at a boundary counts from 0.

**Gauges** are read with ``query_range`` over the rollout (one sample per ``step``).

Every call has a timeout; any failure raises :class:`PrometheusError` with a message fit for a verdict's
reason (the caller holds the gate: no promotion on missing data).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["PrometheusError", "PrometheusReader", "PrometheusUnreachable", "WindowCounts", "counter_expr", "histogram_exprs",
           "le_matcher", "read_counter_windows"]

#: boundary readings older than this (seconds before ``now``) are final: cached, never read again
SETTLED_S = 60.0
_CACHE_MAX = 4096


class PrometheusError(Exception):
    """A query could not be answered (unreachable, timeout, HTTP or PromQL error, unexpected answer)."""


class PrometheusUnreachable(PrometheusError):
    """No answer at all (connection refused, timeout): the reader then fails fast for a while."""


class PrometheusReader:
    """A Prometheus HTTP API at ``url`` (its base URL), each call bounded by ``timeout_s``.

    Caches instant readings at times more than :data:`SETTLED_S` in the past (a stage boundary's counter
    value never changes once Prometheus has scraped past it). Thread-safe."""

    def __init__(self, url: str, timeout_s: float = 2.0):
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        #: after an unreachable/timed-out call, every call fails at once for this long (a Prometheus that does
        #: not answer costs one timeout per round of queries, not one per query)
        self.backoff_s = max(1.0, self.timeout_s)
        self._down: tuple[float, str] | None = None
        self._lock = threading.Lock()
        self._settled: dict[tuple[str, float], list[tuple[dict, float]]] = {}
        self.queries = 0  #: HTTP calls made (for tests and diagnostics)

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        down = self._down
        if down is not None and time.monotonic() < down[0]:
            raise PrometheusUnreachable(down[1])
        try:
            return self._call(path, params)
        except PrometheusUnreachable as exc:
            self._down = (time.monotonic() + self.backoff_s, f"{exc} (not asked again for {self.backoff_s:g} s)")
            raise

    def _call(self, path: str, params: dict[str, Any]) -> Any:
        url = f"{self.url}/api/v1/{path}?" + urllib.parse.urlencode(params)
        self.queries += 1
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as r:
                body = r.read(64 << 20)
        except urllib.error.HTTPError as exc:
            detail = ""
            try:
                detail = json.loads(exc.read(1 << 16)).get("error", "")
            except (ValueError, OSError, AttributeError):
                pass
            raise PrometheusError(f"Prometheus at {self.url} answered HTTP {exc.code}"
                                  + (f": {detail}" if detail else "")) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PrometheusUnreachable(f"Prometheus at {self.url} unreachable: {reason}") from None
        try:
            doc = json.loads(body)
        except ValueError:
            raise PrometheusError(f"Prometheus at {self.url} answered something other than JSON") from None
        if not isinstance(doc, dict) or doc.get("status") != "success" or not isinstance(doc.get("data"), dict):
            err = doc.get("error") if isinstance(doc, dict) else None
            raise PrometheusError(f"Prometheus at {self.url} refused the query: {err or 'unexpected answer'}")
        return doc["data"]

    def instant(self, expr: str, at: float, *, now: float | None = None) -> list[tuple[dict, float]]:
        """``expr`` evaluated at ``at`` (epoch s): ``[(labels, value)]``, one per series (empty: no series)."""
        key = (expr, round(at, 3))
        if now is not None and now - at > SETTLED_S:
            with self._lock:
                hit = self._settled.get(key)
            if hit is not None:
                return hit
        data = self._get("query", {"query": expr, "time": f"{at:.3f}", "timeout": f"{self.timeout_s:g}s"})
        if data.get("resultType") == "scalar":
            out = [({}, _value(data.get("result")))]
        elif data.get("resultType") == "vector":
            out = [(dict(s.get("metric") or {}), _value(s.get("value"))) for s in data.get("result") or []]
        else:
            raise PrometheusError(f"query {expr!r} returned a {data.get('resultType')}, not an instant vector")
        if now is not None and now - at > SETTLED_S:
            with self._lock:
                if len(self._settled) >= _CACHE_MAX:
                    self._settled.clear()
                self._settled[key] = out
        return out

    def scalar(self, expr: str, at: float, *, now: float | None = None) -> float | None:
        """``expr`` at ``at`` as one number; None when it has no series. Raises when it has several."""
        result = self.instant(expr, at, now=now)
        if not result:
            return None
        if len(result) > 1:
            shown = ", ".join(_labels(m) for m, _ in result[:3])
            raise PrometheusError(f"query {expr!r} returned {len(result)} series ({shown}, ...), not one: aggregate "
                                  "it (sum(...) or avg(...))")
        return result[0][1]

    def range(self, expr: str, start: float, end: float, step: float) -> list[tuple[dict, list[tuple[float, float]]]]:
        """``expr`` sampled every ``step`` s from ``start`` to ``end``: ``[(labels, [(t, value)])]``."""
        step = max(float(step), 0.001)
        if end - start > step * 11000:  # Prometheus refuses more than 11,000 points per series
            start = end - step * 11000
        data = self._get("query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                         "step": f"{step:g}", "timeout": f"{self.timeout_s:g}s"})
        if data.get("resultType") != "matrix":
            raise PrometheusError(f"query {expr!r} returned a {data.get('resultType')}, not a range of samples")
        return [(dict(s.get("metric") or {}), [(float(t), _value([t, v])) for t, v in s.get("values") or []])
                for s in data.get("result") or []]


def _value(pair: Any) -> float:
    try:
        return float(pair[1])
    except (TypeError, ValueError, IndexError):
        raise PrometheusError(f"unexpected sample {pair!r}") from None


def _labels(m: dict) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(m.items())) + "}"


# ----------------------------------------------------------------------------------- PromQL


def counter_expr(query: str) -> str:
    """A counter query summed over its series (replicas, label values): one number per arm."""
    return f"sum({query})"


def le_matcher(le: float) -> str:
    """A label matcher for the bucket bound ``le``: clients spell it differently (Python ``2.0``, Go ``2``),
    so every spelling of the number is matched."""
    spellings = {repr(float(le)), f"{le:g}", _plain(le)}
    if float(le).is_integer():
        spellings |= {str(int(le)), f"{int(le)}.0"}
    return 'le=~"' + "|".join(re.escape(s).replace("\\", "\\\\") for s in sorted(spellings)) + '"'


def _plain(x: float) -> str:
    s = f"{x:.15f}".rstrip("0").rstrip(".")
    return s or "0"


def histogram_exprs(selector: str, le: float) -> tuple[str, str]:
    """``(count, bucket)`` queries for a histogram's series selector ``name{matchers}``: all requests and
    those at or below ``le``."""
    m = re.match(r"^\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{(.*)\})?\s*$", selector, re.S)
    if m is None:
        raise ValueError(f"not a series selector: {selector!r}")
    name, matchers = m.group(1), (m.group(2) or "").strip().rstrip(",")
    bucket_matchers = f"{matchers}, {le_matcher(le)}" if matchers else le_matcher(le)
    count = f"sum({name}_count{{{matchers}}})" if matchers else f"sum({name}_count)"
    return count, f"sum({name}_bucket{{{bucket_matchers}}})"


# ----------------------------------------------------------------------------------- counters per window


@dataclass(frozen=True)
class WindowCounts:
    """A counter's increase in each window ``[bounds[i], bounds[i+1]]``; ``notes``: how windows were read
    when not by plain differences (a counter reset)."""

    counts: tuple[float, ...]
    notes: tuple[str, ...] = ()


_PLAIN_SELECTOR = re.compile(r"^\s*[A-Za-z_:][A-Za-z0-9_:]*\s*(?:\{[^{}]*\})?\s*$")


def _inner(expr: str) -> str:
    return expr[len("sum("):-1] if expr.startswith("sum(") and expr.endswith(")") else expr


def _range(inner: str, seconds: float) -> str:
    """``inner`` over the last ``seconds`` (PromQL durations are integers: milliseconds); a subquery when
    ``inner`` is not a plain selector."""
    ms = max(int(round(seconds * 1000)), 1)
    return f"{inner}[{ms}ms]" if _PLAIN_SELECTOR.match(inner) else f"({inner})[{ms}ms:]"


def read_counter_windows(reader: PrometheusReader, expr: str, bounds: Sequence[float], now: float) -> WindowCounts:
    """The increase of the summed counter ``expr`` (``sum(Q)``) over each window between consecutive
    ``bounds`` (the last bound is ``now``): the difference of its values at the two ends, unless a series
    was reset in the window (``resets()``: a server restarted and its counter began again). Then the window
    is summed sample by sample from the raw samples (a drop counts the new value: exact, as ``increase()``
    without its extrapolation); for a ``Q`` that is not a plain selector, ``increase()`` of a subquery,
    rounded. Raises :class:`PrometheusError` when the counter has no series at ``now`` (nothing counted:
    the query selects nothing)."""
    values: list[float | None] = [reader.scalar(expr, t, now=now) for t in bounds]
    if values[-1] is None:
        raise PrometheusError(f"no series for {expr} at {now:.0f} (the query selects nothing: check its labels, and "
                              "that Prometheus scrapes the servers)")
    inner = _inner(expr)
    counts: list[float] = []
    notes: list[str] = []
    for i in range(len(bounds) - 1):
        a = values[i] if values[i] is not None else 0.0
        b = values[i + 1] if values[i + 1] is not None else 0.0
        w = max(bounds[i + 1] - bounds[i], 0.001)
        resets = reader.scalar(f"sum(resets({_range(inner, w)}))", bounds[i + 1], now=now) or 0.0
        if resets <= 0 and b + 1e-9 >= a:
            counts.append(float(round(b - a)))
            continue
        if _PLAIN_SELECTOR.match(inner):
            c = _sample_sum(reader, inner, bounds[i], bounds[i + 1], now)
            how = "summed sample by sample"
        else:
            inc = reader.scalar(f"sum(increase({_range(inner, w)}))", bounds[i + 1], now=now)
            c = float(round(inc)) if inc is not None and math.isfinite(inc) else 0.0
            how = "read with increase() (extrapolated, rounded)"
        notes.append(f"a counter was reset between {bounds[i]:.0f} and {bounds[i + 1]:.0f} (a server restarted): "
                     f"that window {how}: {c:g}")
        counts.append(c)
    return WindowCounts(tuple(counts), tuple(notes))


def _sample_sum(reader: PrometheusReader, selector: str, start: float, end: float, now: float) -> float:
    """The reset-aware increase of every series of ``selector`` from ``start`` to ``end``, from the raw
    samples: each series starts from its value at ``start`` (0 if it had none), a rise counts its
    difference, a drop (a reset) counts the new value."""
    before = {_key(m): v for m, v in reader.instant(selector, start, now=now)}
    data = reader._get("query", {"query": _range(selector, end - start), "time": f"{end:.3f}",
                                 "timeout": f"{reader.timeout_s:g}s"})
    if data.get("resultType") != "matrix":
        raise PrometheusError(f"{selector} over a range returned a {data.get('resultType')}, not samples")
    total = 0.0
    for series in data.get("result") or []:
        prev = before.get(_key(series.get("metric") or {}), 0.0)
        for _, v in series.get("values") or []:
            x = float(v)
            total += x - prev if x >= prev else x
            prev = x
    return float(round(total))


def _key(labels: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))
