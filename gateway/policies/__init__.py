"""Policy types' gateway steps: one module per type, found by gateway.chain.builders().

A module defines ``POLICY_TYPE`` (the ``Policy.policy_type`` it serves) and
``build(route, policies, plan_policies) -> list[Step]``, called once per route-table load; see gateway.chain for the
phases and the Step interface. rate_limiting and quota have no module: the limits step reads them itself.
"""
