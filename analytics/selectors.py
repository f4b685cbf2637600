"""Reads for charts and exports: always from rollups, never from raw events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.db.models import Q, Sum
from django.utils import timezone

from analytics.models import HISTOGRAM_FIELDS, LATENCY_BUCKETS_MS, Rollup

STATUS_CLASSES = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
STEP = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}
LABEL_FORMAT = {"m": "%H:%M", "h": "%m-%d %H:00", "d": "%Y-%m-%d"}


def bucket_start(t: datetime, granularity: str) -> datetime:
    """The start of the minute, hour or UTC day containing `t`."""
    t = t.astimezone(UTC).replace(second=0, microsecond=0)
    if granularity in ("h", "d"):
        t = t.replace(minute=0)
    if granularity == "d":
        t = t.replace(hour=0)
    return t


def percentiles(histogram: list[int], qs=(0.5, 0.95, 0.99)) -> dict[str, float | None]:
    """Latency percentiles (ms) from a merged fixed-bucket histogram.

    Linear interpolation inside the bucket that holds the quantile; the open last bucket
    reports its lower bound. The error is at most one bucket's width.
    """
    total = sum(histogram)
    out: dict[str, float | None] = {}
    for q in qs:
        name = f"p{round(q * 100)}"
        if not total:
            out[name] = None
            continue
        rank = q * total
        seen = 0
        for i, n in enumerate(histogram):
            if n and seen + n >= rank:
                lower = LATENCY_BUCKETS_MS[i - 1] if i else 0.0
                if i >= len(LATENCY_BUCKETS_MS):
                    out[name] = float(lower)
                else:
                    upper = LATENCY_BUCKETS_MS[i]
                    out[name] = round(lower + (upper - lower) * (rank - seen) / n, 3)
                break
            seen += n
    return out


def usage_series(
    dimension: str,
    dim_id: int | None,
    *,
    granularity: str = "m",
    points: int = 60,
    now: datetime | None = None,
    dim_ids: list[int] | None = None,
) -> dict:
    """Requests per bucket by status class for one dimension value (None: all of them; or
    the values `dim_ids`, merged), gaps filled with zeros, plus totals and latency
    percentiles over the whole range."""
    step = STEP[granularity]
    end = bucket_start(now or timezone.now(), granularity)
    start = end - step * (points - 1)
    rows = Rollup.objects.filter(
        granularity=granularity, dimension=dimension, bucket__gte=start, bucket__lte=end
    )
    if dim_id is not None:
        rows = rows.filter(dim_id=dim_id)
    if dim_ids is not None:
        rows = rows.filter(dim_id__in=dim_ids)
    rows = list(
        rows.values("bucket", "status_class").annotate(
            n=Sum("count"), err=Sum("errors"), **{h: Sum(h) for h in HISTOGRAM_FIELDS}
        )
    )
    index = {start + step * i: i for i in range(points)}
    series = {label: [0] * points for label in STATUS_CLASSES.values()}
    histogram = [0] * len(HISTOGRAM_FIELDS)
    total = errors = 0
    for r in rows:
        i = index.get(r["bucket"])
        label = STATUS_CLASSES.get(r["status_class"])
        if i is None:
            continue
        if label is not None:
            series[label][i] += r["n"]
        total += r["n"]
        errors += r["err"]
        for j, h in enumerate(HISTOGRAM_FIELDS):
            histogram[j] += r[h]
    server_errors = sum(series["5xx"])
    return {
        "labels": [t.strftime(LABEL_FORMAT[granularity]) for t in index],
        "series": series,
        "total": total,
        "gateway_errors": errors,
        "error_rate": round(server_errors / total, 4) if total else 0.0,  # 5xx share
        "latency_ms": percentiles(histogram),
    }


def key_usage_series(key_pk: int, *, minutes: int = 60, now: datetime | None = None) -> dict:
    """Requests per minute for one key over the last `minutes`, by status class."""
    return usage_series("key", key_pk, granularity="m", points=minutes, now=now)


RANGES = {  # name -> (granularity, points)
    "24h": ("h", 24),
    "7d": ("h", 24 * 7),
    "30d": ("d", 30),
}
SERIES_RANGES = {"60m": ("m", 60), **RANGES}  # what charts of one key or consumer offer


def top_window(name: str, *, now: datetime | None = None) -> tuple[str, datetime]:
    """The (granularity, since) that the top-N tables of a dashboard range read.

    Ranges of days read day rows over whole UTC days (today's row is updated live), not
    hour rows: over 7 days that is 24x fewer rows to merge for the key dimension, which
    is what keeps these queries fast at millions of requests a day (bench/dashboard.py).
    """
    granularity, points = RANGES[name]
    now = now or timezone.now()
    if granularity == "h" and points <= 48:
        return "h", bucket_start(now, "h") - STEP["h"] * (points - 1)
    days = -(-points * STEP[granularity] // STEP["d"])  # ceiling
    return "d", bucket_start(now, "d") - STEP["d"] * (days - 1)


def _ranked(dimension: str, granularity: str, since: datetime):
    """Requests and 5xx per dimension value since `since`: an index-only scan on PostgreSQL
    (the rollup_range index holds dim_id, status_class and count)."""
    return (
        Rollup.objects.filter(granularity=granularity, dimension=dimension, bucket__gte=since)
        .values("dim_id")
        .annotate(n=Sum("count"), server_errors=Sum("count", filter=Q(status_class=5)))
    )


def _histograms(dimension: str, granularity: str, since: datetime, ids) -> dict[int, list[int]]:
    """Merged latency histograms of a few dimension values (read through the unique index)."""
    rows = (
        Rollup.objects.filter(
            granularity=granularity, dimension=dimension, dim_id__in=list(ids), bucket__gte=since
        )
        .values("dim_id")
        .annotate(**{h: Sum(h) for h in HISTOGRAM_FIELDS})
    )
    return {r["dim_id"]: [r[h] for h in HISTOGRAM_FIELDS] for r in rows}


def top(
    dimension: str,
    *,
    granularity: str,
    since: datetime,
    limit: int = 10,
) -> list[dict]:
    """The dimension values with the most requests since `since`: count, error rate, p95.

    Ranked first on counts alone; only the winners' histograms are read and merged.
    """
    rows = list(_ranked(dimension, granularity, since).order_by("-n", "dim_id")[:limit])
    histograms = _histograms(dimension, granularity, since, (r["dim_id"] for r in rows))
    empty = [0] * len(HISTOGRAM_FIELDS)
    return [
        {
            "dim_id": r["dim_id"],
            "count": r["n"],
            "error_rate": round((r["server_errors"] or 0) / r["n"], 4) if r["n"] else 0.0,
            "latency_ms": percentiles(histograms.get(r["dim_id"], empty), qs=(0.5, 0.95)),
        }
        for r in rows
    ]


def top_consumers(*, granularity: str, since: datetime, limit: int = 10) -> list[dict]:
    """The consumers with the most requests since `since`, their keys' rollups merged.

    Keys are the rollup dimension; a consumer is what owns them (through its
    subscriptions), so several and rotated keys add up. Keys since deleted count under
    consumer None. Ranked in the database (one join of the key rows to their owners, sorted
    and cut there); only the winners' histograms are read.
    """
    from django.db import connection

    from portal.models import ApiKey, Subscription

    rollup = connection.ops.quote_name(Rollup._meta.db_table)
    key_table = connection.ops.quote_name(ApiKey._meta.db_table)
    sub_table = connection.ops.quote_name(Subscription._meta.db_table)
    # Summed per key first (an index-only scan of the range), then the few thousand key
    # totals joined to their owners. Joining every rollup row instead: this ranking query
    # took 56-59 ms (p50, 30 days at full retention in bench/dashboard.py), now 34-38 ms.
    sql = f"""
        SELECT s.consumer_id, SUM(r.n) AS n, SUM(r.server_errors) AS server_errors
        FROM (
            SELECT dim_id, SUM(count) AS n,
                   SUM(CASE WHEN status_class = 5 THEN count ELSE 0 END) AS server_errors
            FROM {rollup}
            WHERE granularity = %s AND dimension = 'key' AND bucket >= %s
            GROUP BY dim_id
        ) r
        LEFT JOIN {key_table} k ON k.id = r.dim_id
        LEFT JOIN {sub_table} s ON s.id = k.subscription_id
        GROUP BY s.consumer_id
        ORDER BY n DESC, s.consumer_id IS NULL, s.consumer_id
        LIMIT %s
    """  # noqa: S608 - table names from model metadata; every value is a parameter
    with connection.cursor() as cursor:
        cursor.execute(sql, [granularity, since, limit])
        # SUM(bigint) is numeric on PostgreSQL: back to ints.
        ranked = [(c, int(n), int(e or 0)) for c, n, e in cursor.fetchall()]
    owners = [c for c, _, _ in ranked if c is not None]
    keys_of: dict[int | None, list[int]] = {}
    for pk, consumer in ApiKey.objects.filter(subscription__consumer_id__in=owners).values_list(
        "pk", "subscription__consumer_id"
    ):
        keys_of.setdefault(consumer, []).append(pk)
    if any(c is None for c, _, _ in ranked):
        # Rollup rows of keys that no longer exist: the ones no current key owns.
        known = set(ApiKey.objects.values_list("pk", flat=True))
        keys_of[None] = [
            k
            for k in _ranked("key", granularity, since).values_list("dim_id", flat=True)
            if k not in known
        ]
    histograms = _histograms(
        "key", granularity, since, (k for c, _, _ in ranked for k in keys_of.get(c, ()))
    )
    out = []
    for consumer_id, n, server_errors in ranked:
        histogram = [0] * len(HISTOGRAM_FIELDS)
        for k in keys_of.get(consumer_id, ()):
            for j, v in enumerate(histograms.get(k, ())):
                histogram[j] += v
        out.append(
            {
                "consumer_id": consumer_id,
                "count": n,
                "error_rate": round(server_errors / n, 4) if n else 0.0,
                "latency_ms": percentiles(histogram, qs=(0.5, 0.95)),
            }
        )
    return out


def export_rows(
    *,
    granularity: str,
    dimension: str,
    since: datetime,
    until: datetime,
    dim_id: int | None = None,
    dim_ids: list[int] | None = None,
):
    """Rollup rows for a CSV export, oldest first, streamed from the database."""
    rows = Rollup.objects.filter(
        granularity=granularity, dimension=dimension, bucket__gte=since, bucket__lt=until
    )
    if dim_id is not None:
        rows = rows.filter(dim_id=dim_id)
    if dim_ids is not None:
        rows = rows.filter(dim_id__in=dim_ids)
    return (
        rows.order_by("bucket", "dim_id", "status_class")
        .values_list(
            "bucket",
            "dimension",
            "dim_id",
            "api_id",
            "status_class",
            "count",
            "errors",
            "bytes_in",
            "bytes_out",
            "latency_ms_sum",
        )
        .iterator(chunk_size=2000)
    )


def totals_by(dimension: str, dim_ids: list[int], *, granularity: str, since: datetime) -> dict:
    """Requests per dimension value (of `dim_ids`) since `since`."""
    rows = (
        Rollup.objects.filter(
            granularity=granularity, dimension=dimension, dim_id__in=dim_ids, bucket__gte=since
        )
        .values("dim_id")
        .annotate(n=Sum("count"))
    )
    return {r["dim_id"]: r["n"] for r in rows}


def key_api_dim_ids(key_ids: list[int], api_ids: list[int]) -> list[int]:
    """The "kapi" dim_ids of these keys' calls to these APIs."""
    from analytics.models import key_api_id

    out = (key_api_id(k, a) for k in key_ids for a in api_ids)
    return [d for d in out if d is not None]


def totals_by_api(key_ids: list[int], api_ids: list[int], *, granularity: str, since) -> dict:
    """Requests per API of these keys since `since` (from the key × API rollups)."""
    rows = (
        Rollup.objects.filter(
            granularity=granularity,
            dimension="kapi",
            dim_id__in=key_api_dim_ids(key_ids, api_ids),
            bucket__gte=since,
        )
        .values("api_id")
        .annotate(n=Sum("count"))
    )
    return {r["api_id"]: r["n"] for r in rows}
