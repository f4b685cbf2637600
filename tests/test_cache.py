"""The response cache's parts, without a server: configuration, storability, store, keys."""

from __future__ import annotations

import asyncio

import pytest

from gateway.dataplane.context import RequestContext
from gateway.dataplane.stages.cache import (
    CacheConfigError,
    CacheStage,
    Entry,
    MemoryStore,
    _etag_matches,
    parse_cache,
)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({}, "ttl"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": 10, "vary": ["Bad Name"]}, "vary[0]"),
        ({"ttl": 10, "share_across_consumers": "yes"}, "share_across_consumers"),
        ({"ttl": 10, "statuses": [99]}, "statuses"),
        ({"ttl": 10, "extra": 1}, "config: unknown extra"),
    ],
)
def test_bad_cache_policies_are_refused_naming_the_field(doc, field):
    with pytest.raises(CacheConfigError) as err:
        parse_cache(doc)
    assert str(err.value).startswith(field)


def _stage(**doc) -> CacheStage:
    config = parse_cache({"ttl": 60, **doc})
    return CacheStage(config, store=MemoryStore(1 << 20), api_id=1, route_id=2, generation="0.0")


def test_upstream_cache_control_caps_or_forbids_storing():
    stage = _stage()
    assert stage.storable_ttl(200, []) == 60
    assert stage.storable_ttl(200, [(b"Cache-Control", b"public, max-age=5")]) == 5
    assert stage.storable_ttl(200, [(b"cache-control", b"max-age=5, s-maxage=2")]) == 2
    assert stage.storable_ttl(200, [(b"cache-control", b"max-age=600")]) == 60
    for value in (b"no-store", b"private, max-age=60", b"no-cache"):
        assert stage.storable_ttl(200, [(b"cache-control", value)]) == 0
    assert stage.storable_ttl(200, [(b"set-cookie", b"s=1")]) == 0
    assert stage.storable_ttl(200, [(b"vary", b"*")]) == 0
    assert stage.storable_ttl(500, []) == 0
    assert _stage(statuses=[200, 404]).storable_ttl(404, []) == 60


def _ctx(path="/demo/x", query=b"", headers=(), consumer: int | None = 1) -> RequestContext:
    ctx = RequestContext(
        scope={"headers": [(b"host", b"api.test"), *headers], "query_string": query},
        receive=None,
        send=None,
        request_id="r",
        method="GET",
        path=path,
        client_ip="127.0.0.1",
    )
    if consumer is not None:

        class Key:
            consumer_id = consumer

        ctx.key = Key()
    return ctx


def test_the_key_sorts_the_query_and_separates_consumers_and_vary_values():
    stage = _stage(vary=["Accept-Language"])
    base = stage.cache_key(_ctx(query=b"a=1&b=2"))
    assert stage.cache_key(_ctx(query=b"b=2&a=1")) == base
    assert stage.cache_key(_ctx(query=b"a=1&b=3")) != base
    assert stage.cache_key(_ctx(query=b"a=1&b=2", consumer=2)) != base
    lang = [(b"accept-language", b"de")]
    assert stage.cache_key(_ctx(query=b"a=1&b=2", headers=lang)) != base
    shared = _stage(share_across_consumers=True)
    assert shared.cache_key(_ctx(consumer=1)) == shared.cache_key(_ctx(consumer=2))
    purged = CacheStage(
        parse_cache({"ttl": 60}), store=None, api_id=1, route_id=2, generation="1.0"
    )
    assert purged.cache_key(_ctx()) != _stage().cache_key(_ctx())


def _entry(body: bytes, stored_at: float = 1000.0, ttl: float = 60) -> Entry:
    return Entry(200, [(b"content-type", b"text/plain")], body, b'"e1"', stored_at, ttl)


def test_the_memory_store_is_an_lru_bounded_by_bytes_and_drops_stale_entries():
    store = MemoryStore(capacity=3 * (100 + 64 + 24))

    async def run():
        for name in ("a", "b", "c"):
            await store.put(name, _entry(b"x" * 100))
        assert await store.get("a", 1001) is not None  # a is now the most recent
        await store.put("d", _entry(b"x" * 100))  # evicts b, the least recent
        assert await store.get("b", 1001) is None
        assert await store.get("a", 1001) is not None
        assert await store.get("a", 1061) is None  # stale: dropped
        assert store.used <= store.capacity

    asyncio.run(run())


def test_entries_survive_the_redis_encoding():
    entry = _entry(b"\x00\xffbody")
    again = Entry.loads(entry.dumps())
    assert again == entry


def test_the_redis_store_shares_entries_and_one_fill_lock_and_fails_as_a_miss(own_redis):
    import time

    from gateway.dataplane.resp import RespClient
    from gateway.dataplane.stages.cache import RedisStore

    async def run():
        a = RedisStore(RespClient(f"redis://127.0.0.1:{own_redis.port}/0", timeout=2))
        b = RedisStore(RespClient(f"redis://127.0.0.1:{own_redis.port}/0", timeout=2))
        down = RedisStore(RespClient("redis://127.0.0.1:1/0", timeout=0.2))
        now = time.time()
        entry = _entry(b"\x00\xffbody", stored_at=now)
        await a.put("k", entry)
        shared = await b.get("k", now)  # another worker or node sees it
        missing = await b.get("other", now)
        locks = [await a.lock("k", 5), await b.lock("k", 5)]  # one filler at a time
        await a.unlock("k")
        relocked = await b.lock("k", 5)
        failures = (await down.get("k", now), await down.lock("k", 5))
        for store in (a, b, down):
            await store.client.close()
        return shared, missing, locks, relocked, failures

    shared, missing, locks, relocked, failures = asyncio.run(run())
    assert shared is not None and shared.body == b"\x00\xffbody"
    assert missing is None
    assert locks == [True, False] and relocked is True
    assert failures == (None, True)  # a miss, and no lock to wait for: go to the upstream


def test_if_none_match_uses_the_weak_comparison():
    assert _etag_matches(b'"e1"', b'"e1"')
    assert _etag_matches(b'W/"e1", "e2"', b'"e1"')
    assert _etag_matches(b"*", b'"e1"')
    assert not _etag_matches(b'"e2"', b'"e1"')
