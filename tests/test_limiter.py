"""Rate limits (GCRA) and quotas: the same semantics in process and in Redis."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from django.conf import settings

from gateway.dataplane.limiter import MemoryLimiter, RedisLimiter, period_bounds
from gateway.dataplane.pipeline import settle
from gateway.dataplane.resp import RespClient
from gateway.dataplane.snapshot import LimitRule

T0 = datetime(2026, 3, 31, 23, 59, 0, tzinfo=UTC).timestamp()


def rate(
    limit: int, subject: str = "key:1", *, window: str = "minute", burst: int | None = None
) -> LimitRule:
    """A rate rule; the burst defaults to a whole window's worth (limit - 1)."""
    b = limit - 1 if burst is None else burst
    return LimitRule("rate", subject, limit, window, "s1", b, f"key-{window}", "key")


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
        client = RespClient(settings.REDIS_URL, timeout=1.0)
        try:
            await client.execute("FLUSHDB")
            return await coro_factory(RedisLimiter(client))
        finally:
            await client.close()

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
        client = RespClient("redis://127.0.0.1:1/0", timeout=0.2)
        lim = RedisLimiter(client)
        try:
            d = await lim.check((rate(1),), T0)
            return d, lim.store_errors
        finally:
            await client.close()

    decision, errors = asyncio.run(main())
    assert decision.allowed
    assert errors == 1


def _stage_answer(fail_closed: bool):
    """The limit stage's answer for a key when Redis cannot be reached."""
    from gateway.dataplane.context import RequestContext
    from gateway.dataplane.stages.limit import LimitStage

    class Key:
        limits = (rate(10),)
        ip_rates = ()
        plan_id = 0

    async def main():
        client = RespClient("redis://127.0.0.1:1/0", timeout=0.2)
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
            return await settle(stage.on_request(ctx)), ctx
        finally:
            await client.close()

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
    assert headers[b"ratelimit-policy"] == b'"key-minute";q=60;w=60, "quota-day";q=1000;w=86400'
    assert headers[b"ratelimit"] == b'"key-minute";r=59;t=1'
    assert headers[b"x-ratelimit-limit"] == b"60"
    assert headers[b"x-ratelimit-remaining"] == b"59"


# --- windows and burst: the documented bound ---------------------------------------------------
def _admitted_times(check, rule: LimitRule, *, start: float, seconds: float, step: float):
    """Offer a request every `step` seconds (demand far above the limit); admitted times."""
    out = []
    n = int(seconds / step)
    for i in range(n):
        now = start + i * step
        if check((rule,), now).allowed:
            out.append(now)
    return out


def _max_in_any_window(times: list[float], window: float) -> int:
    """The most admitted in any half-open interval of length `window`."""
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.mark.parametrize(
    ("limit", "window", "burst"), [(10, "second", 0), (10, "second", 5), (100, "minute", 20)]
)
def test_any_window_admits_at_most_limit_plus_burst_and_the_limit_under_demand(
    limit, window, burst
):
    from gateway.dataplane.snapshot import WINDOW_SECONDS

    w = WINDOW_SECONDS[window]
    lim = MemoryLimiter()
    rule = rate(limit, window=window, burst=burst)
    times = _admitted_times(lim.check_sync, rule, start=T0, seconds=4 * w, step=w / 997)
    assert _max_in_any_window(times, w) <= limit + burst
    assert _max_in_any_window(times, w) >= limit + burst - 1  # the burst is really there
    for k in range(1, 4):  # every full window after the first admits the limit (+-1)
        inside = [t for t in times if T0 + k * w <= t < T0 + (k + 1) * w]
        assert abs(len(inside) - limit) <= 1


def test_without_burst_requests_are_spaced_one_emission_interval_apart():
    lim = MemoryLimiter()
    rule = rate(10, window="second", burst=0)
    assert lim.check_sync((rule,), T0).allowed
    refused = lim.check_sync((rule,), T0 + 0.05)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(0.05)
    assert lim.check_sync((rule,), T0 + 0.1).allowed


def test_idle_counters_are_pruned():
    lim = MemoryLimiter()
    for i in range(100):
        lim.check_sync((rate(10, f"ip:{i}", window="second", burst=0),), T0)
    lim.prune(T0 + 1.0)
    assert lim._tat == {}


