"""The policy pipeline: small stages with pass-through hooks, run in a fixed order.

Order (DESIGN.md): match route -> IP allow/deny -> authenticate -> authorize -> limit ->
proxy (balance, retry, circuit) -> log. A route's pipeline holds only the stages it uses,
compiled with the snapshot (an anonymous route has no key stages; an API without IP lists
no IP stage).

A stage's `on_request` answers at once, as Envoy's filters do: None (go on), a response (the
pipeline ends here), or, when the stage has to wait (Redis, the request body, a JWKS fetch),
an awaitable of either; an `async def on_request` is such a stage. A stage that decides from
memory (the snapshot, in-process counters) costs a plain call, no coroutine.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from gateway.dataplane.context import LocalResponse, RequestContext

StageResult = LocalResponse | None | Awaitable[LocalResponse | None]


class Stage:
    """Base stage: every hook passes through; a stage overrides only what it needs."""

    name = "stage"

    def on_request(self, ctx: RequestContext) -> StageResult:
        """Inspect the request; return a response to end the pipeline here."""
        return None

    def on_complete(self, ctx: RequestContext) -> None:
        """Called after the client has its answer (logging, counters)."""


def completes(stage: Stage) -> bool:
    """Does the stage do anything after the response (is its on_complete its own)?"""
    return type(stage).on_complete is not Stage.on_complete


async def settle(result: StageResult) -> LocalResponse | None:
    """A stage's answer, awaited if the stage had to wait."""
    if result is None or isinstance(result, LocalResponse):
        return result
    return await result


class Handler(Protocol):
    """The terminal step: produce the response (proxy today; aggregate, WebSocket later)."""

    async def handle(self, ctx: RequestContext) -> LocalResponse | None:
        """Send the response itself and return None, or return a local response to send."""
        ...
