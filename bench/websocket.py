"""make bench-websocket (and the WebSocket rows of make bench): WebSocket echo round trips through the gateway
against the same client talking to the upstream directly, and 2,000 idle connections on one gateway worker (its
memory, and whether the idle timeout still fires on time). JSON results go to bench/results/.

Round trips: ``--connections`` (64) clients each send a 64-byte message and wait for its echo, as fast as they
can, for ``--duration`` seconds; direct and through the gateway alternate ``--repeat`` times and medians are
reported, with the CPU time the gateway's workers, the upstream and the client spent per round trip (steadier
than the rate on a shared machine). Idle: ``--idle`` connections (2,000) opened through one gateway worker, its
RSS before and after; each client sends no message but pings every sixth of the API's idle timeout (a pong that
does not come back through the gateway fails it), and each must still be closed by the gateway (1008) within a
second of its idle timeout: pings and pongs are not activity (gateway/websocket.py, ``Session.last_activity``).
The client and the echo upstream are asyncio ``websockets`` processes of their own.

Each measurement is marked PASS or FAIL against issue 16's targets (``TARGETS``): round trips at least 40 % of
the direct rate; RSS growth under 100 MB; every idle connection closed with 1008 no later than 1 s after its
timeout. The command exits 1 when one fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.bench import (
    ROOT,
    VENV_BIN,
    free_port,
    gateway_env,
    load_1min,
    prepare_database,
    process,
    rss_mib,
    tree_cpu_seconds,
)

MESSAGE = "x" * 64


# -- the processes ---------------------------------------------------------------------------------------------


async def _echo_server(port: int) -> None:
    from websockets.asyncio.server import serve

    async def echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", port, compression=None, ping_interval=None, max_size=None):
        await asyncio.Future()


async def _round_trips(url: str, headers: dict[str, str], connections: int, duration: float) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    sockets = [
        await connect(url, additional_headers=headers, compression=None, ping_interval=None, proxy=None)
        for _ in range(connections)
    ]
    counts = [0] * connections
    latencies: list[float] = []
    stop = time.monotonic() + duration

    async def drive(index: int) -> None:
        ws = sockets[index]
        while time.monotonic() < stop:
            sent = time.perf_counter()
            await ws.send(MESSAGE)
            await ws.recv()
            latencies.append(time.perf_counter() - sent)
            counts[index] += 1

    started = time.monotonic()
    cpu_started = time.process_time()
    await asyncio.gather(*(drive(i) for i in range(connections)))
    elapsed = time.monotonic() - started
    cpu = time.process_time() - cpu_started
    for ws in sockets:
        await ws.close()
    latencies.sort()
    return {
        "round_trips": sum(counts),
        "per_second": round(sum(counts) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3) if latencies else None,
        "client_cpu_us_per_round_trip": round(cpu / max(1, sum(counts)) * 1e6, 1),
    }


async def _idle(url: str, headers: dict[str, str], count: int, idle_timeout: float) -> dict[str, Any]:
    """Open ``count`` connections that send no message but ping every ``idle_timeout / HEARTBEATS`` seconds (as
    websockets and most client libraries do by default), then wait for the gateway to close each of them."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    heartbeat = idle_timeout / HEARTBEATS
    # A pong that does not come back through the gateway within a heartbeat fails the connection (1011, not 1008).
    options: dict[str, Any] = {"compression": None, "ping_interval": heartbeat, "ping_timeout": heartbeat}
    gate = asyncio.Semaphore(32)  # handshakes at a time: one after another, 2,000 take longer than the timeout

    async def closed(ws: Any) -> tuple[int | None, float]:
        try:
            await asyncio.wait_for(ws.recv(), timeout=idle_timeout + 60)
        except ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd else None), time.monotonic()
        except TimeoutError:
            pass
        return None, time.monotonic()

    async def one() -> tuple[float, asyncio.Task[tuple[int | None, float]]]:
        async with gate:
            ws = await connect(url, additional_headers=headers, proxy=None, **options)
        # Its idle time starts at the handshake; the watch starts at once, so a close is timed when it comes.
        return time.monotonic(), asyncio.create_task(closed(ws))

    opened = await asyncio.gather(*(one() for _ in range(count)))
    still_open = sum(1 for _, task in opened if not task.done())
    print(json.dumps({"opened": len(opened), "open": still_open}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the parent measures memory
    outcomes = [await task for _, task in opened]
    codes = [code for code, _ in outcomes]
    late = [at - since - idle_timeout for (_, at), (since, _) in zip(outcomes, opened, strict=True)]
    return {
        "connections": len(opened),
        "open_when_measured": still_open,
        "heartbeat_s": round(heartbeat, 3),
        "closed_1008": codes.count(1008),
        "latest_close_after_timeout_s": round(max(late), 3),
        "earliest_close_after_timeout_s": round(min(late), 3),
    }


# -- the run ---------------------------------------------------------------------------------------------------


def _client(mode: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "bench.websocket", mode, *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _measure(
    url: str, headers: dict[str, str], connections: int, duration: float, servers: dict[str, int]
) -> dict[str, Any]:
    """One client run; with the CPU time each server (a process and its children) spent per round trip, which
    other load on a shared machine changes much less than the rate."""
    before = {name: tree_cpu_seconds(pid) for name, pid in servers.items()}
    proc = _client("round-trips", url, json.dumps(headers), str(connections), str(duration))
    out, _ = proc.communicate(timeout=duration + 120)
    result = dict(json.loads(out.strip().splitlines()[-1]))
    trips = max(1, result["round_trips"])
    for name, pid in servers.items():
        result[f"{name}_cpu_us_per_round_trip"] = round((tree_cpu_seconds(pid) - before[name]) / trips * 1e6, 1)
    result["load_1min"] = load_1min()
    return result


def run(
    *,
    duration: float = 8.0,
    repeat: int = 3,
    connections: int = 64,
    idle: int = 2000,
    idle_timeout: float = 30.0,
) -> dict[str, Any]:
    """Both measurements on a bench gateway of their own (DATABASE_URL, REDIS_URL), with their verdicts against
    issue 16's targets (``TARGETS``); ``idle=0`` skips the idle run. make bench calls it after its HTTP rows."""
    workdir = Path(tempfile.mkdtemp(prefix="apimgmt-bench-ws-"))
    upstream_port, gateway_port = free_port(), free_port()
    env = gateway_env(workdir, log_level="WARNING")
    # One worker holds every idle connection: each takes a greenlet slot.
    env["GUNICORN_WORKER_CONNECTIONS"] = str(max(1000, idle + 200))
    prepare_database(env)
    setup = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "bench.websocket", "setup", f"http://127.0.0.1:{upstream_port}"],
        cwd=ROOT,
        env={**os.environ, **env, "BENCH_WS_IDLE_TIMEOUT": str(idle_timeout)},
        capture_output=True,
        text=True,
        check=True,
    )
    key = json.loads(setup.stdout.strip().splitlines()[-1])["key"]
    headers = {"X-API-Key": key}
    direct = f"ws://127.0.0.1:{upstream_port}/echo"
    through = f"ws://127.0.0.1:{gateway_port}/bench-ws/echo"
    gunicorn = str(VENV_BIN / "gunicorn")
    gateway_args = [gunicorn, "apimgmt.wsgi:application", "--config", "gunicorn.conf.py", "--bind"]
    report: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count()}
    upstream = [str(VENV_BIN / "python"), "-m", "bench.websocket", "upstream", str(upstream_port)]
    with process(upstream) as echo:
        with process(
            [*gateway_args, f"127.0.0.1:{gateway_port}", "--workers", "2"], env=env, log=workdir / "gw.log"
        ) as gw:
            _wait(through, headers)
            _measure(through, headers, 4, 1, {})  # warm-up
            rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
            for _ in range(repeat):
                rounds["direct"].append(_measure(direct, {}, connections, duration, {"upstream": echo.pid}))
                rounds["gateway"].append(
                    _measure(through, headers, connections, duration, {"upstream": echo.pid, "gateway": gw.pid})
                )
            medians = {
                name: {
                    **{
                        field: statistics.median(r[field] for r in runs)
                        for field in runs[0]
                        if field.endswith(("per_second", "_ms", "per_round_trip"))
                    },
                    "runs": runs,
                }
                for name, runs in rounds.items()
            }
            report["round_trips"] = {"connections": connections, "duration_s": duration, **medians}
            report["gateway_vs_direct"] = round(medians["gateway"]["per_second"] / medians["direct"]["per_second"], 2)
            report["gateway_vs_direct_per_round"] = [
                round(g["per_second"] / d["per_second"], 2)
                for g, d in zip(rounds["gateway"], rounds["direct"], strict=True)
            ]
        if idle:
            idle_port = free_port()
            with process(
                [*gateway_args, f"127.0.0.1:{idle_port}", "--workers", "1"], env=env, log=workdir / "idle.log"
            ) as gw:
                url = f"ws://127.0.0.1:{idle_port}/bench-ws/echo"
                _wait(url, headers)
                before = rss_mib(gw.pid)
                waiting = _client("idle", url, json.dumps(headers), str(idle), str(idle_timeout))
                assert waiting.stdin is not None and waiting.stdout is not None
                json.loads(waiting.stdout.readline())
                after = rss_mib(gw.pid)
                waiting.stdin.write("\n")
                waiting.stdin.flush()
                out, _ = waiting.communicate(timeout=idle_timeout + 180)
                report["idle"] = {
                    **json.loads(out.strip().splitlines()[-1]),
                    "idle_timeout_s": idle_timeout,
                    "worker_rss_mib_before": before,
                    "worker_rss_mib_with_connections": after,
                    "rss_growth_mib": round(sum(after) - sum(before), 1),
                }
    report["verdicts"] = verdicts(report)
    shutil.rmtree(workdir, ignore_errors=True)
    return report


