"""Usage buckets of a worker, the spool that keeps them while Redis is down, the access log and readiness."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import time

import redis

from apimgmt import usage_buckets as contract
from apimgmt.redis_client import reset_redis
from gateway.usage import UsageRecorder
from tests.support.servers import free_port, wait_for_port


def _count(recorder: UsageRecorder, n: int, *, minute: int, status: int = 200) -> None:
    for i in range(n):
        recorder.record("acme", "api_x", "con_a", "key_a", status, 0, 1, 0.001, None, minute + i % 60)


def _stored(client: redis.Redis, minute: int) -> int:
    """Requests counted in Redis for acme's minute (the bucket hash the flusher copies)."""
    return sum(contract.decode(v.decode())[0] for v in client.hvals(contract.minute_key("acme", minute)))


def _redis_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return proc


def test_buckets_are_spooled_while_redis_is_down_and_sent_when_it_answers(settings, tmp_path):
    from prometheus_client import REGISTRY

    port = free_port()
    proc = _redis_server(port)
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    reset_redis()
    minute = contract.minute_of(time.time())
    recorder = UsageRecorder(str(tmp_path / "spool"))
    _count(recorder, 1, minute=minute)
    recorder.flush()
    proc.kill()
    proc.wait()
    before = REGISTRY.get_sample_value("api_usage_spooled_events_total") or 0
    for _ in range(5):  # five failed flushes of 2,000 requests each: still one bucket on disk
        _count(recorder, 2000, minute=minute)
        recorder.flush()
    assert REGISTRY.get_sample_value("api_usage_spooled_events_total") - before == 10_000
    spool = json.loads(recorder.spool_path().read_text())
    buckets = [b for batch in spool["batches"] for b in batch["buckets"]] + spool["unsent"].get("acme", [])
    assert sum(values[0] for _minute, _field, values in buckets) == 10_000
    assert len(buckets) <= 2, "the spool holds buckets, not requests"
    assert recorder.spool_path().stat().st_size < 1000

    proc = _redis_server(port)  # Redis is back (empty: a restart without persistence)
    try:
        reset_redis()
        _count(recorder, 4, minute=minute)
        recorder.flush()
        assert _stored(redis.Redis(port=port), minute) == 10_004
        assert not recorder.spool_path().exists()
        assert not recorder.unresolved and not recorder.unsent
    finally:
        proc.kill()
        proc.wait()
        reset_redis()


def test_a_batch_whose_answer_was_lost_is_applied_once(settings, tmp_path):
    port = free_port()
    proc = _redis_server(port)
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    reset_redis()
    minute = contract.minute_of(time.time())
    recorder = UsageRecorder(str(tmp_path / "spool"))
    try:
        _count(recorder, 1, minute=minute)
        recorder.flush()
        _count(recorder, 299, minute=minute)
        proc.send_signal(signal.SIGSTOP)  # the batch is written, Redis runs it only when it wakes up
        recorder.flush()
        assert recorder.unresolved, "no answer: the batch is kept"
        _count(recorder, 50, minute=minute)
        recorder.flush()
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.2)
        recorder.flush()  # sends the kept batch again (applied already: skipped), then the 50
        recorder.flush()
        assert _stored(redis.Redis(port=port), minute) == 350
        assert not recorder.unresolved and not recorder.unsent
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
        reset_redis()


def test_spool_of_a_dead_worker_is_adopted_at_start_up(redis_client, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    minute = contract.minute_of(time.time())
    field = contract.Dimension("api_x", "con_a", "key_a", 200).field()
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    state = {
        "version": 1,
        "batches": [
            {"worker": "dead", "number": 9, "tenant": "acme", "buckets": [[minute, field, [5, 0, 0, 5, 5, 1, 0]]]}
        ],
        "unsent": {"acme": [[minute, field, [2, 0, 0, 2, 2, 1, 0]]]},
    }
    (spool / f"usage-{dead_pid}.json").write_text(json.dumps(state))
    # The dead worker's batch 9 had reached Redis before it died: adopting it must not count it again.
    redis_client.set(contract.worker_key("acme", "dead"), 9)

    recorder = UsageRecorder(str(spool))
    assert recorder.adopt_dead_spools() == 1

    assert _stored(redis_client, minute) == 2
    assert list(spool.iterdir()) == []


def test_spool_of_a_dead_worker_of_the_previous_release_is_counted(redis_client, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    minute = contract.minute_of(time.time())
    dead_pid = 2**22 + 12346
    events = [
        {
            "rid": f"r{i}",
            "ts": f"{minute + i:.3f}",
            "tenant": "acme",
            "api": "api_x",
            "consumer": "con_a",
            "key": "key_a",
            "method": "GET",
            "status": "200",
            "bytes_in": "0",
            "bytes_out": "1",
            "latency_ms": "1.000",
            "upstream_ms": "",
        }
        for i in range(3)
    ]
    (spool / f"usage-{dead_pid}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"torn')

    assert UsageRecorder(str(spool)).adopt_dead_spools() == 1

    assert _stored(redis_client, minute) == 3
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
