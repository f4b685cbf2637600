"""Authorize: the subscription must be active, its plan must include the API, and the
credential must hold the route's required scopes."""

from __future__ import annotations

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.pipeline import Stage
from gateway.dataplane.problems import problem


class AuthorizeStage(Stage):
    name = "authorize"

    def __init__(
        self,
        *,
        api_id: int,
        api_slug: str,
        plans: tuple[str, ...] = (),
        required_scopes: frozenset[str] = frozenset(),
    ) -> None:
        self.api_id = api_id
        self.api_slug = api_slug
        self.plans = plans  # public plans that include this API, for the 403's detail
        self.required_scopes = required_scopes
        needed = " ".join(sorted(required_scopes))
        # RFC 6750 section 3.1: which scope the token lacks.
        self.scope_challenge = [
            (
                b"www-authenticate",
                f'Bearer realm="apigw", error="insufficient_scope", scope="{needed}"'.encode(),
            )
        ]

    def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        key = ctx.key
        if key is None:  # compiled after authenticate; a key is always set here
            return problem("forbidden", "No consumer.", request_id=ctx.request_id)
        if key.subscription_status != "active":
            return problem(
                "forbidden",
                f"The key's subscription to plan '{key.plan_slug}' is "
                f"{key.subscription_status}, not active.",
                request_id=ctx.request_id,
            )
        if self.api_id not in key.api_ids:
            would = ", ".join(f"'{p}'" for p in self.plans)
            hint = f" Plans that do: {would}." if would else ""
            return problem(
                "forbidden",
                f"Plan '{key.plan_slug}' does not include API '{self.api_slug}'.{hint}",
                request_id=ctx.request_id,
                plans=list(self.plans),
            )
        if self.required_scopes and not self.required_scopes <= ctx.scopes:
            missing = " ".join(sorted(self.required_scopes - ctx.scopes))
            return problem(
                "insufficient-scope",
                f"This route requires the scopes: {missing}.",
                request_id=ctx.request_id,
                headers=self.scope_challenge,
                required_scopes=sorted(self.required_scopes),
            )
        return None
