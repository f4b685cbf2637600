"""Chart and dashboard reads: error rate, top N consumers, the windows the tables read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from analytics.ingest import ingest_batch
from analytics.selectors import top, top_consumers, top_window, usage_series
from tests.conftest import active_key
from tests.test_ingest import event

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 20, 15, 30, tzinfo=UTC)


def _event(key: int | None, *, status: int = 200, ms: float = 3.0, t: datetime = NOW) -> dict:
    return event(key, status, t.timestamp(), ms=ms)


def test_series_reports_the_5xx_share_as_error_rate():
    ingest_batch([_event(None) for _ in range(3)] + [_event(None, status=503)])
    series = usage_series("api", None, granularity="h", points=24, now=NOW)
    assert series["total"] == 4
    assert series["error_rate"] == 0.25
    assert usage_series("api", 99, granularity="h", points=24, now=NOW)["error_rate"] == 0.0


def test_top_consumers_add_up_each_consumers_keys(developer, stranger, catalog):
    first = active_key(developer, catalog.free, name="first")
    from portal.keys import key_issue

    second = key_issue(first.api_key.subscription, name="second")
    theirs = active_key(stranger, catalog.free)
    ingest_batch(
        [_event(first.api_key.pk) for _ in range(3)]
        + [_event(second.api_key.pk, status=500, ms=700.0) for _ in range(2)]
        + [_event(theirs.api_key.pk) for _ in range(4)]
        + [_event(424242) for _ in range(1)]  # a key deleted since
    )
    since = NOW - timedelta(hours=1)
    ranked = top_consumers(granularity="h", since=since)
    mine = first.api_key.subscription.consumer_id
    assert [(r["consumer_id"], r["count"]) for r in ranked] == [
        (mine, 5),  # 3 + 2 over two keys: more than the stranger's single key
        (theirs.api_key.subscription.consumer_id, 4),
        (None, 1),
    ]
    assert ranked[0]["error_rate"] == 0.4
    assert 500 < ranked[0]["latency_ms"]["p95"] <= 1000  # from both keys' histograms
    assert top_consumers(granularity="h", since=since, limit=1)[0]["consumer_id"] == mine
    keys = top("key", granularity="h", since=since)
    assert [r["count"] for r in keys] == [4, 3, 2, 1]
    assert keys[2]["error_rate"] == 1.0 and keys[2]["latency_ms"]["p50"] > 500


def test_top_tables_read_hours_for_a_day_and_whole_days_beyond():
    assert top_window("24h", now=NOW) == ("h", datetime(2026, 11, 19, 16, tzinfo=UTC))
    assert top_window("7d", now=NOW) == ("d", datetime(2026, 11, 14, tzinfo=UTC))
    assert top_window("30d", now=NOW) == ("d", datetime(2026, 10, 22, tzinfo=UTC))
    ingest_batch([_event(5, t=NOW - timedelta(days=6, hours=15)), _event(5)])  # day 6 ago
    granularity, since = top_window("7d", now=NOW)
    assert top("key", granularity=granularity, since=since)[0]["count"] == 2
