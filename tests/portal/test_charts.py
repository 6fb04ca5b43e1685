"""The usage chart's y axis: evenly spaced round ticks from 0 to at least the highest bar."""

from __future__ import annotations

import itertools

import pytest

from apimgmt.charts import axis_ticks


@pytest.mark.parametrize(
    ("peak", "ticks"),
    [
        (0, [0, 1]),
        (1, [0, 1]),
        (4, [0, 1, 2, 3, 4]),
        (5, [0, 1, 2, 3, 4, 5]),
        (6, [0, 2, 4, 6]),
        (37, [0, 10, 20, 30, 40]),
        (120, [0, 50, 100, 150]),
        (1000, [0, 200, 400, 600, 800, 1000]),
        (1001, [0, 500, 1000, 1500]),
    ],
)
def test_ticks_are_even_round_and_reach_the_peak(peak: int, ticks: list[int]) -> None:
    assert axis_ticks(peak) == ticks


@pytest.mark.parametrize("peak", [*range(130), 999, 12345, 10**7 + 3])
def test_every_peak_gets_evenly_spaced_ticks(peak: int) -> None:
    ticks = axis_ticks(peak)
    steps = {b - a for a, b in itertools.pairwise(ticks)}
    assert ticks[0] == 0 and ticks[-1] >= peak and len(steps) == 1 and 2 <= len(ticks) <= 6
