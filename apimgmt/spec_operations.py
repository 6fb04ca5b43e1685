"""The operations an API's OpenAPI document allows (restrict_to_spec): the contract between control plane and gateway.

The gateway compiles an ``OperationTable`` from a restricted API's spec paths when its route table loads
(gateway/routing.py) and asks ``match(method, path)`` with the request path below the API's base path
(gateway/pipeline.py). Paths follow the spec's precedence: a literal segment wins over a template (``/pets/mine``
before ``/pets/{petId}``), backtracking when the literal branch has no way on; a template matches one non-empty
segment, also inside a segment (``/files/{name}.{ext}``). ``HEAD`` is allowed wherever ``GET`` is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_TEMPLATE = re.compile(r"\{[^{}/]+\}")

ALLOWED = 200
NO_PATH = 404
NO_METHOD = 405


class _Segment:
    """A path segment with templates, e.g. ``{name}.{ext}``: its literal parts in order, each template between two
    of them standing for one or more characters. Matched without a regular expression: a segment of several
    templates that does not fit would make one backtrack for minutes (this runs before any key is checked)."""

    __slots__ = ("key", "parts")

    def __init__(self, segment: str) -> None:
        self.parts = _TEMPLATE.split(segment)  # literal text around the templates (n templates: n + 1 parts)
        self.key = "{}".join(self.parts)  # what makes two template segments the same

    def match(self, segment: str) -> bool:
        first, *middle, last = self.parts
        if not segment.startswith(first):
            return False
        position = len(first)
        # Each literal at its earliest place after at least one character of template: that leaves the most room
        # for the rest, so if any placement fits, this one does.
        for part in middle:
            found = segment.find(part, position + 1)
            if found < 0:
                return False
            position = found + len(part)
        end = len(segment) - len(last)
        return end >= position + 1 and segment.endswith(last)


@dataclass
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    # Segments with a template, in the order of the spec.
    templated: list[tuple[_Segment, _Node]] = field(default_factory=list)
    methods: frozenset[str] | None = None  # None: no operation ends here


@dataclass(frozen=True)
class Match:
    status: int  # ALLOWED, NO_PATH or NO_METHOD
    allow: frozenset[str] = frozenset()  # for NO_METHOD: the Allow header's methods (upper case)
    template: str = ""  # the spec's path that matched


class OperationTable:
    def __init__(self, spec: dict[str, Any]) -> None:
        self._root = _Node()
        self._templates: dict[int, str] = {}
        self.size = 0
        for path, item in (spec.get("paths") or {}).items():
            if not isinstance(path, str) or not path.startswith("/") or not isinstance(item, dict):
                continue
            methods = {m.upper() for m in METHODS if m in item}
            if not methods:
                continue
            if "GET" in methods:
                methods.add("HEAD")
            node = self._root
            for segment in path[1:].split("/"):
                node = self._child(node, segment)
            node.methods = frozenset(methods | (node.methods or frozenset()))
            self._templates[id(node)] = path
            self.size += sum(1 for m in METHODS if m in item)

    @staticmethod
    def _child(node: _Node, segment: str) -> _Node:
        if not _TEMPLATE.search(segment):
            return node.literal.setdefault(segment, _Node())
        pattern = _Segment(segment)
        for existing, child in node.templated:
            if existing.key == pattern.key:
                return child
        child = _Node()
        node.templated.append((pattern, child))
        return child

    def match(self, method: str, path: str) -> Match:
        """``path``: the request path below the base path, as sent (``/pets/42``; ``""`` is the base path itself)."""
        segments = path[1:].split("/") if path.startswith("/") else [path]
        found = self._find(self._root, segments, 0)
        if found is None:
            return Match(NO_PATH)
        assert found.methods is not None
        template = self._templates[id(found)]
        if method.upper() in found.methods:
            return Match(ALLOWED, template=template)
        return Match(NO_METHOD, allow=found.methods, template=template)

    def _find(self, node: _Node, segments: list[str], index: int) -> _Node | None:
        if index == len(segments):
            return node if node.methods is not None else None
        segment = segments[index]
        child = node.literal.get(segment)
        if child is not None:
            found = self._find(child, segments, index + 1)
            if found is not None:
                return found
        if segment:
            for pattern, templated in node.templated:
                if pattern.match(segment):
                    found = self._find(templated, segments, index + 1)
                    if found is not None:
                        return found
        return None
