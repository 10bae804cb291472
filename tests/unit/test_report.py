"""Report generation: chart layout → SVG / PNG, the self-contained HTML page (synthetic log)."""

from __future__ import annotations

import re
import struct
import zlib

import pytest

from lockgate.controller import history as h
from lockgate.controller.report import ReportData, main_figure, main_metric, render_html, render_png, write_report
from lockgate.controller.report.charts import (Band, Figure, HLine, Marker, Panel, Series, Span, fmt_elapsed, layout,
                                               nice_ticks, to_svg)
from lockgate.controller.report.raster import Canvas, _GLYPHS, read_png_size, to_png
from tests.unit.test_history import build


def decode_own_png(data: bytes) -> tuple[int, int, bytes]:
    """Our PNGs: one IDAT, 8-bit RGB, filter 0 on every row."""
    w, hgt = read_png_size(data)
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    stride = w * 3
    assert len(raw) == hgt * (stride + 1) and all(raw[y * (stride + 1)] == 0 for y in range(hgt))
    return w, hgt, b"".join(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)] for y in range(hgt))


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


def test_png_raster_draws_the_same_lines():
    fig = small_figure()
    w, hgt, prims = layout(fig)
    data = to_png(w, hgt, prims, scale=1)
    pw, ph, px = decode_own_png(data)
    assert (pw, ph) == (w, hgt)
    colours = {pixel(px, w, x, y) for y in range(0, ph, 2) for x in range(0, pw, 2)}
    assert (255, 0, 0) in colours  # the series
    assert (0, 0, 255) in colours  # the hline
    assert any(g > 150 and r < 250 and b < 250 and r == b for r, g, b in colours)  # the green band, blended
    dots = [p for p in prims if getattr(p, "cls", "") == "pt"]
    for d in dots:  # every point is drawn where the SVG puts it
        assert pixel(px, w, int(d.x), int(d.y)) == (255, 0, 0)


def test_canvas_primitives_and_font():
    c = Canvas(40, 20)
    c.rect(0, 0, 10, 10, "#000000")
    assert c.px[0:3] == b"\x00\x00\x00" and c.px[(15 * 40 + 15) * 3:(15 * 40 + 15) * 3 + 3] == b"\xff\xff\xff"
    c.polygon([(20, 0), (30, 0), (30, 10), (20, 10)], "#ff0000", 0.5)
    assert tuple(c.px[(5 * 40 + 25) * 3:(5 * 40 + 25) * 3 + 3]) == (255, 127, 127)
    c2 = Canvas(60, 10)
    c2.text(0, 8, "Ab1%", 1, "#000000")
    assert c2.px.count(0) > 20
    for ch in "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-%()[]:.,_/#":
        assert ch in _GLYPHS
    c3 = Canvas(30, 10)
    c3.text(0, 8, "→ ü", 1, "#000000")  # substitutions and unknown characters do not crash
    data = c3.png()
    assert read_png_size(data) == (30, 10)
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
