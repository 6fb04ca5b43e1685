"""Usage accounting in the gateway: minute buckets summed per worker, added into Redis about once a second.

Per request a worker only adds to an in-memory bucket of (tenant, api, consumer, key, minute, status). A background
thread sends each tenant's buckets with one script call (gateway/usage.lua) about once a second; the layout is the
contract in apimgmt/usage_buckets.py. Each call is a numbered batch of this worker, applied at most once: when a
reply is lost or Redis is down, the batch is kept (and written to a spool file) and sent again, and meanwhile new
traffic is summed into the same in-memory buckets, so the spool grows with buckets, never with requests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from django.conf import settings

from apimgmt import usage_buckets as contract
from apimgmt.redis_client import get_redis
from gateway import metrics

logger = logging.getLogger(__name__)

SCRIPT = Path(__file__).with_name("usage.lua").read_text()
FLUSH_EVERY_SECONDS = 1.0
# How often a worker re-adds its tenants to the flusher's index (usage:tenants).
ANNOUNCE_EVERY_SECONDS = 30.0
SPOOL_VERSION = 1

# (tenant, api, consumer, key, minute, status) -> the numbers of contract.METRICS
BucketKey = tuple[str, str, str, str, int, int]
# Within one tenant: (minute, field) -> numbers
TenantBuckets = dict[tuple[int, str], list[int]]


@dataclass
class Batch:
    """One tenant's buckets as one numbered batch of one worker: applied once, however often it is sent."""

    worker: str
    number: int
    tenant: str
    buckets: TenantBuckets

    def as_json(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "number": self.number,
            "tenant": self.tenant,
            "buckets": _buckets_as_json(self.buckets),
        }


def _buckets_as_json(buckets: TenantBuckets) -> list[list[Any]]:
    return [[minute, field, values] for (minute, field), values in buckets.items()]


def _buckets_from_json(rows: list[list[Any]]) -> TenantBuckets:
    return {(int(minute), str(field)): [int(v) for v in values] for minute, field, values in rows}


def _merge_into(target: TenantBuckets, source: TenantBuckets) -> None:
    for key, values in source.items():
        existing = target.get(key)
        if existing is None:
            target[key] = list(values)
        else:
            contract.merge(existing, values)


