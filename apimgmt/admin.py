"""The Django admin for platform staff: every model, scoped by tenant, with writes going through the services."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.utils import get_fields_from_path, unquote
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db import connection
from django.db.models import Count, Model, Q, QuerySet
from django.db.models.constants import LOOKUP_SEP
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html

from apimgmt import selectors, services, tokens
from apimgmt.admin_home import home_context
from apimgmt.admin_usage import usage_overview
from apimgmt.models import (
    DEFAULT_ROTATION_OVERLAP_SECONDS,
    Api,
    ApiKey,
    ApiToken,
    AuditEvent,
    Consumer,
    ConsumerIdentity,
    Event,
    JwtIssuer,
    Plan,
    Policy,
    Subscription,
    Tenant,
    TenantMembership,
    UpstreamTarget,
    UsageRecord,
    WebhookDelivery,
    WebhookEndpoint,
)
from apimgmt.validation import JWT_ALGORITHMS, validate_cidr_list, validate_policy_config, validate_timezone

admin.site.site_header = "apimgmt administration"
admin.site.site_title = "apimgmt"
admin.site.index_title = "Platform"
# "View site" leads to the portals' landing page (portal/views.portal_index), not to a 404 at "/".
admin.site.site_url = "/portal/"
# The home page is an overview of the platform (apimgmt/admin_home.py) above the list of models.
admin.site.index_template = "admin/apimgmt/home.html"
_models_index = admin.site.index

logger = logging.getLogger(__name__)


def _platform_home(request: HttpRequest, extra_context: dict[str, Any] | None = None) -> TemplateResponse:
    return _models_index(request, extra_context={**home_context(request.user), **(extra_context or {})})


admin.site.index = _platform_home  # type: ignore[method-assign]


def _report(request: HttpRequest, done: int, verb: str, errors: list[str]) -> None:
    noun = "object" if done == 1 else "objects"
    if done:
        messages.success(request, f"{verb} {done} {noun}.")
    for error in errors:
        messages.error(request, error)
    if not done and not errors:
        messages.info(request, f"Nothing to do: no selected object could be {verb.lower()}.")


def _secret_page(
    request: HttpRequest,
    *,
    title: str,
    noun: str,
    back_url: str,
    back_label: str,
    secrets: list[dict[str, str]],
    storage_note: str = "",
) -> TemplateResponse:
    """Show freshly created secrets on the response page itself: never in a message, cookie or session."""
    response = TemplateResponse(
        request,
        "admin/apimgmt/secret_shown_once.html",
        {
            **admin.site.each_context(request),
            "title": title,
            "noun": noun,
            "back_url": back_url,
            "back_label": back_label,
            "secrets": secrets,
            "storage_note": storage_note,
        },
    )
    response["Cache-Control"] = "no-store"
    return response


def _errors_to_form(form: forms.BaseForm, exc: ValidationError) -> None:
    """Put a service's ValidationError on the form: field errors next to their field, the rest on top."""
    if hasattr(exc, "error_dict"):
        for field, errors in exc.message_dict.items():
            form.add_error(field if field in form.fields else None, errors)
    else:
        form.add_error(None, exc)


def _messages_of(exc: ValidationError) -> str:
    return "; ".join(exc.messages)


def _admin_tenant_ids(request: HttpRequest) -> list[str]:
    """Tenants a staff user (not a superuser) administers here: only those where their role is admin."""
    return selectors.tenant_ids_for_user(request.user, roles=(TenantMembership.Role.ADMIN,))


# Stored secrets' digests: no admin URL may filter on them. `?key_hash__startswith=ab` would answer "is there a key
# whose HMAC starts with ab", a prefix oracle; Django's UserAdmin refuses password lookups the same way.
SECRET_FIELDS = frozenset({"key_hash", "token_hash", "password"})


class ScopedRelatedFieldListFilter(admin.RelatedOnlyFieldListFilter):
    """A relation's filter choices are only what the rows this user may see point to: never another tenant's
    ids or names (the stock filter lists every row of the related table)."""


def scoped_list_filter(model: type[Model], entry: Any) -> Any:
    """``entry`` of a ``list_filter`` with a relation's stock filter replaced by the scoped one."""
    if isinstance(entry, str) and get_fields_from_path(model, entry)[-1].is_relation:
        return (entry, ScopedRelatedFieldListFilter)
    if isinstance(entry, tuple) and entry[1] in (admin.RelatedFieldListFilter, admin.RelatedOnlyFieldListFilter):
        return (entry[0], ScopedRelatedFieldListFilter)
    return entry


def _tenant_label(obj: Any) -> str:
    return f"{getattr(obj, 'name', None) or getattr(obj, 'api_name', None) or obj} ({obj.tenant_id})"


class TenantLabelledChoiceField(forms.ModelChoiceField):
    """A picker whose rows may belong to several tenants says whose each one is: "gold (acme)"."""

    def label_from_instance(self, obj: Any) -> str:
        return _tenant_label(obj)


class TenantLabelledMultipleChoiceField(forms.ModelMultipleChoiceField):
    def label_from_instance(self, obj: Any) -> str:
        return _tenant_label(obj)


class NotFoundAdmin(admin.ModelAdmin):
    """Answer 404 for an object outside the user's reach, instead of the admin's redirect with a message.

    Also the rules every apimgmt admin shares: list filters offer only values of rows the user can see, and no
    URL lookup touches a secret's digest (``SECRET_FIELDS``; Django answers such a lookup with 400).
    """

    def _get_obj_does_not_exist_redirect(self, request: HttpRequest, opts: Any, object_id: str) -> Any:
        # Whether the row exists at all tells "out of this user's reach" from "not there" (one query, on a 404 only).
        try:
            exists: bool | None = opts.model._default_manager.filter(pk=unquote(object_id)).exists()
        except (ValueError, TypeError, ValidationError):
            exists = None  # not an id of this model at all
        logger.info(
            "admin: no %s with this ID for this user",
            opts.model_name,
            extra={
                "object_id": object_id,
                "user_id": request.user.pk,
                "superuser": selectors.is_platform_staff(request.user),
                "exists": exists,
                "in_atomic_block": connection.in_atomic_block,
            },
        )
        raise Http404(f"No {opts.verbose_name} with this ID.")

    def save_form(self, request: HttpRequest, form: Any, change: bool) -> Any:
        """On a change, hand save_model the row as stored, not the instance the form already edited: the update
        services compare the fields they are given with the object's, and would find nothing changed."""
        obj = super().save_form(request, form, change)
        if change and obj.pk is not None:
            return type(obj)._default_manager.get(pk=obj.pk)
        return obj

    def get_list_filter(self, request: HttpRequest) -> list[Any]:
        return [scoped_list_filter(self.model, entry) for entry in super().get_list_filter(request)]

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        if not SECRET_FIELDS.isdisjoint(lookup.split(LOOKUP_SEP)):
            return False
        return super().lookup_allowed(lookup, value, request)


class TenantScopedAdmin(NotFoundAdmin):
    """Staff who are not superusers see only rows of tenants they are members of (others answer 404).

    Policy and plan pickers (and the other relation pickers) offer only the edited object's tenant's rows; on an
    add form, those of the tenant chosen (pickers.js reloads the form with ``?tenant=``) or else every tenant's in
    reach, each labelled "name (tenant)".
    """

    tenant_path = "tenant"
    # Whether choosing the tenant on an add form reloads it (only worth it when pickers below depend on the tenant:
    # a reload keeps the drop-downs chosen but not what was typed).
    tenant_reloads_form = True

    class Media:
        js = ("apimgmt/pickers.js",)
        css = {"all": ("apimgmt/admin_tablet.css",)}

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        qs = super().get_queryset(request)
        if selectors.is_platform_staff(request.user):
            return qs
        tenant_ids = _admin_tenant_ids(request)
        return qs.filter(**{f"{self.tenant_path}__in": tenant_ids})

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        # The pickers built while the form class is made (formfield_for_*) offer only this tenant's rows.
        request._picker_tenant_id = self.picker_tenant_id(request, obj)  # type: ignore[attr-defined]
        return super().get_form(request, obj, change=change, **kwargs)

    def picker_tenant_id(self, request: HttpRequest, obj: Any) -> str | None:
        """The tenant whose rows the form's pickers offer: the object's; on an add form, the tenant chosen
        (``?tenant=`` or the posted one) or the only one the user administers; None when not known yet."""
        if obj is not None:
            return str(getattr(obj, "tenant_id", "") or "") or None
        tenant_ids = None if selectors.is_platform_staff(request.user) else _admin_tenant_ids(request)
        chosen = request.POST.get("tenant") or request.GET.get("tenant")
        if chosen and (tenant_ids is None or chosen in tenant_ids):
            return chosen
        return tenant_ids[0] if tenant_ids is not None and len(tenant_ids) == 1 else None

    def _picker_rows(self, request: HttpRequest, model: type[Any]) -> tuple[QuerySet[Any], bool]:
        """Rows of ``model`` this form may offer, and whether they may span tenants (then labelled with it)."""
        rows = model.objects.select_related("tenant") if model is not Tenant else model.objects.all()
        if not selectors.is_platform_staff(request.user):
            rows = rows.filter(**{"id__in" if model is Tenant else "tenant_id__in": _admin_tenant_ids(request)})
        tenant_id = getattr(request, "_picker_tenant_id", None)
        if tenant_id and model is not Tenant:
            return rows.filter(tenant_id=tenant_id), False
        return rows, True

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        # Staff pick only from their tenants' rows, and from the chosen tenant's once it is known.
        related = db_field.related_model
        if related in (Tenant, Consumer, Api, Plan, Policy, JwtIssuer):
            kwargs["queryset"], spans_tenants = self._picker_rows(request, related)
            if spans_tenants and related is not Tenant:
                kwargs["form_class"] = TenantLabelledChoiceField
        field = super().formfield_for_foreignkey(db_field, request, **kwargs)
        reloads = self.tenant_reloads_form and getattr(request, "_picker_tenant_id", None) is None
        if related is Tenant and field is not None and reloads:
            # On an add form, choosing the tenant reloads the page so the pickers below offer only its rows.
            field.widget.attrs["data-reload-with"] = "tenant"
        return field

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        related = db_field.related_model
        if related in (Plan, Policy, JwtIssuer):
            kwargs["queryset"], spans_tenants = self._picker_rows(request, related)
            if spans_tenants:
                kwargs["form_class"] = TenantLabelledMultipleChoiceField
        return super().formfield_for_manytomany(db_field, request, **kwargs)


