"""The one DRF exception handler: every management API error becomes application/problem+json."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import set_rollback

from apimgmt.context import request_id_var
from apimgmt.services import DeletionRefused

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
NON_FIELD = "non_field_errors"
# Model field names that the API calls differently.
_FIELD_ALIASES = {
    "tenant": "tenant_id",
    "consumer": "consumer_id",
    "api": "api_id",
    "plan": "plan_id",
    "__all__": NON_FIELD,
}


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The object is in use."
    default_code = "conflict"


def flatten_errors(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested error detail as {"field": [...], "targets.0.url": [...]}."""
    errors: dict[str, list[str]] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = _FIELD_ALIASES.get(str(key), str(key))
            for sub, messages in flatten_errors(value, f"{prefix}{name}.").items():
                errors.setdefault(sub, []).extend(messages)
    elif isinstance(detail, list) and any(isinstance(item, (dict, list)) for item in detail):
        for index, item in enumerate(detail):
            if item:
                for sub, messages in flatten_errors(item, f"{prefix}{index}.").items():
                    errors.setdefault(sub, []).extend(messages)
    else:
        items = detail if isinstance(detail, list) else [detail]
        errors[prefix.rstrip(".") or NON_FIELD] = [str(item) for item in items]
    return errors


def django_errors(exc: DjangoValidationError) -> dict[str, list[str]]:
    """A service's ValidationError as API field errors."""
    if hasattr(exc, "error_dict"):
        return flatten_errors({key: list(value) for key, value in exc.message_dict.items()})
    return {NON_FIELD: list(exc.messages)}


def problem(status_code: int, detail: str, *, errors: dict[str, list[str]] | None = None, title: str = "") -> Response:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or HTTPStatus(status_code).phrase,
        "status": status_code,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    request_id = request_id_var.get()
    if request_id:
        body["request_id"] = request_id
    return Response(body, status=status_code, content_type=PROBLEM_CONTENT_TYPE)


def _validation_detail(errors: dict[str, list[str]]) -> str:
    fields = ", ".join(sorted(errors))
    return f"The request is invalid; fix the fields listed in errors: {fields}."


def problem_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Shape every error; unexpected exceptions are left to Django (500, logged with the request id)."""
    if isinstance(exc, DjangoValidationError):
        errors = django_errors(exc)
        set_rollback()
        return problem(status.HTTP_400_BAD_REQUEST, _validation_detail(errors), errors=errors)
    if isinstance(exc, DeletionRefused):
        exc = Conflict(exc.message)
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if not isinstance(exc, exceptions.APIException):
        return None
    set_rollback()
    if isinstance(exc, exceptions.ValidationError):
        errors = flatten_errors(exc.detail)
        response = problem(exc.status_code, _validation_detail(errors), errors=errors)
    else:
        response = problem(exc.status_code, str(exc.detail))
    auth_header = getattr(exc, "auth_header", None)
    if auth_header:
        response["WWW-Authenticate"] = auth_header
    wait = getattr(exc, "wait", None)
    if wait:
        response["Retry-After"] = str(int(wait))
    return response
