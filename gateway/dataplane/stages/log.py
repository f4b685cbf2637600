"""Log: one event per request into the bounded buffer, after the client has its answer."""

from __future__ import annotations

import time

from gateway.dataplane.context import RequestContext
from gateway.dataplane.logship import EventBuffer
from gateway.dataplane.pipeline import Stage


class LogStage(Stage):
    name = "log"

    def __init__(self, *, buffer: EventBuffer) -> None:
        self.buffer = buffer

    def on_complete(self, ctx: RequestContext) -> None:
        route = ctx.route
        key = ctx.key
        up = ctx.upstream_latency
        # A tuple in the order of logship.EVENT_FIELDS: cheaper than a dict per request.
        # Never a secret here: ids and numbers only, no key, token or header values.
        self.buffer.push(
            (
                ctx.event_id,
                ctx.wall_time,
                route.api_id if route else None,
                route.id if route else None,
                route.path if route else "",
                key.consumer_id if key else None,
                key.pk or None if key else None,  # pk 0: a JWT identity, no key
                key.organization_id if key else None,
                ctx.method,
                ctx.status,
                round((time.perf_counter() - ctx.started) * 1000, 3),
                round(up * 1000, 3) if up is not None else None,
                ctx.bytes_in,
                ctx.bytes_out,
                ctx.error_kind,
                [ctx.ws_in, ctx.ws_out] if ctx.status == 101 else None,
            )
        )
