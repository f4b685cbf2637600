"""The policy pipeline: small stages with pass-through hooks, run in a fixed order.

Order (DESIGN.md): match route -> IP allow/deny -> authenticate -> authorize -> limit ->
proxy (balance, retry, circuit) -> log. A route's pipeline holds only the stages it uses,
compiled with the snapshot (an anonymous route has no key stages; an API without IP lists
no IP stage).
"""

from __future__ import annotations

from typing import Protocol

from gateway.dataplane.context import LocalResponse, RequestContext


class Stage:
    """Base stage: every hook passes through; a stage overrides only what it needs."""

    name = "stage"

    async def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        """Inspect the request; return a response to end the pipeline here."""
        return None

    def on_complete(self, ctx: RequestContext) -> None:
        """Called after the client has its answer (logging, counters)."""


class Handler(Protocol):
    """The terminal step: produce the response (proxy today; aggregate, WebSocket later)."""

    async def handle(self, ctx: RequestContext) -> LocalResponse | None:
        """Send the response itself and return None, or return a local response to send."""
        ...
