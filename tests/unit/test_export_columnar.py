"""Reading exports fast, and the columnar export: the field-by-field JSONL reader reads every input as
the line-by-line one does (same columns, same rows, same first error), and ``.npz`` exports read back
as the JSONL export of the same store does."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockgate.controller.ingest import export
from lockgate.controller.ingest.export import export_jsonl, iter_jsonl, jsonl_columns, read_jsonl
from lockgate.controller.ingest.export_npz import export_npz, read_npz, read_observations, write_npz
from lockgate.controller.ingest.observations import ObservationStore
from lockgate.controller.ingest.schema import BOOL_COLUMNS, FETCH_COLUMNS, FLOAT_COLUMNS, OBJECT_COLUMNS
from lockgate.proto.v1 import observations_pb2 as pb

NOW = 1_700_000_000.0


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        if a[k].dtype.kind == "f":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # NaN == NaN here
        else:
            assert [(type(x), x) for x in a[k]] == [(type(x), x) for x in b[k]], k
    assert a["label"] is a["true_class"] and a["label_ts"] is a["label_arrival_ts"]


def by_line(lines):
    return export._columns_by_line(iter_jsonl(lines))


def outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except ValueError as exc:
        return "error", str(exc)


# ----- the field-by-field reader = the line-by-line reader -----

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=6)
number = st.one_of(st.integers(-5, 2**40), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))
good_value = {
    "ts": st.sampled_from([NOW, NOW + 1, NOW + 1, NOW + 2.5]), "model": st.sampled_from(["chat", "other"]),
    "version": st.sampled_from(["v1", "v2"]), "role": st.sampled_from(["baseline", "canary", "other"]),
    "weight": st.sampled_from([0.0, 0.1, 0.5]), "status_code": st.sampled_from([200, 500, 503]),
    "timeout": st.booleans(), "latency_ms": number, "output_tokens": st.integers(0, 500), "refusal": st.booleans(),
    "user_key": text, "predicted_class": st.sampled_from(["a", "b"]), "replay": st.booleans(),
    "error_kind": st.sampled_from(["upstream_reset", "client_reset"]), "note": text,
    "true_class": st.one_of(st.sampled_from(["a", "b"]), st.integers(0, 3)), "label_arrival_ts": number,
    "thumbs": st.sampled_from(["up", "down"]), "thumbs_arrival_ts": number, "task_success": st.booleans(),
    "task_success_arrival_ts": number, "evaluator_score": number, "evaluator_score_arrival_ts": number,
}
bad_value = st.one_of(st.none(), st.just("x"), st.just(True), st.just(1), st.just([1]), st.just({}),
                      st.just(float("nan")), st.just("sideways"))
request_ids = st.sampled_from(["r1", "r2", "r3", "r4", ""])


@st.composite
def jsonl_line(draw, allow_bad: bool):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(["", "  ", "{nope", "[1, 2]", "3", '{"ts": NaN, "request_id": "r9", "model": "chat"}']))
    label = draw(st.integers(0, 4)) == 0
    keys = draw(st.sets(st.sampled_from(sorted(good_value)), max_size=len(good_value)))
    obj = {k: draw(good_value[k]) for k in keys}
    obj["request_id"] = draw(request_ids)
    if label:
        obj = {k: v for k, v in obj.items() if k in ("request_id", "ts", "true_class", "thumbs", "task_success",
                                                     "evaluator_score")}
        obj["kind"] = "label"
        obj.setdefault("ts", NOW + 5)
    else:
        obj.setdefault("ts", NOW)
        obj.setdefault("model", "chat")
        if draw(st.integers(0, 5)) == 0:
            obj["kind"] = draw(st.sampled_from(["observation", "mystery"]))
    if allow_bad and draw(st.integers(0, 4)) == 0:
        obj[draw(st.sampled_from(sorted(good_value) + ["request_id", "kind"]))] = draw(bad_value)
    return json.dumps(obj)


@settings(max_examples=300, deadline=None)
@given(st.lists(jsonl_line(allow_bad=True), max_size=12))
def test_field_by_field_reads_like_line_by_line(lines):
    fast, slow = outcome(jsonl_columns, lines), outcome(by_line, lines)
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "ok":
        assert_same(fast[1], slow[1])
    else:
        assert fast[1] == slow[1]


@settings(max_examples=200, deadline=None)
@given(st.lists(jsonl_line(allow_bad=False), max_size=15), st.sampled_from([None, "chat"]), st.booleans(),
       st.sampled_from([None, NOW + 1]), st.sampled_from([None, NOW + 2]))
def test_selected_rows_are_the_old_readers(lines, model, replay, since, until):
    """read_jsonl = the old reader: filter, then a stable sort by ts, labels joined over every line."""
    got = outcome(lambda: read_jsonl(iter(lines), model, include_replay=replay, since_ts=since, until_ts=until))
    want = outcome(lambda: _old_read_jsonl(lines, model, replay, since, until))
    assert got[0] == want[0], (got, want)
    if got[0] == "ok":
        assert_same(got[1], want[1])


def _old_read_jsonl(lines, model, include_replay, since_ts, until_ts):
    """The reader before the field-by-field one (commit 72950c8), filters included."""
    from lockgate.controller.ingest.schema import LABEL_ARRIVAL_COLUMN, LABEL_KINDS, add_label_aliases, \
        columns_to_arrays
    obs, labels = [], {}

    def add_label(rid, kind, value, ts):
        cur = labels.setdefault(rid, {}).get(kind)
        if cur is None or ts >= cur[0]:
            labels[rid][kind] = (ts, value)

    for lineno, o in iter_jsonl(lines):
        kind, rid = o.get("kind", "observation"), o.get("request_id")
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"line {lineno}: request_id is required")
        if kind == "label":
            ts = o.get("ts")
            if ts is None or not math.isfinite(ts):
                raise ValueError(f"line {lineno}: a label line needs ts (its arrival time)")
            found = False
            for k in LABEL_KINDS:
                if o.get(k) is not None:
                    add_label(rid, k, o[k], float(ts))
                    found = True
            if not found:
                raise ValueError(f"line {lineno}: a label line needs one of {', '.join(LABEL_KINDS)}")
            continue
        if kind != "observation":
            raise ValueError(f"line {lineno}: unknown kind {kind!r} (observation or label)")
        if o.get("ts") is None or not isinstance(o.get("model"), str):
            raise ValueError(f"line {lineno}: an observation needs ts and model")
        for k in LABEL_KINDS:
            ts_col = LABEL_ARRIVAL_COLUMN[k]
            if o.get(k) is not None and o.get(ts_col) is not None:
                add_label(rid, k, o[k], float(o[ts_col]))
        if model is not None and o["model"] != model:
            continue
        if not include_replay and o.get("replay"):
            continue
        if since_ts is not None and o["ts"] < since_ts:
            continue
        if until_ts is not None and o["ts"] >= until_ts:
            continue
        obs.append(o)
    obs.sort(key=lambda o: o["ts"])
    n = len(obs)
    present = set().union(*(o.keys() for o in obs)) if obs else set()
    labs = [labels.get(o["request_id"], {}) for o in obs]
    ts_kind = {t: k for k, t in LABEL_ARRIVAL_COLUMN.items()}
    columns = []
    for c in FETCH_COLUMNS:
        if c == "is_canary":
            columns.append([o.get("role") == "canary" for o in obs])
        elif c in LABEL_KINDS:
            vals = [lab[c][1] if c in lab else None for lab in labs]
            if c == "thumbs":
                vals = [None if v is None else (1.0 if v == "up" else 0.0) for v in vals]
            columns.append(vals)
        elif c in ts_kind:
            columns.append([lab[ts_kind[c]][0] if ts_kind[c] in lab else None for lab in labs])
        elif c not in present:
            columns.append([None] * n)
        else:
            columns.append([o.get(c) for o in obs])
    return add_label_aliases(columns_to_arrays(columns, FETCH_COLUMNS, n))


def test_errors_name_the_first_offending_line():
    good = json.dumps({"ts": NOW, "request_id": "a", "model": "chat"})
    with pytest.raises(ValueError, match="^line 3: latency_ms: must be a number"):
        read_jsonl([good, "", json.dumps({"ts": 1, "request_id": "b", "model": "m", "latency_ms": "fast"}),
                    json.dumps({"ts": 1, "request_id": "", "model": "m"})])
    with pytest.raises(ValueError, match="^line 2: invalid JSON"):
        read_jsonl(iter([good, "{nope", "[1]"]))


# ----- the columnar export -----

def _finite(lo=0.0, hi=1e6):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


store_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
observation_st = st.fixed_dictionaries(
    {"ts": st.sampled_from([NOW, NOW + 1, NOW + 2]), "version": st.sampled_from(["v1", "v2", "v3"]),
     "role": st.sampled_from(["baseline", "canary", "other"]), "weight_bp": st.integers(0, 10000),
     "replay": st.booleans(), "timeout": st.booleans(), "model": st.sampled_from(["chat", "chat", "other"])},
    optional={"stage": store_text, "status_code": st.integers(100, 599), "user_key": store_text,
              "ttfb_ms": _finite(), "duration_ms": _finite(), "output_tokens": st.integers(0, 2**32 - 1),
              "refusal": st.booleans(), "entropy": _finite(0, 20), "predicted_class": store_text,
              "confidence": _finite(0, 1), "finish_reason": store_text, "truncated": st.booleans()})
label_st = st.fixed_dictionaries({}, optional={
    "true_class": store_text, "thumbs": st.sampled_from(["up", "down"]), "task_success": st.booleans(),
    "evaluator_score": _finite(-1e3, 1e3)})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(observation_st, label_st, _finite(0, 1e4)), max_size=25))
def test_npz_export_reads_back_as_the_jsonl_export(tmp_path_factory, rows):
    d = tmp_path_factory.mktemp("npz")
    s = ObservationStore(d / "observations.db")
    try:
        s.insert([pb.Observation(request_id=f"r{i}", **fields) for i, (fields, _, _) in enumerate(rows)])
        for i, (_, labels, dt) in enumerate(rows):
            if labels:
                s.add_labels([(f"r{i}", k, v) for k, v in labels.items()], now=NOW + dt)
        for model in ("chat", None):
            buf = io.StringIO()
            n = export_jsonl(s, buf, model)
            assert export_npz(s, d / "obs.npz", model) == n
            lines = buf.getvalue().splitlines()
            for replay in (False, True):
                for since, until in ((None, None), (NOW + 1, None), (None, NOW + 2)):
                    kw = dict(include_replay=replay, since_ts=since, until_ts=until)
                    want = read_jsonl(lines, model, **kw)
                    assert_same(read_npz(d / "obs.npz", model, **kw), want)
                    assert_same(read_observations(d / "obs.npz", model, **kw), want)
            assert_same(read_jsonl(lines, "chat"), s.fetch("chat"))
    finally:
        s.close()


def test_npz_keeps_every_string_and_reads_nothing_it_did_not_write(tmp_path):
    odd = ["a\x00", "\x00", "é✓", "\ud800x", "", "plain"]  # NUL, non-ASCII, a lone surrogate, empty
    lines = [json.dumps({"ts": NOW + i, "request_id": f"r{i}", "model": "chat", "user_key": u, "role": "canary"})
             for i, u in enumerate(odd)]
    cols = jsonl_columns(lines)
    write_npz(cols, tmp_path / "x.data")  # any name: no ".npz" appended
    back = read_observations(tmp_path / "x.data")
    assert list(back["user_key"]) == odd and back["is_canary"].all()
    assert_same(back, read_jsonl(lines))
    for c in FETCH_COLUMNS:  # absent columns read as not measured, and cannot be written to
        if c in FLOAT_COLUMNS and np.isnan(back[c]).all() or c in OBJECT_COLUMNS and back[c][0] is None \
                or c in BOOL_COLUMNS and not back[c].any():
            with pytest.raises(ValueError):
                back[c][0] = back[c][0]
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a lockgate observations export"):
        read_observations(tmp_path / "other.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="not a columnar observations export"):
        read_observations(tmp_path / "broken.npz")


def test_a_store_export_takes_the_field_by_field_path(tmp_path, monkeypatch):
    s = ObservationStore(tmp_path / "observations.db")
    s.insert([pb.Observation(request_id=f"r{i}", ts=NOW + i % 3, model="chat", version="v1", role="baseline",
                             user_key=f"u{i % 4}", duration_ms=10.0 + i, status_code=200) for i in range(20)])
    s.add_labels([("r1", "true_class", "spam"), ("r2", "thumbs", "down")], now=NOW + 9)
    buf = io.StringIO()
    export_jsonl(s, buf, "chat")
    want = read_jsonl(buf.getvalue().splitlines(), "chat")
    s.close()

    def no_fallback(*_a):
        raise AssertionError("fell back to the line-by-line reader")

    monkeypatch.setattr(export, "_columns_by_line", no_fallback)
    assert_same(read_jsonl(buf.getvalue().splitlines(), "chat"), want)


# ----- the commands -----

def _cli(tmp_path, *args):
    import subprocess
    import sys

    from tests.harness import REPO, _env
    return subprocess.run([sys.executable, "-m", "lockgate", "-c", str(tmp_path / "lockgate.yaml"), *args],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)


def test_export_formats_and_analyze_reads_either(tmp_path):
    from tests.unit.test_analyze_replay import SPEC, write_stream

    (tmp_path / "lockgate.yaml").write_text(f"state_dir: {tmp_path}\nmodels: [{{name: chat, stable: v1, "
                                            "versions: {v1: {endpoints: ['127.0.0.1:1']}, v2: {endpoints: ['127.0.0.1:2']}}}]\n")
    s = ObservationStore(tmp_path / "observations.db")
    s.insert([pb.Observation(request_id=f"r{i}", ts=NOW + i, model="chat", version="v1", role="baseline",
                             weight_bp=500, duration_ms=1.5 * i, replay=i == 3) for i in range(6)])
    s.close()
    r = _cli(tmp_path, "observations", "export", "--model", "chat", "--format", "npz", "-o", str(tmp_path / "a.npz"))
    assert r.returncode == 0 and "exported 6 observations" in r.stderr, r.stderr
    r = _cli(tmp_path, "observations", "export", "--model", "chat", "-o", str(tmp_path / "a.jsonl"))
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "a.jsonl") as f:
        assert_same(read_npz(tmp_path / "a.npz", "chat", include_replay=True), read_jsonl(f, "chat", include_replay=True))
    r = _cli(tmp_path, "observations", "export", "--model", "chat", "--format", "npz")
    assert r.returncode == 2 and "-o" in r.stderr

    # a JSONL export converted (--from) and analysed: the same answer as from the JSONL
    write_stream(tmp_path / "bad.jsonl", canary_error=0.05)
    r = _cli(tmp_path, "observations", "export", "--model", "chat", "--from", str(tmp_path / "bad.jsonl"),
             "--format", "npz", "-o", str(tmp_path / "bad.npz"))
    assert r.returncode == 0, r.stderr
    (tmp_path / "spec.yaml").write_text(SPEC)
    out = [_cli(tmp_path, "analyze", "--spec", str(tmp_path / "spec.yaml"), "--observations", str(tmp_path / name))
           for name in ("bad.jsonl", "bad.npz")]
    assert [o.returncode for o in out] == [0, 0], [o.stderr for o in out]
    assert json.loads(out[0].stdout) == json.loads(out[1].stdout)
    assert json.loads(out[1].stdout)["decision"] == "rollback"