# Issue 16's targets: echo round trips through the gateway at least this share of the direct rate; 2,000 idle
# connections grow the worker by less than this; each is closed (1008) no later than this after its idle timeout.
TARGETS = {"gateway_vs_direct_min": 0.40, "rss_growth_mib_max": 100.0, "idle_close_late_s_max": 1.0}
# Pings per idle timeout from each idle client: they pass through the gateway and must not keep it open.
HEARTBEATS = 6


def verdicts(report: dict[str, Any]) -> dict[str, bool]:
    """Each target met or not (a measurement that was skipped has no verdict)."""
    found: dict[str, bool] = {}
    if "gateway_vs_direct" in report:
        found["round_trips"] = report["gateway_vs_direct"] >= TARGETS["gateway_vs_direct_min"]
    idle = report.get("idle")
    if idle:
        found["idle_rss"] = idle["open_when_measured"] == idle["connections"] and (
            idle["rss_growth_mib"] < TARGETS["rss_growth_mib_max"]
        )
        # Closed by the gateway with 1008 although pings kept flowing, none early (the gateway's clock starts just
        # before the client's) and none later than the target.
        found["idle_timeout"] = (
            idle["closed_1008"] == idle["connections"]
            and idle["earliest_close_after_timeout_s"] > -0.2
            and idle["latest_close_after_timeout_s"] <= TARGETS["idle_close_late_s_max"]
        )
    return found


