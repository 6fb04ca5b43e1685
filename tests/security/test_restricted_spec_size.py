"""restrict_to_spec puts the API's spec paths into every gateway worker's route table (compiled on every reload):
their size is bounded, or one tenant's huge document would cost every worker of every tenant memory and time."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from apimgmt import services
from apimgmt.models import Api

pytestmark = pytest.mark.django_db


def _spec(operations: int) -> dict:
    return {
        "openapi": "3.0.3",
        "info": {"title": "big", "version": "1"},
        "paths": {f"/r{i}/{{id}}": {"get": {"responses": {}}} for i in range(operations)},
    }


def test_a_restricted_api_with_more_operations_than_the_gateway_takes_is_refused(acme) -> None:
    with pytest.raises(ValidationError) as refused:
        services.api_create(
            tenant=acme,
            api_name="big",
            base_path="/big",
            upstream_url="https://big.example.com",
            openapi_spec=_spec(10_001),
            restrict_to_spec=True,
            actor=None,
        )
    assert refused.value.message_dict == {
        "restrict_to_spec": [
            "restrict_to_spec takes an OpenAPI document of at most 10,000 operations and 5,000,000 characters "
            "of paths (this one: 10,001 operations); split the API or turn restrict_to_spec off."
        ]
    }
    assert not Api.objects.filter(api_name="big").exists()


def test_the_same_document_is_fine_unrestricted_and_the_limit_itself_is_allowed(acme) -> None:
    api = services.api_create(
        tenant=acme,
        api_name="big",
        base_path="/big",
        upstream_url="https://big.example.com",
        openapi_spec=_spec(10_001),
        actor=None,
    )
    assert api.restrict_to_spec is False  # the portal shows it; the gateway never loads its paths
    services.api_create(
        tenant=acme,
        api_name="limit",
        base_path="/limit",
        upstream_url="https://limit.example.com",
        openapi_spec=_spec(10_000),
        restrict_to_spec=True,
        actor=None,
    )


def test_paths_too_large_in_characters_are_refused(acme) -> None:
    spec = _spec(10)
    spec["paths"]["/x"] = {"get": {"description": "x" * 5_000_000}}
    with pytest.raises(ValidationError) as refused:
        services.api_create(
            tenant=acme,
            api_name="wide",
            base_path="/wide",
            upstream_url="https://wide.example.com",
            openapi_spec=spec,
            restrict_to_spec=True,
            actor=None,
        )
    assert "at most 10,000 operations and 5,000,000 characters" in refused.value.message_dict["restrict_to_spec"][0]
