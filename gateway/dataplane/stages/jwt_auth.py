"""Authenticate with a JWT: verify `Authorization: Bearer <token>` and map it to a consumer."""

from __future__ import annotations

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.jwt import JwtError, JwtVerifier, NeedKeys
from gateway.dataplane.pipeline import Stage, settle
from gateway.dataplane.problems import problem
from gateway.dataplane.snapshot import KeyEntry


def _looks_like_jwt(token: bytes) -> bool:
    """Three dot-separated parts: a JWS compact serialisation (API keys have none)."""
    return token.count(b".") == 2


class JwtAuthenticateStage(Stage):
    """The token's consumer claim must be a consumer's external id; the consumer's open
    subscription whose plan includes this API is its grant (authorize checks it). With
    `keys` (an API that takes either), anything that is not a JWT goes to the key stage."""

    name = "authenticate"

    def __init__(
        self,
        *,
        verifier: JwtVerifier,
        identities: dict[str, tuple[KeyEntry, ...]],
        api_id: int,
        keys: Stage | None = None,
    ) -> None:
        self.verifier = verifier
        self.identities = identities
        self.api_id = api_id
        self.keys = keys
        self.challenge = [(b"www-authenticate", b'Bearer realm="apigw"')]
        self.invalid_challenge = [
            (b"www-authenticate", b'Bearer realm="apigw", error="invalid_token"')
        ]

    async def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        auth = ctx.header(b"authorization")
        token = None
        if auth is not None and auth[:7].lower() == b"bearer ":
            token = auth[7:].strip()
            if not _looks_like_jwt(token):
                token = None
        if token is None:
            if self.keys is not None:
                return await settle(self.keys.on_request(ctx))
            return problem(
                "missing-credential",
                "Send a JWT as Authorization: Bearer <token>.",
                request_id=ctx.request_id,
                headers=self.challenge,
            )
        ctx.credential = "bearer"
        try:
            text = token.decode("ascii")
            try:
                verified = self.verifier.verify(text, ctx.wall_time)
            except NeedKeys:
                # An unknown kid (keys rotated) is worth one rate-limited JWKS refetch.
                verified = await self.verifier.verify_async(text, ctx.wall_time)
        except UnicodeDecodeError:
            return self._invalid(ctx, "The token is malformed.")
        except JwtError as exc:
            return self._invalid(ctx, exc.detail)
        entries = self.identities.get(verified.subject)
        if not entries:
            return problem(
                "forbidden",
                "The token's subject is not a consumer of this gateway.",
                request_id=ctx.request_id,
            )
        ctx.key = _grant_for(entries, self.api_id)
        ctx.scopes = verified.scopes
        ctx.claims = verified.claims
        return None

    def _invalid(self, ctx: RequestContext, detail: str) -> LocalResponse:
        return problem(
            "invalid-credential",
            detail,
            request_id=ctx.request_id,
            headers=self.invalid_challenge,
        )


def _grant_for(entries: tuple[KeyEntry, ...], api_id: int) -> KeyEntry:
    """An active subscription including the API, else a pending one including it, else any
    (authorize then says what is missing)."""
    fallback = entries[0]
    for entry in entries:
        if api_id in entry.api_ids:
            if entry.subscription_status == "active":
                return entry
            fallback = entry
    return fallback
