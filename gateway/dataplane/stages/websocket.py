"""WebSocket: proxy an upgraded connection to a target of the route's upstream.

A route takes WebSocket handshakes when it has a `websocket` policy
(`{"idle_timeout": 60, "max_message_bytes": 1048576}`). The handshake passes the route's
stages first (IP policy, authentication, authorization, limits), so a refusal is an HTTP
401/403/429 problem before any upgrade (ASGI's websocket.http.response). Then the gateway
opens the upstream connection (same path rewriting, forwarding and consumer headers as
HTTP; the client's subprotocols offered, the upstream's choice accepted), accepts the
client, and relays text and binary messages, pings and pongs both ways, and the close code.
Pings pass through unanswered by the gateway (the data plane's server protocol,
`gateway/dataplane/wsprotocol.py`, exposes them to ASGI); under a server without that
extension each hop answers its own pings. No frame either way for `idle_timeout` (a ping
counts) closes both sides with 1001. The log event counts the data messages each way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import aiohttp
from yarl import URL

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.problems import problem
from gateway.dataplane.wsprotocol import EXTENSION as PING_EXTENSION

GOING_AWAY = 1001
_HANDSHAKE_HEADERS = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)


class WebSocketConfigError(ValueError):
    """A configuration that cannot be used; the message starts with the field."""


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    idle_timeout: float = 60.0
    max_message_bytes: int = 1 << 20


def parse_websocket(doc: object) -> WebSocketConfig:
    """A `websocket` policy's configuration, validated."""
    if not isinstance(doc, dict):
        raise WebSocketConfigError("config: expected an object.")
    unknown = sorted(set(doc) - {"idle_timeout", "max_message_bytes"})
    if unknown:
        raise WebSocketConfigError(f"config: unknown {', '.join(unknown)}.")
    idle = doc.get("idle_timeout", 60)
    if not isinstance(idle, int | float) or isinstance(idle, bool) or not 0.1 <= idle <= 86400:
        raise WebSocketConfigError("idle_timeout: seconds, 0.1 to 86400.")
    size = doc.get("max_message_bytes", 1 << 20)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 64 << 20:
        raise WebSocketConfigError("max_message_bytes: a number of bytes, 1 to 64 MiB.")
    return WebSocketConfig(float(idle), size)


async def deny(ctx: RequestContext, response: LocalResponse) -> None:
    """Refuse a handshake with an HTTP answer (the ASGI denial response extension)."""
    headers = [
        *response.headers,
        (b"content-length", str(len(response.body)).encode()),
        (b"x-request-id", ctx.request_id.encode()),
    ]
    headers.extend(ctx.response_headers)
    ctx.status = response.status
    ctx.response_started = True
    if "websocket.http.response" in ctx.scope.get("extensions", {}):
        await ctx.send(
            {"type": "websocket.http.response.start", "status": response.status, "headers": headers}
        )
        await ctx.send({"type": "websocket.http.response.body", "body": response.body})
    else:  # a server without the extension: the client sees 403
        await ctx.send({"type": "websocket.close", "code": 1008})


