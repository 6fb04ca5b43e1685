"""Limit/offset pagination for every management API list: ``count``, ``next``, ``previous``, ``results``."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.views import APIView

MAX_OFFSET = 10**9


class ManagementPagination(LimitOffsetPagination):
    """A limit or offset that is not a whole number in range is a 400, not silently replaced."""

    default_limit = 50
    max_limit = 500

    def _read(self, request: Request, name: str, low: int, high: int, default: int) -> int:
        raw = request.query_params.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if not raw.strip().isdigit() or not low <= value <= high:
            raise exceptions.ValidationError({name: [f"{name} must be a whole number from {low} to {high}."]})
        return value

    def get_limit(self, request: Request) -> int:
        return self._read(request, self.limit_query_param, 1, self.max_limit, self.default_limit)

    def get_offset(self, request: Request) -> int:
        return self._read(request, self.offset_query_param, 0, MAX_OFFSET, 0)

    def get_schema_operation_parameters(self, view: APIView) -> list[dict[str, Any]]:
        parameters: list[dict[str, Any]] = super().get_schema_operation_parameters(view)
        bounds = {self.limit_query_param: (1, self.max_limit), self.offset_query_param: (0, MAX_OFFSET)}
        for parameter in parameters:
            low, high = bounds[parameter["name"]]
            parameter["schema"].update({"minimum": low, "maximum": high})
        return parameters
