"""Review of the cache lookup that rides on the limiter's write, on a real Redis Cluster whose tenant slot moves
while requests flow (MOVED, ASK and TRYAGAIN for both the limiter's script and the cache's GET): hits are still
served, each request is counted once, and no connection is left out of step (a 500, or someone else's answer)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from apimgmt import services
from apimgmt.models import ApiKey, Consumer, Tenant
from tests.gateway.conftest import publish, subscribe
from tests.gateway.upstreams import Answer, Recorder, Seen, recording_upstream
from tests.scale.test_topologies import _cluster, _point_this_process_at, _serve, _until, cluster  # noqa: F401
from tests.support.redis_topologies import LocalCluster

pytestmark = [pytest.mark.redis_topology, pytest.mark.timeout(240)]

URL_PATH = "/api/users/v1/items"


def _cached_answer(recorder: Recorder) -> None:
    def respond(seen: Seen) -> Answer:
        return Answer(
            headers=[("Content-Type", "text/plain"), ("Cache-Control", "max-age=300")],
            body=f"answer {len(recorder.seen)}".encode(),
        )

    recorder.respond = respond


def test_cluster_slot_moved_while_cache_hits_flow_hits_are_counted_once_and_stay_in_step(
    cluster: LocalCluster,  # noqa: F811
    live_env: dict[str, str],
    tmp_path: Path,
    settings: Any,
    acme: Tenant,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
) -> None:
    _point_this_process_at(settings, cluster.url)
    _, key = bob_key
    with recording_upstream() as upstream, _serve(live_env, tmp_path, cluster.url) as base:
        _cached_answer(upstream)
        quota = services.policy_create(
            tenant=acme,
            name="q",
            policy_type="quota",
            config={"requests_per_day": 300},
            on_store_error="closed",
            actor=None,
        )
        cache = services.policy_create(
            tenant=acme, name="cache", policy_type="response_cache", config={"ttl_seconds": 300}, actor=None
        )
        api = publish(acme, upstream.url, policies=[quota, cache])
        subscribe(bob_app, api)
        url = base + URL_PATH
        _until(lambda: requests.get(url, headers={"X-API-Key": key}, timeout=15).status_code == 200, 10)
        answers: list[tuple[int, str | None, bytes]] = []
        lock = threading.Lock()

        def worker() -> None:
            with requests.Session() as session:
                for _ in range(100):
                    r = session.get(url, headers={"X-API-Key": key}, timeout=15)
                    with lock:
                        answers.append((r.status_code, r.headers.get("X-Cache"), r.content))

        moved: list[tuple[int, int]] = []
        mover = threading.Timer(0.3, lambda: moved.append(cluster.migrate_slot_of("rc:{acme}:x", pause=0.02)))
        threads = [threading.Thread(target=worker) for _ in range(8)]
        mover.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        mover.join()

        assert moved and cluster.master_port_of("rc:{acme}:x") == moved[0][1]
        statuses = Counter(status for status, _cache, _body in answers)
        assert statuses == Counter({200: 299, 429: 501}), statuses  # the warm-up took 1 of the 300
        served = {(cache_state, body) for status, cache_state, body in answers if status == 200}
        assert served <= {("HIT", b"answer 1"), ("MISS", b"answer 2"), ("MISS", b"answer 3")}, served
        assert all(b"answer" not in body for status, _cache, body in answers if status != 200)