def summary(report: dict[str, Any]) -> list[str]:
    """The rows make bench and make bench-websocket print."""
    lines = []
    verdict = report.get("verdicts", {})

    def mark(name: str) -> str:
        return "" if name not in verdict else ("  PASS" if verdict[name] else "  FAIL")

    trips = report.get("round_trips")
    if trips:
        direct, through = trips["direct"], trips["gateway"]
        lines.append(
            f"websocket echo c{trips['connections']}: direct {direct['per_second']:.0f}/s, gateway "
            f"{through['per_second']:.0f}/s (p50 {through['p50_ms']:.2f} ms), ratio {report['gateway_vs_direct']:.2f} "
            f"(per round {report['gateway_vs_direct_per_round']}; target >= {TARGETS['gateway_vs_direct_min']:.2f})"
            f"{mark('round_trips')}"
        )
        lines.append(
            f"websocket gateway CPU per round trip: {through.get('gateway_cpu_us_per_round_trip', 0):.1f} us "
            f"(runs: {[r.get('gateway_cpu_us_per_round_trip') for r in through['runs']]})"
        )
    idle = report.get("idle")
    if idle:
        lines.append(
            f"websocket idle: {idle['connections']} connections on one worker ({idle['open_when_measured']} open when "
            f"measured), RSS +{idle['rss_growth_mib']:.1f} MiB (target < {TARGETS['rss_growth_mib_max']:.0f})"
            f"{mark('idle_rss')}"
        )
        lines.append(
            f"websocket idle timeout {idle['idle_timeout_s']:g} s with a ping every {idle['heartbeat_s']:g} s: "
            f"{idle['closed_1008']} closed 1008, {idle['earliest_close_after_timeout_s']:+.3f} to "
            f"{idle['latest_close_after_timeout_s']:+.3f} s after the timeout "
            f"(target <= {TARGETS['idle_close_late_s_max']:g} s){mark('idle_timeout')}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--idle", type=int, default=2000, help="idle connections on one worker (0: skip)")
    parser.add_argument("--idle-timeout", type=float, default=30.0)
    options = parser.parse_args()
    report = run(
        duration=options.duration,
        repeat=options.repeat,
        connections=options.connections,
        idle=options.idle,
        idle_timeout=options.idle_timeout,
    )
    print(json.dumps(report, indent=2))
    print("\n".join(summary(report)))
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"bench-websocket-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json").write_text(
        json.dumps(report, indent=2) + "\n"
    )
    if not all(report["verdicts"].values()):
        raise SystemExit(1)


