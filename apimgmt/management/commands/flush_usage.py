"""``manage.py flush_usage [--follow]``: aggregate the gateway's usage events into am_usage_records."""

from __future__ import annotations

import signal
import time
from datetime import timedelta
from types import FrameType
from typing import Any

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections

from apimgmt import usage
from apimgmt.slow_queries import install_slow_query_logging

# How often --follow trims the stream and forgets old request ids.
TRIM_EVERY_SECONDS = 5.0
HOUSEKEEPING_EVERY_SECONDS = 600.0
SUMMARY_EVERY_SECONDS = 60.0


class FlusherMetrics:
    """The flusher's own /metrics (it serves no HTTP otherwise), in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.events = Counter(
            "apimgmt_usage_flusher_events",
            "Usage events read, by outcome (counted, duplicate, dropped).",
            ["outcome"],
            registry=self.registry,
        )
        self.backlog = Gauge(
            "apimgmt_usage_flusher_backlog_events",
            "Events in usage:events not yet acknowledged by the flushers (pending plus unread).",
            registry=self.registry,
        )
        self.last_success = Gauge(
            "apimgmt_usage_flusher_last_success_timestamp_seconds",
            "When this flusher last completed a read-count-acknowledge cycle (also when there was nothing to read).",
            registry=self.registry,
        )

    def serve(self, port: int) -> FlusherMetrics:
        from prometheus_client import start_http_server

        start_http_server(port, registry=self.registry)
        return self

    def observe(self, stats: usage.FlushStats) -> None:
        self.events.labels("counted").inc(stats.counted)
        self.events.labels("duplicate").inc(stats.duplicates)
        self.events.labels("dropped").inc(stats.dropped)
        self.last_success.set_to_current_time()


class Command(BaseCommand):
    help = (
        "Count the gateway's usage events (Redis stream usage:events) into per-minute usage records. "
        "Without --follow: everything there is now, then exit. With --follow: run until SIGTERM."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--follow", action="store_true", help="Keep running; stop cleanly on SIGTERM/SIGINT.")
        parser.add_argument("--batch-size", type=int, default=usage.DEFAULT_BATCH_SIZE, help="Events per transaction.")
        parser.add_argument("--block-ms", type=int, default=1000, help="--follow: longest wait for new events.")
        parser.add_argument(
            "--claim-idle-seconds",
            type=float,
            default=usage.DEFAULT_CLAIM_IDLE.total_seconds(),
            help="Take over another flusher's unacknowledged events after they were idle this long.",
        )
        parser.add_argument(
            "--seen-retention-hours",
            type=float,
            default=usage.DEFAULT_SEEN_RETENTION.total_seconds() / 3600,
            help="How long processed request ids are remembered (and so how old a replayed event may be).",
        )
        parser.add_argument("--consumer", default="", help="Name in the consumer group (default: host-pid).")
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=0,
            help="--follow: serve the flusher's Prometheus metrics (backlog, last success) on this port.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            raise CommandError("REDIS_URL is not set: without Redis there is no usage stream to flush")
        if options["batch_size"] < 1 or options["block_ms"] < 1:
            raise CommandError("--batch-size and --block-ms must be at least 1")
        if options["claim_idle_seconds"] < 0 or options["seen_retention_hours"] <= 0:
            raise CommandError("--claim-idle-seconds must be >= 0 and --seen-retention-hours > 0")
        install_slow_query_logging()
        flusher = usage.UsageFlusher(
            client=usage.flusher_redis(settings.REDIS_URL, block_ms=options["block_ms"]),
            consumer=options["consumer"] or usage.default_consumer_name(),
            batch_size=options["batch_size"],
            claim_idle=timedelta(seconds=options["claim_idle_seconds"]),
            seen_retention=timedelta(hours=options["seen_retention_hours"]),
        )
        if options["follow"]:
            metrics = FlusherMetrics().serve(options["metrics_port"]) if options["metrics_port"] else None
            self._follow(flusher, block_ms=options["block_ms"], metrics=metrics)
            return
        try:
            stats = flusher.drain()
        except (redis.RedisError, DatabaseError) as exc:
            raise CommandError(f"flush failed, nothing was acknowledged that was not stored: {exc}") from exc
        usage.logger.info("usage flushed", extra=stats.as_dict())
        self.stdout.write(
            f"counted {stats.counted} events into {stats.buckets} bucket updates "
            f"({stats.duplicates} duplicates skipped, {stats.dropped} dropped)"
        )

    def _follow(self, flusher: usage.UsageFlusher, *, block_ms: int, metrics: FlusherMetrics | None) -> None:
        stopping = False

        def stop(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        usage.logger.info("usage flusher started", extra={"consumer": flusher.consumer})
        total = usage.FlushStats()
        backoff = 0.0
        last_trim = last_housekeeping = last_summary = time.monotonic()
        group_ready = False
        while not stopping:
            try:
                if not group_ready:
                    flusher.ensure_group()
                    group_ready = True
                # The batch in hand is always finished (committed and acknowledged) before a stop.
                stats = flusher.flush_once(block_ms=block_ms)
                total.add(stats)
                now = time.monotonic()
                if now - last_trim >= TRIM_EVERY_SECONDS:
                    flusher.trim()
                    last_trim = now
                if metrics is not None:
                    metrics.backlog.set(flusher.backlog())
                    metrics.observe(stats)
                if now - last_housekeeping >= HOUSEKEEPING_EVERY_SECONDS:
                    flusher.purge_seen()
                    flusher.forget_idle_consumers()
                    last_housekeeping = now
                if now - last_summary >= SUMMARY_EVERY_SECONDS and total.read:
                    usage.logger.info("usage flushed", extra={**total.as_dict(), "backlog": flusher.backlog()})
                    total = usage.FlushStats()
                    last_summary = now
                backoff = 0.0
            except (redis.RedisError, DatabaseError) as exc:
                # Nothing unstored was acknowledged: the batch stays pending and is read again.
                backoff = min(max(backoff * 2, 0.2), 5.0)
                usage.logger.warning(
                    "usage flush failed, retrying in %.1fs: %s: %s", backoff, exc.__class__.__name__, exc
                )
                if isinstance(exc, DatabaseError):
                    connections[flusher.using].close()
                self._sleep(backoff, lambda: stopping)
        flusher.client.close()
        usage.logger.info("usage flusher stopped", extra=total.as_dict())

    @staticmethod
    def _sleep(seconds: float, stopped: Any) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stopped():
            time.sleep(0.05)
