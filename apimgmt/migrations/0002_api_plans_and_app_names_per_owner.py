"""Plans belong to APIs (``am_api_plans``), and app names are unique per owner instead of per tenant.

How existing rows are treated:

- Each API is linked to the plans its existing subscriptions (of any status) already use, so what an API
  offered in practice is what it offers now. An API none of whose subscriptions has a plan offers none:
  subscribing to it stays as before, until an admin lists plans for it.
- Subscriptions are not touched. One without a plan keeps working, limited by its API's own policies only,
  also when its API now offers plans; only new subscriptions must choose one of the offered plans.
  docs/operations.md shows how to find them.
- App names: the old rule (unique per tenant) is stricter than the new one, so no row conflicts.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import migrations, models


def link_plans_in_use(apps: Any, schema_editor: Any) -> None:
    Subscription = apps.get_model("apimgmt", "Subscription")
    Api = apps.get_model("apimgmt", "Api")
    pairs = Subscription.objects.filter(plan__isnull=False).values_list("api_id", "plan_id").distinct()
    links = [Api.plans.through(api_id=api_id, plan_id=plan_id) for api_id, plan_id in pairs]
    Api.plans.through.objects.bulk_create(links, ignore_conflicts=True)


class Migration(migrations.Migration):
    dependencies = [
        ("apimgmt", "0001_initial"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="consumer",
            name="uniq_consumer_tenant_name",
        ),
        migrations.AddField(
            model_name="api",
            name="plans",
            field=models.ManyToManyField(
                blank=True,
                db_table="am_api_plans",
                help_text="The plans developers choose from when subscribing. When any are listed, every new "
                "subscription must name one of them; subscriptions made before keep their plan (or none).",
                related_name="apis",
                to="apimgmt.plan",
                verbose_name="offered plans",
            ),
        ),
        migrations.RunPython(link_plans_in_use, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="consumer",
            constraint=models.UniqueConstraint(
                fields=("tenant", "owner", "name"),
                name="uniq_consumer_owner_name",
                violation_error_message="This owner already has an app with this name.",
            ),
        ),
        migrations.AddConstraint(
            model_name="consumer",
            constraint=models.UniqueConstraint(
                condition=models.Q(("owner__isnull", True)),
                fields=("tenant", "name"),
                name="uniq_consumer_unowned_name",
                violation_error_message="An app without an owner already has this name in this tenant.",
            ),
        ),
    ]
