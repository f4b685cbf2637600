"""Authenticate: find the API key in the request and check it against the snapshot."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qsl

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.pipeline import Stage
from gateway.dataplane.problems import problem
from gateway.dataplane.snapshot import KeyEntry
from portal.keys import key_parse


class AuthenticateStage(Stage):
    """Accepts the API's key header, `Authorization: Bearer <key>`, or (where the API enables
    it) a query parameter."""

    name = "authenticate"

    def __init__(
        self,
        *,
        key_header: bytes,
        header_label: str,
        keys: dict[str, KeyEntry],
        secret: bytes,
        query_param: str = "",
    ) -> None:
        self.key_header = key_header
        self.header_label = header_label
        self.keys = keys
        self.secret = secret
        self.query_param = query_param
        self._query_marker = f"{query_param}=".encode() if query_param else b""
        ways = f"the {header_label} header or as Authorization: Bearer <key>"
        if query_param:
            ways = f"the {header_label} header, as Authorization: Bearer <key> or in the "
            ways += f"{query_param} query parameter"
        self.missing_detail = f"Send an API key in {ways}."
        self.challenge = [
            (b"www-authenticate", f'ApiKey realm="apigw", header="{header_label}"'.encode()),
            (b"www-authenticate", b'Bearer realm="apigw"'),
        ]

    def _credential(self, ctx: RequestContext) -> bytes | None:
        raw = ctx.header(self.key_header)
        if raw is not None and raw.strip():
            ctx.credential = "header"
            return raw.strip()
        auth = ctx.header(b"authorization")
        if auth is not None and auth[:7].lower() == b"bearer ":
            ctx.credential = "bearer"
            return auth[7:].strip()
        if self._query_marker:
            query = ctx.scope.get("query_string", b"")
            if self._query_marker in query:
                for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                    if name == self.query_param and value:
                        ctx.credential = "query"
                        return value.encode("latin-1")
        return None

    async def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        raw = self._credential(ctx)
        if not raw:
            return problem(
                "missing-credential",
                self.missing_detail,
                request_id=ctx.request_id,
                headers=self.challenge,
            )
        # Hash before looking up so that unknown and wrong keys cost the same.
        digest = hmac.new(self.secret, raw, hashlib.sha256).hexdigest().encode()
        try:
            key_id = key_parse(raw.decode("ascii"))
        except UnicodeDecodeError:
            key_id = None
        entry = self.keys.get(key_id) if key_id else None
        if entry is None or not hmac.compare_digest(digest, entry.digest):
            return self._invalid(ctx, "The API key is not valid.")
        if entry.expires_at is not None and entry.expires_at <= ctx.wall_time:
            return self._invalid(ctx, "The API key has expired.")
        ctx.key = entry
        ctx.scopes = entry.scopes
        return None

    def _invalid(self, ctx: RequestContext, detail: str) -> LocalResponse:
        return problem(
            "invalid-credential", detail, request_id=ctx.request_id, headers=self.challenge
        )
