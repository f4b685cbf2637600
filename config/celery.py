"""The Celery app. Periodic tasks are all declared here."""

from __future__ import annotations

import os

from celery import Celery
from django.conf import settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("apigw")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

app.conf.beat_schedule = {
    # Short interval: the portal's charts should show a request within a few seconds.
    "ingest-gateway-events": {
        "task": "analytics.tasks.ingest_events",
        "schedule": settings.ANALYTICS["INGEST_INTERVAL_SECONDS"],
        # A stopped worker must not come back to a pile of stale ticks.
        "options": {"expires": 10},
    },
    "prune-analytics": {
        "task": "analytics.tasks.prune_analytics",
        "schedule": 3600.0,
        "options": {"expires": 600},
    },
}
