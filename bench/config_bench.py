"""Configuration as code at size: export, plan and apply of a tenant with 500 APIs, 200 policies and 50 plans; and
the gateway's request validation against a 300-operation OpenAPI document (CPU per request, 2 KB JSON body).

Run: ``DATABASE_URL=… REDIS_URL=… .venv/bin/python bench/config_bench.py [--migrate]`` against a database of its
own (``--migrate`` creates and migrates it; ``make bench-config`` does so), or ``make bench-config``. The tenant
``bench-config`` is made and removed. Each step is timed on its own with its query count, wall time and CPU time
(here and in PostgreSQL, which on a shared machine say more than wall time); the target is under 10 s each. Results
are printed and written to bench/results/config-<time>.json, with the load average at the start.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
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


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dns-names",
        action="store_true",
        help="upstreams as DNS names instead of addresses (each API save then waits for its lookups)",
    )
    parser.add_argument("--migrate", action="store_true", help="create DATABASE_URL's database if missing, migrate")
    return parser.parse_args()


OPTIONS = _options() if __name__ == "__main__" else argparse.Namespace(dns_names=False, migrate=False)
if OPTIONS.migrate:
    database = os.environ["DATABASE_URL"].rsplit("/", 1)[-1].split("?", 1)[0]
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f'CREATE DATABASE "{database}"'], check=False)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, check=True)

import django  # noqa: E402

django.setup()

from django.db import connection  # noqa: E402

from apimgmt import config_doc, services  # noqa: E402
from apimgmt.models import Subscription, Tenant  # noqa: E402

TENANT = "bench-config"
APIS, POLICIES, PLANS = 500, 200, 50


# Upstreams by address by default: a name is looked up when an API is saved (apimgmt.validation refuses names that
# point inside), and this machine has no resolver, so each lookup fails after ~0.1 s; --dns-names measures that.
DNS_NAMES = OPTIONS.dns_names


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


def validation_document(version: str) -> dict[str, Any]:
    """300 operations: per resource a list (query parameter), a create (JSON body) and a read (path parameter)."""
    nullable: dict[str, Any] = (
        {"type": ["string", "null"]} if version.startswith("3.1") else {"type": "string", "nullable": True}
    )
    schemas = {
        "Item": {
            "type": "object",
            "required": ["sku", "qty"],
            "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z0-9-]{3,20}$"},
                "qty": {"type": "integer", "minimum": 1},
                "price": {"type": "number"},
                "note": {"type": "string", "maxLength": 200},
            },
        },
        "Customer": {
            "type": "object",
            "required": ["id", "email"],
            "properties": {
                "id": {"type": "integer"},
                "email": {"type": "string", "format": "email"},
                "name": {"type": "string"},
                "address": {"type": "object", "properties": {k: {"type": "string"} for k in ("street", "city", "zip")}},
            },
        },
        "Order": {
            "type": "object",
            "required": ["customer", "items"],
            "properties": {
                "customer": {"$ref": "#/components/schemas/Customer"},
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}, "maxItems": 100},
                "coupon": nullable,
                "express": {"type": "boolean"},
            },
        },
    }
    ok = {"200": {"description": "ok"}}
    paths: dict[str, Any] = {}
    for i in range(100):
        body = {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}
        paths[f"/orders{i}"] = {
            "get": {"parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer"}}], "responses": ok},
            "post": {"requestBody": {"required": True, "content": body}, "responses": ok},
        }
        path_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
        paths[f"/orders{i}/{{id}}"] = {"get": {"parameters": [path_id], "responses": ok}}
    info = {"title": "Orders", "version": "1"}
    return {"openapi": version, "info": info, "paths": paths, "components": {"schemas": schemas}}


def validation_cost(results: dict[str, Any]) -> None:
    """CPU per request of the request_validation step (enforce) on a valid 2 KB body and on one integer parameter,
    without the rest of the gateway: the step as the route table builds it, called as the chain calls it; with the
    compiled (jsonschema-rs) checks and, for comparison, with openapi-schema-validator alone."""
    import io
    import types

    from apimgmt.selectors import RouteSpec
    from gateway.chain import Exchange, Finished, build_chain
    from gateway.routing import build_route

    item = {"sku": "SKU-0000", "qty": 1, "price": 9.99, "note": "gift wrap please, and a card with it"}
    order = {
        "customer": {
            "id": 7,
            "email": "ann@example.com",
            "name": "Ann Example",
            "address": {"street": "1 Long Street", "city": "Springfield", "zip": "12345"},
        },
        "items": [{**item, "sku": f"SKU-{n:04}", "qty": n + 1} for n in range(20)],
        "coupon": None,
        "express": True,
    }
    body = json.dumps(order).encode()
    from django.conf import settings

    worker = types.SimpleNamespace(
        upstreams=types.SimpleNamespace(reaper=None),
        body_read_timeout=0.0,
        max_body=int(settings.GATEWAY["MAX_BODY_BYTES"]),
    )
    for version in ("3.1.0", "3.0.3"):
        spec = RouteSpec(
            api_id="bench", tenant_id=TENANT, tenant_timezone="UTC", api_name="orders", base_path="/orders",
            host="", status="active", sunset_at=None, strip_path=True, targets=[("http://192.0.2.1", 1)],
            key_header="X-API-Key", accept_bearer=True, key_query_param="", connect_timeout=1.0, read_timeout=1.0,
            total_timeout=1.0, retries=0, cb_failure_threshold=5, cb_recovery_timeout=30.0,
            openapi_spec=validation_document(version), validation="enforce",
        )  # fmt: skip
        start = time.process_time()
        route = build_route(spec, {})
        route.chain = build_chain(route)
        compile_ms = (time.process_time() - start) * 1000
        (step,) = route.chain.steps
        validation_step: Any = step  # a RequestValidation, with its compiled document
        operations = validation_step.compiled.operations.values()
        compiled_checks = [(op, op.body_fast, [(p, p.fast) for p in op.params]) for op in operations]

        def use_compiled_checks(on: bool, checks: Any = compiled_checks) -> None:
            """With off, openapi-schema-validator alone checks everything (as before the compiled checks)."""
            for operation, body_fast, params in checks:
                operation.body_fast = body_fast if on else None
                for param, fast in params:
                    param.fast = fast if on else None

        cases = [
            ("POST", "/orders/orders57", "", body, f"{len(body)} B JSON body"),
            ("GET", "/orders/orders57/12", "", b"", "GET, integer path parameter"),
            ("GET", "/orders/orders57", "limit=5", b"", "GET, integer query parameter"),
        ]
        for (method, path, query, content, what), compiled in itertools.product(cases, (True, False)):
            use_compiled_checks(compiled)

            def request(
                validated: bool, route: Any = route, step: Any = step, case: Any = (method, path, query, content)
            ) -> None:
                method, path, query, content = case
                environ: dict[str, Any] = {}
                if content:
                    environ.update(CONTENT_LENGTH=str(len(content)), CONTENT_TYPE="application/json")
                    environ["wsgi.input"] = io.BytesIO(content)
                done = Finished("r", method, 0.0)
                ex = Exchange(worker, environ, route, method, path, query, "r", "127.0.0.1", done)  # type: ignore[arg-type]
                if validated:
                    assert step.request(ex) is None

            rounds: dict[bool, list[float]] = {True: [], False: []}
            for validated in (True, False) * 5:
                start = time.process_time()
                for _ in range(300):
                    request(validated)
                rounds[validated].append((time.process_time() - start) / 300 * 1e6)
            added = sorted(rounds[True])[2] - sorted(rounds[False])[2]  # medians
            how = "" if compiled else " (openapi-schema-validator alone)"
            name = f"validation: OpenAPI {version}, 300 operations, {what}{how}"
            results[name] = {"cpu_us_per_request": round(added, 1), "compile_ms": round(compile_ms, 1)}
            print(f"{name:<96} {added:7.1f} µs CPU per request (compiled in {compile_ms:.0f} ms)", flush=True)
        use_compiled_checks(True)


def main() -> None:
    clean()
    tenant = services.tenant_create(id=TENANT, name="Bench config", actor=None)
    # The document as export writes it (defaults filled in, fields in order), so the round trip can be compared.
    text = config_doc.dump_text(config_doc.read_document(config_doc.dump_text(document()), "bench.yaml", {}))
    results: dict[str, Any] = {"apis": APIS, "policies": POLICIES, "plans": PLANS, "document_bytes": len(text)}
    results["load_1min_at_start"] = round(os.getloadavg()[0], 2)
    print(f"load average at the start: {results['load_1min_at_start']} (2 cores)", flush=True)
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
    validation_cost(results)
    out = ROOT / "bench" / "results" / f"config-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
