"""The gateway's log buffer and shipper: bounded, counted, never a busy loop."""

from __future__ import annotations

import asyncio

from gateway.dataplane.logship import EventBuffer, LogShipper


class DownSink:
    """A sink whose store is unreachable: every write fails, and is counted."""

    def __init__(self) -> None:
        self.calls = 0

    async def write(self, batch) -> None:
        self.calls += 1
        raise ConnectionError("store down")


class ListSink:
    def __init__(self) -> None:
        self.batches: list[list] = []

    async def write(self, batch) -> None:
        self.batches.append(batch)


def test_a_full_buffer_drops_and_counts():
    buffer = EventBuffer(capacity=3, batch_size=2)
    for i in range(5):
        buffer.push((i,))
    assert len(buffer) == 3 and buffer.dropped == 2


def test_shipping_backs_off_while_the_sink_is_down():
    async def run() -> int:
        buffer = EventBuffer(capacity=10, batch_size=1)
        sink = DownSink()
        shipper = LogShipper(buffer, sink, interval=0.01)
        task = asyncio.create_task(shipper.run())
        for _ in range(50):  # a full buffer: every push asks for a flush
            buffer.push(("e",))
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return sink.calls

    calls = asyncio.run(run())
    # ~0.5 s with backoff 0.05, 0.1, 0.2, 0.4 s: a handful of tries, not one per push.
    assert 1 <= calls <= 10, calls


def test_batches_ship_in_order_when_the_sink_works():
    async def run() -> list:
        buffer = EventBuffer(capacity=100, batch_size=3)
        sink = ListSink()
        shipper = LogShipper(buffer, sink, interval=0.01)
        for i in range(7):
            buffer.push((i,))
        await shipper.drain()
        return sink.batches

    assert asyncio.run(run()) == [[(0,), (1,), (2,)], [(3,), (4,), (5,)], [(6,)]]


def test_what_cannot_be_shipped_at_shutdown_is_counted_as_dropped():
    async def run() -> EventBuffer:
        buffer = EventBuffer(capacity=100, batch_size=10)
        for i in range(25):
            buffer.push((i,))
        await LogShipper(buffer, DownSink(), interval=0.01).drain()
        return buffer

    buffer = asyncio.run(run())
    assert buffer.dropped == 25 and len(buffer) == 0


def test_a_full_stream_refuses_batches_and_never_trims_unread_ones(settings):
    """The stream holds at most `maxlen` unconsumed batches. Beyond it the shipper keeps the
    batch and its buffer drops (and counts) new events: no batch already in the stream is
    thrown away unread, as XADD MAXLEN would do."""
    import uuid

    import pytest

    if not settings.REDIS_URL:
        pytest.skip("REDIS_URL not set")
    import redis.asyncio as aioredis

    from gateway.dataplane.logship import RedisStreamSink, decode_batch

    stream = f"test:ship:{uuid.uuid4().hex}"

    async def main():
        client = aioredis.Redis.from_url(settings.REDIS_URL)
        try:
            buffer = EventBuffer(capacity=3, batch_size=1)
            shipper = LogShipper(buffer, RedisStreamSink(client, stream, maxlen=2), interval=0.01)
            for i in range(5):
                buffer.push((f"e{i}",))
            assert buffer.dropped == 2
            assert await shipper.ship_once() and await shipper.ship_once()
            assert not await shipper.ship_once()  # full: the batch is kept, not lost
            assert len(buffer) == 1 and shipper.failures == 1
            for i in (5, 6, 7):
                buffer.push((f"e{i}",))
            assert buffer.dropped == 3  # counted where it happens
            entries = await client.xrange(stream)
            assert [decode_batch(f[b"batch"])[0]["id"] for _, f in entries] == ["e0", "e1"]
            # Ingest consumes (acknowledges and deletes): there is room again.
            await client.xdel(stream, *[entry_id for entry_id, _ in entries])
            assert await shipper.ship_once() and await shipper.ship_once()
            assert not await shipper.ship_once()
            entries = await client.xrange(stream)
            assert [decode_batch(f[b"batch"])[0]["id"] for _, f in entries] == ["e2", "e5"]
            assert buffer.shipped == 4 and buffer.dropped == 3 and len(buffer) == 1  # e6
        finally:
            await client.delete(stream)
            await client.aclose()

    asyncio.run(main())
