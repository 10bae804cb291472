"""Report generation: chart layout → SVG / PNG, the self-contained HTML page (synthetic log)."""

from __future__ import annotations

import dataclasses
import io
import re
import struct

import pytest

from lockgate.controller.tell import history as h
from lockgate.controller.tell.report import ReportData, main_figure, main_metric, render_html, render_png, write_report
from lockgate.controller.tell.report.charts import (Band, Figure, HLine, Marker, Panel, Rect, Series, Span, Text,
                                                    fmt_elapsed, layout, nice_ticks, to_svg)
from lockgate.controller.tell.report.png import read_png_size, to_png
from tests.unit.test_history import build


def decode_own_png(data: bytes) -> tuple[int, int, bytes]:
    """Our PNG (matplotlib writes 8-bit RGBA) → (width, height, RGB bytes) by Pillow, which matplotlib brings."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.size == read_png_size(data)
    return img.width, img.height, img.convert("RGB").tobytes()


def near(colour: tuple[int, int, int], target: tuple[int, int, int], tol: int = 40) -> bool:
    """Anti-aliased edges blend a thin line with the background: the line's colour within ``tol``."""
    return all(abs(a - b) <= tol for a, b in zip(colour, target))


def pixel(px: bytes, w: int, x: int, y: int) -> tuple[int, int, int]:
    i = (y * w + x) * 3
    return px[i], px[i + 1], px[i + 2]


def small_figure() -> Figure:
    pts = [(0.0, None), (10.0, 1.0), (20.0, 2.0), (30.0, 1.5)]
    return Figure("t", 0, 40, [Panel("values", [Series("canary", "#ff0000", pts, attrs={"data-series": "c"})],
                                     [Band("interval", "#00ff00", [(10.0, 0.5, 1.5), (20.0, None, 2.5),
                                                                   (30.0, 1.0, 2.0)])],
                                     [HLine(0.0, "#0000ff", "zero")])],
                  [Marker(5, "started", "started 10%"), Marker(25, "rolled_back", "rolled back")],
                  [Span(0, 25, "stage 1 (10%)")], fmt_elapsed, width=400)


def test_nice_ticks_and_formatting():
    assert nice_ticks(0, 1, 5) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ticks = nice_ticks(-0.03, 0.21, 4)
    assert ticks[0] >= -0.03 and ticks[-1] <= 0.21 and len(ticks) >= 3 and 0.0 in ticks
    assert nice_ticks(5, 5) == [5]
    assert fmt_elapsed(12) == "+12s" and fmt_elapsed(600) == "+10m" and fmt_elapsed(3 * 3600) == "+3h"


def test_svg_has_one_point_per_value_markers_band_and_gaps():
    svg = to_svg(small_figure())
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert len(re.findall(r'<circle class="pt"[^>]*data-series="c"', svg)) == 3  # the None is a gap, not a point
    assert len(re.findall(r'<path class="marker"', svg)) == 2
    assert len(re.findall(r'<path class="band"', svg)) == 1
    assert len(re.findall(r'<path class="series"', svg)) == 1
    assert "stage 1 (10%)" in svg and "rolled back" in svg and "zero" in svg
    assert "<title>canary +20s: 2</title>" in svg


def test_layout_clamps_into_the_plot():
    fig = small_figure()
    fig.panels[0].ylim = (0, 1)  # values above 1 are clamped to the top edge, not drawn outside
    w, hgt, prims = layout(fig)
    ys = [p.y for p in prims if getattr(p, "cls", "") == "pt"]
    plot = [p for p in prims if getattr(p, "cls", "") == "plot-bg"][0]
    assert all(plot.y - 0.01 <= y <= plot.y + plot.h + 0.01 for y in ys)


def test_png_draws_the_same_lines():
    fig = small_figure()
    w, hgt, prims = layout(fig)
    data = to_png(w, hgt, prims, scale=1)
    pw, ph, px = decode_own_png(data)
    assert (pw, ph) == (w, hgt)
    colours = {pixel(px, w, x, y) for y in range(0, ph, 2) for x in range(0, pw, 2)}
    assert (255, 0, 0) in colours  # the series
    assert any(near(c, (0, 0, 255)) for c in colours)  # the hline (1.5 px, anti-aliased)
    assert any(g > 150 and r < 250 and b < 250 and r == b for r, g, b in colours)  # the green band, blended
    dots = [p for p in prims if getattr(p, "cls", "") == "pt"]
    for d in dots:  # every point is drawn where the SVG puts it
        assert pixel(px, w, int(d.x), int(d.y)) == (255, 0, 0)


