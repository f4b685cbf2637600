"""Reads for charts: always from rollups, never from raw events."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db.models import Sum
from django.utils import timezone

from analytics.models import MinuteRollup

STATUS_CLASSES = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def key_usage_series(key_pk: int, *, minutes: int = 60, now: datetime | None = None) -> dict:
    """Requests per minute for one key over the last `minutes`, by status class, gaps filled."""
    now = now or timezone.now()
    end = now.replace(second=0, microsecond=0)
    start = end - timedelta(minutes=minutes - 1)
    rows = (
        MinuteRollup.objects.filter(key_id=key_pk, bucket__gte=start, bucket__lte=end)
        .values("bucket", "status_class")
        .annotate(n=Sum("count"))
    )
    index = {start + timedelta(minutes=i): i for i in range(minutes)}
    series = {label: [0] * minutes for label in STATUS_CLASSES.values()}
    total = 0
    for r in rows:
        i = index.get(r["bucket"])
        label = STATUS_CLASSES.get(r["status_class"])
        if i is None or label is None:
            continue
        series[label][i] += r["n"]
        total += r["n"]
    return {
        "labels": [t.strftime("%H:%M") for t in index],
        "series": series,
        "total": total,
    }
