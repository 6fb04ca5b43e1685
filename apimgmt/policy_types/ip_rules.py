"""ip_rules: allow and deny lists of CIDRs, checked against the client address the gateway trusts."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError

from apimgmt.policy_types import fields

POLICY_TYPE = "ip_rules"
ALLOWED = {"allow", "deny"}


def validate(config: dict[str, Any]) -> dict[str, Any]:
    fields.check_known(config, ALLOWED, "ip_rules config")
    allow = fields.cidr_list(config.get("allow", []), "allow")
    deny = fields.cidr_list(config.get("deny", []), "deny")
    if not allow and not deny:
        raise ValidationError("ip_rules config needs at least one CIDR in allow or deny.")
    return {"allow": allow, "deny": deny}
