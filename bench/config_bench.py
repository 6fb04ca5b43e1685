"""Configuration as code at size: export, plan and apply of a tenant with 500 APIs, 200 policies and 50 plans.

Run: ``DATABASE_URL=… REDIS_URL=… .venv/bin/python bench/config_bench.py`` against a migrated database of its own
(the tenant ``bench-config`` is made and removed). Each step is timed on its own with its query count; the target
is under 10 s each. Results are printed and written to bench/results/config-<time>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apimgmt.settings")
os.environ.setdefault("SECRET_KEY", "bench-config-secret-key-" + "x" * 40)
os.environ.setdefault("KEY_HASH_PEPPER", "bench-config-pepper-" + "y" * 40)

import django  # noqa: E402

django.setup()

from django.db import connection  # noqa: E402

from apimgmt import config_doc, services  # noqa: E402
from apimgmt.models import Subscription, Tenant  # noqa: E402

TENANT = "bench-config"
APIS, POLICIES, PLANS = 500, 200, 50


# Upstreams by address by default: a name is looked up when an API is saved (apimgmt.validation refuses names that
# point inside), and this machine has no resolver, so each lookup fails after ~0.1 s; --dns-names measures that.
DNS_NAMES = "--dns-names" in sys.argv


def upstream(i: int, which: str) -> str:
    if DNS_NAMES:
        return f"https://svc-{i}-{which}.example.com"
    return f"https://1.{1 if which == 'a' else 2}.{i // 250}.{i % 250 + 1}"


def document() -> dict[str, Any]:
    policies = [
        {"name": f"policy-{i:03}", "policy_type": "rate_limiting", "config": {"requests_per_minute": 100 + i}}
        for i in range(POLICIES)
    ]
    plans = [
        {"name": f"plan-{i:02}", "policies": [f"policy-{(i * 4 + j) % POLICIES:03}" for j in range(4)]}
        for i in range(PLANS)
    ]
    apis = [
        {
            "name": f"api-{i:03}",
            "description": f"Service {i}",
            "status": "active",
            "base_path": f"/bench-config/svc-{i}/v1",
            "upstream_url": upstream(i, "a"),
            "targets": [{"url": upstream(i, "b"), "weight": 2}],
            "policies": [f"policy-{i % POLICIES:03}", f"policy-{(i + 7) % POLICIES:03}"],
            "plans": [f"plan-{i % PLANS:02}", f"plan-{(i + 1) % PLANS:02}"],
        }
        for i in range(APIS)
    ]
    return {"format": config_doc.FORMAT, "policies": policies, "plans": plans, "apis": apis}


def _server_cpu() -> float | None:
    """CPU seconds the database's backend process for this connection has used, when it runs on this machine
    (wall time on a shared machine says more about the neighbours than about the code)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def measured(results: dict[str, Any], name: str) -> Iterator[None]:
    queries = 0

    def count(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        nonlocal queries
        queries += 1
        return execute(sql, params, many, context)

    server_start = _server_cpu()
    start, cpu_start = time.perf_counter(), time.process_time()
    with connection.execute_wrapper(count):
        yield
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    server_end = _server_cpu()
    server = None if server_start is None or server_end is None else server_end - server_start
    results[name] = {
        "seconds": round(seconds, 2),
        "queries": queries,
        "client_cpu_seconds": round(cpu, 2),
        "server_cpu_seconds": None if server is None else round(server, 2),
    }
    shown = "" if server is None else f"  cpu {cpu:5.2f} s here + {server:5.2f} s in PostgreSQL"
    print(f"{name:<44} {seconds:6.2f} s  {queries:6} queries{shown}", flush=True)


def clean() -> None:
    Subscription.objects.filter(api__tenant_id=TENANT).delete()
    Tenant.objects.filter(pk=TENANT).delete()


def main() -> None:
    clean()
    tenant = services.tenant_create(id=TENANT, name="Bench config", actor=None)
    # The document as export writes it (defaults filled in, fields in order), so the round trip can be compared.
    text = config_doc.dump_text(config_doc.read_document(config_doc.dump_text(document()), "bench.yaml", {}))
    results: dict[str, Any] = {"apis": APIS, "policies": POLICIES, "plans": PLANS, "document_bytes": len(text)}
    try:
        with measured(results, "plan: empty tenant (750 creates)"):
            plan = config_doc.plan_document(tenant, text, source="bench.yaml", variables={})
        assert len(plan.changes) == APIS + POLICIES + PLANS
        with measured(results, "apply: empty tenant (750 creates)"):
            doc = config_doc.read_document(text, "bench.yaml", {})
            config_doc.apply_document(tenant=tenant, document=doc, source="bench.yaml", actor=None)
        with measured(results, "export"):
            exported = config_doc.dump_text(config_doc.export_document(tenant))
        assert exported == text, "round trip differs"
        with measured(results, "plan: no changes"):
            plan = config_doc.plan_document(tenant, exported, source="bench.yaml", variables={})
        assert not plan.changes
        with measured(results, "apply: no changes"):
            doc = config_doc.read_document(exported, "bench.yaml", {})
            plan = config_doc.apply_document(tenant=tenant, document=doc, source="bench.yaml", actor=None)
        assert not plan.changes
        changed = exported.replace("requests_per_minute: 1", "requests_per_minute: 2").replace(
            "description: Service 1", "description: Service one"
        )
        with measured(results, "plan: 200 policies + 111 APIs changed"):
            plan = config_doc.plan_document(tenant, changed, source="bench.yaml", variables={})
        with measured(results, "apply: 200 policies + 111 APIs changed"):
            doc = config_doc.read_document(changed, "bench.yaml", {})
            config_doc.apply_document(tenant=tenant, document=doc, source="bench.yaml", actor=None)
        results["changed"] = len(plan.changes)
        empty = config_doc.dump_text({"format": config_doc.FORMAT})
        with measured(results, "plan: prune everything (refusals)"):
            plan = config_doc.plan_document(tenant, empty, source="bench.yaml", variables={}, prune=True)
        results["refused"] = len(plan.refusals)
    finally:
        clean()
    out = ROOT / "bench" / "results" / f"config-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