@needs_redis
def test_redis_window_bound_holds_on_redis_time():
    """The same bound through the Lua script (its clock is Redis TIME): offered far faster
    than 20/s for 2.5 s, at most 20 + 4 are admitted in any second."""

    async def scenario(lim: RedisLimiter):
        rule = rate(20, "key:bound", window="second", burst=4)
        times = []
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            results = await asyncio.gather(*(lim.check((rule,), 0.0) for _ in range(5)))
            now = time.time()
            times += [now for d in results if d.allowed]
            await asyncio.sleep(0.002)
        return times

    times = _redis_run(scenario)
    # Stamped after the answer, so an admitted request is timed late by at most the round
    # trip: the window count can only err by requests that straddle its edges.
    assert _max_in_any_window(times, 1.0) <= 20 + 4 + 1
    # About 20 * 2.5 + 4 = 54 expected; 10 % of slack absorbs a machine stall of ~0.45 s
    # (the burst refills 0.2 s of it) yet still catches a limiter admitting at a lower rate.
    assert len(times) >= 0.9 * (20 * 2.5 + 4)


def _limit_ctx(client_ip: str = "10.0.0.1"):
    from gateway.dataplane.context import RequestContext

    return RequestContext(
        scope={"headers": []},
        receive=None,
        send=None,
        request_id="r1",
        method="GET",
        path="/",
        client_ip=client_ip,
    )


def _entry(**kw):
    from gateway.dataplane.snapshot import KeyEntry

    base = dict(
        pk=5,
        key_id="k5",
        digest=b"",
        expires_at=None,
        consumer_id=3,
        organization_id=None,
        subscription_id=8,
        subscription_status="active",
        plan_slug="free",
        api_ids=frozenset({1}),
        limits=(),
        plan_id=2,
    )
    base.update(kw)
    return KeyEntry(**base)


def test_route_rules_override_the_plans_rule_of_the_same_scope_and_window():
    from gateway.dataplane.snapshot import RateTemplate, counter_rule
    from gateway.dataplane.stages.limit import LimitStage

    plan_minute = RateTemplate("key", "minute", 100, 0, "p2", "key-minute")
    plan_hour = RateTemplate("consumer", "hour", 1000, 0, "p2", "consumer-hour")
    per_ip = RateTemplate("client_ip", "second", 5, 0, "p2", "ip-second")
    key = _entry(
        limits=(
            counter_rule(plan_minute, 5, 3, None, ""),
            counter_rule(plan_hour, 5, 3, None, ""),
            quota(50, subject="sub:8"),
        ),
        ip_rates=(per_ip,),
    )
    override = RateTemplate("key", "minute", 10, 0, "r7p2", "key-minute")
    everyone = RateTemplate("client_ip", "second", 50, 0, "r7", "route-ip-second")
    stage = LimitStage(
        limiter=MemoryLimiter(),
        route_rates=(everyone,),
        overrides={2: (frozenset({("key", "minute")}), (override,))},
    )
    rules = stage.rules_for(_limit_ctx("10.0.0.9"), key)
    by_name = {r.name: r for r in rules}
    assert by_name["key-minute"].limit == 10  # the route's override, not the plan's 100
    assert by_name["key-minute"].subject == "k5:minute:r7p2"  # with a counter of its own
    assert by_name["consumer-hour"].subject == "c3:hour:p2"  # not overridden: kept
    assert by_name["ip-second"].subject == "i10.0.0.9:second:p2"
    assert by_name["route-ip-second"].subject == "i10.0.0.9:second:r7"
    assert any(r.kind == "quota" for r in rules)
    # Another plan's keys get the plan rules as they are, plus the route's own.
    other = _entry(plan_id=9, limits=(counter_rule(plan_minute, 5, 3, None, ""),))
    names = sorted(r.name for r in stage.rules_for(_limit_ctx(), other))
    assert names == ["key-minute", "route-ip-second"]
    assert stage.rules_for(_limit_ctx(), other)[0].limit == 100


def test_scopes_share_counters_as_documented():
    from gateway.dataplane.snapshot import RateTemplate, counter_rule

    def subject(scope, key_pk, consumer, org):
        return counter_rule(
            RateTemplate(scope, "minute", 1, 0, "p1", "x"), key_pk, consumer, org, ""
        )

    assert subject("key", 5, 3, None) != subject("key", 6, 3, None)
    assert subject("consumer", 5, 3, None) == subject("consumer", 6, 3, None)
    # An organization is one consumer (its keys are the organization's own).
    assert subject("organization", 5, 3, 4) == subject("organization", 6, 3, 4)
    assert subject("organization", 5, 3, 4).subject.startswith("o4:")
    assert (
        subject("organization", 5, 3, None).subject.split(":")[0]
        == subject("consumer", 5, 3, None).subject.split(":")[0]
    )
    assert subject("key", 0, 3, None).subject.startswith("j3:")  # a JWT identity
