"""The Helm chart lints strictly, renders with default and production values, and every manifest is valid Kubernetes."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

from tests.deploy.conftest import (
    ALL_FEATURES,
    CHART,
    RELEASE,
    ROOT,
    find,
    one,
    production_values,
    render,
)

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (requirements-dev.txt) bundles Helm")

RULES = ROOT / "monitoring" / "prometheus" / "rules.yml"  # the one source of the shipped alerts
FULL = RELEASE  # the release name contains the chart name, so resources are named after the release
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # Prometheus Operator CRDs: no schema in kubernetes-validate
APP_COMPONENTS = ("gateway", "control")


def _lint(values: dict[str, Any] | None) -> dict[str, Any]:
    return helm.lint(str(CHART), values, strict=True, namespace="apimgmt")


@pytest.mark.parametrize("values", [None, "production", "all"], ids=["default", "production", "all-features"])
def test_chart_passes_helm_lint_strict(values: str | None) -> None:
    given = {"production": production_values(), "all": ALL_FEATURES}.get(values or "")
    report = _lint(given)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert report["errors"] == [] and problems == [], report


def _validate_all(docs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    version = latest_version()
    validated, skipped = [], []
    for doc in docs:
        manifest = {k: v for k, v in doc.items() if k != "_template"}
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
            validated.append(f"{doc['kind']}/{doc['metadata']['name']}")
        except SchemaNotFoundError:
            assert doc["kind"] in CRD_KINDS, f"no schema for {doc['kind']} {doc['apiVersion']}"
            skipped.append(doc["kind"])
    return validated, skipped


@pytest.mark.parametrize("which", ["default_docs", "production_docs", "full_docs"])
def test_every_rendered_manifest_validates_against_current_kubernetes(which: str, request: Any) -> None:
    docs = request.getfixturevalue(which)
    validated, skipped = _validate_all(docs)
    kinds = {v.split("/")[0] for v in validated}
    assert {"Deployment", "Service", "ConfigMap", "Job", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    assert set(skipped) <= CRD_KINDS


def test_invalid_manifest_is_caught_by_the_validator() -> None:
    # Guards the test above: a misspelt field must fail strict validation.
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replicas": "three"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, latest_version(), strict=True)


@pytest.mark.parametrize("kind", sorted(CRD_KINDS))
def test_prometheus_operator_kinds_have_no_bundled_schema(kind: str, full_docs: list[dict[str, Any]]) -> None:
    doc = find(full_docs, kind)[0]
    try:
        kubernetes_validate.validate(doc, latest_version(), strict=True)
    except SchemaNotFoundError:
        pytest.skip(f"kubernetes-validate ships no schema for the {kind} CRD; its shape is asserted below instead")


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("component", APP_COMPONENTS)
def test_web_pods_probe_health_for_liveness_and_ready_for_readiness(component: str, default_docs: Any) -> None:
    container = _containers(one(default_docs, "Deployment", f"{FULL}-{component}"))[0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert (
            get["port"] == "http" and {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
        )
        # Probes must pass Django's ALLOWED_HOSTS check, or every pod would be killed.
        host = next(h["value"] for h in get["httpHeaders"] if h["name"] == "Host")
        assert host in _env(container)["ALLOWED_HOSTS"].split(",")
    assert _env(container)["APIMGMT_ROLE"] == component
    assert container["args"] == ["gunicorn", "apimgmt.wsgi:application", "--config", "gunicorn.conf.py"]


def test_prometheus_scrapes_by_pod_ip_so_pod_ip_is_an_allowed_host(default_docs: Any) -> None:
    container = _containers(one(default_docs, "Deployment", f"{FULL}-gateway"))[0]
    env = container["env"]
    names = [e["name"] for e in env]
    assert names.index("POD_IP") < names.index("ALLOWED_HOSTS")  # $(POD_IP) expands only from earlier entries
    assert "$(POD_IP)" in _env(container)["ALLOWED_HOSTS"]


def test_gateway_autoscales_between_3_and_20_pods_at_70_percent_cpu(default_docs: Any) -> None:
    hpa = one(default_docs, "HorizontalPodAutoscaler", f"{FULL}-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FULL}-gateway"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    # The HPA owns the replica count; a fixed one would fight it on every upgrade.
    assert "replicas" not in one(default_docs, "Deployment", f"{FULL}-gateway")["spec"]


def test_hpa_bounds_come_from_values_and_bad_bounds_fail_with_a_clear_message() -> None:
    docs = render({"gateway": {"autoscaling": {"minReplicas": 4, "maxReplicas": 8}}})
    hpa = one(docs, "HorizontalPodAutoscaler", f"{FULL}-gateway")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (4, 8)
    with pytest.raises(helm.HelmRenderError, match=r"minReplicas .* must not exceed maxReplicas"):
        render({"gateway": {"autoscaling": {"minReplicas": 9, "maxReplicas": 3}}})


def test_gateway_without_hpa_has_fixed_replicas() -> None:
    docs = render({"gateway": {"autoscaling": {"enabled": False}, "replicaCount": 5}})
    assert not find(docs, "HorizontalPodAutoscaler")
    assert one(docs, "Deployment", f"{FULL}-gateway")["spec"]["replicas"] == 5


def test_gateway_resources_are_the_operations_guide_values(default_docs: Any) -> None:
    container = _containers(one(default_docs, "Deployment", f"{FULL}-gateway"))[0]
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "4", "memory": "8Gi"},
    }
    for doc in find(default_docs, "Deployment"):
        assert _containers(doc)[0]["resources"]["limits"], f"{doc['metadata']['name']} has no limits"


def test_pods_run_as_non_root_on_a_read_only_filesystem(default_docs: Any) -> None:
    for doc in find(default_docs, "Deployment") + find(default_docs, "Job"):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts


def test_flusher_runs_in_follow_mode_serving_metrics_that_its_liveness_probe_checks(default_docs: Any) -> None:
    container = _containers(one(default_docs, "Deployment", f"{FULL}-flusher"))[0]
    assert container["args"] == ["python", "manage.py", "flush_usage", "--follow", "--metrics-port", "9100"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
    # The flusher's metrics server answers every path; /metrics is what Prometheus scrapes too.
    probe = container["livenessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/metrics", "metrics")
    assert "readinessProbe" not in container  # nothing routes traffic to it
    assert "/var/lib/apimgmt/spool" in {m["mountPath"] for m in container["volumeMounts"]}


def test_flusher_metrics_port_follows_values() -> None:
    docs = render({"flusher": {"metricsPort": 9300}})
    container = _containers(one(docs, "Deployment", f"{FULL}-flusher"))[0]
    assert container["args"][-2:] == ["--metrics-port", "9300"]
    assert container["ports"][0]["containerPort"] == 9300
    assert one(docs, "Service", f"{FULL}-flusher")["spec"]["ports"][0]["port"] == 9300


def test_flusher_metrics_are_discoverable_through_a_headless_service(full_docs: Any) -> None:
    service = one(full_docs, "Service", f"{FULL}-flusher")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}]
    pods = _pod_labels(full_docs)
    selected = [name for name, labels in pods.items() if _labels_match(service["spec"]["selector"], labels)]
    assert selected == [f"{FULL}-flusher"]
    # Prometheus may reach the metrics port (the app NetworkPolicy otherwise admits only the HTTP port).
    app = one(full_docs, "NetworkPolicy", f"{FULL}-app")
    metrics_rules = [r for r in app["spec"]["ingress"] if r["ports"] == [{"protocol": "TCP", "port": "metrics"}]]
    assert len(metrics_rules) == 1 and metrics_rules[0]["from"] == [{"namespaceSelector": {}}]


def test_without_the_flusher_nothing_scrapes_or_serves_its_port() -> None:
    docs = render({"flusher": {"enabled": False}, "metrics": {"serviceMonitor": {"enabled": True}}})
    assert not find(docs, "Deployment", f"{FULL}-flusher") and not find(docs, "Service", f"{FULL}-flusher")
    monitor = one(docs, "ServiceMonitor", FULL)
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["selector"]["matchExpressions"][0]["values"] == ["gateway", "control", "deliverer"]


def test_deliverer_runs_deliver_events_in_follow_mode_with_metrics_liveness_and_webhook_egress(full_docs: Any) -> None:
    container = _containers(one(full_docs, "Deployment", f"{FULL}-deliverer"))[0]
    assert container["args"] == ["python", "manage.py", "deliver_events", "--follow", "--metrics-port", "9100"]
    probe = container["livenessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/metrics", "metrics")
    assert "readinessProbe" not in container  # nothing routes traffic to it
    service = one(full_docs, "Service", f"{FULL}-deliverer")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["name"] == "metrics"
    egress = one(full_docs, "NetworkPolicy", f"{FULL}-deliverer-webhooks")["spec"]["egress"]
    assert egress == [{}]  # receivers are anywhere unless networkPolicy.webhookEgress says otherwise
    docs = render({"deliverer": {"enabled": False}, "metrics": {"serviceMonitor": {"enabled": True}}})
    assert not find(docs, "Deployment", f"{FULL}-deliverer") and not find(docs, "Service", f"{FULL}-deliverer")
    assert not find(docs, "NetworkPolicy", f"{FULL}-deliverer-webhooks")
    assert "deliverer" not in one(docs, "ServiceMonitor", FULL)["spec"]["selector"]["matchExpressions"][0]["values"]


def test_usage_spool_is_an_emptydir_whose_size_limit_comes_from_values() -> None:
    for values, limit in (({}, "1Gi"), ({"usageSpool": {"sizeLimit": "4Gi"}}, "4Gi")):
        pod = one(render(values), "Deployment", f"{FULL}-gateway")["spec"]["template"]["spec"]
        (spool,) = [v for v in pod["volumes"] if v["name"] == "usage-spool"]
        assert spool == {"name": "usage-spool", "emptyDir": {"sizeLimit": limit}}


def test_migrations_run_as_a_pre_install_and_pre_upgrade_hook_job(default_docs: Any) -> None:
    job = one(default_docs, "Job", f"{FULL}-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["python", "manage.py", "migrate", "--noinput"]
    # Before install the release's Secret does not exist yet: the Job uses a hook Secret created just before it.
    secret_name = container["envFrom"][0]["secretRef"]["name"]
    hook_secret = one(default_docs, "Secret", secret_name)
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )


def _decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_generated_secrets_are_strong_distinct_and_shared_with_the_migration_job(default_docs: Any) -> None:
    main = _decoded(one(default_docs, "Secret", FULL))
    hook = _decoded(one(default_docs, "Secret", f"{FULL}-migrate"))
    assert main == hook
    assert len(main["KEY_HASH_PEPPER"]) >= 32 and len(main["SECRET_KEY"]) >= 50
    assert main["KEY_HASH_PEPPER"] != main["SECRET_KEY"]
    assert main["DATABASE_URL"] == "postgres://apimgmt@postgresql:5432/apimgmt?sslmode=prefer"
    assert main["REDIS_URL"] == "redis://redis-master:6379/0"
    # Uninstalling must not delete the pepper every API key hash depends on.
    assert one(default_docs, "Secret", FULL)["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_passwords_are_url_escaped_into_the_connection_urls() -> None:
    docs = render({"postgresql": {"password": "p@ss/w:rd"}, "redis": {"password": "r#1", "tls": True}})
    data = _decoded(one(docs, "Secret", FULL))
    assert data["DATABASE_URL"] == "postgres://apimgmt:p%40ss%2Fw%3Ard@postgresql:5432/apimgmt?sslmode=prefer"
    assert data["REDIS_URL"] == "rediss://:r%231@redis-master:6379/0"


def test_existing_secret_replaces_the_chart_secret_everywhere(production_docs: Any) -> None:
    assert not find(production_docs, "Secret")
    for doc in find(production_docs, "Deployment") + find(production_docs, "Job"):
        refs = [e["secretRef"]["name"] for e in _containers(doc)[0]["envFrom"] if "secretRef" in e]
        assert refs == ["apimgmt-secrets"], doc["metadata"]["name"]


def test_configmap_holds_settings_and_no_secrets(full_docs: Any) -> None:
    config = one(full_docs, "ConfigMap", FULL)["data"]
    assert config["DEBUG"] == "0" and config["PROMETHEUS_MULTIPROC_DIR"] and config["USAGE_SPOOL_DIR"]
    assert config["APIMGMT_CONFIG"] == "/etc/apimgmt/apimgmt.toml" and "[gateway]" in config["apimgmt.toml"]
    assert not {"SECRET_KEY", "KEY_HASH_PEPPER", "DATABASE_URL", "REDIS_URL"} & set(config)


def test_pods_roll_when_configuration_changes() -> None:
    before = one(render(), "Deployment", f"{FULL}-gateway")
    after = one(render({"config": {"logLevel": "DEBUG"}}), "Deployment", f"{FULL}-gateway")
    key = "checksum/config"
    assert (
        before["spec"]["template"]["metadata"]["annotations"][key]
        != after["spec"]["template"]["metadata"]["annotations"][key]
    )


def test_pod_disruption_budgets_keep_gateway_and_control_up_during_drains(default_docs: Any) -> None:
    gateway = one(default_docs, "PodDisruptionBudget", f"{FULL}-gateway")
    control = one(default_docs, "PodDisruptionBudget", f"{FULL}-control")
    assert gateway["spec"]["minAvailable"] == 2 and control["spec"]["minAvailable"] == 1
    assert gateway["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"


def _ingress_routes(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    rules = one(docs, "Ingress", FULL)["spec"]["rules"]
    return {r["host"]: {p["path"]: p["backend"]["service"]["name"] for p in r["http"]["paths"]} for r in rules}


def _allowed_hosts(docs: list[dict[str, Any]], component: str) -> list[str]:
    return str(_env(_containers(one(docs, "Deployment", f"{FULL}-{component}"))[0])["ALLOWED_HOSTS"]).split(",")


def test_ingress_serves_gateway_and_control_plane_on_separate_hosts(full_docs: Any) -> None:
    assert _ingress_routes(full_docs) == {
        "api.example-apis.com": {"/": f"{FULL}-gateway"},
        "console.example.com": {"/": f"{FULL}-control"},
    }
    # Defence in depth: each role refuses the other role's host name (Django's host check answers 400).
    assert "api.example-apis.com" in _allowed_hosts(full_docs, "gateway")
    assert "console.example.com" not in _allowed_hosts(full_docs, "gateway")
    assert "console.example.com" in _allowed_hosts(full_docs, "control")
    assert "api.example-apis.com" not in _allowed_hosts(full_docs, "control")


def test_ingress_defaults_to_two_different_hosts() -> None:
    routes = _ingress_routes(render({"ingress": {"enabled": True}}))
    assert len(routes) == 2 and sorted(route["/"] for route in routes.values()) == [
        f"{FULL}-control",
        f"{FULL}-gateway",
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"ingress": {"enabled": True, "gatewayHosts": ["a.example.com"], "controlHosts": ["a.example.com"]}},
            "both a gateway and a control host",
        ),
        ({"ingress": {"hosts": ["api.example.com"]}}, "ingress.hosts and ingress.controlPaths are gone"),
        (
            {"ingress": {"enabled": True, "controlHosts": []}},
            "needs both ingress.gatewayHosts and ingress.controlHosts",
        ),
        (
            {
                "ingress": {"enabled": True, "gatewayHosts": ["api.example.com"], "controlHosts": ["c.example.com"]},
                "config": {"csrfTrustedOrigins": ["https://c.example.com", "https://api.example.com:443"]},
            },
            "must not list the gateway host api.example.com",
        ),
    ],
    ids=["shared-host", "old-single-host-values", "missing-control-host", "gateway-origin-trusted-for-csrf"],
)
def test_ingress_refuses_to_put_gateway_and_control_plane_on_one_origin(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in find(docs, "Deployment")}
    pods.update({d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in find(docs, "Job")})
    return pods


@pytest.mark.parametrize(("store", "port"), [("postgresql", 5432), ("redis", 6379)])
def test_only_this_releases_pods_may_reach_postgres_and_redis(store: str, port: int, default_docs: Any) -> None:
    policy = one(default_docs, "NetworkPolicy", f"{FULL}-{store}-clients")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": store}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # same namespace only, no namespaceSelector or ipBlock
    selector = peer["podSelector"]["matchLabels"]
    for name, labels in _pod_labels(default_docs).items():
        assert _labels_match(selector, labels), f"{name} could not reach {store}"
    other_release = {"app.kubernetes.io/name": "apimgmt", "app.kubernetes.io/instance": "someone-else"}
    assert not _labels_match(selector, other_release)
    assert not _labels_match(selector, {"app": "anything"})


def test_app_pods_egress_is_limited_to_dns_postgres_redis_and_the_gateways_upstreams(default_docs: Any) -> None:
    app = one(default_docs, "NetworkPolicy", f"{FULL}-app")
    assert app["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ports = sorted({p["port"] for rule in app["spec"]["egress"] for p in rule["ports"]})
    assert ports == [53, 5432, 6379]
    upstreams = one(default_docs, "NetworkPolicy", f"{FULL}-gateway-upstreams")
    assert upstreams["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert app["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": "http"}]


def test_external_databases_are_reached_by_cidr_and_get_no_in_cluster_policy(production_docs: Any) -> None:
    assert not find(production_docs, "NetworkPolicy", f"{FULL}-postgresql-clients")
    app = one(production_docs, "NetworkPolicy", f"{FULL}-app")
    by_port = {rule["ports"][0]["port"]: rule.get("to") for rule in app["spec"]["egress"]}
    assert by_port[5432] == [{"ipBlock": {"cidr": "10.20.0.0/24"}}]
    assert by_port[6380] == [{"ipBlock": {"cidr": "10.20.1.0/24"}}]
    peers = app["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}} in peers


def test_network_policies_can_be_switched_off() -> None:
    assert not find(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_service_monitor_scrapes_gateway_control_and_flusher_as_job_apimgmt(full_docs: Any) -> None:
    monitor = one(full_docs, "ServiceMonitor", FULL)
    endpoints = {e["port"]: e["path"] for e in monitor["spec"]["endpoints"]}
    assert endpoints == {"metrics": "/metrics"}  # never the HTTP port: it serves no metrics
    expr = monitor["spec"]["selector"]["matchExpressions"][0]
    assert expr["values"] == ["gateway", "control", "flusher", "deliverer"]
    # The job label comes from a Service label that does not depend on the release name: the shipped
    # ServiceTargetsDown alert selects up{job="apimgmt"}.
    job_label = monitor["spec"]["jobLabel"]
    for component, ports in (
        ("gateway", ["http", "metrics"]),
        ("control", ["http", "metrics"]),
        ("flusher", ["metrics"]),
        ("deliverer", ["metrics"]),
    ):
        service = one(full_docs, "Service", f"{FULL}-{component}")
        assert _labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert service["metadata"]["labels"]["app.kubernetes.io/component"] in expr["values"]
        assert service["metadata"]["labels"][job_label] == "apimgmt"
        assert [p["name"] for p in service["spec"]["ports"]] == ports
    renamed = render({"fullnameOverride": "edge", "metrics": {"serviceMonitor": {"enabled": True}}})
    assert one(renamed, "Service", "edge-gateway")["metadata"]["labels"][job_label] == "apimgmt"
    rules = yaml.safe_load(RULES.read_text())
    (down,) = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == "ServiceTargetsDown"]
    assert 'up{job="apimgmt"}' in down["expr"]


def _exported_metric_names() -> set[str]:
    source = (ROOT / "gateway" / "metrics.py").read_text()
    names = set(re.findall(r'"(api_[a-z_]+)"', source))
    return {n.removesuffix("_total") for n in names}


def _referenced_metrics(expr: str) -> set[str]:
    names = set(re.findall(r"\b(api_[a-z_]+)\b", expr))
    return {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names}


def test_charts_copy_of_the_alert_rules_is_identical_to_monitoring_rules() -> None:
    # Helm reads only files inside the chart, so the chart carries a copy of the one source of truth.
    copy = CHART / "files" / "prometheus-rules.yaml"
    assert copy.read_bytes() == RULES.read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from {RULES.relative_to(ROOT)}: edit the latter, then "
        f"cp {RULES.relative_to(ROOT)} {copy.relative_to(ROOT)}"
    )


def test_prometheus_rule_renders_exactly_the_repositorys_alerts(full_docs: Any) -> None:
    rule = one(full_docs, "PrometheusRule", FULL)
    canonical = yaml.safe_load(RULES.read_text())
    assert rule["spec"]["groups"] == canonical["groups"]
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"HighErrorRate", "CircuitOpen", "RateLimitStoreErrors", "UsageFlusherStalled", "ServiceTargetsDown"} <= set(
        alerts
    )
    # Annotations keep Prometheus's own templating (Helm must not eat it).
    assert "{{ $value" in alerts["HighErrorRate"]["annotations"]["description"]
    exported = _exported_metric_names()
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}
        unknown = _referenced_metrics(alert["expr"]) - exported
        assert not unknown, f"{name} uses metrics the gateway does not export: {unknown}"
        anchor = alert["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in _runbook_anchors(), f"{name} points to a runbook section that does not exist: {anchor}"


def _runbook_anchors() -> set[str]:
    doc = Path(ROOT / "docs" / "operations.md")
    if not doc.exists():
        pytest.fail("docs/operations.md is missing")
    anchors = set()
    for line in doc.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 -]", "", title).replace(" ", "-"))
    return anchors


def test_additional_alert_groups_are_appended() -> None:
    extra = {"name": "mine", "rules": [{"alert": "Mine", "expr": "vector(1)"}]}
    docs = render({"metrics": {"prometheusRule": {"enabled": True, "additionalGroups": [extra]}}})
    assert one(docs, "PrometheusRule", FULL)["spec"]["groups"][-1] == extra


def test_notes_warn_about_a_generated_pepper() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        notes = chart.render({}, name=RELEASE, namespace="apimgmt", is_install=True)["apimgmt/templates/NOTES.txt"]
    assert "KEY_HASH_PEPPER was generated" in notes and "kubectl" in notes


@pytest.mark.parametrize("component", ["gateway", "control"])
def test_web_pods_serve_metrics_on_their_own_port(component: str, full_docs: Any) -> None:
    container = _containers(one(full_docs, "Deployment", f"{FULL}-{component}"))[0]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    assert _env(container)["METRICS_PORT"] == "9100"
    service = one(full_docs, "Service", f"{FULL}-{component}")
    assert {"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]
    moved = render({"metrics": {"port": 9400}})
    container = _containers(one(moved, "Deployment", f"{FULL}-{component}"))[0]
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]
    assert _env(container)["METRICS_PORT"] == "9400"


def test_ingress_never_routes_to_the_metrics_port(full_docs: Any) -> None:
    ingresses = find(full_docs, "Ingress")
    assert len(ingresses) == 2
    backends = [
        path["backend"]["service"]
        for ingress in ingresses
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert backends and all(backend["port"] == {"name": "http"} for backend in backends)


def test_ingress_refuses_metrics_on_every_host(full_docs: Any) -> None:
    blocked = one(full_docs, "Ingress", f"{FULL}-blocked")
    assert blocked["metadata"]["annotations"]["nginx.ingress.kubernetes.io/denylist-source-range"] == "0.0.0.0/0,::/0"
    routes = {
        rule["host"]: {(p["path"], p["pathType"]): p["backend"]["service"]["name"] for p in rule["http"]["paths"]}
        for rule in blocked["spec"]["rules"]
    }
    assert routes == {
        "api.example-apis.com": {("/metrics", "Prefix"): f"{FULL}-gateway"},
        "console.example.com": {("/metrics", "Prefix"): f"{FULL}-control"},
    }
    # Same class as the main Ingress, so the same controller serves (and refuses) these paths.
    assert blocked["spec"]["ingressClassName"] == one(full_docs, "Ingress", FULL)["spec"]["ingressClassName"]
    # The deny annotation never lands on the main Ingress (it would refuse every path).
    assert "nginx.ingress.kubernetes.io/denylist-source-range" not in one(full_docs, "Ingress", FULL)["metadata"].get(
        "annotations", {}
    )
    assert not find(render({"ingress": {"enabled": True, "blockedPaths": []}}), "Ingress", f"{FULL}-blocked")


def test_only_prometheus_reaches_the_metrics_port_and_the_ingress_controller_only_http() -> None:
    docs = render(
        {
            "networkPolicy": {
                "ingressFrom": {"namespaceSelector": {"kubernetes.io/metadata.name": "ingress-nginx"}},
                "metricsNamespaceSelector": {"kubernetes.io/metadata.name": "monitoring"},
            }
        }
    )
    app = one(docs, "NetworkPolicy", f"{FULL}-app")
    peers_by_port = {rule["ports"][0]["port"]: rule["from"] for rule in app["spec"]["ingress"]}
    assert peers_by_port == {
        "http": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
        "metrics": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    }


def test_ingress_keeps_websockets_and_streams_open_an_hour_unless_annotations_say_otherwise() -> None:
    read, send = "nginx.ingress.kubernetes.io/proxy-read-timeout", "nginx.ingress.kubernetes.io/proxy-send-timeout"
    annotations = one(render({"ingress": {"enabled": True}}), "Ingress", FULL)["metadata"]["annotations"]
    assert annotations[read] == annotations[send] == "3600"

    own = {read: "120", "cert-manager.io/cluster-issuer": "letsencrypt"}
    docs = render({"ingress": {"enabled": True, "annotations": own, "streamIdleSeconds": 900}})
    annotations = one(docs, "Ingress", FULL)["metadata"]["annotations"]
    assert annotations == {read: "120", send: "900", "cert-manager.io/cluster-issuer": "letsencrypt"}
