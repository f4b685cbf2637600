"""The HTTP/1.1 server protocol of the data plane: an ASGI server on httptools, with limits.

uvicorn's Server still runs the worker (sockets, lifespan, signals, graceful shutdown,
WebSocket upgrades to wsprotocol.py); this class replaces its HTTP protocol. What it does
differently, and why:

- The request head is capped: 414 past MAX_URL_BYTES of URL, 431 past MAX_HEADER_BYTES of
  head, 408 when a head does not arrive within HEADER_TIMEOUT (slowloris), and malformed
  requests get a problem+json 400 like every other gateway error. uvicorn buffers a head
  without bound and answers in text/plain.
- A response head waits for its first body message and both leave in one write, one system
  call instead of two (a head with no body soon after is flushed at the end of the loop's
  iteration, so a slow stream still shows its status at once).
- Header names and values are checked with one pattern over all of them, not two per
  header, and idle keep-alive and head timeouts are kept by one sweep per worker instead of
  a timer armed and cancelled for every request.

bench/run.py measures it against uvicorn's own protocol (see the README).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from http import HTTPStatus
from random import getrandbits
from urllib.parse import unquote

import httptools
from django.conf import settings
from uvicorn.protocols.utils import get_local_addr, get_remote_addr

from gateway.dataplane.context import ClientBodyTimeout
from gateway.dataplane.problems import problem

log = logging.getLogger("gateway.protocol")

_LIMITS = settings.GATEWAY
MAX_HEADER_BYTES: int = _LIMITS["MAX_HEADER_BYTES"]
MAX_URL_BYTES: int = _LIMITS["MAX_URL_BYTES"]
HEADER_TIMEOUT: float = _LIMITS["HEADER_TIMEOUT"]
CLIENT_BODY_TIMEOUT: float = _LIMITS["CLIENT_BODY_TIMEOUT"]
BODY_HIGH_WATER = 64 * 1024  # request body buffered before reading from the client pauses

_DETAILS = {
    400: ("bad-request", "The request is not valid HTTP/1.1."),
    408: ("request-timeout", f"The request head did not arrive within {HEADER_TIMEOUT:g} s."),
    414: ("uri-too-long", f"The request target is longer than {MAX_URL_BYTES} bytes."),
    431: ("header-too-large", f"The request head is larger than {MAX_HEADER_BYTES} bytes."),
    500: ("internal", "Unexpected error."),
    501: (
        "not-implemented",
        "Transfer-Encoding other than chunked is not supported (RFC 9112 §6.1).",
    ),
    503: ("overloaded", "The gateway is at its concurrency limit; retry shortly."),
}
# RFC 9110 §5.6.2 token characters for names; values may not hold CR, LF, NUL or other
# controls but HTAB. Both patterns are character classes, so one search over all the names
# (and one over all the values) joined together covers a whole head.
_BAD_NAME = re.compile(rb'[\x00-\x1f\x7f()<>@,;:\[\]={} \t\\"]')
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:+=/-]{1,128}$")  # as app.py keeps one
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))
# Response header names seen, lower-cased and checked once: the same few dozen names come
# back on every response. Bounded: a flood of odd names only empties it.
_NAMES: dict[bytes, bytes] = {}
_NAMES_MAX = 4096


def _checked_name(name: bytes) -> bytes:
    if not name or _BAD_NAME.search(name):
        raise RuntimeError("invalid response header name")
    if len(_NAMES) >= _NAMES_MAX:
        _NAMES.clear()
    lower = _NAMES[name] = name.lower()
    return lower


_STATUS_LINE = {}
for _code in range(100, 600):
    try:
        _phrase = HTTPStatus(_code).phrase.encode()
    except ValueError:
        _phrase = b""
    _STATUS_LINE[_code] = b"HTTP/1.1 %d %s\r\n" % (_code, _phrase)
_last_warning = 0.0


def _warn(msg: str, *args) -> None:
    global _last_warning
    now = time.monotonic()
    if now - _last_warning >= 1.0:  # never a flood of lines for a flood of bad requests
        _last_warning = now
        log.warning(msg, *args)


class _Refused(Exception):
    pass


class _Sweeper:
    """One timer per worker: closes idle keep-alive connections and times out slow heads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connections: set) -> None:
        self.loop = loop
        self.connections = connections
        self.interval = min(1.0, HEADER_TIMEOUT / 8, CLIENT_BODY_TIMEOUT / 8)
        self.handle = loop.call_later(self.interval, self.sweep)

    def sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            if isinstance(conn, GatewayHttpProtocol):
                conn.check_timeouts(now)
        self.handle = self.loop.call_later(self.interval, self.sweep)