def _wait(url: str, headers: dict[str, str], timeout: float = 30) -> None:
    from websockets.sync.client import connect

    deadline = time.monotonic() + timeout
    while True:
        try:
            with connect(url, additional_headers=headers, proxy=None, open_timeout=5):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def setup(upstream: str) -> None:
    """The bench tenant's WebSocket API (cap and idle timeout for the idle run), subscribed; prints the key."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apimgmt.settings")
    django.setup()
    from apimgmt import services
    from apimgmt.models import Api, Tenant

    tenant = Tenant.objects.filter(pk="bench").first() or services.tenant_create(id="bench", name="Bench", actor=None)
    Api.objects.filter(tenant=tenant, base_path="/bench-ws").delete()
    api = services.api_create(
        tenant=tenant,
        api_name="bench-ws",
        base_path="/bench-ws",
        upstream_url=upstream,
        status="active",
        websocket=True,
        websocket_max_connections=100_000,
        websocket_idle_timeout=float(os.environ["BENCH_WS_IDLE_TIMEOUT"]),
        actor=None,
    )
    consumer = services.consumer_create(tenant=tenant, name=f"bench-ws-{api.id}", actor=None)
    services.subscription_request(consumer=consumer, api=api, actor=None)
    _, key = services.api_key_create(consumer=consumer, actor=None)
    print(json.dumps({"key": key}))


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "upstream":
        asyncio.run(_echo_server(int(sys.argv[2])))
    elif mode == "round-trips":
        result = asyncio.run(_round_trips(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
        print(json.dumps(result))
    elif mode == "idle":
        result = asyncio.run(_idle(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
        print(json.dumps(result))
    elif mode == "setup":
        setup(sys.argv[2])
    else:
        main()
