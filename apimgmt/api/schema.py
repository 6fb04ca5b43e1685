"""OpenAPI generation: every operation documents its problem+json errors; request bodies reject unknown fields."""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema

from apimgmt.api.exceptions import PROBLEM_CONTENT_TYPE
from apimgmt.api.serializers import ProblemSerializer

_ERRORS = {
    "400": "Invalid input; `errors` lists the fields to fix.",
    "401": "Missing or invalid token.",
    "403": "Your role does not allow this.",
    "404": "No such object (or not in one of your tenants).",
}


class ManagementAutoSchema(AutoSchema):
    def _get_response_bodies(self, direction: str = "response") -> dict[str, Any]:
        responses: dict[str, Any] = super()._get_response_bodies(direction)  # type: ignore[arg-type]
        if direction != "response":
            return responses
        codes = dict(_ERRORS)
        if self.method in ("POST", "PUT", "PATCH"):
            codes["415"] = "The body must be JSON (Content-Type: application/json)."
        for code, description in codes.items():
            if code not in responses:
                response = self._get_response_for_code(ProblemSerializer, code, [PROBLEM_CONTENT_TYPE], direction)
                response["description"] = description
                responses[code] = response
        return responses


# Answers that promise to carry nothing more: a developer's catalog entry must never grow an internal field (and
# closing it keeps ApiOrCatalogEntry's oneOf exclusive: a full Api has fields the catalog entry forbids).
CLOSED_RESPONSES = ("ApiCatalog",)


def reject_unknown_request_fields(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Postprocessing hook: request bodies are closed objects, as the API enforces; so are CLOSED_RESPONSES."""
    for name, component in result.get("components", {}).get("schemas", {}).items():
        closed = name.endswith("Request") or name in CLOSED_RESPONSES
        if closed and component.get("type") == "object":
            component["additionalProperties"] = False
    return result