def test_png_text_scale_and_size():
    """Text in a real font (any Unicode the layout uses), ``scale`` PNG pixels per layout pixel."""
    prims = [Rect(0, 0, 60, 20, "#ffffff"), Text(2, 14, "→ −0.5% ü", 11, "#000000")]
    w, hgt, px = decode_own_png(to_png(60, 20, prims, scale=1))
    assert (w, hgt) == (60, 20)
    assert sum(1 for i in range(0, len(px), 3) if px[i] < 100) > 15  # dark glyph pixels
    assert read_png_size(to_png(60, 20, prims, scale=3)) == (180, 60)
    with pytest.raises(ValueError):
        read_png_size(b"nope" * 10)


def test_report_html_is_self_contained(tmp_path):
    build(tmp_path)
    store = h.open_log(tmp_path)
    r, events, evaluations = h.load(store, 2)
    store.close()
    page = render_html(r, events, evaluations, png_name="x.png")
    no_ns = page.replace("http://www.w3.org/2000/svg", "")
    assert "http://" not in no_ns and "https://" not in no_ns and "<link" not in page and "@import" not in page
    assert "src=" not in page  # no external scripts or images
    assert page.count("<svg") == 2  # traffic + error_rate
    assert 'data-figure="error_rate"' in page and 'data-figure="traffic"' in page
    assert page.count('<tr class=\'verdict-row\'>') >= 2
    assert "push→every ACK 6.0 ms" in page and "ROLLED_BACK" in page and "x.png" in page
    svg = re.search(r'<svg[^>]*data-figure="error_rate".*?</svg>', page, re.S).group(0)
    assert len(re.findall(r'<circle class="pt"[^>]*data-series="canary"', svg)) == 1  # one judgement, one point
    assert len(re.findall(r'<path class="marker"', svg)) == 3  # started, paused, rolled back
    assert "rolled back" in svg and "started 10%" in svg


def test_main_metric_and_png(tmp_path):
    build(tmp_path)
    store = h.open_log(tmp_path)
    r, events, evaluations = h.load(store, 1)
    r2, events2, evaluations2 = h.load(store, 2)
    r3, events3, evaluations3 = h.load(store, 3)
    store.close()
    assert main_metric(r2, evaluations2) == "error_rate"
    d = ReportData(r, events, evaluations)
    assert d.traffic_points() == [(0.0, 0.0), (1.0, 10.0), (61.0, 50.0), (122.0, 100.0)]
    assert [s.label for s in d.spans] == ["stage 1 (10%)", "stage 2 (50%)"]
    assert len(main_figure(d).panels) == 3
    png = render_png(r, events, evaluations, scale=1)
    w, hgt, px = decode_own_png(png)
    assert w == 960 and len(set(px[i:i + 3] for i in range(0, len(px), 3 * 97))) > 5
    # an aborted rollout without any judgement still gets a (traffic-only) report
    assert main_metric(r3, evaluations3) is None
    assert "<svg" in render_html(r3, events3, evaluations3)
    assert read_png_size(render_png(r3, events3, evaluations3, scale=1))[0] == 960


def test_write_report(tmp_path):
    build(tmp_path)
    html, png = write_report(tmp_path, 2, tmp_path / "r.html")
    assert html.exists() and png == tmp_path / "r.png" and png.read_bytes()[:4] == b"\x89PNG"
    html2, png2 = write_report(tmp_path, 2, tmp_path / "only.html", png=False)
    assert png2 is None and not (tmp_path / "only.png").exists()
    with pytest.raises(h.LogError):
        write_report(tmp_path, 99, tmp_path / "x.html")
    assert struct.unpack(">I", png.read_bytes()[16:20])[0] == 1920


