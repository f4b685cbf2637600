"""Retention and repair: prune raw events in short batches; rebuild rollups from raw events."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from analytics.ingest import Event, _upsert_rollups, pg_rebuild_sql
from analytics.models import RequestEvent, Rollup
from analytics.selectors import bucket_start


def _prune(queryset, *, batch: int, max_batches: int) -> int:
    """Delete in batches of ids: each batch is its own short transaction (no long lock)."""
    total = 0
    for _ in range(max_batches):
        ids = list(queryset.order_by("id").values_list("id", flat=True)[:batch])
        if not ids:
            break
        queryset.model.objects.filter(id__in=ids).delete()
        total += len(ids)
    return total


def analytics_prune(*, now: datetime | None = None, max_batches: int = 1000) -> dict[str, int]:
    """Drop raw events and minute rollups past their retention; hour and day rollups stay."""
    now = now or timezone.now()
    cfg = settings.ANALYTICS
    batch = cfg["PRUNE_BATCH"]
    raw_cutoff = now - timedelta(days=cfg["RAW_RETENTION_DAYS"])
    minute_cutoff = now - timedelta(days=cfg["MINUTE_ROLLUP_RETENTION_DAYS"])
    return {
        "raw_events": _prune(
            RequestEvent.objects.filter(time__lt=raw_cutoff), batch=batch, max_batches=max_batches
        ),
        "minute_rollups": _prune(
            Rollup.objects.filter(granularity="m", bucket__lt=minute_cutoff),
            batch=batch,
            max_batches=max_batches,
        ),
    }


def rollups_rebuild(*, since: datetime, until: datetime, chunk: int = 5000) -> int:
    """Recompute every rollup of the whole UTC days covering [since, until) from raw events.

    Runs in one transaction, so readers see the old rollups or the new, never a mix. Only
    as good as the raw events still kept (ANALYTICS_RAW_RETENTION_DAYS).
    """
    start = bucket_start(since, "d")
    end = bucket_start(until, "d")
    if end < until:
        end += timedelta(days=1)
    ops = connection.ops
    n = 0
    with transaction.atomic():
        Rollup.objects.filter(bucket__gte=start, bucket__lt=end).delete()
        if connection.vendor == "postgresql":  # one statement, aggregated on the server
            with connection.cursor() as cur:
                cur.execute(pg_rebuild_sql(), [start, end])
                return cur.fetchone()[0]
        rows = RequestEvent.objects.filter(time__gte=start, time__lt=end).order_by("id")
        last_id = 0
        while True:
            events = list(rows.filter(id__gt=last_id)[:chunk])
            if not events:
                break
            last_id = events[-1].id
            _upsert_rollups([_event(r) for r in events], ops)
            n += len(events)
    return n


def _event(r: RequestEvent) -> Event:
    return Event(
        event_id=r.event_id,
        time=r.time,
        api_id=r.api_id,
        route_id=r.route_id,
        consumer_id=r.consumer_id,
        key_id=r.key_id,
        organization_id=r.organization_id,
        method=r.method,
        route_path=r.route_path,
        status=r.status,
        latency_ms=r.latency_ms,
        upstream_latency_ms=r.upstream_latency_ms,
        bytes_in=r.bytes_in,
        bytes_out=r.bytes_out,
        error_kind=r.error_kind,
    )