class UsageRecorder:
    """One worker's usage buckets, their batches in flight, and the spool that keeps both while Redis is away."""

    def __init__(self, spool_dir: str | None = None) -> None:
        self.lock = threading.Lock()  # guards ``current`` (the request path writes, the flush thread swaps)
        self.current: dict[BucketKey, list[int]] = {}
        self.flush_lock = threading.Lock()  # one flush at a time (the background thread, stop())
        self.unsent: dict[str, TenantBuckets] = {}  # summed, in no batch yet
        self.unresolved: dict[str, list[Batch]] = {}  # sent (or tried) without a confirmed answer, oldest first
        self.spool_dir = Path(spool_dir or settings.GATEWAY["USAGE_SPOOL_DIR"])
        self.pid = 0
        self.worker = ""
        self.last_number = 0
        self.thread: threading.Thread | None = None
        self.stopped = threading.Event()
        self._apply: Any = None
        self.announced: dict[str, float] = {}  # tenant -> when this worker last added it to usage:tenants
        self._new_worker()

    def _new_worker(self) -> None:
        """A fresh identity for this process: batches are numbered per worker."""
        self.pid = os.getpid()
        self.worker = f"{secrets.token_hex(8)}"
        self.last_number = 0

    # -- hot path -------------------------------------------------------------------------------------------------

    def record(
        self,
        tenant: str,
        api: str,
        consumer: str,
        key: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        latency_s: float,
        upstream_s: float | None,
        now: float,
    ) -> None:
        """Count one finished request into its minute bucket (a dict update; no I/O)."""
        bucket_key = (tenant, api, consumer, key, int(now // 60) * 60, status)
        latency = int(latency_s * 1_000_000)
        upstream = int(upstream_s * 1_000_000) if upstream_s is not None else 0
        error = 1 if status >= 500 else 0
        with self.lock:
            bucket = self.current.get(bucket_key)
            if bucket is None:
                self.current[bucket_key] = [1, error, bytes_in, bytes_out, latency, latency, upstream, 0, 0, 0, 0]
            else:
                bucket[0] += 1
                bucket[1] += error
                bucket[2] += bytes_in
                bucket[3] += bytes_out
                bucket[4] += latency
                if latency > bucket[5]:
                    bucket[5] = latency
                bucket[6] += upstream

    def add_connection(
        self,
        tenant: str,
        api: str,
        consumer: str,
        key: str,
        status: int,
        now: float,
        *,
        opened: int,
        open_us: int,
        messages_in: int,
        messages_out: int,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """A WebSocket connection's share of ``now``'s minute (its handshake was counted as a request by
        ``record``): connections opened, microseconds open, messages and their bytes each way since its last share."""
        bucket_key = (tenant, api, consumer, key, int(now // 60) * 60, status)
        with self.lock:
            bucket = self.current.get(bucket_key)
            if bucket is None:
                bucket = self.current[bucket_key] = contract.empty()
            bucket[2] += bytes_in
            bucket[3] += bytes_out
            bucket[contract.CONNECTION_COUNT] += opened
            bucket[contract.CONNECTION_US] += open_us
            bucket[contract.MESSAGES_IN] += messages_in
            bucket[contract.MESSAGES_OUT] += messages_out

    # -- background -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start this worker's flush thread (idempotent; restarted in a forked child with a new identity)."""
        if self.thread is not None and self.thread.is_alive() and self.pid == os.getpid():
            return
        if self.pid != os.getpid():
            self._new_worker()
            with self.lock:
                self.current.clear()  # the parent's, counted by the parent
            self.unsent.clear()
            self.unresolved.clear()
        self.stopped.clear()
        self.thread = threading.Thread(target=self._run, name="usage-flusher", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Send what is left (or spool it) before the worker exits."""
        self.stopped.set()
        self.flush()

    def _run(self) -> None:
        try:
            self.adopt_dead_spools()
        except Exception:
            logger.exception("could not adopt the usage spools of stopped workers")
        while not self.stopped.wait(FLUSH_EVERY_SECONDS):
            try:
                self.flush()
            except Exception:
                logger.exception("usage flush iteration failed")

    def _absorb(self) -> int:
        """Move the request path's buckets into ``unsent``; returns how many requests they count."""
        with self.lock:
            taken, self.current = self.current, {}
        requests = 0
        for (tenant, api, consumer, key, minute, status), values in taken.items():
            field = contract.Dimension(api, consumer, key, status).field()
            tenant_buckets = self.unsent.setdefault(tenant, {})
            existing = tenant_buckets.get((minute, field))
            if existing is None:
                tenant_buckets[(minute, field)] = values
            else:
                contract.merge(existing, values)
            requests += values[0]
        return requests

    def flush(self, client: redis.Redis | None = None) -> None:
        """Send every tenant's buckets (older unanswered batches first); on failure keep them and spool them."""
        with self.flush_lock:
            absorbed = self._absorb()
            if not self.unsent and not self.unresolved:
                return
            client = client or get_redis()
            if client is None:
                self.unsent.clear()  # no Redis configured: usage is not collected (development)
                return
            recovering = self.spool_path().exists()
            try:
                self._send(client, recovering=recovering)
            except redis.RedisError as exc:
                logger.warning("usage buckets not sent (%s: %s); kept and spooled", exc.__class__.__name__, exc)
                metrics.usage_spooled_events.inc(absorbed)
            if self.unsent or self.unresolved:
                self._write_spool()
            elif recovering:
                with contextlib.suppress(FileNotFoundError):
                    self.spool_path().unlink()

    def _send(self, client: redis.Redis, *, recovering: bool) -> None:
        """Per tenant: its unanswered batches, oldest first, then one new batch of what was summed since.

        A tenant's new batch waits until its older ones are settled: batch numbers must reach Redis in order, or a
        late older batch would be taken for one already applied. While a spool exists (Redis failed recently), a new
        batch is on disk with its number before it is sent, so a crash cannot leave it both applied and unsent.
        """
        apply = self._script(client)
        tenants = sorted(set(self.unresolved) | set(self.unsent))
        now = time.monotonic()
        unannounced = [
            t for t in tenants if now - self.announced.get(t, -ANNOUNCE_EVERY_SECONDS) >= ANNOUNCE_EVERY_SECONDS
        ]
        if unannounced:
            # A key of its own, never in a tenant's multi-key call; repeated now and then (Redis may have restarted).
            client.sadd(contract.TENANTS_KEY, *unannounced)
            self.announced.update(dict.fromkeys(unannounced, now))
        for tenant in tenants:
            batches = self.unresolved.get(tenant, [])
            while batches:
                keys, args = _script_args(batches[0])
                apply(keys=keys, args=args)
                batches.pop(0)
            self.unresolved.pop(tenant, None)
            buckets = self.unsent.pop(tenant, None)
            if not buckets:
                continue
            self.last_number += 1
            batch = Batch(self.worker, self.last_number, tenant, buckets)
            self.unresolved[tenant] = [batch]
            if recovering:
                self._write_spool()
            keys, args = _script_args(batch)
            apply(keys=keys, args=args)
            del self.unresolved[tenant]

    def _script(self, client: redis.Redis) -> Any:
        """The apply script, bound to ``client`` (EVALSHA, falling back to EVAL after a Redis restart)."""
        if self._apply is None or self._apply.registered_client is not client:
            self._apply = client.register_script(SCRIPT)
        return self._apply

    # -- spool ----------------------------------------------------------------------------------------------------

    def spool_path(self) -> Path:
        return self.spool_dir / f"usage-{os.getpid()}.json"

    def _write_spool(self) -> None:
        """Write unanswered batches and unsent buckets to this worker's spool file (replaced atomically)."""
        state = {
            "version": SPOOL_VERSION,
            "batches": [b.as_json() for batches in self.unresolved.values() for b in batches],
            "unsent": {tenant: _buckets_as_json(buckets) for tenant, buckets in self.unsent.items()},
        }
        path = self.spool_path()
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp")
            tmp.write_text(json.dumps(state, separators=(",", ":")), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            logger.exception("could not write the usage spool %s; buckets stay in memory", path)

    def adopt_dead_spools(self) -> int:
        """Take over the spool files of workers that are gone: their batches and buckets are sent by this one."""
        if not self.spool_dir.is_dir():
            return 0
        adopted = 0
        for path in sorted(self.spool_dir.glob("usage-*.json")):
            if _owner_alive(path):
                continue
            claimed = path.with_name(f"{path.name}.adopted-{os.getpid()}")
            try:
                os.rename(path, claimed)  # atomic: no two workers adopt the same file
            except OSError:
                continue
            try:
                state = json.loads(claimed.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                logger.exception("usage spool %s unreadable; left in place as %s", path.name, claimed.name)
                continue
            with self.flush_lock:
                for raw in state.get("batches", []):
                    batch = Batch(raw["worker"], int(raw["number"]), raw["tenant"], _buckets_from_json(raw["buckets"]))
                    # Another worker's batches keep their worker and number; they go before this worker's own.
                    self.unresolved.setdefault(batch.tenant, []).insert(0, batch)
                for tenant, rows in state.get("unsent", {}).items():
                    _merge_into(self.unsent.setdefault(tenant, {}), _buckets_from_json(rows))
                self._write_spool()  # now ours: the file of the dead worker may go
            claimed.unlink(missing_ok=True)
            adopted += 1
        adopted += self._adopt_previous_release_spools()
        if adopted:
            self.flush()
        return adopted

    def _adopt_previous_release_spools(self) -> int:
        """Spool files of the previous release (``usage-<pid>.jsonl``, one JSON event per line): counted in here."""
        adopted = 0
        for path in sorted(self.spool_dir.glob("usage-*.jsonl")):
            if _owner_alive(path):
                continue
            claimed = path.with_name(f"{path.name}.adopted-{os.getpid()}")
            try:
                os.rename(path, claimed)
                lines = claimed.read_text(encoding="utf-8").splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    event = json.loads(line)
                    upstream = event.get("upstream_ms") or ""
                    self.record(
                        str(event["tenant"]),
                        str(event.get("api", "")),
                        str(event.get("consumer", "")),
                        str(event.get("key", "")),
                        int(event["status"]),
                        int(float(event.get("bytes_in") or 0)),
                        int(float(event.get("bytes_out") or 0)),
                        float(event.get("latency_ms") or 0) / 1000,
                        float(upstream) / 1000 if upstream else None,
                        float(event["ts"]),
                    )
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a torn last line from a crash
            with self.flush_lock:
                self._absorb()
                self._write_spool()  # now ours: the old file may go
            claimed.unlink(missing_ok=True)
            adopted += 1
        return adopted


def _script_args(batch: Batch) -> tuple[list[str], list[Any]]:
    by_minute: dict[int, list[tuple[str, list[int]]]] = {}
    for (minute, field), values in batch.buckets.items():
        by_minute.setdefault(minute, []).append((field, values))
    keys = [contract.worker_key(batch.tenant, batch.worker), contract.dirty_key(batch.tenant)]
    args: list[Any] = [batch.number, contract.WORKER_MARK_TTL_SECONDS]
    for minute in sorted(by_minute):
        keys.append(contract.minute_key(batch.tenant, minute))
        args += [minute, len(by_minute[minute])]
        for field, values in by_minute[minute]:
            args += [field, contract.encode(values)]
    return keys, args


def _owner_alive(path: Path) -> bool:
    try:
        pid = int(path.name.split("-", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
