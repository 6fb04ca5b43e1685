"""``manage.py config export|diff|apply|schema|import-openapi``: a tenant's configuration as code, with exit codes for CI.

Exit codes: 0 = no changes, 2 = changes planned (diff, apply --dry-run) or applied, 1 = error (bad document,
refused delete, stale plan, unknown tenant); every message names the file, the object and the field.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apimgmt import config_doc
from apimgmt.models import Tenant

EXIT_NO_CHANGES = 0
EXIT_ERROR = 1
EXIT_CHANGES = 2


class Command(BaseCommand):
    help = "Export, diff (plan) or apply a tenant's configuration document (YAML or JSON)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(
            dest="operation", required=True, metavar="{export,diff,apply,schema,import-openapi}"
        )
        sub.add_parser("schema", help="Print the document's JSON Schema (as docs/config.schema.json holds it).")

        export = sub.add_parser("export", help="Write the tenant's configuration (stable order, no secrets).")
        export.add_argument("--tenant", required=True)
        export.add_argument("-o", "--output", help="File to write (default: standard output).")
        export.add_argument("--format", choices=("yaml", "json"), help="Default: from the file name, else yaml.")
        export.add_argument(
            "--consumers", action="store_true", help="Include consumers and their open subscriptions (never keys)."
        )

        diff = sub.add_parser("diff", help="Show what apply would change (creates, updates old → new, deletes).")
        apply = sub.add_parser("apply", help="Make the tenant match the file, all or nothing.")
        for command in (diff, apply):
            command.add_argument("--tenant", required=True)
            command.add_argument("-f", "--file", required=True, help="The document; '-' reads standard input.")
            command.add_argument("--prune", action="store_true", help="Delete what the file does not mention.")
            command.add_argument("--json", action="store_true", help="Print the plan as JSON.")
        apply.add_argument("--dry-run", action="store_true", help="Make every change, then roll all of it back.")
        apply.add_argument(
            "--fingerprint",
            help="Refuse unless the tenant is still as it was when the plan with this fingerprint was made.",
        )
        apply.add_argument("--actor", help="User name recorded in the audit events (default: system).")

        openapi = sub.add_parser(
            "import-openapi", help="Create or update an API from its OpenAPI 3.0/3.1 document (YAML or JSON)."
        )
        openapi.add_argument("spec", help="The OpenAPI document; '-' reads standard input.")
        openapi.add_argument("--tenant", required=True)
        openapi.add_argument("--base-path", help="Where the gateway publishes it (new APIs: default /<title slug>).")
        openapi.add_argument("--upstream", help="Upstream URL (default: the spec's first server).")
        openapi.add_argument(
            "--restrict-to-spec",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="Route only the spec's operations (404/405 for others); default: new APIs no, existing unchanged.",
        )
        openapi.add_argument("--actor", help="User name recorded in the audit events (default: system).")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            code = getattr(self, "_" + options["operation"].replace("-", "_"))(options)
        except config_doc.ConfigError as exc:
            self.stderr.write(str(exc))
            code = EXIT_ERROR
        except config_doc.PlanRefused as exc:
            self._write_plan(exc.plan, options)
            self.stderr.write(
                f"{exc.plan.source}: nothing applied: {len(exc.plan.refusals)} delete(s) would be refused."
            )
            code = EXIT_ERROR
        except (config_doc.StalePlan, CommandError) as exc:
            self.stderr.write(str(exc))
            code = EXIT_ERROR
        sys.exit(code)

    # Steps --------------------------------------------------------------------------------------------------

    def _actor(self, options: dict[str, Any]) -> Any:
        if not options.get("actor"):
            return None
        user_model = get_user_model()
        actor = user_model._default_manager.filter(**{user_model.USERNAME_FIELD: options["actor"]}).first()
        if actor is None:
            raise CommandError(f"--actor: no user named {options['actor']!r}.")
        return actor

    def _tenant(self, options: dict[str, Any]) -> Tenant:
        tenant = Tenant.objects.filter(pk=options["tenant"]).first()
        if tenant is None:
            raise CommandError(f"No tenant {options['tenant']!r}.")
        return tenant

    def _read(self, options: dict[str, Any], name: str | None = None) -> tuple[str, str]:
        name = name or options["file"]
        if name == "-":
            return sys.stdin.read(), "<stdin>"
        try:
            return Path(name).read_text(encoding="utf-8"), name
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"{name}: cannot read: {exc}") from exc

    def _write_plan(self, plan: config_doc.ConfigPlan, options: dict[str, Any]) -> None:
        if options.get("json"):
            import json

            self.stdout.write(json.dumps(plan.as_json(), indent=2, ensure_ascii=False))
        else:
            self.stdout.write(plan.text(), ending="")

    def _schema(self, options: dict[str, Any]) -> int:
        self.stdout.write(config_doc.schema_text(), ending="")
        return EXIT_NO_CHANGES

    def _export(self, options: dict[str, Any]) -> int:
        tenant = self._tenant(options)
        output = options.get("output")
        fmt = options.get("format") or ("json" if output and output.endswith(".json") else "yaml")
        warnings: list[str] = []
        document = config_doc.export_document(
            tenant, consumers=options["consumers"], source=output or "<stdout>", warnings=warnings
        )
        text = config_doc.dump_text(document, fmt)
        if output:
            Path(output).write_text(text, encoding="utf-8")
        else:
            self.stdout.write(text, ending="")
        for warning in warnings:
            self.stderr.write(f"warning: {warning}")
        return EXIT_NO_CHANGES

    def _diff(self, options: dict[str, Any]) -> int:
        tenant = self._tenant(options)
        text, source = self._read(options)
        plan = config_doc.plan_document(tenant, text, source=source, variables=os.environ, prune=options["prune"])
        self._write_plan(plan, options)
        if plan.refusals:
            return EXIT_ERROR
        return EXIT_CHANGES if plan.has_changes else EXIT_NO_CHANGES

    def _apply(self, options: dict[str, Any]) -> int:
        tenant = self._tenant(options)
        text, source = self._read(options)
        actor = self._actor(options)
        document = config_doc.read_document(text, source, os.environ)
        plan = config_doc.apply_document(
            tenant=tenant,
            document=document,
            source=source,
            actor=actor,
            prune=options["prune"],
            dry_run=options["dry_run"],
            expected_fingerprint=options.get("fingerprint"),
        )
        self._write_plan(plan, options)
        if plan.has_changes and not options.get("json"):
            done = "checked and rolled back (dry run)" if options["dry_run"] else "applied"
            self.stdout.write(f"{len(plan.changes)} change(s) {done}.")
        return EXIT_CHANGES if plan.has_changes else EXIT_NO_CHANGES

    def _import_openapi(self, options: dict[str, Any]) -> int:
        from apimgmt.config_doc.openapi import import_openapi

        tenant = self._tenant(options)
        text, source = self._read(options, options["spec"])
        result = import_openapi(
            tenant=tenant,
            text=text,
            source=source,
            actor=self._actor(options),
            base_path=options.get("base_path"),
            upstream_url=options.get("upstream"),
            restrict_to_spec=options.get("restrict_to_spec"),
        )
        api = result.api
        if result.created:
            self.stdout.write(
                f"Created API {api.api_name!r} ({api.status}) at {api.base_path} → {api.upstream_url}: "
                f"{result.operations} operations in its spec."
            )
        elif result.changes:
            self.stdout.write(f"Updated API {api.api_name!r}: {', '.join(sorted(result.changes))}.")
        else:
            self.stdout.write(f"API {api.api_name!r} already matches the spec; nothing changed.")
        for note in result.notes:
            self.stdout.write(f"note: {note}")
        return EXIT_CHANGES if result.created or result.changes else EXIT_NO_CHANGES
