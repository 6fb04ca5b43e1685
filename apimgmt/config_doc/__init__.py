"""Configuration as code: a tenant's APIs, policies, plans and consumers as one document to export, plan and apply.

``document`` reads and writes the text, ``schema`` says its shape, ``state`` reads the tenant, ``plan`` compares
the two and ``apply`` makes the changes through the services. The command (``manage.py config``) and the
management API (apimgmt/api/config_views.py) are thin edges over the functions below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apimgmt.config_doc.apply import PlanRefused, StalePlan, apply_document
from apimgmt.config_doc.document import ConfigError, Problem, dump_text, read_document
from apimgmt.config_doc.plan import ConfigPlan, make_plan
from apimgmt.config_doc.schema import FORMAT, document_schema, schema_text
from apimgmt.config_doc.secrets import exported_policies
from apimgmt.config_doc.state import read_state
from apimgmt.models import Tenant

__all__ = [
    "FORMAT",
    "ConfigError",
    "ConfigPlan",
    "PlanRefused",
    "Problem",
    "StalePlan",
    "apply_document",
    "document_schema",
    "dump_text",
    "export_document",
    "plan_document",
    "plan_for",
    "read_document",
    "schema_text",
]


def export_document(
    tenant: Tenant, *, consumers: bool = False, source: str = "export", warnings: list[str] | None = None
) -> dict[str, Any]:
    """The tenant's configuration as a canonical document; ConfigError when two objects share a name.

    No secret is written: a policy value set from a ``${VARIABLE}`` is written as that reference again, and any
    other secret-shaped header value as a generated ``${…}`` that ``warnings`` names (apimgmt/config_doc/secrets.py).
    """
    state = read_state(tenant, consumers=consumers)
    if state.ambiguous:
        raise ConfigError(source, state.ambiguous)
    document = state.document()
    rows = {name: row for name, (_item, row) in state.policies.items()}
    document["policies"] = exported_policies(document["policies"], rows, warnings)
    return document


def plan_document(
    tenant: Tenant, text: str, *, source: str, variables: Mapping[str, str], prune: bool = False
) -> ConfigPlan:
    """Read a document and compare it with the tenant, changing nothing."""
    return plan_for(tenant, read_document(text, source, variables), source=source, prune=prune)


def plan_for(tenant: Tenant, document: dict[str, Any], *, source: str, prune: bool = False) -> ConfigPlan:
    """Compare a canonical document (``read_document``) with the tenant, changing nothing."""
    state = read_state(tenant, consumers="consumers" in document)
    return make_plan(state=state, document=document, source=source, prune=prune)
