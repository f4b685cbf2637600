"""Limit: check every rate limit and quota of the request in one call to the limiter."""

from __future__ import annotations

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.limiter import Decision, Limiter
from gateway.dataplane.pipeline import Stage
from gateway.dataplane.problems import problem
from gateway.dataplane.snapshot import (
    KeyEntry,
    LimitRule,
    RateTemplate,
    resolve_rate,
)

_ADJECTIVE = {"day": "daily", "month": "monthly"}
_NOUN = {"key": "key", "consumer": "consumer", "organization": "organization"}
_NOUN["client_ip"] = "client IP"


class LimitStage(Stage):
    """The rules are the key's plan-wide ones (resolved in the snapshot), then the plan's
    per-IP ones, this route's overrides for the plan, and this route's own rules."""

    name = "limit"

    def __init__(
        self,
        *,
        limiter: Limiter,
        fail_closed: bool = False,
        route_rates: tuple[RateTemplate, ...] = (),
        overrides: dict[int, tuple[frozenset[tuple[str, str]], tuple[RateTemplate, ...]]]
        | None = None,
    ) -> None:
        self.limiter = limiter
        self.fail_closed = fail_closed
        self.route_rates = route_rates
        self.overrides = overrides or {}
        self.per_request = bool(route_rates or self.overrides)
        # The in-process store answers at once: no coroutine per request (pipeline.py).
        self._check_now = getattr(limiter, "check_sync", None)

    def rules_for(self, ctx: RequestContext, key: KeyEntry | None) -> tuple[LimitRule, ...]:
        """The concrete rules of one request."""
        if key is None:  # an anonymous route: its own (per-IP) rules only
            return tuple(resolve_rate(t, None, ctx.client_ip) for t in self.route_rates)
        if not (key.ip_rates or self.per_request):
            return key.limits
        base = key.limits
        templates = key.ip_rates
        override = self.overrides.get(key.plan_id)
        if override is not None:
            slots, replacements = override
            base = tuple(r for r in base if r.kind == "quota" or (r.scope, r.period) not in slots)
            templates = tuple(t for t in templates if (t.scope, t.window) not in slots)
            templates += replacements
        templates += self.route_rates
        return base + tuple(resolve_rate(t, key, ctx.client_ip) for t in templates)

    def on_request(self, ctx: RequestContext):
        key = ctx.key
        if key is not None and not (key.ip_rates or self.per_request):
            rules = key.limits  # the usual case: the plan's rules, resolved in the snapshot
        else:
            rules = self.rules_for(ctx, key)
        if not rules:
            return None
        if self._check_now is None:
            return self._ask_store(ctx, rules)
        decision = self._check_now(rules, ctx.wall_time)
        if decision.allowed:  # the in-process store never fails
            ctx.response_headers += _headers(rules, decision)
            return None
        return self.decide(ctx, rules, decision)

    async def _ask_store(self, ctx: RequestContext, rules) -> LocalResponse | None:
        return self.decide(ctx, rules, await self.limiter.check(rules, ctx.wall_time))

    def decide(
        self, ctx: RequestContext, rules: tuple[LimitRule, ...], decision: Decision
    ) -> LocalResponse | None:
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
        headers = _headers(rules, decision)
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
        burst = f" (burst {rule.burst})" if rule and rule.burst else ""
        per = f" per {_NOUN.get(rule.scope, 'key')}" if rule else ""
        return problem(
            "rate-limited",
            f"More than {limit}{burst} requests{per}; retry in {retry} s.",
            request_id=ctx.request_id,
            headers=headers,
            limit=f"rate {limit}{per}",
            policy=rule.name if rule else "",
        )


def _headers(rules: tuple[LimitRule, ...], d: Decision) -> list[tuple[bytes, bytes]]:
    """X-RateLimit-* (de facto) and RateLimit-Policy / RateLimit
    (draft-ietf-httpapi-ratelimit-headers, structured fields) for the tightest rule."""
    rule = d.rule
    if rule is None:
        return []
    reset = int(d.reset + 0.999)
    if reset < 0:
        reset = 0
    remaining = d.remaining if d.remaining > 0 else 0
    policies = rules[0].policy if len(rules) == 1 else b", ".join([r.policy for r in rules])
    return [
        (b"x-ratelimit-limit", rule.limit_text),
        (b"x-ratelimit-remaining", b"%d" % remaining),
        (b"x-ratelimit-reset", b"%d" % reset),
        (b"ratelimit-policy", policies),
        (b"ratelimit", b'"%b";r=%d;t=%d' % (rule.label, remaining, reset)),
    ]
