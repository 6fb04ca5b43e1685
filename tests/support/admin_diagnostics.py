"""What a test saw when the admin answered 404 for an object it had just made (a flake of full CI runs only)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.db import connection


def backend_pid() -> int:
    """The PostgreSQL backend of this thread's connection (a new one would not see the test's uncommitted rows)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def what_the_admin_saw(answer: Any, backend: int, obj: Any, user: User) -> str:
    """Diagnostics for an unexpected answer: whether the test's database connection is still the one the fixtures
    wrote on (a replaced connection no longer sees the test's uncommitted rows), and what the rows look like."""
    now = backend_pid()
    return (
        f"status {answer.status_code}; database backend {backend} -> {now}; in atomic block "
        f"{connection.in_atomic_block}; {type(obj).__name__} still there: "
        f"{type(obj).objects.filter(pk=obj.pk).exists()}; user superuser: "
        f"{User.objects.filter(pk=user.pk, is_superuser=True).exists()}; body: {answer.content[:300]!r}"
    )
