"""Proxy: stream the request to an upstream target and the response back.

One keep-alive pool per worker (gateway/dataplane/upstream.py), keep-alive both sides.
Bodies are never buffered:
request chunks go up as the client sends them, response chunks come down as they arrive.
A client that disconnects mid-response cancels the upstream exchange (a streaming upstream
must not be read forever for nobody).

Timeouts: the route's total `timeout` is one deadline for the whole exchange (connecting and
every retry included, as Envoy's route timeout); connect and read timeouts apply per try
inside it. A client that sends nothing of its body for CLIENT_BODY_TIMEOUT seconds gets 408
(nginx's client_body_timeout; the server protocol's sweep raises ClientBodyTimeout in the
read); that is never held against the upstream target.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from random import getrandbits
from urllib.parse import quote, unquote_plus

from django.conf import settings
from multidict import CIMultiDict

from gateway.dataplane.balancer import IDEMPOTENT, RETRY_STATUSES, TargetState
from gateway.dataplane.context import (
    ClientBodyTimeout,
    ClientDisconnected,
    LocalResponse,
    RequestContext,
)
from gateway.dataplane.problems import problem
from gateway.dataplane.stages.transform import HeaderOps, ResponseTransform, is_json
from gateway.dataplane.upstream import (
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTotalTimeout,
)

_CLIENT_BODY_TIMEOUT: float = settings.GATEWAY["CLIENT_BODY_TIMEOUT"]  # 408 past it

# RFC 9110 §7.6.1 hop-by-hop fields.
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
# Only the gateway may assert these to an upstream: inbound copies are dropped, under any
# spelling (names are compared lower-case with "_" read as "-", because CGI-style servers
# merge X_Consumer_ID into X-Consumer-ID).
GATEWAY_ASSERTED = frozenset(
    {
        b"host",
        b"via",
        b"traceparent",
        b"tracestate",
        b"x-request-id",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-port",
        b"forwarded",
        b"x-real-ip",
    }
)
_ASSERTED_PREFIX = b"x-consumer-"
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
# The upstream's request id is replaced by the gateway's own.
_NOT_RETURNED = HOP_BY_HOP | {b"x-request-id"}
# The CORS response headers (Fetch standard): on a route with a CORS policy, the gateway's
# are the only ones (an upstream's second Allow-Origin would make browsers refuse both).
_CORS_RESPONSE = frozenset(
    b"access-control-" + name
    for name in (
        b"allow-origin",
        b"allow-credentials",
        b"allow-methods",
        b"allow-headers",
        b"expose-headers",
        b"max-age",
        b"allow-private-network",
    )
)
VIA = "1.1 apigw"  # RFC 9110 §7.6.3: received-protocol and a pseudonym, no version leak
_VIA = VIA.encode()
_VIA_RESPONSE = (b"via", _VIA)
# W3C Trace Context: version-traceid-parentid-flags; all-zero ids are invalid.
_TRACEPARENT = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


# host[:port] (or [v6]:port): what a Host or a trusted X-Forwarded-Host may be, so that it is
# also safe inside Forwarded's quoted host. app.py refuses requests whose Host is not.
HOST_VALUE = re.compile(rb"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(:[0-9]{1,5})?$")
# Inbound headers that are dropped but read to build the gateway's own versions.
_REWRITTEN = frozenset(
    {
        b"host",
        b"via",
        b"traceparent",
        b"tracestate",
        b"x-forwarded-for",
        b"forwarded",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }
)


class BodyTooLarge(Exception):
    """The request body grew past the route's limit while it streamed."""


def valid_traceparent(value: bytes) -> bool:
    m = _TRACEPARENT.match(value.strip())
    if m is None:
        return False
    version, trace, parent, _flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest):
        return False
    return trace != b"0" * 32 and parent != b"0" * 16


def _forwarded_node(ip: str) -> str:
    """An RFC 7239 node: IPv6 addresses are bracketed and quoted."""
    return f'"[{ip}]"' if ":" in ip else ip


