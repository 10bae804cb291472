"""Tiny chart model: figures of stacked panels sharing a time axis, laid out into pixel primitives.

One layout (:func:`layout`) feeds two backends — :func:`to_svg` (inline SVG for the HTML report)
and :func:`lockgate.controller.tell.report.png.to_png` (the same primitives drawn by matplotlib) — so the page
and the picture always show the very same lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Callable

# ----------------------------------------------------------------------------------------- model
BASELINE = "#1f6fb4"
CANARY = "#e8710a"
HARM = "#c53030"
ZERO = "#cbd5e0"   #: the faint 0 (no difference) reference; the decision line is the rollback line (HARM)
GRID = "#e2e8f0"
AXIS = "#4a5568"
MARKER_COLORS = {"started": "#4a5568", "advanced": "#2b6cb0", "promoted": "#2f855a", "rolled_back": HARM,
                 "aborted": HARM, "inconclusive": "#b7791f", "paused": "#718096", "resumed": "#718096"}


@dataclass
class Series:
    name: str
    color: str
    points: list[tuple[float, float | None]]   #: (x, y); y None = no value (gap)
    width: float = 2.0
    dots: bool = True
    step: bool = False                           #: hold each value until the next x (traffic share)
    dash: tuple[float, float] | None = None
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class Band:
    name: str
    color: str
    points: list[tuple[float, float | None, float | None]]   #: (x, lo, hi); None = unbounded so far
    opacity: float = 0.22
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class HLine:
    y: float
    color: str
    label: str = ""
    dash: tuple[float, float] | None = (6, 4)
    attrs: dict[str, str] = field(default_factory=dict)
    anchor: str = "end"   #: label at the plot's right end ("end") or left end ("start")


@dataclass
class Panel:
    title: str
    series: list[Series] = field(default_factory=list)
    bands: list[Band] = field(default_factory=list)
    hlines: list[HLine] = field(default_factory=list)
    height: int = 170
    ylim: tuple[float, float] | None = None
    yfmt: Callable[[float], str] | None = None


@dataclass
class Marker:
    x: float
    kind: str
    label: str


@dataclass
class Span:
    x0: float
    x1: float
    label: str


@dataclass
class Figure:
    title: str
    x0: float
    x1: float
    panels: list[Panel]
    markers: list[Marker] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    xfmt: Callable[[float], str] | None = None
    width: int = 960
    attrs: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- primitives
@dataclass
class Rect:
    x: float
    y: float
    w: float
    h: float
    fill: str
    opacity: float = 1.0
    cls: str = ""


@dataclass
class Line:
    points: list[tuple[float, float]]
    color: str
    width: float = 1.0
    dash: tuple[float, float] | None = None
    cls: str = ""
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class Poly:
    points: list[tuple[float, float]]
    fill: str
    opacity: float = 1.0
    cls: str = ""
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class Text:
    x: float
    y: float           #: baseline
    text: str
    size: int = 11
    color: str = AXIS
    anchor: str = "start"   #: start | middle | end
    bold: bool = False
    cls: str = ""


@dataclass
class Dot:
    x: float
    y: float
    r: float
    color: str
    cls: str = ""
    attrs: dict[str, str] = field(default_factory=dict)
    tip: str = ""


Primitive = Rect | Line | Poly | Text | Dot


# ----------------------------------------------------------------------------------------- scales
def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    out = []
    v = start
    while v <= hi + step * 1e-9:
        out.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return out


def fmt_num(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e5 or a < 1e-3:
        return f"{v:.1e}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.4g}"


def fmt_elapsed(s: float) -> str:
    """Seconds since the rollout started → ``+12s`` / ``+3.5m`` / ``+2h``."""
    if abs(s) < 120:
        return f"+{s:.0f}s"
    if abs(s) < 7200:
        return f"+{s / 60:.3g}m"
    return f"+{s / 3600:.3g}h"


def _yrange(p: Panel) -> tuple[float, float]:
    if p.ylim:
        return p.ylim
    vals: list[float] = []
    for s in p.series:
        vals += [y for _, y in s.points if y is not None and math.isfinite(y)]
    core = list(vals)
    for h in p.hlines:
        core.append(h.y)
    # interval ends: only those not wildly wider than the rest (early looks are very wide; they are clamped)
    ends = [v for b in p.bands for _, lo, hi in b.points for v in (lo, hi) if v is not None and math.isfinite(v)]
    if not core and not ends:
        return (0.0, 1.0)
    if core:
        lo, hi = min(core), max(core)
        span = max(hi - lo, abs(hi), abs(lo), 1e-9)
        cap_lo, cap_hi = lo - 2 * span, hi + 2 * span
        core += [min(max(v, cap_lo), cap_hi) for v in ends]
    else:
        core = ends
    lo, hi = min(core), max(core)
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 1.0
        return (lo - pad, hi + pad)
    pad = (hi - lo) * 0.08
    return (lo - pad, hi + pad)


# ----------------------------------------------------------------------------------------- layout
LEFT, RIGHT, TITLE_H, PANEL_TITLE_H, GAP, AXIS_H, MARK_H = 72, 24, 26, 20, 10, 24, 30


def figure_height(fig: Figure) -> int:
    return TITLE_H + MARK_H + sum(p.height + PANEL_TITLE_H + GAP for p in fig.panels) + AXIS_H


def layout(fig: Figure) -> tuple[int, int, list[Primitive]]:
    """Figure → (width, height, primitives in pixel coordinates)."""
    W, H = fig.width, figure_height(fig)
    out: list[Primitive] = [Rect(0, 0, W, H, "#ffffff", cls="bg")]
    out.append(Text(LEFT, 18, fig.title, 14, "#1a202c", bold=True, cls="fig-title"))
    x0, x1 = fig.x0, fig.x1 if fig.x1 > fig.x0 else fig.x0 + 1.0
    pw = W - LEFT - RIGHT

    def sx(x: float) -> float:
        return LEFT + (min(max(x, x0), x1) - x0) / (x1 - x0) * pw

    xfmt = fig.xfmt or fmt_num
    top = TITLE_H + MARK_H
    plot_top = top + PANEL_TITLE_H
    xticks = nice_ticks(x0, x1, 8)
    for i, p in enumerate(fig.panels):
        py0 = top + PANEL_TITLE_H
        py1 = py0 + p.height
        ylo, yhi = _yrange(p)

        def sy(y: float, ylo=ylo, yhi=yhi, py0=py0, py1=py1) -> float:
            y = min(max(y, ylo), yhi)
            return py1 - (y - ylo) / (yhi - ylo) * (py1 - py0)

        # panel title + legend
        out.append(Text(LEFT, top + 14, p.title, 12, "#1a202c", bold=True, cls="panel-title"))
        lx = W - RIGHT
        for s in reversed(p.series):
            lx -= 8 + 7 * len(s.name)
            out.append(Text(lx + 18, top + 14, s.name, 11, AXIS, cls="legend"))
            out.append(Line([(lx, top + 10), (lx + 14, top + 10)], s.color, 3, cls="legend-swatch"))
            lx -= 24
        for b in p.bands:
            lx -= 8 + 7 * len(b.name)
            out.append(Text(lx + 18, top + 14, b.name, 11, AXIS, cls="legend"))
            out.append(Rect(lx, top + 5, 14, 10, b.color, b.opacity + 0.15, cls="legend-swatch"))
            lx -= 24
        # frame, stage spans, grid
        out.append(Rect(LEFT, py0, pw, p.height, "#fbfcfd", cls="plot-bg"))
        for k, sp in enumerate(fig.spans):
            if k % 2 == 1:
                out.append(Rect(sx(sp.x0), py0, sx(sp.x1) - sx(sp.x0), p.height, "#edf2f7", cls="stage-span"))
        for t in nice_ticks(ylo, yhi, 4):
            y = sy(t)
            out.append(Line([(LEFT, y), (LEFT + pw, y)], GRID, 1, cls="grid"))
            out.append(Text(LEFT - 6, y + 4, (p.yfmt or fmt_num)(t), 10, AXIS, anchor="end", cls="ytick"))
        for t in xticks:
            out.append(Line([(sx(t), py0), (sx(t), py1)], GRID, 1, cls="grid"))
        # data
        for b in p.bands:
            run: list[tuple[float, float, float]] = []
            runs = []
            for x, lo, hi in b.points:
                if lo is None and hi is None:
                    if run:
                        runs.append(run)
                    run = []
                    continue
                run.append((x, ylo if lo is None else lo, yhi if hi is None else hi))
            if run:
                runs.append(run)
            for run in runs:
                if len(run) == 1:
                    x, lo, hi = run[0]
                    out.append(Line([(sx(x), sy(lo)), (sx(x), sy(hi))], b.color, 6, cls="band", attrs=b.attrs))
                    continue
                pts = [(sx(x), sy(hi)) for x, _, hi in run] + [(sx(x), sy(lo)) for x, lo, _ in reversed(run)]
                out.append(Poly(pts, b.color, b.opacity, cls="band", attrs=b.attrs))
        for h in p.hlines:
            y = sy(h.y)
            out.append(Line([(LEFT, y), (LEFT + pw, y)], h.color, 1.5, h.dash, cls="hline", attrs=h.attrs))
            if h.label:
                lx = LEFT + 4 if h.anchor == "start" else LEFT + pw - 4
                out.append(Text(lx, y - 4, h.label, 10, h.color, anchor="start" if h.anchor == "start" else "end",
                                cls="hline-label"))
        for s in p.series:
            segs: list[list[tuple[float, float]]] = [[]]
            pts = s.points
            for j, (x, y) in enumerate(pts):
                if y is None or not math.isfinite(y):
                    if segs[-1]:
                        segs.append([])
                    continue
                if s.step and segs[-1]:
                    segs[-1].append((sx(x), segs[-1][-1][1]))
                segs[-1].append((sx(x), sy(y)))
                if s.step and j == len(pts) - 1:
                    segs[-1].append((sx(x1), sy(y)))
            for seg in segs:
                if len(seg) >= 2:
                    out.append(Line(seg, s.color, s.width, s.dash, cls="series", attrs=s.attrs))
            if s.dots:
                for x, y in pts:
                    if y is not None and math.isfinite(y):
                        out.append(Dot(sx(x), sy(y), 2.8, s.color, cls="pt", attrs=s.attrs,
                                       tip=f"{s.name} {xfmt(x)}: {fmt_num(y)}"))
        # axes
        out.append(Line([(LEFT, py0), (LEFT, py1), (LEFT + pw, py1)], AXIS, 1, cls="axis"))
        top = py1 + GAP
    # x labels under the last panel
    for t in xticks:
        out.append(Text(sx(t), top + 12, xfmt(t), 10, AXIS, anchor="middle", cls="xtick"))
    # stage labels and decision markers across all panels
    plot_bottom = top - GAP
    for sp in fig.spans:
        out.append(Text((sx(sp.x0) + sx(sp.x1)) / 2, plot_top + 13, sp.label, 10, "#718096", anchor="middle",
                        cls="stage-label"))
    for k, m in enumerate(fig.markers):
        color = MARKER_COLORS.get(m.kind, AXIS)
        x = sx(m.x)
        out.append(Line([(x, TITLE_H + 4 + 12 * (k % 2)), (x, plot_bottom)], color, 1.5, (4, 3), cls="marker",
                        attrs={"data-kind": m.kind}))
        anchor = "end" if x > W - 140 else "start"
        out.append(Text(x + (-3 if anchor == "end" else 3), TITLE_H + 12 + 12 * (k % 2), m.label, 10, color,
                        anchor=anchor, bold=True, cls="marker-label"))
    return W, H, out


# ----------------------------------------------------------------------------------------- SVG
def _attrs(d: dict[str, str]) -> str:
    return "".join(f' {k}="{escape(str(v))}"' for k, v in d.items())


def _dash(d: tuple[float, float] | None) -> str:
    return f' stroke-dasharray="{d[0]:g} {d[1]:g}"' if d else ""


def to_svg(fig: Figure) -> str:
    W, H, prims = layout(fig)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" role="img" aria-label="{escape(fig.title)}"{_attrs(fig.attrs)}>']
    for p in prims:
        if isinstance(p, Rect):
            op = "" if p.opacity >= 1 else f' fill-opacity="{p.opacity:g}"'
            parts.append(f'<rect class="{p.cls}" x="{p.x:.1f}" y="{p.y:.1f}" width="{max(p.w, 0):.1f}" '
                         f'height="{max(p.h, 0):.1f}" fill="{p.fill}"{op}/>')
        elif isinstance(p, Line):
            d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in p.points)
            parts.append(f'<path class="{p.cls}" d="{d}" fill="none" stroke="{p.color}" stroke-width="{p.width:g}" '
                         f'stroke-linejoin="round"{_dash(p.dash)}{_attrs(p.attrs)}/>')
        elif isinstance(p, Poly):
            d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in p.points) + " Z"
            parts.append(f'<path class="{p.cls}" d="{d}" fill="{p.fill}" fill-opacity="{p.opacity:g}" '
                         f'stroke="none"{_attrs(p.attrs)}/>')
        elif isinstance(p, Dot):
            tip = f"<title>{escape(p.tip)}</title>" if p.tip else ""
            parts.append(f'<circle class="{p.cls}" cx="{p.x:.1f}" cy="{p.y:.1f}" r="{p.r:g}" fill="{p.color}"'
                         f'{_attrs(p.attrs)}>{tip}</circle>')
        elif isinstance(p, Text):
            anchor = {"start": "start", "middle": "middle", "end": "end"}[p.anchor]
            weight = ' font-weight="bold"' if p.bold else ""
            parts.append(f'<text class="{p.cls}" x="{p.x:.1f}" y="{p.y:.1f}" font-size="{p.size}" fill="{p.color}" '
                         f'text-anchor="{anchor}"{weight}>{escape(p.text)}</text>')
    parts.append("</svg>")
    return "".join(parts)

