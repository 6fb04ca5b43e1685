"""``manage.py deliver_events [--follow]``: send the event outbox to webhook endpoints and apply due plan changes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
from django.core.management.base import BaseCommand, CommandError, CommandParser
from redis.exceptions import RedisClusterException

from apimgmt import events, services, webhooks
from apimgmt.management import loop
from apimgmt.slow_queries import install_slow_query_logging

# How often --follow looks for keys crossing a key.expiring threshold and for plan changes that are due.
SCAN_EVERY_SECONDS = 30.0
# How often --follow reads the quota counters for quota.threshold notices.
QUOTA_SCAN_EVERY_SECONDS = 10.0
# How often --follow looks for plan changes due for their second quota carry-over pass (a few seconds after each).
CARRY_OVER_SCAN_EVERY_SECONDS = 2.0
# How often --follow deletes events and finished deliveries past EVENT_RETENTION_DAYS.
HOUSEKEEPING_EVERY_SECONDS = 3600.0
SUMMARY_EVERY_SECONDS = 60.0
# After a Redis scan fails, the scans wait this long (doubling up to the maximum) before they try Redis again.
REDIS_SCAN_BACKOFF_SECONDS = 1.0
REDIS_SCAN_BACKOFF_MAX_SECONDS = 30.0
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)


class RedisScans:
    """The scans that read Redis (quota counters, circuit announcements, plan carry-overs), kept apart from the
    outbox: with Redis down, webhooks and developer mail (database only) still go out. A failed scan is logged and
    Redis is left alone for a back-off, so a round does not wait out connect timeouts each time."""

    def __init__(self) -> None:
        self.failure: Exception | None = None
        self._backoff = 0.0
        self._retry_at = 0.0

    def run(self, scan: Callable[[], int]) -> int | None:
        """What ``scan`` found, or None when it did not run (Redis backing off) or failed: a periodic scan is then
        not counted as done, and runs again once the back-off is over rather than a whole period later."""
        now = time.monotonic()
        if now < self._retry_at:
            return None
        try:
            found = scan()
        except REDIS_ERRORS as exc:
            self.failure = exc
            self._backoff = min(max(self._backoff * 2, REDIS_SCAN_BACKOFF_SECONDS), REDIS_SCAN_BACKOFF_MAX_SECONDS)
            self._retry_at = now + self._backoff
            webhooks.logger.warning(
                "Redis scans failed (quota, circuit and plan carry-over notices wait; deliveries go on), "
                "retrying in %.0fs: %s: %s",
                self._backoff,
                exc.__class__.__name__,
                exc,
            )
            return None
        self._backoff = 0.0
        return found


class DelivererMetrics(loop.CommandMetrics):
    """The deliverer's own /metrics (it serves no HTTP otherwise), in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        super().__init__()
        self.events = Counter(
            "apimgmt_webhook_events_dispatched", "Events fanned out to webhook endpoints.", registry=self.registry
        )
        self.attempts = Counter(
            "apimgmt_webhook_delivery_attempts",
            "Delivery attempts by outcome (succeeded; retried: failed, will retry; failed: gave up).",
            ["outcome"],
            registry=self.registry,
        )
        self.disabled = Counter(
            "apimgmt_webhook_endpoints_disabled", "Endpoints disabled after sustained failure.", registry=self.registry
        )
        self.mailed = Counter(
            "apimgmt_notice_mails_sent",
            "Notice mails sent to developers (portal/notifications.py).",
            registry=self.registry,
        )
        self.backlog = Gauge(
            "apimgmt_webhook_deliveries_pending",
            "Deliveries to active endpoints not yet succeeded or failed (retries waiting included).",
            registry=self.registry,
        )
        self.last_success = Gauge(
            "apimgmt_webhook_deliverer_last_success_timestamp_seconds",
            "When this deliverer last completed a round (also when there was nothing to send).",
            registry=self.registry,
        )

    def observe(self, stats: webhooks.DeliveryStats) -> None:
        self.events.inc(stats.dispatched)
        self.attempts.labels("succeeded").inc(stats.succeeded)
        self.attempts.labels("retried").inc(stats.retried)
        self.attempts.labels("failed").inc(stats.failed)
        self.disabled.inc(len(stats.disabled))
        self.mailed.inc(stats.mailed)
        self.last_success.set_to_current_time()


def scan() -> tuple[int, int]:
    """Notices and changes decided by time rather than by a request: key.expiring, scheduled plan changes."""
    return events.key_expiring_notices(), services.subscription_apply_due_plan_changes()


def circuit_scan() -> int:
    """circuit.opened / circuit.closed from the gateways' announcements in Redis (none without Redis)."""
    from apimgmt.redis_client import get_redis

    client = get_redis()
    return events.circuit_notices(client=client) if client is not None else 0


def quota_scan() -> int:
    """quota.threshold notices from the gateway's counters (none without Redis: there are no shared counters)."""
    from apimgmt.redis_client import get_redis

    client = get_redis()
    return events.quota_threshold_notices(client=client) if client is not None else 0


def carry_over_scan(done: set[str] | None = None) -> int:
    """The second quota carry-over pass of plan changes that are due (none without Redis). ``done``: the changes
    already seen complete, kept by --follow from one scan to the next."""
    from apimgmt.redis_client import get_redis

    client = get_redis()
    return services.plan_carry_over_complete(client=client, done=done) if client is not None else 0


