"""Config validation of the policy types beyond rate limits and quotas: one module per type (docs/policies.md).

Each module names its ``POLICY_TYPE`` and defines ``validate(config) -> dict``: the normalised config, or a
``ValidationError`` whose message starts with the offending field's path (``allow_origins[1]``, ``request.set``).
``apimgmt.validation.validate_policy_config`` is the one entry point the admin, the management API and config
documents call; it dispatches here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from apimgmt.policy_types import cors, headers, ip_rules, request_limits, response_cache

Validator = Callable[[dict[str, Any]], dict[str, Any]]

VALIDATORS: dict[str, Validator] = {
    module.POLICY_TYPE: module.validate for module in (cors, ip_rules, headers, request_limits, response_cache)
}
