"""Fixtures for the deployment tests: the Helm chart rendered with default and production values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "apimgmt"
PRODUCTION_VALUES = ROOT / "deploy" / "values-production.yaml"
RELEASE = "apimgmt"
NAMESPACE = "apimgmt"

# Switched on in the "everything" render so every template is exercised.
ALL_FEATURES: dict[str, Any] = {
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "gatewayHosts": ["api.example-apis.com"],
        "controlHosts": ["console.example.com"],
    },
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "config": {"toml": "[gateway]\nworkers = 4\n"},
}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Render the chart offline (as `helm template` does) and return every manifest as a dict."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                doc["_template"] = path
                docs.append(doc)
    return docs


def production_values() -> dict[str, Any]:
    return yaml.safe_load(PRODUCTION_VALUES.read_text())


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {[d['metadata']['name'] for d in find(docs, kind)]}"
    return found[0]


@pytest.fixture(scope="session")
def default_docs() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="session")
def production_docs() -> list[dict[str, Any]]:
    return render(production_values())


@pytest.fixture(scope="session")
def full_docs() -> list[dict[str, Any]]:
    return render(ALL_FEATURES)
