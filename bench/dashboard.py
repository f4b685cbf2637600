"""Dashboard queries over 90 days of rollups at 10 million events a day (PostgreSQL).

Rollup rows are generated directly, as ingest would have written them, for a platform of
25 APIs, 200 routes, 2,000 active keys (1,500 consumers) and 300 organizations, traffic
Zipf-distributed over them, statuses 93 % 2xx, 6 % 4xx, 1 % 5xx. A (dimension value,
status class) has a row in a bucket with the Poisson probability 1 - exp(-expected events),
so the generated row counts are the ones ingest would produce. The script prints them, and
those of the full retention, per granularity.

Bounded so that `make bench` stays short: day rows for all 90 days; hour rows for the last
--hour-days (14; the dashboards read at most 2); minute rows for the last --minute-hours (6;
the portal reads one key's last hour). Queries read their range through an index, so the
older rows left out change only an index's depth. The data set is kept in the bench
database and reused while the parameters are unchanged.

Then each selector that the admin dashboard and the portal charts call is timed
(--repeat times, after one warm-up): p50, p95, max. Usage:
    DATABASE_URL=postgres://... .venv/bin/python bench/dashboard.py [--hour-days 90 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

EVENTS_PER_DAY = 10_000_000
APIS, ROUTES_PER_API, KEYS, CONSUMERS, ORGS = 25, 8, 2_000, 1_500, 300
CLASSES = {2: 0.93, 4: 0.06, 5: 0.01}
ORG_SHARE = 0.7  # of requests made with an organization's key
# Latency shape (share of requests per histogram bucket h0..h15); sums to 1.
LATENCY_SHAPE = [0, 0.02, 0.08, 0.2, 0.3, 0.25, 0.1, 0.04, 0.01] + [0] * 7
SECONDS = {"m": 60, "h": 3600, "d": 86400}


def zipf(n: int, s: float = 1.0) -> list[float]:
    w = [1 / (i + 1) ** s for i in range(n)]
    total = sum(w)
    return [x / total for x in w]


def dimension_values() -> list[tuple[str, int, int, int, float]]:
    """(dimension, dim_id, api_id, status_class, expected events per minute)."""
    per_minute = EVENTS_PER_DAY / 1440
    out = []
    api_share = zipf(APIS, 0.8)
    for i, p in enumerate(api_share):
        for c, pc in CLASSES.items():
            out.append(("api", i + 1, i + 1, c, per_minute * p * pc))
    route_share = zipf(APIS * ROUTES_PER_API)
    for i, p in enumerate(route_share):
        for c, pc in CLASSES.items():
            out.append(("route", i + 1, i % APIS + 1, c, per_minute * p * pc))
    for i, p in enumerate(zipf(KEYS)):
        for c, pc in CLASSES.items():
            out.append(("key", i + 1, i % APIS + 1, c, per_minute * p * pc))
    for i, p in enumerate(zipf(KEYS)):  # key x API, hour and day rows only (as ingest)
        api = i % APIS + 1
        for c, pc in CLASSES.items():
            out.append(("kapi", (i + 1) << 20 | api, api, c, per_minute * p * pc))
    for i, p in enumerate(zipf(ORGS)):
        for c, pc in CLASSES.items():
            out.append(("org", i + 1, i % APIS + 1, c, per_minute * ORG_SHARE * p * pc))
    return out


def expected_rows(dims, granularity: str) -> float:
    """Rows per bucket: sum over (value, class) of P(at least one event in the bucket)."""
    minutes = SECONDS[granularity] / 60
    return sum(
        1 - math.exp(-rate * minutes)
        for dim, *_, rate in dims
        if not (dim == "kapi" and granularity == "m")
    )


def generate(cur, dims, *, now: datetime, spans: dict[str, int]) -> dict[str, int]:
    """Insert rollup rows for the last spans[g] buckets of each granularity g."""
    from analytics.models import HISTOGRAM_FIELDS, Rollup

    table = Rollup._meta.db_table
    cur.execute(
        "CREATE TEMPORARY TABLE bench_dims (dimension text, dim_id bigint, api_id bigint,"
        " status_class int, per_minute float8)"
    )
    with cur.cursor.copy("COPY bench_dims FROM STDIN") as copy:
        for row in dims:
            copy.write_row(row)
    # Every bucket but h5 gets its share; h5 takes the rest, so the histogram sums to count.
    shares = [f"floor(c.n * {w})::bigint" for w in LATENCY_SHAPE]
    hist = [*shares[:5], "c.n - " + " - ".join(shares[:5] + shares[6:]), *shares[6:]]
    counts = {}
    cur.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    for gran, n_buckets in spans.items():
        step = SECONDS[gran]
        end = bucket(now, gran)
        start = end - timedelta(seconds=step * (n_buckets - 1))
        minutes = step / 60
        cur.execute(
            f"""
            INSERT INTO {table} (granularity, bucket, dimension, dim_id, api_id, status_class,
                count, errors, bytes_in, bytes_out, latency_ms_sum, {", ".join(HISTOGRAM_FIELDS)})
            SELECT %s, b, d.dimension, d.dim_id, d.api_id, d.status_class,
                   c.n, CASE WHEN d.status_class = 5 THEN c.n / 2 ELSE 0 END,
                   c.n * 60, c.n * 600, c.n * 24.5, {", ".join(hist)}
            FROM generate_series(%s::timestamptz, %s::timestamptz, %s::interval) AS b
            CROSS JOIN bench_dims AS d
            CROSS JOIN LATERAL (SELECT greatest(1, round(d.per_minute * %s
                                * (0.8 + 0.4 * random())))::bigint AS n) AS c
            WHERE random() < 1 - exp(-least(d.per_minute * %s, 700))
              AND (d.dimension <> 'kapi' OR %s <> 'm')
            """,  # noqa: S608 - our own table and column names
            [gran, start, end, f"{step} seconds", minutes, minutes, gran],
        )
        counts[gran] = cur.rowcount
    cur.execute(f"ALTER TABLE {table} RESET (autovacuum_enabled)")
    cur.execute(f"VACUUM ANALYZE {table}")
    return counts


def bucket(t: datetime, gran: str) -> datetime:
    from analytics.selectors import bucket_start

    return bucket_start(t, gran)


def make_keys() -> None:
    """API keys 1..KEYS owned by CONSUMERS consumers, for the top-consumers query."""
    from django.db import connection

    from portal.models import ApiKey, Consumer, Plan, Subscription, User

    users = User.objects.bulk_create(
        [User(username=f"bench{i}", email=f"bench{i}@example.com") for i in range(CONSUMERS)]
    )
    consumers = Consumer.objects.bulk_create([Consumer(user=u) for u in users])
    plan = Plan.objects.create(name="Bench", slug="bench")
    subs = Subscription.objects.bulk_create(
        [Subscription(consumer=c, plan=plan, status="active") for c in consumers]
    )
    ApiKey.objects.bulk_create(
        [
            ApiKey(
                id=i + 1,
                subscription=subs[i % CONSUMERS],
                name=f"k{i}",
                key_id=f"{i:012x}",
                digest=f"{i:064x}",
            )
            for i in range(KEYS)
        ]
    )
    with connection.cursor() as cur:  # ids were given: move the sequence past them
        cur.execute(
            "SELECT setval(pg_get_serial_sequence(%s, 'id'), %s)",
            [ApiKey._meta.db_table, KEYS],
        )


def timed(fn, repeat: int) -> tuple[float, float, float]:
    fn()  # warm-up: plans and cache
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    p95 = samples[min(len(samples) - 1, math.ceil(0.95 * len(samples)) - 1)]
    return statistics.median(samples), p95, samples[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hour-days", type=int, default=14)
    parser.add_argument("--minute-hours", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--regenerate", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchdb import setup_django

    if setup_django("dashboard") != "postgresql":
        print("(dashboard bench skipped: it needs DATABASE_URL=postgres://...)")
        return
    from django.db import connection
    from django.db.models import Count

    from analytics.models import Rollup
    from analytics.selectors import (
        RANGES,
        export_rows,
        key_usage_series,
        top,
        top_consumers,
        top_window,
        totals_by_api,
        usage_series,
    )
    from portal.models import Plan, User

    dims = dimension_values()
    spans = {"d": 90, "h": args.hour_days * 24, "m": args.minute_hours * 60}
    params = {"spans": spans, "dims": len(dims), "events_per_day": EVENTS_PER_DAY, "v": 2}
    with connection.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS bench_dashboard_meta (params text, now text)")
        cur.execute("SELECT params, now FROM bench_dashboard_meta")
        meta = cur.fetchone()
    counts = dict(Rollup.objects.values_list("granularity").annotate(n=Count("id")))
    if meta and meta[0] == json.dumps({**params, "counts": counts}) and not args.regenerate:
        now = datetime.fromisoformat(meta[1])  # the same data set, untouched since
        took = None
    else:
        started = time.perf_counter()
        now = datetime.now(UTC).replace(second=30, microsecond=0)
        with connection.cursor() as cur:
            cur.execute("DELETE FROM bench_dashboard_meta")
            cur.execute(f"TRUNCATE {Rollup._meta.db_table}")
        User.objects.filter(username__startswith="bench").delete()  # keys go with them
        Plan.objects.filter(slug="bench").delete()
        make_keys()
        with connection.cursor() as cur:
            counts = generate(cur, dims, now=now, spans=spans)
            cur.execute(
                "INSERT INTO bench_dashboard_meta VALUES (%s, %s)",
                [json.dumps({**params, "counts": counts}), now.isoformat()],
            )
        took = time.perf_counter() - started

    full = {"d": 90, "h": 90 * 24, "m": 14 * 1440}  # retention: minute rows 14 days
    print("| granularity | rows per bucket | generated (buckets) | at full retention |")
    print("| --- | ---: | ---: | ---: |")
    for g, name in (("m", "minute"), ("h", "hour"), ("d", "day")):
        per = expected_rows(dims, g)
        print(
            f"| {name} | {per:,.0f} | {counts.get(g, 0):,} ({spans[g]:,}) | "
            f"{per * full[g]:,.0f} ({full[g]:,}) |"
        )
    size = Rollup.objects.count()
    print(f"\n{size:,} rollup rows" + (f", generated in {took:.0f} s" if took else " (reused)"))

    busiest_key = 1  # Zipf: key 1 has the most traffic
    quiet_key = KEYS
    queries = {}
    for name, (gran, points) in RANGES.items():
        top_gran, since = top_window(name, now=now)
        queries[f"series, all APIs, {name}"] = lambda g=gran, p=points: usage_series(
            "api", None, granularity=g, points=p, now=now
        )
        queries[f"top 10 APIs, {name}"] = lambda g=top_gran, s=since: top(
            "api", granularity=g, since=s
        )
        queries[f"top 10 keys, {name}"] = lambda g=top_gran, s=since: top(
            "key", granularity=g, since=s
        )
        queries[f"top 10 consumers, {name}"] = lambda g=top_gran, s=since: top_consumers(
            granularity=g, since=s
        )
    queries["portal: busiest key, last 60 min"] = lambda: key_usage_series(busiest_key, now=now)
    queries["portal: quiet key, last 60 min"] = lambda: key_usage_series(quiet_key, now=now)
    queries["portal: busiest key, 30 days"] = lambda: usage_series(
        "key", busiest_key, granularity="d", points=30, now=now
    )
    all_apis = list(range(1, APIS + 1))
    queries["portal: busiest key by API, 30 days"] = lambda: totals_by_api(
        [busiest_key], all_apis, granularity="d", since=now - timedelta(days=30)
    )
    queries["portal: key CSV, 7 days of hours"] = lambda: list(
        export_rows(
            granularity="h",
            dimension="key",
            since=now - timedelta(days=7),
            until=now,
            dim_id=busiest_key,
        )
    )
    print(f"\n| query ({args.repeat} runs) | p50 ms | p95 ms | max ms |")
    print("| --- | ---: | ---: | ---: |")
    worst = 0.0
    for label, fn in queries.items():
        p50, p95, top_ms = timed(fn, args.repeat)
        worst = max(worst, p95)
        print(f"| {label} | {p50:.1f} | {p95:.1f} | {top_ms:.1f} |")
    print(f"\nworst p95: {worst:.1f} ms (target < 100 ms)")


if __name__ == "__main__":
    main()
