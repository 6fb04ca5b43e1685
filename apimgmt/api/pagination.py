"""Limit/offset pagination for every management API list: ``count``, ``next``, ``previous``, ``results``."""

from __future__ import annotations

from rest_framework.pagination import LimitOffsetPagination


class ManagementPagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = 500
