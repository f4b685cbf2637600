"""Raw events to rollups: seconds to roll up 1 million stored events (`rebuildrollups`).

Raw events are written directly (one UTC day, 10 APIs, 30 routes, 2,000 keys, 300
organizations, 93 % 2xx), then analytics.retention.rollups_rebuild recomputes that day's
minute, hour and day rollups from them, the way `manage.py rebuildrollups` does. Runs in a
database of its own (bench/benchdb.py). Usage:
    .venv/bin/python bench/rebuild.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path


def fill(n: int, day: datetime) -> None:
    from django.db import connection

    from analytics.models import RequestEvent

    table = RequestEvent._meta.db_table
    columns = (
        "event_id, time, api_id, route_id, consumer_id, key_id, organization_id, method,"
        " route_path, status, latency_ms, upstream_latency_ms, bytes_in, bytes_out, error_kind"
    )
    with connection.cursor() as cur:
        if connection.vendor == "postgresql":
            cur.execute(
                f"""
                INSERT INTO {table} ({columns})
                SELECT 'rb-' || i, %s::timestamptz + (i * 86.4 / %s) * interval '1 second',
                       1 + mod(i, 10), 1 + mod(i, 30), 1 + mod(i, 1500), 1 + mod(i * 7919, 2000),
                       CASE WHEN mod(i, 10) < 7 THEN 1 + mod(i, 300) END, 'GET', '/',
                       CASE WHEN mod(i, 100) < 93 THEN 200
                            WHEN mod(i, 100) < 99 THEN 404 ELSE 503 END,
                       (mod(i, 997)) / 10.0, 1.0, 50, 600,
                       CASE WHEN mod(i, 100) = 99 THEN 'upstream_error' ELSE '' END
                FROM generate_series(0::bigint, %s - 1) AS i
                """,  # noqa: S608 - our own table and column names
                [day, n / 1000, n],
            )
            cur.execute(f"ANALYZE {table}")
            return
        placeholders = ",".join(["%s"] * 15)
        rows = []
        for i in range(n):
            status = 200 if i % 100 < 93 else 404 if i % 100 < 99 else 503
            t = connection.ops.adapt_datetimefield_value(day + timedelta(seconds=i * 86.4e3 / n))
            rows.append(
                (f"rb-{i}", t, 1 + i % 10, 1 + i % 30, 1 + i % 1500, 1 + (i * 7919) % 2000)
                + (1 + i % 300 if i % 10 < 7 else None, "GET", "/", status, (i % 997) / 10.0)
                + (1.0, 50, 600, "upstream_error" if i % 100 == 99 else "")
            )
            if len(rows) == 5000 or i == n - 1:
                cur.executemany(
                    f"INSERT INTO {table} ({columns}) VALUES ({placeholders})",  # noqa: S608
                    rows,
                )
                rows = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchdb import setup_django

    vendor = setup_django("rebuild")
    from django.db import transaction

    from analytics.models import RequestEvent, Rollup
    from analytics.retention import rollups_rebuild

    RequestEvent.objects.all().delete()
    Rollup.objects.all().delete()
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    day -= timedelta(days=1)
    with transaction.atomic():
        fill(args.events, day)
    started = time.perf_counter()
    n = rollups_rebuild(since=day, until=day + timedelta(days=1))
    took = time.perf_counter() - started
    rows = Rollup.objects.count()
    print(f"| {vendor} | {n:,} | {took:.1f} s | {n / took:,.0f} | {rows:,} |")
    RequestEvent.objects.all().delete()
    Rollup.objects.all().delete()


if __name__ == "__main__":
    main()
