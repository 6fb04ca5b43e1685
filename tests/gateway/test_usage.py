"""Usage events, the spool that keeps them while Redis is down, the access log and readiness."""

from __future__ import annotations

import json
import logging
import re
import subprocess

import redis

from apimgmt.redis_client import reset_redis
from gateway.usage import STREAM_KEY, UsageRecorder
from tests.support.servers import free_port, wait_for_port


def _event(n: int) -> dict[str, str]:
    return {
        "rid": f"rid-{n}",
        "ts": "1.000",
        "tenant": "acme",
        "api": "api_x",
        "consumer": "",
        "key": "",
        "method": "GET",
        "status": "200",
        "bytes_in": "0",
        "bytes_out": "1",
        "latency_ms": "1.0",
        "upstream_ms": "",
    }


def _redis_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return proc


def test_events_are_spooled_while_redis_is_down_and_replayed_when_it_answers(settings, tmp_path):
    from prometheus_client import REGISTRY

    port = free_port()
    proc = _redis_server(port)
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    reset_redis()
    recorder = UsageRecorder(str(tmp_path / "spool"))
    recorder.record(_event(1))
    recorder.flush()
    proc.kill()
    proc.wait()
    before = REGISTRY.get_sample_value("api_usage_spooled_events_total") or 0
    recorder.record(_event(2))
    recorder.record(_event(3))
    recorder.flush()
    assert REGISTRY.get_sample_value("api_usage_spooled_events_total") - before == 2
    lines = recorder.spool_path().read_text().splitlines()
    assert [json.loads(line)["rid"] for line in lines] == ["rid-2", "rid-3"]

    proc = _redis_server(port)  # Redis is back (empty: a restart without persistence)
    try:
        reset_redis()
        recorder.record(_event(4))
        recorder.flush()
        client = redis.Redis(port=port)
        rids = [fields[b"rid"].decode() for _, fields in client.xrange(STREAM_KEY)]
        assert sorted(rids) == ["rid-2", "rid-3", "rid-4"]
        assert not recorder.spool_path().exists()
    finally:
        proc.kill()
        proc.wait()
        reset_redis()


def test_spool_of_a_dead_worker_is_replayed_at_start_up(redis_client, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    (spool / f"usage-{dead_pid}.jsonl").write_text(json.dumps(_event(7)) + "\n")
    recorder = UsageRecorder(str(spool))
    assert recorder.replay_spool(include_dead_workers=True) == 1
    assert redis_client.xlen(STREAM_KEY) == 1
    assert list(spool.iterdir()) == []


def test_access_log_line_has_the_request_facts_and_never_the_key(gateway, users_api, key, caplog):
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        gateway.get("/api/users/v1/x?secret=1", headers={"X-API-Key": key, "X-Request-ID": "log-req-00001"})
    (record,) = [r for r in caplog.records if r.name == "gateway.access"]
    assert record.request_id == "log-req-00001"
    assert record.tenant == "acme" and record.api == users_api.id and record.status == 200
    assert record.path == "/api/users/v1" and record.method == "GET"
    assert record.key_prefix == key[:12]
    assert record.upstream_ms is not None and record.duration_ms >= record.upstream_ms
    assert key not in json.dumps(record.__dict__, default=str)


def test_ready_reports_the_route_table(gateway, users_api):
    response = gateway.get("/ready")
    assert response.status == 200
    assert response.json()["checks"]["route_table"] == "ok"


def test_fast_access_line_has_the_same_shape_as_every_other_json_log_line():
    import io

    from apimgmt.logs import JsonFormatter, RequestIdFilter
    from gateway.accesslog import AccessLog

    access = logging.getLogger("gateway.access")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    saved = (access.handlers[:], access.propagate, access.level)
    access.handlers, access.propagate = [handler], False
    access.setLevel(logging.INFO)
    fields = {"request_id": "rid-0000001", "tenant": "acme", "status": 200, "duration_ms": 1.5, "upstream_ms": None}
    try:
        AccessLog().write(dict(fields))  # only JSON stream handlers: written directly
        access.info("request", extra=dict(fields))  # the logging path, for comparison
    finally:
        access.handlers, access.propagate = saved[0], saved[1]
        access.setLevel(saved[2])
    fast, slow = (json.loads(line) for line in stream.getvalue().splitlines())
    timestamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
    assert timestamp.match(fast.pop("time")) and timestamp.match(slow.pop("time"))
    assert fast == slow
    assert list(fast) == ["level", "logger", "message", "request_id", "tenant", "status", "duration_ms", "upstream_ms"]
