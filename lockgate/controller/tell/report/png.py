"""The report's PNG: the laid-out chart primitives (:func:`.charts.layout`) drawn by matplotlib (Agg).

The same primitives feed the HTML's SVG (:func:`.charts.to_svg`), so the picture and the page show
the very same lines at the very same places; matplotlib draws them anti-aliased, with real fonts
(DejaVu Sans, bundled with matplotlib), alpha-blended polygons and dashed lines. One layout pixel is
``scale`` PNG pixels. matplotlib is imported on first use only (``lockgate history`` and the
controller never pay for it); no display is needed (the Agg canvas, no ``pyplot``).
"""

from __future__ import annotations

import io
from typing import Sequence

from lockgate.controller.tell.report.charts import Dot, Line, Poly, Primitive, Rect, Text

#: matplotlib works in points (1/72 inch); a layout pixel is 1/BASE_DPI inch, as in a browser at 96 dpi
BASE_DPI = 96.0
_PT = 72.0 / BASE_DPI  #: points per layout pixel
_FONT = "DejaVu Sans"
_HA = {"start": "left", "middle": "center", "end": "right"}


def to_png(width: int, height: int, prims: Sequence[Primitive], scale: int = 2) -> bytes:
    """Draw ``prims`` (pixel coordinates, y down, on a ``width`` × ``height`` canvas) into PNG bytes of
    ``width*scale`` × ``height*scale`` pixels (8-bit RGBA)."""
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Polygon, Rectangle

    with rc_context({"lines.scale_dashes": False, "font.family": _FONT, "path.simplify": False,
                     "svg.fonttype": "none"}):
        fig = Figure(figsize=(width / BASE_DPI, height / BASE_DPI), dpi=BASE_DPI * scale)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_axis_off()
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        for z, p in enumerate(prims):
            if isinstance(p, Rect):
                ax.add_patch(Rectangle((p.x, p.y), max(p.w, 0), max(p.h, 0), facecolor=p.fill, alpha=p.opacity,
                                       edgecolor="none", linewidth=0, zorder=z))
            elif isinstance(p, Line):
                xs, ys = zip(*p.points) if p.points else ((), ())
                dashes = (0, (p.dash[0] * _PT, p.dash[1] * _PT)) if p.dash else "solid"
                ax.plot(xs, ys, color=p.color, linewidth=p.width * _PT, linestyle=dashes, solid_joinstyle="round",
                        dash_joinstyle="round", solid_capstyle="butt", zorder=z)
            elif isinstance(p, Poly):
                ax.add_patch(Polygon(p.points, closed=True, facecolor=p.fill, alpha=p.opacity, edgecolor="none",
                                     linewidth=0, zorder=z))
            elif isinstance(p, Dot):
                ax.add_patch(Circle((p.x, p.y), p.r, facecolor=p.color, edgecolor="none", linewidth=0, zorder=z))
            elif isinstance(p, Text):
                ax.text(p.x, p.y, p.text, fontsize=p.size * _PT, color=p.color, ha=_HA[p.anchor], va="baseline",
                        fontweight="bold" if p.bold else "normal", zorder=z)
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=BASE_DPI * scale, metadata={"Software": None})
        return out.getvalue()


def read_png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; ValueError if ``data`` is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


__all__ = ["BASE_DPI", "read_png_size", "to_png"]
