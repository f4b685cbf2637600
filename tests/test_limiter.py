"""Rate limits (GCRA) and quotas: the same semantics in process and in Redis."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from django.conf import settings

from gateway.dataplane.limiter import MemoryLimiter, RedisLimiter, period_bounds, redis_client
from gateway.dataplane.snapshot import LimitRule

T0 = datetime(2026, 3, 31, 23, 59, 0, tzinfo=UTC).timestamp()


def rate(limit: int, subject: str = "key:1") -> LimitRule:
    return LimitRule("rate", subject, limit, "minute", "s1")


def quota(limit: int, period: str = "day", subject: str = "sub:1") -> LimitRule:
    return LimitRule("quota", subject, limit, period, "s1")


def test_period_bounds_are_utc_calendar_days_and_months():
    day = period_bounds("day", T0)
    assert datetime.fromtimestamp(day[0], UTC) == datetime(2026, 3, 31, tzinfo=UTC)
    assert day[1] - day[0] == 86400
    month = period_bounds("month", T0)
    assert datetime.fromtimestamp(month[0], UTC) == datetime(2026, 3, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(month[1], UTC) == datetime(2026, 4, 1, tzinfo=UTC)
    dec = period_bounds("month", datetime(2026, 12, 15, tzinfo=UTC).timestamp())
    assert datetime.fromtimestamp(dec[1], UTC) == datetime(2027, 1, 1, tzinfo=UTC)


def test_rate_admits_the_limit_as_a_burst_then_refuses_until_replenished():
    lim = MemoryLimiter()
    rules = (rate(6),)
    results = [lim.check_sync(rules, T0) for _ in range(7)]
    assert [d.allowed for d in results] == [True] * 6 + [False]
    assert [d.remaining for d in results[:6]] == [5, 4, 3, 2, 1, 0]
    refused = results[6]
    assert refused.retry_after == pytest.approx(10.0)  # one slot every 60/6 s
    assert not lim.check_sync(rules, T0 + 9.9).allowed
    assert lim.check_sync(rules, T0 + 10.0).allowed
    # Over a long run the admitted rate is exactly the limit.
    admitted = sum(lim.check_sync(rules, T0 + 10.5 + i * 0.5).allowed for i in range(240))
    assert admitted == 12  # 120 s at 6/min


def test_quota_is_counted_per_period_and_resets_at_the_next_utc_day():
    lim = MemoryLimiter()
    rules = (quota(3),)
    assert [lim.check_sync(rules, T0).allowed for _ in range(4)] == [True, True, True, False]
    refused = lim.check_sync(rules, T0)
    assert refused.rule.kind == "quota"
    assert refused.retry_after == pytest.approx(60.0)  # until midnight UTC
    assert lim.check_sync(rules, T0 + 61).allowed  # a new day


def test_a_refused_request_counts_against_nothing():
    lim = MemoryLimiter()
    rules = (rate(2), quota(100))
    assert [lim.check_sync(rules, T0).allowed for _ in range(5)] == [
        True,
        True,
        False,
        False,
        False,
    ]
    dirty = dict(((s, start), used) for s, start, used in lim.take_dirty())
    assert list(dirty.values()) == [2]  # only the admitted requests used quota


def test_exhausted_quota_refuses_without_consuming_the_rate():
    lim = MemoryLimiter()
    rules = (rate(10), quota(1))
    assert lim.check_sync(rules, T0).allowed
    d = lim.check_sync(rules, T0)
    assert not d.allowed and d.rule.kind == "quota"
    assert lim.check_sync((rate(10),), T0).remaining == 8


def test_quota_counters_survive_a_restart_through_load():
    first = MemoryLimiter()
    for _ in range(3):
        first.check_sync((quota(5),), T0)
    saved = first.take_dirty()
    second = MemoryLimiter()
    second.load(saved)
    assert second.check_sync((quota(5),), T0).remaining == 1


# --- Redis: the same behaviour through one Lua script ----------------------------------------
needs_redis = pytest.mark.skipif(not settings.REDIS_URL, reason="REDIS_URL not set")


def _redis_run(coro_factory):
    async def main():
        client = redis_client(settings.REDIS_URL, timeout=1.0)
        try:
            await client.flushdb()
            return await coro_factory(RedisLimiter(client))
        finally:
            await client.aclose()

    return asyncio.run(main())


@needs_redis
def test_redis_rate_and_quota_match_the_in_process_semantics():
    async def scenario(lim: RedisLimiter):
        rules = (rate(5, "key:9"), quota(3, "day", "sub:9"))
        now = time.time()  # Redis keeps its own clock for rates and expires quota counters
        return [await lim.check(rules, now) for _ in range(5)]

    results = _redis_run(scenario)
    assert [d.allowed for d in results] == [True, True, True, False, False]
    assert results[3].rule.kind == "quota"
    assert results[3].retry_after > 0


@needs_redis
def test_redis_limit_is_exact_under_concurrency():
    async def scenario(lim: RedisLimiter):
        rules = (rate(50, "key:7"),)
        now = time.time()
        results = await asyncio.gather(*(lim.check(rules, now) for _ in range(200)))
        return sum(d.allowed for d in results)

    assert _redis_run(scenario) == 50


def test_unreachable_redis_fails_open_and_counts_the_error():
    async def main():
        client = redis_client("redis://127.0.0.1:1/0", timeout=0.2)
        lim = RedisLimiter(client)
        try:
            d = await lim.check((rate(1),), T0)
            return d, lim.store_errors
        finally:
            await client.aclose()

    decision, errors = asyncio.run(main())
    assert decision.allowed
    assert errors == 1


def _stage_answer(fail_closed: bool):
    """The limit stage's answer for a key when Redis cannot be reached."""
    from gateway.dataplane.context import RequestContext
    from gateway.dataplane.stages.limit import LimitStage

    class Key:
        limits = (rate(10),)

    async def main():
        client = redis_client("redis://127.0.0.1:1/0", timeout=0.2)
        try:
            stage = LimitStage(limiter=RedisLimiter(client), fail_closed=fail_closed)
            ctx = RequestContext(
                scope={"headers": []},
                receive=None,
                send=None,
                request_id="r1",
                method="GET",
                path="/",
                client_ip="127.0.0.1",
            )
            ctx.key = Key()
            return await stage.on_request(ctx), ctx
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_store_failure_follows_the_apis_policy():
    admitted, ctx = _stage_answer(fail_closed=False)
    assert admitted is None and ctx.error_kind == "limiter_unavailable"
    refused, _ = _stage_answer(fail_closed=True)
    assert refused.status == 503
    assert (b"retry-after", b"1") in refused.headers


def test_rate_limit_headers_follow_the_ietf_draft_and_the_de_facto_names():
    from gateway.dataplane.stages.limit import _headers

    lim = MemoryLimiter()
    rules = (rate(60), quota(1000))
    headers = dict(_headers(rules, lim.check_sync(rules, T0)))
    assert headers[b"ratelimit-policy"] == b'"rate";q=60;w=60, "quota-day";q=1000;w=86400'
    assert headers[b"ratelimit"] == b'"rate";r=59;t=1'
    assert headers[b"x-ratelimit-limit"] == b"60"
    assert headers[b"x-ratelimit-remaining"] == b"59"