class ProxyHandler:
    def __init__(
        self,
        *,
        pool_getter,
        key_header: bytes,
        preserve_host: bool = False,
        forward_credential: bool = False,
        key_query_param: str = "",
        request_headers: HeaderOps | None = None,
        response: ResponseTransform | None = None,
        cors: bool = False,
    ) -> None:
        self._pool = pool_getter
        self.key_header = key_header  # the API's credential header: not forwarded by default
        self.drop = HOP_BY_HOP | GATEWAY_ASSERTED
        if not forward_credential:
            self.drop = self.drop | {key_header}
        self.preserve_host = preserve_host
        self.forward_credential = forward_credential
        self.key_query_param = key_query_param
        # Transformation policies (stages/transform.py): header operations on what goes
        # upstream, and on what comes back (headers, JSON body).
        self.request_headers = request_headers
        self.response = response
        self.response_json = response.json if response is not None else None
        self.response_headers = response.headers if response is not None else None
        # The route's CORS policy speaks for it: an upstream's own Access-Control-* headers
        # would make a second Allow-Origin, which browsers reject.
        self.cors = cors
        self.not_returned = _NOT_RETURNED | _CORS_RESPONSE if cors else _NOT_RETURNED

    def _upstream_headers(self, ctx: RequestContext) -> CIMultiDict:
        """The headers sent upstream, for aiohttp (the WebSocket stage)."""
        return CIMultiDict(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in self._upstream_pairs(ctx)
        )

    def _upstream_pairs(self, ctx: RequestContext) -> list[tuple[bytes, bytes]]:
        """The headers sent upstream: the client's, less hop-by-hop and gateway-asserted
        ones, plus the gateway's own (forwarding, trace, request id, consumer)."""
        drop = self.drop
        scope_headers = ctx.scope["headers"]
        for k, v in scope_headers:
            if k == b"connection":  # fields it names are hop-by-hop too (RFC 9110 §7.6.1)
                drop = drop | {t.strip().lower() for t in v.split(b",")}
        out: list[tuple[bytes, bytes]] = []
        seen: dict[bytes, bytes] = {}  # the dropped headers that the gateway rewrites
        strip_bearer = ctx.credential == "bearer" and not self.forward_credential
        identity = self.response_json is not None  # the JSON answer is read to be transformed
        for k, v in scope_headers:
            name = k.replace(b"_", b"-") if b"_" in k else k
            if name in drop or name.startswith(_ASSERTED_PREFIX):
                if k in _REWRITTEN:
                    seen[k] = v
                continue
            if strip_bearer and k == b"authorization" and v[:7].lower() == b"bearer ":
                continue  # the key came as a bearer token: do not pass it on
            if identity and name == b"accept-encoding":
                continue
            out.append((k, v))
        # Every name below was dropped from the client's headers above: appending them is
        # setting them.
        host = seen.get(b"host")
        forwarded = None
        peer = ctx.peer_ip.encode("latin-1")
        proto = ctx.scope.get("scheme", "http").encode("latin-1")
        public_host = host if host is not None else b""
        if ctx.trusted_peer:
            # A configured proxy in front of us: its view of the client, scheme and host
            # holds, and we add ourselves to the chain.
            forwarded = seen.get(b"forwarded")
            chain = seen.get(b"x-forwarded-for", b"")
            out.append((b"x-forwarded-for", chain + b", " + peer if chain else peer))
            forwarded_proto = seen.get(b"x-forwarded-proto")
            if forwarded_proto:
                proto = forwarded_proto
            forwarded_host = seen.get(b"x-forwarded-host")
            if forwarded_host and HOST_VALUE.match(forwarded_host):
                public_host = forwarded_host
        else:
            # Anyone else's forwarding headers are dropped: they would let a client pose as
            # another address (X-Forwarded-For feeds IP policies and logs upstream).
            out.append((b"x-forwarded-for", peer))
        out.append((b"x-forwarded-proto", proto))
        if public_host:
            out.append((b"x-forwarded-host", public_host))
        # Our own Forwarded element describes the hop that reached us (RFC 7239 §5.3, §5.4):
        # the scheme and Host we received, not the client's view that X-Forwarded-* carry on.
        own_proto = ctx.scope.get("scheme", "http").encode("latin-1")
        element = b"for=" + _forwarded_node(ctx.peer_ip).encode("latin-1") + b";proto=" + own_proto
        if host is not None:  # checked on arrival (app.py): one, and quote-safe
            element += b';host="' + host + b'"'
        out.append((b"forwarded", forwarded + b", " + element if forwarded else element))
        via = seen.get(b"via")
        out.append((b"via", via + b", " + _VIA if via else _VIA))
        if self.preserve_host and host is not None:
            out.append((b"host", host))
        traceparent = seen.get(b"traceparent")
        if traceparent is not None and valid_traceparent(traceparent):
            out.append((b"traceparent", traceparent.strip()))
            if b"tracestate" in seen:
                out.append((b"tracestate", seen[b"tracestate"]))
        else:
            # Start a trace; when the request id is ours, it is the trace id as well, so
            # that one id finds the request in the gateway's log and in the upstream's traces.
            rid = ctx.request_id
            trace = rid if ctx.request_id_generated else f"{getrandbits(128):032x}"
            out.append((b"traceparent", f"00-{trace}-{getrandbits(64):016x}-01".encode()))
        out.append((b"x-request-id", ctx.request_id.encode("latin-1")))
        key = ctx.key
        if key is not None:
            out.extend(key.consumer_headers)
        if identity:
            out.append((b"accept-encoding", b"identity"))
        if self.request_headers is not None:
            out = self.request_headers.apply(out, ctx)
        return out

    async def _body(self, ctx: RequestContext):
        """The request body: bytes when it came in one message, else a streaming iterator.
        Each read of it may raise ClientBodyTimeout."""
        first = await ctx.receive()
        if first["type"] == "http.disconnect":
            ctx.client_gone = True
            raise ClientDisconnected
        chunk = first.get("body", b"")
        ctx.bytes_in += len(chunk)
        limit = ctx.route.max_body
        if limit and ctx.bytes_in > limit:
            raise BodyTooLarge
        if not first.get("more_body", False):
            ctx.body_done = True
            return chunk or None

        async def stream():
            ctx.body_streamed = True  # from here on the request cannot be sent again
            if chunk:
                yield chunk
            while True:
                msg = await ctx.receive()
                if msg["type"] == "http.disconnect":
                    ctx.client_gone = True
                    raise ClientDisconnected
                data = msg.get("body", b"")
                if data:
                    ctx.bytes_in += len(data)
                    if limit and ctx.bytes_in > limit:
                        ctx.body_too_large = True
                        raise BodyTooLarge
                    yield data
                if not msg.get("more_body", False):
                    ctx.body_done = True
                    return

        return stream()

    def _upstream_path(self, ctx: RequestContext) -> str:
        """The path to send upstream: the client's own bytes where that is safe."""
        route = ctx.route
        if route.rewrite is not None:
            return _rewritten(route, ctx.path, ctx.path_params)
        strip = route.strip
        raw = ctx.scope.get("raw_path")
        # When normalising changed nothing, forward the raw bytes (keeping %2F, %FF, …) after
        # the prefix; otherwise the normalised path that the route was matched on.
        if raw and ctx.path == ctx.scope["path"]:
            raw = raw.split(b"?", 1)[0]
            cut = len(strip)
            if raw.startswith(strip.encode()) and raw[cut : cut + 1] in (b"/", b""):
                raw_path = raw[cut:].decode("latin-1")
                return raw_path or "/"
        path = ctx.path[len(strip) :] if strip else ctx.path
        return quote(path or "/", safe=_PATH_SAFE)

    async def handle(self, ctx: RequestContext) -> LocalResponse | None:
        route = ctx.route
        assert route is not None
        upstream = route.upstream
        balancer = upstream.balancer
        path = self._upstream_path(ctx)
        query = ctx.scope.get("query_string", b"")
        if self.key_query_param and query and not self.forward_credential:
            # Removed whether or not it was the credential used: a key never goes upstream.
            query = _without_param(query, self.key_query_param)
        if query:
            path += "?" + query.decode("latin-1")
        headers = self._upstream_pairs(ctx)
        timeout = route.timeout or upstream.timeout
        try:
            data = await self._body(ctx)
        except BodyTooLarge:
            ctx.error_kind = "body_too_large"
            return body_too_large(ctx)
        except ClientBodyTimeout:
            ctx.error_kind = "client_body_timeout"
            return client_body_timeout(ctx)
        # The route's total: one deadline over every try, connecting included, from when the
        # request (or the first part of a streamed body) is in.
        total = timeout.total if timeout is not None else None
        deadline = asyncio.get_running_loop().time() + total if total else None
        idempotent = ctx.method in IDEMPOTENT
        tries_left = route.retries
        tried: list[TargetState] = []
        budget = balancer.budget  # outlives snapshots: counters stay right across a swap
        budget.in_flight += 1
        retrying = False
        failure = None
        try:
            while True:
                target = balancer.pick(ctx, tried)
                if target is None:
                    if failure is not None:
                        return failure  # the last try's answer beats "no target" on a retry
                    ctx.error_kind = "no_target"
                    return problem(
                        "no-healthy-target",
                        f"Upstream '{upstream.name}' has no healthy or available target.",
                        request_id=ctx.request_id,
                    )
                tried.append(target)
                # Retry only what is safe to send again: nothing of a streamed body has gone
                # (it cannot be replayed), and past the connection only idempotent methods.
                # A retry prefers a target not tried yet (nginx's proxy_next_upstream), else
                # any available one, the same again included (pick() chooses).
                # The retry budget is asked before the try (may its failure be held back
                # for a retry?) and again when it failed: requests that started together
                # fail together (an outage), and only the budget's share of them may retry.
                # A request already retrying holds its slot for its further tries.
                can_retry = (
                    tries_left > 0 and not ctx.body_streamed and (retrying or balancer.may_retry())
                )
                outcome = await self._exchange(
                    ctx,
                    target,
                    path,
                    headers,
                    data,
                    timeout,
                    deadline,
                    last=not (can_retry and idempotent),
                    retrying=retrying,
                )
                if outcome is None:
                    return None  # answered (or the client left)
                failure, retry_any_method = outcome
                if (
                    not can_retry
                    or retry_any_method is None  # the route's deadline has passed
                    or not (retry_any_method or idempotent)
                    or ctx.body_streamed
                    or (deadline is not None and asyncio.get_running_loop().time() >= deadline)
                    or not (retrying or balancer.may_retry())
                ):
                    return failure
                tries_left -= 1
                ctx.retries += 1
                if not retrying:
                    retrying = True
                    budget.retries_in_flight += 1
        finally:
            budget.in_flight -= 1
            if retrying:
                budget.retries_in_flight -= 1

    async def _exchange(
        self,
        ctx: RequestContext,
        target: TargetState,
        path,
        headers,
        data,
        timeout,
        deadline,
        *,
        last,
        retrying=False,
    ) -> tuple[LocalResponse, bool | None] | None:
        """One try against one target. None when the client got an answer (or left); else
        (the problem to answer with, whether even a non-idempotent request may be retried:
        None when no request may, the route's total deadline being over)."""
        upstream = ctx.route.upstream
        balancer = upstream.balancer
        send = ctx.send
        watcher: asyncio.Task | None = None
        verdict = None  # "judged": success told; False: failure; None: no verdict (client left)
        ctx.error_kind = ""
        target.active += 1
        try:
            sent = time.perf_counter()
            async with self._pool().request(
                ctx.method,
                target.scheme,
                target.host,
                target.port,
                path,
                headers,
                data,
                timeout=timeout,
                deadline=deadline,
                tls=upstream.ssl,
                server_hostname=upstream.server_hostname,
            ) as resp:
                ctx.upstream_latency = time.perf_counter() - sent
                status = resp.status
                if status in RETRY_STATUSES:
                    verdict = False
                    if not last and not ctx.body_streamed:
                        # Told now, for the question: is any target left for another try?
                        balancer.failed(target)
                        verdict = "judged"
                        # ... and is there room in the retry budget (now, not when the try
                        # began)? If not, the upstream's answer passes through.
                        if balancer.any_available() and (retrying or balancer.may_retry()):
                            # Another try will answer: this one is dropped, unread.
                            return _upstream_status_problem(ctx, status), False
                        # None left (this failure opened the last circuit), or no room in
                        # the budget: it passes through.
                else:
                    # Judged on the head: a long answer (a stream) must not hold the circuit's
                    # half-open trial slot until it ends.
                    balancer.succeeded(target)
                    verdict = "judged"
                not_returned = self.not_returned
                if resp.connection is not None:
                    # Fields the upstream's Connection names are hop-by-hop too (RFC 9110
                    # §7.6.1), as on the way up.
                    not_returned = not_returned | {
                        t.strip().lower() for t in resp.connection.split(b",")
                    }
                out = [(k, v) for k, v in resp.raw_headers if k.lower() not in not_returned]
                if self.response_headers is not None:
                    out = self.response_headers.apply(out, ctx)
                if self.response_json is not None and is_json(resp.header(b"content-type") or b""):
                    return await self._send_transformed(ctx, resp, status, out)
                observers = ctx.observers  # the cache's capture, a response check
                for o in observers:
                    o.begin(status, out)
                out.append((b"x-request-id", ctx.request_id.encode()))
                out.append(_VIA_RESPONSE)
                out.extend(ctx.response_headers)
                ctx.status = status
                ctx.response_started = True
                await send({"type": "http.response.start", "status": status, "headers": out})
                body = resp.complete_body()
                if body is not None:  # a short answer, here whole: one message
                    ctx.bytes_out += len(body)
                    for o in observers:
                        o.feed(body)
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                    for o in observers:
                        o.finish(ok=True)
                    return None
                async for chunk in resp.iter_chunks():
                    ctx.bytes_out += len(chunk)
                    for o in observers:
                        o.feed(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if watcher is None and ctx.body_done and not resp.at_eof():
                        # A response still going after its first chunk may be long (a stream):
                        # watch for the client leaving. Short answers never pay for a task.
                        ctx.task = asyncio.current_task()
                        watcher = asyncio.create_task(_cancel_on_disconnect(ctx))
                if watcher is not None:
                    watcher.cancel()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                for o in observers:
                    o.finish(ok=True)
            return None
        except asyncio.CancelledError:
            verdict = None
            raise
        except Exception as exc:
            if ctx.client_gone:
                verdict = None
                return None  # nobody to answer; logged as 499
            if isinstance(exc, BodyTooLarge) or ctx.body_too_large:
                verdict = None
                ctx.error_kind = "body_too_large"
                if ctx.response_started:
                    # The upstream answered before the body was all in: its status has gone
                    # out, so the connection is cut (logged with that status and this kind).
                    raise
                return body_too_large(ctx), False
            if isinstance(exc, ClientBodyTimeout) or not getattr(exc, "upstream_fault", True):
                # The client was slow, not the upstream: never held against the target.
                verdict = None
                if ctx.response_started:
                    ctx.error_kind = "client_body_timeout"
                    raise
                if isinstance(exc, ClientBodyTimeout):
                    ctx.error_kind = "client_body_timeout"
                    return client_body_timeout(ctx), False
                ctx.error_kind = "upstream_timeout"
                return _timeout_problem(ctx), None
            if isinstance(exc, UpstreamTotalTimeout):
                # The request's deadline (all tries, the wait for a pooled connection
                # included), not this target's: the per-try connect and read timeouts are
                # what judge a target, so a retry begun with little time left, or a queue in
                # our own pool, never ejects a healthy one.
                verdict = None
                ctx.error_kind = "upstream_timeout"
                if ctx.response_started:
                    raise
                return _timeout_problem(ctx), None
            verdict = False
            if ctx.response_started:
                ctx.error_kind = "upstream_aborted"
                raise
            if isinstance(exc, UpstreamConnectTimeout):
                ctx.error_kind = "upstream_timeout"
                return _timeout_problem(ctx), True  # nothing was sent
            if isinstance(exc, TimeoutError):
                ctx.error_kind = "upstream_timeout"
                return _timeout_problem(ctx), False
            if isinstance(exc, UpstreamError):
                ctx.error_kind = "upstream_error"
                # Refused (connect_failed): nothing was sent, any method may go elsewhere.
                return _unreachable_problem(ctx, exc), exc.connect_failed
            raise
        finally:
            target.active -= 1
            if watcher is not None and not watcher.done():
                watcher.cancel()
            if verdict is False:
                balancer.failed(target)
            elif verdict is None:
                balancer.abandoned(target)

    async def _send_transformed(self, ctx: RequestContext, resp, status: int, out) -> None:
        """A JSON answer read whole (under the policy's cap), transformed, then sent; one that
        cannot be checked (too large, compressed) is refused rather than passed on."""
        transform = self.response
        assert transform is not None and self.response_json is not None
        encoding = (resp.header(b"content-encoding") or b"identity").strip().lower()
        raw = await resp.read(transform.max_body + 1)
        if len(raw) > transform.max_body or encoding not in (b"", b"identity"):
            ctx.error_kind = "response_untransformable"
            why = (
                "too large"
                if len(raw) > transform.max_body
                else f"{encoding.decode('latin-1')}-encoded"
            )
            await _send_problem(
                ctx,
                problem(
                    "bad-gateway",
                    f"The upstream's JSON answer is {why} and cannot be transformed.",
                    request_id=ctx.request_id,
                ),
            )
            return None
        body = raw
        try:
            doc = json.loads(raw)
        except ValueError:
            pass  # not JSON after all: passed on as it came
        else:
            body = json.dumps(self.response_json.apply(doc, ctx), separators=(",", ":")).encode()
        out = [(k, v) for k, v in out if k.lower() != b"content-length"]
        observers = ctx.observers  # what they see is what the client gets: transformed
        for o in observers:
            o.begin(status, out)
            o.feed(body)
        out.append((b"content-length", str(len(body)).encode()))
        out.append((b"x-request-id", ctx.request_id.encode()))
        out.append(_VIA_RESPONSE)
        out.extend(ctx.response_headers)
        ctx.status = status
        ctx.response_started = True
        ctx.bytes_out += len(body)
        await ctx.send({"type": "http.response.start", "status": status, "headers": out})
        await ctx.send({"type": "http.response.body", "body": body, "more_body": False})
        for o in observers:
            o.finish(ok=True)
        return None


async def _send_problem(ctx: RequestContext, response: LocalResponse) -> None:
    headers = [*response.headers, (b"content-length", str(len(response.body)).encode())]
    headers.append((b"x-request-id", ctx.request_id.encode()))
    ctx.status = response.status
    ctx.response_started = True
    await ctx.send({"type": "http.response.start", "status": response.status, "headers": headers})
    await ctx.send({"type": "http.response.body", "body": response.body, "more_body": False})


def _timeout_problem(ctx: RequestContext) -> LocalResponse:
    return problem(
        "gateway-timeout",
        f"Upstream '{ctx.route.upstream.name}' did not answer in time.",
        request_id=ctx.request_id,
    )


def _unreachable_problem(ctx: RequestContext, exc: Exception) -> LocalResponse:
    return problem(
        "bad-gateway",
        f"Upstream '{ctx.route.upstream.name}' could not be reached ({type(exc).__name__}).",
        request_id=ctx.request_id,
    )


def _upstream_status_problem(ctx: RequestContext, status: int) -> LocalResponse:
    """Stands for a 502/503/504 answer that a retry replaces (never sent to the client)."""
    return problem(
        "bad-gateway",
        f"Upstream '{ctx.route.upstream.name}' answered {status}.",
        request_id=ctx.request_id,
    )


def _without_param(query: bytes, name: str) -> bytes:
    """The raw query string without parameter `name` (other bytes kept as sent)."""
    prefix = name.encode("latin-1") + b"="
    return b"&".join(
        part for part in query.split(b"&") if part and not _is_param(part, prefix, name)
    )


def _is_param(part: bytes, prefix: bytes, name: str) -> bool:
    if part.startswith(prefix):
        return True
    key = part.split(b"=", 1)[0]
    return b"%" in key and unquote_plus(key.decode("latin-1")) == name  # api%5Fkey=…


def body_too_large(ctx: RequestContext) -> LocalResponse:
    """413 for a body over the route's limit (the connection is closed after it: the rest of
    the body is not read)."""
    return problem(
        "body-too-large",
        f"The request body is larger than {ctx.route.max_body} bytes.",
        request_id=ctx.request_id,
        headers=[(b"connection", b"close")],
    )


def client_body_timeout(ctx: RequestContext) -> LocalResponse:
    """408 for a client that stopped sending its body (the connection is closed after it)."""
    return problem(
        "request-timeout",
        f"The request body stalled for more than {_CLIENT_BODY_TIMEOUT:g} s.",
        request_id=ctx.request_id,
        headers=[(b"connection", b"close")],
    )


def _rewritten(route, path: str, params: dict[str, str]) -> str:
    """The route's rewrite template with captured parameters; for a prefix route the part
    of the path below the route follows."""
    out = "".join(
        p if isinstance(p, str) else quote(params.get(p[0], ""), safe=_PATH_SAFE)
        for p in route.rewrite
    )
    if route.kind == "prefix":
        rest = [s for s in path.split("/") if s][len(route.segments) :]
        if rest:
            out = out.rstrip("/") + "/" + quote("/".join(rest), safe=_PATH_SAFE)
            if path.endswith("/"):
                out += "/"
    return out


async def _cancel_on_disconnect(ctx: RequestContext) -> None:
    """Wait for the client to disconnect, then cancel the request's task (and its upstream)."""
    owner = ctx.task
    while True:
        msg = await ctx.receive()
        if msg["type"] == "http.disconnect":
            ctx.client_gone = True
            if owner is not None:
                owner.cancel()
            return
