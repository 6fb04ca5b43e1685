"""Webhooks: endpoint services, Standard Webhooks signing, and the delivery engine behind ``manage.py deliver_events``.

Signing follows the Standard Webhooks specification: ``webhook-id`` (the event id, the same on every retry, so a
receiver deduplicates by it), ``webhook-timestamp`` (epoch seconds of this attempt) and ``webhook-signature``:
``v1,<base64 HMAC-SHA256 over "<id>.<timestamp>.<body>">`` keyed with the base64-decoded part of the ``whsec_``
secret. During a secret rotation's overlap both secrets sign (space-separated signatures).

Delivery is at least once: events are fanned out into ``WebhookDelivery`` rows; a deliverer claims due rows (a
lease, ``SELECT … FOR UPDATE SKIP LOCKED``, so several deliverers share the work), posts them outside any
transaction, then records the answer. A deliverer that dies mid-send leaves the row to be taken again when its
lease ends. No request path of the control plane or the gateway ever waits on a receiver.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import urllib3
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from apimgmt import events, validation
from apimgmt.models import Event, Tenant, TenantMembership, WebhookDelivery, WebhookEndpoint

logger = logging.getLogger("apimgmt.webhooks")

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MAX_ROTATION_OVERLAP_SECONDS = 7 * 86400
DEFAULT_ROTATION_OVERLAP_SECONDS = 86400
# A claimed delivery belongs to its deliverer this long; past it another deliverer may take it (at least once).
CLAIM_LEASE = timedelta(seconds=120)
# The shortest life of an event with a dedupe key (forget_old): longer than any window its key is decided in again,
# a calendar month (31 days, 25 hours on a DST day) plus the quota scan's grace, and key.expiring's 7 days.
DEDUPE_RETENTION_DAYS = 32
USER_AGENT = "apimgmt-webhooks/1"


# ---------------------------------------------------------------------------
# Secrets and signatures
# ---------------------------------------------------------------------------


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``<id>.<timestamp>.<body>``."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def signing_secrets(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    """The current secret, and the previous one while its rotation overlap lasts."""
    found = [endpoint.secret]
    if endpoint.previous_secret and endpoint.previous_secret_expires_at and endpoint.previous_secret_expires_at > now:
        found.append(endpoint.previous_secret)
    return found


def signed_headers(endpoint: WebhookEndpoint, msg_id: str, body: bytes, now: datetime) -> dict[str, str]:
    timestamp = int(now.timestamp())
    signature = " ".join(sign(secret, msg_id, timestamp, body) for secret in signing_secrets(endpoint, now))
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


# ---------------------------------------------------------------------------
# Endpoint services (typed, keyword-only, transactional, audited — like apimgmt/services.py)
# ---------------------------------------------------------------------------


def validate_webhook_url(url: str) -> str:
    """The upstreams' address checks (apimgmt/validation.py), private addresses only with WEBHOOK_ALLOW_PRIVATE."""
    try:
        return validation.validate_upstream_url(url, allow_private=settings.WEBHOOK_ALLOW_PRIVATE)
    except ValidationError as exc:
        messages = [
            m.replace("upstream_url", "url")
            .replace("UPSTREAM_ALLOW_PRIVATE", "WEBHOOK_ALLOW_PRIVATE")
            .replace("internal upstreams", "internal receivers")
            for m in exc.messages
        ]
        raise ValidationError({"url": messages}) from exc


