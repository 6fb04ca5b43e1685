"""Portal pages: the API catalog with docs, the developer's apps, subscriptions, keys and usage."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db.models import Count, Prefetch, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from apimgmt import selectors, services
from apimgmt.charts import legend
from apimgmt.models import Api, ApiKey, Consumer, Subscription, Tenant
from portal import charts, quota
from portal.access import Portal, owned_app, page, portal_page
from portal.forms import (
    AppForm,
    KeyCreateForm,
    KeyRotateForm,
    NotificationsForm,
    PlanChangeForm,
    SubscribeForm,
    add_service_errors,
    for_developers,
)
from portal.how_to_call import how_to_call
from portal.models import Notice
from portal.notifications import notices_switched_off, notification_preferences_set
from portal.plans import limit_phrases, limits_in_words, plan_cards
from portal.usage import usage_series


def _apps_url(portal: Portal) -> str:
    return reverse("portal:apps", args=[portal.tenant.id])


def _app_url(portal: Portal, app: Consumer) -> str:
    return reverse("portal:app", args=[portal.tenant.id, app.pk])


def _my_apps(request: HttpRequest, portal: Portal) -> QuerySet[Consumer]:
    return Consumer.objects.filter(tenant=portal.tenant, owner_id=request.user.pk).order_by("name")


def _gateway_url(request: HttpRequest, api: Api) -> str:
    """Where developers call the API: the API's own host when it has one, else this site."""
    if api.host:
        return f"{request.scheme}://{api.host}{api.base_path}"
    return request.build_absolute_uri(api.base_path)


# ---------------------------------------------------------------------------
# Catalog and docs
# ---------------------------------------------------------------------------


@require_GET
def portal_index(request: HttpRequest) -> HttpResponse:
    """/portal/: the portals of the tenants the visitor belongs to (every active one for platform staff).

    Anonymous visitors get no list: which companies run portals here is not for everyone to read; each
    provider hands out its own portal's address.
    """
    tenants = (
        selectors.tenants_visible_to(request.user).filter(status=Tenant.Status.ACTIVE).order_by("name")
        if request.user.is_authenticated
        else Tenant.objects.none()
    )
    return render(request, "portal/index.html", {"tenants": tenants})


@portal_page()
def not_found(request: HttpRequest, portal: Portal, unknown: str) -> HttpResponse:
    """Any address in a portal that no page answers: the portal's branded 404."""
    raise Http404(f"No portal page at {unknown!r}.")


@require_GET
@portal_page()
def catalog(request: HttpRequest, portal: Portal) -> HttpResponse:
    apis = [(api, _gateway_url(request, api)) for api in selectors.portal_catalog(portal.tenant)]
    return page(request, portal, "portal/catalog.html", {"apis": apis})


def _catalog_api(portal: Portal, api_id: str) -> Api:
    api = selectors.portal_catalog(portal.tenant).filter(pk=api_id).first()
    if api is None:
        raise Http404("No such API in this portal.")
    return api


def _apps_to_subscribe(request: HttpRequest, portal: Portal, api: Api) -> QuerySet[Consumer]:
    """The developer's apps without a pending or active subscription to the API (the others need no form)."""
    taken = Subscription.objects.filter(api=api).open().values("consumer_id")
    return _my_apps(request, portal).exclude(pk__in=taken)


def _api_page(
    request: HttpRequest, portal: Portal, api: Api, *, form: SubscribeForm | None = None, status: int = 200
) -> HttpResponse:
    """The API page: how to call it, its plans as cards, and (for members) their subscriptions and the form."""
    cards = plan_cards(api)
    gateway_url = _gateway_url(request, api)
    context: dict[str, Any] = {
        "api": api,
        "gateway_url": gateway_url,
        "calling": how_to_call(api, gateway_url),
        "plan_cards": cards,
        "api_limits": ", ".join(limit_phrases(api.policies.all())),
        "new_app_url": reverse("portal:app_create", args=[portal.tenant.id]) + f"?for_api={api.pk}",
    }
    if portal.is_member:
        apps = _my_apps(request, portal)
        context["subscriptions"] = (
            Subscription.objects.filter(api=api, consumer__in=apps)
            .select_related("consumer", "plan")
            .order_by("-created_at")
        )
        context["has_apps"] = apps.exists()
        if portal.can_write and form is None:
            candidates = _apps_to_subscribe(request, portal, api)
            if candidates.exists():
                # "Create an app" from this page comes back with the new app chosen.
                chosen = candidates.filter(pk=request.GET.get("app") or "").first()
                form = SubscribeForm(apps=candidates, cards=cards, initial={"app": chosen} if chosen else None)
        context["form"] = form
    return page(request, portal, "portal/api_detail.html", context, status=status)


