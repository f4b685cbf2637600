"""Authenticate: find the API key in the request and check it against the snapshot."""

from __future__ import annotations

import hmac
from urllib.parse import parse_qsl

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.pipeline import Stage
from gateway.dataplane.problems import problem
from gateway.dataplane.snapshot import KeyEntry
from portal.keys import KeyHasher, key_id_of


class VerifiedKeys:
    """Keys that passed the HMAC check, by the bytes presented: the snapshot entry each one
    matched. A hit counts only while the snapshot still holds that very entry (a delta or a
    rebuild replaces entries), so revoking, rotating or expiring a key takes effect as it
    does without this; what it saves is the hash and the parse of a key seen before (the
    same trade as Kong's credential cache). Only verified keys get in: an unknown or wrong
    key always costs the full check. Bounded; emptied when full. Never logged or exported.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._entries: dict[bytes, KeyEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, raw: bytes, keys: dict[str, KeyEntry]) -> KeyEntry | None:
        entry = self._entries.get(raw)
        if entry is not None and keys.get(entry.key_id) is entry:
            return entry
        return None

    def add(self, raw: bytes, entry: KeyEntry) -> None:
        if self.capacity <= 0:
            return
        if len(self._entries) >= self.capacity:
            self._entries.clear()
        self._entries[raw] = entry

    def clear(self) -> None:
        self._entries.clear()


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
        verified: VerifiedKeys | None = None,
    ) -> None:
        self.key_header = key_header
        self.header_label = header_label
        self.keys = keys
        self.hasher = KeyHasher(secret)
        self.verified = verified if verified is not None else VerifiedKeys(capacity=0)
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

    def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        raw = self._credential(ctx)
        if not raw:
            return problem(
                "missing-credential",
                self.missing_detail,
                request_id=ctx.request_id,
                headers=self.challenge,
            )
        entry = self.verified.get(raw, self.keys)
        if entry is None:
            # Hash before looking up so that unknown and wrong keys cost the same.
            digest = self.hasher.hexdigest(raw)
            key_id = key_id_of(raw)
            entry = self.keys.get(key_id) if key_id else None
            if entry is None or not hmac.compare_digest(digest, entry.digest):
                return self._invalid(ctx, "The API key is not valid.")
            self.verified.add(raw, entry)
        if entry.expires_at is not None and entry.expires_at <= ctx.wall_time:
            return self._invalid(ctx, "The API key has expired.")
        ctx.key = entry
        ctx.scopes = entry.scopes
        return None

    def _invalid(self, ctx: RequestContext, detail: str) -> LocalResponse:
        return problem(
            "invalid-credential", detail, request_id=ctx.request_id, headers=self.challenge
        )