class WebSocketProxy:
    """The terminal step of a WebSocket handshake on a route (the HTTP proxy builds the
    upstream path and headers, so both speak to the upstream the same way)."""

    def __init__(self, *, config: WebSocketConfig, http, session_getter) -> None:
        self.config = config
        self.http = http  # stages/proxy.ProxyHandler of the same route
        self._session = session_getter

    async def serve(self, ctx: RequestContext) -> None:
        route = ctx.route
        upstream = route.upstream
        balancer = upstream.balancer
        target = balancer.pick(ctx, [])
        if target is None:
            ctx.error_kind = "no_target"
            await deny(
                ctx,
                problem(
                    "no-healthy-target",
                    f"Upstream '{upstream.name}' has no healthy target.",
                    request_id=ctx.request_id,
                ),
            )
            return
        scheme = ctx.scope.get("scheme", "ws")
        ctx.scope["scheme"] = "https" if scheme == "wss" else "http"  # forwarded as HTTP's
        path = self.http._upstream_path(ctx)
        query = ctx.scope.get("query_string", b"")
        if query:
            path += "?" + query.decode("latin-1")
        headers = self.http._upstream_headers(ctx)
        for name in list(headers):
            if name.lower() in _HANDSHAKE_HEADERS:
                del headers[name]
        base = target.base_url.replace("http", "ws", 1)  # http -> ws, https -> wss
        protocols = tuple(ctx.scope.get("subprotocols") or ())
        relay_pings = PING_EXTENSION in ctx.scope.get("extensions", {})
        connect_timeout = upstream.connect_timeout
        if route.timeout is not None and route.timeout.sock_connect:
            connect_timeout = route.timeout.sock_connect
        try:
            ws_up = await asyncio.wait_for(
                self._session().ws_connect(
                    URL(base + path, encoded=True),
                    headers=headers,
                    protocols=protocols,
                    max_msg_size=self.config.max_message_bytes,
                    autoping=not relay_pings,
                    ssl=upstream.ssl,
                    server_hostname=upstream.server_hostname,
                ),
                connect_timeout,
            )
        except aiohttp.WSServerHandshakeError as exc:
            balancer.succeeded(target)  # it answered: not a target failure
            ctx.error_kind = "upstream_error"
            await deny(
                ctx,
                problem(
                    "bad-gateway",
                    f"The upstream refused the WebSocket handshake ({exc.status}).",
                    request_id=ctx.request_id,
                ),
            )
            return
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            balancer.failed(target)
            ctx.error_kind = "upstream_error"
            slug = "gateway-timeout" if isinstance(exc, TimeoutError) else "bad-gateway"
            await deny(
                ctx,
                problem(slug, "The upstream WebSocket is unreachable.", request_id=ctx.request_id),
            )
            return
        balancer.succeeded(target)
        ctx.upstream_latency = ctx.elapsed()
        accept = {
            "type": "websocket.accept",
            "headers": [(b"x-request-id", ctx.request_id.encode())],
        }
        if ws_up.protocol:
            accept["subprotocol"] = ws_up.protocol
        if relay_pings:
            accept["relay_pings"] = True
        await ctx.send(accept)
        ctx.status = 101
        ctx.response_started = True
        target.active += 1
        try:
            await self._relay(ctx, ws_up)
        finally:
            target.active -= 1
            if not ws_up.closed:
                with contextlib.suppress(Exception):
                    await ws_up.close(code=GOING_AWAY)

    async def _relay(self, ctx: RequestContext, ws_up) -> None:
        last = [time.monotonic()]
        client_closed = asyncio.Event()

        async def client_to_upstream() -> None:
            while True:
                msg = await ctx.receive()
                kind = msg["type"]
                if kind == "websocket.receive":
                    last[0] = time.monotonic()
                    ctx.ws_in += 1
                    if msg.get("text") is not None:
                        ctx.bytes_in += len(msg["text"])
                        await ws_up.send_str(msg["text"])
                    else:
                        data = msg.get("bytes") or b""
                        ctx.bytes_in += len(data)
                        await ws_up.send_bytes(data)
                elif kind == "websocket.ping":
                    last[0] = time.monotonic()
                    await ws_up.ping(msg.get("bytes") or b"")
                elif kind == "websocket.pong":
                    last[0] = time.monotonic()
                    await ws_up.pong(msg.get("bytes") or b"")
                elif kind == "websocket.disconnect":
                    client_closed.set()
                    await ws_up.close(code=msg.get("code", 1000))
                    return

        async def upstream_to_client() -> None:
            async for msg in ws_up:
                last[0] = time.monotonic()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    ctx.ws_out += 1
                    ctx.bytes_out += len(msg.data)
                    await ctx.send({"type": "websocket.send", "text": msg.data})
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    ctx.ws_out += 1
                    ctx.bytes_out += len(msg.data)
                    await ctx.send({"type": "websocket.send", "bytes": msg.data})
                elif msg.type == aiohttp.WSMsgType.PING:  # autoping off: relayed
                    await ctx.send({"type": "websocket.ping", "bytes": msg.data})
                elif msg.type == aiohttp.WSMsgType.PONG:
                    await ctx.send({"type": "websocket.pong", "bytes": msg.data})
                else:  # CLOSE, CLOSING, CLOSED, ERROR
                    break
            if not client_closed.is_set():
                code = ws_up.close_code or 1000
                if code in (1005, 1006, 1015):  # reserved: never sent in a close frame
                    code = 1011 if code == 1006 else 1000
                with contextlib.suppress(Exception):
                    await ctx.send({"type": "websocket.close", "code": code})

        async def idle_watch() -> None:
            idle = self.config.idle_timeout
            while True:
                await asyncio.sleep(max(0.05, last[0] + idle - time.monotonic()))
                if time.monotonic() - last[0] >= idle:
                    ctx.error_kind = "websocket_idle"
                    with contextlib.suppress(Exception):
                        await ctx.send({"type": "websocket.close", "code": GOING_AWAY})
                    with contextlib.suppress(Exception):
                        await ws_up.close(code=GOING_AWAY)
                    return

        tasks = [
            asyncio.create_task(client_to_upstream()),
            asyncio.create_task(upstream_to_client()),
            asyncio.create_task(idle_watch()),
        ]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                ctx.error_kind = ctx.error_kind or "websocket_error"
