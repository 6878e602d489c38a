"""Server-rendered SVG charts for the stats page: no script, no CDN, nothing a browser must fetch.

Two shapes cover the page: a line chart (series over minutes or over model versions) and a grouped
bar chart (values per category). Every label and name is escaped here, since the caller's strings
come from Redis (categories, route kinds, version names). Each series carries ``data-series`` and
each point a ``<title>`` with its value, so a reader can hover a point and a test can find it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

PALETTE = ("#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00")
WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 150, 12, 28  # margins: the legend sits at the right


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]  # one per x position; None: no value there (a gap in the line)


def _fmt(v: float) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:.0f}"


def _frame(chart_id: str, title: str, y_max: float, x_labels: Sequence[str], y_unit: str) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    out = [f'<svg id="{escape(chart_id)}" class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
           f'width="100%" style="max-width:{WIDTH}px" xmlns="http://www.w3.org/2000/svg">',
           f"<title>{escape(title)}</title>"]
    for i in range(5):  # horizontal grid lines with their values
        v = y_max * i / 4
        y = TOP + plot_h * (1 - i / 4)
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e7ec"/>'
                   f'<text x="{LEFT - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end" fill="#667085">'
                   f"{escape(_fmt(v) + y_unit)}</text>")
    n = len(x_labels)
    ticks = sorted({0, n - 1, *range(0, n, max(1, n // 5))}) if n else []
    for i in ticks:  # a few x labels, never all of them
        out.append(f'<text x="{_x(i, n):.1f}" y="{HEIGHT - 8}" font-size="10" text-anchor="middle" fill="#667085">'
                   f"{escape(x_labels[i])}</text>")
    return out


def _x(i: int, n: int) -> float:
    span = WIDTH - LEFT - RIGHT
    return LEFT + (span * i / (n - 1) if n > 1 else span / 2)


def _y(v: float, y_max: float) -> float:
    return TOP + (HEIGHT - TOP - BOTTOM) * (1 - min(max(v, 0.0), y_max) / y_max)  # the point's title keeps its value


def _legend(out: list[str], names: Sequence[str]) -> None:
    for j, name in enumerate(names):
        y = TOP + 6 + 16 * j
        out.append(f'<rect x="{WIDTH - RIGHT + 10}" y="{y - 8}" width="10" height="10" fill="{PALETTE[j % len(PALETTE)]}"/>'
                   f'<text class="legend" x="{WIDTH - RIGHT + 24}" y="{y + 1}" font-size="11">{escape(name)}</text>')


def _y_max(values: Sequence[float | None], fixed: float | None) -> float:
    if fixed is not None:
        return fixed
    top = max((v for v in values if v is not None), default=0.0)
    if top <= 0:
        return 1.0
    scale = 10 ** math.floor(math.log10(top))  # the next 1, 2, 4, 5 or 8 times a power of ten: round grid values
    return next(m * scale for m in (1, 2, 4, 5, 8, 10) if m * scale >= top)


def line_chart(chart_id: str, title: str, x_labels: Sequence[str], series: Sequence[Series], *,
               y_max: float | None = None, y_unit: str = "") -> Markup:
    """One line per series over ``x_labels``; ``y_max`` fixes the scale (1 for shares), else it fits the data."""
    top = _y_max([v for s in series for v in s.values], y_max)
    out = _frame(chart_id, title, top, x_labels, y_unit)
    n = len(x_labels)
    for j, s in enumerate(series):
        colour = PALETTE[j % len(PALETTE)]
        runs: list[list[str]] = [[]]  # a None breaks the line
        dots = []
        for i, v in enumerate(s.values):
            if v is None:
                runs.append([])
                continue
            x, y = _x(i, n), _y(v, top)
            runs[-1].append(f"{x:.1f},{y:.1f}")
            dots.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}">'
                        f"<title>{escape(f'{s.name} at {x_labels[i]}: {_fmt(v)}{y_unit}')}</title></circle>")
        out.append(f'<g class="series" data-series="{escape(s.name)}">')
        out += [f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{" ".join(r)}"/>'
                for r in runs if len(r) > 1]
        out += dots
        out.append("</g>")
    _legend(out, [s.name for s in series])
    out.append("</svg>")
    return Markup("".join(out))


def bar_chart(chart_id: str, title: str, groups: Sequence[str], series: Sequence[Series], *,
              y_max: float | None = None) -> Markup:
    """Bars per group (``groups`` are the x labels), one bar per series in each group; None: no bar."""
    top = _y_max([v for s in series for v in s.values], y_max)
    out = _frame(chart_id, title, top, [], "")
    span = (WIDTH - LEFT - RIGHT) / max(1, len(groups))
    bar = span * 0.8 / max(1, len(series))
    for g, group in enumerate(groups):
        x0 = LEFT + g * span + span * 0.1
        out.append(f'<text x="{x0 + span * 0.4:.1f}" y="{HEIGHT - 8}" font-size="10" text-anchor="middle" '
                   f'fill="#667085">{escape(group[:18])}</text>')
    for j, s in enumerate(series):
        out.append(f'<g class="series" data-series="{escape(s.name)}">')
        for g, v in enumerate(s.values):
            if v is None:
                continue
            x, y = LEFT + g * span + span * 0.1 + j * bar, _y(v, top)
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{HEIGHT - BOTTOM - y:.1f}" '
                       f'fill="{PALETTE[j % len(PALETTE)]}"><title>{escape(f"{s.name}, {groups[g]}: {_fmt(v)}")}'
                       "</title></rect>")
        out.append("</g>")
    _legend(out, [s.name for s in series])
    out.append("</svg>")
    return Markup("".join(out))
