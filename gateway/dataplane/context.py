"""Per-request state shared by the pipeline stages, and the local (gateway-made) response."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.dataplane.snapshot import KeyEntry, RouteEntry

Headers = list[tuple[bytes, bytes]]


class ClientDisconnected(Exception):
    """The client went away; nothing more can be sent to it."""


class ClientBodyTimeout(Exception):
    """The client sent nothing of its request body for GATEWAY_CLIENT_BODY_TIMEOUT seconds
    (raised by the server protocol's receive)."""


@dataclass(slots=True)
class LocalResponse:
    """A response the gateway makes itself (errors, preflights); it ends the pipeline."""

    status: int
    headers: Headers
    body: bytes


@dataclass(slots=True)
class RequestContext:
    scope: dict[str, Any]
    receive: Any
    send: Any
    request_id: str  # the client's X-Request-ID when well-formed, else event_id
    method: str
    path: str  # normalised, percent-decoded
    client_ip: str  # the client: the peer, or the address a trusted proxy forwarded for
    event_id: str = ""  # always the gateway's own: the log event's id (never a client's)
    peer_ip: str = ""  # the TCP peer
    trusted_peer: bool = False  # the peer is a configured proxy: its X-Forwarded-* hold
    request_id_generated: bool = True
    bad_host: bool = False  # more than one Host header, or one that is not host[:port]
    path_params: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    wall_time: float = field(default_factory=time.time)
    route: RouteEntry | None = None
    key: KeyEntry | None = None
    # Headers that stages add to whatever response leaves (rate-limit headers, …).
    response_headers: Headers = field(default_factory=list)
    status: int = 0
    response_started: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_latency: float | None = None
    error_kind: str = ""
    credential: str = ""  # where the credential came from: "header", "bearer" or "query"
    scopes: frozenset[str] = frozenset()  # what the credential holds (JWT scope, key scopes)
    claims: dict | None = None  # a verified JWT's claims
    ws_in: int = 0  # WebSocket messages from the client
    ws_out: int = 0  # and to it
    cache_capture: Any = None  # stages/cache.Capture: a cache miss the proxy's answer fills
    # What watches the upstream's answer as it streams (begin / feed / finish): the cache's
    # capture, a response check. A tuple: empty costs nothing.
    observers: tuple = ()
    body_done: bool = False  # the whole request body has been received
    body_too_large: bool = False  # the body passed the route's limit while streaming
    body_streamed: bool = False  # part of a streamed body went upstream: no retry
    retries: int = 0
    client_gone: bool = False  # the client disconnected before the response was complete
    task: Any = None  # the asyncio task serving this request

    def elapsed(self) -> float:
        """Seconds since the request arrived."""
        return time.perf_counter() - self.started

    def header(self, name: bytes) -> bytes | None:
        """First value of request header `name` (lower-case bytes), or None."""
        for k, v in self.scope["headers"]:
            if k == name:
                return v
        return None
