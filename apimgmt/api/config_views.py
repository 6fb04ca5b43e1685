"""Configuration as code over the management API: the schema, export, plan and apply of one tenant's document, and
the import of an API from its OpenAPI document.

Thin edges over apimgmt.config_doc. Reading a tenant's configuration shows its internals (upstreams, key settings),
so export and plan need what reading those needs (tenant admin or viewer, or platform staff); apply changes APIs,
plans and policies, so it needs a tenant admin (or platform staff). Another tenant is a 404.
"""

from __future__ import annotations

import json
import re
from typing import Any

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apimgmt import config_doc
from apimgmt.api.exceptions import PROBLEM_CONTENT_TYPE, problem
from apimgmt.api.parsers import ManagementJSONParser
from apimgmt.api.permissions import CHANGE, VIEW, may_create, restrict, sees_internals
from apimgmt.api.serializers import (
    ApiSerializer,
    JSONObjectField,
    ProblemSerializer,
    StrictCharField,
    StrictSerializer,
)
from apimgmt.api.views import RequestContextMixin
from apimgmt.config_doc.openapi import import_openapi
from apimgmt.models import Api, Tenant

# What the document is called in messages about a request body.
BODY = "request body"


class ConfigRequestSerializer(StrictSerializer):
    document = JSONObjectField(required=False, help_text="The document as a JSON object.")
    text = StrictCharField(
        required=False, trim_whitespace=False, max_length=10_000_000, help_text="Or: the document as YAML or JSON text."
    )
    prune = serializers.BooleanField(default=False, help_text="Delete what the document does not mention.")
    variables = serializers.DictField(
        child=StrictCharField(allow_blank=True, trim_whitespace=False),
        required=False,
        help_text="Values for ${NAME} references in the document (the server's environment is never read).",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("document" in attrs) == ("text" in attrs):
            raise serializers.ValidationError({"document": ["Send the document either as `document` or as `text`."]})
        return attrs


class ConfigApplySerializer(ConfigRequestSerializer):
    dry_run = serializers.BooleanField(default=False, help_text="Make every change, then roll all of it back.")
    fingerprint = StrictCharField(
        required=False, max_length=100, help_text="The plan's fingerprint: refuse (409) if the tenant changed since."
    )


class ConfigChangeSerializer(serializers.Serializer):
    action = serializers.ChoiceField(choices=["create", "update", "delete"])
    kind = serializers.ChoiceField(choices=["policy", "jwt_issuer", "plan", "api", "consumer", "subscription"])
    name = serializers.CharField()
    fields = serializers.DictField(required=False, help_text='{"field": {"old": …, "new": …}} of an update.')  # type: ignore[assignment]
    refused = serializers.CharField(required=False, help_text="Why this delete would be refused.")


class ConfigSummarySerializer(serializers.Serializer):
    create = serializers.IntegerField()  # type: ignore[assignment]  # a field, popped by the metaclass
    update = serializers.IntegerField()  # type: ignore[assignment]  # a field, popped by the metaclass
    delete = serializers.IntegerField()
    refused = serializers.IntegerField()


class ConfigPlanSerializer(serializers.Serializer):
    tenant_id = serializers.CharField()
    prune = serializers.BooleanField()
    fingerprint = serializers.CharField(help_text="Pass it to apply to refuse changes made since this plan.")
    summary = ConfigSummarySerializer()
    changes = ConfigChangeSerializer(many=True)
    applied = serializers.BooleanField(required=False, help_text="Apply only: false for a dry run.")


def _document_from(data: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The canonical document from a validated request body (ConfigError names what to fix)."""
    variables = data.get("variables", {})
    if "text" in data:
        return config_doc.read_document(data["text"], BODY, variables), BODY
    return config_doc.read_document(json.dumps(data["document"]), BODY + ".json", variables), BODY


def _config_error(exc: config_doc.ConfigError) -> Response:
    return problem(
        status.HTTP_400_BAD_REQUEST,
        f"The configuration document is invalid ({len(exc.problems)} problem(s)); fix the places listed in errors.",
        errors=exc.as_errors(),
    )


class TenantConfigBase(RequestContextMixin, APIView):
    """The tenant of the URL, if the caller may take ``action`` on its configuration."""

    def tenant(self, tenant_id: str, action: str) -> Tenant:
        visible = restrict(Tenant.objects.filter(pk=tenant_id), self.request.user, VIEW).first()
        if visible is None:
            raise exceptions.NotFound()
        if action == VIEW and not sees_internals(self.request.user, visible.id):
            raise exceptions.PermissionDenied(
                f"Your role in tenant {visible.id} does not allow reading its configuration."
            )
        if action == CHANGE and not restrict(Tenant.objects.filter(pk=visible.pk), self.request.user, CHANGE).exists():
            raise exceptions.PermissionDenied(f"Only admins of tenant {visible.id} can apply its configuration.")
        return visible


_ERRORS = {
    (409, PROBLEM_CONTENT_TYPE): OpenApiResponse(
        response=ProblemSerializer,
        description="A delete would be refused (the plan is in `plan`), or the tenant changed since the plan.",
    ),
}


class ConfigSchemaView(RequestContextMixin, APIView):
    """The JSON Schema of configuration documents (also docs/config.schema.json)."""

    permission_classes: list[Any] = []
    authentication_classes: list[Any] = []

    @extend_schema(
        responses={(200, "application/schema+json"): OpenApiTypes.OBJECT},
        summary="JSON Schema of configuration documents",
    )
    def get(self, request: Request) -> HttpResponse:
        return HttpResponse(config_doc.schema_text(), content_type="application/schema+json")


class ConfigSchemaAliasView(ConfigSchemaView):
    """The same schema at the address without the final slash, which editors' `$schema` settings tend to use."""

    schema = None  # documented once, under config/schema/


# The Warning field stays well inside what proxies take for all of an answer's headers (nginx: 4 KiB by default).
WARNING_HEADER_MAX_CHARS = 2000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def warning_header(warnings: list[str]) -> str:
    """Export warnings as one ``Warning`` field (RFC 7234 section 5.5: a list of ``299 apimgmt "text"``), so the body
    stays the document, which can be posted back as it is. ASCII only, control characters written as ``\\xNN`` (a
    policy's name may hold a newline, which no header may), and at most about WARNING_HEADER_MAX_CHARS: past that a
    last entry says how many more there are (``manage.py config export`` prints them all)."""
    entries: list[str] = []
    used = 0
    for index, warning in enumerate(warnings):
        text = warning.encode("ascii", "backslashreplace").decode().replace("\\", "\\\\").replace('"', '\\"')
        entry = '299 apimgmt "{}"'.format(_CONTROL.sub(lambda match: f"\\x{ord(match[0]):02x}", text))
        if used + len(entry) > WARNING_HEADER_MAX_CHARS - 120:  # room left for the entry that says what is missing
            missing = len(warnings) - index
            entries.append(f'299 apimgmt "and {missing} more: manage.py config export prints every warning"')
            break
        entries.append(entry)
        used += len(entry) + 2
    return ", ".join(entries)


class TenantConfigView(TenantConfigBase):
    @extend_schema(
        parameters=[
            OpenApiParameter("output", str, enum=["json", "yaml"], description="json (default) or yaml text."),
            OpenApiParameter("consumers", bool, description="Include consumers and their open subscriptions."),
            OpenApiParameter(
                "Warning",
                str,
                location=OpenApiParameter.HEADER,
                response=[200],
                description=(
                    "What the export wrote as a ${…} placeholder instead of a value, and why: a list of 299 apimgmt "
                    '"text" (RFC 7234 section 5.5), one per placeholder; absent when there is none. The same text as '
                    "the command's warnings."
                ),
            ),
        ],
        # The YAML text is the same document: an object once parsed, as clients (and schemathesis) read it.
        responses={(200, "application/json"): OpenApiTypes.OBJECT, (200, "application/yaml"): OpenApiTypes.OBJECT},
        summary="Export the tenant's configuration document (stable order; no keys or secrets)",
    )
    def get(self, request: Request, tenant_id: str) -> HttpResponse:
        output = request.query_params.get("output", "json")
        consumers = request.query_params.get("consumers", "false")
        if output not in ("json", "yaml"):
            raise exceptions.ValidationError({"output": ["output must be json or yaml."]})
        if consumers not in ("true", "false"):
            raise exceptions.ValidationError({"consumers": ["consumers must be true or false."]})
        tenant = self.tenant(tenant_id, VIEW)
        warnings: list[str] = []
        try:
            document = config_doc.export_document(tenant, consumers=consumers == "true", warnings=warnings)
        except config_doc.ConfigError as exc:
            return _config_error(exc)
        # The text the command writes (a literal "${" written "$${"), so what is exported can be posted back.
        content_type = "application/yaml; charset=utf-8" if output == "yaml" else "application/json"
        response = HttpResponse(config_doc.dump_text(document, output), content_type=content_type)
        if warnings:
            response["Warning"] = warning_header(warnings)
        return response


class TenantConfigPlanView(TenantConfigBase):
    @extend_schema(
        request=ConfigRequestSerializer,
        responses={200: ConfigPlanSerializer},
        summary="Plan: what applying the document would create, update (old → new) and delete; changes nothing",
    )
    def post(self, request: Request, tenant_id: str) -> Response:
        tenant = self.tenant(tenant_id, VIEW)
        body = ConfigRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            document, source = _document_from(body.validated_data)
            plan = config_doc.plan_for(tenant, document, source=source, prune=body.validated_data["prune"])
        except config_doc.ConfigError as exc:
            return _config_error(exc)
        return Response(plan.as_json())


class TenantConfigApplyView(TenantConfigBase):
    @extend_schema(
        request=ConfigApplySerializer,
        responses={200: ConfigPlanSerializer, **_ERRORS},
        summary="Apply the document: all or nothing, audited, gateways told once",
    )
    def post(self, request: Request, tenant_id: str) -> Response:
        tenant = self.tenant(tenant_id, CHANGE)
        body = ConfigApplySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            document, source = _document_from(data)
            plan = config_doc.apply_document(
                tenant=tenant,
                document=document,
                source=source,
                actor=request.user,
                prune=data["prune"],
                dry_run=data["dry_run"],
                expected_fingerprint=data.get("fingerprint"),
            )
        except config_doc.ConfigError as exc:
            return _config_error(exc)
        except config_doc.PlanRefused as exc:
            response = problem(status.HTTP_409_CONFLICT, f"Nothing applied: {exc}")
            response.data["plan"] = exc.plan.as_json()
            return response
        except config_doc.StalePlan as exc:
            return problem(status.HTTP_409_CONFLICT, str(exc))
        return Response({**plan.as_json(), "applied": not data["dry_run"]})


# ---------------------------------------------------------------------------
# OpenAPI import
# ---------------------------------------------------------------------------

# A spec larger than this is refused before parsing (a few thousand operations fit).
MAX_SPEC_BYTES = 5 * 1024 * 1024


class ApiImportRequestSerializer(StrictSerializer):
    tenant_id = StrictCharField(max_length=63)
    spec = JSONObjectField(required=False, help_text="The OpenAPI 3.0/3.1 document as a JSON object.")
    spec_text = StrictCharField(
        required=False, trim_whitespace=False, max_length=MAX_SPEC_BYTES, help_text="Or: the document as YAML or JSON."
    )
    file = serializers.FileField(required=False, help_text="Or (multipart): the document as a file.")
    base_path = StrictCharField(required=False, max_length=200, help_text="New APIs: default /<title as a slug>.")
    upstream_url = StrictCharField(required=False, max_length=2000, help_text="Default: the spec's first server.")
    restrict_to_spec = serializers.BooleanField(
        required=False, help_text="Route only the spec's operations (404/405 for others); default: unchanged."
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        given = [name for name in ("spec", "spec_text", "file") if name in attrs]
        if len(given) != 1:
            raise serializers.ValidationError({"spec": ["Send the OpenAPI document once: as spec, spec_text or file."]})
        return attrs


class ApiImportResultSerializer(serializers.Serializer):
    created = serializers.BooleanField()
    operations = serializers.IntegerField(help_text="Operations (path and method) in the spec.")
    notes = serializers.ListField(child=serializers.CharField(), help_text="What did not map (security schemes …).")
    api = ApiSerializer()


class ApiImportView(RequestContextMixin, APIView):
    """Create or update an API from its OpenAPI document; the same roles as creating an API (tenant admins)."""

    parser_classes = [ManagementJSONParser, MultiPartParser]

    @extend_schema(
        request={"application/json": ApiImportRequestSerializer, "multipart/form-data": ApiImportRequestSerializer},
        responses={201: ApiImportResultSerializer, 200: ApiImportResultSerializer},
        summary="Import an API from an OpenAPI 3.0/3.1 document: 201 created, 200 updated (same info.title)",
    )
    def post(self, request: Request) -> Response:
        body = ApiImportRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        tenant = restrict(Tenant.objects.filter(pk=data["tenant_id"]), request.user, VIEW).first()
        if tenant is None:
            raise exceptions.ValidationError({"tenant_id": [f"Unknown tenant {data['tenant_id']!r}."]})
        if not may_create(request.user, Api, tenant.id):
            raise exceptions.PermissionDenied(f"Your role in tenant {tenant.id} does not allow creating APIs.")
        if "file" in data:
            upload = data["file"]
            if upload.size > MAX_SPEC_BYTES:
                raise exceptions.ValidationError({"file": [f"The spec must be at most {MAX_SPEC_BYTES} bytes."]})
            try:
                text, source = upload.read().decode("utf-8"), upload.name or "file"
            except UnicodeDecodeError:
                raise exceptions.ValidationError({"file": ["The spec must be UTF-8 text (YAML or JSON)."]}) from None
        elif "spec_text" in data:
            text, source = data["spec_text"], "spec_text"
        else:
            text, source = json.dumps(data["spec"]), "spec.json"
        try:
            result = import_openapi(
                tenant=tenant,
                text=text,
                source=source,
                actor=request.user,
                base_path=data.get("base_path"),
                upstream_url=data.get("upstream_url"),
                restrict_to_spec=data.get("restrict_to_spec"),
            )
        except config_doc.ConfigError as exc:
            return problem(
                status.HTTP_400_BAD_REQUEST,
                f"The OpenAPI document cannot be imported ({len(exc.problems)} problem(s)); see errors, keyed by "
                "JSON pointer into the document (or by the API field).",
                errors=exc.as_errors(),
            )
        api = Api.objects.prefetch_related("policies", "plans", "targets").get(pk=result.api.pk)
        body_out = {"created": result.created, "operations": result.operations, "notes": result.notes}
        body_out["api"] = ApiSerializer(api).data
        return Response(body_out, status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK)
