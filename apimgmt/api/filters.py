"""Query-string filters (``tenant_id``, ``status``, ``api_id``, ``consumer_id`` …) and ordering for list views."""

from __future__ import annotations

import re
from typing import Any

from django.db.models import QuerySet
from rest_framework import exceptions
from rest_framework.filters import BaseFilterBackend, OrderingFilter
from rest_framework.request import Request
from rest_framework.views import APIView

# Ids, slugs and action names: nothing else can match a row, so anything else is a client error.
_FILTER_VALUE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


class FieldFilterBackend(BaseFilterBackend):
    """Exact-match filters declared per view as ``filter_fields = {"param": ("orm_lookup", choices | None)}``."""

    def filter_queryset(self, request: Request, queryset: QuerySet[Any], view: APIView) -> QuerySet[Any]:
        fields: dict[str, tuple[str, tuple[str, ...] | None]] = getattr(view, "filter_fields", {})
        errors: dict[str, list[str]] = {}
        lookups: dict[str, str] = {}
        for param, (lookup, choices) in fields.items():
            value = request.query_params.get(param)
            if value is None:
                continue
            if choices is not None and value not in choices:
                errors[param] = [f"{param} must be one of {', '.join(choices)}."]
            elif not _FILTER_VALUE.match(value):
                errors[param] = [f"{param} must be an id: letters, digits, '_', '-', '.' or ':' (up to 128)."]
            else:
                lookups[lookup] = value
        if errors:
            raise exceptions.ValidationError(errors)
        return queryset.filter(**lookups)

    def get_schema_operation_parameters(self, view: APIView) -> list[dict[str, Any]]:
        fields: dict[str, tuple[str, tuple[str, ...] | None]] = getattr(view, "filter_fields", {})
        parameters = []
        for param, (_lookup, choices) in fields.items():
            schema: dict[str, Any] = {"type": "string"}
            if choices is not None:
                schema["enum"] = list(choices)
            else:
                schema["pattern"] = _FILTER_VALUE.pattern
            parameters.append(
                {
                    "name": param,
                    "required": False,
                    "in": "query",
                    "description": f"Only rows whose {param} is this value.",
                    "schema": schema,
                }
            )
        return parameters


class StrictOrderingFilter(OrderingFilter):
    """``?ordering=field,-other``; an unknown field is a 400 rather than silently ignored."""

    def get_ordering(self, request: Request, queryset: QuerySet[Any], view: APIView) -> Any:
        raw = request.query_params.get(self.ordering_param)
        if raw:
            allowed = {name for name, _label in self.get_valid_fields(queryset, view, {"request": request})}
            wanted = [term.strip() for term in raw.split(",") if term.strip()]
            unknown = [term for term in wanted if term.lstrip("-") not in allowed]
            if unknown:
                raise exceptions.ValidationError(
                    {
                        self.ordering_param: [
                            f"Cannot order by {', '.join(unknown)}; use one of {', '.join(sorted(allowed))}."
                        ]
                    }
                )
        return super().get_ordering(request, queryset, view)