class ServiceDeleteAdmin(TenantScopedAdmin):
    """Delete one object at a time through its service (refusal rules, audit event, gateways told).

    An object the service would refuse (a live API, a plan with subscriptions, a policy in use) shows no delete
    button and its delete page answers 403; the bulk "delete selected" action, which would bypass the service,
    is off (block or revoke in bulk instead).
    """

    # Each subclass defines both: the service's refusal check (None: may go) and the service call that deletes.
    delete_refusal: Callable[[Any], str | None]
    delete_through_service: Callable[[HttpRequest, Any], None]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_delete_permission(request, obj)
        return allowed and (obj is None or self.delete_refusal(obj) is None)

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        self.delete_through_service(request, obj)

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> tuple[Any, Any, set[str], Any]:
        # The confirmation page still lists everything that goes; whether it may go is the service's call (an
        # app's keys, which the admin never deletes on their own, are revoked and audited by consumer_delete).
        deleted, counts, _perms_needed, protected = super().get_deleted_objects(objs, request)
        return deleted, counts, set(), protected

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions


# ---------------------------------------------------------------------------
# Tenants and memberships
# ---------------------------------------------------------------------------


class MembershipInline(admin.TabularInline):
    model = TenantMembership
    extra = 0
    autocomplete_fields = ["user"]


class TenantForm(forms.ModelForm):
    class Meta:
        model = Tenant
        fields = ["id", "name", "timezone", "open_signup"]

    def clean_timezone(self) -> str:
        return validate_timezone(self.cleaned_data["timezone"])


