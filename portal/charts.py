"""The usage page's charts: the app's series drawn by the chart the admin uses too (apimgmt/charts.py)."""

from __future__ import annotations

from django.utils.safestring import SafeString

from apimgmt.charts import ChartBucket, ChartSeries, axis_ticks, bar_chart
from portal.usage import Series

__all__ = ["SERIES", "axis_ticks", "bucket_label", "usage_chart"]

# The portal shows an app's requests, its errors and its 429s (colours: portal.css).
SERIES = (
    ChartSeries("requests", "Requests", "s-requests"),
    ChartSeries("errors", "Errors", "s-errors"),
    ChartSeries("rate_limited", "429 Too Many Requests", "s-429"),
)


def bucket_label(series: Series, index: int) -> str:
    start = series.buckets[index].start
    return start.strftime("%H:%M") if series.interval == "hour" else start.strftime("%b %d")


def usage_chart(series: Series, *, title: str) -> SafeString:
    """Grouped bars per hour or day: requests, errors and 429s."""
    buckets = [
        ChartBucket(
            label=bucket_label(series, index),
            values={"requests": b.requests, "errors": b.errors, "rate_limited": b.rate_limited},
        )
        for index, b in enumerate(series.buckets)
    ]
    x_title = "Hour" if series.interval == "hour" else "Day"
    return bar_chart(buckets, SERIES, title=title, chart_id=f"chart-{series.interval}", x_title=x_title)
