"""``manage.py flush_usage [--follow]``: copy the gateway's usage buckets from Redis into the usage tables."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from apimgmt import usage, usage_partitions
from apimgmt.management import loop
from apimgmt.slow_queries import install_slow_query_logging

# How often --follow creates partitions ahead, drops expired ones and forgets old copy tokens.
HOUSEKEEPING_EVERY_SECONDS = 600.0
SUMMARY_EVERY_SECONDS = 60.0


class FlusherMetrics(loop.CommandMetrics):
    """The flusher's own /metrics (it serves no HTTP otherwise), in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        super().__init__()
        self.requests = Counter(
            "apimgmt_usage_flusher_requests",
            "Requests copied from Redis usage buckets into am_usage_records, by outcome (counted, dropped).",
            ["outcome"],
            registry=self.registry,
        )
        self.minutes = Counter(
            "apimgmt_usage_flusher_minutes",
            "Claimed tenant-minutes, by outcome (copied, skipped: copied before by a flusher that stopped).",
            ["outcome"],
            registry=self.registry,
        )
        self.lag = Gauge(
            "apimgmt_usage_flusher_lag_seconds",
            "How long the oldest minute still waiting in Redis has been closed (0: every closed minute is stored).",
            registry=self.registry,
        )
        self.backlog = Gauge(
            "apimgmt_usage_flusher_backlog_minutes",
            "Tenant-minutes of usage buckets in Redis not yet copied (the minute in progress included).",
            registry=self.registry,
        )
        self.last_success = Gauge(
            "apimgmt_usage_flusher_last_success_timestamp_seconds",
            "When this flusher last completed a round over every tenant (also when there was nothing to copy).",
            registry=self.registry,
        )

    def observe(self, stats: usage.FlushStats) -> None:
        self.requests.labels("counted").inc(stats.requests)
        self.requests.labels("dropped").inc(stats.dropped)
        self.minutes.labels("copied").inc(stats.minutes)
        self.minutes.labels("skipped").inc(stats.skipped)
        self.last_success.set_to_current_time()


class Command(BaseCommand):
    help = (
        "Copy the gateway's per-minute usage buckets (Redis) into am_usage_records and the hourly and daily rollups. "
        "Without --follow: everything there is now (the minute in progress too), then exit. "
        "With --follow: each minute once it is over, until SIGTERM."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--follow", action="store_true", help="Keep running; stop cleanly on SIGTERM/SIGINT.")
        parser.add_argument(
            "--batch-size", type=int, default=usage.DEFAULT_BATCH_SIZE, help="Minutes of one tenant per transaction."
        )
        parser.add_argument("--block-ms", type=int, default=1000, help="--follow: pause between rounds.")
        parser.add_argument(
            "--claim-idle-seconds",
            type=float,
            default=usage.DEFAULT_LEASE.total_seconds(),
            help="Take over another flusher's claimed minutes when it has not finished them after this long.",
        )
        parser.add_argument(
            "--close-grace-seconds",
            type=float,
            default=usage.DEFAULT_CLOSE_GRACE.total_seconds(),
            help="--follow: copy a minute this long after it is over.",
        )
        parser.add_argument("--consumer", default="", help="This flusher's name in logs (default: host-pid).")
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=0,
            help="--follow: serve the flusher's Prometheus metrics (lag, backlog, last success) on this port.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            raise CommandError("REDIS_URL is not set: without Redis there are no usage buckets to flush")
        if options["batch_size"] < 1 or options["block_ms"] < 1:
            raise CommandError("--batch-size and --block-ms must be at least 1")
        if options["claim_idle_seconds"] < 0 or options["close_grace_seconds"] < 0:
            raise CommandError("--claim-idle-seconds and --close-grace-seconds must be >= 0")
        install_slow_query_logging()
        flusher = usage.UsageFlusher(
            client=usage.flusher_redis(settings.REDIS_URL, block_ms=options["block_ms"]),
            consumer=options["consumer"] or usage.default_consumer_name(),
            batch_size=options["batch_size"],
            lease=timedelta(seconds=options["claim_idle_seconds"]),
            close_grace=timedelta(seconds=options["close_grace_seconds"]),
        )
        if options["follow"]:
            metrics = FlusherMetrics().serve(options["metrics_port"]) if options["metrics_port"] else None
            self._follow(flusher, pause_ms=options["block_ms"], metrics=metrics)
            return
        try:
            stats = flusher.drain()
            dropped = drop_expired_partitions()
        except (redis.RedisError, DatabaseError) as exc:
            raise CommandError(f"flush failed, nothing was released that was not stored: {exc}") from exc
        usage.logger.info("usage flushed", extra=stats.as_dict())
        self.stdout.write(
            f"counted {stats.requests} requests from {stats.minutes} tenant-minutes into {stats.buckets} "
            f"minute buckets ({stats.skipped} minutes copied before, skipped; {stats.dropped} requests dropped)"
            + (f"; dropped partitions: {', '.join(dropped)}" if dropped else "")
        )

    def _follow(self, flusher: usage.UsageFlusher, *, pause_ms: int, metrics: FlusherMetrics | None) -> None:
        usage.logger.info("usage flusher started", extra={"consumer": flusher.consumer})
        total = usage.FlushStats()
        last_housekeeping = -HOUSEKEEPING_EVERY_SECONDS
        last_summary = time.monotonic()

        def round_() -> float:
            nonlocal total, last_housekeeping, last_summary
            now = time.monotonic()
            if now - last_housekeeping >= HOUSEKEEPING_EVERY_SECONDS:
                flusher.ensure_partitions()
                drop_expired_partitions()
                flusher.forget_copy_tokens()
                last_housekeeping = now
            # A claimed minute is always finished (committed and released) before a stop.
            stats = flusher.flush_once()
            total.add(stats)
            if metrics is not None:
                metrics.observe(stats)
                metrics.lag.set(flusher.lag_seconds())
                metrics.backlog.set(flusher.backlog_minutes())
            if now - last_summary >= SUMMARY_EVERY_SECONDS and (total.minutes or total.skipped):
                usage.logger.info("usage flushed", extra={**total.as_dict(), "lag_s": flusher.lag_seconds()})
                total = usage.FlushStats()
                last_summary = now
            return pause_ms / 1000

        # On an error nothing unstored was released: this flusher retries its claims on the next round (another one
        # takes them over when the lease ends, if this one stops).
        loop.follow(round_, logger=usage.logger, failure="usage flush failed", using=flusher.using)
        flusher.client.close()
        usage.logger.info("usage flusher stopped", extra=total.as_dict())


def drop_expired_partitions() -> list[str]:
    """USAGE_RETENTION_DAYS (0: keep everything): drop whole months of usage that ended before the cutoff."""
    days = int(getattr(settings, "USAGE_RETENTION_DAYS", 0) or 0)
    if days <= 0:
        return []
    return usage_partitions.drop_before(datetime.now(tz=UTC) - timedelta(days=days))
