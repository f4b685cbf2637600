"""Management API tokens: issue, revoke, and authenticate a presented token.

A token reads `gwt_<token_id>_<secret>` (like API keys, `portal/keys.py`): the id finds the
row, only HMAC-SHA256 of the whole token is stored, and it is compared in constant time.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from portal.audit import audit_record
from portal.keys import key_digest
from portal.models import ApiToken

TOKEN_PREFIX = "gwt_"  # noqa: S105 - a format prefix, not a secret
_TOKEN_ID_HEX = 12
LAST_USED_RESOLUTION = timedelta(minutes=1)  # at most one write per token a minute


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    raw: str  # shown once, never stored


def _digest(raw: str) -> str:
    return key_digest("token:" + raw)  # domain-separated from API key digests


def token_issue(
    user,
    *,
    name: str,
    scope: str = ApiToken.Scope.READ,
    expires_at: datetime | None = None,
    actor=None,
) -> IssuedToken:
    """Create a token for `user`; the returned `raw` is the only copy there is."""
    if scope not in ApiToken.Scope.values:
        raise ValueError(f"scope: one of {', '.join(ApiToken.Scope.values)}")
    for _ in range(5):
        token_id = secrets.token_hex(_TOKEN_ID_HEX // 2)
        raw = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        fields = {"expires_at": expires_at} if expires_at is not None else {}
        try:
            with transaction.atomic():
                token = ApiToken.objects.create(
                    user=user,
                    name=name[:100],
                    token_id=token_id,
                    digest=_digest(raw),
                    scope=scope,
                    **fields,
                )
                audit_record(actor=actor or user, action="token_issue", target=token)
        except IntegrityError:
            continue
        return IssuedToken(token=token, raw=raw)
    raise RuntimeError("could not draw a unique token id")


def token_revoke(token: ApiToken, *, actor=None) -> ApiToken:
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit_record(actor=actor, action="token_revoke", target=token)
    return token


def token_authenticate(raw: str) -> ApiToken | None:
    """The usable token that `raw` is, with its (active) user loaded; None otherwise."""
    if len(raw) > 128 or not raw.startswith(TOKEN_PREFIX):
        return None
    token_id, sep, secret = raw[len(TOKEN_PREFIX) :].partition("_")
    if not sep or len(token_id) != _TOKEN_ID_HEX or not secret:
        return None
    token = ApiToken.objects.select_related("user").filter(token_id=token_id).first()
    digest = _digest(raw)
    if token is None:
        hmac.compare_digest(digest, digest)  # the same work either way
        return None
    if not hmac.compare_digest(token.digest, digest):
        return None
    now = timezone.now()
    if not token.is_usable(now) or not token.user.is_active:
        return None
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token
