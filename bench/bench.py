"""Run the benchmark of `make bench` and print a table; JSON results go to bench/results/.

Targets: nginx upstream direct (200-byte JSON), nginx reverse proxy, a naive Django proxy (bench/naive_proxy.py)
and the full gateway (key auth, a two-window rate limit, usage events and metrics on) under gunicorn with the
production gunicorn.conf.py. The same gateway also serves a row per policy-chain feature: "jwt" (RS256 token, repeated),
"edge" (CORS + IP allow list + header transforms both ways) and "cache" (response cache hits; the upstream's access
log shows how many requests reached it during the measured runs, which should be none), and "post" / "validate"
(a 2 KB JSON POST, the second checked against a 300-operation OpenAPI document; their CPU difference is what
request validation adds). Each is measured with wrk -t2 -c64 and -t1 -c1, --repeat times (default 3, 8 s each),
the targets interleaved round by round; medians are reported, with the rps range, and the CPU time the naive
proxy's and the gateway's processes spent per request (less sensitive to other load on a shared machine than rps).

Then the WebSocket rows (bench/websocket.py, on a gateway of their own once the HTTP servers are gone): echo
round trips per second through the gateway against the upstream directly at 64 connections, with the ratio, and
2,000 idle connections on one worker (RSS growth, and each closed with 1008 on time although it pings), each
marked PASS or FAIL against issue 16's targets. ``--no-websocket`` skips them, ``--only websocket`` runs only them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
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


def gateway_env(workdir: Path, *, log_level: str) -> dict[str, str]:
    """The settings a bench gateway runs with: throwaway secrets, loopback upstreams allowed, the usage spool and
    the Prometheus multiprocess directory (created here) under ``workdir``."""
    (workdir / "prom").mkdir()
    return {
        "DEBUG": "0",
        "SECRET_KEY": "bench-secret-key-" + "x" * 40,
        "KEY_HASH_PEPPER": "bench-pepper-" + "y" * 40,
        "ALLOWED_HOSTS": "*",
        "UPSTREAM_ALLOW_PRIVATE": "1",
        "USAGE_SPOOL_DIR": str(workdir / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prom"),
        "LOG_LEVEL": log_level,
    }


def prepare_database(env: dict[str, str]) -> None:
    """Create the bench database (DATABASE_URL's name, else apimgmt_bench) unless it exists, and migrate it."""
    database = os.environ.get("DATABASE_URL", "").rsplit("/", 1)[-1].split("?", 1)[0] or "apimgmt_bench"
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f'CREATE DATABASE "{database}"'],
        capture_output=True,
        check=False,
    )
    subprocess.run(
        [str(VENV_BIN / "python"), "manage.py", "migrate", "-v0"], cwd=ROOT, env={**os.environ, **env}, check=True
    )


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
        location /cached/ {{
            access_log {workdir}/cached-upstream.log;
            add_header Cache-Control "public, max-age=3600";
            default_type application/json;
            return 200 '{BODY}';
        }}
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


