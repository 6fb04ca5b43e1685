"""Mark the accounts that are already past e-mail confirmation, for the single-use verification links.

Confirming an address now stamps ``last_login`` (portal/tokens.py), and "inactive and never signed in" means
"signed up, not confirmed yet". Active accounts that never signed in (confirmed, invited or made by staff before
this release) get ``last_login = date_joined``, so switching one off later cannot make it look unconfirmed and
earn it a fresh verification link. Inactive accounts are left as they are: nothing tells a pending sign-up from
one switched off before this release.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations
from django.db.models import F


def mark_confirmed_accounts(apps: Any, schema_editor: Any) -> None:
    user_model = apps.get_model("auth", "User")
    user_model.objects.filter(is_active=True, last_login__isnull=True).update(last_login=F("date_joined"))


class Migration(migrations.Migration):
    dependencies = [("auth", "0012_alter_user_first_name_max_length")]

    operations = [migrations.RunPython(mark_confirmed_accounts, migrations.RunPython.noop, elidable=True)]