# ------------------------------------------------------------------ the rollback line (the allowance), not 0
def _with_verdicts(evaluations, *verdict_lists):
    """The stored evaluations of a rollout with their verdicts replaced (one list per evaluation)."""
    out = []
    for i, vs in enumerate(verdict_lists):
        ev = dict(evaluations[min(i, len(evaluations) - 1)])
        out.append(dict(ev, ts=ev["ts"] + i, judgement=dict(ev["judgement"], verdicts=vs)))
    return out


def _rollout(tmp_path, rid=2):
    build(tmp_path)
    store = h.open_log(tmp_path)
    r, events, evaluations = h.load(store, rid)
    store.close()
    return r, events, evaluations


def _interval_geometry(fig):
    """The interval panel, its plot rectangle (pixels) and data -> pixel y of that panel."""
    from lockgate.controller.tell.report.charts import _yrange

    w, hgt, prims = layout(fig)
    panel = fig.panels[1]
    rect = [p for p in prims if getattr(p, "cls", "") == "plot-bg"][1]
    ylo, yhi = _yrange(panel)
    return panel, rect, prims, lambda y: rect.y + rect.h - (y - ylo) / (yhi - ylo) * rect.h


def test_chart_draws_the_rollback_line_at_the_allowance(tmp_path):
    from lockgate.controller.tell.report import metric_figure, verdict_table
    from lockgate.controller.tell.report.charts import HARM, ZERO

    r, events, evaluations = _rollout(tmp_path)  # fail: interval [0.1, 0.4], allowed 0.05, stored without a line
    d = ReportData(r, events, evaluations)
    fig = metric_figure(d, "error_rate")
    panel, rect, prims, sy = _interval_geometry(fig)
    (line,) = [x for x in panel.hlines if x.attrs.get("data-line") == "rollback"]
    (zero,) = [x for x in panel.hlines if x.attrs.get("data-line") == "zero"]
    assert line.y == 0.05 and line.color == HARM and line.label == "rollback line (allowed +0.05; fail above)"
    assert zero.y == 0.0 and zero.color == ZERO and zero.dash is None  # 0 only as a faint reference
    (drawn,) = [p for p in prims if getattr(p, "cls", "") == "hline" and p.attrs.get("data-line") == "rollback"]
    assert drawn.points[0][1] == pytest.approx(sy(0.05)) and drawn.color == HARM
    # in the SVG: the dashed path at the allowance's pixel row, with its label
    svg = to_svg(fig)
    m = re.search(r'<path class="hline" d="M[\d.]+,([\d.]+) L[\d.]+,\1"[^>]*stroke="#c53030"[^>]*'
                  r'data-line="rollback"', svg)
    assert m and float(m.group(1)) == pytest.approx(sy(0.05), abs=0.06)
    assert ">rollback line (allowed +0.05; fail above)</text>" in svg
    # the interval lies above the line: beyond the allowance
    assert all(y < sy(0.05) for p in prims if getattr(p, "cls", "") == "band" for _, y in p.points)
    page = render_html(r, events, evaluations)
    assert "fail (beyond the allowance)" in page and "<th>allowed (rollback line)</th>" in page
    assert "<td class='num allowed'>+0.05</td>" in verdict_table(evaluations[-1]["judgement"]["verdicts"])
    assert "the red dashed line is the rollback line" in page
    # the PNG (main chart: the failing metric) draws the same line: a red row at that height
    fig_main = main_figure(d)
    _, _, prims_main, sy_main = _interval_geometry(fig_main)
    # (at the PNG's own scale, 2 pixels per layout pixel, the 1.5 px line is 3 solid rows)
    w, hgt, px = decode_own_png(render_png(r, events, evaluations, scale=2))
    row = round(2 * sy_main(0.05))
    reds = max(sum(1 for x in range(w) if pixel(px, w, x, y) == (0xc5, 0x30, 0x30)) for y in (row - 1, row, row + 1))
    assert reds > 100


