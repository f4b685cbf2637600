"""The proxy's HTTP/1.1 client: asyncio protocols, httptools' response parser, keep-alive pools.

Chosen by measurement (bench/stacks.py): one aiohttp ClientSession cost about 110 µs of CPU
per proxied request more than this client does, most of the gateway's budget. It does only
what a reverse proxy needs:

- one request at a time per connection (no pipelining), idle connections kept per target
  and TLS setting (most recently used first), closed after `keepalive` seconds idle, at most
  `limit` connections open per worker (more requests wait for one);
- request bodies as bytes (Content-Length) or an async iterator (streamed as it comes:
  chunked unless the caller sent a Content-Length), written while the response is read, so
  an upstream that answers early is heard;
- response bodies parsed by httptools (Content-Length, chunked, or up to the close),
  streamed with back-pressure: reading from the upstream pauses while more than
  HIGH_WATER bytes wait for the client;
- timeouts: connect, read and total, each its own error, so that the proxy can tell what
  may be retried. Read counts only the upstream's silence: while a streamed request body
  waits for the client's next chunk the read timer is held (the client's slowness is not
  the upstream's; the proxy's client body timeout covers it) and it restarts once the body
  has gone. Total is a deadline (`deadline=`, loop time) over the whole exchange, the
  connection's set-up included; the proxy passes one deadline to all tries of a request;
- a request that fails on a reused connection before any byte of an answer came back
  (the upstream closed it while it was idle) is sent once more on a new connection when its
  body can be replayed and either nothing of it was written or its method is idempotent
  (as Go's net/http does): a POST that reached the upstream is never sent twice.

Errors are UpstreamError subclasses; `connect_failed` says nothing was sent.
"""

from __future__ import annotations

import asyncio
import collections
import ssl as ssl_module
from typing import Any

import httptools

HIGH_WATER = 256 * 1024  # response bytes buffered before the upstream is paused
LOW_WATER = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})


# RFC 9110 §9.2.2: sending these twice has the effect of sending them once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class UpstreamError(Exception):
    """The exchange with the upstream failed."""

    connect_failed = False  # True: no byte of the request reached the upstream
    upstream_fault = True  # False: it was the client we were waiting for (not charged)


class UpstreamConnectError(UpstreamError):
    connect_failed = True


class UpstreamConnectTimeout(UpstreamConnectError, TimeoutError):
    pass


class UpstreamReadTimeout(UpstreamError, TimeoutError):
    pass


class UpstreamTotalTimeout(UpstreamError, TimeoutError):
    pass


class UpstreamClosed(UpstreamError):
    """The upstream closed the connection before its answer was complete."""


class UpstreamProtocolError(UpstreamError):
    """The upstream's answer is not valid HTTP/1.1."""


class _Stale(Exception):
    """A reused connection failed before any byte of the answer: it was closed while idle."""


class Response:
    """The upstream's answer: status and raw headers at once, the body as it arrives."""

    __slots__ = ("status", "raw_headers", "connection", "_conn", "_released")

    def __init__(self, conn: _Connection, status: int, headers: list) -> None:
        self.status = status
        self.raw_headers = headers  # [(name as sent, value)], bytes
        self.connection = conn.connection  # the Connection header's value(s), or None
        self._conn = conn
        self._released = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case)."""
        for k, v in self.raw_headers:
            if k.lower() == name:
                return v
        return None

    def complete_body(self) -> bytes | None:
        """The whole body when it has already arrived (a short answer), else None."""
        conn = self._conn
        if conn.done and conn.error is None:
            chunks = conn.chunks
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            return body
        return None

    def at_eof(self) -> bool:
        conn = self._conn
        return conn.done and not conn.chunks

    async def iter_chunks(self):
        """The body's chunks as they come (a failure raises an UpstreamError)."""
        conn = self._conn
        chunks = conn.chunks
        while True:
            if chunks:
                chunk = chunks.popleft()
                conn.buffered -= len(chunk)
                if conn.reading_paused and conn.buffered <= LOW_WATER:
                    conn.resume()
                yield chunk
            elif conn.error is not None:
                raise conn.error
            elif conn.done:
                return
            else:
                await conn.wait()

    async def read(self, limit: int) -> bytes:
        """The body, up to `limit` bytes (more only if one chunk held them)."""
        out: list[bytes] = []
        n = 0
        async for chunk in self.iter_chunks():
            out.append(chunk)
            n += len(chunk)
            if n >= limit:
                break
        return b"".join(out)

    def release(self) -> None:
        """Give the connection back (when the answer was read whole) or close it."""
        if self._released:
            return
        self._released = True
        self._conn.finish()


