"""The gateway's log buffer and shipper: bounded, counted, never a busy loop."""

from __future__ import annotations

import asyncio

from gateway.dataplane.logship import (
    EventBuffer,
    LogShipper,
    decode_batch,
    encode_batch,
    encode_batch_in_steps,
)


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


def test_a_steady_trickle_ships_once_per_interval_not_once_per_write():
    """Events arriving while a batch is written wait for the next interval: a sink that takes
    20 ms per write under one event per millisecond must not be written back to back."""

    class SlowSink(ListSink):
        async def write(self, batch):
            await asyncio.sleep(0.02)
            await super().write(batch)

    async def run() -> list:
        buffer = EventBuffer(capacity=10_000, batch_size=1_000)
        sink = SlowSink()
        shipper = LogShipper(buffer, sink, interval=0.2)
        task = asyncio.create_task(shipper.run())
        loop = asyncio.get_running_loop()
        end = loop.time() + 0.7
        i = 0
        while loop.time() < end and i < 5_000:
            buffer.push((i,))
            i += 1
            await asyncio.sleep(0.001)
        await shipper.drain()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return sink.batches

    batches = asyncio.run(run())
    # ~0.7 s at 0.2 s: 3 or 4 interval writes and the drain's; back to back it was ~30.
    assert 2 <= len(batches) <= 7, [len(b) for b in batches]
    shipped = [e for b in batches for e in b]
    assert shipped == sorted(shipped) and len(shipped) == len(set(shipped))


def test_a_batch_encoded_in_steps_is_the_batch_encoded_at_once():
    events = [
        (f"{i:032x}", 1.5 + i, 1, 2, "/x", None, 3, None, "GET", 200, 0.1, None, 0, 9, "", None)
        for i in range(250)
    ]
    events[7] = (*events[7][:4], 'quote " and \u00e9', *events[7][5:])
    for batch, step in ((events[:1], 100), (events, 100), (events, 7), (events, 1000)):
        stepped = asyncio.run(encode_batch_in_steps(batch, step))
        assert stepped == encode_batch(batch)
        assert decode_batch(stepped) == decode_batch(encode_batch(batch))


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
