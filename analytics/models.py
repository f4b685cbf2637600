"""Raw gateway log events and the rollups that charts read."""

from __future__ import annotations

from django.db import models


class RequestEvent(models.Model):
    """One gateway request, as logged; event_id is the request id. Never holds a secret."""

    event_id = models.CharField(max_length=64, unique=True)
    time = models.DateTimeField(db_index=True)
    api_id = models.BigIntegerField(null=True)
    route_id = models.BigIntegerField(null=True)
    consumer_id = models.BigIntegerField(null=True)
    key_id = models.BigIntegerField(null=True)
    organization_id = models.BigIntegerField(null=True)
    method = models.CharField(max_length=16)
    route_path = models.CharField(max_length=200, blank=True)
    status = models.PositiveSmallIntegerField()
    latency_ms = models.FloatField()
    upstream_latency_ms = models.FloatField(null=True)
    bytes_in = models.BigIntegerField(default=0)
    bytes_out = models.BigIntegerField(default=0)
    error_kind = models.CharField(max_length=32, blank=True)

    def __str__(self) -> str:
        return f"{self.time:%Y-%m-%d %H:%M:%S} {self.method} {self.status}"


# Upper bounds (ms) of the latency histogram buckets; the last bucket is everything above.
LATENCY_BUCKETS_MS = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000
)  # fmt: skip
HISTOGRAM_FIELDS = tuple(f"h{i}" for i in range(len(LATENCY_BUCKETS_MS) + 1))


KEY_API_SHIFT = 20  # API ids below 2**20 get key × API rows; key ids up to 2**43


def key_api_id(key_id: int, api_id: int) -> int | None:
    """The dim_id of a key's calls to one API (None: an API id too large to encode)."""
    if not key_id or not api_id or api_id >= 1 << KEY_API_SHIFT:
        return None
    return (key_id << KEY_API_SHIFT) | api_id


class Rollup(models.Model):
    """Requests per time bucket for one dimension value and status class.

    One narrow table for every granularity (minute, hour, day) and dimension (API, route,
    key, organization): charts and exports read and merge these rows, never raw events.
    Latency is a fixed-bucket histogram (h0..h15, bounds in LATENCY_BUCKETS_MS), so
    percentiles can be read from any merge of rows.
    """

    class Granularity(models.TextChoices):
        MINUTE = "m", "minute"
        HOUR = "h", "hour"
        DAY = "d", "day"

    class Dimension(models.TextChoices):
        API = "api", "API"
        ROUTE = "route", "API route"
        KEY = "key", "API key"
        ORG = "org", "organization"
        KEY_API = "kapi", "API key × API"  # dim_id = key_api_id(key, api)

    granularity = models.CharField(max_length=1, choices=Granularity.choices)
    bucket = models.DateTimeField()
    dimension = models.CharField(max_length=5, choices=Dimension.choices)
    dim_id = models.BigIntegerField()  # 0 stands for "none" (e.g. requests without a key)
    api_id = models.BigIntegerField()  # 0 when no API matched
    status_class = models.PositiveSmallIntegerField()  # 1..5 for 1xx..5xx
    count = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)  # gateway-side failures (error kind set)
    bytes_in = models.BigIntegerField(default=0)
    bytes_out = models.BigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0)
    h0 = models.BigIntegerField(default=0)
    h1 = models.BigIntegerField(default=0)
    h2 = models.BigIntegerField(default=0)
    h3 = models.BigIntegerField(default=0)
    h4 = models.BigIntegerField(default=0)
    h5 = models.BigIntegerField(default=0)
    h6 = models.BigIntegerField(default=0)
    h7 = models.BigIntegerField(default=0)
    h8 = models.BigIntegerField(default=0)
    h9 = models.BigIntegerField(default=0)
    h10 = models.BigIntegerField(default=0)
    h11 = models.BigIntegerField(default=0)
    h12 = models.BigIntegerField(default=0)
    h13 = models.BigIntegerField(default=0)
    h14 = models.BigIntegerField(default=0)
    h15 = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["granularity", "dimension", "dim_id", "bucket", "status_class"],
                name="rollup_unique",
            )
        ]
        indexes = [
            models.Index(fields=["granularity", "bucket"]),  # retention: expired buckets
            # Charts and top-N tables read one granularity and dimension over a range of
            # buckets; the included columns rank dimension values by an index-only scan on
            # PostgreSQL (bench/dashboard.py: top keys over 24 h ~45 ms, ~300 ms without
            # `count` here, a seq scan without the index). The price: `count` in an index
            # makes every rollup upsert a non-HOT update, ~25 % of ingest speed with
            # 1,000-event transactions (bench/ingest.py).
            models.Index(
                fields=["granularity", "dimension", "bucket"],
                include=["dim_id", "status_class", "count"],
                name="rollup_range",
            ),
        ]

    def __str__(self) -> str:
        when = f"{self.bucket:%Y-%m-%d %H:%M}"
        return f"{self.get_granularity_display()} {when} {self.dimension} {self.dim_id}"
