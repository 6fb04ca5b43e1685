"""Django app config for the apimgmt domain."""

from __future__ import annotations

from django.apps import AppConfig


class ApimgmtConfig(AppConfig):
    name = "apimgmt"
    verbose_name = "API management"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from apimgmt import checks  # noqa: F401  (registers system checks)
        from apimgmt.slow_queries import install_slow_query_logging

        install_slow_query_logging()
