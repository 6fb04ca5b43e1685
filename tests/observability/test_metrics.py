"""/metrics under gunicorn with two workers: totals equal the requests sent, valid exposition, bounded series."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from apimgmt.models import Consumer, Tenant
from tests.support.deployment import Deployment, deployed_gateway
from tests.support.promtool import promtool

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def deployment(
    live_env: dict[str, str], acme: Tenant, bob_app: Consumer, tmp_path: Path, settings: object
) -> Iterator[Deployment]:
    settings.UPSTREAM_ALLOW_PRIVATE = True  # type: ignore[attr-defined]
    with deployed_gateway(live_env, acme, bob_app, tmp_path, workers=2) as deployed:
        yield deployed


def _scrape(base: str) -> str:
    response = requests.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def _samples(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_request_totals_across_two_workers_equal_the_requests_sent(deployment: Deployment, tmp_path: Path) -> None:
    sent = {"200": 0, "401": 0}
    for i in range(120):
        # A new connection per request, so both workers serve some of them.
        ok = i % 4 != 0
        headers = {"X-API-Key": deployment.key if ok else "ak_live_wrong"}
        status = requests.get(f"{deployment.base}/echo/v1/n/{i}", headers=headers, timeout=10).status_code
        sent[str(status)] += 1
    assert sent == {"200": 90, "401": 30}

    text = _scrape(deployment.base)

    assert _samples(text, "api_requests_total", api=deployment.api.id, status="200") == 90
    assert _samples(text, "api_requests_total", api=deployment.api.id, status="401") == 30
    assert _samples(text, "api_request_duration_seconds_count", api=deployment.api.id) == 120
    assert _samples(text, "api_upstream_duration_seconds_count", api=deployment.api.id) == 90
    # Every worker writes its own file; /metrics sums them (multiprocess mode).
    assert len({p.name.rsplit("_", 1)[-1] for p in (tmp_path / "prom").glob("counter_*.db")}) >= 2
    for _ in range(4):  # the same totals whichever worker answers the scrape
        assert _samples(_scrape(deployment.base), "api_requests_total", api=deployment.api.id) == 120


def test_metrics_pass_promtool_check(deployment: Deployment) -> None:
    tool = promtool()
    for i in range(20):
        requests.get(f"{deployment.base}/echo/v1/x/{i}", headers={"X-API-Key": deployment.key}, timeout=10)
    requests.get(f"{deployment.base}/no-such-api", timeout=10)

    text = _scrape(deployment.base)
    checked = subprocess.run([str(tool), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "api_requests_total" in text and "django_http_requests_total_by_method_total" in text


def test_random_unknown_paths_add_no_series(deployment: Deployment) -> None:
    def wander(count: int) -> None:
        with requests.Session() as session:
            for i in range(count):
                junk = uuid.uuid4().hex
                # Half outside every API (Django's 404), half under the API with a bad key (the gateway's 401).
                path = f"/{junk}/{i}" if i % 2 else f"/echo/v1/{junk}"
                session.get(f"{deployment.base}{path}", headers={"X-API-Key": "ak_live_" + junk}, timeout=10)

    wander(40)  # every kind of answer has been given once (and by both workers)
    _scrape(deployment.base)  # a scrape is a request too: its own series exist from now on
    before = _series(_scrape(deployment.base))
    wander(1000)
    after = _series(_scrape(deployment.base))

    assert after == before, f"new series: {sorted(after - before)[:10]}"
    assert not [s for s in after if "echo/v1/" in s], "no raw path in any label"