@require_GET
@portal_page()
def api_detail(request: HttpRequest, portal: Portal, api_id: str) -> HttpResponse:
    return _api_page(request, portal, _catalog_api(portal, api_id))


@require_GET
@portal_page()
def api_openapi(request: HttpRequest, portal: Portal, api_id: str) -> JsonResponse:
    """The API's OpenAPI document, pointed at the gateway so "Try it out" goes through it."""
    api = _catalog_api(portal, api_id)
    if not isinstance(api.openapi_spec, dict):
        raise Http404("This API has no OpenAPI document.")
    document = dict(api.openapi_spec)
    if not document.get("servers"):
        document["servers"] = [{"url": _gateway_url(request, api)}]
    return JsonResponse(document)


@require_POST
@portal_page(writer=True)
def subscribe(request: HttpRequest, portal: Portal, api_id: str) -> HttpResponse:
    api = _catalog_api(portal, api_id)
    form = SubscribeForm(request.POST, apps=_my_apps(request, portal), cards=plan_cards(api))
    if form.is_valid():
        app = form.cleaned_data["app"]
        try:
            subscription = services.subscription_request(
                consumer=app, api=api, plan=form.cleaned_data.get("plan"), actor=request.user
            )
        except ValidationError as exc:
            add_service_errors(form, exc, field_map={"api_id": "__all__", "consumer_id": "app", "plan_id": "plan"})
        else:
            on_plan = f" on the {subscription.plan.name} plan" if subscription.plan else ""
            if subscription.status == Subscription.Status.ACTIVE:
                messages.success(request, f"{app.name} is subscribed to {api.api_name}{on_plan}. Its keys work now.")
            else:
                messages.info(
                    request,
                    f"{app.name}'s subscription to {api.api_name}{on_plan} is pending until an administrator "
                    "approves it.",
                )
            return HttpResponseRedirect(_app_url(portal, app))
    return _api_page(request, portal, api, form=form, status=400)


# ---------------------------------------------------------------------------
# Apps
# ---------------------------------------------------------------------------


@require_GET
@portal_page(member=True)
def apps(request: HttpRequest, portal: Portal) -> HttpResponse:
    my_apps = _my_apps(request, portal).prefetch_related(
        Prefetch("subscriptions", queryset=Subscription.objects.select_related("api").order_by("-created_at")),
        Prefetch("keys", queryset=ApiKey.objects.live(), to_attr="live_keys"),
    )
    return page(request, portal, "portal/apps.html", {"apps": my_apps})


@require_http_methods(["GET", "POST"])
@portal_page(writer=True)
def app_create(request: HttpRequest, portal: Portal) -> HttpResponse:
    # Started from an API's page: go back there with the new app chosen. Only a catalog API's id is taken,
    # and the way back is built here, so this is no open redirect.
    for_api = selectors.portal_catalog(portal.tenant).filter(pk=request.GET.get("for_api") or "").first()
    form = AppForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            app = services.consumer_create(
                tenant=portal.tenant,
                name=form.cleaned_data["name"],
                description=form.cleaned_data["description"],
                owner=request.user,  # type: ignore[arg-type]
                actor=request.user,
            )
        except ValidationError as exc:
            add_service_errors(form, exc, field_map={"__all__": "name"})
        else:
            if for_api is not None:
                messages.success(request, f"App {app.name} created. Choose a plan and subscribe it below.")
                api_url = reverse("portal:api", args=[portal.tenant.id, for_api.pk])
                return HttpResponseRedirect(f"{api_url}?app={app.pk}#subscribe-h")
            messages.success(request, f"App {app.name} created. Subscribe it to an API, then create a key.")
            return HttpResponseRedirect(_app_url(portal, app))
    context = {"form": form, "app": None, "for_api": for_api}
    return page(request, portal, "portal/app_form.html", context, status=400 if form.errors else 200)