class _Cycle:
    """One request and its response: the ASGI receive and send of that request."""

    __slots__ = (
        "proto",
        "scope",
        "keep_alive",
        "body",
        "more_body",
        "waiters",
        "disconnected",
        "expect_100",
        "started",
        "complete",
        "head_only",
        "chunked",
        "remaining",
        "pending",
        "body_wait_since",
        "body_timed_out",
    )

    def __init__(self, proto: GatewayHttpProtocol, scope: dict, keep_alive: bool) -> None:
        self.proto = proto
        self.scope = scope
        self.keep_alive = keep_alive
        self.body = b""
        self.more_body = True
        self.waiters: list[asyncio.Future] | None = None  # receive() calls waiting
        self.disconnected = False
        self.expect_100 = proto._expect_100
        self.started = False
        self.complete = False
        self.head_only = scope["method"] == "HEAD"
        self.chunked = False
        self.remaining = -1  # bytes still due by Content-Length; -1: not framed by it
        self.pending: bytes | None = None  # a response head not written yet
        self.body_wait_since: float | None = None  # loop time a body read began waiting
        self.body_timed_out = False  # the sweep found it waiting past CLIENT_BODY_TIMEOUT

    def wake(self) -> None:
        waiters = self.waiters
        if waiters:
            self.waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait(self) -> None:
        # Its own future per call: two tasks may wait (a body reader and a disconnect
        # watcher), and cancelling one must not wake the other.
        waiter = self.proto.loop.create_future()
        if self.waiters is None:
            self.waiters = [waiter]
        else:
            self.waiters.append(waiter)
        await waiter

    async def run(self, app) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            log.error("exception in the gateway application", exc_info=exc)
            if not self.started and not self.disconnected:
                self.proto.refuse(500, keep_alive=False)
            else:
                self.proto.transport.close()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            if not self.started and not self.disconnected:
                log.error("the gateway application returned without a response")
                self.proto.refuse(500, keep_alive=False)
            elif not self.complete and not self.disconnected:
                log.error("the gateway application returned before its response was complete")
                self.proto.transport.close()

    # --- ASGI -----------------------------------------------------------------------------
    async def receive(self) -> dict:
        proto = self.proto
        if self.expect_100:
            self.expect_100 = False
            if not proto.transport.is_closing():
                proto.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not self.disconnected and not self.complete:
            if self.body or not self.more_body:
                if self.more_body is None:
                    break  # the whole body was handed over: wait for a disconnect below
                body, self.body = self.body, b""
                more = self.more_body
                if not more:
                    self.more_body = None
                proto.resume_reading()
                return {"type": "http.request", "body": body, "more_body": more}
            proto.resume_reading()
            self.body_wait_since = proto.loop.time()
            try:
                await self._wait()
            finally:
                self.body_wait_since = None
            if self.body_timed_out:
                self.body_timed_out = False
                if not self.body and self.more_body and not self.disconnected:
                    raise ClientBodyTimeout  # the sweep woke us: nothing came for too long
        while not self.disconnected and not self.complete:
            await self._wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        proto = self.proto
        if proto.write_paused and not self.disconnected:
            await proto.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {kind!r}")
            self._start(message["status"], message.get("headers", ()))
            self.started = True  # after the head is checked: a bad one is still answered 500
            self.expect_100 = False
            return
        if self.complete:
            raise RuntimeError(f"{kind!r} sent after the response was complete")
        if kind != "http.response.body":
            raise RuntimeError(f"expected http.response.body, got {kind!r}")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        out = self.pending or b""
        self.pending = None
        if self.head_only:
            pass
        elif self.chunked:
            if body:
                out += b"%x\r\n%b\r\n" % (len(body), body)
            if not more:
                out += b"0\r\n\r\n"
        elif body:
            if self.remaining >= 0:
                self.remaining -= len(body)
                if self.remaining < 0:
                    raise RuntimeError("response body longer than its Content-Length")
            out = out + body if out else body
        if out:
            proto.transport.write(out)
        if not more:
            if self.remaining > 0 and not self.head_only:
                raise RuntimeError("response body shorter than its Content-Length")
            self.complete = True
            self.wake()
            proto.response_complete(self)

    def _start(self, status: int, headers) -> None:
        values = []
        parts = [_STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status]
        close = False
        for name, value in headers:
            lower = _NAMES.get(name)
            if lower is None:
                lower = _checked_name(name)
            values.append(value)
            if lower in _FRAMING:
                if lower == b"content-length":
                    if self.remaining < 0 and not self.chunked:
                        self.remaining = int(value)
                elif lower == b"transfer-encoding":
                    if value.lower() == b"chunked":
                        self.chunked = True
                        self.remaining = -1
                elif b"close" in value.lower():  # connection
                    close = True
                    self.keep_alive = False
            parts += (lower, b": ", value, b"\r\n")
        if _BAD_VALUE.search(b"".join(values)):
            raise RuntimeError("invalid response header value")
        if not self.keep_alive and not close:
            parts.append(b"connection: close\r\n")
        if (
            self.remaining < 0
            and not self.chunked
            and not self.head_only
            and status not in (204, 304)
            and status >= 200
        ):
            self.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        if status in (204, 304) or 100 <= status < 200:
            self.remaining = -1
            self.chunked = False
            self.head_only = True
        parts.append(b"\r\n")
        self.pending = b"".join(parts)
        self.proto.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """A head whose body did not follow in the same loop iteration goes out on its own."""
        head = self.pending
        if head is not None and not self.disconnected:
            self.pending = None
            self.proto.transport.write(head)


