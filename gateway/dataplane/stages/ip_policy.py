"""IP policy: allow and deny lists of client networks, per API (403 for the others).

Runs before authentication, so a denied address learns nothing about keys. The client is
`ctx.client_ip`: the peer, or the address a trusted proxy forwarded for.
"""

from __future__ import annotations

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.networks import Networks
from gateway.dataplane.pipeline import Stage
from gateway.dataplane.problems import problem


class IpPolicyStage(Stage):
    name = "ip_policy"

    def __init__(self, *, allow: tuple, deny: tuple, api_slug: str) -> None:
        self.allow = Networks(allow)
        self.deny = Networks(deny)
        self.api_slug = api_slug

    def permits(self, ip: str) -> bool:
        """Deny wins over allow; an empty allow list allows every address not denied; what
        is not an IP address (e.g. a Unix socket peer) is not allowed."""
        denied = self.deny.lookup(ip)
        if denied is None:
            return False
        return not denied and (not self.allow or self.allow.lookup(ip) is True)

    def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        if self.permits(ctx.client_ip):
            return None
        ctx.error_kind = "ip_denied"
        return problem(
            "forbidden",
            f"Address {ctx.client_ip or 'unknown'} may not call API '{self.api_slug}'.",
            request_id=ctx.request_id,
        )
