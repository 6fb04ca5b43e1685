"""Request validation's place in the chain (phase access): an API with ``validation`` shadow or enforce and an OpenAPI
document with paths gets the step of gateway.request_validation.

That module brings openapi-schema-validator, jsonschema and jsonschema-rs (some 9 MiB per worker): it is imported
here only when a route needs it, so a gateway whose APIs do not validate pays nothing for it, memory included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apimgmt.selectors import PolicySpec

if TYPE_CHECKING:
    from gateway.chain import Step
    from gateway.routing import Route

POLICY_TYPE = "request_validation"  # no Policy row has it: build() reads the API's own validation setting


def build(route: Route, policies: list[PolicySpec], plan_policies: dict[str, list[PolicySpec]]) -> list[Step]:
    spec = route.spec
    document = spec.openapi_spec
    if spec.validation == "off" or not isinstance(document, dict) or not document.get("paths"):
        return []
    from gateway import request_validation

    return request_validation.build(route, policies, plan_policies)
