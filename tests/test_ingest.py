"""Log ingest: at least once in, exactly once counted; rollups read by the charts."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest
from django.conf import settings
from django.db.models import Sum

from analytics.ingest import ingest_batch, ingest_spool, ingest_stream
from analytics.models import RequestEvent, Rollup
from analytics.selectors import key_usage_series, usage_series
from gateway.dataplane.logship import EVENT_FIELDS, encode_batch
from portal.models import ApiKey
from tests.conftest import active_key

pytestmark = pytest.mark.django_db

NOW = time.time()


def event(key_id: int | None = None, status: int = 200, t: float = NOW, **kw) -> dict:
    return {
        "id": uuid.uuid4().hex,
        "t": t,
        "api": 1,
        "route": 1,
        "route_path": "/",
        "consumer": 1,
        "key": key_id,
        "org": None,
        "method": "GET",
        "status": status,
        "ms": 2.5,
        "up_ms": 1.5,
        "in": 10,
        "out": 100,
        "err": "",
        **kw,
    }


def rollup_total() -> int:
    rows = Rollup.objects.filter(granularity="m", dimension="api")
    return rows.aggregate(n=Sum("count"))["n"] or 0


def test_a_batch_is_rolled_up_per_minute_hour_and_day_for_every_dimension():
    batch = [
        event(7, org=3),
        event(7, org=3, ms=30.0),
        event(7, status=404, org=3),
        event(8, status=502, err="upstream_error"),
    ]
    assert ingest_batch(batch) == 4
    assert RequestEvent.objects.count() == 4
    for gran in "mhd":
        by_class = dict(
            Rollup.objects.filter(granularity=gran, dimension="key", dim_id=7)
            .values_list("status_class")
            .annotate(n=Sum("count"))
        )
        assert by_class == {2: 2, 4: 1}, gran
        assert (
            Rollup.objects.get(granularity=gran, dimension="org", dim_id=3, status_class=2).count
            == 2
        )
        api_rows = Rollup.objects.filter(granularity=gran, dimension="api", dim_id=1)
        assert api_rows.aggregate(n=Sum("count"))["n"] == 4
        route_rows = Rollup.objects.filter(granularity=gran, dimension="route", dim_id=1)
        assert route_rows.aggregate(n=Sum("count"))["n"] == 4
    row = Rollup.objects.get(granularity="m", dimension="key", dim_id=7, status_class=2)
    assert row.bytes_out == 200
    assert row.latency_ms_sum == pytest.approx(32.5)
    assert (row.h2, row.h5) == (1, 1)  # 2.5 ms in (2, 5], 30 ms in (20, 50]
    failed = Rollup.objects.get(granularity="h", dimension="key", dim_id=8)
    assert (failed.status_class, failed.errors) == (5, 1)


def test_percentiles_come_from_merged_histograms():
    from analytics.selectors import percentiles

    assert percentiles([0] * 16) == {"p50": None, "p95": None, "p99": None}
    hist = [0] * 16
    hist[3] = 100  # 100 requests in (5, 10] ms
    p = percentiles(hist)
    assert 5 <= p["p50"] <= 10 and 5 <= p["p99"] <= 10
    hist[15] = 100  # and 100 above 60 s
    assert percentiles(hist)["p99"] == 60_000


def test_a_redelivered_batch_changes_nothing():
    batch = [event(7) for _ in range(5)]
    assert ingest_batch(batch) == 5
    assert ingest_batch(batch) == 0
    assert ingest_batch(batch[:2] + [event(7)]) == 1  # partly seen: only the new one counts
    assert RequestEvent.objects.count() == 6
    assert rollup_total() == 6


def test_malformed_events_are_skipped_not_fatal():
    bad = [
        {"nope": 1},
        {"id": "x", "t": "soon", "status": 200},
        event(7, t=1e20),  # would overflow a datetime
        event(7, status=-1),
        event(7, status=1000),
        event(7, **{"in": -5}),
        event(7, ms=float("nan")),
        event(7, key=2**70),
    ]
    assert ingest_batch([*bad, event(7)]) == 1


def test_a_poisoned_spool_file_does_not_block_the_ones_behind_it(tmp_path, monkeypatch):
    from django.db import IntegrityError

    import analytics.ingest as ingest

    poison = event(3)
    (tmp_path / "00000000000000000001-1-00000001.json").write_bytes(batch_of(poison))
    (tmp_path / "00000000000000000002-1-00000002.json").write_bytes(batch_of(event(3)))
    real = ingest.ingest_batch

    def refuses_the_poison(batch):
        # Several files go in one transaction; one the database refuses fails all of it.
        if any(e["id"] == poison["id"] for e in batch):
            raise IntegrityError("refused")
        return real(batch)

    monkeypatch.setattr(ingest, "ingest_batch", refuses_the_poison)
    assert ingest_spool(tmp_path) == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00000000000000000001-1-00000001.json.unreadable"]


def test_last_used_is_set_from_the_log(developer, catalog):
    issued = active_key(developer, catalog.free)
    t = NOW - 30
    ingest_batch([event(issued.api_key.pk, t=t)])
    last = ApiKey.objects.get(pk=issued.api_key.pk).last_used_at
    assert last == datetime.fromtimestamp(t, UTC)
    ingest_batch([event(issued.api_key.pk, t=t - 100)])  # older events do not move it back
    assert ApiKey.objects.get(pk=issued.api_key.pk).last_used_at == last


def batch_of(*events: dict) -> bytes:
    """Events in the gateway's wire format."""
    return encode_batch([tuple(e.get(f) for f in EVENT_FIELDS) for e in events])