class _Connection(asyncio.Protocol):
    """One upstream connection; one exchange at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple) -> None:
        self.pool = pool
        self.key = key
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        # The current exchange.
        self.head_waiter: asyncio.Future | None = None
        self.status = 0
        self.headers: list = []
        self.connection: bytes | None = None  # the answer's Connection header (its tokens)
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.done = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.got_bytes = False
        self.head_only = False  # HEAD: the answer ends with its head
        self.close_delimited = False
        self.keep_alive = True
        self.reading_paused = False
        self.writing_paused = False
        self.drain_waiter: asyncio.Future | None = None
        self.last_read = 0.0
        self.timers: list[asyncio.TimerHandle] = []
        self.writer: asyncio.Task | None = None
        self.awaiting_body = False  # the writer waits for the client's next body chunk
        self.write_failed = False  # the request's one write failed: nothing reached the peer
        self._chunked = False
        self.busy = False  # an exchange is on this connection

    # --- asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool._open -= 1
        self.pool._wake_one()
        drain, self.drain_waiter = self.drain_waiter, None
        if drain is not None and not drain.done():
            drain.set_exception(UpstreamClosed("the upstream closed the connection"))
        if not self.busy or self.done or self.error is not None:
            return
        if self.status and self.close_delimited:
            self.done = True  # a body without a length ends with the connection
            self._wake()
            return
        self._fail(UpstreamClosed("the upstream closed the connection before its answer ended"))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"invalid answer: {exc}"))
            self.transport.close()

    # --- httptools callbacks ----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(name) == 10 and name.lower() == b"connection":
            self.connection = value if self.connection is None else self.connection + b"," + value

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim (100 Continue, 103): the real answer follows
            self.headers = []
            self.connection = None
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        if self.head_only or status in _NO_BODY_STATUSES:
            self.done = True
            if self.head_only:
                # httptools cannot be told the answer has no body: a new parser for the next.
                self.parser = httptools.HttpResponseParser(self)
        else:
            has_length = chunked = False
            for k, v in self.headers:
                k = k.lower()
                if k == b"content-length":
                    has_length = True
                elif k == b"transfer-encoding" and b"chunked" in v.lower():
                    chunked = True
            self.close_delimited = not has_length and not chunked
            if self.close_delimited:
                self.keep_alive = False
        waiter, self.head_waiter = self.head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.status:  # the end of an interim answer
            return
        self.done = True
        self._wake()

    # --- the exchange -----------------------------------------------------------------------
    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.keep_alive = False
        for fut in (self.head_waiter, self.waiter):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        self.head_waiter = self.waiter = None

    def wait(self) -> asyncio.Future:
        self.waiter = self.loop.create_future()
        return self.waiter

    def resume(self) -> None:
        self.reading_paused = False
        self.last_read = self.loop.time()  # the wait was ours, not the upstream's
        if not self.closed:
            self.transport.resume_reading()

    def start(self, head: bytes, body, head_only: bool, timeout, deadline) -> asyncio.Future:
        self.busy = True
        self.status = 0
        self.headers = []
        self.connection = None
        self.chunks.clear()
        self.buffered = 0
        self.done = False
        self.error = None
        self.got_bytes = False
        self.head_only = head_only
        self.close_delimited = False
        self.keep_alive = True
        self.head_waiter = waiter = self.loop.create_future()
        if timeout is not None or deadline is not None:
            self._arm(timeout, deadline)
        if body is None or isinstance(body, bytes | bytearray):
            self.transport.write(head + body if body else head)
            # A send that failed at once (the peer had reset it) wrote nothing.
            self.write_failed = self.transport.is_closing()
        else:
            self.transport.write(head)
            self.writer = self.loop.create_task(self._write_stream(body))
        return waiter

    async def _write_stream(self, body) -> None:
        chunked = self._chunked
        loop = self.loop
        body = body.__aiter__()
        try:
            while True:
                # Waiting for the client: the read timer holds (see _read_timer).
                self.awaiting_body = True
                try:
                    chunk = await body.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    self.awaiting_body = False
                    self.last_read = loop.time()  # the upstream's silence counts from here
                if self.closed or self.error is not None:
                    return
                if not chunk:
                    continue
                if chunked:
                    self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    self.transport.write(chunk)
                if self.writing_paused:
                    self.drain_waiter = loop.create_future()
                    await self.drain_waiter
                    self.last_read = loop.time()  # the upstream took the body: progress
            if chunked and not self.closed:
                self.transport.write(b"0\r\n\r\n")
        except UpstreamError:
            return  # the read side reports it
        except Exception as exc:  # the client's body failed (left, too large, too slow)
            self._fail(exc)
            if self.transport is not None:
                self.transport.close()

    def _arm(self, timeout, deadline) -> None:
        read = getattr(timeout, "sock_read", None)
        loop = self.loop
        self.last_read = loop.time()
        if read:
            self.timers.append(loop.call_later(read, self._read_timer, read))
        if deadline is not None:
            self.timers.append(loop.call_at(deadline, self._timed_out, UpstreamTotalTimeout))

    def _read_timer(self, interval: float) -> None:
        if self.done or self.error is not None:
            return
        # Held while we wait for the client (its body) or the client waits for us (paused).
        if self.reading_paused or self.awaiting_body:
            self.timers.append(self.loop.call_later(interval, self._read_timer, interval))
            return
        waited = self.loop.time() - self.last_read
        if waited < interval:
            self.timers.append(self.loop.call_later(interval - waited, self._read_timer, interval))
            return
        self._timed_out(UpstreamReadTimeout)

    def _timed_out(self, kind) -> None:
        if self.done or self.error is not None:
            return
        exc = kind("the upstream did not answer in time")
        if self.awaiting_body:
            exc.upstream_fault = False  # the deadline passed while the client was uploading
        self._fail(exc)
        self.transport.close()

    def finish(self) -> None:
        self.busy = False
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        writer, self.writer = self.writer, None
        reusable = (
            self.done
            and self.error is None
            and self.keep_alive
            and not self.closed
            and not self.chunks
            and (writer is None or writer.done())
        )
        if writer is not None and not writer.done():
            writer.cancel()
        if reusable:
            if self.reading_paused:
                self.resume()
            self.pool._put(self)
        else:
            self.done = True
            if not self.closed and self.transport is not None:
                self.transport.close()


class _Exchange:
    """`async with pool.request(...) as response`: the connection is released on exit."""

    __slots__ = ("pool", "args", "response")

    def __init__(self, pool: UpstreamPool, args: tuple) -> None:
        self.pool = pool
        self.args = args
        self.response: Response | None = None

    async def __aenter__(self) -> Response:
        self.response = await self.pool._request(*self.args)
        return self.response

    async def __aexit__(self, *exc_info) -> None:
        if self.response is not None:
            self.response.release()


class UpstreamPool:
    """Per worker: keep-alive connections to every upstream target."""

    def __init__(self, *, limit: int = 1000, keepalive: float = 60.0, max_idle: int = 256):
        self.loop = asyncio.get_running_loop()
        self.limit = limit
        self.keepalive = keepalive
        self.max_idle = max_idle
        self._idle: dict[tuple, collections.deque[_Connection]] = {}
        self._open = 0
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._default_tls: ssl_module.SSLContext | None = None
        self._unverified_tls: ssl_module.SSLContext | None = None

    def request(
        self,
        method: str,
        scheme: str,
        host: str,
        port: int,
        target: str,
        headers: list,
        body: Any = None,
        *,
        timeout=None,
        deadline: float | None = None,
        tls: ssl_module.SSLContext | bool = True,
        server_hostname: str | None = None,
    ) -> _Exchange:
        """`target` is the request target as sent (path and query, already encoded);
        `headers` (name, value) bytes pairs, Host among them or added from host:port.
        `timeout`: its sock_connect and sock_read apply per connection; its total from now,
        unless `deadline` (loop time) is given, which then ends the whole exchange."""
        return _Exchange(
            self,
            (
                method,
                scheme,
                host,
                port,
                target,
                headers,
                body,
                timeout,
                deadline,
                tls,
                server_hostname,
            ),
        )

    async def _request(
        self,
        method,
        scheme,
        host,
        port,
        target,
        headers,
        body,
        timeout,
        deadline,
        tls,
        server_hostname,
    ) -> Response:
        https = scheme == "https"
        tls_context = self._tls(tls) if https else None
        key = (https, host, port, server_hostname, id(tls_context))
        head, chunked = _head(method, target, headers, host, port, https, body)
        replayable = body is None or isinstance(body, bytes | bytearray)
        idempotent = method in IDEMPOTENT_METHODS
        head_only = method == "HEAD"
        if deadline is None and timeout is not None:
            total = getattr(timeout, "total", None)
            if total:
                deadline = self.loop.time() + total
        while True:
            conn = await self._get(key, host, port, tls_context, server_hostname, timeout, deadline)
            conn._chunked = chunked
            try:
                if conn.reused and (conn.closed or conn.transport.is_closing()):
                    raise _Stale  # found closed before a byte was written: any method
                waiter = conn.start(head, body, head_only, timeout, deadline)
                try:
                    await waiter
                except UpstreamClosed:
                    # Closed before any byte of an answer: it was closing while idle, or it
                    # read the request and died. Only a request that may be applied twice
                    # is sent again (RFC 9110 §9.2.2); a POST whose bytes went is not.
                    if (
                        conn.reused
                        and not conn.got_bytes
                        and replayable
                        and (idempotent or conn.write_failed)
                    ):
                        raise _Stale from None
                    raise
            except _Stale:
                conn.finish()
                continue  # once more, on a new connection (_get skips the closed one)
            except BaseException:
                conn.finish()
                raise
            return Response(conn, conn.status, conn.headers)

    async def _get(
        self, key, host, port, tls_context, server_hostname, timeout, deadline
    ) -> _Connection:
        while True:
            idle = self._idle.get(key)
            if idle:
                now = self.loop.time()
                while idle:
                    conn = idle.pop()
                    if not conn.closed and now - conn.idle_since < self.keepalive:
                        conn.reused = True
                        return conn
                    if not conn.closed:
                        conn.transport.close()
            if self._open < self.limit:
                break
            # At the limit: make room by closing another target's idle connection (its
            # connection_lost wakes us), or wait for a connection to be given back.
            for other in self._idle.values():
                if other:
                    other.popleft().transport.close()
                    break
            fut = self.loop.create_future()
            self._waiting.append(fut)
            if deadline is None:
                await fut
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        await fut
                except TimeoutError:
                    raise UpstreamTotalTimeout("no upstream connection free in time") from None
        self._open += 1
        connect_timeout = getattr(timeout, "sock_connect", None) if timeout else None
        by_deadline = False
        if deadline is not None:
            left = deadline - self.loop.time()
            if connect_timeout is None or left < connect_timeout:
                connect_timeout, by_deadline = max(left, 0.0), True
        kwargs: dict[str, Any] = {}
        if tls_context is not None:
            kwargs = {"ssl": tls_context, "server_hostname": server_hostname or host}
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self, key), host, port, **kwargs
                )
        except TimeoutError:
            self._open -= 1
            self._wake_one()
            if by_deadline:  # the request's total ran out while connecting
                raise UpstreamTotalTimeout(f"no connection to {host}:{port} in time") from None
            raise UpstreamConnectTimeout(f"no connection to {host}:{port} in time") from None
        except (OSError, ssl_module.SSLError) as exc:
            self._open -= 1
            self._wake_one()
            reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {reason}") from None
        return conn

    def _put(self, conn: _Connection) -> None:
        conn.idle_since = self.loop.time()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = collections.deque()
        idle.append(conn)
        if len(idle) > self.max_idle:
            oldest = idle.popleft()
            if not oldest.closed:
                oldest.transport.close()
        if self._waiting:
            self._wake_one(force=True)

    def _wake_one(self, *, force: bool = False) -> None:
        while self._waiting and (force or self._open < self.limit):
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _tls(self, tls) -> ssl_module.SSLContext:
        if isinstance(tls, ssl_module.SSLContext):
            return tls
        if tls is False:
            if self._unverified_tls is None:
                ctx = ssl_module.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl_module.CERT_NONE
                self._unverified_tls = ctx
            return self._unverified_tls
        if self._default_tls is None:
            self._default_tls = ssl_module.create_default_context()
        return self._default_tls

    async def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    conn.transport.close()
        self._idle.clear()


def _head(method, target, headers, host, port, https, body) -> tuple[bytes, bool]:
    """The request head, and whether the body goes chunked."""
    lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
    has_host = has_length = False
    for name, value in headers:
        if name == b"host":
            has_host = True
        elif name == b"content-length":
            has_length = True
        lines.append(b"%b: %b\r\n" % (name, value))
    if not has_host:
        default = 443 if https else 80
        netloc = f"[{host}]" if ":" in host else host
        if port != default:
            netloc = f"{netloc}:{port}"
        lines.append(b"host: %b\r\n" % (netloc.encode() if netloc.isascii() else _idna(netloc)))
    chunked = False
    if body is None:
        pass
    elif isinstance(body, bytes | bytearray):
        if not has_length:
            lines.append(b"content-length: %d\r\n" % len(body))
    elif not has_length:
        chunked = True
        lines.append(b"transfer-encoding: chunked\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), chunked


def _idna(netloc: str) -> bytes:
    host, sep, port = netloc.rpartition(":") if not netloc.endswith("]") else (netloc, "", "")
    if not sep:
        host, port = netloc, ""
    return host.encode("idna") + (b":" + port.encode() if port else b"")