def test_chart_uses_the_recorded_line_harmful_decrease(tmp_path):
    from lockgate.controller.tell.report import metric_figure

    r, events, evaluations = _rollout(tmp_path)
    v = {"metric": "class_recall[fraud]", "kind": "class_recall", "verdict": "fail", "baseline": 0.9, "canary": 0.8,
         "difference": -0.1, "interval": [-0.16, -0.05], "allowed": 0.02, "harmful": "decrease", "gating": True,
         "unit": "", "n_baseline": 100, "n_canary": 50, "details": {"rollback_line": -0.02}}
    d = ReportData(r, events, _with_verdicts(evaluations, [v]))
    panel, rect, prims, sy = _interval_geometry(metric_figure(d, "class_recall[fraud]"))
    (line,) = [x for x in panel.hlines if x.attrs.get("data-line") == "rollback"]
    assert line.y == -0.02 and line.label == "rollback line (allowed -0.02; fail below)"
    assert all(y > sy(-0.02) for p in prims if getattr(p, "cls", "") == "band" for _, y in p.points)


def test_pass_above_zero_but_within_the_allowance_is_drawn_and_shown_as_within(tmp_path):
    from lockgate.controller.tell.report import metric_figure

    r, events, evaluations = _rollout(tmp_path)
    ok = dict(evaluations[0]["judgement"]["verdicts"][0], verdict="pass", canary=0.045, difference=0.025,
              interval=[0.01, 0.04], reason="within the allowance", details={"rollback_line": 0.05})
    evs = _with_verdicts(evaluations, [ok], [dict(ok, interval=[0.012, 0.035])])
    d = ReportData(r, events, evs)
    panel, rect, prims, sy = _interval_geometry(metric_figure(d, "error_rate"))
    band = [y for p in prims if getattr(p, "cls", "") == "band" for _, y in p.points]
    # above 0 (the canary is somewhat worse) and below the rollback line: within the allowance
    assert band and all(sy(0.05) < y < sy(0.0) for y in band)
    page = render_html(dataclasses.replace(r, last_eval=evs[-1]["judgement"]), events, evs)
    rows = re.findall(r"<tr class='verdict-row'>.*?</tr>", page)
    assert len(rows) == 2  # the last judgement, and the last of its stage
    row = rows[0]
    assert "pass (within the allowance)" in row and "+0.05" in row and "beyond" not in row and "harm" not in row
    assert "class='v-pass'" in row


def test_relative_allowance_line_moves_with_the_baseline(tmp_path):
    from lockgate.controller.tell.report import metric_figure

    r, events, evaluations = _rollout(tmp_path)
    v = dict(evaluations[0]["judgement"]["verdicts"][0], verdict="not-yet", interval=[-0.01, 0.03],
             allowed_mode="relative")
    evs = _with_verdicts(evaluations, [dict(v, allowed=0.004, details={"rollback_line": 0.004})],
                         [dict(v, allowed=0.005, details={"rollback_line": 0.005})])
    fig = metric_figure(ReportData(r, events, evs), "error_rate")
    panel = fig.panels[1]
    (moving,) = [s for s in panel.series if s.attrs.get("data-series") == "rollback-line"]
    assert [y for _, y in moving.points] == [0.004, 0.005]
    (line,) = [x for x in panel.hlines if x.attrs.get("data-line") == "rollback"]
    assert line.y == 0.005 and line.label.startswith("rollback line now (allowed +0.005")


def test_exceedance_ratio_chart_and_table_are_on_the_exceedance_share_scale(tmp_path):
    from lockgate.controller.tell.report import metric_figure, verdict_table

    r, events, evaluations = _rollout(tmp_path)
    v = {"metric": "latency_p95", "kind": "quantile", "verdict": "pass", "baseline": 790.0, "canary": 805.0,
         "difference": 0.004, "interval": [-0.006, 0.008], "allowed": 0.01, "allowed_mode": "exceedance_ratio",
         "harmful": "increase", "gating": True, "unit": "", "n_baseline": 100, "n_canary": 50,
         "details": {"interval_scale": "exceedance share difference", "rollback_line": 0.01}}
    fig = metric_figure(ReportData(r, events, _with_verdicts(evaluations, [v])), "latency_p95")
    panel = fig.panels[1]
    assert "exceedance share difference" in panel.title
    (line,) = [x for x in panel.hlines if x.attrs.get("data-line") == "rollback"]
    assert line.label == "rollback line (allowed +0.01 exceedance share; fail above)"
    table = verdict_table([v])
    assert "[-0.006, 0.008] exceedance share" in table and "+0.01 exceedance share" in table and "ms" not in table
