"""The management API's JSON parser: DRF's, plus a nesting limit so a deep body is a 400, never a RecursionError."""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

# Deeper than any document the API accepts (JSON fields allow 32 levels inside the body's own object), and far
# below the interpreter's recursion limit, so the answer does not depend on how deep the stack already is.
MAX_BODY_DEPTH = 64


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests (a scalar is 0, ``[]`` and ``{}`` are 1); iterative, so any depth is safe."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if depth > MAX_BODY_DEPTH:
            break
        stack.extend((child, depth) for child in children)
    return deepest


class ManagementJSONParser(JSONParser):
    """Parse JSON; refuse bodies nested deeper than ``MAX_BODY_DEPTH`` with a ParseError (400 problem+json)."""

    def parse(
        self, stream: IO[Any], media_type: str | None = None, parser_context: Mapping[str, Any] | None = None
    ) -> Any:
        too_deep = f"The JSON body is nested deeper than {MAX_BODY_DEPTH} levels; flatten it."
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            # The decoder recurses once per level; a body deep enough to exhaust the stack is too deep by far.
            raise ParseError(too_deep) from None
        if json_depth(data) > MAX_BODY_DEPTH:
            raise ParseError(too_deep)
        return data
