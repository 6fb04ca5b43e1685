"""Metrics under gunicorn with two workers: served on their own port (never on the one clients reach), totals equal
the requests sent, valid exposition, bounded series, and refusals a client cannot tell apart share one reason."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from apimgmt import keys, services
from apimgmt.models import ApiKey, Consumer, Tenant
from tests.support.deployment import Deployment, deployed_gateway
from tests.support.promtool import promtool
from tests.support.servers import free_port, gunicorn

pytestmark = pytest.mark.django_db(transaction=True)


@dataclass
class Metered:
    """The deployment and the address of its metrics listener (gunicorn.conf.py, METRICS_PORT)."""

    deployment: Deployment
    metrics_url: str

    @property
    def base(self) -> str:
        return self.deployment.base


def _metrics_env(env: dict[str, str]) -> tuple[dict[str, str], str]:
    port = free_port()
    return {**env, "METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1"}, f"http://127.0.0.1:{port}/metrics"


@pytest.fixture
def deployment(
    live_env: dict[str, str], acme: Tenant, bob_app: Consumer, tmp_path: Path, settings: object
) -> Iterator[Metered]:
    settings.UPSTREAM_ALLOW_PRIVATE = True  # type: ignore[attr-defined]
    env, metrics_url = _metrics_env(live_env)
    with deployed_gateway(env, acme, bob_app, tmp_path, workers=2) as deployed:
        yield Metered(deployed, metrics_url)


def _scrape(deployment: Metered) -> str:
    response = requests.get(deployment.metrics_url, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
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


def test_request_totals_across_two_workers_equal_the_requests_sent(deployment: Metered, tmp_path: Path) -> None:
    sent = {"200": 0, "401": 0}
    for i in range(120):
        # A new connection per request, so both workers serve some of them.
        ok = i % 4 != 0
        headers = {"X-API-Key": deployment.deployment.key if ok else "ak_live_wrong"}
        status = requests.get(f"{deployment.base}/echo/v1/n/{i}", headers=headers, timeout=10).status_code
        sent[str(status)] += 1
    assert sent == {"200": 90, "401": 30}

    text = _scrape(deployment)

    assert _samples(text, "api_requests_total", api=deployment.deployment.api.id, status="200") == 90
    assert _samples(text, "api_requests_total", api=deployment.deployment.api.id, status="401") == 30
    assert _samples(text, "api_request_duration_seconds_count", api=deployment.deployment.api.id) == 120
    assert _samples(text, "api_upstream_duration_seconds_count", api=deployment.deployment.api.id) == 90
    # Every worker writes its own file; the arbiter's listener sums them (multiprocess mode).
    assert len({p.name.rsplit("_", 1)[-1] for p in (tmp_path / "prom").glob("counter_*.db")}) >= 2
    for _ in range(4):  # the same totals whichever worker answers the scrape
        assert _samples(_scrape(deployment), "api_requests_total", api=deployment.deployment.api.id) == 120


def test_metrics_pass_promtool_check(deployment: Metered) -> None:
    tool = promtool()
    for i in range(20):
        requests.get(f"{deployment.base}/echo/v1/x/{i}", headers={"X-API-Key": deployment.deployment.key}, timeout=10)
    requests.get(f"{deployment.base}/no-such-api", timeout=10)

    text = _scrape(deployment)
    checked = subprocess.run([str(tool), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "api_requests_total" in text and "django_http_requests_total_by_method_total" in text


def test_random_unknown_paths_add_no_series(deployment: Metered) -> None:
    def wander(count: int) -> None:
        with requests.Session() as session:
            for i in range(count):
                junk = uuid.uuid4().hex
                # Half outside every API (Django's 404), half under the API with a bad key (the gateway's 401).
                path = f"/{junk}/{i}" if i % 2 else f"/echo/v1/{junk}"
                session.get(f"{deployment.base}{path}", headers={"X-API-Key": "ak_live_" + junk}, timeout=10)

    wander(40)  # every kind of answer has been given once (and by both workers)
    before = _series(_scrape(deployment))
    wander(1000)
    after = _series(_scrape(deployment))

    assert after == before, f"new series: {sorted(after - before)[:10]}"
    assert not [s for s in after if "echo/v1/" in s], "no raw path in any label"


def test_metrics_are_not_served_on_the_port_clients_reach(deployment: Metered) -> None:
    requests.get(f"{deployment.base}/echo/v1/x", headers={"X-API-Key": deployment.deployment.key}, timeout=10)

    for path in ("/metrics", "/metrics/", "/metrics?format=prometheus"):
        response = requests.get(f"{deployment.base}{path}", timeout=10)
        assert response.status_code == 404, path
        assert "api_requests_total" not in response.text and deployment.deployment.api.id not in response.text
    # ... while Prometheus, on the metrics port, sees the traffic.
    assert _samples(_scrape(deployment), "api_requests_total", api=deployment.deployment.api.id, status="200") == 1


def test_control_plane_serves_metrics_only_on_the_metrics_port(live_env: dict[str, str], tmp_path: Path) -> None:
    env, metrics_url = _metrics_env(
        {**live_env, "APIMGMT_ROLE": "control", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    )
    with gunicorn(env, workers=1) as base:
        assert requests.get(f"{base}/admin/login/", timeout=10).status_code == 200

        assert requests.get(f"{base}/metrics", timeout=10).status_code == 404
        scraped = requests.get(metrics_url, timeout=10)
    assert scraped.status_code == 200
    assert _samples(scraped.text, "django_http_responses_total_by_status_total", status="200") >= 1


def test_refused_keys_a_client_cannot_tell_apart_share_one_reason(deployment: Metered, globex: Tenant) -> None:
    consumer = Consumer.objects.get(pk=ApiKey.objects.get(pk=deployment.deployment.key_id).consumer_id)
    revoked, revoked_plain = services.api_key_create(consumer=consumer, name="revoked", actor=None)
    services.api_key_revoke(key=revoked, actor=None)
    expired, expired_plain = services.api_key_create(consumer=consumer, name="expired", actor=None)
    ApiKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    stranger = services.consumer_create(tenant=globex, name="stranger", actor=None)
    _, foreign_plain = services.api_key_create(consumer=stranger, name="foreign", actor=None)
    body = keys.KEY_PREFIX + "Z" * keys.KEY_RANDOM_LENGTH
    unknown_plain = body + keys.checksum(body)

    answers = {}
    for name, key in (
        ("unknown", unknown_plain),
        ("revoked", revoked_plain),
        ("expired", expired_plain),
        ("foreign", foreign_plain),
    ):
        response = requests.get(f"{deployment.base}/echo/v1/x", headers={"X-API-Key": key}, timeout=10)
        answers[name] = (response.status_code, response.json()["detail"])
    # The client sees one answer for the three invalid keys ...
    assert answers["unknown"] == answers["revoked"] == answers["expired"]
    assert answers["unknown"][0] == 401 and answers["foreign"][0] == 403

    text = _scrape(deployment)
    api = deployment.deployment.api.id
    reasons = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "api_auth_failures_total" and sample.labels.get("api") == api
    }
    # ... and so does anyone who reads the metrics.
    assert reasons == {"invalid_key": 3, "not_subscribed": 1}


@pytest.mark.parametrize("value", ["abc", "70000", "-1", "\uff19\uff11\uff10\uff10"])
def test_a_bad_metrics_port_stops_gunicorn_with_a_message_naming_it(value: str) -> None:
    from tests.support.servers import ROOT, VENV_BIN

    checked = subprocess.run(
        [str(VENV_BIN / "gunicorn"), "--check-config", "-c", "gunicorn.conf.py", "apimgmt.wsgi:application"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "METRICS_PORT": value, "DEBUG": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode != 0
    assert f"METRICS_PORT must be a TCP port number (1-65535, or 0 for none), got {value!r}" in checked.stderr
