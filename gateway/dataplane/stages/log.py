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
        # Never a secret here: ids and numbers only, no key, token or header values.
        self.buffer.push(
            {
                "id": ctx.request_id,
                "t": ctx.wall_time,
                "api": route.api_id if route else None,
                "route": route.id if route else None,
                "route_path": route.path if route else "",
                "consumer": key.consumer_id if key else None,
                "key": key.pk if key else None,
                "org": key.organization_id if key else None,
                "method": ctx.method,
                "status": ctx.status,
                "ms": round((time.perf_counter() - ctx.started) * 1000, 3),
                "up_ms": round(up * 1000, 3) if up is not None else None,
                "in": ctx.bytes_in,
                "out": ctx.bytes_out,
                "err": ctx.error_kind,
            }
        )
