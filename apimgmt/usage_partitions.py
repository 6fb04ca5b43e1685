"""Monthly partitions of the usage tables: created ahead by the flusher, dropped whole for USAGE_RETENTION_DAYS.

``am_usage_records`` (minutes), ``am_usage_hourly``, ``am_usage_daily`` and their ``_totals`` (per tenant, API,
consumer) are PostgreSQL tables partitioned by
range of ``"timestamp"``, one partition per calendar month (UTC): ``<table>_pYYYYMM``. A query with a time range only
reads the months it needs, and retention is ``DROP TABLE`` of whole months (no row-by-row ``DELETE``, no bloat).
On other databases (SQLite in development) the tables are plain and these functions do nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import UTC, datetime

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

logger = logging.getLogger("apimgmt.usage")

PARTITIONED_TABLES = (
    "am_usage_records",
    "am_usage_hourly",
    "am_usage_daily",
    "am_usage_hourly_totals",
    "am_usage_daily_totals",
)

_created: set[tuple[str, str, str]] = set()  # (database alias, table, partition) known to exist
_lock = threading.Lock()


def month_start(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def add_months(moment: datetime, months: int) -> datetime:
    start = month_start(moment)
    index = start.year * 12 + start.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def partition_name(table: str, month: datetime) -> str:
    return f"{table}_p{month:%Y%m}"


def create_sql(table: str, month: datetime) -> str:
    """The DDL of one month's partition (also used by the migration that partitions the tables)."""
    start, end = month_start(month), add_months(month, 1)
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(table, start)} PARTITION OF {table} "
        f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
    )


def ensure(moments: Iterable[datetime], *, using: str = DEFAULT_DB_ALIAS) -> list[str]:
    """Create the monthly partitions (of every usage table) that these moments fall in; returns the new ones."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return []
    created = []
    for month in sorted({month_start(m) for m in moments}):
        for table in PARTITIONED_TABLES:
            name = partition_name(table, month)
            if (using, table, name) in _created:
                continue
            with _lock:
                try:
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
                        exists = cursor.fetchone()[0]
                        if not exists:
                            cursor.execute(create_sql(table, month))
                            created.append(name)
                            logger.info("usage partition %s created", name)
                except DatabaseError:
                    # Another flusher created it at the same moment; if not, the insert will say so.
                    logger.info("usage partition %s: concurrent creation", name, exc_info=True)
                    if connection.in_atomic_block:
                        raise
                    continue
                if not connection.in_atomic_block:  # a rolled-back transaction would take it away again
                    _created.add((using, table, name))
    return created


def partitions(*, using: str = DEFAULT_DB_ALIAS) -> list[tuple[str, str, datetime]]:
    """(table, partition, month) of every existing monthly partition of the usage tables."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT parent.relname, child.relname FROM pg_inherits "
            "JOIN pg_class parent ON parent.oid = pg_inherits.inhparent "
            "JOIN pg_class child ON child.oid = pg_inherits.inhrelid "
            "WHERE parent.relname = ANY(%s)",
            [list(PARTITIONED_TABLES)],
        )
        found = []
        for table, name in cursor.fetchall():
            suffix = name.rsplit("_p", 1)[-1]
            try:
                month = datetime.strptime(suffix, "%Y%m").replace(tzinfo=UTC)
            except ValueError:
                continue  # not one of ours: never dropped
            found.append((table, name, month))
    return sorted(found, key=lambda item: (item[2], item[0]))


def drop_before(cutoff: datetime, *, using: str = DEFAULT_DB_ALIAS) -> list[str]:
    """Drop every monthly partition whose whole month ends at or before ``cutoff``; returns their names."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return []
    dropped = []
    for table, name, month in partitions(using=using):
        if add_months(month, 1) <= cutoff:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP TABLE IF EXISTS {name}")
            _created.discard((using, table, name))
            dropped.append(name)
            logger.info("usage partition %s dropped (older than the retention)", name)
    return dropped
