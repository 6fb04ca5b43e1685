import pytest
from tests.api.conftest import V1

@pytest.mark.django_db
def test_smoke(acme_world, alice, client_for):
    c = client_for(alice)
    for path in ["tenants", "apis", "consumers", "keys", "plans", "policies", "subscriptions", "audit-events"]:
        r = c.get(f"{V1}/{path}/")
        print(path, r.status_code, r.json() if r.status_code != 200 else r.json()["count"])
        assert r.status_code == 200
    r = c.get(f"{V1}/usage/?tenant_id=acme&interval=day&from=2025-12-30T00:00:00Z&to=2026-01-05T00:00:00Z")
    print(r.status_code, r.json())
    r = c.post(f"{V1}/apis/", {"tenant_id": "acme", "api_name": "x", "base_path": "/x", "upstream_url": "https://x.example.com", "bogus": 1}, format="json")
    print(r.status_code, r["Content-Type"], r.json())
