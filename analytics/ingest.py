"""Ingest gateway log events: at least once in, exactly once counted.

Raw events are inserted with `ON CONFLICT (event_id) DO NOTHING RETURNING event_id`; only the
events that insert accepted feed the rollups, in the same transaction. A batch delivered twice
(a worker killed after commit, before it removed the file or acknowledged the stream entry)
therefore changes nothing the second time.
"""

from __future__ import annotations

import logging
import os
import socket
from bisect import bisect_left
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from django.conf import settings
from django.db import DataError, IntegrityError, connection, transaction

from analytics.models import (
    HISTOGRAM_FIELDS,
    KEY_API_SHIFT,
    LATENCY_BUCKETS_MS,
    RequestEvent,
    Rollup,
    key_api_id,
)
from gateway.dataplane.logship import decode_batch
from portal.models import ApiKey

log = logging.getLogger("analytics.ingest")

_RAW_COLUMNS = (
    "event_id",
    "time",
    "api_id",
    "route_id",
    "consumer_id",
    "key_id",
    "organization_id",
    "method",
    "route_path",
    "status",
    "latency_ms",
    "upstream_latency_ms",
    "bytes_in",
    "bytes_out",
    "error_kind",
)
BAD_SUFFIX = ".unreadable"
_CHUNK = 500  # rows per INSERT: 500 x 15 parameters stays under SQLite's variable limit


@dataclass
class Event:
    event_id: str
    time: datetime
    api_id: int | None
    route_id: int | None
    consumer_id: int | None
    key_id: int | None
    organization_id: int | None
    method: str
    route_path: str
    status: int
    latency_ms: float
    upstream_latency_ms: float | None
    bytes_in: int
    bytes_out: int
    error_kind: str


def _opt_int(v) -> int | None:
    if v is None:
        return None
    n = int(v)
    if not 0 < n < _INT_MAX:
        raise ValueError(f"id out of range: {n}")
    return n


def _millis(v) -> float | None:
    if v is None:
        return None
    ms = float(v)
    if not 0 <= ms < 1e9:  # also refuses NaN
        raise ValueError(f"latency out of range: {ms}")
    return ms


# Everything a malformed event can raise while being parsed.
MALFORMED = (KeyError, ValueError, TypeError, ArithmeticError)


_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC).timestamp()
_INT_MAX = 2**62


def _count(v) -> int:
    n = int(v or 0)
    if not 0 <= n < _INT_MAX:
        raise ValueError(f"count out of range: {n}")
    return n


def parse_event(raw: dict) -> Event:
    """An event from the gateway's wire form; raises MALFORMED on anything out of range."""
    t = float(raw["t"])
    if not _EARLIEST <= t <= datetime.now(UTC).timestamp() + 86400:
        raise ValueError(f"event time out of range: {t}")
    status = int(raw["status"])
    if not 100 <= status <= 599:
        raise ValueError(f"status out of range: {status}")
    event_id = str(raw["id"])[:64]
    if not event_id:
        raise ValueError("empty event id")
    return Event(
        event_id=event_id,
        time=datetime.fromtimestamp(t, UTC),
        api_id=_opt_int(raw.get("api")),
        route_id=_opt_int(raw.get("route")),
        consumer_id=_opt_int(raw.get("consumer")),
        key_id=_opt_int(raw.get("key")),
        organization_id=_opt_int(raw.get("org")),
        method=str(raw.get("method", ""))[:16],
        route_path=str(raw.get("route_path") or "")[:200],
        status=status,
        latency_ms=_millis(raw.get("ms")) or 0.0,
        upstream_latency_ms=_millis(raw.get("up_ms")),
        bytes_in=_count(raw.get("in")),
        bytes_out=_count(raw.get("out")),
        error_kind=str(raw.get("err") or "")[:32],
    )


def ingest_batch(raw_events: list[dict]) -> int:
    """Store a batch of events and update rollups; return how many were new."""
    events: dict[str, Event] = {}
    for raw in raw_events:
        try:
            e = parse_event(raw)
        except MALFORMED as exc:
            log.warning("skipping malformed event: %s", exc)
            continue
        events.setdefault(e.event_id, e)
    if not events:
        return 0
    if connection.vendor == "postgresql":
        with transaction.atomic():
            return _ingest_pg(list(events.values()))
    ops = connection.ops
    with transaction.atomic():
        new_ids: set[str] = set()
        items = list(events.values())
        for i in range(0, len(items), _CHUNK):
            new_ids |= _insert_raw(items[i : i + _CHUNK], ops)
        fresh = [events[i] for i in new_ids]
        _upsert_rollups(fresh, ops)
        _touch_keys(fresh)
    return len(fresh)


