from __future__ import annotations

from celery import shared_task

from analytics.ingest import ingest_pending
from analytics.retention import analytics_prune


@shared_task(ignore_result=True)
def ingest_events() -> int:
    """Ingest shipped gateway log events into raw events and rollups."""
    return ingest_pending()


@shared_task(ignore_result=True)
def prune_analytics() -> dict[str, int]:
    """Drop raw events and minute rollups past their retention, in short batches."""
    return analytics_prune()