@require_GET
@portal_page(member=True)
def app_detail(request: HttpRequest, portal: Portal, app_id: str) -> HttpResponse:
    app = owned_app(request, portal, app_id)
    now = timezone.now()
    subscribed = Subscription.objects.filter(consumer=app).open().values_list("api_id", flat=True)
    context = {
        "app": app,
        "subscriptions": app.subscriptions.select_related("api", "plan", "pending_plan")
        .annotate(plans_on_offer=Count("api__plans", filter=Q(api__plans__archived_at__isnull=True)))
        .order_by("-created_at"),
        "keys": [
            (key, _key_state(key, now)) for key in app.keys.select_related("rotated_from").order_by("-created_at")
        ],
        "unsubscribed_apis": selectors.portal_catalog(portal.tenant).exclude(pk__in=list(subscribed)),
    }
    return page(request, portal, "portal/app_detail.html", context)


@require_http_methods(["GET", "POST"])
@portal_page(writer=True)
def app_rename(request: HttpRequest, portal: Portal, app_id: str) -> HttpResponse:
    app = owned_app(request, portal, app_id)
    form = AppForm(request.POST or None, initial={"name": app.name, "description": app.description})
    if request.method == "POST" and form.is_valid():
        try:
            services.consumer_update(
                consumer=app,
                name=form.cleaned_data["name"],
                description=form.cleaned_data["description"],
                actor=request.user,
            )
        except ValidationError as exc:
            add_service_errors(form, exc, field_map={"__all__": "name"})
        else:
            messages.success(request, "App saved.")
            return HttpResponseRedirect(_app_url(portal, app))
    return page(request, portal, "portal/app_form.html", {"form": form, "app": app}, status=400 if form.errors else 200)


@require_http_methods(["GET", "POST"])
@portal_page(writer=True)
def app_delete(request: HttpRequest, portal: Portal, app_id: str) -> HttpResponse:
    app = owned_app(request, portal, app_id)
    if request.method == "POST":
        name = app.name
        services.consumer_delete(consumer=app, actor=request.user)
        messages.success(request, f"App {name} deleted; its keys no longer work.")
        return HttpResponseRedirect(_apps_url(portal))
    live_keys = app.keys.live().count()
    return page(request, portal, "portal/app_delete.html", {"app": app, "live_keys": live_keys})


@require_POST
@portal_page(writer=True)
def subscription_cancel(request: HttpRequest, portal: Portal, app_id: str, subscription_id: str) -> HttpResponse:
    app = owned_app(request, portal, app_id)
    subscription = app.subscriptions.filter(pk=subscription_id).select_related("api").first()
    if subscription is None:
        raise Http404("No such subscription.")
    try:
        services.subscription_cancel(subscription=subscription, actor=request.user, note="cancelled in the portal")
    except ValidationError as exc:
        messages.error(request, for_developers(" ".join(exc.messages)))
    else:
        messages.success(request, f"Subscription to {subscription.api.api_name} cancelled.")
    return HttpResponseRedirect(_app_url(portal, app))


def _owned_subscription(app: Consumer, subscription_id: str) -> Subscription:
    subscription = app.subscriptions.filter(pk=subscription_id).select_related("api", "plan", "pending_plan").first()
    if subscription is None:
        raise Http404("No such subscription.")
    return subscription


