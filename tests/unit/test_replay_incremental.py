"""The replay judged incrementally (each look folds only the rows and labels new since the previous one
into :class:`RolloutEvidence`, as the live controller does) decides as the full recomputation at every
look (:func:`analysis.evaluate_dataset`): the same decision at the same look, the same verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given

from lockgate.controller.decide.replay import replay
from tests.unit.test_replay_exact import CHAT, PROPERTY, T0, make_stream, streams


def _same_reasons(a: list[dict], b: list[dict]) -> None:
    assert [(r["metric"], r["verdict"], r["n_baseline"], r["n_canary"]) for r in a] == \
        [(r["metric"], r["verdict"], r["n_baseline"], r["n_canary"]) for r in b]
    for x, y in zip(a, b):  # the numbers: equal up to float summation order
        for k in ("baseline", "canary", "allowed"):
            assert (x[k] is None) == (y[k] is None) and (x[k] is None or math.isclose(x[k], y[k], rel_tol=1e-9,
                                                                                      abs_tol=1e-12)), (k, x, y)


@PROPERTY
@given(streams)
def test_incremental_replay_decides_as_the_full_recomputation(case):
    spec, data = case
    inc, full = replay(spec, data, incremental=True), replay(spec, data, incremental=False)
    assert {k: inc[k] for k in ("decision", "at_ts", "stage", "looks", "looks_evaluated", "stage_reasons")} == \
        {k: full[k] for k in ("decision", "at_ts", "stage", "looks", "looks_evaluated", "stage_reasons")}
    _same_reasons(inc["reasons"], full["reasons"])
    assert replay(spec, data) == inc  # incremental by default


def test_duplicate_request_ids_take_the_full_path():
    """The accumulator keeps the first row of a request id (as the store does); a recording with repeated
    ids is replayed by the full recomputation, which counts every row."""
    data = make_stream(4, classifier=False, minutes=20, per_min=60, users=200, canary_err=0.02, lat_factor=1.0,
                       quality_loss=0.0, label_delay_s=0.0, shuffle=False)
    data["request_id"] = data["request_id"].copy()
    data["request_id"][1] = data["request_id"][0]
    assert replay(CHAT, data) == replay(CHAT, data, incremental=False)
    with pytest.raises(ValueError, match="incrementally"):
        replay(CHAT, data, incremental=True)
    assert np.isfinite(data["ts"]).all() and data["ts"][0] == T0
