"""Server-side SVG charts for the usage page: no JavaScript, no CDN, readable without colour (a data table follows)."""

from __future__ import annotations

import math
from html import escape

from django.utils.safestring import SafeString, mark_safe

from portal.usage import Series

WIDTH = 720
HEIGHT = 240
PAD_LEFT = 84  # room for the y labels at the phone font size (portal.css), e.g. "15000"
PAD_RIGHT = 28  # half of the newest bucket's label, which is always drawn
PAD_TOP = 12
PAD_BOTTOM = 36

# (attribute on Bucket, legend label, CSS class that sets the colour in portal.css)
SERIES = (
    ("requests", "Requests", "s-requests"),
    ("errors", "Errors", "s-errors"),
    ("rate_limited", "429 Too Many Requests", "s-429"),
)


MAX_TICKS = 5  # intervals on the y axis, at most


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


def bucket_label(series: Series, index: int) -> str:
    start = series.buckets[index].start
    return start.strftime("%H:%M") if series.interval == "hour" else start.strftime("%b %d")


def usage_chart(series: Series, *, title: str) -> SafeString:
    """Grouped bars per bucket: requests, errors and 429s."""
    count = len(series.buckets)
    peak = max((max(b.requests, b.errors, b.rate_limited) for b in series.buckets), default=0)
    ticks = axis_ticks(peak)
    top = ticks[-1]
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    slot = plot_w / max(count, 1)
    bar_w = max(slot / (len(SERIES) + 1), 1.0)

    def y(value: int) -> float:
        return PAD_TOP + plot_h - (value / top) * plot_h

    parts: list[str] = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="chart-{series.interval}-t" '
        'preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="chart-{series.interval}-t">{escape(title)}: {series.total_requests} requests, '
        f"{series.total_errors} errors, {series.total_rate_limited} rate limited</title>",
    ]
    for value in ticks:
        gy = y(value)
        parts.append(f'<line class="grid" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{gy:.1f}" y2="{gy:.1f}"/>')
        parts.append(f'<text class="axis" x="{PAD_LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end">{value}</text>')
    label_every = max(1, math.ceil(count / 8))
    for index, bucket in enumerate(series.buckets):
        x0 = PAD_LEFT + index * slot + bar_w / 2
        for offset, (attr, label, css) in enumerate(SERIES):
            value = int(getattr(bucket, attr))
            if value <= 0:
                continue
            bx = x0 + offset * bar_w
            by = y(value)
            parts.append(
                f'<rect class="{css}" x="{bx:.1f}" y="{by:.1f}" width="{bar_w:.1f}" height="{PAD_TOP + plot_h - by:.1f}">'
                f"<title>{escape(bucket_label(series, index))}: {value} {escape(label.lower())}</title></rect>"
            )
        if (count - 1 - index) % label_every == 0:  # counted from the newest, which is always labelled
            cx = PAD_LEFT + (index + 0.5) * slot
            parts.append(
                f'<text class="axis" x="{cx:.1f}" y="{HEIGHT - PAD_BOTTOM + 16}" text-anchor="middle">'
                f"{escape(bucket_label(series, index))}</text>"
            )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 — every interpolated text is escaped above; numbers are ours
