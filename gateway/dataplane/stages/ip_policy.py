"""IP policy: allow and deny lists of client networks, per API (403 for the others).

Runs before authentication, so a denied address learns nothing about keys. The client is
`ctx.client_ip`: the peer, or the address a trusted proxy forwarded for.
"""

from __future__ import annotations

import ipaddress

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.pipeline import Stage
from gateway.dataplane.problems import problem

_CACHE_SIZE = 10_000  # verdicts remembered per API; cleared when full


class IpPolicyStage(Stage):
    name = "ip_policy"

    def __init__(self, *, allow: tuple, deny: tuple, api_slug: str) -> None:
        self.allow = allow
        self.deny = deny
        self.api_slug = api_slug
        self._verdicts: dict[str, bool] = {}

    def permits(self, ip: str) -> bool:
        """Deny wins over allow; an empty allow list allows every address not denied."""
        verdict = self._verdicts.get(ip)
        if verdict is None:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                verdict = False  # no usable address (e.g. a Unix socket peer): not allowed
            else:
                if addr.version == 6 and addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped  # ::ffff:10.1.2.3 is 10.1.2.3
                verdict = not any(addr in net for net in self.deny) and (
                    not self.allow or any(addr in net for net in self.allow)
                )
            if len(self._verdicts) >= _CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[ip] = verdict
        return verdict

    async def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        if self.permits(ctx.client_ip):
            return None
        ctx.error_kind = "ip_denied"
        return problem(
            "forbidden",
            f"Address {ctx.client_ip or 'unknown'} may not call API '{self.api_slug}'.",
            request_id=ctx.request_id,
        )