@admin.register(Tenant)
class TenantAdmin(NotFoundAdmin):
    form = TenantForm
    list_display = [
        "id",
        "name",
        "status",
        "timezone",
        "open_signup",
        "api_count",
        "consumer_count",
        "usage_link",
        "created_at",
    ]
    list_filter = ["status", "open_signup"]
    search_fields = ["id", "name"]
    inlines = [MembershipInline]
    actions = ["suspend_tenants", "activate_tenants"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tenant]:
        qs = Tenant.objects.all()
        if not selectors.is_platform_staff(request.user):
            qs = qs.filter(id__in=_admin_tenant_ids(request))
        return qs.annotate(
            _apis=Count("apis", distinct=True),
            _consumers=Count("consumers", distinct=True),
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Tenant | None = None) -> list[str]:
        return ["id", "status", "created_at"] if obj else ["status", "created_at"]

    def get_urls(self) -> list[Any]:
        usage = path("<str:tenant_id>/usage/", self.admin_site.admin_view(self.usage_view), name="apimgmt_tenant_usage")
        return [usage, *super().get_urls()]

    def usage_view(self, request: HttpRequest, tenant_id: str) -> HttpResponse:
        """The usage overview of one tenant the user may administer (others: 404)."""
        if not self.get_queryset(request).filter(pk=tenant_id).exists():
            raise Http404("No tenant with this ID.")
        return usage_overview(request, tenant_id)

    @admin.display(description="usage")
    def usage_link(self, obj: Tenant) -> str:
        return format_html('<a href="{}">24 h</a>', reverse("admin:apimgmt_tenant_usage", args=[obj.pk]))

    @admin.display(description="APIs", ordering="_apis")
    def api_count(self, obj: Tenant) -> int:
        return obj._apis  # type: ignore[attr-defined]

    @admin.display(description="consumers", ordering="_consumers")
    def consumer_count(self, obj: Tenant) -> int:
        return obj._consumers  # type: ignore[attr-defined]

    def save_model(self, request: HttpRequest, obj: Tenant, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        if change:
            services.tenant_update(
                tenant=obj,
                actor=request.user,
                name=data["name"],
                timezone=data["timezone"],
                open_signup=data["open_signup"],
            )
        else:
            created = services.tenant_create(
                id=data["id"],
                name=data["name"],
                timezone_name=data["timezone"],
                open_signup=data["open_signup"],
                actor=request.user,
            )
            obj.pk = created.pk
            obj._state.adding = False
            obj._state.db = "default"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return selectors.is_platform_staff(request.user)

    def has_delete_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        return selectors.is_platform_staff(request.user)

    @admin.action(description="Suspend selected tenants (their APIs stop routing)")
    def suspend_tenants(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        done = 0
        for tenant in queryset:
            if tenant.status != Tenant.Status.SUSPENDED:
                services.tenant_suspend(tenant=tenant, actor=request.user)
                done += 1
        _report(request, done, "Suspended", [])

    @admin.action(description="Re-activate selected tenants")
    def activate_tenants(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        done = 0
        for tenant in queryset:
            if tenant.status != Tenant.Status.ACTIVE:
                services.tenant_activate(tenant=tenant, actor=request.user)
                done += 1
        _report(request, done, "Activated", [])


@admin.register(TenantMembership)
class TenantMembershipAdmin(TenantScopedAdmin):
    list_display = ["user", "tenant", "role", "created_at"]
    list_filter = ["role", "tenant"]
    search_fields = ["user__username", "user__email", "tenant__id", "tenant__name"]
    list_select_related = ["user", "tenant"]
    autocomplete_fields = ["user"]


# ---------------------------------------------------------------------------
# Policies and plans
# ---------------------------------------------------------------------------


def _count_field(label: str, example: str) -> forms.IntegerField:
    return forms.IntegerField(label=label, min_value=1, required=False, help_text=f"For example {example}.")


_SCOPE_CHOICES = [
    ("", "Default: per app (consumer_id)"),
    ("consumer_id", "Per app (consumer_id)"),
    ("key_id", "Per key (key_id)"),
    ("ip", "Per client IP (ip)"),
    ("api", "Shared by every caller of the API (api)"),
    ("tenant_id", "Shared by every caller in the tenant (tenant_id)"),
]

# Typed form fields per policy type: form field name -> the config key it fills. The JSON config below them
# stays for what they do not cover; a type not listed here is edited as JSON only.
POLICY_TYPE_FIELDS: dict[str, dict[str, str]] = {
    Policy.Type.RATE_LIMITING: {
        "rate_requests_per_second": "requests_per_second",
        "rate_requests_per_minute": "requests_per_minute",
        "rate_requests_per_hour": "requests_per_hour",
        "rate_requests_per_day": "requests_per_day",
        "rate_burst_size": "burst_size",
        "rate_window_type": "window_type",
        "rate_key_extraction": "key_extraction",
    },
    Policy.Type.QUOTA: {
        "quota_requests_per_day": "requests_per_day",
        "quota_requests_per_month": "requests_per_month",
        "quota_key_extraction": "key_extraction",
    },
    # The policy-chain types: their fields cover every setting; a dotted key is a nested one (headers).
    Policy.Type.CORS: {
        "cors_allow_origins": "allow_origins",
        "cors_allow_methods": "allow_methods",
        "cors_allow_headers": "allow_headers",
        "cors_expose_headers": "expose_headers",
        "cors_allow_credentials": "allow_credentials",
        "cors_max_age": "max_age",
    },
    Policy.Type.IP_RULES: {"ip_allow": "allow", "ip_deny": "deny"},
    Policy.Type.HEADERS: {
        "headers_request_add": "request.add",
        "headers_request_set": "request.set",
        "headers_request_remove": "request.remove",
        "headers_response_add": "response.add",
        "headers_response_set": "response.set",
        "headers_response_remove": "response.remove",
    },
    Policy.Type.REQUEST_LIMITS: {
        "limits_allowed_methods": "allowed_methods",
        "limits_max_body_bytes": "max_body_bytes",
        "limits_max_headers": "max_headers",
        "limits_max_header_bytes": "max_header_bytes",
    },
    Policy.Type.RESPONSE_CACHE: {
        "cache_ttl_seconds": "ttl_seconds",
        "cache_max_entry_bytes": "max_entry_bytes",
        "cache_per_consumer": "per_consumer",
        "cache_count_hits_toward_quota": "count_hits_toward_quota",
        "cache_vary_headers": "vary_headers",
    },
}
# Types whose typed fields cover their whole config: the fields are used whenever one of them was changed (or the
# JSON box is empty); rate limits and quotas keep their rule below (a window field filled in).
_WHOLE_CONFIG_TYPES = frozenset(POLICY_TYPE_FIELDS) - {Policy.Type.RATE_LIMITING, Policy.Type.QUOTA}
# The fields whose presence means "this type's form fields were used" (every config needs one of them).
_WINDOW_FIELDS = {
    "rate_requests_per_second",
    "rate_requests_per_minute",
    "rate_requests_per_hour",
    "rate_requests_per_day",
    "quota_requests_per_day",
    "quota_requests_per_month",
}


class BlankJSONField(forms.JSONField):
    """A JSON box that is empty, not "null", while there is no document (an empty box stores none)."""

    def prepare_value(self, value: Any) -> Any:
        return "" if value is None else super().prepare_value(value)


class LinesField(forms.CharField):
    """A list of strings edited as a textarea, one item per line (blank lines and surrounding spaces dropped)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault("widget", forms.Textarea(attrs={"rows": 3, "cols": 60}))
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return "\n".join(str(item) for item in value)
        return value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        if isinstance(value, list | tuple):
            return [str(item) for item in value]
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]

    def has_changed(self, initial: Any, data: Any) -> bool:
        return self.to_python(initial) != self.to_python(data)


class HeaderLinesField(LinesField):
    """Header names and values edited as a textarea, one ``Name: value`` per line."""

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, dict):
            return "\n".join(f"{name}: {text}" for name, text in value.items())
        return value

    def to_python(self, value: Any) -> dict[str, str]:  # type: ignore[override]
        if isinstance(value, dict):
            return {str(name): str(text) for name, text in value.items()}
        headers: dict[str, str] = {}
        for number, line in enumerate(str(value or "").splitlines(), start=1):
            if not line.strip():
                continue
            name, colon, text = line.partition(":")
            if not colon or not name.strip():
                raise ValidationError(
                    f"Line {number} is not 'Name: value' (for example X-Team: payments).", code="invalid"
                )
            headers[name.strip()] = text.strip()
        return headers

    def has_changed(self, initial: Any, data: Any) -> bool:
        try:
            return self.to_python(initial) != self.to_python(data)
        except ValidationError:
            return True


def _lines_field(label: str, help_text: str) -> LinesField:
    return LinesField(label=label, help_text=help_text)


def _header_lines_field(label: str, help_text: str) -> HeaderLinesField:
    return HeaderLinesField(label=label, help_text=help_text)


def _optional_int(label: str, help_text: str) -> forms.IntegerField:
    return forms.IntegerField(label=label, required=False, help_text=help_text)


_TEMPLATES_HELP = (
    "Values may use {consumer_id}, {key_id}, {tenant_id}, {api_id}, {request_id}, {client_ip} and {jwt.<claim>}; "
    "write {{ and }} for literal braces."
)


def _config_at(config: dict[str, Any], path: str) -> Any:
    """The value at a dotted config path ("request.add"), or None."""
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _config_from_typed(typed: dict[str, str], data: dict[str, Any]) -> dict[str, Any]:
    """The config the typed fields describe: empty ones are left out (the type's defaults apply), booleans kept."""
    config: dict[str, Any] = {}
    for name, key in typed.items():
        value = data.get(name)
        if value is None or (not isinstance(value, bool) and value in ("", [], {})):
            continue
        *parents, leaf = key.split(".")
        target = config
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return config


def _field_of_error(message: str, typed: dict[str, str]) -> str | None:
    """The typed form field an error of validate_policy_config is about: its message starts with the config field's
    path ("allow_origins[1]: …", "request.add.X-Team: …", "max_age must be …"); None when it starts with none."""
    best: tuple[int, str] | None = None
    for name, key in typed.items():
        if re.match(rf"{re.escape(key)}(?!\w)", message) and (best is None or len(key) > best[0]):
            best = (len(key), name)
    return best[1] if best else None


class PolicyForm(forms.ModelForm):
    """A policy's settings as typed fields per type (with help and an example); the JSON config for the rest."""

    rate_requests_per_second = _count_field("Requests per second", "10")
    rate_requests_per_minute = _count_field("Requests per minute", "1000")
    rate_requests_per_hour = _count_field("Requests per hour", "20000")
    rate_requests_per_day = _count_field("Requests per day", "100000")
    rate_burst_size = forms.IntegerField(
        label="Burst size",
        min_value=0,
        required=False,
        help_text="Extra requests allowed at once on top of a sliding window, for example 100. Not for fixed windows.",
    )
    rate_window_type = forms.ChoiceField(
        label="Window",
        required=False,
        choices=[
            ("", "Default: sliding"),
            ("sliding", "Sliding (a rolling limit; bursts on top)"),
            ("fixed", "Fixed (calendar-aligned windows)"),
        ],
    )
    rate_key_extraction = forms.ChoiceField(
        label="Counted for", required=False, choices=_SCOPE_CHOICES, help_text="Whose calls share one counter."
    )
    quota_requests_per_day = _count_field("Requests per day", "50000 (days in the tenant's time zone)")
    quota_requests_per_month = _count_field("Requests per month", "1000000 (calendar months)")
    quota_key_extraction = forms.ChoiceField(
        label="Counted for", required=False, choices=_SCOPE_CHOICES, help_text="Whose calls share one counter."
    )
    # CORS
    cors_allow_origins = _lines_field(
        "Allowed origins",
        "One per line: an exact origin, a pattern with * for one label, or * for any origin. "
        "For example https://app.example.com or https://*.example.com.",
    )
    cors_allow_methods = _lines_field(
        "Allowed methods", "One per line. Empty: GET, HEAD, POST, PUT, PATCH and DELETE. For example GET, then POST."
    )
    cors_allow_headers = _lines_field(
        "Allowed request headers",
        "One per line, or * for any (not with credentials). Empty: only the headers browsers always allow. "
        "For example Content-Type.",
    )
    cors_expose_headers = _lines_field(
        "Exposed response headers", "Response headers a page's script may read, one per line. For example X-Request-ID."
    )
    cors_allow_credentials = forms.BooleanField(
        label="Allow credentials",
        required=False,
        help_text="Browsers may send cookies and Authorization. Not together with the origin *.",
    )
    cors_max_age = _optional_int(
        "Preflight cache (seconds)",
        "How long a browser may reuse a preflight answer, 0 to 86400. Empty: 600. For example 3600.",
    )
    # IP rules
    ip_allow = _lines_field(
        "Allowed addresses",
        "One CIDR or address per line, IPv4 or IPv6. When any are listed, every other address is refused. "
        "For example 203.0.113.0/24.",
    )
    ip_deny = _lines_field(
        "Denied addresses",
        "One CIDR or address per line; a denied address is refused even when it is also allowed. "
        "For example 198.51.100.7 or 2001:db8::/32.",
    )
    # Header transforms
    headers_request_add = _header_lines_field(
        "Add to upstream requests",
        f"One 'Name: value' per line, added beside what the client sent. {_TEMPLATES_HELP} "
        "For example X-Consumer: {consumer_id}.",
    )
    headers_request_set = _header_lines_field(
        "Set on upstream requests",
        "One 'Name: value' per line, replacing what the client sent. For example X-Tenant: {tenant_id}.",
    )
    headers_request_remove = _lines_field(
        "Remove from upstream requests", "One header name per line. For example X-Debug."
    )
    headers_response_add = _header_lines_field(
        "Add to responses", "One 'Name: value' per line. For example X-Served-By: apimgmt."
    )
    headers_response_set = _header_lines_field(
        "Set on responses",
        "One 'Name: value' per line, replacing what the upstream sent. For example Cache-Control: no-store.",
    )
    headers_response_remove = _lines_field("Remove from responses", "One header name per line. For example Server.")
    # Request limits
    limits_allowed_methods = _lines_field(
        "Allowed methods", "One per line; any other method gets 405 with an Allow header. For example GET, then POST."
    )
    limits_max_body_bytes = _optional_int(
        "Largest body (bytes)",
        "A bigger request body gets 413 before anything is sent upstream. For example 1048576 (1 MiB).",
    )
    limits_max_headers = _optional_int("Most request headers", "More headers get 431. For example 50.")
    limits_max_header_bytes = _optional_int(
        "Largest request headers (bytes)", "All header lines together; more get 431. For example 16384."
    )
    # Response cache
    cache_ttl_seconds = _optional_int(
        "Longest time cached (seconds)",
        "A cap on what the upstream's Cache-Control allows, 1 to 86400. Empty: 300. For example 60.",
    )
    cache_max_entry_bytes = _optional_int(
        "Largest cached answer (bytes)", "Bigger answers are not cached; at most 10 MiB. Empty: 1048576."
    )
    cache_per_consumer = forms.BooleanField(
        label="One cache per app",
        required=False,
        help_text="Each app gets its own cached answers (for answers that differ by caller).",
    )
    cache_count_hits_toward_quota = forms.BooleanField(
        label="Hits count toward quota",
        required=False,
        initial=True,
        help_text="A cached answer counts against the caller's quota like a proxied one.",
    )
    cache_vary_headers = _lines_field(
        "Also vary on", "Request headers that are part of the cache key, one per line. For example Accept-Language."
    )

    class Meta:
        model = Policy
        fields = ["tenant", "name", "description", "policy_type", "config", "mode", "on_store_error"]
        help_texts = {
            "config": "Change either the fields above or this JSON: the side you changed is saved "
            "(empty this box to use the fields). Edit the JSON for settings the fields do not cover, for example "
            '{"requests_per_minute": 1000, "burst_size": 100, "window_type": "sliding"} for a rate '
            'limit or {"allow_origins": ["https://app.example.com"], "max_age": 3600} for CORS.',
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["config"].required = False
        if self.instance.pk:  # a change: show the stored config in the typed fields of its type
            for name, key in POLICY_TYPE_FIELDS.get(self.instance.policy_type, {}).items():
                value = _config_at(self.instance.config or {}, key)
                if value is not None:
                    self.fields[name].initial = value

    def clean(self) -> dict[str, Any]:
        """Save the side the user changed: the typed fields or the JSON box (both start from the stored config on a
        change form, so "filled in" says nothing). An empty JSON box means the typed fields; both changed must agree."""
        data = super().clean() or {}
        policy_type = data.get("policy_type") or self.instance.policy_type
        typed = POLICY_TYPE_FIELDS.get(policy_type, {})
        typed_changed = [name for name in typed if name in self.changed_data]
        json_given = data.get("config") not in (None, "", {})
        # Against the stored config, not changed_data: a callable default gives the box a hidden initial input,
        # which a post without it (a script, a test) would make look changed.
        config_field = self.fields["config"]
        json_changed = json_given and config_field.has_changed(
            self.get_initial_for_field(config_field, "config"), self["config"].data
        )
        typed_used = bool(typed_changed) or not json_given
        if any(name in self.errors for name in typed) and typed_used:
            return data  # a typed field could not be read (its error is shown next to it)
        if typed_changed and json_changed:
            disagreement = self._disagreement(policy_type, _config_from_typed(typed, data), data["config"])
            if disagreement:
                labels = ", ".join(str(self.fields[name].label) for name in typed_changed)
                self.add_error(
                    None,
                    f"Both the typed fields ({labels}) and the JSON config were changed, and they disagree: "
                    f"{disagreement}. Change only one of them, or make them say the same.",
                )
                return data
        if typed_used:
            data["config"] = _config_from_typed(typed, data)
        if policy_type:
            try:
                data["config"] = validate_policy_config(policy_type, data["config"])
            except ValidationError as exc:
                self._place_config_errors(exc, typed if typed_used else {})
        return data

    @staticmethod
    def _disagreement(policy_type: str, from_fields: dict[str, Any], from_json: Any) -> str:
        """Where the typed fields' config and the JSON box's differ ("" when they say the same), each side as the
        policy would store it when it is valid."""
        sides = []
        for config in (from_fields, from_json):
            try:
                sides.append(validate_policy_config(policy_type, config))
            except ValidationError:
                sides.append(config if isinstance(config, dict) else {})
        fields, box = sides
        return "; ".join(
            f"{key} is {json.dumps(fields.get(key))} in the fields, {json.dumps(box.get(key))} in the JSON"
            for key in sorted(set(fields) | set(box))
            if fields.get(key) != box.get(key)
        )

    def _place_config_errors(self, exc: ValidationError, typed: dict[str, str]) -> None:
        """Each error next to the typed field it names when the typed fields were used; else on the JSON box."""
        for message in exc.messages:
            field = _field_of_error(message, typed)
            if field is not None:
                self.add_error(field, message)
            else:
                self.add_error("config" if not typed else None, message)


@admin.register(Policy)
class PolicyAdmin(ServiceDeleteAdmin):
    form = PolicyForm
    tenant_reloads_form = False  # no picker on the form depends on the tenant
    list_display = ["name", "tenant", "policy_type", "mode", "on_store_error", "summary", "updated_at"]
    list_filter = ["policy_type", "mode", "on_store_error", "tenant"]
    search_fields = ["id", "name", "tenant__id"]
    list_select_related = ["tenant"]
    readonly_fields = ["id", "created_at", "updated_at"]
    # One fieldset per policy type (policy_form.js shows only the chosen type's on the add form; a change form has
    # only its own type's), then the JSON config for advanced use.
    type_fieldsets: dict[str, tuple[str, dict[str, Any]]] = {
        Policy.Type.RATE_LIMITING: (
            "Rate limit (policy type rate_limiting)",
            {
                "fields": [
                    ("rate_requests_per_second", "rate_requests_per_minute"),
                    ("rate_requests_per_hour", "rate_requests_per_day"),
                    "rate_burst_size",
                    "rate_window_type",
                    "rate_key_extraction",
                ],
                "description": "At least one window. Every window is checked on every call.",
            },
        ),
        Policy.Type.QUOTA: (
            "Quota (policy type quota)",
            {
                "fields": ["quota_requests_per_day", "quota_requests_per_month", "quota_key_extraction"],
                "description": "At least one of the two; calendar days and months in the tenant's time zone.",
            },
        ),
        Policy.Type.CORS: (
            "CORS (policy type cors)",
            {
                "fields": [
                    "cors_allow_origins",
                    "cors_allow_methods",
                    "cors_allow_headers",
                    "cors_expose_headers",
                    "cors_allow_credentials",
                    "cors_max_age",
                ],
                "description": "Which web pages may call this API from a browser. The gateway answers preflight "
                "requests itself, without a key; a page from another origin gets no CORS headers.",
            },
        ),
        Policy.Type.IP_RULES: (
            "IP rules (policy type ip_rules)",
            {
                "fields": ["ip_allow", "ip_deny"],
                "description": "At least one list. The address is the client's as the gateway sees it (through "
                "TRUSTED_PROXIES); a refused caller gets 403 naming it.",
            },
        ),
        Policy.Type.HEADERS: (
            "Header transforms (policy type headers)",
            {
                "fields": [
                    "headers_request_add",
                    "headers_request_set",
                    "headers_request_remove",
                    "headers_response_add",
                    "headers_response_set",
                    "headers_response_remove",
                ],
                "description": "Never allowed: hop-by-hop headers, Host, the API's key header, Authorization, "
                "X-Forwarded-*, X-Request-ID, Content-Length, Transfer-Encoding, and control characters in values.",
            },
        ),
        Policy.Type.REQUEST_LIMITS: (
            "Request limits (policy type request_limits)",
            {
                "fields": [
                    "limits_allowed_methods",
                    "limits_max_body_bytes",
                    "limits_max_headers",
                    "limits_max_header_bytes",
                ],
                "description": "At least one. Checked before the request reaches the upstream.",
            },
        ),
        Policy.Type.RESPONSE_CACHE: (
            "Response cache (policy type response_cache)",
            {
                "fields": [
                    "cache_ttl_seconds",
                    "cache_max_entry_bytes",
                    "cache_per_consumer",
                    "cache_count_hits_toward_quota",
                    "cache_vary_headers",
                ],
                "description": "GET and HEAD answers the upstream lets be cached (never private, no-store or with "
                "Set-Cookie). A change to the API's configuration empties its cache.",
            },
        ),
    }

    class Media:
        js = ("apimgmt/policy_form.js",)

    def get_fieldsets(self, request: HttpRequest, obj: Policy | None = None) -> Any:
        types = [obj.policy_type] if obj else list(self.type_fieldsets)
        typed = []
        for policy_type in types:
            if policy_type in self.type_fieldsets:
                name, options = self.type_fieldsets[policy_type]
                typed.append((name, {**options, "classes": ["policy-type-fields", f"policy-type-{policy_type}"]}))
        return [
            (None, {"fields": ["id", "tenant", "name", "description", "policy_type", "mode", "on_store_error"]}),
            *typed,
            (
                "Config as JSON",
                {
                    "fields": ["config"],
                    "description": "For advanced use: the whole config as one JSON object. When you change a field "
                    "above, the fields win; otherwise what you type here is saved.",
                },
            ),
            ("History", {"fields": ["created_at", "updated_at"]}),
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: Policy | None = None) -> list[str]:
        base = list(self.readonly_fields)
        return [*base, "tenant", "policy_type"] if obj else base

    def delete_refusal(self, obj: Policy) -> str | None:
        return services.policy_delete_refusal(obj)

    def delete_through_service(self, request: HttpRequest, obj: Policy) -> None:
        services.policy_delete(policy=obj, actor=request.user)

    @admin.display(description="settings")
    def summary(self, obj: Policy) -> str:
        config = obj.config or {}
        if obj.policy_type in (Policy.Type.RATE_LIMITING, Policy.Type.QUOTA):
            return ", ".join(f"{k}={v}" for k, v in config.items() if k.startswith("requests_per_"))
        if obj.policy_type == Policy.Type.CORS:
            return "origins: " + (", ".join(config.get("allow_origins") or []) or "none")
        if obj.policy_type == Policy.Type.IP_RULES:
            return f"allow {len(config.get('allow') or [])}, deny {len(config.get('deny') or [])}"
        if obj.policy_type == Policy.Type.HEADERS:
            changed = sum(
                len(config.get(side, {}).get(op) or [])
                for side in ("request", "response")
                for op in config.get(side, {})
            )
            return f"{changed} header change(s)"
        return ", ".join(f"{k}={v}" for k, v in config.items() if not isinstance(v, list | dict))

    def save_model(self, request: HttpRequest, obj: Policy, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        if change:
            services.policy_update(
                policy=obj,
                actor=request.user,
                name=data["name"],
                description=data["description"],
                config=data["config"],
                mode=data["mode"],
                on_store_error=data["on_store_error"],
            )
        else:
            created = services.policy_create(
                tenant=data["tenant"],
                name=data["name"],
                description=data["description"],
                policy_type=data["policy_type"],
                config=data["config"],
                mode=data["mode"],
                on_store_error=data["on_store_error"],
                actor=request.user,
            )
            obj.pk = created.pk
            obj._state.adding = False


class PlanForm(forms.ModelForm):
    class Meta:
        model = Plan
        fields = ["tenant", "name", "description", "approval", "websocket_max_connections", "policies"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        try:  # CORS, request limits and a response cache belong to an API's whole traffic, not a plan's
            services.policies_check_for_plan(list(data.get("policies") or []))
        except ValidationError as exc:
            _errors_to_form(self, exc)
        return data


@admin.register(Plan)
class PlanAdmin(ServiceDeleteAdmin):
    form = PlanForm
    list_display = ["name", "tenant", "approval", "policy_list", "subscriber_count", "archived_at"]
    list_filter = ["approval", "tenant", ("archived_at", admin.EmptyFieldListFilter)]
    search_fields = ["id", "name", "tenant__id"]
    list_select_related = ["tenant"]
    filter_horizontal = ["policies"]
    readonly_fields = ["id", "archived_at", "created_at", "updated_at"]
    actions = ["archive_plans", "unarchive_plans"]

    @admin.action(description="Archive selected plans (no new subscriptions; existing ones keep them)")
    def archive_plans(self, request: HttpRequest, queryset: QuerySet[Plan]) -> None:
        rows = list(queryset.filter(archived_at__isnull=True))
        for plan in rows:
            services.plan_archive(plan=plan, actor=request.user)
        _report(request, len(rows), "Archived", [])

    @admin.action(description="Take selected plans out of the archive")
    def unarchive_plans(self, request: HttpRequest, queryset: QuerySet[Plan]) -> None:
        rows = list(queryset.filter(archived_at__isnull=False))
        for plan in rows:
            services.plan_unarchive(plan=plan, actor=request.user)
        _report(request, len(rows), "Unarchived", [])

    def get_queryset(self, request: HttpRequest) -> QuerySet[Plan]:
        return (
            super()
            .get_queryset(request)
            .prefetch_related("policies")
            .annotate(_subs=Count("subscriptions", filter=Q(subscriptions__status="active")))
        )

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        field = super().formfield_for_manytomany(db_field, request, **kwargs)
        if db_field.name == "policies" and field is not None:
            # CORS, request limits and a response cache describe an API's whole traffic: not offered for a plan.
            field.queryset = field.queryset.exclude(policy_type__in=Policy.API_ONLY_TYPES)
        return field

    def delete_refusal(self, obj: Plan) -> str | None:
        return services.plan_delete_refusal(obj)

    def delete_through_service(self, request: HttpRequest, obj: Plan) -> None:
        services.plan_delete(plan=obj, actor=request.user)

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> tuple[Any, Any, set[str], Any]:
        # Only subscriptions hold a plan (PROTECT). Open ones, and those scheduled to move to it, are the service's
        # refusal (no delete page then); the closed ones left are detached by plan_delete, so they stop nothing.
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        if all(self.delete_refusal(obj) is None for obj in objs):
            protected = []
        return deleted, counts, perms_needed, protected

    @admin.display(description="policies")
    def policy_list(self, obj: Plan) -> str:
        return ", ".join(p.name for p in obj.policies.all()) or "—"

    @admin.display(description="active subscribers", ordering="_subs")
    def subscriber_count(self, obj: Plan) -> int:
        return obj._subs  # type: ignore[attr-defined]

    def save_model(self, request: HttpRequest, obj: Plan, form: forms.ModelForm, change: bool) -> None:
        # The many-to-many is saved by save_related through the service below.
        data = form.cleaned_data
        if change:
            services.plan_update(
                plan=obj,
                actor=request.user,
                name=data["name"],
                description=data["description"],
                approval=data["approval"],
                websocket_max_connections=data["websocket_max_connections"],
            )
        else:
            created = services.plan_create(
                tenant=data["tenant"],
                name=data["name"],
                description=data["description"],
                approval=data["approval"],
                websocket_max_connections=data["websocket_max_connections"],
                actor=request.user,
            )
            obj.pk = created.pk
            obj._state.adding = False

    def save_related(self, request: HttpRequest, form: forms.ModelForm, formsets: Any, change: bool) -> None:
        services.plan_update(plan=form.instance, actor=request.user, policies=form.cleaned_data["policies"])


# ---------------------------------------------------------------------------
# JWT issuers
# ---------------------------------------------------------------------------


class JwtIssuerForm(forms.ModelForm):
    """An identity provider's settings in words: audiences one per line, algorithms as checkboxes, inline keys as
    JSON; checked by the same function as the services and the management API (errors next to their field)."""

    audiences = LinesField(
        label="Audiences",
        required=True,
        help_text="The aud values tokens for this API carry, one per line; a token must name one of them. "
        "For example https://api.example.com.",
    )
    algorithms = forms.MultipleChoiceField(
        label="Algorithms",
        choices=[(name, name) for name in JWT_ALGORITHMS],
        initial=["RS256"],
        widget=forms.CheckboxSelectMultiple,
        help_text="Public-key signatures only (none and HS256 are never accepted). Most providers sign with RS256.",
    )

    class Meta:
        model = JwtIssuer
        fields = ["tenant", *JwtIssuer.SETTINGS]
        field_classes = {"public_keys": BlankJSONField}
        help_texts = {
            "issuer": "The token's iss, exactly. For example https://id.example.com/.",
            "jwks_url": "Where the provider publishes its signing keys, for example "
            "https://id.example.com/.well-known/jwks.json. Or paste the keys below.",
            "public_keys": 'Inline JWKS instead of a URL: {"keys": [{"kty": "RSA", "kid": "k1", "n": "…", "e": "AQAB"}]}.',
            "consumer_claim": "The claim that names the app: sub for user tokens, azp or client_id for client "
            "credentials.",
        }

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        names = ("issuer", "audiences", "jwks_url", "public_keys", "algorithms", "leeway_seconds", "consumer_claim")
        if any(name in self.errors for name in (*names, "token_in_query")):
            return data
        values = {name: data[name] if name in self.fields else getattr(self.instance, name) for name in names}
        candidate = JwtIssuer(**values, token_in_query=data.get("token_in_query", ""))
        candidate.auto_provision = bool(data.get("auto_provision"))
        try:
            services.jwt_issuer_check(candidate)
        except ValidationError as exc:
            _errors_to_form(self, exc)
            return data
        for name in (*names, "token_in_query"):
            if name in self.fields:
                data[name] = getattr(candidate, name)
        return data


@admin.register(JwtIssuer)
class JwtIssuerAdmin(ServiceDeleteAdmin):
    form = JwtIssuerForm
    tenant_reloads_form = False  # no picker on the form depends on the tenant
    list_display = ["name", "tenant", "issuer", "key_source", "auto_provision", "api_count", "updated_at"]
    list_filter = ["auto_provision", "tenant"]
    search_fields = ["id", "name", "issuer", "tenant__id"]
    list_select_related = ["tenant"]
    readonly_fields = ["id", "created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["id", "tenant", "name", "issuer", "audiences"]}),
        (
            "Signing keys",
            {
                "fields": ["jwks_url", "public_keys", "algorithms", "leeway_seconds"],
                "description": "One of the two: a JWKS URL (fetched through the same address checks as upstreams, "
                "cached, refetched for an unknown kid) or inline public keys.",
            },
        ),
        (
            "Which app calls",
            {
                "fields": ["consumer_claim", "auto_provision", "token_in_query"],
                "description": "A token's consumer claim is looked up in the consumers' identities at this issuer; "
                "a claim no consumer has gets 403 unless consumers are provisioned automatically.",
            },
        ),
        ("History", {"fields": ["created_at", "updated_at"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[JwtIssuer]:
        return super().get_queryset(request).annotate(_apis=Count("apis", distinct=True))

    def get_readonly_fields(self, request: HttpRequest, obj: JwtIssuer | None = None) -> list[str]:
        # The iss stays what it was: services.jwt_issuer_update takes the row as its ``issuer`` argument, so it
        # cannot be given an ``issuer`` field to change (a new iss is a new issuer here, for now).
        return [*self.readonly_fields, "tenant", "issuer"] if obj else list(self.readonly_fields)

    @admin.display(description="keys from")
    def key_source(self, obj: JwtIssuer) -> str:
        return obj.jwks_url or "inline keys"

    @admin.display(description="APIs", ordering="_apis")
    def api_count(self, obj: JwtIssuer) -> int:
        return obj._apis  # type: ignore[attr-defined]

    def delete_refusal(self, obj: JwtIssuer) -> str | None:
        return services.jwt_issuer_delete_refusal(obj)

    def delete_through_service(self, request: HttpRequest, obj: JwtIssuer) -> None:
        services.jwt_issuer_delete(issuer=obj, actor=request.user)

    def save_model(self, request: HttpRequest, obj: JwtIssuer, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        fields = {name: data[name] for name in services.JWT_ISSUER_FIELDS if name in data}
        if change:
            fields.pop("issuer", None)  # read-only on a change (see get_readonly_fields)
            services.jwt_issuer_update(jwt_issuer=obj, actor=request.user, **fields)
        else:
            created = services.jwt_issuer_create(tenant=data["tenant"], actor=request.user, **fields)
            obj.pk = created.pk
            obj._state.adding = False


# ---------------------------------------------------------------------------
# APIs
# ---------------------------------------------------------------------------


class UpstreamTargetInline(admin.TabularInline):
    model = UpstreamTarget
    extra = 0
    fields = ["url", "weight"]


class ApiForm(forms.ModelForm):
    class Meta:
        model = Api
        fields = ["tenant", "status", *services.API_FIELDS, "policies", "plans", "jwt_issuers"]
        field_classes = {"openapi_spec": BlankJSONField}

    # Settings a form posted without them keeps as they are (on a new API: the defaults), like the services do.
    _KEPT_WHEN_ABSENT = ("auth_method", "validation")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in self._KEPT_WHEN_ABSENT:
            if name in self.fields:
                self.fields[name].required = False

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        for name in self._KEPT_WHEN_ABSENT:
            if name in self.fields and not data.get(name):
                data[name] = getattr(self.instance, name)
        candidate = Api(**{k: v for k, v in data.items() if k not in ("policies", "plans", "jwt_issuers")})
        if self.instance.pk:  # a change: tenant is read-only here, and the route checks need it
            candidate.pk, candidate.tenant_id = self.instance.pk, self.instance.tenant_id
        try:
            services.api_check(candidate)
            if "policies" in data:
                services.policies_check_for_api(list(data["policies"]), key_header=candidate.key_header)
        except ValidationError as exc:
            _errors_to_form(self, exc)
        needs_issuers = data.get("auth_method", Api.AuthMethod.KEY) != Api.AuthMethod.KEY
        if needs_issuers and not data.get("jwt_issuers") and "jwt_issuers" in self.fields:
            self.add_error("jwt_issuers", "Choose at least one JWT issuer: tokens from them are accepted.")
        return data


@admin.register(Api)
class ApiAdmin(ServiceDeleteAdmin):
    form = ApiForm

    class Media:
        css = {"all": ("apimgmt/admin.css",)}

    list_display = [
        "api_name",
        "tenant",
        "route",
        "upstream_url",
        "status_badge",
        "visibility",
        "subscription_approval",
    ]
    list_filter = ["status", "visibility", "auth_method", "subscription_approval", "tenant"]
    search_fields = ["id", "api_name", "base_path", "host", "upstream_url", "tenant__id"]
    list_select_related = ["tenant"]
    filter_horizontal = ["policies", "plans", "jwt_issuers"]
    inlines = [UpstreamTargetInline]
    actions = ["activate_apis", "deprecate_apis", "retire_apis"]
    fieldsets = [
        (None, {"fields": ["id", "tenant", "api_name", "description", "status", "sunset_at", "visibility"]}),
        ("Routing", {"fields": ["base_path", "host", "upstream_url", "strip_path"]}),
        (
            "Authentication",
            {
                "fields": [
                    "auth_method",
                    "key_header",
                    "accept_bearer",
                    "key_query_param",
                    "jwt_issuers",
                    "subscription_approval",
                ],
                "description": "API key: the key goes in the key header (or as a Bearer token or in the query "
                "parameter, when allowed). JWT: a token signed by one of the issuers, as Authorization: Bearer.",
            },
        ),
        ("Plans", {"fields": ["plans"]}),
        (
            "Upstream behaviour",
            {
                "fields": [
                    "connect_timeout",
                    "read_timeout",
                    "total_timeout",
                    "retries",
                    "cb_failure_threshold",
                    "cb_recovery_timeout",
                ]
            },
        ),
        (
            "WebSocket and streams",
            {
                "fields": [
                    "websocket",
                    "websocket_max_connections",
                    "websocket_idle_timeout",
                    "websocket_max_message_bytes",
                    "stream_timeout",
                ]
            },
        ),
        ("Policies and documentation", {"fields": ["policies", "openapi_spec", "validation"]}),
        ("History", {"fields": ["created_at", "updated_at"]}),
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: Api | None = None) -> list[str]:
        fields = ["id", "created_at", "updated_at"]
        # Status changes go through the actions (activate / deprecate / retire).
        return [*fields, "tenant", "status"] if obj else fields

    def delete_refusal(self, obj: Api) -> str | None:
        return services.api_delete_refusal(obj)

    def delete_through_service(self, request: HttpRequest, obj: Api) -> None:
        services.api_delete(api=obj, actor=request.user)

    @admin.display(description="route")
    def route(self, obj: Api) -> str:
        return f"{obj.host}{obj.base_path}" if obj.host else obj.base_path

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Api) -> str:
        # Coloured by apimgmt/admin.css (ApiAdmin.Media): the control plane's CSP refuses inline styles.
        return format_html('<b class="api-status api-status-{}">{}</b>', obj.status, obj.get_status_display())

    def save_model(self, request: HttpRequest, obj: Api, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        fields = {name: data[name] for name in services.API_FIELDS if name in data}
        # The issuers go with the auth method: a jwt API without them would be refused.
        issuers = list(data["jwt_issuers"]) if "jwt_issuers" in data else None
        if change:
            services.api_update(api=obj, actor=request.user, jwt_issuers=issuers, **fields)
        else:
            created = services.api_create(
                tenant=data["tenant"],
                actor=request.user,
                status=data.get("status") or Api.Status.DRAFT,
                jwt_issuers=issuers or (),
                **fields,
            )
            obj.pk = created.pk
            obj._state.adding = False

    def save_related(self, request: HttpRequest, form: forms.ModelForm, formsets: Any, change: bool) -> None:
        api = form.instance
        targets: list[tuple[str, int]] = []
        for formset in formsets:
            for target_form in formset.forms:
                cleaned = getattr(target_form, "cleaned_data", None)
                if cleaned and not cleaned.get("DELETE") and cleaned.get("url"):
                    targets.append((cleaned["url"], cleaned.get("weight") or 1))
        services.api_update(
            api=api,
            actor=request.user,
            policies=form.cleaned_data["policies"],
            plans=form.cleaned_data["plans"],
            targets=targets,
        )

    def construct_change_message(self, request: HttpRequest, form: Any, formsets: Any, add: bool = False) -> Any:
        # Targets are saved by the service, not by the formsets, so describe the form only.
        return [{"added": {}}] if add else [{"changed": {"fields": form.changed_data}}]

    def _transition(self, request: HttpRequest, queryset: QuerySet[Api], verb: str, **kwargs: Any) -> None:
        action = {
            "Activated": services.api_activate,
            "Deprecated": services.api_deprecate,
            "Retired": services.api_retire,
        }[verb]
        done, errors = 0, []
        target = {"Activated": "active", "Deprecated": "deprecated", "Retired": "retired"}[verb]
        for api in queryset:
            if api.status == target:
                continue
            try:
                action(api=api, actor=request.user, **kwargs)
                done += 1
            except ValidationError as exc:
                errors.append(f"{api.api_name}: {_messages_of(exc)}")
        _report(request, done, verb, errors)

    @admin.action(description="Activate selected APIs")
    def activate_apis(self, request: HttpRequest, queryset: QuerySet[Api]) -> None:
        self._transition(request, queryset, "Activated")

    @admin.action(description="Deprecate selected APIs (still routed, with a Deprecation header)")
    def deprecate_apis(self, request: HttpRequest, queryset: QuerySet[Api]) -> None:
        self._transition(request, queryset, "Deprecated")

    @admin.action(description="Retire selected APIs (stop routing; cancels subscriptions)")
    def retire_apis(self, request: HttpRequest, queryset: QuerySet[Api]) -> None:
        self._transition(request, queryset, "Retired")


# ---------------------------------------------------------------------------
# Consumers and keys
# ---------------------------------------------------------------------------


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    can_delete = False
    fields = ("key_id", "name", "key_prefix", "active", "expires_at", "last_used_at", "revoked_at")
    readonly_fields = ("key_id", "name", "key_prefix", "active", "expires_at", "last_used_at", "revoked_at")
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _ip_list_field(label: str, help_text: str) -> LinesField:
    return LinesField(label=label, help_text=help_text)


class IpListsForm(forms.ModelForm):
    """A consumer's or key's allow and deny lists of CIDRs, one per line (checked like the services check them)."""

    ip_allow = _ip_list_field(
        "Allowed addresses",
        "One CIDR or address per line, IPv4 or IPv6; when any are listed, calls from anywhere else get 403. "
        "For example 203.0.113.0/24.",
    )
    ip_deny = _ip_list_field(
        "Denied addresses", "One CIDR or address per line; refused even when also allowed. For example 198.51.100.7."
    )

    def clean_ip_allow(self) -> list[str]:
        return validate_cidr_list(self.cleaned_data.get("ip_allow") or [], "ip_allow")

    def clean_ip_deny(self) -> list[str]:
        return validate_cidr_list(self.cleaned_data.get("ip_deny") or [], "ip_deny")


class ConsumerIdentityForm(forms.ModelForm):
    class Meta:
        model = ConsumerIdentity
        fields = ["issuer", "external_id"]
        help_texts = {"external_id": "The value of the issuer's consumer claim (sub, azp …) in this app's tokens."}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # An identity is deleted and added again, never edited. (Its id is made on construction: only the row's
        # state tells a stored one.)
        if not self.instance._state.adding:
            for field in self.fields.values():
                field.disabled = True

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        issuer, consumer = data.get("issuer"), getattr(self.instance, "consumer", None)
        if issuer is not None and consumer is not None and issuer.tenant_id != consumer.tenant_id:
            self.add_error("issuer", "Choose an issuer of this consumer's tenant.")
        return data


class ConsumerIdentityInline(admin.TabularInline):
    """Who the consumer is at each JWT issuer. Identities are added or deleted (through the services), not edited."""

    model = ConsumerIdentity
    form = ConsumerIdentityForm
    extra = 0
    verbose_name = "identity at a JWT issuer"
    verbose_name_plural = "identities at JWT issuers"

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return ["created_at"]

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.related_model is JwtIssuer:
            rows = JwtIssuer.objects.select_related("tenant")
            if not selectors.is_platform_staff(request.user):
                rows = rows.filter(tenant_id__in=_admin_tenant_ids(request))
            tenant_id = getattr(request, "_picker_tenant_id", None)
            kwargs["queryset"] = rows.filter(tenant_id=tenant_id) if tenant_id else rows
            if not tenant_id:
                kwargs["form_class"] = TenantLabelledChoiceField
        return super().formfield_for_foreignkey(db_field, request, **kwargs)


class ConsumerForm(IpListsForm):
    class Meta:
        model = Consumer
        fields = ["tenant", "name", "description", "owner", "ip_allow", "ip_deny"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        tenant_id = data["tenant"].pk if data.get("tenant") else self.instance.tenant_id
        if data.get("owner") is not None and tenant_id:
            try:
                services.consumer_owner_check(tenant_id, data["owner"])
            except ValidationError as exc:
                _errors_to_form(self, exc)
        return data


@admin.register(Consumer)
class ConsumerAdmin(ServiceDeleteAdmin):
    form = ConsumerForm
    list_display = ["name", "tenant", "owner", "status", "active_keys", "created_at"]
    list_filter = ["status", "tenant"]
    search_fields = ["id", "name", "owner__username", "owner__email", "tenant__id"]
    list_select_related = ["tenant", "owner"]
    autocomplete_fields = ["owner"]
    readonly_fields = ["id", "created_at"]
    inlines = [ConsumerIdentityInline, ApiKeyInline]
    actions = ["block_consumers", "unblock_consumers"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Consumer]:
        # Live keys: not revoked and not expired (ApiKey.objects.live()), not merely "active".
        return super().get_queryset(request).annotate(_keys=Count("keys", filter=Q(keys__in=ApiKey.objects.live())))

    def get_readonly_fields(self, request: HttpRequest, obj: Consumer | None = None) -> list[str]:
        return ["id", "created_at", "tenant", "status"] if obj else ["id", "created_at", "status"]

    @admin.display(description="live keys", ordering="_keys")
    def active_keys(self, obj: Consumer) -> int:
        return obj._keys  # type: ignore[attr-defined]

    def save_model(self, request: HttpRequest, obj: Consumer, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        if change:
            services.consumer_update(
                consumer=obj,
                actor=request.user,
                name=data["name"],
                description=data["description"],
                owner=data.get("owner"),
                ip_allow=data.get("ip_allow") or [],
                ip_deny=data.get("ip_deny") or [],
            )
        else:
            created = services.consumer_create(
                tenant=data["tenant"],
                name=data["name"],
                description=data["description"],
                owner=data.get("owner"),
                ip_allow=data.get("ip_allow") or [],
                ip_deny=data.get("ip_deny") or [],
                actor=request.user,
            )
            obj.pk = created.pk
            obj._state.adding = False

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        if formset.model is not ConsumerIdentity:
            return super().save_formset(request, form, formset, change)
        # Identities are made and deleted by the services (audited; gateways drop cached token answers).
        formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []
        for identity_form in formset.deleted_forms:
            if not identity_form.instance._state.adding:
                services.consumer_identity_delete(identity=identity_form.instance, actor=request.user)
                formset.deleted_objects.append(identity_form.instance)
        for identity_form in formset.forms:
            stored = not identity_form.instance._state.adding
            if identity_form in formset.deleted_forms or stored or not identity_form.has_changed():
                continue
            data = identity_form.cleaned_data
            try:
                identity = services.consumer_identity_create(
                    consumer=form.instance, issuer=data["issuer"], external_id=data["external_id"], actor=request.user
                )
            except ValidationError as exc:
                messages.error(request, f"Identity {data['external_id']!r} not added: {_messages_of(exc)}")
            else:
                formset.new_objects.append(identity)
        return None

    def delete_refusal(self, obj: Consumer) -> str | None:
        return None  # a consumer can always go: consumer_delete revokes its keys (audited) and tells the gateways

    def delete_through_service(self, request: HttpRequest, obj: Consumer) -> None:
        services.consumer_delete(consumer=obj, actor=request.user)

    @admin.action(description="Block selected consumers (their keys get 403)")
    def block_consumers(self, request: HttpRequest, queryset: QuerySet[Consumer]) -> None:
        done = 0
        for consumer in queryset.filter(status=Consumer.Status.ACTIVE):
            services.consumer_block(consumer=consumer, actor=request.user)
            done += 1
        _report(request, done, "Blocked", [])

    @admin.action(description="Unblock selected consumers")
    def unblock_consumers(self, request: HttpRequest, queryset: QuerySet[Consumer]) -> None:
        done = 0
        for consumer in queryset.filter(status=Consumer.Status.BLOCKED):
            services.consumer_unblock(consumer=consumer, actor=request.user)
            done += 1
        _report(request, done, "Unblocked", [])


class ApiKeyAddForm(IpListsForm):
    class Meta:
        model = ApiKey
        fields = ["consumer", "name", "expires_at", "ip_allow", "ip_deny"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        try:
            services.api_key_check(consumer=data.get("consumer"), expires_at=data.get("expires_at"))
        except ValidationError as exc:
            _errors_to_form(self, exc)
        return data


class ApiKeyChangeForm(IpListsForm):
    class Meta:
        model = ApiKey
        fields = ["name", "expires_at", "ip_allow", "ip_deny"]


@admin.register(ApiKey)
class ApiKeyAdmin(TenantScopedAdmin):
    tenant_path = "consumer__tenant"
    list_display = [
        "key_prefix_display",
        "name",
        "consumer",
        "tenant",
        "state",
        "expires_at",
        "last_used_at",
        "created_at",
    ]
    list_filter = ["active", "consumer__tenant"]
    search_fields = ["key_id", "key_prefix", "name", "consumer__name", "consumer__id", "consumer__tenant__id"]
    list_select_related = ["consumer", "consumer__tenant"]
    actions = ["revoke_keys", "rotate_keys"]
    readonly_fields = ["key_id", "key_prefix", "active", "last_used_at", "revoked_at", "rotated_from", "created_at"]

    def get_form(self, request: HttpRequest, obj: ApiKey | None = None, change: bool = False, **kwargs: Any) -> Any:
        form: type[forms.ModelForm] = ApiKeyAddForm if obj is None else ApiKeyChangeForm
        # Like the admin does for its own form: a declared field that is read-only here (a revoked key) goes.
        readonly = [f for f in self.get_readonly_fields(request, obj) if f in form.declared_fields]
        kwargs["form"] = type(form.__name__, (form,), dict.fromkeys(readonly))
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        if obj is None:
            return ["consumer", "name", "expires_at", "ip_allow", "ip_deny"]
        return [
            "key_id",
            "consumer",
            "name",
            "key_prefix",
            "active",
            "expires_at",
            "ip_allow",
            "ip_deny",
            "last_used_at",
            "revoked_at",
            "rotated_from",
            "created_at",
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        if obj is None:
            return []
        if obj.revoked_at is not None:
            # A revoked key is history: nothing about it changes any more.
            return self.get_fields(request, obj)
        return [*self.readonly_fields, "consumer"]

    @admin.display(description="key", ordering="key_prefix")
    def key_prefix_display(self, obj: ApiKey) -> str:
        return f"{obj.key_prefix}…"

    @admin.display(description="tenant", ordering="consumer__tenant_id")
    def tenant(self, obj: ApiKey) -> str:
        return obj.consumer.tenant_id

    @admin.display(description="state")
    def state(self, obj: ApiKey) -> str:
        if obj.revoked_at:
            return "revoked"
        return "active" if obj.is_usable() else "expired"

    def save_model(self, request: HttpRequest, obj: ApiKey, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        if change:
            if obj.revoked_at is None:
                if "expires_at" in form.changed_data:  # not a field of api_key_update: set here, audited the same
                    ApiKey.objects.filter(pk=obj.pk).update(expires_at=data.get("expires_at"))
                    services.audit_record(
                        actor=request.user,
                        tenant_id=obj.consumer.tenant_id,
                        action="api_key.update",
                        obj=obj,
                        changes={"expires_at": data.get("expires_at")},
                    )
                    services.keys_changed([obj.key_hash])
                services.api_key_update(
                    key=obj,
                    actor=request.user,
                    name=data.get("name", obj.name),
                    ip_allow=data.get("ip_allow") or [],
                    ip_deny=data.get("ip_deny") or [],
                )
            return
        key, plaintext = services.api_key_create(
            consumer=data["consumer"],
            name=data.get("name") or "",
            expires_at=data.get("expires_at"),
            ip_allow=data.get("ip_allow") or [],
            ip_deny=data.get("ip_deny") or [],
            actor=request.user,
        )
        obj.pk = key.pk
        obj._state.adding = False
        request._new_api_keys = [(key, plaintext)]  # type: ignore[attr-defined]

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None) -> HttpResponse:
        created = getattr(request, "_new_api_keys", None)
        if created:
            return self._key_page(request, created, "New API key")
        return super().response_add(request, obj, post_url_continue)

    @staticmethod
    def _key_page(request: HttpRequest, created: list[tuple[ApiKey, str]], title: str) -> TemplateResponse:
        return _secret_page(
            request,
            title=title,
            noun="the key",
            back_url=reverse("admin:apimgmt_apikey_changelist"),
            back_label="API keys",
            secrets=[
                {
                    "owner": key.consumer.name,
                    "name": key.name,
                    "id": key.pk,
                    "url": reverse("admin:apimgmt_apikey_change", args=[key.pk]),
                    "secret": plaintext,
                }
                for key, plaintext in created
            ],
        )

    def has_change_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        if obj is not None and obj.revoked_at is not None:
            return False  # a revoked key is history: view only
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # keys are revoked, not deleted, so their history stays

    @admin.action(description="Revoke selected keys (one-way)")
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        done = 0
        for key in queryset.filter(revoked_at__isnull=True):
            services.api_key_revoke(key=key, actor=request.user)
            done += 1
        _report(request, done, "Revoked", [])

    @admin.action(
        description=f"Rotate selected keys (old key valid {DEFAULT_ROTATION_OVERLAP_SECONDS // 60} more minutes)"
    )
    def rotate_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> TemplateResponse | None:
        created: list[tuple[ApiKey, str]] = []
        errors = []
        for key in queryset.select_related("consumer"):
            try:
                successor, plaintext = services.api_key_rotate(key=key, actor=request.user)
            except ValidationError as exc:
                errors.append(f"{key.key_prefix}…: {_messages_of(exc)}")
                continue
            created.append((successor, plaintext))
        _report(request, len(created), "Rotated", errors)
        return self._key_page(request, created, "Rotated API keys") if created else None


# ---------------------------------------------------------------------------
# Subscriptions
# ---------------------------------------------------------------------------


class SubscriptionForm(forms.ModelForm):
    class Meta:
        model = Subscription
        fields = ["consumer", "api", "plan"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("consumer") and data.get("api"):
            try:
                services.subscription_check(consumer=data["consumer"], api=data["api"], plan=data.get("plan"))
            except ValidationError as exc:
                fields = {"consumer_id": "consumer", "api_id": "api", "plan_id": "plan"}
                if hasattr(exc, "error_dict"):
                    exc = ValidationError({fields.get(k, k): v for k, v in exc.message_dict.items()})
                _errors_to_form(self, exc)
        return data


@admin.register(Subscription)
class SubscriptionAdmin(TenantScopedAdmin):
    form = SubscriptionForm
    tenant_path = "api__tenant"
    list_display = ["id", "consumer", "api", "plan", "status", "decided_by", "decided_at", "created_at"]
    list_filter = ["status", "api__tenant", "plan"]
    search_fields = ["id", "consumer__name", "api__api_name", "plan__name", "api__tenant__id"]
    list_select_related = ["consumer", "api", "plan", "decided_by"]
    readonly_fields = [
        "id",
        "status",
        "decided_by",
        "decided_at",
        "decision_note",
        "pending_plan",
        "plan_change_at",
        "created_at",
    ]
    actions = ["approve_subscriptions", "reject_subscriptions", "cancel_subscriptions"]

    def get_readonly_fields(self, request: HttpRequest, obj: Subscription | None = None) -> list[str]:
        return [*self.readonly_fields, "consumer", "api", "plan"] if obj else self.readonly_fields

    def picker_tenant_id(self, request: HttpRequest, obj: Any) -> str | None:
        """The API's tenant: the subscription's, or that of the API chosen on the add form (``?api=``)."""
        api = obj.api if obj is not None else None
        chosen = request.POST.get("api") or request.GET.get("api")
        if api is None and chosen:
            api = self._picker_rows(request, Api)[0].filter(pk=chosen).first()
        request._picker_api = api  # type: ignore[attr-defined]
        return api.tenant_id if api is not None else None

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        api = getattr(request, "_picker_api", None)
        if db_field.name == "plan" and api is not None:
            # Only the plans the API offers (none: it takes subscriptions without a plan).
            kwargs["queryset"] = api.plans.filter(archived_at__isnull=True).select_related("tenant")
            field = db_field.formfield(**kwargs)
            field.required = api.plans.exists()
            field.help_text = (
                f"The plans {api.api_name} offers; a subscription must choose one."
                if field.required
                else f"{api.api_name} offers no plans: its subscriptions have none."
            )
            return field
        field = super().formfield_for_foreignkey(db_field, request, **kwargs)
        if db_field.name == "api" and api is None and field is not None:
            field.widget.attrs["data-reload-with"] = "api"
        if db_field.name == "plan" and api is None and field is not None:
            field.help_text = "Choose the API first: this list then offers only the plans it offers."
        return field

    def save_model(self, request: HttpRequest, obj: Subscription, form: forms.ModelForm, change: bool) -> None:
        if change:
            return
        data = form.cleaned_data
        created = services.subscription_request(
            consumer=data["consumer"], api=data["api"], plan=data.get("plan"), actor=request.user
        )
        obj.pk = created.pk
        obj._state.adding = False

    def _decide(self, request: HttpRequest, queryset: QuerySet[Subscription], verb: str) -> None:
        action = {
            "Approved": services.subscription_approve,
            "Rejected": services.subscription_reject,
            "Cancelled": services.subscription_cancel,
        }[verb]
        done, errors = 0, []
        for subscription in queryset:
            try:
                action(subscription=subscription, actor=request.user)
                done += 1
            except ValidationError as exc:
                errors.append(f"{subscription.pk}: {_messages_of(exc)}")
        _report(request, done, verb, errors)

    @admin.action(description="Approve selected pending subscriptions")
    def approve_subscriptions(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        self._decide(request, queryset, "Approved")

    @admin.action(description="Reject selected pending subscriptions")
    def reject_subscriptions(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        self._decide(request, queryset, "Rejected")

    @admin.action(description="Cancel selected subscriptions")
    def cancel_subscriptions(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        self._decide(request, queryset, "Cancelled")


# ---------------------------------------------------------------------------
# Read-only history: usage and audit
# ---------------------------------------------------------------------------


class FixedCountPaginator(Paginator):
    """Counting am_usage_records on every page view is too slow; claim a large fixed count instead."""

    @cached_property
    def count(self) -> int:
        return 1_000_000


class ReadOnlyAdmin(TenantScopedAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = [
        "timestamp",
        "tenant",
        "api_id",
        "consumer_id",
        "key_id",
        "status_code",
        "request_count",
        "error_count",
        "bytes_in",
        "bytes_out",
        "latency_avg",
        # WebSocket connections (status 101 rows; bytes_in and bytes_out are then their messages' bytes).
        "connection_count",
        "connected_seconds",
        "messages_in",
        "messages_out",
    ]
    list_filter = ["tenant", "status_code"]
    search_fields = ["api_id", "consumer_id", "key_id"]
    paginator = FixedCountPaginator
    show_full_result_count = False
    date_hierarchy = None

    @admin.display(description="avg latency (ms)")
    def latency_avg(self, obj: UsageRecord) -> str:
        return f"{obj.latency_ms_sum / obj.request_count:.1f}" if obj.request_count else "—"

    @admin.display(description="connected (s)", ordering="connection_seconds")
    def connected_seconds(self, obj: UsageRecord) -> str:
        return f"{obj.connection_seconds:.1f}"


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ["at", "actor_repr", "tenant_id", "action", "object_type", "object_id", "request_id", "ip"]
    list_filter = ["action", "object_type"]
    search_fields = ["object_id", "actor_repr", "request_id", "tenant_id", "action"]
    readonly_fields = [
        "at",
        "actor",
        "actor_repr",
        "tenant",
        "action",
        "object_type",
        "object_id",
        "changes",
        "request_id",
        "ip",
    ]
    show_full_result_count = False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_staff)


# ---------------------------------------------------------------------------
# Management API tokens
# ---------------------------------------------------------------------------


class ApiTokenAddForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ["user", "name", "expires_at"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        user, expires_at = data.get("user"), data.get("expires_at")
        if user is not None and not user.is_active:
            self.add_error("user", "This user is inactive; activate it before giving it a token.")
        if expires_at is not None and expires_at <= timezone.now():
            self.add_error("expires_at", "expires_at must be in the future.")
        return data


@admin.register(ApiToken)
class ApiTokenAdmin(NotFoundAdmin):
    """Platform staff manage everybody's tokens; other staff see and create only their own."""

    list_display = ["token_prefix_display", "name", "user", "created_at", "last_used_at", "expires_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["token_prefix", "name", "user__username", "user__email"]
    list_select_related = ["user"]
    actions = ["revoke_tokens"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiToken]:
        qs = super().get_queryset(request)
        return qs if selectors.is_platform_staff(request.user) else qs.filter(user_id=request.user.pk)

    def get_form(self, request: HttpRequest, obj: ApiToken | None = None, change: bool = False, **kwargs: Any) -> Any:
        kwargs["form"] = ApiTokenAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "user" and not selectors.is_platform_staff(request.user):
            kwargs["queryset"] = User.objects.filter(pk=request.user.pk or 0)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def get_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> Any:
        if obj is None:
            return ["user", "name", "expires_at"]
        return ["user", "name", "token_prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]

    def has_change_permission(self, request: HttpRequest, obj: ApiToken | None = None) -> bool:
        return False if obj is not None else super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: ApiToken | None = None) -> bool:
        return False  # revoke instead, so the audit trail keeps the token

    @admin.display(description="token", ordering="token_prefix")
    def token_prefix_display(self, obj: ApiToken) -> str:
        return f"{obj.token_prefix}…"

    def save_model(self, request: HttpRequest, obj: ApiToken, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        token, plaintext = tokens.api_token_create(
            user=data["user"], name=data.get("name") or "", expires_at=data.get("expires_at"), actor=request.user
        )
        obj.pk = token.pk
        obj._state.adding = False
        request._new_api_token = (token, plaintext)  # type: ignore[attr-defined]

    def response_add(self, request: HttpRequest, obj: ApiToken, post_url_continue: str | None = None) -> HttpResponse:
        created = getattr(request, "_new_api_token", None)
        if created is None:
            return super().response_add(request, obj, post_url_continue)
        token, plaintext = created
        return _secret_page(
            request,
            title="New management API token",
            noun="the token",
            back_url=reverse("admin:apimgmt_apitoken_changelist"),
            back_label="Management API tokens",
            secrets=[
                {
                    "owner": str(token.user),
                    "name": token.name,
                    "id": str(token.pk),
                    "url": reverse("admin:apimgmt_apitoken_change", args=[token.pk]),
                    "secret": plaintext,
                }
            ],
        )

    @admin.action(description="Revoke selected tokens")
    def revoke_tokens(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        done = 0
        for token in queryset.filter(revoked_at__isnull=True):
            tokens.api_token_revoke(token=token, actor=request.user)
            done += 1
        _report(request, done, "Revoked", [])


# ---------------------------------------------------------------------------
# Events out: webhook endpoints, their delivery log, the event outbox, plan changes (apimgmt/webhooks.py)
# ---------------------------------------------------------------------------


def _event_type_choices() -> list[tuple[str, str]]:
    from apimgmt import events

    return [(name, f"{name} — {meaning}") for name, meaning in events.CATALOGUE.items()]


class WebhookEndpointForm(forms.ModelForm):
    event_types = forms.MultipleChoiceField(
        choices=_event_type_choices,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked: every event type.",
    )

    class Meta:
        model = WebhookEndpoint
        fields = ["tenant", "url", "description", "event_types"]

    def clean(self) -> dict[str, Any]:
        from apimgmt import webhooks

        data = super().clean() or {}
        if data.get("url"):
            try:
                data["url"] = webhooks.validate_webhook_url(data["url"])
            except ValidationError as exc:
                _errors_to_form(self, exc)
        return data


class WebhookEndpointAdmin(ServiceDeleteAdmin):
    """A tenant's webhook receivers: the signing secret is shown once (on add and on rotation), never again."""

    form = WebhookEndpointForm
    list_display = ["url", "tenant", "status", "event_type_list", "failing_since", "created_at"]
    list_filter = ["status", "tenant"]
    search_fields = ["id", "url", "description", "tenant__id"]
    list_select_related = ["tenant"]
    readonly_fields = [
        "id",
        "status",
        "disabled_reason",
        "previous_secret_expires_at",
        "failing_since",
        "created_at",
        "updated_at",
    ]
    actions = ["rotate_secrets", "enable_endpoints", "disable_endpoints"]

    def get_readonly_fields(self, request: HttpRequest, obj: WebhookEndpoint | None = None) -> list[str]:
        return [*self.readonly_fields, "tenant"] if obj else self.readonly_fields

    @admin.display(description="event types")
    def event_type_list(self, obj: WebhookEndpoint) -> str:
        return ", ".join(obj.event_types) or "every type"

    def delete_refusal(self, obj: WebhookEndpoint) -> str | None:
        return None

    def delete_through_service(self, request: HttpRequest, obj: WebhookEndpoint) -> None:
        from apimgmt import webhooks

        webhooks.webhook_endpoint_delete(endpoint=obj, actor=request.user)

    def save_model(self, request: HttpRequest, obj: WebhookEndpoint, form: forms.ModelForm, change: bool) -> None:
        from apimgmt import webhooks

        data = form.cleaned_data
        if change:
            webhooks.webhook_endpoint_update(
                endpoint=obj,
                actor=request.user,
                url=data["url"],
                description=data["description"],
                event_types=list(data["event_types"]),
            )
            return
        created, secret = webhooks.webhook_endpoint_create(
            tenant=data["tenant"],
            url=data["url"],
            description=data["description"],
            event_types=data["event_types"],
            actor=request.user,
        )
        obj.pk = created.pk
        obj._state.adding = False
        request._new_webhook_secrets = [(created, secret)]  # type: ignore[attr-defined]

    def response_add(
        self, request: HttpRequest, obj: WebhookEndpoint, post_url_continue: str | None = None
    ) -> HttpResponse:
        created = getattr(request, "_new_webhook_secrets", None)
        if not created:
            return super().response_add(request, obj, post_url_continue)
        return self._secret_page(request, created, "New webhook endpoint")

    @staticmethod
    def _secret_page(request: HttpRequest, created: list[tuple[WebhookEndpoint, str]], title: str) -> TemplateResponse:
        return _secret_page(
            request,
            title=title,
            noun="the signing secret",
            back_url=reverse("admin:apimgmt_webhookendpoint_changelist"),
            back_label="Webhook endpoints",
            secrets=[
                {
                    "owner": endpoint.tenant_id,
                    "name": endpoint.url,
                    "id": endpoint.pk,
                    "url": reverse("admin:apimgmt_webhookendpoint_change", args=[endpoint.pk]),
                    "secret": secret,
                }
                for endpoint, secret in created
            ],
            storage_note="It is kept only to sign requests and is never displayed again.",
        )

    @admin.action(description="Rotate signing secrets (the old ones keep signing for a day)")
    def rotate_secrets(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> TemplateResponse:
        from apimgmt import webhooks

        created = [webhooks.webhook_endpoint_rotate_secret(endpoint=e, actor=request.user) for e in queryset]
        return self._secret_page(request, created, "New webhook signing secrets")

    @admin.action(description="Enable selected endpoints")
    def enable_endpoints(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        from apimgmt import webhooks

        rows = list(queryset.exclude(status=WebhookEndpoint.Status.ACTIVE))
        for endpoint in rows:
            webhooks.webhook_endpoint_enable(endpoint=endpoint, actor=request.user)
        _report(request, len(rows), "Enabled", [])

    @admin.action(description="Disable selected endpoints")
    def disable_endpoints(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        from apimgmt import webhooks

        rows = list(queryset.exclude(status=WebhookEndpoint.Status.DISABLED))
        for endpoint in rows:
            webhooks.webhook_endpoint_disable(endpoint=endpoint, actor=request.user)
        _report(request, len(rows), "Disabled", [])


admin.site.register(WebhookEndpoint, WebhookEndpointAdmin)


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    """The delivery log: what was sent where, the answer, the latency and the attempts; any delivery replays."""

    tenant_path = "endpoint__tenant"
    list_display = [
        "created_at",
        "endpoint",
        "event_type",
        "status",
        "attempts",
        "response_code",
        "latency_ms",
        "last_attempt_at",
        "next_attempt_at",
    ]
    list_filter = ["status", "endpoint__tenant"]
    search_fields = ["event__id", "event__event_type", "endpoint__url", "endpoint__id"]
    list_select_related = ["endpoint", "event"]
    readonly_fields = [
        "endpoint",
        "event",
        "status",
        "attempts",
        "response_code",
        "latency_ms",
        "last_error",
        "next_attempt_at",
        "last_attempt_at",
        "completed_at",
        "created_at",
        "replay_of",
        "payload",
    ]
    actions = ["replay_deliveries"]
    show_full_result_count = False

    @admin.display(description="event type", ordering="event__event_type")
    def event_type(self, obj: WebhookDelivery) -> str:
        return obj.event.event_type

    @admin.display(description="data")
    def payload(self, obj: WebhookDelivery) -> str:
        import json

        return json.dumps(obj.event.data, indent=2, sort_keys=True)

    @admin.action(description="Replay selected deliveries (same event, same webhook-id)")
    def replay_deliveries(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        from apimgmt import webhooks

        done, errors = 0, []
        for delivery in queryset.select_related("endpoint"):
            try:
                webhooks.webhook_delivery_replay(delivery=delivery, actor=request.user)
                done += 1
            except ValidationError as exc:
                errors.append(f"{delivery.pk}: {_messages_of(exc)}")
        _report(request, done, "Replayed", errors)


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    """The outbox: every event, written with the change that caused it; delivery is in the delivery log."""

    list_display = ["occurred_at", "tenant", "event_type", "id", "dispatched_at"]
    list_filter = ["event_type", "tenant"]
    search_fields = ["id", "event_type", "tenant__id"]
    readonly_fields = ["id", "tenant", "event_type", "data", "occurred_at", "dispatched_at"]
    show_full_result_count = False


class ChangePlanForm(forms.Form):
    plan = forms.ModelChoiceField(queryset=Plan.objects.none(), help_text="Archived plans are not offered.")
    effective = forms.ChoiceField(
        choices=[
            ("now", "Now (quota already used in this window carries over)"),
            ("next_period", "At the start of the next quota window (the tenant's time zone)"),
        ],
        initial="now",
        widget=forms.RadioSelect,
    )


def change_subscription_plans(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Subscription]
) -> HttpResponse | None:
    """Admin action: an intermediate page choosing the plan and when, then the same service as the API."""
    tenants = set(queryset.values_list("api__tenant_id", flat=True))
    if len(tenants) != 1:
        messages.error(request, "Choose subscriptions of one tenant: plans belong to a tenant.")
        return None
    plans = Plan.objects.filter(tenant_id__in=tenants, archived_at__isnull=True)
    form = ChangePlanForm(request.POST if "apply" in request.POST else None)
    form.fields["plan"].queryset = plans  # type: ignore[attr-defined]
    if form.is_bound and form.is_valid():
        done, errors = 0, []
        for subscription in queryset:
            try:
                services.subscription_change_plan(
                    subscription=subscription,
                    plan=form.cleaned_data["plan"],
                    effective=form.cleaned_data["effective"],
                    actor=request.user,
                )
                done += 1
            except ValidationError as exc:
                errors.append(f"{subscription.pk}: {_messages_of(exc)}")
        _report(request, done, "Moved" if form.cleaned_data["effective"] == "now" else "Scheduled", errors)
        return None
    return TemplateResponse(
        request,
        "admin/apimgmt/change_plan.html",
        {
            **admin.site.each_context(request),
            "title": "Change plan",
            "form": form,
            "subscriptions": queryset,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "opts": Subscription._meta,
        },
    )


change_subscription_plans.short_description = "Change plan of selected subscriptions…"  # type: ignore[attr-defined]
SubscriptionAdmin.actions = [*SubscriptionAdmin.actions, change_subscription_plans]
