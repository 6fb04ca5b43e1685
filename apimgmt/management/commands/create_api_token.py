"""``manage.py create_api_token <username>``: create a management API token and print it once."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from apimgmt.tokens import api_token_create


class Command(BaseCommand):
    help = "Create a management API token for a user and print it. It is shown only this once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="A label for the token (e.g. 'ci').")
        parser.add_argument("--expires-in-days", type=int, default=None, help="Expire after this many days.")

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        try:
            user = user_model._default_manager.get_by_natural_key(options["username"])
        except user_model.DoesNotExist as exc:
            raise CommandError(f"No user named {options['username']!r}.") from exc
        days = options["expires_in_days"]
        if days is not None and days <= 0:
            raise CommandError("--expires-in-days must be a positive number of days.")
        expires_at = timezone.now() + timedelta(days=days) if days else None
        try:
            token, plaintext = api_token_create(user=user, actor=None, name=options["name"], expires_at=expires_at)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        self.stderr.write(
            f"Token {token.token_prefix}… created for {user.get_username()}; store it now, it is not shown again."
        )
        self.stdout.write(plaintext)
