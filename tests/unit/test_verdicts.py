"""The one verdict renderer (lockgate.controller.tell.verdicts): the gating rule, the order, both tables."""

from lockgate.controller.tell import verdicts as vd

V = {"metric": "error_rate", "kind": "rate", "verdict": "fail", "gating": True, "baseline": 0.02, "canary": 0.102,
     "difference": 0.082, "interval": [0.051, None], "allowed": 0.015, "harmful": "increase", "n_baseline": 3900,
     "n_canary": 412, "unit": "", "details": {"rollback_line": 0.015}}


def test_a_verdict_without_gating_gates_everywhere():
    bare = {k: v for k, v in V.items() if k != "gating"}
    assert vd.is_gating(bare) and not vd.is_gating(dict(V, gating=False))
    assert "(info)" not in vd.verdict_rows([bare])[1] and "(info)" not in vd.html_table([bare])
    assert "(gating) FAIL" in vd.describe_verdict(bare)
    info = dict(V, gating=False)
    assert "error_rate (info)" in vd.verdict_rows([info])[1] and "<i>(info)</i>" in vd.html_table([info])
    assert "(not gating)" in vd.describe_verdict(info)


def test_order_gating_first_then_fail_undecided_pass():
    vs = [dict(V, metric="a", verdict="pass"), dict(V, metric="b", gating=False, verdict="fail"),
          dict(V, metric="c", verdict="continue"), dict(V, metric="d", verdict="fail")]
    assert [v["metric"] for v in vd.ordered(vs)] == ["d", "c", "a", "b"]


def test_text_and_html_tables_show_the_same_cells():
    row = vd.table_rows([V])[0]
    assert (row.baseline, row.canary, row.interval, row.allowed, row.label) == \
        ("0.02", "0.102", "[0.051, -]", "+0.015", "fail (beyond the allowance)")
    text, html = vd.verdict_rows([V])[1], vd.html_table([V])
    for cell in (row.baseline, row.canary, row.interval, row.allowed, row.label):
        assert cell in text and cell in html
    assert "3900/412" in text and "3900 / 412" in html


def test_units_in_sentences_plain_numbers_in_tables():
    assert vd.fmt_value(0.102, "rate") == "10.20%" and vd.fmt_signed(0.015, V) == "+1.50 pp"
    assert vd.interval_text(V) == "[+5.10, +∞] pp"
    lat = dict(V, kind="quantile", unit="ms", interval=[-10.0, 40.0], details={"rollback_line": 79.0})
    assert vd.interval_text(lat) == "[-10, +40] ms" and vd.fmt_line(lat) == "+79 ms"
    assert "[-10, 40]" in vd.verdict_rows([lat])[1] and "+79 ms" not in vd.verdict_rows([lat])[1]
