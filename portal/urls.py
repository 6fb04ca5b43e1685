"""Developer portal routes, per tenant at /portal/<tenant>/."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path, re_path

from portal import accounts, views

app_name = "portal"

tenant_patterns: list[URLPattern | URLResolver] = [
    path("", views.catalog, name="catalog"),
    path("apis/<str:api_id>/", views.api_detail, name="api"),
    path("apis/<str:api_id>/openapi.json", views.api_openapi, name="api_openapi"),
    path("apis/<str:api_id>/subscribe/", views.subscribe, name="subscribe"),
    path("apps/", views.apps, name="apps"),
    path("apps/new/", views.app_create, name="app_create"),
    path("apps/<str:app_id>/", views.app_detail, name="app"),
    path("apps/<str:app_id>/edit/", views.app_rename, name="app_rename"),
    path("apps/<str:app_id>/delete/", views.app_delete, name="app_delete"),
    path("apps/<str:app_id>/usage/", views.usage, name="usage"),
    path(
        "apps/<str:app_id>/subscriptions/<str:subscription_id>/cancel/",
        views.subscription_cancel,
        name="subscription_cancel",
    ),
    path(
        "apps/<str:app_id>/subscriptions/<str:subscription_id>/plan/",
        views.subscription_plan,
        name="subscription_plan",
    ),
    path("apps/<str:app_id>/keys/new/", views.key_create, name="key_create"),
    path("apps/<str:app_id>/keys/<str:key_id>/rotate/", views.key_rotate, name="key_rotate"),
    path("apps/<str:app_id>/keys/<str:key_id>/revoke/", views.key_revoke, name="key_revoke"),
    path("notifications/", views.notifications, name="notifications"),
    path("signup/", accounts.signup, name="signup"),
    path("verify/<str:token>/", accounts.verify, name="verify"),
    path("login/", accounts.login_view, name="login"),
    path("logout/", accounts.logout_view, name="logout"),
    path("password-reset/", accounts.password_reset, name="password_reset"),
    path(
        "password-reset/<str:uidb64>/<str:token>/",
        accounts.PortalPasswordResetConfirmView.as_view(),
        name="password_reset_confirm",
    ),
    path("invite/", accounts.invite, name="invite"),
    # Last: any other address inside a portal gets the portal's own 404 page. Only addresses ending in "/", so
    # APPEND_SLASH still sends /portal/<t>/apps to /portal/<t>/apps/ (and anything else to this page).
    re_path(r"^(?P<unknown>.+/)$", views.not_found, name="not_found"),
]

urlpatterns: list[URLPattern | URLResolver] = [
    path("", views.portal_index, name="index"),
    path("<slug:tenant>/", include(tenant_patterns)),
]
