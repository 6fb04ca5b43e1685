"""Run the benchmark of `make bench` and print a table; JSON results go to bench/results/.

Targets: nginx upstream direct (200-byte JSON), nginx reverse proxy, a naive Django proxy (bench/naive_proxy.py)
and the full gateway (key auth, a two-window rate limit, usage events and metrics on) under gunicorn with the
production gunicorn.conf.py. Each is measured with wrk -t2 -c64 -d10s and -t1 -c1 -d10s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
BODY = json.dumps({"id": 12345, "name": "bench", "items": list(range(20)), "padding": "x" * 80}, separators=(",", ":"))
BODY = BODY + " " * (200 - len(BODY))
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer 200 within {timeout}s")


@contextmanager
def process(
    args: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        if log:
            out.close()  # type: ignore[union-attr]


def nginx_conf(workdir: Path, upstream_port: int, proxy_port: int) -> Path:
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 1000000;
    upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{upstream_port};
        location / {{ default_type application/json; return 200 '{BODY}'; }}
    }}
    server {{
        listen 127.0.0.1:{proxy_port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )
    return conf


_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, connections: int, duration: int, headers: dict[str, str]) -> dict[str, Any]:
    threads = min(2, connections)
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latency = {m.group(1): _ms(m.group(2), m.group(3)) for m in _LATENCY.finditer(out)}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {
        "rps": rps,
        "p50_ms": latency.get("50"),
        "p99_ms": latency.get("99"),
        "requests": total,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in socket_errors.groups()) if socket_errors else 0,
    }


def rss_mib(master_pid: int) -> list[float]:
    result = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["PPid"].strip()) == master_pid and "VmRSS" in fields:
            result.append(int(fields["VmRSS"].split()[0]) / 1024)
    return sorted(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--worker-class", default=os.environ.get("GUNICORN_WORKER_CLASS", ""))
    parser.add_argument("--only", default="", help="comma-separated subset: direct,nginx,naive,gateway")
    options = parser.parse_args()
    only = set(filter(None, options.only.split(",")))
    workdir = Path(tempfile.mkdtemp(prefix="apimgmt-bench-"))
    upstream_port, proxy_port, naive_port, gateway_port = (free_port() for _ in range(4))
    upstream = f"http://127.0.0.1:{upstream_port}"
    env = {
        "DEBUG": "0",
        "SECRET_KEY": "bench-secret-key-" + "x" * 40,
        "KEY_HASH_PEPPER": "bench-pepper-" + "y" * 40,
        "ALLOWED_HOSTS": "*",
        "UPSTREAM_ALLOW_PRIVATE": "1",
        "USAGE_SPOOL_DIR": str(workdir / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prom"),
        "LOG_LEVEL": "INFO",
    }
    (workdir / "prom").mkdir()
    if options.worker_class:
        env["GUNICORN_WORKER_CLASS"] = options.worker_class

    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", "CREATE DATABASE apimgmt_bench"],
        capture_output=True,
        check=False,
    )
    subprocess.run(
        [str(VENV_BIN / "python"), "manage.py", "migrate", "-v0"], cwd=ROOT, env={**os.environ, **env}, check=True
    )
    setup = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "bench.setup_bench", upstream],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    bench_key = json.loads(setup.stdout.strip().splitlines()[-1])["key"]

    results: dict[str, Any] = {}
    targets = {
        "direct": (f"{upstream}/items/1", {}),
        "nginx": (f"http://127.0.0.1:{proxy_port}/items/1", {}),
        "naive": (f"http://127.0.0.1:{naive_port}/items/1", {}),
        "gateway": (f"http://127.0.0.1:{gateway_port}/bench/items/1", {"X-API-Key": bench_key}),
    }
    conf = nginx_conf(workdir, upstream_port, proxy_port)
    gunicorn = str(VENV_BIN / "gunicorn")
    with (
        process([NGINX, "-c", str(conf), "-p", str(workdir)]),
        process(
            [
                gunicorn,
                "bench.naive_proxy:application",
                "--bind",
                f"127.0.0.1:{naive_port}",
                "--workers",
                "2",
                "--worker-class",
                "gthread",
                "--threads",
                "8",
            ],
            env={"NAIVE_UPSTREAM": upstream},
        ),
        process(
            [
                gunicorn,
                "apimgmt.wsgi:application",
                "--config",
                "gunicorn.conf.py",
                "--bind",
                f"127.0.0.1:{gateway_port}",
                "--workers",
                "2",
            ],
            env=env,
            log=workdir / "gateway.log",
        ) as gateway_proc,
    ):
        for url, headers in targets.values():
            wait_for(url, headers)
        for name, (url, headers) in targets.items():
            if only and name not in only:
                continue
            wrk(url, 64, 2, headers)  # warm-up: pools, caches, JIT-free but page-cache warm
            results[name] = {
                "c64": wrk(url, 64, options.duration, headers),
                "c1": wrk(url, 1, options.duration, headers),
            }
            print(f"  measured {name}", file=sys.stderr)
        gateway_rss = rss_mib(gateway_proc.pid)

    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "worker_class": options.worker_class or "gevent (gunicorn.conf.py default)",
        "duration_s": options.duration,
        "results": results,
        "gateway_worker_rss_mib": gateway_rss,
    }
    if "gateway" in results and "naive" in results:
        report["gateway_vs_naive_rps_c64"] = round(results["gateway"]["c64"]["rps"] / results["naive"]["c64"]["rps"], 2)
    if "gateway" in results and "direct" in results:
        report["gateway_added_p50_ms_c1"] = round(
            results["gateway"]["c1"]["p50_ms"] - results["direct"]["c1"]["p50_ms"], 3
        )

    print(
        f"\n{'target':10} {'conns':>5} {'rps':>10} {'p50 ms':>8} {'p99 ms':>8} {'non2xx':>7} {'errors':>7} {'vs naive':>9}"
    )
    for name, by_conns in results.items():
        for conns, row in by_conns.items():
            base = results.get("naive", {}).get(conns, {}).get("rps")
            ratio = f"{row['rps'] / base:.2f}x" if base else "-"
            print(
                f"{name:10} {conns[1:]:>5} {row['rps']:>10.0f} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} "
                f"{row['non_2xx']:>7} {row['socket_errors']:>7} {ratio:>9}"
            )
    for key in ("gateway_vs_naive_rps_c64", "gateway_added_p50_ms_c1"):
        if key in report:
            print(f"{key}: {report[key]}")
    print(f"gateway worker RSS (MiB): {', '.join(f'{r:.1f}' for r in gateway_rss)}")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"bench-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out.relative_to(ROOT)}")
    if not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
