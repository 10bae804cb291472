"""The one observation schema (lockgate.controller.ingest.schema) and the shared traffic series (lockgate.series)."""

from __future__ import annotations

import math

import numpy as np
from prometheus_client import CollectorRegistry

from lockgate import series
from lockgate.controller.ingest import schema


def test_error_definition_per_row_and_per_column_agree():
    rows = [(200, False, None), (500, False, None), (503, True, None), (None, True, None), (None, False, None),
            (200, False, "upstream_reset"), (200, False, "upstream_timeout"), (200, False, "client_reset"),
            (None, False, "upstream_reset"), (499, False, None)]
    col = schema.error_column(np.array([math.nan if s is None else s for s, _, _ in rows], dtype=float),
                              np.array([t for _, t, _ in rows], dtype=float),
                              np.array([k for _, _, k in rows], dtype=object))
    assert list(np.nan_to_num(col, nan=-1)) == [0, 1, 1, 1, -1, 1, 1, 0, 1, 0]
    for (s, t, k), c in zip(rows, col):
        assert schema.is_error(s, t, k) == (c == 1.0)
    assert not schema.is_error(0, False)  # the proto's "status not set"


def test_label_arrival_columns_are_one_map():
    assert set(schema.LABEL_ARRIVAL_COLUMN) == set(schema.LABEL_KINDS)
    assert set(schema.FEEDBACK_ARRIVAL_COLUMNS) == set(schema.LABEL_KINDS) - {"true_class"}
    assert schema.ARRIVAL_COLUMNS["label"] == "label_ts" == next(
        a for a, c in schema.LABEL_ALIASES.items() if c == schema.LABEL_ARRIVAL_COLUMN["true_class"])
    assert set(schema.DECISION_COLUMNS) <= set(schema.FETCH_COLUMNS)
    assert set(schema.LABEL_ARRIVAL_COLUMN.values()) <= set(schema.FLOAT_COLUMNS)


def test_class_labels_cap_per_model():
    labels = series.ClassLabels(cap=2)
    assert [labels("m", c) for c in ("a", "b", "c", "a")] == ["a", "b", series.CLASS_LABEL_OVERFLOW, "a"]
    assert labels("other-model", "c") == "c"


def test_status_class():
    assert [series.status_class(c) for c in (0, 200, 404, 503, 99, 600)] == ["none", "2xx", "4xx", "5xx", "none",
                                                                             "none"]


def test_series_definitions_register():
    reg = CollectorRegistry()
    for d in series.TRAFFIC_SERIES:
        d.create(reg)
    series.OUTPUT_TOKENS.create(CollectorRegistry()).labels("m", "v", "baseline").observe(3)
    assert len({d.name for d in series.TRAFFIC_SERIES}) == len(series.TRAFFIC_SERIES)


def test_extproc_and_controller_export_the_same_traffic_series():
    from prometheus_client import generate_latest

    from lockgate.controller.ingest.collector import ControllerMetrics
    from lockgate.extproc.server import CaptureMetrics
    from lockgate.proto.v1 import observations_pb2 as pb

    ext_registry = CollectorRegistry()
    ext, ctl = CaptureMetrics(ext_registry), ControllerMetrics()
    for i in range(70):
        o = pb.Observation(request_id=f"r{i}", ts=1.0, model="m", version="v", role="canary", status_code=200,
                           duration_ms=5.0, ttfb_ms=1.0, output_tokens=i, predicted_class=f"c{i}")
        ext.record(o)
        ctl.observe(o)
    ext.record(pb.Observation(request_id="rr", ts=1.0, model="m", version="v", role="canary", replay=True,
                              status_code=200))
    ctl.observe(pb.Observation(request_id="rr", ts=1.0, model="m", version="v", role="canary", replay=True,
                               status_code=200))

    def families(registry) -> dict:
        return {f.name: f for f in registry.collect() if any(f.name == d.name for d in series.TRAFFIC_SERIES)}

    a, b = families(ext_registry), families(ctl.registry)
    assert set(a) == set(b) == {d.name for d in series.TRAFFIC_SERIES}
    def samples(family) -> list:  # what was counted (a child created at 0 by one side only is no difference)
        return sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples
                      if not s.name.endswith("_created") and s.value)

    for name in a:
        assert (a[name].type, a[name].documentation) == (b[name].type, b[name].documentation), name
        assert samples(a[name]) == samples(b[name]), name
    assert b"__other__" in generate_latest(ctl.registry)