class Command(BaseCommand):
    help = (
        "Send events (the am_events outbox) to the tenants' webhook endpoints and developers' mail, retrying with "
        "backoff; emit key.expiring, quota.threshold and circuit notices and apply plan changes that are due. "
        "Without --follow: one round, then exit. With --follow: until SIGTERM."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--follow", action="store_true", help="Keep running; stop cleanly on SIGTERM/SIGINT.")
        parser.add_argument("--batch-size", type=int, default=100, help="Deliveries claimed per round.")
        parser.add_argument("--concurrency", type=int, default=8, help="Deliveries sent in parallel.")
        parser.add_argument(
            "--per-endpoint",
            type=int,
            default=2,
            help="Deliveries in flight to one endpoint at most (a tenant holds at most half of --concurrency).",
        )
        parser.add_argument("--pause-ms", type=int, default=500, help="--follow: pause between rounds.")
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=0,
            help="--follow: serve the deliverer's Prometheus metrics (attempts, backlog, last success) on this port.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        numbers = ("batch_size", "concurrency", "pause_ms", "per_endpoint")
        if any(options[name] < 1 for name in numbers):
            raise CommandError("--batch-size, --concurrency, --per-endpoint and --pause-ms must be at least 1")
        install_slow_query_logging()
        deliverer = webhooks.Deliverer(
            batch_size=options["batch_size"],
            concurrency=options["concurrency"],
            per_endpoint=options["per_endpoint"],
        )
        try:
            if options["follow"]:
                metrics = DelivererMetrics().serve(options["metrics_port"]) if options["metrics_port"] else None
                self._follow(deliverer, pause=options["pause_ms"] / 1000, metrics=metrics)
                return
            redis_scans = RedisScans()
            try:
                notices, changes = scan()
                notices += (redis_scans.run(quota_scan) or 0) + (redis_scans.run(circuit_scan) or 0)
                stats = deliverer.run_once()
                redis_scans.run(carry_over_scan)  # plan changes of the last 2 days due for their second pass
            except loop.RETRIED_ERRORS as exc:
                raise CommandError(f"delivery round failed: {exc}") from exc
        finally:
            deliverer.close()
        self.stdout.write(
            f"dispatched {stats.dispatched} events; deliveries: {stats.succeeded} succeeded, {stats.retried} to "
            f"retry, {stats.failed} failed; {stats.mailed} notice mails sent; {notices} key.expiring, quota.threshold and "
            f"circuit notices; {changes} plan changes applied"
        )
        if redis_scans.failure is not None:
            # The outbox went out; what needs Redis did not: say so, and fail the run so a cron job notices.
            raise CommandError(f"the Redis scans failed (deliveries were made): {redis_scans.failure}")

    def _follow(self, deliverer: webhooks.Deliverer, *, pause: float, metrics: DelivererMetrics | None) -> None:
        webhooks.logger.info("event deliverer started")
        total = webhooks.DeliveryStats()
        last_scan = -SCAN_EVERY_SECONDS
        last_quota_scan = -QUOTA_SCAN_EVERY_SECONDS
        last_carry_over_scan = -CARRY_OVER_SCAN_EVERY_SECONDS
        last_housekeeping = -HOUSEKEEPING_EVERY_SECONDS
        last_summary = time.monotonic()
        redis_scans = RedisScans()
        carried_over: set[str] = set()

        def round_() -> float:
            nonlocal total, last_scan, last_quota_scan, last_carry_over_scan, last_housekeeping, last_summary
            now = time.monotonic()
            if now - last_scan >= SCAN_EVERY_SECONDS:
                scan()
                last_scan = now
            # A scan skipped or failed with Redis down is not done: it runs as soon as the back-off allows.
            if now - last_quota_scan >= QUOTA_SCAN_EVERY_SECONDS and redis_scans.run(quota_scan) is not None:
                last_quota_scan = now
            if now - last_housekeeping >= HOUSEKEEPING_EVERY_SECONDS:
                webhooks.forget_old()
                last_housekeeping = now
            # The gateways' circuit announcements: one Redis read per tenant that ever had one, every round.
            redis_scans.run(circuit_scan)
            # Returns once an attempt finished (or after a short poll): a slow receiver never holds the next round.
            # Deliveries still in flight at a stop are waited for and recorded (deliverer.close).
            stats = deliverer.run_once(wait=False)
            total.add(stats)
            # Plan changes whose gateways have all moved: the quota they counted on the old plan meanwhile.
            if now - last_carry_over_scan >= CARRY_OVER_SCAN_EVERY_SECONDS and (
                redis_scans.run(lambda: carry_over_scan(carried_over)) is not None
            ):
                last_carry_over_scan = now
            if metrics is not None:
                metrics.observe(stats)
                metrics.backlog.set(webhooks.pending_backlog())
            if now - last_summary >= SUMMARY_EVERY_SECONDS and (total.dispatched or total.succeeded or total.failed):
                webhooks.logger.info("events delivered", extra=total.as_dict())
                total = webhooks.DeliveryStats()
                last_summary = now
            busy = stats.claimed > 0 or deliverer.busy > 0
            return 0 if busy else pause

        loop.follow(round_, logger=webhooks.logger, failure="event delivery failed")
        last = webhooks.DeliveryStats()
        deliverer.close(last)
        total.add(last)
        webhooks.logger.info("event deliverer stopped", extra=total.as_dict())