@require_http_methods(["GET", "POST"])
@portal_page(writer=True)
def subscription_plan(request: HttpRequest, portal: Portal, app_id: str, subscription_id: str) -> HttpResponse:
    """Upgrade or downgrade: the API's other plans; a plan that needs approval makes it a request to an admin."""
    app = owned_app(request, portal, app_id)
    subscription = _owned_subscription(app, subscription_id)
    cards = [card for card in plan_cards(subscription.api) if card.plan.pk != subscription.plan_id]
    is_open = subscription.status in (Subscription.Status.ACTIVE, Subscription.Status.PENDING)
    form = PlanChangeForm(request.POST or None, cards=cards) if is_open and cards else None
    if request.method == "POST":
        if form is None:
            messages.error(request, "This subscription cannot move to another plan.")
            return HttpResponseRedirect(_app_url(portal, app))
        if form.is_valid():
            plan = form.cleaned_data["plan"]
            try:
                subscription = services.subscription_request_plan_change(
                    subscription=subscription, plan=plan, actor=request.user
                )
            except ValidationError as exc:
                add_service_errors(form, exc, field_map={"plan_id": "plan", "status": "__all__"})
            else:
                if subscription.plan_id == plan.pk:
                    messages.success(
                        request,
                        f"{app.name} is on the {plan.name} plan for {subscription.api.api_name} now. Its keys keep "
                        "working, and what it used in the current quota period still counts.",
                    )
                else:
                    messages.info(
                        request,
                        f"Your request to move {app.name} to the {plan.name} plan is waiting for an administrator's "
                        "approval. Until then it stays on its current plan.",
                    )
                return HttpResponseRedirect(_app_url(portal, app))
    context = {
        "app": app,
        "subscription": subscription,
        "current_limits": limits_in_words(subscription.plan.policies.all()) if subscription.plan else "",
        "form": form,
    }
    status = 400 if form is not None and form.errors else 200
    return page(request, portal, "portal/subscription_plan.html", context, status=status)


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


def _key_state(key: ApiKey, now: datetime) -> str:
    """active, expiring (valid, with an end date — e.g. the old key during a rotation), expired or revoked."""
    if key.revoked_at is not None or not key.active:
        return "revoked"
    if key.expires_at is not None:
        return "expired" if key.expires_at <= now else "expiring"
    return "active"


MAX_CURL_LINES = 3


def _curl_lines(request: HttpRequest, app: Consumer, plaintext: str) -> list[dict[str, str]]:
    """Ready-to-paste calls with the new key, one per API the app is subscribed to (active first, up to three)."""
    # A key does nothing at an API that takes only JWTs: no line for those.
    subscriptions = (
        Subscription.objects.filter(consumer=app, api__in=Api.objects.routable().exclude(auth_method="jwt"))
        .open()
        .select_related("api")
        .order_by("status", "api__api_name")[:MAX_CURL_LINES]
    )
    return [
        {
            "api_name": sub.api.api_name,
            "line": f'curl -H "{sub.api.key_header}: {plaintext}" {_gateway_url(request, sub.api)}/',
        }
        for sub in subscriptions
    ]


def _owned_key(app: Consumer, key_id: str) -> ApiKey:
    key = app.keys.filter(pk=key_id).first()
    if key is None:
        raise Http404("No such key.")
    return key


@never_cache  # the answer to a POST holds the only copy of the plaintext: no cache may keep it
@require_http_methods(["GET", "POST"])
@portal_page(writer=True)
def key_create(request: HttpRequest, portal: Portal, app_id: str) -> HttpResponse:
    app = owned_app(request, portal, app_id)
    form = KeyCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        days = form.cleaned_data["expires_in_days"]
        expires_at = timezone.now() + timedelta(days=days) if days else None
        try:
            key, plaintext = services.api_key_create(
                consumer=app, name=form.cleaned_data["name"], expires_at=expires_at, actor=request.user
            )
        except ValidationError as exc:
            add_service_errors(form, exc, field_map={"consumer_id": "__all__"})
        else:
            # Rendered straight from the POST (never stored in the session or redirected through a URL).
            context = {
                "app": app,
                "key": key,
                "plaintext": plaintext,
                "curl_lines": _curl_lines(request, app, plaintext),
            }
            return page(request, portal, "portal/key_created.html", context)
    return page(request, portal, "portal/key_form.html", {"app": app, "form": form}, status=400 if form.errors else 200)


