"""Proxy: stream the request to an upstream target and the response back.

One pooled aiohttp session per worker, keep-alive both sides. Bodies are never buffered:
request chunks go up as the client sends them, response chunks come down as they arrive.
"""

from __future__ import annotations

import time
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.pipeline import Handler
from gateway.dataplane.problems import problem

# RFC 9110 §7.6.1 hop-by-hop fields, plus ones that the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Inbound copies are dropped: only the gateway may assert these to an upstream.
GATEWAY_ASSERTED = frozenset(
    {b"host", b"x-consumer-id", b"x-consumer-plan", b"x-request-id", b"x-forwarded-for"}
)
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
# The upstream's request id is replaced by the gateway's own.
_NOT_RETURNED = HOP_BY_HOP | {b"x-request-id"}


class ProxyHandler(Handler):
    def __init__(self, *, session_getter, strip_headers: frozenset[bytes]) -> None:
        self._session = session_getter
        # The credential header(s) of this route's API are removed before proxying.
        self.drop = HOP_BY_HOP | GATEWAY_ASSERTED | strip_headers

    def _upstream_headers(self, ctx: RequestContext) -> CIMultiDict:
        drop = self.drop
        scope_headers = ctx.scope["headers"]
        for k, v in scope_headers:
            if k == b"connection":  # fields it names are hop-by-hop too (RFC 9110 §7.6.1)
                drop = drop | {t.strip().lower() for t in v.split(b",")}
        pairs: list[tuple[str, str]] = []
        forwarded_for = None
        bearer_is_key = ctx.key is not None and b"authorization" not in drop
        for k, v in scope_headers:
            if k in drop:
                if k == b"x-forwarded-for":
                    forwarded_for = v
                continue
            if bearer_is_key and k == b"authorization" and v[:7].lower() == b"bearer ":
                continue  # the key came as a bearer token: do not pass it on
            pairs.append((k.decode("latin-1"), v.decode("latin-1")))
        out = CIMultiDict(pairs)
        client = ctx.client_ip
        # Inbound X-Forwarded-For is kept only as a prefix of ours; trusting it for policy
        # needs configured proxy CIDRs (data-plane issue).
        xff = f"{forwarded_for.decode('latin-1')}, {client}" if forwarded_for else client
        out["X-Forwarded-For"] = xff
        out["X-Forwarded-Proto"] = ctx.scope.get("scheme", "http")
        host = ctx.header(b"host")
        if host is not None:
            out["X-Forwarded-Host"] = host.decode("latin-1")
        out["X-Request-ID"] = ctx.request_id
        key = ctx.key
        if key is not None:
            out["X-Consumer-ID"] = str(key.consumer_id)
            out["X-Consumer-Plan"] = key.plan_slug
        return out

    async def _body(self, ctx: RequestContext):
        """The request body: bytes when it came in one message, else a streaming iterator."""
        first = await ctx.receive()
        if first["type"] == "http.disconnect":
            raise ConnectionResetError("client went away")
        chunk = first.get("body", b"")
        ctx.bytes_in += len(chunk)
        if not first.get("more_body", False):
            return chunk or None

        async def stream():
            if chunk:
                yield chunk
            while True:
                msg = await ctx.receive()
                if msg["type"] == "http.disconnect":
                    raise ConnectionResetError("client went away")
                data = msg.get("body", b"")
                if data:
                    ctx.bytes_in += len(data)
                    yield data
                if not msg.get("more_body", False):
                    return

        return stream()

    async def handle(self, ctx: RequestContext) -> LocalResponse | None:
        route = ctx.route
        assert route is not None
        target = route.upstream.pick()
        if target is None:
            ctx.error_kind = "no_target"
            return problem(
                "no-healthy-target",
                f"Upstream '{route.upstream.name}' has no enabled target.",
                request_id=ctx.request_id,
            )
        path = ctx.path
        if route.strip_prefix and route.api_prefix:
            path = path[len(route.api_prefix) :] or "/"
        url = target.base_url + quote(path, safe=_PATH_SAFE)
        query = ctx.scope.get("query_string", b"")
        if query:
            url += "?" + query.decode("latin-1")
        headers = self._upstream_headers(ctx)
        data = await self._body(ctx)
        timeout = route.upstream.timeout
        sent = time.perf_counter()
        send = ctx.send
        try:
            async with self._session().request(
                ctx.method,
                URL(url, encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=timeout,
            ) as resp:
                ctx.upstream_latency = time.perf_counter() - sent
                out = [(k, v) for k, v in resp.raw_headers if k.lower() not in _NOT_RETURNED]
                out.append((b"x-request-id", ctx.request_id.encode()))
                out.extend(ctx.response_headers)
                ctx.status = resp.status
                ctx.response_started = True
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                async for chunk in resp.content.iter_any():
                    ctx.bytes_out += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (TimeoutError, aiohttp.ServerTimeoutError):
            ctx.error_kind = "upstream_timeout"
            if ctx.response_started:
                raise
            return problem(
                "gateway-timeout",
                f"Upstream '{route.upstream.name}' did not answer in time.",
                request_id=ctx.request_id,
            )
        except aiohttp.ClientError as exc:
            ctx.error_kind = "upstream_error"
            if ctx.response_started:
                raise
            return problem(
                "bad-gateway",
                f"Upstream '{route.upstream.name}' could not be reached ({type(exc).__name__}).",
                request_id=ctx.request_id,
            )
        return None
