"""End to end: requests through the real gateway become exactly that many events and rollup
counts in the real Celery worker; a batch delivered again changes nothing."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.db.models import Sum

from analytics.models import RequestEvent, Rollup
from gateway.dataplane.logship import EVENT_FIELDS, encode_batch
from tests.conftest import active_key, make_user, wait_for_key
from tests.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

OK, FAILED = 30, 6  # requests answered 200 and 503 by the upstream


def _counts(key_pk: int) -> dict[str, dict[int, int]]:
    """Requests per granularity and status class in the key's rollups."""
    out: dict[str, dict[int, int]] = {}
    rows = (
        Rollup.objects.filter(dimension="key", dim_id=key_pk)
        .values("granularity", "status_class")
        .annotate(n=Sum("count"))
    )
    for r in rows:
        out.setdefault(r["granularity"], {})[r["status_class"]] = r["n"]
    return out


def _reship(events: list[RequestEvent], stack) -> None:
    """Deliver these events again, as a gateway retry or a redelivered stream entry would."""
    batch = encode_batch(
        [
            tuple(
                {
                    "id": e.event_id,
                    "t": e.time.timestamp(),
                    "api": e.api_id,
                    "route": e.route_id,
                    "route_path": e.route_path,
                    "consumer": e.consumer_id,
                    "key": e.key_id,
                    "org": e.organization_id,
                    "method": e.method,
                    "status": e.status,
                    "ms": e.latency_ms,
                    "up_ms": e.upstream_latency_ms,
                    "in": e.bytes_in,
                    "out": e.bytes_out,
                    "err": e.error_kind,
                }.get(f)
                for f in EVENT_FIELDS
            )
            for e in events
        ]
    )
    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        try:
            client.xadd(settings.GATEWAY["LOG_STREAM"], {"batch": batch})
        finally:
            client.close()
    else:
        spool = Path(stack.env["VAR_DIR"]) / "spool"
        name = f"{time.time_ns():020d}-0-{uuid.uuid4().int % 10**8:08d}.json"
        (spool / f".{name}.tmp").write_bytes(batch)
        (spool / f".{name}.tmp").rename(spool / name)


def _set_aside(stack) -> int:
    """Batches that ingest refused (dead-letter stream entries, .unreadable spool files)."""
    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        try:
            return client.xlen(settings.GATEWAY["LOG_STREAM"] + ":dead")
        finally:
            client.close()
    return len(list((Path(stack.env["VAR_DIR"]) / "spool").glob("*.unreadable")))


def test_n_requests_are_n_events_and_n_in_every_rollup_and_redelivery_adds_none(stack, live):
    dev = make_user("analytics-e2e@example.com")
    counted = active_key(dev, live.free, name="counted")
    # Waiting for a key makes requests with it: a second key, issued after the counted one
    # (key changes apply in order), does the waiting and keeps the counted key's traffic exact.
    warmup = active_key(dev, live.free, name="warm-up")
    wait_for_key(stack, warmup.key)
    header = {"X-API-Key": counted.key}
    ids = set()
    for i in range(OK + FAILED):
        resp = stack.get("/demo/status/503" if i % 6 == 5 else f"/demo/n{i}", headers=header)
        assert resp.status_code == (503 if i % 6 == 5 else 200), resp.text
        ids.add(resp.headers["x-request-id"])
    assert len(ids) == OK + FAILED
    key_pk = counted.api_key.pk
    expected = {2: OK, 5: FAILED}
    wait_until(
        lambda: _counts(key_pk).get("d") == expected,
        timeout=30,
        interval=0.2,
        what="the worker to ingest every request\n" + stack.logs(),
    )
    stack.wait_ingest_idle()  # e.g. the warm-up's events: none committed between the totals
    events = list(RequestEvent.objects.filter(key_id=key_pk))
    assert sorted(e.event_id for e in events) == sorted(ids)  # each request once, no other
    assert _counts(key_pk) == {"m": expected, "h": expected, "d": expected}
    api_rows = Rollup.objects.filter(granularity="d", dimension="api", dim_id=live.api.pk)
    assert (
        api_rows.aggregate(n=Sum("count"))["n"]
        == RequestEvent.objects.filter(api_id=live.api.pk).count()
    )

    _reship(events, stack)
    stack.wait_ingest_idle()
    assert _set_aside(stack) == 0  # consumed by ingest, not parked as unreadable
    assert RequestEvent.objects.filter(key_id=key_pk).count() == OK + FAILED
    assert _counts(key_pk) == {"m": expected, "h": expected, "d": expected}
