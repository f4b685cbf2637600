"""Limit: check every rate limit and quota of the key in one call to the limiter."""

from __future__ import annotations

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.limiter import Decision, Limiter
from gateway.dataplane.pipeline import Stage
from gateway.dataplane.problems import problem
from gateway.dataplane.snapshot import LimitRule

_ADJECTIVE = {"day": "daily", "month": "monthly"}


class LimitStage(Stage):
    name = "limit"

    def __init__(self, *, limiter: Limiter, fail_closed: bool = False) -> None:
        self.limiter = limiter
        self.fail_closed = fail_closed

    async def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        key = ctx.key
        if key is None or not key.limits:
            return None
        decision = await self.limiter.check(key.limits, ctx.wall_time)
        if decision.store_error:
            ctx.error_kind = "limiter_unavailable"
            if self.fail_closed:
                return problem(
                    "limiter-unavailable",
                    "Limits cannot be checked right now; retry shortly.",
                    request_id=ctx.request_id,
                    headers=[(b"retry-after", b"1")],
                )
            return None  # fail open: admitted, counted in metrics
        headers = _headers(key.limits, decision)
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


_WINDOW = {"minute": 60, "day": 86400, "month": 2_592_000}  # a month's w is nominal (30 d)


def _policy_name(rule: LimitRule) -> str:
    return "rate" if rule.kind == "rate" else f"quota-{rule.period}"


def _headers(rules: tuple[LimitRule, ...], d: Decision) -> list[tuple[bytes, bytes]]:
    """X-RateLimit-* (de facto) and RateLimit-Policy / RateLimit
    (draft-ietf-httpapi-ratelimit-headers, structured fields) for the tightest rule."""
    if d.rule is None:
        return []
    reset = max(0, int(d.reset + 0.999))
    remaining = max(0, d.remaining)
    policies = ", ".join(
        f'"{_policy_name(r)}";q={r.limit};w={_WINDOW.get(r.period, 60)}' for r in rules
    )
    return [
        (b"x-ratelimit-limit", str(d.rule.limit).encode()),
        (b"x-ratelimit-remaining", str(remaining).encode()),
        (b"x-ratelimit-reset", str(reset).encode()),
        (b"ratelimit-policy", policies.encode()),
        (b"ratelimit", f'"{_policy_name(d.rule)}";r={remaining};t={reset}'.encode()),
    ]
