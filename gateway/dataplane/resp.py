"""A lean Redis client for the hot path: RESP2 over one pipelined asyncio connection.

The limiter makes one EVALSHA per request. redis-py's asyncio client spends about 84 µs of
CPU on each (a connection checked out of a pool and back, the command packed through several
layers, the reply read by a coroutine chain); this client writes the encoded command to one
long-lived connection on which commands are pipelined: Redis answers a connection's commands
in order, so each reply resolves the oldest waiting future. About 12 µs per call, measured
the same way (50 concurrent callers, one core).

It does only what the hot path needs: commands out; integer, string, array, nil and error
replies in; AUTH and SELECT from the URL (`redis://[user:password@]host[:port][/db]`,
`rediss://` for TLS with `ssl_cert_reqs`, `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`,
`unix:///path?db=N`); a deadline per command. Pub/sub, the response cache's store and the
log stream stay on redis-py, off the per-request path or on routes that ask for them.

Failure semantics, which the limiter turns into its fail-open/closed policy:
- a refused or lost connection fails every command waiting on it (`RedisUnavailable`); the
  next command connects again (concurrent callers share one attempt);
- a command not answered within `timeout` seconds means the connection is stuck: it is
  closed and everything waiting on it fails (`RedisTimeout`): replies are in order, so
  nothing behind the late one could have been answered anyway;
- an error reply (`-ERR ...`) fails that command only (`RedisReplyError`).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl as ssl_module
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit


class RedisUnavailable(Exception):
    """The connection could not be made, was lost, or is stuck."""


class RedisTimeout(RedisUnavailable):
    """A command was not answered in time."""


class RedisReplyError(Exception):
    """Redis answered with an error (`-ERR ...`, `-NOSCRIPT ...`)."""


_INCOMPLETE = object()  # the buffer ends inside a reply
RETRY_AFTER_FAILURE = 0.1  # seconds without connection attempts after one failed


def encode_command(args: tuple) -> bytes:
    """One command in RESP: an array of bulk strings (str is UTF-8, int is decimal)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


def parse_reply(buf: bytearray | bytes, pos: int):
    """(reply, position after it) of the reply starting at `pos`, or (_INCOMPLETE, pos).

    Integers come back as int, bulk and simple strings as bytes, nil as None, arrays as
    lists, and error replies as RedisReplyError instances (raised by the caller at the top
    level, left in place inside an array)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind = buf[pos]
    line = buf[pos + 1 : end]
    after = end + 2
    if kind == 58:  # ':' integer
        return int(line), after
    if kind == 36:  # '$' bulk string
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return _INCOMPLETE, pos
        return bytes(buf[after : after + size]), after + size + 2
    if kind == 42:  # '*' array
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = parse_reply(buf, after)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, after
    if kind == 43:  # '+' simple string
        return bytes(line), after
    if kind == 45:  # '-' error
        return RedisReplyError(bytes(line).decode("utf-8", "replace")), after
    raise RedisUnavailable(f"unexpected reply type {chr(kind)!r} from Redis")


# URL options (redis-py's names) that decide how to connect and are honoured here; other
# ssl_* options are refused (silently dropping a TLS setting would weaken or break it), and
# the rest (socket and pool tuning for redis-py) do not apply to this client.
_SSL_OPTIONS = {"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"}
_SSL_OPTIONS.add("ssl_check_hostname")
_TRUE = {"1", "true", "yes", "on"}

# Error replies after which this connection is no use: a failover demoted the server we are
# on. Reconnecting (and resolving the name again) finds the new primary.
_RECONNECT_ON = ("READONLY", "MASTERDOWN")


@dataclass(frozen=True)
class RedisAddress:
    """Where and how to connect, from a redis://, rediss:// or unix:// URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""  # a unix socket instead of host:port
    db: int = 0
    username: str = ""
    password: str = ""
    tls: ssl_module.SSLContext | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"REDIS_URL: unsupported scheme {parts.scheme!r}")
        unknown_ssl = sorted(k for k in query if k.startswith("ssl_") and k not in _SSL_OPTIONS)
        if unknown_ssl:
            raise ValueError(f"REDIS_URL: unsupported option {', '.join(unknown_ssl)}")
        path = unquote(parts.path)
        raw_db = query.get("db") or (path.strip("/") if parts.scheme != "unix" else "")
        try:
            db = int(raw_db or 0)
        except ValueError:
            raise ValueError(f"REDIS_URL: the database must be a number: {url!r}") from None
        tls = None
        if parts.scheme == "rediss":
            tls = ssl_module.create_default_context(cafile=query.get("ssl_ca_certs"))
            if query.get("ssl_keyfile") and not query.get("ssl_certfile"):
                raise ValueError("REDIS_URL: ssl_keyfile needs ssl_certfile")
            if query.get("ssl_certfile"):
                tls.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile"))
            requirement = query.get("ssl_cert_reqs", "required").lower()
            if requirement not in ("none", "optional", "required"):
                raise ValueError("REDIS_URL: ssl_cert_reqs must be none, optional or required")
            if requirement != "required" or query.get("ssl_check_hostname", "true") not in _TRUE:
                tls.check_hostname = False
            if requirement == "none":
                tls.verify_mode = ssl_module.CERT_NONE
            elif requirement == "optional":
                tls.verify_mode = ssl_module.CERT_OPTIONAL
        return cls(
            host=unquote(parts.hostname or "127.0.0.1"),
            port=parts.port or 6379,
            path=path if parts.scheme == "unix" else "",
            db=db,
            username=query.get("username") or unquote(parts.username or ""),
            password=query.get("password") or unquote(parts.password or ""),
            tls=tls,
        )


