"""SVG charts for the HTML report: line charts, histograms, bar charts,
and PNG images as data: URIs. No plotting library, no network, no fonts to fetch.

Every function returns a complete ``<svg>`` element as text, with every label
escaped and every coordinate written with fixed precision, so the same numbers
always give the same bytes.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Sequence

# Colour-blind-safe palette (Okabe & Ito), fixed order.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
_FONT = 'font-family="sans-serif"'


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _f(v: float) -> str:
    """Coordinates with two decimals (deterministic text)."""
    return f"{v:.2f}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:g}"


def _frame(width: int, height: int, title: str, x_label: str, y_label: str, body: list[str],
           desc: str) -> str:
    head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
            f"<title>{_e(title)}</title>", f"<desc>{_e(desc)}</desc>",
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
            f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-size="14" font-weight="bold" {_FONT}>'
            f"{_e(title)}</text>",
            f'<text x="{width / 2:.0f}" y="{height - 6}" text-anchor="middle" font-size="12" {_FONT}>'
            f"{_e(x_label)}</text>",
            f'<text x="14" y="{height / 2:.0f}" text-anchor="middle" font-size="12" {_FONT} '
            f'transform="rotate(-90 14 {height / 2:.0f})">{_e(y_label)}</text>']
    return "\n".join(head + body + ["</svg>"])


class _Axes:
    """Maps data to pixels inside the plot area, and draws the axes with ticks."""

    def __init__(self, width, height, xlo, xhi, ylo, yhi, left=62, right=16, top=30, bottom=44):
        self.x0, self.x1 = left, width - right
        self.y0, self.y1 = height - bottom, top
        self.xt, self.yt = nice_ticks(xlo, xhi), nice_ticks(ylo, yhi)
        self.xlo, self.xhi = self.xt[0], self.xt[-1]
        self.ylo, self.yhi = self.yt[0], self.yt[-1]

    def x(self, v: float) -> float:
        return self.x0 + (v - self.xlo) / (self.xhi - self.xlo or 1.0) * (self.x1 - self.x0)

    def y(self, v: float) -> float:
        return self.y0 - (v - self.ylo) / (self.yhi - self.ylo or 1.0) * (self.y0 - self.y1)

    def draw(self, xticks: Sequence[float] | None = None, xtick_labels: Sequence[str] | None = None,
             rotate: bool = False) -> list[str]:
        out = []
        for t in self.yt:
            yy = _f(self.y(t))
            out.append(f'<line x1="{self.x0}" y1="{yy}" x2="{self.x1}" y2="{yy}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{self.x0 - 6}" y="{yy}" dy="4" text-anchor="end" font-size="11" {_FONT}>'
                       f"{_e(_tick_label(t))}</text>")
        xs = list(xticks) if xticks is not None else self.xt
        labels = list(xtick_labels) if xtick_labels is not None else [_tick_label(t) for t in xs]
        for t, lab in zip(xs, labels):
            xx = _f(self.x(t))
            out.append(f'<line x1="{xx}" y1="{self.y0}" x2="{xx}" y2="{self.y0 + 4}" stroke="#333333"/>')
            if rotate:
                out.append(f'<text x="{xx}" y="{self.y0 + 12}" text-anchor="end" font-size="10" {_FONT} '
                           f'transform="rotate(-40 {xx} {self.y0 + 12})">{_e(lab)}</text>')
            else:
                out.append(f'<text x="{xx}" y="{self.y0 + 16}" text-anchor="middle" font-size="11" {_FONT}>'
                           f"{_e(lab)}</text>")
        out.append(f'<line x1="{self.x0}" y1="{self.y0}" x2="{self.x1}" y2="{self.y0}" stroke="#333333"/>')
        out.append(f'<line x1="{self.x0}" y1="{self.y0}" x2="{self.x0}" y2="{self.y1}" stroke="#333333"/>')
        return out


def line_chart(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], *, title: str, x_label: str,
               y_label: str, width: int = 575, height: int = 320, y_range: tuple[float, float] | None = None,
               hline: tuple[float, str] | None = None) -> str:
    """One polyline with point markers per (label, [(x, y), ...]) series, sorted by x; a legend;
    an optional dashed horizontal line (value, label), e.g. a policy threshold."""
    pts = [(x, y) for _, s in series for x, y in s if math.isfinite(x) and math.isfinite(y)]
    if not pts:
        return _frame(width, height, title, x_label, y_label,
                      [f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" font-size="12" '
                       f'{_FONT}>no data</text>'], "no data")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ylo, yhi = y_range if y_range else (min(ys + ([hline[0]] if hline else [])),
                                       max(ys + ([hline[0]] if hline else [])))
    if yhi <= ylo:
        ylo, yhi = ylo - 0.5, yhi + 0.5
    ax = _Axes(width, height, min(xs), max(xs), ylo, yhi, right=200)
    body = ax.draw()
    if hline is not None and ax.ylo <= hline[0] <= ax.yhi:
        yy = _f(ax.y(hline[0]))
        body.append(f'<line x1="{ax.x0}" y1="{yy}" x2="{ax.x1}" y2="{yy}" stroke="#999999" '
                    f'stroke-dasharray="5,4"/>')
        body.append(f'<text x="{ax.x1 - 4}" y="{yy}" dy="-4" text-anchor="end" font-size="10" fill="#666666" '
                    f'{_FONT}>{_e(hline[1])}</text>')
    desc = []
    clean = [(label, sorted((x, y) for x, y in s if math.isfinite(x) and math.isfinite(y))) for label, s in series]
    n = len(clean)
    # Series that coincide must still be told apart: each has its own colour, dash pattern and
    # marker shape, earlier series are drawn wider underneath later ones, and markers of
    # coinciding points are spread sideways; the legend says which series are identical.
    first_seen: dict[tuple, str] = {}
    for i, (label, s) in enumerate(clean):
        if not s:
            continue
        color = PALETTE[i % len(PALETTE)]
        dash = _DASHES[i % len(_DASHES)]
        width_px = 2.0 + 1.2 * (n - 1 - i) if n > 1 else 2.0
        coords = " ".join(f"{_f(ax.x(x))},{_f(ax.y(y))}" for x, y in s)
        body.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="{width_px:.1f}" '
                    f'stroke-opacity="0.9"' + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
        same = sum(1 for j in range(i) if clean[j][1] and any(abs(ax.y(y) - ax.y(yj)) < 3 and x == xj
                                                               for x, y in s for xj, yj in clean[j][1]))
        dx = 5.0 * same  # a marker that would sit on an earlier series' marker is moved right
        for x, y in s:
            body.append(_marker(i, ax.x(x) + dx, ax.y(y), color, f"{label}: x={x:g}, y={y:.4g}"))
        ly = ax.y1 + 4 + 15 * i
        key = tuple(s)
        twin = first_seen.setdefault(key, label)
        lab = label if twin == label else f"{label} (= {twin})"
        lab = lab if len(lab) <= 30 else lab[:29] + "~"
        body.append(f'<line x1="{ax.x1 + 6}" y1="{ly + 1}" x2="{ax.x1 + 26}" y2="{ly + 1}" stroke="{color}" '
                    f'stroke-width="2"' + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
        body.append(_marker(i, ax.x1 + 16, ly + 1, color, label))
        body.append(f'<text x="{ax.x1 + 30}" y="{ly + 5}" font-size="11" {_FONT}>{_e(lab)}</text>')
        desc.append(f"{label}: " + ", ".join(f"({x:g}, {y:.4g})" for x, y in s))
    return _frame(width, height, title, x_label, y_label, body, "; ".join(desc))


_DASHES = ("", "7,4", "2,3", "9,3,2,3", "4,4", "1,5", "12,4", "3,2,1,2")


def _marker(i: int, cx: float, cy: float, color: str, title: str) -> str:
    """Marker shape i (circle, square, triangle, diamond, cross, ring, ...) at (cx, cy)."""
    t = f"<title>{_e(title)}</title>"
    shape = i % 6
    if shape == 0:
        return f'<circle cx="{_f(cx)}" cy="{_f(cy)}" r="3.5" fill="{color}">{t}</circle>'
    if shape == 1:
        return f'<rect x="{_f(cx - 3.5)}" y="{_f(cy - 3.5)}" width="7" height="7" fill="{color}">{t}</rect>'
    if shape == 2:
        pts = f"{_f(cx)},{_f(cy - 4.5)} {_f(cx - 4)},{_f(cy + 3)} {_f(cx + 4)},{_f(cy + 3)}"
        return f'<polygon points="{pts}" fill="{color}">{t}</polygon>'
    if shape == 3:
        pts = f"{_f(cx)},{_f(cy - 4.5)} {_f(cx + 4.5)},{_f(cy)} {_f(cx)},{_f(cy + 4.5)} {_f(cx - 4.5)},{_f(cy)}"
        return f'<polygon points="{pts}" fill="#ffffff" stroke="{color}" stroke-width="2">{t}</polygon>'
    if shape == 4:
        d = f"M{_f(cx - 4)},{_f(cy - 4)} L{_f(cx + 4)},{_f(cy + 4)} M{_f(cx - 4)},{_f(cy + 4)} L{_f(cx + 4)},{_f(cy - 4)}"
        return f'<path d="{d}" stroke="{color}" stroke-width="2.5">{t}</path>'
    return f'<circle cx="{_f(cx)}" cy="{_f(cy)}" r="4" fill="#ffffff" stroke="{color}" stroke-width="2">{t}</circle>'



def histogram(values: Sequence[float], *, title: str, x_label: str, bins: int = 20, width: int = 400,
              height: int = 240, mark_zero: bool = True) -> str:
    """Counts of values in `bins` equal-width bins; a red line at 0 (where a bit flips)."""
    vals = [float(v) for v in values if math.isfinite(float(v))]
    if not vals:
        return histogram_bins([], [], title=title, x_label=x_label, width=width, height=height)
    lo, hi = min(vals + ([0.0] if mark_zero else [])), max(vals + ([0.0] if mark_zero else []))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    w = (hi - lo) / bins
    counts = [0] * bins
    for v in vals:
        counts[min(bins - 1, int((v - lo) / w))] += 1
    return histogram_bins([lo + i * w for i in range(bins + 1)], counts, title=title, x_label=x_label,
                          width=width, height=height, mark_zero=mark_zero)


def histogram_bins(edges: Sequence[float], counts: Sequence[int], *, title: str, x_label: str, width: int = 400,
                   height: int = 240, mark_zero: bool = True) -> str:
    """A histogram from bins already counted (len(edges) == len(counts) + 1)."""
    edges, counts = [float(e) for e in edges], [int(c) for c in counts]
    if not counts or len(edges) != len(counts) + 1 or sum(counts) == 0:
        return _frame(width, height, title, x_label, "count",
                      [f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" font-size="12" '
                       f'{_FONT}>no data</text>'], "no data")
    lo, hi = edges[0], edges[-1]
    ax = _Axes(width, height, lo, hi, 0, max(counts))
    body = ax.draw()
    for i, c in enumerate(counts):
        if c == 0:
            continue
        xa, xb = ax.x(edges[i]), ax.x(edges[i + 1])
        body.append(f'<rect x="{_f(xa)}" y="{_f(ax.y(c))}" width="{_f(max(0.5, xb - xa - 1))}" '
                    f'height="{_f(ax.y(0) - ax.y(c))}" fill="{PALETTE[0]}">'
                    f"<title>[{edges[i]:.4g}, {edges[i + 1]:.4g}): {c}</title></rect>")
    if mark_zero and lo <= 0 <= hi:
        xx = _f(ax.x(0.0))
        body.append(f'<line x1="{xx}" y1="{ax.y0}" x2="{xx}" y2="{ax.y1}" stroke="#D55E00" stroke-width="1.5"/>')
    desc = f"{sum(counts)} values in {len(counts)} bins from {lo:.4g} to {hi:.4g}"
    return _frame(width, height, title, x_label, "count", body, desc)


def bar_chart(bars: Sequence[tuple[str, float]], *, title: str, y_label: str, width: int = 560,
              height: int = 380, hline: tuple[float, str] | None = None) -> str:
    """One bar per (label, value), labels under the bars (cut to 14 characters)."""
    vals = [v for _, v in bars if math.isfinite(v)]
    if not vals:
        return _frame(width, height, title, "", y_label, [], "no data")
    lo = min(0.0, min(vals + ([hline[0]] if hline else [])))
    hi = max(vals + ([hline[0]] if hline else []))
    ax = _Axes(width, height, 0, len(bars), lo, hi if hi > lo else lo + 1, bottom=130)
    n = len(bars)
    centers = [i + 0.5 for i in range(n)]
    body = ax.draw(centers, [(lab if len(lab) <= 24 else lab[:23] + "~") for lab, _ in bars], rotate=True)
    slot = ax.x(1) - ax.x(0)
    for i, (lab, v) in enumerate(bars):
        if not math.isfinite(v):
            continue
        x = ax.x(i) + slot * 0.15
        top, base = ax.y(max(v, 0.0)), ax.y(min(v, 0.0))
        body.append(f'<rect x="{_f(x)}" y="{_f(top)}" width="{_f(slot * 0.7)}" height="{_f(max(0.5, base - top))}" '
                    f'fill="{PALETTE[0] if v >= 0 else PALETTE[1]}"><title>{_e(lab)}: {v:.4g}</title></rect>')
    if hline is not None:
        yy = _f(ax.y(hline[0]))
        body.append(f'<line x1="{ax.x0}" y1="{yy}" x2="{ax.x1}" y2="{yy}" stroke="#999999" stroke-dasharray="5,4"/>')
        body.append(f'<text x="{ax.x1 - 4}" y="{yy}" dy="-4" text-anchor="end" font-size="10" fill="#666666" '
                    f'{_FONT}>{_e(hline[1])}</text>')
    return _frame(width, height, title, "", y_label, body, "; ".join(f"{lab}: {v:.4g}" for lab, v in bars))


def png_data_uri(gray, upscale: int = 8) -> str:
    """A 2-D uint8 array as a PNG data: URI (nearest-neighbour upscaled so a 10x10 logo is visible).

    PNG bytes from Pillow are deterministic for the same pixels (no timestamps written).
    """
    import numpy as np
    from PIL import Image

    a = np.asarray(gray, dtype=np.uint8)
    img = Image.fromarray(a)  # 2-D uint8 -> mode "L"
    if upscale > 1:
        img = img.resize((a.shape[1] * upscale, a.shape[0] * upscale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
