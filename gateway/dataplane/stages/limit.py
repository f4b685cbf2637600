"""Limit: check every rate limit and quota of the key in one call to the limiter."""

from __future__ import annotations

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.limiter import Decision, Limiter
from gateway.dataplane.pipeline import Stage
from gateway.dataplane.problems import problem

_ADJECTIVE = {"day": "daily", "month": "monthly"}


class LimitStage(Stage):
    name = "limit"

    def __init__(self, *, limiter: Limiter) -> None:
        self.limiter = limiter

    async def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        key = ctx.key
        if key is None or not key.limits:
            return None
        decision = await self.limiter.check(key.limits, ctx.wall_time)
        headers = _headers(decision)
        if decision.allowed:
            ctx.response_headers.extend(headers)
            return None
        rule = decision.rule
        retry = max(1, int(decision.retry_after + 0.999))
        headers.append((b"retry-after", str(retry).encode()))
        if rule is not None and rule.kind == "quota":
            return problem(
                "quota-exhausted",
                f"The {_ADJECTIVE.get(rule.period, rule.period)} quota of {rule.limit} "
                "requests is used up.",
                request_id=ctx.request_id,
                headers=headers,
                limit=f"quota {rule.limit}/{rule.period}",
            )
        limit = f"{rule.limit}/{rule.period}" if rule else "rate"
        return problem(
            "rate-limited",
            f"More than {limit} requests; retry in {retry} s.",
            request_id=ctx.request_id,
            headers=headers,
            limit=f"rate {limit}",
        )


def _headers(d: Decision) -> list[tuple[bytes, bytes]]:
    if d.rule is None:
        return []
    reset = max(0, int(d.reset + 0.999))
    return [
        (b"x-ratelimit-limit", str(d.rule.limit).encode()),
        (b"x-ratelimit-remaining", str(max(0, d.remaining)).encode()),
        (b"x-ratelimit-reset", str(reset).encode()),
    ]