class GatewayHttpProtocol(asyncio.Protocol):
    _sweepers: dict[int, _Sweeper] = {}

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.app_state = app_state
        self.root_path = config.root_path
        self.keepalive = float(config.timeout_keep_alive)
        self.limit_concurrency = config.limit_concurrency
        self.ws_protocol_class = config.ws_protocol_class
        self.parser = httptools.HttpRequestParser(self)
        # Answer a pipelined request even if the client half-closed after sending it.
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server = None
        self.client = None
        self.scheme = "http"
        self.cycle: _Cycle | None = None
        self.pipeline: deque[_Cycle] = deque()
        self.write_paused = False
        self._drain_waiter: asyncio.Future | None = None
        self._read_paused = False
        # The head being parsed.
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self._expect_100 = False
        self._field_bytes = 0  # header names and values parsed so far in this head
        self._read_bytes = 0  # bytes read while this head was incomplete
        self._in_head = False
        self._refuse = 0
        self._head_since: float | None = None  # loop time a head started; None: not waiting
        self._idle_since: float | None = None  # loop time the connection went idle
        self._upgrade = False
        self._method = "GET"

    # --- connection ----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.connections.add(self)
        self.transport = transport
        self.server = get_local_addr(transport)
        self.client = get_remote_addr(transport)
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        # A connection that sends nothing, or a head byte by byte, is closed after
        # HEADER_TIMEOUT, and an idle kept-alive one after the keep-alive timeout.
        self._head_since = self.loop.time()
        if id(self.loop) not in self._sweepers:
            self._sweepers[id(self.loop)] = _Sweeper(self.loop, self.connections)

    def connection_lost(self, exc) -> None:
        self.connections.discard(self)
        for cycle in (self.cycle, *self.pipeline):
            if cycle is not None:
                if not cycle.complete:
                    cycle.disconnected = True
                cycle.wake()
        self.pipeline.clear()
        self.write_paused = False
        self._wake_drain()
        self._head_since = self._idle_since = None
        if exc is None:
            self.transport.close()
        self.parser = None

    def eof_received(self) -> None:
        pass  # keep the socket half open: a pipelined request may still be answered

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        if self._drain_waiter is None:
            self._drain_waiter = self.loop.create_future()
        await asyncio.shield(self._drain_waiter)

    def pause_reading(self) -> None:
        if not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and not self.pipeline:
            self._read_paused = False
            self.transport.resume_reading()

    def check_timeouts(self, now: float) -> None:
        """Called by the sweep: the head timeout (408) and the keep-alive timeout."""
        if self.transport is None or self.transport.is_closing():
            return
        if self._head_since is not None and now - self._head_since >= HEADER_TIMEOUT:
            self._head_since = None
            if self._read_bytes or self._field_bytes or self.url:
                self.refuse(408)
            else:
                self.transport.close()  # never said a word: nothing to answer
        elif self._idle_since is not None and now - self._idle_since >= self.keepalive:
            self.transport.close()
        cycle = self.cycle
        if (
            cycle is not None
            and cycle.body_wait_since is not None
            and now - cycle.body_wait_since >= CLIENT_BODY_TIMEOUT
        ):
            # The application waits for a body that stopped coming (nginx's
            # client_body_timeout): its read raises ClientBodyTimeout, answered 408.
            cycle.body_timed_out = True
            cycle.wake()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close when idle, else after the current response."""
        if self.cycle is None or self.cycle.complete:
            self.transport.close()
        else:
            self.cycle.keep_alive = False

    # --- parsing ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._idle_since = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._upgrade:
                self._to_websocket()
            return
        except httptools.HttpParserError:
            self.refuse(self._refuse or 400)
            return
        if self._in_head:
            # A head trickling in over several reads: httptools holds the partial field, so
            # count the bytes read and stop at the cap before it grows further.
            self._read_bytes += len(data)
            if self._read_bytes > MAX_HEADER_BYTES + MAX_URL_BYTES:
                self.refuse(431)

    def on_message_begin(self) -> None:
        if self._head_since is None:  # the next head, on a kept-alive connection
            self._head_since = self.loop.time()
        self.url = b""
        self.headers = []
        self._expect_100 = False
        self._field_bytes = 0
        self._read_bytes = 0
        self._in_head = True
        self._refuse = 0
        self._upgrade = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL_BYTES:
            self._refuse = 414
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        # A head that arrived in one read is only seen here, field by field.
        self._field_bytes += len(name) + len(value) + 4
        if self._field_bytes > MAX_HEADER_BYTES:
            self._refuse = 431
            raise _Refused
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect_100 = True
        elif name == b"transfer-encoding" and value.strip().lower() != b"chunked":
            # gzip, chunked and the like: the gateway would drop the coding (hop-by-hop)
            # and send the coded bytes on as if they were the body.
            self._refuse = 501
            raise _Refused
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_since = None
        parser = self.parser
        version = parser.get_http_version()
        method = parser.get_method().decode("ascii")
        url = httptools.parse_url(self.url)
        if url.host:
            # The absolute form (GET http://host/path): its authority is the Host, whatever a
            # Host header says (RFC 9112 §3.2.2), for routing and forwarding alike (and for a
            # WebSocket handshake too).
            host = b"[%b]" % url.host if b":" in url.host else url.host
            if url.port:
                host += b":%d" % url.port
            self.headers = [(k, v) for k, v in self.headers if k != b"host"]
            self.headers.append((b"host", host))
        if parser.should_upgrade() and self.ws_protocol_class is not None and self._wants_ws():
            self._upgrade = True
            self._method = method
            return
        raw_path = url.path or b"/"  # "GET http://host HTTP/1.1" asks for "/"
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        root = self.root_path
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": method,
            "root_path": root,
            "path": root + path if root else path,
            "raw_path": root.encode("ascii") + raw_path if root else raw_path,
            "query_string": url.query or b"",
            "headers": self.headers,
            "state": self.app_state.copy(),
        }
        cycle = _Cycle(self, scope, version != "1.0" and parser.should_keep_alive())
        if self.cycle is None or self.cycle.complete:
            self.cycle = cycle
            self._start(cycle)
        else:
            # A pipelined request: answered after the one before it, in order.
            self.pipeline.append(cycle)
            self.pause_reading()

    def _wants_ws(self) -> bool:
        connection = upgrade = b""
        for name, value in self.headers:
            if name == b"connection":
                connection = value.lower()
            elif name == b"upgrade":
                upgrade = value.lower()
        tokens = [t.strip() for t in connection.split(b",")]
        return b"upgrade" in tokens and upgrade == b"websocket"

    def on_body(self, body: bytes) -> None:
        cycle = self.pipeline[-1] if self.pipeline else self.cycle
        if cycle is None or cycle.complete or self._upgrade:
            return
        cycle.body += body
        if len(cycle.body) > BODY_HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.pipeline[-1] if self.pipeline else self.cycle
        if cycle is None or cycle.complete or self._upgrade:
            return
        cycle.more_body = False
        cycle.wake()

    # --- requests ----------------------------------------------------------------------------
    def _start(self, cycle: _Cycle) -> None:
        app = self.app
        if self.limit_concurrency is not None and (
            len(self.connections) > self.limit_concurrency
            or len(self.tasks) >= self.limit_concurrency
        ):
            _warn(
                "refused a request: the concurrency limit (%d) is reached", self.limit_concurrency
            )
            cycle.started = cycle.complete = True
            self.refuse(503, keep_alive=cycle.keep_alive)
            self.response_complete(cycle)
            return
        task = self.loop.create_task(cycle.run(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def response_complete(self, cycle: _Cycle) -> None:
        self.server_state.total_requests += 1
        transport = self.transport
        if not cycle.keep_alive:
            transport.close()
            return
        if transport.is_closing():
            return
        if self.pipeline:
            self.cycle = nxt = self.pipeline.popleft()
            self._start(nxt)
            if not self.pipeline:
                self.resume_reading()
        else:
            self.resume_reading()
            if not self._in_head:
                self._idle_since = self.loop.time()

    def _to_websocket(self) -> None:
        self.connections.discard(self)
        out = [self._method.encode(), b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            out += (name, b": ", value, b"\r\n")
        out.append(b"\r\n")
        protocol = self.ws_protocol_class(
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        protocol.connection_made(self.transport)
        protocol.data_received(b"".join(out))
        self.transport.set_protocol(protocol)

    def refuse(self, status: int, *, keep_alive: bool = False) -> None:
        """A gateway error answered by the server itself, as problem+json; closes unless kept."""
        slug, detail = _DETAILS[status]
        # The refused head's own id, when it is the head being refused (not for a 500 or a
        # 503, whose request may not be the last head parsed).
        inbound = self._inbound_request_id() if status not in (500, 503) else None
        request_id = inbound or f"{getrandbits(128):032x}"
        body = problem(slug, detail, request_id=request_id).body
        head = [
            _STATUS_LINE[status],
            b"content-type: application/problem+json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: " + request_id.encode() + b"\r\n",
        ]
        if status == 503:
            head.append(b"retry-after: 1\r\n")
        if not keep_alive:
            head.append(b"connection: close\r\n")
        self.transport.write(b"".join(head) + b"\r\n" + body)
        if not keep_alive:
            self.transport.close()
        if status in (400, 408, 414, 431, 501):
            _warn("refused a request head from %s: %d", self.client, status)

    def _inbound_request_id(self) -> str | None:
        """A well-formed X-Request-ID of the head being refused, if it got that far."""
        for name, value in self.headers:
            if name == b"x-request-id" and _REQUEST_ID.match(value):
                return value.decode()
        return None
