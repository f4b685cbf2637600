"""The proxy's upstream client (gateway/dataplane/upstream.py) against raw loopback servers.

Each test serves scripted bytes from an asyncio server in the test's event loop, so that
what goes over the wire either way is exactly known.
"""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from gateway.dataplane.upstream import (
    HIGH_WATER,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamReadTimeout,
    UpstreamTotalTimeout,
)
from tests.procs import read_chunked

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello"


class Server:
    """A loopback server: `handler(reader, writer)` per connection; records connections."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> Server:
        async def serve(reader, writer):
            self.connections += 1
            try:
                await self.handler(self, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def read_head(self, reader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        return head


async def answer_each(server, reader, writer, answer=OK):
    """Keep-alive: every request head gets `answer`."""
    while True:
        head = await server.read_head(reader)
        length = _content_length(head)
        if length:
            await reader.readexactly(length)
        writer.write(answer)
        await writer.drain()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def get(pool, port, method="GET", target="/", headers=(), body=None, **kw):
    async with pool.request(
        method, "http", "127.0.0.1", port, target, list(headers), body, **kw
    ) as resp:
        chunks = [c async for c in resp.iter_chunks()]
        return resp.status, resp.raw_headers, b"".join(chunks)


def timeouts(connect=None, read=None, total=None):
    return SimpleNamespace(sock_connect=connect, sock_read=read, total=total)


def test_keep_alive_reuses_one_connection_and_sends_host():
    async def main():
        async with Server(answer_each) as srv:
            pool = UpstreamPool()
            for _ in range(3):
                status, headers, body = await get(pool, srv.port, target="/a?b=1")
                assert (status, body) == (200, b"hello")
                assert (b"content-type", b"text/plain") in headers
            assert srv.connections == 1
            assert srv.requests[0].startswith(b"GET /a?b=1 HTTP/1.1\r\n")
            assert f"host: 127.0.0.1:{srv.port}\r\n".encode() in srv.requests[0]
            await pool.close()

    run(main())


def test_chunked_close_delimited_head_204_and_interim_answers():
    answers = [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",  # to a HEAD: no body follows
        OK,
    ]

    async def handler(server, reader, writer):
        for answer in answers:
            await server.read_head(reader)
            writer.write(answer)
        await server.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the close")
        await writer.drain()

    async def main():
        async with Server(handler) as srv:
            pool = UpstreamPool()
            assert (await get(pool, srv.port))[::2] == (200, b"abcde")
            assert (await get(pool, srv.port))[::2] == (201, b"ok")
            assert (await get(pool, srv.port))[::2] == (204, b"")
            status, headers, body = await get(pool, srv.port, method="HEAD")
            assert (status, body) == (200, b"")
            assert (b"content-length", b"10") in headers
            assert (await get(pool, srv.port))[::2] == (200, b"hello")  # the parser recovered
            assert (await get(pool, srv.port))[::2] == (200, b"until the close")
            assert srv.connections == 1
            await pool.close()

    run(main())


def test_request_bodies_bytes_streamed_chunked_and_streamed_with_a_length():
    received: list[bytes] = []

    async def handler(server, reader, writer):
        while True:
            head = await server.read_head(reader)
            if b"transfer-encoding: chunked" in head:
                data = await read_chunked(reader)
            else:
                data = await reader.readexactly(_content_length(head))
            received.append(data)
            writer.write(OK)

    async def parts():
        for part in (b"one,", b"", b"two,", b"three"):
            await asyncio.sleep(0)
            yield part

    async def main():
        async with Server(handler) as srv:
            pool = UpstreamPool()
            await get(pool, srv.port, "POST", body=b"whole")
            await get(pool, srv.port, "POST", body=parts())
            length = [(b"content-length", b"13")]
            await get(pool, srv.port, "PUT", headers=length, body=parts())
            assert received == [b"whole", b"one,two,three", b"one,two,three"]
            assert b"content-length: 5\r\n" in srv.requests[0]
            assert b"transfer-encoding: chunked\r\n" in srv.requests[1]
            assert b"transfer-encoding" not in srv.requests[2]
            assert srv.connections == 1
            await pool.close()

    run(main())


def test_connect_refused_is_a_connect_error_and_nothing_was_sent():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused

        async def main():
            pool = UpstreamPool()
            with pytest.raises(UpstreamConnectError) as err:
                await get(pool, port)
            assert err.value.connect_failed
            assert pool._open == 0

        run(main())


def test_connect_timeout():
    # A listening socket whose backlog is full does not complete new handshakes.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        port = s.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(("127.0.0.1", port))
                fillers.append(f)

            async def main():
                pool = UpstreamPool()
                with pytest.raises((UpstreamConnectTimeout, UpstreamConnectError)) as err:
                    await get(pool, port, timeout=timeouts(connect=0.3))
                assert err.value.connect_failed

            run(main())
        finally:
            for f in fillers:
                f.close()


def test_read_timeout_counts_silence_and_total_timeout_counts_everything():
    async def trickle(server, reader, writer):
        await server.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        for _ in range(50):  # a byte every 0.1 s: never silent for the read timeout
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.1)

    async def silent(server, reader, writer):
        await server.read_head(reader)
        await asyncio.sleep(10)

    async def main():
        pool = UpstreamPool()
        async with Server(silent) as srv:
            with pytest.raises(UpstreamReadTimeout):
                await get(pool, srv.port, timeout=timeouts(read=0.3))
        async with Server(trickle) as srv:
            with pytest.raises(UpstreamTotalTimeout):
                await get(pool, srv.port, timeout=timeouts(read=0.5, total=1.0))
        assert not any(pool._idle.values())  # a timed-out connection is never reused

    run(main())


def test_a_connection_closed_while_idle_is_not_reused():
    async def once_then_close(server, reader, writer):
        await server.read_head(reader)
        writer.write(OK)
        await writer.drain()
        # closes without announcing it (no `connection: close`): the client finds out later

    async def main():
        async with Server(once_then_close) as srv:
            pool = UpstreamPool()
            assert (await get(pool, srv.port))[2] == b"hello"
            await asyncio.sleep(0.1)  # the close arrives while the connection is idle
            assert (await get(pool, srv.port, "POST", body=b"again"))[2] == b"hello"
            assert srv.connections == 2
            await pool.close()

    run(main())


def test_a_reused_connection_closed_unanswered_is_retried_only_when_sending_again_is_safe():
    """Go's net/http rule: after the request was written, only an idempotent method with a
    replayable body is sent again; a POST that reached the upstream is not (it may have
    been applied)."""

    async def close_on_second(server, reader, writer):
        first = server.connections == 1
        await server.read_head(reader)
        writer.write(OK)
        await writer.drain()
        if first:
            head = await server.read_head(reader)  # the next request arrives; closed unanswered
            if _content_length(head):
                await reader.readexactly(_content_length(head))
            return
        await answer_each(server, reader, writer)

    async def parts():
        yield b"streamed"

    def methods(server):
        return [h.split(b" ", 1)[0] for h in server.requests]

    async def main():
        for method in ("GET", "PUT", "DELETE"):
            async with Server(close_on_second) as srv:
                pool = UpstreamPool()
                await get(pool, srv.port)
                body = b"again" if method == "PUT" else None
                assert (await get(pool, srv.port, method, body=body))[2] == b"hello"
                assert srv.connections == 2
                assert methods(srv) == [b"GET", method.encode(), method.encode()]
        async with Server(close_on_second) as srv:
            pool = UpstreamPool()
            await get(pool, srv.port)
            with pytest.raises(UpstreamClosed):  # written: a POST is never sent twice
                await get(pool, srv.port, "POST", body=b"charge")
            assert srv.connections == 1
            assert methods(srv) == [b"GET", b"POST"]
        async with Server(close_on_second) as srv:
            pool = UpstreamPool()
            await get(pool, srv.port)
            with pytest.raises(UpstreamClosed):  # a streamed body cannot be sent again
                await get(pool, srv.port, "PUT", body=parts())
            assert srv.connections == 1

    run(main())


def test_the_read_timeout_is_held_while_the_client_uploads_slowly():
    """Waiting for the client's next body chunk is not the upstream's silence."""

    async def read_all_then_answer(server, reader, writer):
        await server.read_head(reader)
        body = await read_chunked(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()

    async def slow_client():
        for part in (b"one ", b"two ", b"three"):
            yield part
            await asyncio.sleep(0.5)  # longer than the read timeout

    async def main():
        async with Server(read_all_then_answer) as srv:
            pool = UpstreamPool()
            status, _, body = await get(
                pool, srv.port, "POST", body=slow_client(), timeout=timeouts(read=0.2)
            )
            assert (status, body) == (200, b"one two three")

    run(main())


def test_the_total_deadline_covers_connecting_and_can_be_given():
    with socket.socket() as s:  # a full backlog: connecting hangs
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        port = s.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(("127.0.0.1", port))
                fillers.append(f)

            async def main():
                pool = UpstreamPool()
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(UpstreamTotalTimeout):
                    await get(pool, port, timeout=timeouts(connect=10, total=0.3))
                with pytest.raises(UpstreamTotalTimeout):
                    await get(pool, port, timeout=timeouts(connect=10), deadline=loop.time() + 0.3)
                assert loop.time() - started < 5  # neither waited for the connect timeout

            run(main())
        finally:
            for f in fillers:
                f.close()


def test_the_answers_connection_header_is_exposed():
    answer = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
        b"connection: Other\r\ncontent-length: 2\r\n\r\nok"
    )

    async def main():
        async with Server(lambda *a: answer_each(*a, answer=answer)) as srv:
            pool = UpstreamPool()
            async with pool.request("GET", "http", "127.0.0.1", srv.port, "/", []) as resp:
                assert resp.connection == b"keep-alive, X-Hop,Other"
            async with (
                Server(answer_each) as plain,
                pool.request("GET", "http", "127.0.0.1", plain.port, "/", []) as r,
            ):
                assert r.connection is None

    run(main())


def test_an_upstream_closing_mid_answer_or_speaking_garbage_is_an_error():
    async def cut(server, reader, writer):
        await server.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    async def garbage(server, reader, writer):
        await server.read_head(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def main():
        pool = UpstreamPool()
        async with Server(cut) as srv:
            with pytest.raises(UpstreamClosed) as err:
                await get(pool, srv.port)
            assert not err.value.connect_failed
        async with Server(garbage) as srv:
            with pytest.raises(UpstreamProtocolError):
                await get(pool, srv.port)

    run(main())


def test_a_slow_reader_pauses_the_upstream_instead_of_buffering_its_answer():
    size = 64 * 1024 * 1024

    async def big(server, reader, writer):
        await server.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        block = b"x" * (1024 * 1024)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()

    async def main():
        async with Server(big) as srv:
            pool = UpstreamPool()
            async with pool.request("GET", "http", "127.0.0.1", srv.port, "/", []) as resp:
                conn = resp._conn
                total = 0
                most = 0
                async for chunk in resp.iter_chunks():
                    total += len(chunk)
                    most = max(most, conn.buffered)
                    if total < 4 * 1024 * 1024:
                        await asyncio.sleep(0.01)  # slow at first: the upstream must wait
                assert total == size
                # Never far past the high-water mark (one read of up to 256 KiB beyond it).
                assert most <= HIGH_WATER + 512 * 1024
            await pool.close()

    run(main())


def test_the_pool_limit_makes_requests_wait_for_a_connection():
    async def slow(server, reader, writer):
        while True:
            await server.read_head(reader)
            await asyncio.sleep(0.05)
            writer.write(OK)
            await writer.drain()

    async def main():
        async with Server(slow) as srv:
            pool = UpstreamPool(limit=2)
            results = await asyncio.gather(*(get(pool, srv.port) for _ in range(6)))
            assert [r[2] for r in results] == [b"hello"] * 6
            assert srv.connections == 2
            await pool.close()

    run(main())