# --- PostgreSQL: COPY the batch in, then one statement does the rest on the server ----------
_BATCH_TABLE = "analytics_ingest_batch"  # a temporary table: private to the session
_RAW_PG_TYPES = (
    "text",
    "timestamptz",
    "int8",
    "int8",
    "int8",
    "int8",
    "int8",
    "text",
    "text",
    "int4",
    "float8",
    "float8",
    "int8",
    "int8",
    "text",
)


def _ingest_pg(events: list[Event]) -> int:
    """PostgreSQL: binary COPY into a temporary table, then one statement inserts the raw
    events (ON CONFLICT DO NOTHING), aggregates only the rows that insert returned into
    rollups, and sets the keys' last use: exactly once, in the caller's transaction.

    Aggregating on the server keeps Python's work per event to parsing and one COPY row;
    profiling the array-parameter version showed most of the time in client-side quoting
    of the rollup arrays (psycopg under Django binds parameters on the client).
    """
    with connection.cursor() as cur:
        cur.execute(_pg_batch_table_sql())
        # The table may hold rows of an earlier batch whose transaction was a savepoint.
        cur.execute(f"DELETE FROM {_BATCH_TABLE}")
        with cur.cursor.copy(
            f"COPY {_BATCH_TABLE} ({','.join(_RAW_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(_RAW_PG_TYPES)
            write = copy.write_row
            for e in events:
                write(
                    (
                        e.event_id,
                        e.time,
                        e.api_id,
                        e.route_id,
                        e.consumer_id,
                        e.key_id,
                        e.organization_id,
                        e.method,
                        e.route_path,
                        e.status,
                        e.latency_ms,
                        e.upstream_latency_ms,
                        e.bytes_in,
                        e.bytes_out,
                        e.error_kind,
                    )
                )
        cur.execute(_pg_ingest_sql())
        return cur.fetchone()[0]


@cache
def _pg_batch_table_sql() -> str:
    columns = ", ".join(f"{c} {t}" for c, t in zip(_RAW_COLUMNS, _RAW_PG_TYPES, strict=True))
    return f"CREATE TEMPORARY TABLE IF NOT EXISTS {_BATCH_TABLE} ({columns}) ON COMMIT DELETE ROWS"


@cache
def _pg_ingest_sql() -> str:
    """The statement behind _ingest_pg."""
    raw = RequestEvent._meta.db_table
    keys = ApiKey._meta.db_table
    columns = ",".join(_RAW_COLUMNS)
    return f"""
WITH new AS (
    INSERT INTO {raw} ({columns}) SELECT {columns} FROM {_BATCH_TABLE}
    ON CONFLICT (event_id) DO NOTHING
    RETURNING {", ".join(_PG_FACT_COLUMNS)}
), {_pg_rollup_ctes("new")}, last_use AS (
    UPDATE {keys} AS k SET last_used_at = u.t
    FROM (SELECT key_id, max(time) AS t FROM new WHERE key_id IS NOT NULL GROUP BY key_id) AS u
    WHERE k.id = u.key_id AND (k.last_used_at IS NULL OR k.last_used_at < u.t)
)
SELECT count(*) FROM new
"""


# What the rollups need of an event.
_PG_FACT_COLUMNS = (
    "time",
    "api_id",
    "route_id",
    "key_id",
    "organization_id",
    "status",
    "latency_ms",
    "bytes_in",
    "bytes_out",
    "error_kind",
)


def _pg_rollup_ctes(source: str) -> str:
    """CTEs `facts, rolled` that add the events of CTE `source` to the rollups (upsert).

    The same aggregation as aggregate(), in SQL: tests compare the two (a rebuild against
    the rollups that ingest wrote).
    """
    rollup = Rollup._meta.db_table
    # bisect_left(LATENCY_BUCKETS_MS, ms): the first bucket whose upper bound is >= ms.
    bucket = " ".join(f"WHEN latency_ms <= {b} THEN {i}" for i, b in enumerate(LATENCY_BUCKETS_MS))
    histogram = ", ".join(
        f"count(*) FILTER (WHERE h = {i}) AS {h}" for i, h in enumerate(HISTOGRAM_FIELDS)
    )
    unique = "granularity, dimension, dim_id, bucket, status_class"
    updates = ", ".join(f"{c} = {rollup}.{c} + excluded.{c}" for c in _ADDITIVE)
    sums = ", ".join(f"sum({c}) AS {c}" for c in _ADDITIVE)
    return f"""facts AS (
    SELECT date_trunc('minute', n.time, 'UTC') AS minute, d.dimension, d.dim_id,
           COALESCE(n.api_id, 0) AS api_id,
           LEAST(5, GREATEST(1, n.status / 100)) AS status_class,
           (n.error_kind <> '')::int AS error, n.bytes_in, n.bytes_out, n.latency_ms,
           CASE {bucket} ELSE {len(LATENCY_BUCKETS_MS)} END AS h
    FROM {source} AS n
    CROSS JOIN LATERAL (VALUES
        ('api', COALESCE(n.api_id, 0)),
        ('route', n.route_id),
        ('key', n.key_id),
        ('org', n.organization_id),
        ('kapi', CASE WHEN n.key_id IS NOT NULL AND n.api_id > 0
                       AND n.api_id < {1 << KEY_API_SHIFT}
                      THEN n.key_id * {1 << KEY_API_SHIFT} + n.api_id END)
    ) AS d (dimension, dim_id)
    WHERE d.dim_id IS NOT NULL
), minutes AS (
    -- Events into minute rows first; hour and day rows are sums of those (fewer rows).
    SELECT minute, dimension, dim_id, min(api_id) AS api_id, status_class,
           count(*) AS count, sum(error) AS errors, sum(bytes_in) AS bytes_in,
           sum(bytes_out) AS bytes_out, sum(latency_ms) AS latency_ms_sum, {histogram}
    FROM facts
    GROUP BY minute, dimension, dim_id, status_class
), buckets AS (
    SELECT 'm' AS granularity, minute AS bucket, dimension, dim_id, api_id, status_class,
           {", ".join(_ADDITIVE)}
    FROM minutes
    WHERE dimension <> 'kapi'  -- key x API: hour and day rows only (ingest cost)
    UNION ALL
    SELECT g.granularity, date_trunc(g.unit, minute, 'UTC'), dimension, dim_id, min(api_id),
           status_class, {sums}
    FROM minutes CROSS JOIN (VALUES ('h', 'hour'), ('d', 'day')) AS g (granularity, unit)
    GROUP BY g.granularity, date_trunc(g.unit, minute, 'UTC'), dimension, dim_id, status_class
), rolled AS (
    INSERT INTO {rollup} ({",".join(_ROLLUP_COLUMNS)})
    SELECT {",".join(_ROLLUP_COLUMNS)} FROM buckets
    -- One order for every ingester, so that concurrent batches cannot deadlock.
    ORDER BY granularity, dimension, dim_id, bucket, status_class
    ON CONFLICT ({unique}) DO UPDATE SET {updates}
)"""


@cache
def pg_rebuild_sql() -> str:
    """PostgreSQL: add the raw events of [%s, %s) to the rollups; returns their count."""
    raw = RequestEvent._meta.db_table
    return f"""
WITH src AS (
    SELECT {", ".join(_PG_FACT_COLUMNS)} FROM {raw} WHERE time >= %s AND time < %s
), {_pg_rollup_ctes("src")}
SELECT count(*) FROM src
"""


def _insert_raw(chunk: list[Event], ops) -> set[str]:
    table = RequestEvent._meta.db_table
    row = "(" + ",".join(["%s"] * len(_RAW_COLUMNS)) + ")"
    params: list[object] = []
    for e in chunk:
        values = [getattr(e, c) for c in _RAW_COLUMNS]
        values[1] = ops.adapt_datetimefield_value(e.time)  # "time" is the second column
        params += values
    sql = (
        f"INSERT INTO {table} ({','.join(_RAW_COLUMNS)}) VALUES {','.join([row] * len(chunk))} "
        "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
    )
    with connection.cursor() as cur:
        cur.execute(sql, params)
        return {r[0] for r in cur.fetchall()}


_ADDITIVE = ("count", "errors", "bytes_in", "bytes_out", "latency_ms_sum", *HISTOGRAM_FIELDS)
_ROLLUP_COLUMNS = (
    "granularity",
    "bucket",
    "dimension",
    "dim_id",
    "api_id",
    "status_class",
    *_ADDITIVE,
)
_NBUCKETS = len(HISTOGRAM_FIELDS)


def aggregate(events: list[Event]) -> dict[tuple, list]:
    """Pre-aggregate events into rollup rows, keyed like the table's unique constraint."""
    acc: dict[tuple, list] = {}
    for e in events:
        minute = e.time.replace(second=0, microsecond=0)
        hour = minute.replace(minute=0)
        day = hour.replace(hour=0)
        cls = max(1, min(5, e.status // 100))
        api = e.api_id or 0
        dims = [("api", api)]
        if e.route_id:
            dims.append(("route", e.route_id))
        if e.key_id:
            dims.append(("key", e.key_id))
        if e.organization_id:
            dims.append(("org", e.organization_id))
        key_api = key_api_id(e.key_id, e.api_id) if e.key_id else None
        if key_api is not None:
            dims.append(("kapi", key_api))
        h = bisect_left(LATENCY_BUCKETS_MS, e.latency_ms)
        error = 1 if e.error_kind else 0
        for gran, bucket in (("m", minute), ("h", hour), ("d", day)):
            for dim, dim_id in dims:
                if gran == "m" and dim == "kapi":
                    continue  # key x API: hour and day rows only (ingest cost)
                k = (gran, dim, dim_id, bucket, cls)
                row = acc.get(k)
                if row is None:
                    row = acc[k] = [api, 0, 0, 0, 0, 0.0] + [0] * _NBUCKETS
                elif api < row[0]:
                    row[0] = api  # a key or organization spans APIs: the lowest, as on PG
                row[1] += 1
                row[2] += error
                row[3] += e.bytes_in
                row[4] += e.bytes_out
                row[5] += e.latency_ms
                row[6 + h] += 1
    return acc


def _upsert_rollups(events: list[Event], ops) -> None:
    if not events:
        return
    acc = aggregate(events)
    table = Rollup._meta.db_table
    updates = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in _ADDITIVE)
    placeholders = "(" + ",".join(["%s"] * len(_ROLLUP_COLUMNS)) + ")"
    # Sorted so that concurrent ingesters lock rollup rows in the same order (no deadlock).
    keys = sorted(acc)
    chunk = 500  # x 27 parameters: under SQLite's and PostgreSQL's limits
    for i in range(0, len(keys), chunk):
        part = keys[i : i + chunk]
        params: list[object] = []
        for gran, dim, dim_id, bucket, cls in part:
            row = acc[(gran, dim, dim_id, bucket, cls)]
            params += [gran, ops.adapt_datetimefield_value(bucket), dim, dim_id, row[0], cls]
            params += row[1:]
        sql = (
            f"INSERT INTO {table} ({','.join(_ROLLUP_COLUMNS)}) "
            f"VALUES {','.join([placeholders] * len(part))} "
            "ON CONFLICT (granularity, dimension, dim_id, bucket, status_class) "
            f"DO UPDATE SET {updates}"
        )
        with connection.cursor() as cur:
            cur.execute(sql, params)


def _touch_keys(events: list[Event]) -> None:
    """Set ApiKey.last_used_at from the log in one statement, never by a write per request."""
    last: dict[int, datetime] = {}
    for e in events:
        if e.key_id is not None and (e.key_id not in last or e.time > last[e.key_id]):
            last[e.key_id] = e.time
    if not last:
        return
    ops = connection.ops
    table = ApiKey._meta.db_table
    cast_id, cast_t = (
        ("::bigint", "::timestamptz") if connection.vendor == "postgresql" else ("", "")
    )
    values = ",".join([f"(%s{cast_id}, %s{cast_t})"] * len(last))
    params: list[object] = []
    for key_id, t in sorted(last.items()):
        params += [key_id, ops.adapt_datetimefield_value(t)]
    sql = (
        # VALUES columns are column1, column2 in both SQLite and PostgreSQL.
        f"UPDATE {table} SET last_used_at = v.t FROM "
        f"(SELECT column1 AS id, column2 AS t FROM (VALUES {values}) AS vals) AS v "
        f"WHERE {table}.id = v.id AND ({table}.last_used_at IS NULL OR {table}.last_used_at < v.t)"
    )
    with connection.cursor() as cur:
        cur.execute(sql, params)


# --- sources ------------------------------------------------------------------------------
def ingest_spool(directory: str | Path, *, max_files: int = 200, group_events: int = 10_000) -> int:
    """Ingest spool files oldest first, several per transaction (up to `group_events`
    events: one commit per ~10 gateway batches, as the stream consumer does); each file is
    removed only after the commit that holds it."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    total = 0
    group: list[tuple[Path, list[dict]]] = []
    events = 0
    for path in sorted(directory.glob("[0-9]*.json"))[:max_files]:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue  # another ingester finished it
        try:
            batch = decode_batch(raw)
        except ValueError:
            # Kept aside for a person to look at, never silently deleted.
            log.error("unreadable spool file %s moved to %s", path.name, BAD_SUFFIX)
            path.rename(path.with_name(path.name + BAD_SUFFIX))
            continue
        group.append((path, batch))
        events += len(batch)
        if events >= group_events:
            total += _ingest_files(group)
            group, events = [], 0
    if group:
        total += _ingest_files(group)
    return total


def _ingest_files(group: list[tuple[Path, list[dict]]]) -> int:
    """One transaction for these files; if the database refuses it, file by file, so that
    only the file it cannot store is set aside."""
    try:
        n = ingest_batch([event for _, batch in group for event in batch])
    except (IntegrityError, DataError):
        # (OperationalError, e.g. the database being down, propagates: retry later.)
        if len(group) > 1:
            return sum(_ingest_files([one]) for one in group)
        path = group[0][0]
        log.exception("spool file %s refused by the database, moved aside", path.name)
        path.rename(path.with_name(path.name + BAD_SUFFIX))
        return 0
    for path, _ in group:
        path.unlink(missing_ok=True)
    return n


def ingest_stream(
    client,
    stream: str,
    *,
    group: str = "ingest",
    count: int = 10,  # entries per transaction; each entry is a batch of up to 1000 events
    max_batches: int = 500,
    claim_idle_ms: int = 60_000,
) -> int:
    """Ingest from a Redis stream with a consumer group; acknowledge after commit."""
    import redis

    consumer = f"{socket.gethostname()}-{os.getpid()}"
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    total = 0
    # Entries delivered to a consumer that died before acknowledging are taken over.
    cursor = "0-0"
    for _ in range(max_batches):
        cursor, claimed, *_ = client.xautoclaim(
            stream, group, consumer, claim_idle_ms, cursor, count=count
        )
        if claimed:
            total += _ingest_entries(client, stream, group, claimed)
        if cursor in (b"0-0", "0-0"):
            break
    for _ in range(max_batches):
        resp = client.xreadgroup(group, consumer, {stream: ">"}, count=count)
        if not resp:
            break
        entries = resp[0][1]
        if not entries:
            break
        total += _ingest_entries(client, stream, group, entries)
    return total


def _ingest_entries(client, stream: str, group: str, entries) -> int:
    batch, ids = [], []
    for entry_id, fields in entries:
        ids.append(entry_id)
        if not fields:
            continue  # deleted while pending
        raw = fields.get(b"batch") or fields.get("batch")
        try:
            batch.extend(decode_batch(raw))
        except (TypeError, ValueError):
            log.error("skipping unreadable stream entry %s", entry_id)
    try:
        n = ingest_batch(batch)
    except (IntegrityError, DataError):
        # Never storable: park the raw entries on a dead-letter stream, then acknowledge.
        log.exception("stream entries refused by the database, moved to %s:dead", stream)
        pipe = client.pipeline(transaction=False)
        for _entry_id, fields in entries:
            if fields:
                pipe.xadd(f"{stream}:dead", fields)
        pipe.execute()
        n = 0
    pipe = client.pipeline(transaction=False)
    pipe.xack(stream, group, *ids)
    pipe.xdel(stream, *ids)
    pipe.execute()
    return n


def ingest_pending() -> int:
    """Ingest whatever the gateways have shipped, from the stream or the spool."""
    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        try:
            return ingest_stream(
                client,
                settings.GATEWAY["LOG_STREAM"],
                claim_idle_ms=settings.ANALYTICS["CLAIM_IDLE_SECONDS"] * 1000,
            )
        finally:
            client.close()
    return ingest_spool(settings.GATEWAY["LOG_SPOOL_DIR"])