@never_cache
@require_http_methods(["GET", "POST"])
@portal_page(writer=True)
def key_rotate(request: HttpRequest, portal: Portal, app_id: str, key_id: str) -> HttpResponse:
    app = owned_app(request, portal, app_id)
    old = _owned_key(app, key_id)
    form = KeyRotateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            key, plaintext = services.api_key_rotate(
                key=old, overlap_seconds=form.cleaned_data["overlap_seconds"], actor=request.user
            )
        except ValidationError as exc:
            add_service_errors(form, exc, field_map={"key_id": "__all__"})
        else:
            old.refresh_from_db()
            context = {
                "app": app,
                "key": key,
                "plaintext": plaintext,
                "previous": old,
                "curl_lines": _curl_lines(request, app, plaintext),
            }
            return page(request, portal, "portal/key_created.html", context)
    return page(
        request,
        portal,
        "portal/key_rotate.html",
        {"app": app, "key": old, "form": form},
        status=400 if form.errors else 200,
    )


@require_http_methods(["GET", "POST"])
@portal_page(writer=True)
def key_revoke(request: HttpRequest, portal: Portal, app_id: str, key_id: str) -> HttpResponse:
    app = owned_app(request, portal, app_id)
    key = _owned_key(app, key_id)
    if request.method == "POST":
        services.api_key_revoke(key=key, actor=request.user)
        messages.success(request, f"Key {key.key_prefix}… revoked. It stops working within a second.")
        return HttpResponseRedirect(_app_url(portal, app))
    return page(request, portal, "portal/key_revoke.html", {"app": app, "key": key})


# ---------------------------------------------------------------------------
# Usage
# ---------------------------------------------------------------------------


@require_GET
@portal_page(member=True)
def usage(request: HttpRequest, portal: Portal, app_id: str) -> HttpResponse:
    app = owned_app(request, portal, app_id)
    subscribed_apis = Api.objects.filter(subscriptions__consumer=app).distinct().order_by("api_name")
    api_id = request.GET.get("api") or None
    selected = None
    if api_id:
        selected = subscribed_apis.filter(pk=api_id).first()
        if selected is None:
            raise Http404("This app has no subscription to that API.")
    hourly = usage_series(app=app, api_id=api_id, interval="hour")
    daily = usage_series(app=app, api_id=api_id, interval="day")
    label = f"{app.name} → {selected.api_name}" if selected else f"{app.name}, all APIs"
    context = {
        "app": app,
        "apis": subscribed_apis,
        "selected": selected,
        "hourly": hourly,
        "daily": daily,
        "hourly_chart": charts.usage_chart(hourly, title=f"Requests per hour, {label}"),
        "chart_legend": legend(charts.SERIES),
        "daily_chart": charts.usage_chart(daily, title=f"Requests per day, {label}"),
        "quotas": quota.quota_left(app=app, apis=[selected] if selected else list(subscribed_apis)),
    }
    return page(request, portal, "portal/usage.html", context)


# ---------------------------------------------------------------------------
# Notifications
# ---------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@portal_page(member=True)
def notifications(request: HttpRequest, portal: Portal) -> HttpResponse:
    """Which notice mails the developer gets from this portal (every kind is on until switched off)."""
    off = notices_switched_off(user=request.user, tenant=portal.tenant)
    form = NotificationsForm(request.POST or None, initial={"enabled": [n for n in Notice.values if n not in off]})
    if request.method == "POST" and form.is_valid():
        notification_preferences_set(
            user=request.user,  # type: ignore[arg-type]
            tenant=portal.tenant,
            enabled=form.cleaned_data["enabled"],
        )
        messages.success(request, "Notification settings saved.")
        return HttpResponseRedirect(reverse("portal:notifications", args=[portal.tenant.id]))
    context = {"form": form, "email": request.user.email}  # type: ignore[union-attr]
    return page(request, portal, "portal/notifications.html", context, status=400 if form.errors else 200)
