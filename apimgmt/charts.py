"""The one usage chart of the admin and the portal: a server-side SVG bar chart with axes, axis titles, even
round ticks, one bar per series and bucket, and a legend.

No JavaScript and no inline style (the control plane's CSP): colours come from CSS classes, defined once in
``apimgmt/static/apimgmt/chart.css`` (the portal's stylesheet sets the same classes in its own palette). Every
bar carries a <title> with its bucket, value and series, and the whole chart one summary title, so it is
readable without colour; the pages also offer the numbers as a table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

from django.utils.safestring import SafeString, mark_safe

WIDTH = 720
HEIGHT = 260
PAD_LEFT = 96  # the y-axis title, then the y labels, also at the phone font size (e.g. "15000")
PAD_RIGHT = 28  # half of the newest bucket's label, which is always drawn
PAD_TOP = 12
PAD_BOTTOM = 52  # the x labels and the x-axis title
MAX_TICKS = 5  # intervals on the y axis, at most
MAX_X_LABELS = 8


@dataclass(frozen=True)
class ChartSeries:
    key: str  # the key of the bucket's values
    label: str  # in the legend and the bars' titles
    css: str  # the class that colours it (chart.css, portal.css)


@dataclass(frozen=True)
class ChartBucket:
    label: str  # on the x axis, e.g. "14:00" or "Nov 30"
    values: Mapping[str, int]


# The admin's split by status class; "4xx" leaves 429 out, which has its own bar.
STATUS_SERIES = (
    ChartSeries("2xx", "2xx and 3xx", "s-2xx"),
    ChartSeries("4xx", "4xx (not 429)", "s-4xx"),
    ChartSeries("429", "429 Too Many Requests", "s-429"),
    ChartSeries("5xx", "5xx", "s-5xx"),
)


def status_class(status_code: int) -> str:
    """Which of STATUS_SERIES a status code counts in."""
    if status_code == 429:
        return "429"
    if status_code >= 500:
        return "5xx"
    if status_code >= 400:
        return "4xx"
    return "2xx"


def axis_ticks(peak: int) -> list[int]:
    """Evenly spaced whole-number ticks from 0 to at least ``peak``: a step of 1, 2 or 5 times a power of ten,
    at most MAX_TICKS intervals (5 → 0 1 2 3 4 5; 37 → 0 10 20 30 40; never 0 1 2 4 5)."""
    peak = max(peak, 1)
    step = 1
    while True:
        for factor in (1, 2, 5):
            if math.ceil(peak / (step * factor)) <= MAX_TICKS:
                top = step * factor * math.ceil(peak / (step * factor))
                return list(range(0, top + 1, step * factor))
        step *= 10


def legend(series: Sequence[ChartSeries]) -> SafeString:
    """The series' colours and names; each swatch stays with its words when the legend wraps."""
    items = "".join(
        f'<span class="legend-item"><span class="sw {escape(s.css)}"></span> {escape(s.label)}</span> ' for s in series
    )
    return mark_safe(f'<p class="legend small">{items.strip()}</p>')  # noqa: S308 — escaped above


def bar_chart(
    buckets: Sequence[ChartBucket],
    series: Sequence[ChartSeries],
    *,
    title: str,
    chart_id: str,
    x_title: str,
    y_title: str = "Requests",
) -> SafeString:
    """Grouped bars per bucket (one per series), y axis from 0 with even ticks, both axes titled."""
    count = len(buckets)
    peak = max((int(b.values.get(s.key, 0)) for b in buckets for s in series), default=0)
    ticks = axis_ticks(peak)
    top = ticks[-1]
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    base_y = PAD_TOP + plot_h
    slot = plot_w / max(count, 1)
    bar_w = max(slot / (len(series) + 1), 1.0)

    def y(value: int) -> float:
        return base_y - (value / top) * plot_h

    totals = ", ".join(f"{sum(int(b.values.get(s.key, 0)) for b in buckets)} {s.label.lower()}" for s in series)
    parts: list[str] = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="{escape(chart_id)}-t" '
        'preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{escape(chart_id)}-t">{escape(title)}: {escape(totals)}</title>',
    ]
    for value in ticks:
        gy = y(value)
        parts.append(f'<line class="grid" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{gy:.1f}" y2="{gy:.1f}"/>')
        parts.append(f'<text class="axis" x="{PAD_LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end">{value}</text>')
    # The axes themselves, over the grid.
    parts.append(f'<line class="axis-line" x1="{PAD_LEFT}" x2="{PAD_LEFT}" y1="{PAD_TOP}" y2="{base_y}"/>')
    parts.append(f'<line class="axis-line" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{base_y}" y2="{base_y}"/>')
    label_every = max(1, math.ceil(count / MAX_X_LABELS))
    for index, bucket in enumerate(buckets):
        x0 = PAD_LEFT + index * slot + bar_w / 2
        for offset, s in enumerate(series):
            value = int(bucket.values.get(s.key, 0))
            if value <= 0:
                continue
            bx = x0 + offset * bar_w
            by = y(value)
            parts.append(
                f'<rect class="{escape(s.css)}" x="{bx:.1f}" y="{by:.1f}" width="{bar_w:.1f}" '
                f'height="{base_y - by:.1f}"><title>{escape(bucket.label)}: {value} {escape(s.label)}</title></rect>'
            )
        if (count - 1 - index) % label_every == 0:  # counted from the newest, which is always labelled
            cx = PAD_LEFT + (index + 0.5) * slot
            parts.append(
                f'<text class="axis" x="{cx:.1f}" y="{base_y + 18}" text-anchor="middle">{escape(bucket.label)}</text>'
            )
    parts.append(
        f'<text class="axis axis-title" x="{PAD_LEFT + plot_w / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle">'
        f"{escape(x_title)}</text>"
    )
    parts.append(
        f'<text class="axis axis-title" x="26" y="{PAD_TOP + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 26 {PAD_TOP + plot_h / 2:.1f})">{escape(y_title)}</text>'
    )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 — every interpolated text is escaped above; numbers are ours
