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


class MinuteRollup(models.Model):
    """Requests per minute by API, key and status class. 0 stands for "none" in ids."""

    bucket = models.DateTimeField()
    api_id = models.BigIntegerField()
    key_id = models.BigIntegerField()
    status_class = models.PositiveSmallIntegerField()  # 1..5 for 1xx..5xx
    count = models.BigIntegerField(default=0)
    bytes_in = models.BigIntegerField(default=0)
    bytes_out = models.BigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0)
    latency_ms_max = models.FloatField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["bucket", "api_id", "key_id", "status_class"], name="minute_rollup_unique"
            )
        ]
        indexes = [models.Index(fields=["key_id", "bucket"]), models.Index(fields=["bucket"])]

    def __str__(self) -> str:
        return f"{self.bucket:%Y-%m-%d %H:%M} api {self.api_id} key {self.key_id}"
