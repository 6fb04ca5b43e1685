"""Usage of one app (optionally one API) per hour and per day, from am_usage_records, in the tenant's time zone."""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Q, Sum
from django.db.models.functions import Coalesce, TruncDay, TruncHour
from django.db.models.functions.datetime import TruncBase
from django.utils import timezone

from apimgmt.models import Consumer, UsageDaily, UsageRecord


@dataclass(frozen=True)
class Bucket:
    start: datetime  # in the tenant's time zone
    requests: int
    errors: int
    rate_limited: int
    # WebSocket: connections opened, their time open (seconds) and their messages both ways.
    connections: int = 0
    connection_seconds: float = 0.0
    messages: int = 0


@dataclass(frozen=True)
class Series:
    interval: str  # "hour" or "day"
    buckets: list[Bucket]

    @property
    def total_requests(self) -> int:
        return sum(b.requests for b in self.buckets)

    @property
    def total_errors(self) -> int:
        return sum(b.errors for b in self.buckets)

    @property
    def total_rate_limited(self) -> int:
        return sum(b.rate_limited for b in self.buckets)

    @property
    def has_connections(self) -> bool:
        """Whether any bucket has WebSocket connection time (the table then shows its columns)."""
        return any(b.connection_seconds for b in self.buckets)


def _tz(app: Consumer) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(app.tenant.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return zoneinfo.ZoneInfo("UTC")


def usage_series(*, app: Consumer, api_id: str | None, interval: str, now: datetime | None = None) -> Series:
    """The last 24 hours (``hour``) or 30 days (``day``), every bucket present (zeros where there was no traffic)."""
    tz = _tz(app)
    moment = (now or timezone.now()).astimezone(tz)
    trunc: TruncBase
    if interval == "hour":
        last = moment.replace(minute=0, second=0, microsecond=0)
        starts = [last - timedelta(hours=i) for i in range(23, -1, -1)]
        trunc = TruncHour("timestamp", tzinfo=tz)
    elif interval == "day":
        last = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        # Calendar days in the tenant's zone; re-localise so DST changes keep midnight.
        starts = [
            datetime.combine((last - timedelta(days=i)).date(), datetime.min.time(), tzinfo=tz)
            for i in range(29, -1, -1)
        ]
        trunc = TruncDay("timestamp", tzinfo=tz)
    else:
        raise ValueError(f"interval must be 'hour' or 'day', not {interval!r}")
    # 30 days come from the daily rollup (rows at the tenant's local midnight); 24 hours from one app's minute
    # rows, which also serves time zones whose hours are not UTC hours.
    table = UsageDaily if interval == "day" else UsageRecord
    records = table.objects.filter(tenant_id=app.tenant_id, consumer_id=app.pk, timestamp__gte=starts[0])
    if api_id:
        records = records.filter(api_id=api_id)
    rows = (
        records.annotate(bucket=trunc)
        .values("bucket")
        .annotate(
            requests=Coalesce(Sum("request_count"), 0),
            errors=Coalesce(Sum("error_count"), 0),
            rate_limited=Coalesce(Sum("request_count", filter=Q(status_code=429)), 0),
            connections=Coalesce(Sum("connection_count"), 0),
            connection_seconds=Coalesce(Sum("connection_seconds"), 0.0),
            messages=Coalesce(Sum("messages_in"), 0) + Coalesce(Sum("messages_out"), 0),
        )
    )
    by_start = {row["bucket"].astimezone(tz): row for row in rows}
    buckets = []
    for start in starts:
        row = by_start.get(start)
        buckets.append(
            Bucket(
                start=start,
                requests=int(row["requests"]) if row else 0,
                errors=int(row["errors"]) if row else 0,
                rate_limited=int(row["rate_limited"]) if row else 0,
                connections=int(row["connections"]) if row else 0,
                connection_seconds=float(row["connection_seconds"]) if row else 0.0,
                messages=int(row["messages"]) if row else 0,
            )
        )
    return Series(interval=interval, buckets=buckets)
