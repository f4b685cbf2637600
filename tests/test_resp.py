"""The lean Redis client of the limiter (gateway/dataplane/resp.py): replies parsed from any
split of the byte stream, pipelining that keeps every reply with its command, AUTH and SELECT
from the URL, and the failure semantics (lost, stuck, refused) the limiter relies on.
Against a real redis-server of each test's own, and scripted servers for the failures."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from gateway.dataplane.resp import (
    _INCOMPLETE,
    RedisAddress,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
    RespClient,
    RespScript,
    encode_command,
    parse_reply,
)


def test_replies_of_every_type_parse_from_any_split_of_the_stream():
    stream = b"*6\r\n:42\r\n$5\r\nhello\r\n$-1\r\n+OK\r\n*2\r\n:-1\r\n$0\r\n\r\n-ERR inner\r\n"
    whole, end = parse_reply(stream, 0)
    assert end == len(stream)
    assert whole[:5] == [42, b"hello", None, b"OK", [-1, b""]]
    assert isinstance(whole[5], RedisReplyError) and str(whole[5]) == "ERR inner"
    for cut in range(len(stream)):  # every prefix is incomplete, never a wrong value
        reply, pos = parse_reply(bytearray(stream[:cut]), 0)
        assert reply is _INCOMPLETE and pos == 0


def test_commands_are_arrays_of_bulk_strings():
    assert encode_command(("SET", "k", 12, b"\r\n")) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$2\r\n\r\n\r\n"
    )


def test_urls_give_host_port_database_credentials_and_tls():
    a = RedisAddress.from_url("redis://user:p%40ss@cache.internal:6380/5")
    assert (a.host, a.port, a.db, a.username, a.password, a.tls) == (
        "cache.internal",
        6380,
        5,
        "user",
        "p@ss",
        None,
    )
    assert RedisAddress.from_url("redis://127.0.0.1").db == 0
    assert RedisAddress.from_url("unix:///run/redis.sock?db=2").path == "/run/redis.sock"
    assert RedisAddress.from_url("unix:///run/redis.sock?db=2").db == 2
    assert RedisAddress.from_url("rediss://h:6379/0").tls is not None
    with pytest.raises(ValueError, match="scheme"):
        RedisAddress.from_url("http://h/0")
    with pytest.raises(ValueError, match="number"):
        RedisAddress.from_url("redis://h/cache")
    # redis-py's query options: credentials, and TLS settings honoured or refused, not dropped
    a = RedisAddress.from_url("unix:///run/my%20redis.sock?db=2&password=pw&username=u")
    assert (a.path, a.db, a.username, a.password) == ("/run/my redis.sock", 2, "u", "pw")
    assert not RedisAddress.from_url("rediss://h/0?ssl_check_hostname=false").tls.check_hostname
    assert RedisAddress.from_url("rediss://h/0").tls.check_hostname
    with pytest.raises(ValueError, match="ssl_ca_path"):
        RedisAddress.from_url("rediss://h/0?ssl_ca_path=/etc/ssl")
    with pytest.raises(ValueError, match="ssl_certfile"):
        RedisAddress.from_url("rediss://h/0?ssl_keyfile=/k.pem")
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        RedisAddress.from_url("rediss://h/0?ssl_cert_reqs=maybe")


# --- against a real Redis ---------------------------------------------------------------------
def _run(coro):
    return asyncio.run(coro)


def test_pipelined_commands_each_get_their_own_reply(own_redis):
    async def main():
        client = RespClient(f"redis://127.0.0.1:{own_redis.port}/0", timeout=2)
        try:
            assert await client.execute("SET", "greeting", "hi") == b"OK"
            # 500 at once on one connection: INCR returns the count after each, so every
            # caller must see a different number, 1..500, if replies stay with commands.
            counts = await asyncio.gather(*(client.execute("INCR", "n") for _ in range(500)))
            got = await client.execute("GET", "greeting")
            missing = await client.execute("GET", "nothing")
            listed = await client.execute("MGET", "greeting", "nothing")
            with pytest.raises(RedisReplyError, match="WRONGTYPE"):
                await client.execute("LPUSH", "greeting", "x")
            after_error = await client.execute("GET", "n")  # the stream is still in step
            return sorted(counts), got, missing, listed, after_error
        finally:
            await client.close()

    counts, got, missing, listed, after_error = _run(main())
    assert counts == list(range(1, 501))
    assert (got, missing, listed, after_error) == (b"hi", None, [b"hi", None], b"500")


def test_a_script_unknown_to_redis_is_sent_whole_once(own_redis):
    async def main():
        client = RespClient(f"redis://127.0.0.1:{own_redis.port}/0", timeout=2)
        try:
            script = RespScript(client, "return {tonumber(ARGV[1]) + 1, KEYS[1]}")
            await client.execute("SCRIPT", "FLUSH")
            first = await script(["k"], [41])  # NOSCRIPT -> EVAL, which caches it
            known = await client.execute("SCRIPT", "EXISTS", script.sha)
            second = await script(["k"], [1])
            return first, known, second
        finally:
            await client.close()

    assert _run(main()) == ([42, b"k"], [1], [2, b"k"])


def test_password_and_database_come_from_the_url(own_redis):
    base = f"127.0.0.1:{own_redis.port}"

    async def main():
        admin = RespClient(f"redis://{base}/0", timeout=2)
        await admin.execute("CONFIG", "SET", "requirepass", "s3cret")
        await admin.close()
        client = RespClient(f"redis://:s3cret@{base}/3", timeout=2)
        wrong = RespClient(f"redis://:nope@{base}/0", timeout=2)
        anonymous = RespClient(f"redis://{base}/0", timeout=2)
        db0 = RespClient(f"redis://default:s3cret@{base}/0", timeout=2)
        try:
            await client.execute("SET", "where", "three")
            with pytest.raises(RedisUnavailable, match="set-up"):
                await wrong.execute("PING")
            with pytest.raises(RedisReplyError, match="NOAUTH"):
                await anonymous.execute("GET", "where")
            return await client.execute("GET", "where"), await db0.execute("GET", "where")
        finally:
            for c in (client, wrong, anonymous, db0):
                await c.close()

    assert _run(main()) == (b"three", None)


def test_a_killed_server_fails_the_waiting_commands_and_a_restarted_one_is_used_again(
    own_redis,
):
    async def main():
        client = RespClient(f"redis://127.0.0.1:{own_redis.port}/0", timeout=2)
        try:
            assert await client.execute("PING") == b"PONG"
            # BLPOP waits server-side: these are in flight when the server dies.
            waiting = [asyncio.ensure_future(client.execute("BLPOP", "q", 5)) for _ in range(3)]
            await asyncio.sleep(0.1)
            own_redis.kill()
            results = await asyncio.gather(*waiting, return_exceptions=True)
            with pytest.raises(RedisUnavailable):  # refused: nothing listens
                await client.execute("PING")
            own_redis.start()
            # Failed attempts pause new ones for RETRY_AFTER_FAILURE (0.1 s): ask until the
            # client is back, for at most 5 s.
            for _ in range(100):
                try:
                    return results, await client.execute("PING")
                except RedisUnavailable:
                    await asyncio.sleep(0.05)
            return results, None
        finally:
            await client.close()

    results, pong = _run(main())
    assert all(isinstance(r, RedisUnavailable) for r in results), results
    assert pong == b"PONG"


def test_a_full_redis_fails_the_command_instead_of_hanging_it(own_redis):
    """At maxclients Redis accepts, writes an error and hangs up, often before the client has
    sent anything: with a SELECT to send first, the command must fail (not wait forever),
    and once there is room again the client must connect."""
    base = f"127.0.0.1:{own_redis.port}"

    async def main():
        admin = RespClient(f"redis://{base}/0", timeout=2)
        await admin.execute("CONFIG", "SET", "maxclients", "1")  # admin holds the one slot
        client = RespClient(f"redis://{base}/3", timeout=0.5)
        outcomes = []
        for _ in range(5):
            try:
                await asyncio.wait_for(client.execute("PING"), 5)
                outcomes.append("answered")
            except RedisUnavailable:
                outcomes.append("unavailable")
            await asyncio.sleep(0.15)  # past RETRY_AFTER_FAILURE: a new attempt each time
        await admin.execute("CONFIG", "SET", "maxclients", "100")
        await asyncio.sleep(0.15)
        reply = await asyncio.wait_for(client.execute("PING"), 5)
        for c in (client, admin):
            await c.close()
        return outcomes, reply

    outcomes, reply = _run(main())
    assert outcomes == ["unavailable"] * 5  # a hang would be TimeoutError from wait_for
    assert reply == b"PONG"


# --- scripted servers -------------------------------------------------------------------------
class Scripted:
    """A TCP server on loopback whose answer to each command is chosen by `reply(n)` (n: the
    command's number on the server, from 1); None means never answer."""

    def __init__(self, reply, delay: float = 0.0, greeting=None) -> None:
        self.reply = reply
        self.delay = delay
        self.greeting = greeting  # greeting(connection number) -> bytes sent, then hang up
        self.connections = 0
        self.commands = 0

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        buf = bytearray()
        refusal = self.greeting(self.connections) if self.greeting else None
        if refusal:  # as Redis at maxclients: an error, then the connection is closed
            writer.write(refusal)
            writer.close()
            return
        try:
            while data := await reader.read(65536):
                buf += data
                while True:
                    command, after = parse_reply(buf, 0)
                    if command is _INCOMPLETE:
                        break
                    del buf[:after]
                    self.commands += 1
                    answer = self.reply(self.commands)
                    if answer is None:
                        continue
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    writer.write(answer)
        except ConnectionError:
            pass
        finally:
            writer.close()


def test_a_stuck_server_times_out_every_waiting_command_and_the_next_reconnects():
    async def main():
        async with Scripted(lambda n: None if n <= 3 else b"+PONG\r\n") as srv:
            client = RespClient(f"redis://127.0.0.1:{srv.port}/0", timeout=0.3)
            started = time.monotonic()
            results = await asyncio.gather(
                *(client.execute("PING") for _ in range(3)), return_exceptions=True
            )
            waited = time.monotonic() - started
            pong = await client.execute("PING")
            await client.close()
            return results, waited, pong, srv.connections

    results, waited, pong, connections = _run(main())
    assert all(isinstance(r, RedisTimeout) for r in results), results
    assert 0.25 <= waited < 3.0  # the 0.3 s deadline; the rest is margin for a loaded machine
    assert pong == b"PONG" and connections == 2


def test_a_caller_that_gives_up_does_not_get_its_reply_handed_to_the_next():
    async def main():
        async with Scripted(lambda n: b":%d\r\n" % n, delay=0.05) as srv:
            client = RespClient(f"redis://127.0.0.1:{srv.port}/0", timeout=2)
            first = asyncio.ensure_future(client.execute("INCR", "a"))
            await asyncio.sleep(0)  # sent
            second = asyncio.ensure_future(client.execute("INCR", "a"))
            await asyncio.sleep(0.01)
            first.cancel()
            value = await second
            await client.close()
            return value

    assert _run(main()) == 2


def test_concurrent_first_commands_share_one_connection_attempt():
    async def main():
        async with Scripted(lambda n: b"+PONG\r\n") as srv:
            client = RespClient(f"redis://127.0.0.1:{srv.port}/0", timeout=2)
            replies = await asyncio.gather(*(client.execute("PING") for _ in range(100)))
            await client.close()
            return replies, srv.connections

    replies, connections = _run(main())
    assert replies == [b"PONG"] * 100 and connections == 1


def test_a_reply_nobody_asked_for_closes_the_connection():
    async def main():
        async with Scripted(lambda n: b"+OK\r\n+EXTRA\r\n" if n == 1 else b"+OK\r\n") as srv:
            client = RespClient(f"redis://127.0.0.1:{srv.port}/0", timeout=2)
            first = await client.execute("PING")
            await asyncio.sleep(0.05)  # the stray reply arrives; the connection is dropped
            second = await client.execute("PING")
            await client.close()
            return first, second, srv.connections

    assert _run(main()) == (b"OK", b"OK", 2)


def test_an_unreachable_server_is_reported_not_hung_on():
    async def main():
        client = RespClient("redis://127.0.0.1:1/0", timeout=0.5)
        with pytest.raises(RedisUnavailable, match="cannot connect"):
            await client.execute("PING")

    _run(main())


def test_a_server_that_hangs_up_at_once_fails_the_command_and_is_tried_again_later():
    """Redis at maxclients accepts, writes an error and closes: with AUTH and SELECT to send
    first, this must fail the command (not hang it), and a later attempt must work."""

    async def main():
        full = {"on": True}
        greeting = lambda n: b"-ERR max number of clients reached\r\n" if full["on"] else None  # noqa: E731
        async with Scripted(lambda n: b"+OK\r\n", greeting=greeting) as srv:
            client = RespClient(f"redis://:pw@127.0.0.1:{srv.port}/3", timeout=0.5)
            outcomes = []
            for _ in range(3):
                try:
                    await asyncio.wait_for(client.execute("PING"), 5)
                except RedisUnavailable as exc:
                    outcomes.append(type(exc).__name__)
            attempts = srv.connections  # the pause after a failure: no storm of connects
            full["on"] = False
            await asyncio.sleep(0.15)  # past RETRY_AFTER_FAILURE
            reply = await asyncio.wait_for(client.execute("PING"), 5)
            await client.close()
            return outcomes, attempts, reply

    outcomes, attempts, reply = _run(main())
    assert outcomes == ["RedisUnavailable"] * 3  # not a hang (wait_for would say TimeoutError)
    assert attempts == 1
    assert reply == b"OK"


def test_a_cancelled_first_caller_is_cancelled_and_the_others_still_get_answers():
    async def main():
        # The AUTH reply is slow, so the connection is still being set up when the first
        # caller is cancelled.
        async with Scripted(lambda n: b"+OK\r\n" if n == 1 else b":%d\r\n" % n, delay=0.1) as srv:
            client = RespClient(f"redis://:pw@127.0.0.1:{srv.port}/0", timeout=2)
            first = asyncio.ensure_future(client.execute("INCR", "a"))
            others = [asyncio.ensure_future(client.execute("INCR", "a")) for _ in range(3)]
            await asyncio.sleep(0.02)
            first.cancel()
            results = await asyncio.gather(*others)
            with contextlib.suppress(asyncio.CancelledError):
                await first
            await client.close()
            return first.cancelled(), results, srv.connections

    cancelled, results, connections = _run(main())
    assert cancelled and connections == 1
    assert sorted(results) == [2, 3, 4]


def test_a_demoted_primary_makes_the_client_reconnect():
    async def main():
        readonly = b"-READONLY You can't write against a read only replica.\r\n"
        async with Scripted(lambda n: readonly if n == 1 else b"+OK\r\n") as srv:
            client = RespClient(f"redis://127.0.0.1:{srv.port}/0", timeout=2)
            with pytest.raises(RedisReplyError, match="READONLY"):
                await client.execute("SET", "k", "v")
            await asyncio.sleep(0.01)
            reply = await client.execute("SET", "k", "v")
            await client.close()
            return reply, srv.connections

    assert _run(main()) == (b"OK", 2)


def test_closing_fails_waiting_commands_at_once():
    async def main():
        async with Scripted(lambda n: None) as srv:  # never answers
            client = RespClient(f"redis://127.0.0.1:{srv.port}/0", timeout=30)
            waiting = asyncio.ensure_future(client.execute("PING"))
            await asyncio.sleep(0.05)
            await client.close()
            with pytest.raises(RedisUnavailable, match="closed"):
                await asyncio.wait_for(waiting, 5)
            with pytest.raises(RedisUnavailable, match="closed"):
                await client.execute("PING")

    _run(main())