class _Connection(asyncio.Protocol):
    """One connection: commands written as they come, replies matched to them in order."""

    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[tuple[asyncio.Future, float]] = collections.deque()
        self.buffer = bytearray()
        self.closed = False
        self.error: RedisUnavailable | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, command: bytes) -> asyncio.Future:
        """The future of `command`'s reply (already failed if the connection is gone)."""
        fut = self.loop.create_future()
        if self.closed:  # e.g. Redis accepted, said -ERR max clients, and hung up
            fut.set_exception(self._why_closed())
            return fut
        # Written before it is queued: a write that raised must not leave a future behind
        # that would take the next command's reply.
        self.transport.write(command)
        self.waiting.append((fut, self.loop.time() + self.timeout))
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self.timeout, self._check_deadline)
        return fut

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        waiting = self.waiting
        reconnect = None
        try:
            while waiting:
                reply, after = parse_reply(buf, pos)
                if reply is _INCOMPLETE:
                    break
                pos = after
                fut = waiting.popleft()[0]
                if isinstance(reply, RedisReplyError):
                    if str(reply).startswith(_RECONNECT_ON):
                        reconnect = reply
                    if not fut.done():
                        fut.set_exception(reply)
                elif not fut.done():  # else its caller gave up (cancelled): dropped
                    fut.set_result(reply)
        except (ValueError, RedisUnavailable) as exc:
            self.abort(RedisUnavailable(f"unreadable reply from Redis: {exc}"))
            return
        if pos:
            del buf[:pos]
        if reconnect is not None:
            self.abort(RedisUnavailable(f"Redis answered {reconnect}: reconnecting"))
        elif not waiting and buf:
            self.abort(RedisUnavailable("Redis sent a reply nobody asked for"))

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self.waiting:
            return
        if self.closed:  # closed, but the loss is not reported yet: do not wait for it
            self._fail_waiting()
            return
        deadline = self.waiting[0][1]
        now = self.loop.time()
        if now >= deadline:
            self.abort(RedisTimeout(f"Redis did not answer within {self.timeout:g} s"))
            return
        self._watchdog = self.loop.call_later(deadline - now, self._check_deadline)

    def abort(self, exc: RedisUnavailable) -> None:
        """Close the connection and fail everything still waiting on it with `exc`."""
        if self.error is None:
            self.error = exc
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._fail_waiting()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.error is None:
            self.error = RedisUnavailable(f"connection to Redis lost: {exc or 'closed'}")
        self._fail_waiting()

    def _why_closed(self) -> RedisUnavailable:
        return self.error or RedisUnavailable("connection to Redis closed")

    def _fail_waiting(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        error = self._why_closed()
        while self.waiting:
            fut = self.waiting.popleft()[0]
            if not fut.done():
                fut.set_exception(error)


class RespClient:
    """A Redis client for a worker's event loop: `await client.execute("GET", "k")`.

    After a failed connection attempt, commands fail at once for RETRY_AFTER_FAILURE seconds
    instead of each trying again: a Redis that is down or refuses us costs a request next to
    nothing, and limits are back within that long of its return."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self.address = RedisAddress.from_url(url)
        self.timeout = timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task | None = None
        self._down: RedisUnavailable | None = None  # the last attempt's failure
        self._down_until = 0.0
        self._closed = False

    async def execute(self, *args):
        """Send one command; its reply (RedisReplyError raised, not returned)."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect()
        return await conn.send(encode_command(args))

    async def _connect(self) -> _Connection:
        """The live connection, made now if needed. One attempt at a time, shared: a caller
        that is cancelled leaves it running for the others."""
        if self._closed:
            raise RedisUnavailable("the client is closed")
        loop = asyncio.get_running_loop()
        if self._down is not None and loop.time() < self._down_until:
            raise RedisUnavailable(str(self._down))  # a new one: no traceback to grow
        if self._connecting is None:
            self._connecting = loop.create_task(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, task: asyncio.Task) -> None:
        self._connecting = None
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, whoever else awaits it
        if exc is not None:
            self._down = exc if isinstance(exc, RedisUnavailable) else RedisUnavailable(str(exc))
            self._down_until = asyncio.get_running_loop().time() + RETRY_AFTER_FAILURE
            return
        conn = task.result()
        if self._closed:  # closed while this attempt ran
            conn.abort(RedisUnavailable("the client is closed"))
            return
        self._down = None
        self._conn = conn

    async def _open(self) -> _Connection:
        a = self.address
        loop = asyncio.get_running_loop()
        factory = lambda: _Connection(self.timeout)  # noqa: E731
        try:
            if a.path:
                connecting = loop.create_unix_connection(factory, a.path)
            else:
                connecting = loop.create_connection(
                    factory, a.host, a.port, ssl=a.tls, server_hostname=a.host if a.tls else None
                )
            _, conn = await asyncio.wait_for(connecting, self.timeout)
        except (TimeoutError, OSError) as exc:
            where = a.path or f"{a.host}:{a.port}"
            raise RedisUnavailable(f"cannot connect to Redis at {where}: {exc!r}") from exc
        setup = []
        if a.password:
            auth = ("AUTH", a.username, a.password) if a.username else ("AUTH", a.password)
            setup.append(conn.send(encode_command(auth)))
        if a.db:
            setup.append(conn.send(encode_command(("SELECT", a.db))))
        try:
            # Every set-up reply is awaited (none left unretrieved), the first error raised.
            results = await asyncio.gather(*setup, return_exceptions=True)
        except BaseException:  # cancelled: this half-made connection is nobody's
            conn.abort(RedisUnavailable("connection set-up interrupted"))
            raise
        for result in results:
            if isinstance(result, RedisReplyError):
                conn.abort(RedisUnavailable(f"Redis refused the connection's set-up: {result}"))
                raise conn.error
            if isinstance(result, BaseException):
                conn.abort(RedisUnavailable(f"connection set-up failed: {result}"))
                raise conn.error
        if conn.closed:  # accepted, then closed at once (max clients, protected mode)
            raise conn.error or RedisUnavailable("Redis closed the connection")
        return conn

    async def close(self) -> None:
        """Close the connection; commands still waiting fail (RedisUnavailable)."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.abort(RedisUnavailable("the client is closed"))


class RespScript:
    """A Lua script run by EVALSHA, sent whole (EVAL, which caches it) when Redis lacks it."""

    def __init__(self, client: RespClient, source: str) -> None:
        self.client = client
        self.source = source
        # SHA-1 is what Redis names scripts by (EVALSHA), not a security measure.
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: list, args: list):
        try:
            return await self.client.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.client.execute("EVAL", self.source, len(keys), *keys, *args)
