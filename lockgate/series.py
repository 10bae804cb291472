"""The Prometheus series about traffic that both the ext_proc and the controller export: one definition each.

Each ext_proc process exports them for the responses it captured, the controller for the observations
it stored (from every ext_proc). Per response they measure the same thing, so both processes use the
same definition — name, type, help, labels, buckets, the class-label cap — and a Prometheus that
scrapes both sees one consistent family; the ``job``/``instance`` labels tell the two apart (sum one
job's series, never both: each request is counted once by each). Replays (the evaluation's mirrored
requests, ``Observation.replay``) are not traffic and are counted by neither (docs/observations.md).

Labels are :data:`TRAFFIC_LABELS` (never a user or request id) plus the series' own (``status``,
``class``, ``kind``). ``lockgate_predicted_class`` keeps at most :data:`CLASS_LABEL_CAP` class values
per model; later new classes are counted as :data:`CLASS_LABEL_OVERFLOW` (:class:`ClassLabels`).

Kernel module: imports nothing from lockgate.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram

#: labels of every traffic series
TRAFFIC_LABELS = ("model", "version", "role")
#: request duration and time-to-first-byte buckets (seconds)
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: output-token buckets (tokens per response)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
#: distinct ``class`` label values per model on ``lockgate_predicted_class``...
CLASS_LABEL_CAP = 64
#: ...beyond which new classes are counted under this value (not a plausible class name)
CLASS_LABEL_OVERFLOW = "__other__"


@dataclass(frozen=True)
class SeriesDef:
    """One series: what :meth:`create` registers (``kind`` counter: exported as ``<name>_total``)."""

    name: str
    kind: Literal["counter", "histogram"]
    help: str
    labels: tuple[str, ...] = TRAFFIC_LABELS
    buckets: tuple[float, ...] | None = None  #: histogram only

    def create(self, registry: CollectorRegistry) -> Counter | Histogram:
        """The metric, registered in ``registry``."""
        if self.kind == "counter":
            return Counter(self.name, self.help, self.labels, registry=registry)
        return Histogram(self.name, self.help, self.labels, buckets=self.buckets, registry=registry)


REQUESTS = SeriesDef("lockgate_requests", "counter", "Responses by routed version and status class "
                     "(2xx/3xx/4xx/5xx, none: no status)", TRAFFIC_LABELS + ("status",))
REQUEST_DURATION = SeriesDef("lockgate_request_duration_seconds", "histogram",
                             "Request start to end of response body", buckets=LATENCY_BUCKETS_S)
TIME_TO_FIRST_BYTE = SeriesDef("lockgate_time_to_first_byte_seconds", "histogram",
                               "Request start to first response byte (time to first token for streams)",
                               buckets=LATENCY_BUCKETS_S)
OUTPUT_TOKENS = SeriesDef("lockgate_output_tokens", "histogram",
                          "Output tokens per response (reported by the model, or estimated)", buckets=TOKEN_BUCKETS)
REFUSALS = SeriesDef("lockgate_refusals", "counter", "Responses detected as refusals")
PREDICTED_CLASS = SeriesDef("lockgate_predicted_class", "counter",
                            f"Classifier responses by predicted class (at most {CLASS_LABEL_CAP} per model, "
                            f"then {CLASS_LABEL_OVERFLOW})", TRAFFIC_LABELS + ("class",))
STREAM_OUTCOMES = SeriesDef("lockgate_stream_outcomes", "counter", "Response streams cut mid-way, by cause "
                            "(upstream_reset, upstream_timeout: the model's; client_reset)",
                            TRAFFIC_LABELS + ("kind",))
#: every series defined here
TRAFFIC_SERIES = (REQUESTS, REQUEST_DURATION, TIME_TO_FIRST_BYTE, OUTPUT_TOKENS, REFUSALS, PREDICTED_CLASS,
                  STREAM_OUTCOMES)


def status_class(code: int) -> str:
    """The ``status`` label of :data:`REQUESTS`: ``"2xx"`` … ``"5xx"`` (also ``1xx``), ``"none"`` for a
    missing (0) or impossible status."""
    return f"{code // 100}xx" if 100 <= code < 600 else "none"


class ClassLabels:
    """The ``class`` label value for a model's predicted class: the class itself for the first
    :data:`CLASS_LABEL_CAP` distinct classes of each model, :data:`CLASS_LABEL_OVERFLOW` for any later
    new one (bounds the series per model). Thread-safe."""

    def __init__(self, cap: int = CLASS_LABEL_CAP):
        self.cap = cap
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, model: str, cls: str) -> str:
        with self._lock:
            seen = self._seen.setdefault(model, set())
            if cls in seen:
                return cls
            if len(seen) >= self.cap:
                return CLASS_LABEL_OVERFLOW
            seen.add(cls)
            return cls


__all__ = ["CLASS_LABEL_CAP", "CLASS_LABEL_OVERFLOW", "ClassLabels", "LATENCY_BUCKETS_S", "OUTPUT_TOKENS",
           "PREDICTED_CLASS", "REFUSALS", "REQUESTS", "REQUEST_DURATION", "STREAM_OUTCOMES", "SeriesDef",
           "TIME_TO_FIRST_BYTE", "TOKEN_BUCKETS", "TRAFFIC_LABELS", "TRAFFIC_SERIES", "status_class"]