def _lines(path: Path) -> int:
    """Lines in a log file (0 when it does not exist yet)."""
    try:
        with path.open("rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


# The POST rows' body: 2 KB of JSON that the bench API's OpenAPI document accepts (bench/setup_bench.py _spec).
POST_BODY = json.dumps(
    {"name": "bench", "qty": 3, "tags": [f"tag-{i}" for i in range(20)], "notes": "n" * 1600}, separators=(",", ":")
)


def post_script(workdir: Path) -> Path:
    script = workdir / "post.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.body = {json.dumps(POST_BODY)}\nwrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


def wrk(
    url: str, connections: int, duration: int, headers: dict[str, str], script: Path | None = None
) -> dict[str, Any]:
    threads = min(2, connections)
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency"]
    if script is not None:
        args += ["-s", str(script)]
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


def tree_cpu_seconds(master_pid: int) -> float:
    """User + system CPU of a server: its master and the master's live children (workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == master_pid or int(fields[1]) == master_pid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def load_1min() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each measurement over repeated runs (each run's own numbers are kept too)."""
    merged: dict[str, Any] = {}
    for field in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request"):
        values = [r[field] for r in rows if r.get(field) is not None]
        merged[field] = statistics.median(values) if values else None
    merged["non_2xx"] = sum(r["non_2xx"] for r in rows)
    merged["socket_errors"] = sum(r["socket_errors"] for r in rows)
    merged["rps_min"] = min(r["rps"] for r in rows)
    merged["rps_max"] = max(r["rps"] for r in rows)
    merged["runs"] = rows
    return merged


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
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per target and concurrency, interleaved; medians are reported"
    )
    parser.add_argument("--worker-class", default=os.environ.get("GUNICORN_WORKER_CLASS", ""))
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated subset: direct,nginx,naive,gateway,jwt,edge,cache,post,validate,websocket",
    )
    parser.add_argument(
        "--no-websocket", action="store_true", help="skip the WebSocket rows (bench/websocket.py; about 2 minutes)"
    )
    parser.add_argument("--websocket-idle", type=int, default=2000, help="idle WebSocket connections (0: skip)")
    options = parser.parse_args()
    only = set(filter(None, options.only.split(",")))
    with_websocket = (not only or "websocket" in only) and not options.no_websocket
    if only == {"websocket"}:
        _websocket_only(options)
        return
    workdir = Path(tempfile.mkdtemp(prefix="apimgmt-bench-"))
    upstream_port, proxy_port, naive_port, gateway_port = (free_port() for _ in range(4))
    upstream = f"http://127.0.0.1:{upstream_port}"
    env = gateway_env(workdir, log_level="INFO")
    if options.worker_class:
        env["GUNICORN_WORKER_CLASS"] = options.worker_class
    prepare_database(env)
    setup = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "bench.setup_bench", upstream],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    made = json.loads(setup.stdout.strip().splitlines()[-1])
    bench_key = made["key"]

    load_at_start = load_1min()
    targets = {
        "direct": (f"{upstream}/items/1", {}),
        "nginx": (f"http://127.0.0.1:{proxy_port}/items/1", {}),
        "naive": (f"http://127.0.0.1:{naive_port}/items/1", {}),
        "gateway": (f"http://127.0.0.1:{gateway_port}/bench/items/1", {"X-API-Key": bench_key}),
        "jwt": (
            f"http://127.0.0.1:{gateway_port}{made['jwt_base_path']}/items/1",
            {"Authorization": f"Bearer {made['jwt_token']}"},
        ),
        "edge": (
            f"http://127.0.0.1:{gateway_port}{made['edge_base_path']}/items/1",
            {"X-API-Key": bench_key, "Origin": "https://app.example.com"},
        ),
        "cache": (f"http://127.0.0.1:{gateway_port}{made['cache_base_path']}/cached/1", {"X-API-Key": bench_key}),
        "post": (f"http://127.0.0.1:{gateway_port}{made['post_base_path']}/r7/items", {"X-API-Key": bench_key}),
        "validate": (
            f"http://127.0.0.1:{gateway_port}{made['validate_base_path']}/r7/items",
            {"X-API-Key": bench_key},
        ),
    }
    gateway_rows = ("gateway", "jwt", "edge", "cache", "post", "validate")
    scripts = {name: post_script(workdir) for name in ("post", "validate")}
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
        ) as naive_proc,
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
        for name, (url, headers) in targets.items():
            if name not in scripts:
                wait_for(url, headers)
        servers = {"naive": naive_proc.pid, **{name: gateway_proc.pid for name in gateway_rows}}
        chosen = [name for name in targets if not only or name in only]
        for name in chosen:
            url, headers = targets[name]
            wrk(url, 64, 2, headers, scripts.get(name))  # warm-up: pools, caches, page cache
        cached_log = workdir / "cached-upstream.log"
        upstream_cached_before = _lines(cached_log)
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {"c64": [], "c1": []} for name in chosen}
        # Rounds interleave the targets, so a burst of load from elsewhere on this shared machine lands on
        # every target alike instead of on whichever happened to run then; the median of the rounds is reported.
        for round_ in range(options.repeat):
            for name in chosen:
                url, headers = targets[name]
                for conns in (64, 1):
                    cpu_before = tree_cpu_seconds(servers[name]) if name in servers else None
                    row = wrk(url, conns, options.duration, headers, scripts.get(name))
                    if cpu_before is not None:
                        used = tree_cpu_seconds(servers[name]) - cpu_before
                        # A worker recycled mid-run takes its CPU time with it; such a run reports no CPU figure.
                        row["cpu_us_per_request"] = (
                            round(used / row["requests"] * 1e6, 1) if used > 0 and row["requests"] else None
                        )
                    if not row["requests"]:
                        print(f"  {name} c{conns}: no request completed in {options.duration} s", file=sys.stderr)
                    row["load_1min"] = load_1min()
                    runs[name][f"c{conns}"].append(row)
            print(f"  round {round_ + 1}/{options.repeat} done (load {load_1min():.2f})", file=sys.stderr)
        results = {name: {c: median_row(rows) for c, rows in by_conns.items()} for name, by_conns in runs.items()}
        upstream_cached_during = _lines(cached_log) - upstream_cached_before
        gateway_rss = rss_mib(gateway_proc.pid)

    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "worker_class": options.worker_class or "gunicorn.conf.py default (gateway.gunicorn_worker.GatewayWorker)",
        "duration_s": options.duration,
        "repeat": options.repeat,
        "load_1min_at_start": load_at_start,
        "load_1min_at_end": load_1min(),
        "results": results,
        "gateway_worker_rss_mib": gateway_rss,
    }
    if "cache" in results:
        report["cache_upstream_requests_during_runs"] = upstream_cached_during
    if "post" in results and "validate" in results:
        # What checking a 2 KB JSON body against a 300-operation document adds, in gateway CPU per request.
        cpu = [results[n]["c64"].get("cpu_us_per_request") for n in ("validate", "post")]
        if None not in cpu:
            report["validation_added_cpu_us"] = round(cpu[0] - cpu[1], 1)
    for name in gateway_rows:
        if name in results and "naive" in results:
            report[f"{name}_vs_naive_rps_c64"] = round(results[name]["c64"]["rps"] / results["naive"]["c64"]["rps"], 2)
    if "gateway" in results and "naive" in results:
        report["gateway_vs_naive_rps_c64"] = round(results["gateway"]["c64"]["rps"] / results["naive"]["c64"]["rps"], 2)
        report["gateway_vs_naive_rps_c64_per_round"] = [
            round(g["rps"] / n["rps"], 2) for g, n in zip(runs["gateway"]["c64"], runs["naive"]["c64"], strict=True)
        ]
    if "gateway" in results and "direct" in results:
        report["gateway_added_p50_ms_c1"] = round(
            results["gateway"]["c1"]["p50_ms"] - results["direct"]["c1"]["p50_ms"], 3
        )
        report["gateway_added_p50_ms_c1_per_round"] = [
            round(g["p50_ms"] - d["p50_ms"], 3)
            for g, d in zip(runs["gateway"]["c1"], runs["direct"]["c1"], strict=True)
        ]

    print(
        f"\nmedians of {options.repeat} interleaved runs of {options.duration} s each "
        f"(1-min load {load_at_start:.2f} at start, {report['load_1min_at_end']:.2f} at end)"
    )
    print(
        f"{'target':10} {'conns':>5} {'rps':>9} {'rps range':>15} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'cpu us/req':>10} {'non2xx':>7} {'errors':>7} {'vs naive':>9}"
    )
    for name, by_conns in results.items():
        for conns, row in by_conns.items():
            base = results.get("naive", {}).get(conns, {}).get("rps")
            ratio = f"{row['rps'] / base:.2f}x" if base else "-"
            spread = f"{row['rps_min']:.0f}-{row['rps_max']:.0f}"
            cpu = f"{row['cpu_us_per_request']:.0f}" if row.get("cpu_us_per_request") else "-"
            print(
                f"{name:10} {conns[1:]:>5} {row['rps']:>9.0f} {spread:>15} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} "
                f"{cpu:>10} {row['non_2xx']:>7} {row['socket_errors']:>7} {ratio:>9}"
            )
    for key in (
        *(f"{name}_vs_naive_rps_c64" for name in gateway_rows if name != "gateway"),
        "cache_upstream_requests_during_runs",
        "validation_added_cpu_us",
        "gateway_vs_naive_rps_c64",
        "gateway_vs_naive_rps_c64_per_round",
        "gateway_added_p50_ms_c1",
        "gateway_added_p50_ms_c1_per_round",
    ):
        if key in report:
            print(f"{key}: {report[key]}")
    print(f"gateway worker RSS (MiB): {', '.join(f'{r:.1f}' for r in gateway_rss)}")
    if with_websocket:
        report["websocket"] = _websocket_rows(options)
    _write_results(report)
    if not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(workdir, ignore_errors=True)


def _websocket_rows(options: argparse.Namespace) -> dict[str, Any]:
    """The WebSocket rows (bench/websocket.py: echo round trips gateway vs direct at 64 connections, 2,000 idle
    connections on one worker), run after the HTTP servers are gone, with their verdicts against issue 16's
    targets."""
    if str(ROOT) not in sys.path:  # run as a script, bench/ and not the project is on the path
        sys.path.insert(0, str(ROOT))
    from bench import websocket

    print("\nWebSocket (bench/websocket.py)", file=sys.stderr)
    report = websocket.run(duration=options.duration, repeat=options.repeat, idle=options.websocket_idle)
    print("\n".join(websocket.summary(report)))
    return report


def _websocket_only(options: argparse.Namespace) -> None:
    report: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count()}
    report["websocket"] = _websocket_rows(options)
    _write_results(report)


def _write_results(report: dict[str, Any]) -> None:
    """bench/results/bench-<time>.json, the file later runs are compared with."""
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"bench-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