def validate_event_types(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError({"event_types": "event_types must be a list of event type names (empty: every type)."})
    unknown = sorted(set(value) - set(events.EVENT_TYPES))
    if unknown:
        raise ValidationError(
            {"event_types": f"Unknown event types: {', '.join(unknown)}. Known: {', '.join(events.EVENT_TYPES)}."}
        )
    return sorted(set(value))


def _audit(actor: Any, endpoint: WebhookEndpoint, action: str, changes: dict[str, Any]) -> None:
    from apimgmt.services import audit_record

    audit_record(actor=actor, tenant_id=endpoint.tenant_id, action=action, obj=endpoint, changes=changes)


@transaction.atomic
def webhook_endpoint_create(
    *, tenant: Tenant, url: str, actor: Any, event_types: Iterable[str] = (), description: str = ""
) -> tuple[WebhookEndpoint, str]:
    """Create an endpoint and return it with its signing secret — the only time the secret is shown."""
    endpoint = WebhookEndpoint(
        tenant=tenant,
        url=validate_webhook_url(url),
        event_types=validate_event_types(list(event_types)),
        description=description,
        secret=generate_secret(),
    )
    endpoint.full_clean()
    endpoint.save(force_insert=True)
    _audit(actor, endpoint, "webhook.create", {"url": endpoint.url, "event_types": endpoint.event_types})
    return endpoint, endpoint.secret


@transaction.atomic
def webhook_endpoint_update(*, endpoint: WebhookEndpoint, actor: Any, **fields: Any) -> WebhookEndpoint:
    unknown = sorted(set(fields) - {"url", "event_types", "description"})
    if unknown:
        raise ValidationError({name: "This field cannot be changed here." for name in unknown})
    if "url" in fields:
        fields["url"] = validate_webhook_url(fields["url"])
    if "event_types" in fields:
        fields["event_types"] = validate_event_types(fields["event_types"])
    changes = {}
    for name, value in fields.items():
        if getattr(endpoint, name) != value:
            changes[name] = [getattr(endpoint, name), value]
            setattr(endpoint, name, value)
    if changes:
        endpoint.full_clean()
        endpoint.save()
        _audit(actor, endpoint, "webhook.update", changes)
    return endpoint


@transaction.atomic
def webhook_endpoint_rotate_secret(
    *, endpoint: WebhookEndpoint, actor: Any, overlap_seconds: int = DEFAULT_ROTATION_OVERLAP_SECONDS
) -> tuple[WebhookEndpoint, str]:
    """A new secret; the old one keeps signing (a second signature) for ``overlap_seconds`` (0: stops now)."""
    if (
        isinstance(overlap_seconds, bool)
        or not isinstance(overlap_seconds, int)
        or not 0 <= overlap_seconds <= MAX_ROTATION_OVERLAP_SECONDS
    ):
        raise ValidationError(
            {"overlap_seconds": f"overlap_seconds must be an integer from 0 to {MAX_ROTATION_OVERLAP_SECONDS}."}
        )
    endpoint = WebhookEndpoint.objects.select_for_update().get(pk=endpoint.pk)
    endpoint.previous_secret = endpoint.secret if overlap_seconds else ""
    endpoint.previous_secret_expires_at = (
        timezone.now() + timedelta(seconds=overlap_seconds) if overlap_seconds else None
    )
    endpoint.secret = generate_secret()
    endpoint.save(update_fields=["secret", "previous_secret", "previous_secret_expires_at", "updated_at"])
    _audit(actor, endpoint, "webhook.rotate_secret", {"overlap_seconds": overlap_seconds})
    return endpoint, endpoint.secret


@transaction.atomic
def webhook_endpoint_enable(*, endpoint: WebhookEndpoint, actor: Any) -> WebhookEndpoint:
    """Re-enable a disabled endpoint: deliveries resume, its failure streak starts over."""
    endpoint = WebhookEndpoint.objects.select_for_update().get(pk=endpoint.pk)
    if endpoint.status != WebhookEndpoint.Status.ACTIVE:
        endpoint.status = WebhookEndpoint.Status.ACTIVE
        endpoint.disabled_reason = ""
        endpoint.failing_since = None
        endpoint.save(update_fields=["status", "disabled_reason", "failing_since", "updated_at"])
        _audit(actor, endpoint, "webhook.enable", {"status": ["disabled", "active"]})
    return endpoint


@transaction.atomic
def webhook_endpoint_disable(*, endpoint: WebhookEndpoint, actor: Any, reason: str = "") -> WebhookEndpoint:
    endpoint = WebhookEndpoint.objects.select_for_update().get(pk=endpoint.pk)
    if endpoint.status != WebhookEndpoint.Status.DISABLED:
        endpoint.status = WebhookEndpoint.Status.DISABLED
        endpoint.disabled_reason = (reason or "disabled by an administrator")[:500]
        endpoint.save(update_fields=["status", "disabled_reason", "updated_at"])
        _audit(actor, endpoint, "webhook.disable", {"status": ["active", "disabled"], "reason": reason})
    return endpoint


@transaction.atomic
def webhook_endpoint_delete(*, endpoint: WebhookEndpoint, actor: Any) -> None:
    _audit(actor, endpoint, "webhook.delete", {"url": endpoint.url, "deliveries_deleted": endpoint.deliveries.count()})
    endpoint.delete()


@transaction.atomic
def webhook_delivery_replay(*, delivery: WebhookDelivery, actor: Any) -> WebhookDelivery:
    """Send a delivery's event to its endpoint again, as a new delivery (same ``webhook-id``: receivers dedupe)."""
    endpoint = delivery.endpoint
    if endpoint.status != WebhookEndpoint.Status.ACTIVE:
        raise ValidationError({"endpoint_id": "This endpoint is disabled; enable it before replaying deliveries."})
    replay = WebhookDelivery.objects.create(
        endpoint=endpoint, event_id=delivery.event_id, replay_of=delivery, next_attempt_at=timezone.now()
    )
    _audit(
        actor, endpoint, "webhook.replay", {"delivery": delivery.pk, "replay": replay.pk, "event": delivery.event_id}
    )
    return replay


# ---------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptResult:
    ok: bool
    status_code: int | None
    latency_ms: float
    error: str = ""


def _vetted_address(host: str, port: int) -> str:
    """An address of ``host`` that the address checks allow (re-checked on every send: DNS may have moved)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for info in infos:
        address = str(info[4][0])
        if settings.WEBHOOK_ALLOW_PRIVATE or not validation.is_forbidden_address(ipaddress.ip_address(address)):
            return address
    raise ConnectionRefusedError(f"{host} resolves only to addresses webhooks may not reach")


class _Deadline:
    """Cuts an attempt's connection when its time is up: the socket timeout bounds each read, not the answer, so a
    receiver sending a byte now and then (TLS handshake, status line, headers) would otherwise hold a deliverer
    thread, and the deliverer's round, for as long as it likes. The watched socket is a duplicate, so shutting it
    down never touches a descriptor the connection already closed and the process reused."""

    def __init__(self, seconds: float) -> None:
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.expired = False
        self.done = False
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True
        self.timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self.lock:
            if self.done:
                return
            copy = sock.dup()
            self.sockets.append(copy)
            if self.expired:
                self._cut(copy)

    @staticmethod
    def _cut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _expire(self) -> None:
        with self.lock:
            if self.done:
                return
            self.expired = True
            for sock in self.sockets:
                self._cut(sock)

    def close(self) -> None:
        self.timer.cancel()
        with self.lock:
            self.done = True
            for sock in self.sockets:
                sock.close()
            self.sockets.clear()


def _watched(base: type[Any], deadline: _Deadline) -> type[Any]:
    """``base`` (urllib3's connection class) with every socket it opens watched by ``deadline``."""

    class Watched(base):
        def _new_conn(self) -> socket.socket:
            sock: socket.socket = super()._new_conn()
            deadline.watch(sock)
            return sock

    return Watched


def post(url: str, headers: dict[str, str], body: bytes, *, timeout: float) -> AttemptResult:
    """POST ``body`` to ``url`` at a vetted address; 2xx is success. Redirects are not followed. The answer's
    status line and headers must be complete within ``timeout`` seconds of the start (the body is not read)."""
    started = time.perf_counter()
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    deadline = _Deadline(timeout)
    try:
        address = _vetted_address(host, port)
        pool_timeout = urllib3.Timeout(connect=min(timeout, 5.0), read=timeout)
        pool: urllib3.HTTPConnectionPool
        if https:
            pool = urllib3.HTTPSConnectionPool(
                address,
                port,
                timeout=pool_timeout,
                retries=False,
                server_hostname=host,
                assert_hostname=host,
                cert_reqs="CERT_REQUIRED",
            )
        else:
            pool = urllib3.HTTPConnectionPool(address, port, timeout=pool_timeout, retries=False)
        pool.ConnectionCls = _watched(pool.ConnectionCls, deadline)
        with pool:
            try:
                response = pool.urlopen(
                    "POST",
                    (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                    body=body,
                    headers={**headers, "host": parts.netloc.rsplit("@", 1)[-1]},
                    redirect=False,
                    preload_content=False,
                    retries=False,
                )
                response.release_conn()
            finally:
                deadline.close()
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        if deadline.expired:
            error = f"no complete answer within {timeout:g} s ({error})"
        return AttemptResult(False, None, (time.perf_counter() - started) * 1000, error[:500])
    finally:
        deadline.close()
    if deadline.expired:
        # Cut while reading: a cut answer can look complete (EOF ends the headers), so it is not believed. (Cut in
        # the instant after a complete answer, it is sent again: at least once, receivers deduplicate.)
        return AttemptResult(
            False, None, (time.perf_counter() - started) * 1000, f"no complete answer within {timeout:g} s"
        )
    latency = (time.perf_counter() - started) * 1000
    ok = 200 <= response.status < 300
    return AttemptResult(ok, response.status, latency, "" if ok else f"HTTP {response.status}")


def retry_delay(attempts: int, *, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after ``attempts`` failures: base·2^(n-1), capped, times a jitter in
    [0.5, 1] so receivers that failed together are not retried together."""
    exponential = settings.WEBHOOK_RETRY_BASE_SECONDS * 2 ** min(attempts - 1, 30)
    delay = min(exponential, settings.WEBHOOK_RETRY_MAX_DELAY_SECONDS)
    return delay * (rng or random).uniform(0.5, 1.0)


# ---------------------------------------------------------------------------
# The delivery engine
# ---------------------------------------------------------------------------


@dataclass
class DeliveryStats:
    dispatched: int = 0  # events fanned out
    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    disabled: list[str] = field(default_factory=list)
    mailed: int = 0  # notice mails of the other outbox readers (portal/notifications.py)
    claimed: int = 0  # deliveries taken for sending this round

    def add(self, other: DeliveryStats) -> None:
        self.dispatched += other.dispatched
        self.succeeded += other.succeeded
        self.retried += other.retried
        self.failed += other.failed
        self.disabled += other.disabled
        self.mailed += other.mailed
        self.claimed += other.claimed

    def as_dict(self) -> dict[str, Any]:
        return {
            "dispatched": self.dispatched,
            "succeeded": self.succeeded,
            "retried": self.retried,
            "failed": self.failed,
            "disabled": len(self.disabled),
            "mailed": self.mailed,
        }


def dispatch_events(*, batch_size: int = 500) -> int:
    """Fan undispatched events out into deliveries for the tenant's active endpoints that want them."""
    with transaction.atomic():
        batch = list(
            Event.objects.filter(dispatched_at__isnull=True)
            .order_by("occurred_at")
            .select_for_update(skip_locked=True)[:batch_size]
        )
        if not batch:
            return 0
        endpoints: dict[str, list[WebhookEndpoint]] = {}
        for endpoint in WebhookEndpoint.objects.filter(
            tenant_id__in={e.tenant_id for e in batch}, status=WebhookEndpoint.Status.ACTIVE
        ):
            endpoints.setdefault(endpoint.tenant_id, []).append(endpoint)
        now = timezone.now()
        WebhookDelivery.objects.bulk_create(
            WebhookDelivery(endpoint=endpoint, event=event, next_attempt_at=now, created_at=now)
            for event in batch
            for endpoint in endpoints.get(event.tenant_id, [])
            # An endpoint hears of what happened after it was created, never of the past.
            if endpoint.wants(event.event_type) and endpoint.created_at <= event.occurred_at
        )
        for reader in events.OUTBOX_READERS.values():
            reader.fan_out(batch)
        Event.objects.filter(pk__in=[e.pk for e in batch]).update(dispatched_at=now)
    return len(batch)


def _due_candidates(now: datetime, per_endpoint: int) -> list[tuple[int, str, str]]:
    """(delivery id, endpoint id, tenant id) of due deliveries of active endpoints, at most ``per_endpoint`` of
    each endpoint (the first queued), most overdue first. One pass over the active endpoints, an index probe each:
    a backlog of one endpoint costs the others nothing. Per endpoint, deliveries go in the order they were queued
    (created_at, which the (endpoint, created_at) index gives: 200 endpoints, one with 200,000 pending, take about
    40 ms where ordering by next attempt sorted the whole backlog in 200 ms)."""
    deliveries = WebhookDelivery._meta.db_table
    endpoints = WebhookEndpoint._meta.db_table
    sql = f"""
        SELECT d.id, e.id, e.tenant_id
        FROM {endpoints} e
        CROSS JOIN LATERAL (
            SELECT id, next_attempt_at FROM {deliveries}
            WHERE endpoint_id = e.id AND status = %s AND next_attempt_at <= %s
            ORDER BY created_at, id
            LIMIT %s
        ) d
        WHERE e.status = %s
        ORDER BY d.next_attempt_at, d.id
    """  # noqa: S608 (table names are the models' own)
    with connection.cursor() as cursor:
        cursor.execute(sql, [WebhookDelivery.Status.PENDING, now, per_endpoint, WebhookEndpoint.Status.ACTIVE])
        return [(int(row[0]), str(row[1]), str(row[2])) for row in cursor.fetchall()]


def fair_share(
    candidates: list[tuple[int, str, str]],
    *,
    slots: int,
    per_endpoint: int,
    per_tenant: int,
    busy_endpoints: Mapping[str, int] | None = None,
    busy_tenants: Mapping[str, int] | None = None,
) -> list[int]:
    """Choose up to ``slots`` of ``candidates`` (oldest first): round-robin across tenants, one each per turn, the
    tenant waiting longest first, none past ``per_endpoint`` in flight per endpoint nor ``per_tenant`` per tenant
    (counting what ``busy_*`` says is in flight already). So one tenant's backlog, or its dead receivers, never
    holds every slot."""
    endpoint_load = Counter(busy_endpoints or {})
    tenant_load = Counter(busy_tenants or {})
    queues: dict[str, deque[tuple[int, str]]] = {}
    for delivery_id, endpoint_id, tenant_id in candidates:
        queues.setdefault(tenant_id, deque()).append((delivery_id, endpoint_id))
    chosen: list[int] = []
    while len(chosen) < slots and queues:
        for tenant_id in list(queues):
            queue = queues[tenant_id]
            while queue and endpoint_load[queue[0][1]] >= per_endpoint:
                queue.popleft()
            if not queue or tenant_load[tenant_id] >= per_tenant:
                del queues[tenant_id]
                continue
            delivery_id, endpoint_id = queue.popleft()
            chosen.append(delivery_id)
            endpoint_load[endpoint_id] += 1
            tenant_load[tenant_id] += 1
            if len(chosen) >= slots:
                break
    return chosen


def claim_due(
    *,
    batch_size: int,
    lease: timedelta = CLAIM_LEASE,
    per_endpoint: int | None = None,
    per_tenant: int | None = None,
    busy_endpoints: Mapping[str, int] | None = None,
    busy_tenants: Mapping[str, int] | None = None,
) -> list[WebhookDelivery]:
    """Take due deliveries of active endpoints for this deliverer, fairly (``fair_share``): their next attempt
    moves one lease ahead, so no other deliverer takes them meanwhile."""
    now = timezone.now()
    endpoint_cap = per_endpoint or batch_size
    chosen = fair_share(
        _due_candidates(now, endpoint_cap),
        slots=batch_size,
        per_endpoint=endpoint_cap,
        per_tenant=per_tenant or batch_size,
        busy_endpoints=busy_endpoints,
        busy_tenants=busy_tenants,
    )
    if not chosen:
        return []
    with transaction.atomic():
        # Another deliverer may have taken some since they were read: locked ones are skipped, leased ones re-checked.
        due = list(
            WebhookDelivery.objects.filter(
                pk__in=chosen, status=WebhookDelivery.Status.PENDING, next_attempt_at__lte=now
            )
            .select_for_update(skip_locked=True, of=("self",))
            .values_list("pk", flat=True)
        )
        if due:
            WebhookDelivery.objects.filter(pk__in=due).update(next_attempt_at=now + lease)
    if not due:
        return []
    order = {pk: n for n, pk in enumerate(chosen)}
    claimed = WebhookDelivery.objects.filter(pk__in=due).select_related("endpoint", "event")
    return sorted(claimed, key=lambda d: order[d.pk])


def attempt(delivery: WebhookDelivery) -> AttemptResult:
    body = json.dumps(events.envelope(delivery.event), separators=(",", ":")).encode()
    headers = signed_headers(delivery.endpoint, delivery.event_id, body, timezone.now())
    return post(delivery.endpoint.url, headers, body, timeout=settings.WEBHOOK_TIMEOUT_SECONDS)


def record(
    delivery: WebhookDelivery, result: AttemptResult, stats: DeliveryStats, *, now: datetime | None = None
) -> None:
    """Store one attempt's outcome at ``now`` (default: the current time): succeeded, retry later (backoff), or
    failed once the retry window is over."""
    now = now or timezone.now()
    with transaction.atomic():
        row = WebhookDelivery.objects.select_for_update().get(pk=delivery.pk)
        if row.status != WebhookDelivery.Status.PENDING:
            return  # another deliverer recorded it after our lease ran out: once is enough
        row.attempts += 1
        row.last_attempt_at = now
        row.response_code = result.status_code
        row.latency_ms = round(result.latency_ms, 3)
        row.last_error = result.error
        endpoint = WebhookEndpoint.objects.select_for_update().get(pk=row.endpoint_id)
        if result.ok:
            row.status = WebhookDelivery.Status.SUCCEEDED
            row.next_attempt_at = None
            row.completed_at = now
            stats.succeeded += 1
            if endpoint.failing_since is not None:
                endpoint.failing_since = None
                endpoint.save(update_fields=["failing_since"])
        else:
            delay = timedelta(seconds=retry_delay(row.attempts))
            if now + delay > row.created_at + timedelta(seconds=settings.WEBHOOK_RETRY_WINDOW_SECONDS):
                row.status = WebhookDelivery.Status.FAILED
                row.next_attempt_at = None
                row.completed_at = now
                stats.failed += 1
            else:
                row.next_attempt_at = now + delay
                stats.retried += 1
            if endpoint.failing_since is None:
                endpoint.failing_since = now
                endpoint.save(update_fields=["failing_since"])
            elif endpoint.status == WebhookEndpoint.Status.ACTIVE and now - endpoint.failing_since >= timedelta(
                seconds=settings.WEBHOOK_DISABLE_AFTER_SECONDS
            ):
                _disable_failing(endpoint, now)
                stats.disabled.append(endpoint.pk)
        row.save()


def _disable_failing(endpoint: WebhookEndpoint, now: datetime) -> None:
    assert endpoint.failing_since is not None
    reason = f"every delivery failed since {endpoint.failing_since:%Y-%m-%d %H:%M} UTC"
    endpoint.status = WebhookEndpoint.Status.DISABLED
    endpoint.disabled_reason = reason
    endpoint.save(update_fields=["status", "disabled_reason", "updated_at"])
    _audit(None, endpoint, "webhook.disable", {"status": ["active", "disabled"], "reason": reason})
    admins = list(
        TenantMembership.objects.filter(tenant_id=endpoint.tenant_id, role=TenantMembership.Role.ADMIN)
        .exclude(user__email="")
        .values_list("user__email", flat=True)
    )
    if admins:
        subject = f"Webhook endpoint disabled in {endpoint.tenant_id}: {endpoint.url}"
        text = (
            f"The webhook endpoint {endpoint.url} ({endpoint.pk}) of tenant {endpoint.tenant_id} was disabled: "
            f"{reason}.\n\nFix the receiver, then enable the endpoint again in the admin or with "
            f"POST /mgmt/v1/webhooks/{endpoint.pk}/enable/; failed deliveries can be replayed from the delivery log.\n"
        )
        # After commit: a mail server that hangs must not hold the row locks.
        transaction.on_commit(lambda: _mail_admins(subject, text, admins))


def _mail_admins(subject: str, text: str, to: list[str]) -> None:
    try:
        send_mail(subject, text, None, to)
    except Exception:  # a mail outage must not stop deliveries; the audit event and admin status stay
        logger.exception("could not mail the tenant's admins about a disabled webhook endpoint")


class Deliverer:
    """Fans out new events, claims due deliveries fairly, sends them on a thread pool and records the answers.

    At most ``per_endpoint`` deliveries per endpoint and ``per_tenant`` per tenant are in flight at once (default:
    2, and half the pool), and free slots go round-robin across tenants: a tenant's slow or dead receiver, and its
    backlog, hold a few threads at most while every other tenant's deliveries keep going. ``run_once()`` sends
    everything due and waits for it; ``run_once(wait=False)`` (``--follow``) returns once something finished or
    ``poll_seconds`` passed, so a slow attempt never holds the next round.
    """

    def __init__(
        self,
        *,
        batch_size: int = 100,
        concurrency: int = 8,
        per_endpoint: int = 2,
        per_tenant: int | None = None,
        poll_seconds: float = 0.2,
    ) -> None:
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.per_endpoint = max(1, per_endpoint)
        self.per_tenant = max(1, per_tenant if per_tenant is not None else concurrency // 2)
        self.poll_seconds = poll_seconds
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="webhook")
        self.in_flight: dict[Future[AttemptResult], WebhookDelivery] = {}

    @property
    def busy(self) -> int:
        return len(self.in_flight)

    def _collect(self, stats: DeliveryStats, *, timeout: float | None) -> None:
        """Record the attempts that finished, waiting up to ``timeout`` for one (None: for all of them)."""
        if not self.in_flight:
            return
        if timeout is None:
            done, _ = wait_for(self.in_flight)
        elif timeout > 0:
            done, _ = wait_for(self.in_flight, timeout=timeout, return_when=FIRST_COMPLETED)
        else:
            done = {f for f in self.in_flight if f.done()}
        for future in done:
            delivery = self.in_flight.pop(future)
            record(delivery, future.result(), stats)

    def _send_due(self, stats: DeliveryStats) -> None:
        slots = min(self.batch_size, self.concurrency - len(self.in_flight))
        if slots <= 0:
            return
        endpoints = Counter(d.endpoint_id for d in self.in_flight.values())
        tenants = Counter(d.endpoint.tenant_id for d in self.in_flight.values())
        due = claim_due(
            batch_size=slots,
            per_endpoint=self.per_endpoint,
            per_tenant=self.per_tenant,
            busy_endpoints=endpoints,
            busy_tenants=tenants,
        )
        stats.claimed += len(due)
        for delivery in due:
            self.in_flight[self.pool.submit(attempt, delivery)] = delivery

    def run_once(self, *, wait: bool = True) -> DeliveryStats:
        stats = DeliveryStats()
        stats.dispatched = dispatch_events()
        self._collect(stats, timeout=0)
        self._send_due(stats)
        if wait:
            # The whole round: as attempts finish, their slots take the next due deliveries (fairly) until none is
            # due and none in flight. Failed ones wait for their retry time, so this ends.
            while self.in_flight:
                self._collect(stats, timeout=self.poll_seconds)
                self._send_due(stats)
        else:
            self._collect(stats, timeout=self.poll_seconds)
        for reader in events.OUTBOX_READERS.values():
            stats.mailed += reader.send_due()
        return stats

    def close(self, stats: DeliveryStats | None = None) -> None:
        """Wait for the attempts in flight and record them (into ``stats`` when given), then stop the threads."""
        self._collect(stats if stats is not None else DeliveryStats(), timeout=None)
        self.pool.shutdown(wait=True)


def forget_old(*, now: datetime | None = None) -> tuple[int, int]:
    """Delete finished deliveries and delivered events older than EVENT_RETENTION_DAYS; return (deliveries, events).

    A delivery still pending, and its event, stay whatever their age (an endpoint disabled for a while resumes). An
    event with a dedupe key stays at least DEDUPE_RETENTION_DAYS: its row is what keeps the notice from being sent
    again (a monthly quota.threshold sent on the 1st would be sent again on the 31st, a key.expiring again the next
    day after a short retention), and no dedupe key is decided again once that long has passed.
    """
    days = settings.EVENT_RETENTION_DAYS
    if days <= 0:
        return 0, 0
    moment = now or timezone.now()
    cutoff = moment - timedelta(days=days)
    deliveries, _ = (
        WebhookDelivery.objects.filter(created_at__lt=cutoff).exclude(status=WebhookDelivery.Status.PENDING).delete()
    )
    deduped_cutoff = min(cutoff, moment - timedelta(days=DEDUPE_RETENTION_DAYS))
    old_events, _ = (
        Event.objects.filter(occurred_at__lt=cutoff, dispatched_at__isnull=False)
        .filter(Q(dedupe_key__isnull=True) | Q(occurred_at__lt=deduped_cutoff))
        .exclude(deliveries__status=WebhookDelivery.Status.PENDING)
        .delete()
    )
    return deliveries, old_events


def pending_backlog() -> int:
    """Deliveries due now or later that have not succeeded or failed yet."""
    return WebhookDelivery.objects.filter(
        Q(status=WebhookDelivery.Status.PENDING), endpoint__status=WebhookEndpoint.Status.ACTIVE
    ).count()
