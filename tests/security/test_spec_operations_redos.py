"""restrict_to_spec matches a request before any key is checked, so matching must cost time in proportion to the
path, whatever templates the spec has: a segment of several templates (``{a}{b}{c}…x``) against a long segment
that does not fit was exponential backtracking in a regular expression, a gateway worker stuck for minutes per
unauthenticated request."""

from __future__ import annotations

import time

import pytest

from apimgmt.spec_operations import ALLOWED, NO_PATH, OperationTable

HOSTILE = {
    "paths": {
        "/p/" + "".join(f"{{a{i}}}" for i in range(8)) + "x": {"get": {}},
        "/q/{a}.{b}.{c}.{d}:go": {"get": {}},
    }
}


@pytest.mark.parametrize("path", ["/p/" + "a" * 3000, "/q/" + "a." * 1500, "/q/" + "a." * 1500 + "a:gox"])
def test_a_segment_that_does_not_fit_many_templates_is_refused_at_once(path: str) -> None:
    table = OperationTable(HOSTILE)
    started = time.perf_counter()
    assert table.match("GET", path).status == NO_PATH
    assert time.perf_counter() - started < 0.5  # microseconds when idle; it was minutes


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/p/abcdefghx", ALLOWED),  # one character per template
        ("/p/abcdefgx", NO_PATH),  # one too few
        ("/p/" + "a" * 3000 + "x", ALLOWED),
        ("/q/1.2.3.4:go", ALLOWED),
        ("/q/1.2.3.4.5.6:go", ALLOWED),  # a template may hold the separator
        ("/q/1.2.3.:go", NO_PATH),  # but not be empty
        ("/q/1..3.4:go", NO_PATH),
        ("/q/1.2.3.4:go:go", ALLOWED),
        ("/q/1.2.3.4:gone", NO_PATH),
    ],
)
def test_templates_still_match_one_or_more_characters_each(path: str, status: int) -> None:
    assert OperationTable(HOSTILE).match("GET", path).status == status