def test_spool_files_are_removed_only_after_ingest(tmp_path):
    (tmp_path / "00000000000000000001-1-00000001.json").write_bytes(
        batch_of(event(3), event(3), event(3))
    )
    (tmp_path / ".00000000000000000002-1-00000002.json.tmp").write_bytes(batch_of(event(3)))
    (tmp_path / "00000000000000000003-1-00000003.json").write_bytes(b"{truncated")
    assert ingest_spool(tmp_path) == 3
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == [
        ".00000000000000000002-1-00000002.json.tmp",  # half-written: left for later
        "00000000000000000003-1-00000003.json.unreadable",  # kept aside, not deleted
    ]


def test_usage_series_fills_gaps_and_reads_rollups():
    now = datetime.now(UTC)
    ingest_batch([event(5, t=now.timestamp()), event(5, status=500, t=now.timestamp())])
    usage = key_usage_series(5, minutes=10, now=now)
    assert len(usage["labels"]) == 10
    assert usage["series"]["2xx"][-1] == 1
    assert usage["series"]["5xx"][-1] == 1
    assert sum(usage["series"]["2xx"][:-1]) == 0
    assert usage["total"] == 2
    assert 2 <= usage["latency_ms"]["p50"] <= 5
    daily = usage_series("key", 5, granularity="d", points=7, now=now)
    assert daily["total"] == 2 and len(daily["labels"]) == 7


@pytest.mark.skipif(not settings.REDIS_URL, reason="REDIS_URL not set")
def test_stream_entries_are_acknowledged_after_commit_and_redelivery_counts_once():
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"test:events:{uuid.uuid4().hex}"
    try:
        events = [event(4) for _ in range(3)]
        client.xadd(stream, {"batch": batch_of(*events[:2])})
        client.xadd(stream, {"batch": batch_of(events[2])})
        assert ingest_stream(client, stream) == 3
        assert client.xlen(stream) == 0  # acknowledged and deleted
        pending = client.xpending(stream, "ingest")
        assert pending["pending"] == 0
        # The same events shipped again (a gateway retry): nothing is counted twice.
        client.xadd(stream, {"batch": batch_of(*events)})
        assert ingest_stream(client, stream) == 0
        assert rollup_total() == 3
    finally:
        client.delete(stream)
        client.close()


def test_retention_prunes_old_raw_events_and_minute_rollups_only(settings):
    from datetime import timedelta

    from analytics.retention import analytics_prune

    settings.ANALYTICS = {**settings.ANALYTICS, "PRUNE_BATCH": 100}
    old = NOW - 40 * 86400
    ingest_batch([event(9, t=old) for _ in range(250)] + [event(9) for _ in range(3)])
    result = analytics_prune()
    assert result["raw_events"] == 250
    assert RequestEvent.objects.count() == 3
    assert result["minute_rollups"] >= 1
    cutoff = datetime.now(UTC) - timedelta(days=14)
    assert not Rollup.objects.filter(granularity="m", bucket__lt=cutoff).exists()
    assert Rollup.objects.filter(granularity="d", bucket__lt=cutoff).exists()  # kept


def test_rollups_rebuild_from_raw_events_gives_the_same_numbers():
    from datetime import timedelta

    from django.core.management import call_command

    ingest_batch([event(11, status=s) for s in (200, 200, 404, 500)])
    before = sorted(
        Rollup.objects.values_list("granularity", "dimension", "dim_id", "status_class", "count")
    )
    Rollup.objects.all().delete()
    day = datetime.fromtimestamp(NOW, UTC).date()  # the events' day (NOW: collection time)
    call_command(
        "rebuildrollups", since=day.isoformat(), until=(day + timedelta(days=1)).isoformat()
    )
    after = sorted(
        Rollup.objects.values_list("granularity", "dimension", "dim_id", "status_class", "count")
    )
    assert after == before


def test_rollups_written_by_ingest_equal_the_python_aggregation():
    """PostgreSQL aggregates in SQL, SQLite and rebuilds in Python: the rows must agree,
    latencies on bucket bounds and keys that span APIs included."""
    from analytics.ingest import aggregate, parse_event

    base = datetime(2026, 11, 30, 23, 59, 58, tzinfo=UTC).timestamp()  # across a day
    batch = [
        event(7, t=base + i * 0.7, ms=ms, status=status, api=api, route=route, org=org, err=err)
        for i, (ms, status, api, route, org, err) in enumerate(
            [
                (1.0, 200, 2, 3, 9, ""),  # exactly on a bound: bucket h0
                (1.001, 201, 1, 1, None, ""),
                (5.0, 404, 1, None, 9, ""),
                (60_000.0, 502, 2, 3, 9, "upstream_error"),
                (61_000.0, 503, None, None, None, "no_target"),
                (0.0, 101, 1, 1, None, ""),
                (20.0, 302, 2, 4, 9, ""),
            ]
        )
    ]
    assert ingest_batch(batch) == len(batch)
    expected = {
        (g, dim, dim_id, bucket, cls): [row[0], *row[1:]]
        for (g, dim, dim_id, bucket, cls), row in aggregate([parse_event(e) for e in batch]).items()
    }
    from analytics.ingest import _ADDITIVE

    stored = {
        (r.granularity, r.dimension, r.dim_id, r.bucket, r.status_class): [
            r.api_id,
            *(getattr(r, c) for c in _ADDITIVE),
        ]
        for r in Rollup.objects.all()
    }
    assert stored.keys() == expected.keys()
    for k, row in expected.items():
        assert stored[k][0] == row[0], k  # the lowest API of a key or organization
        assert stored[k][1:6] == pytest.approx(row[1:6]), k
        assert stored[k][6:] == row[6:], k  # the histogram
    assert {k[3].day for k in stored if k[0] == "d"} == {30, 1}  # two UTC days
