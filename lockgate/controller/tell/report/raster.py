"""A tiny pure-Python rasteriser: chart primitives (:mod:`.charts`) → PNG bytes.

No plotting library: the report's PNG is the same laid-out primitives as its SVG, drawn with
thick lines (square brush along Bresenham), scan-line filled polygons with alpha, discs, and a
classic 5×7 bitmap font, then encoded with ``zlib`` (PNG, 8-bit RGB, filter 0). Deliberately
small and dependency-free; anti-aliasing is not attempted.
"""

from __future__ import annotations

import math
import struct
import zlib

from lockgate.controller.tell.report.charts import Dot, Line, Poly, Primitive, Rect, Text

# Classic 5x7 font (columns, bit 0 = top row) for ASCII 0x20..0x7E.
_FONT_HEX = (
    "0000000000" "00005f0000" "0007000700" "147f147f14" "242a7f2a12" "2313086462" "3649552250" "0005030000"
    "001c224100" "0041221c00" "14083e0814" "08083e0808" "0050300000" "0808080808" "0060600000" "2010080402"
    "3e5149453e" "00427f4000" "4261514946" "2141454b31" "1814127f10" "2745454539" "3c4a494930" "0171090503"
    "3649494936" "064949291e" "0036360000" "0056360000" "0814224100" "1414141414" "0041221408" "0201510906"
    "324979413e" "7e1111117e" "7f49494936" "3e41414122" "7f4141221c" "7f49494941" "7f09090901" "3e4149497a"
    "7f0808087f" "00417f4100" "2040413f01" "7f08142241" "7f40404040" "7f020c027f" "7f0408107f" "3e4141413e"
    "7f09090906" "3e4151215e" "7f09192946" "4649494931" "01017f0101" "3f4040403f" "1f2040201f" "3f4038403f"
    "6314081463" "0708700807" "6151494543" "007f414100" "0204081020" "0041417f00" "0402010204" "4040404040"
    "0001020400" "2054545478" "7f48444438" "3844444420" "384444487f" "3854545418" "087e090102" "0c5252523e"
    "7f08040478" "00447d4000" "2040443d00" "7f10284400" "00417f4000" "7c04180478" "7c08040478" "3844444438"
    "7c14141408" "081414187c" "7c08040408" "4854545420" "043f444020" "3c4040207c" "1c2040201c" "3c4030403c"
    "4428102844" "0c5050503c" "4464544c44" "0008364100" "00007f0000" "0041360800" "0804080408"
)
_GLYPHS = {chr(0x20 + i): bytes.fromhex(_FONT_HEX[i * 10:i * 10 + 10]) for i in range(len(_FONT_HEX) // 10)}
_SUBST = {"→": "->", "−": "-", "–": "-", "—": "-", "…": "...", "·": ".", "×": "x", "≥": ">=", "≤": "<=",
          "±": "+-", "‰": "o/oo"}


def _rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    if len(c) == 3:
        c = "".join(ch * 2 for ch in c)
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


class Canvas:
    def __init__(self, w: int, h: int, bg: str = "#ffffff"):
        self.w, self.h = w, h
        self.px = bytearray(bytes(_rgb(bg)) * (w * h))
        self.clip = (0, 0, w, h)

    # --- pixels
    def blend(self, x: int, y: int, rgb: tuple[int, int, int], a: float = 1.0) -> None:
        x0, y0, x1, y1 = self.clip
        if x0 <= x < x1 and y0 <= y < y1:
            i = (y * self.w + x) * 3
            if a >= 1.0:
                self.px[i:i + 3] = bytes(rgb)
            else:
                p = self.px
                p[i] = int(p[i] + (rgb[0] - p[i]) * a)
                p[i + 1] = int(p[i + 1] + (rgb[1] - p[i + 1]) * a)
                p[i + 2] = int(p[i + 2] + (rgb[2] - p[i + 2]) * a)

    def hspan(self, x0: int, x1: int, y: int, rgb: tuple[int, int, int], a: float = 1.0) -> None:
        """Pixels x0..x1-1 of row y."""
        cx0, cy0, cx1, cy1 = self.clip
        if not cy0 <= y < cy1:
            return
        x0, x1 = max(x0, cx0), min(x1, cx1)
        if x1 <= x0:
            return
        if a >= 1.0:
            i = (y * self.w + x0) * 3
            self.px[i:i + 3 * (x1 - x0)] = bytes(rgb) * (x1 - x0)
        else:
            for x in range(x0, x1):
                self.blend(x, y, rgb, a)

    # --- shapes
    def rect(self, x: float, y: float, w: float, h: float, color: str, a: float = 1.0) -> None:
        rgb = _rgb(color)
        for yy in range(int(round(y)), int(round(y + h))):
            self.hspan(int(round(x)), int(round(x + w)), yy, rgb, a)

    def disc(self, cx: float, cy: float, r: float, color: str, a: float = 1.0) -> None:
        rgb = _rgb(color)
        for yy in range(int(math.floor(cy - r)), int(math.ceil(cy + r)) + 1):
            dy = yy + 0.5 - cy
            if abs(dy) > r:
                continue
            dx = math.sqrt(r * r - dy * dy)
            self.hspan(int(round(cx - dx)), int(round(cx + dx)), yy, rgb, a)

    def line(self, pts: list[tuple[float, float]], color: str, width: float = 1.0,
             dash: tuple[float, float] | None = None) -> None:
        rgb = _rgb(color)
        half = max(0, int(round(width)) - 1) // 2
        extra = max(0, int(round(width)) - 1) - half
        travelled = 0.0
        period = (dash[0] + dash[1]) if dash else 0.0
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            n = int(max(abs(bx - ax), abs(by - ay))) + 1
            seg = math.hypot(bx - ax, by - ay)
            for k in range(n + 1):
                t = k / n if n else 0.0
                if dash and ((travelled + seg * t) % period) >= dash[0]:
                    continue
                x, y = int(round(ax + (bx - ax) * t)), int(round(ay + (by - ay) * t))
                for yy in range(y - half, y + extra + 1):
                    self.hspan(x - half, x + extra + 1, yy, rgb)
            travelled += seg

    def polygon(self, pts: list[tuple[float, float]], color: str, a: float = 1.0) -> None:
        """Even-odd scan-line fill; each covered pixel is blended once."""
        if len(pts) < 3:
            return
        rgb = _rgb(color)
        ys = [p[1] for p in pts]
        edges = list(zip(pts, pts[1:] + pts[:1]))
        for yy in range(max(0, int(math.floor(min(ys)))), min(self.h, int(math.ceil(max(ys))) + 1)):
            yc = yy + 0.5
            xs = []
            for (x0, y0), (x1, y1) in edges:
                if (y0 <= yc < y1) or (y1 <= yc < y0):
                    xs.append(x0 + (yc - y0) * (x1 - x0) / (y1 - y0))
            xs.sort()
            for i in range(0, len(xs) - 1, 2):
                self.hspan(int(round(xs[i])), int(round(xs[i + 1])), yy, rgb, a)

    def text(self, x: float, y: float, s: str, scale: int, color: str, anchor: str = "start",
             bold: bool = False) -> None:
        for a, b in _SUBST.items():
            s = s.replace(a, b)
        s = "".join(ch if ch in _GLYPHS else "?" for ch in s)
        w = len(s) * 6 * scale - scale
        if anchor == "middle":
            x -= w / 2
        elif anchor == "end":
            x -= w
        rgb = _rgb(color)
        x0, y0 = int(round(x)), int(round(y)) - 7 * scale
        for ci, ch in enumerate(s):
            cols = _GLYPHS[ch]
            for cx in range(5):
                bits = cols[cx]
                for cy in range(7):
                    if bits >> cy & 1:
                        px = x0 + (ci * 6 + cx) * scale
                        py = y0 + cy * scale
                        for dy in range(scale):
                            self.hspan(px, px + scale + (1 if bold else 0), py + dy, rgb)

    # --- output
    def png(self) -> bytes:
        raw = bytearray()
        stride = self.w * 3
        for y in range(self.h):
            raw.append(0)
            raw += self.px[y * stride:(y + 1) * stride]

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + chunk(b"IEND", b""))


def render(width: int, height: int, prims: list[Primitive], scale: int = 2) -> Canvas:
    c = Canvas(width * scale, height * scale)
    for p in prims:
        if isinstance(p, Rect):
            c.rect(p.x * scale, p.y * scale, p.w * scale, p.h * scale, p.fill, p.opacity)
        elif isinstance(p, Poly):
            c.polygon([(x * scale, y * scale) for x, y in p.points], p.fill, p.opacity)
        elif isinstance(p, Line):
            c.line([(x * scale, y * scale) for x, y in p.points], p.color, p.width * scale,
                   (p.dash[0] * scale, p.dash[1] * scale) if p.dash else None)
        elif isinstance(p, Dot):
            c.disc(p.x * scale, p.y * scale, p.r * scale, p.color)
        elif isinstance(p, Text):
            # the 5x7 font is 7 px tall: ~size 11 → 1x, scaled with the picture
            fs = max(1, round(p.size * scale / 11))
            c.text(p.x * scale, p.y * scale, p.text, fs, p.color, p.anchor, p.bold)
    return c


def to_png(width: int, height: int, prims: list[Primitive], scale: int = 2) -> bytes:
    return render(width, height, prims, scale).png()


def read_png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])
