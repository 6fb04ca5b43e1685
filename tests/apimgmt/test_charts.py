"""The one usage chart (apimgmt/charts.py): axes and their titles, even ticks, one bar per series, a legend,
and nothing the control plane's CSP would refuse."""

from __future__ import annotations

import re

from apimgmt.charts import STATUS_SERIES, ChartBucket, bar_chart, legend, status_class


def test_status_codes_fall_in_their_class() -> None:
    assert [status_class(code) for code in (200, 204, 301, 400, 404, 429, 500, 503)] == [
        "2xx",
        "2xx",
        "2xx",
        "4xx",
        "4xx",
        "429",
        "5xx",
        "5xx",
    ]


def test_the_chart_has_axes_titles_even_ticks_and_a_bar_per_status_class() -> None:
    buckets = [
        ChartBucket("13:00", {"2xx": 40, "4xx": 3, "429": 5, "5xx": 1}),
        ChartBucket("14:00", {"2xx": 12}),
    ]
    svg = str(bar_chart(buckets, STATUS_SERIES, title="Per hour", chart_id="c", x_title="Hour (UTC)"))
    assert svg.count("<rect ") == 5  # 4 classes in the first hour, 1 in the second
    assert ">13:00: 5 429 Too Many Requests</title>" in svg and ">13:00: 1 5xx</title>" in svg
    assert [int(t) for t in re.findall(r'text-anchor="end">(\d+)</text>', svg)] == [0, 10, 20, 30, 40]
    assert svg.count('class="axis-line"') == 2
    assert ">Hour (UTC)</text>" in svg and ">Requests</text>" in svg
    assert "Per hour: 52 2xx and 3xx, 3 4xx (not 429), 5 429 too many requests, 1 5xx" in svg
    assert "style=" not in svg and "<script" not in svg


def test_labels_are_escaped_and_the_legend_names_every_series() -> None:
    svg = str(bar_chart([ChartBucket("<b>", {"2xx": 1})], STATUS_SERIES, title="x & y", chart_id="c", x_title="t"))
    assert "<b>" not in svg and "&lt;b&gt;" in svg and "x &amp; y" in svg
    html = str(legend(STATUS_SERIES))
    assert html.count('class="legend-item"') == 4 and "4xx (not 429)" in html
