"""A Celery ingest worker killed with SIGKILL mid-batch loses nothing and counts nothing twice."""

from __future__ import annotations

import shutil
import signal
import time
import uuid

import pytest
from django.conf import settings
from django.db.models import Sum

from analytics.models import RequestEvent, Rollup
from gateway.dataplane.logship import EVENT_FIELDS, encode_batch
from tests.procs import BIN, Proc, child_env, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

FILES, PER_FILE = 60, 500
TOTAL = FILES * PER_FILE


def _batch(now: float) -> bytes:
    events = []
    for i in range(PER_FILE):
        e = {f: None for f in EVENT_FIELDS}
        e.update(
            id=uuid.uuid4().hex,
            t=now - i * 0.01,
            api=1,
            route=1,
            route_path="/",
            key=1,
            method="GET",
            status=200,
            ms=1.0,
            up_ms=0.5,
            err="",
        )
        e["in"], e["out"] = 0, 10
        events.append(tuple(e[f] for f in EVENT_FIELDS))
    return encode_batch(events)


def _ship_events() -> None:
    """What gateways would have shipped: FILES batches in the spool or the stream."""
    now = time.time()
    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        client.flushdb()
        for _ in range(FILES):
            client.xadd(settings.GATEWAY["LOG_STREAM"], {"batch": _batch(now)})
        client.close()
        return
    spool = settings.GATEWAY["LOG_SPOOL_DIR"]
    shutil.rmtree(spool, ignore_errors=True)
    from pathlib import Path

    Path(spool).mkdir(parents=True)
    for n in range(FILES):
        (Path(spool) / f"{time.time_ns():020d}-1-{n:08d}.json").write_bytes(_batch(now))


def _worker(tmp_path, name: str) -> Proc:
    from tests.conftest import _database_url

    env = child_env(
        DATABASE_URL=_database_url(),
        SECRET_KEY=settings.SECRET_KEY,
        ANALYTICS_CLAIM_IDLE_SECONDS="1",
    )
    return Proc(
        name,
        [
            str(BIN / "celery"),
            "-A",
            "config",
            "worker",
            "--pool",
            "solo",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        env=env,
        log_dir=tmp_path,
    )


def _purge_queue() -> None:
    from config.celery import app

    app.control.purge()


def test_sigkill_mid_batch_loses_nothing_and_counts_nothing_twice(tmp_path):
    from analytics.tasks import ingest_events

    _purge_queue()
    _ship_events()
    first = _worker(tmp_path, "ingest-1")
    try:
        ingest_events.delay()
        wait_until(
            lambda: RequestEvent.objects.count() >= PER_FILE,
            timeout=60,
            interval=0.01,
            what="the first worker to commit a batch\n" + first.output(),
        )
        first.signal(signal.SIGKILL)  # mid-run: some batches committed, the rest not
        first.popen.wait(10)
        stored = RequestEvent.objects.count()
        assert 0 < stored < TOTAL, f"the kill came too late to prove anything ({stored})"
        print(f"killed with {stored} of {TOTAL} events stored")
    finally:
        first.stop()

    second = _worker(tmp_path, "ingest-2")
    try:
        ingest_events.delay()

        def done() -> bool:
            if RequestEvent.objects.count() == TOTAL:
                return True
            ingest_events.delay()  # Redis: the dead worker's entries are claimable after 1 s
            return False

        wait_until(
            done, timeout=90, interval=1.0, what="every event to be ingested\n" + second.output()
        )
    finally:
        second.stop()
    for gran in "mhd":
        rows = Rollup.objects.filter(granularity=gran, dimension="api")
        assert rows.aggregate(n=Sum("count"))["n"] == TOTAL
    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        assert client.xlen(settings.GATEWAY["LOG_STREAM"]) == 0
        client.close()
    else:
        from pathlib import Path

        assert not list(Path(settings.GATEWAY["LOG_SPOOL_DIR"]).glob("[0-9]*.json"))
