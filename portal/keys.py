"""API keys: format, keyed hashing, and the actions that issue and revoke them.

A key reads `gw_<key_id>_<secret>`: `key_id` (12 hex chars) finds the row without a scan,
`secret` carries 192 random bits. Only HMAC-SHA256(API_KEY_HMAC_SECRET, key) is stored, so a
database leak yields no usable key, and the comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from gateway.config import config_bump
from portal.audit import audit_record
from portal.models import ApiKey, Subscription

KEY_PREFIX = "gw_"
_KEY_ID_HEX = 12
_MAX_KEY_LENGTH = 128


def key_digest(raw: str, secret: bytes | None = None) -> str:
    """Hex HMAC-SHA256 of a full key string."""
    secret = secret if secret is not None else settings.API_KEY_HMAC_SECRET.encode()
    return hmac.new(secret, raw.encode(), hashlib.sha256).hexdigest()


def key_parse(raw: str) -> str | None:
    """The key id of a well-formed key string, else None. Does not check the secret."""
    if not raw.isascii():
        return None
    return key_id_of(raw.encode("ascii"))


_PREFIX_BYTES = KEY_PREFIX.encode()
_ID_END = len(KEY_PREFIX) + _KEY_ID_HEX


def key_id_of(raw: bytes) -> str | None:
    """key_parse() of a key as it arrives in a request (bytes)."""
    if (
        len(raw) > _MAX_KEY_LENGTH
        or len(raw) <= _ID_END + 1  # a secret of at least one character
        or raw[_ID_END] != 0x5F  # "_"
        or not raw.startswith(_PREFIX_BYTES)
    ):
        return None
    key_id = raw[len(KEY_PREFIX) : _ID_END]
    if b"_" in key_id or not key_id.isascii():
        return None
    return key_id.decode("ascii")


class KeyHasher:
    """key_digest() for one secret, with HMAC's padded key blocks hashed once (RFC 2104):
    per key checked, two SHA-256 copies instead of a new HMAC (0.6 against 1.4 µs)."""

    def __init__(self, secret: bytes) -> None:
        block = hashlib.sha256().block_size
        if len(secret) > block:
            secret = hashlib.sha256(secret).digest()
        secret = secret.ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in secret))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in secret))

    def hexdigest(self, raw: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(raw)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest().encode()


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    key: str  # shown to its owner exactly once, never stored


def key_issue(
    subscription: Subscription,
    *,
    name: str,
    actor=None,
    expires_at: datetime | None = None,
    created_by=None,
) -> IssuedKey:
    """Create a key under `subscription`; the returned `key` is the only copy there is.
    `created_by`: the person it belongs to (default: the actor, when a signed-in user)."""
    if created_by is None and getattr(actor, "is_authenticated", False):
        created_by = actor
    for _ in range(5):
        key_id = secrets.token_hex(_KEY_ID_HEX // 2)
        raw = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
        try:
            with transaction.atomic():
                api_key = ApiKey.objects.create(
                    subscription=subscription,
                    name=name[:100],
                    key_id=key_id,
                    digest=key_digest(raw),
                    expires_at=expires_at,
                    created_by=created_by,
                )
                audit_record(actor=actor, action="key_issue", target=api_key)
                config_bump(actor=actor, reason=f"key {api_key.prefix} issued", key_ids=[key_id])
        except IntegrityError:
            continue  # key_id collision (48 bits): draw again
        return IssuedKey(api_key=api_key, key=raw)
    raise RuntimeError("could not draw a unique key id")


DEFAULT_ROTATION_GRACE = timedelta(hours=24)


def key_rotate(
    api_key: ApiKey, *, actor=None, grace: timedelta = DEFAULT_ROTATION_GRACE
) -> IssuedKey:
    """Issue a replacement key; the old one keeps working for `grace`, then expires.

    Both work during the overlap, so clients can be redeployed without an outage.
    """
    if grace < timedelta(0):
        raise ValueError("grace must not be negative")
    with transaction.atomic():
        old = ApiKey.objects.select_for_update().get(pk=api_key.pk)
        now = timezone.now()
        if not old.is_usable(now):
            raise KeyActionError("Only a usable key can be rotated.")
        issued = key_issue(
            old.subscription,
            name=old.name,
            actor=actor,
            expires_at=old.expires_at,
            created_by=old.created_by,  # a replacement still belongs to whoever had the old
        )
        ends = now + grace
        if old.expires_at is None or old.expires_at > ends:
            old.expires_at = ends
            old.save(update_fields=["expires_at"])
        audit_record(
            actor=actor,
            action="key_rotate",
            target=old,
            replacement=issued.api_key.prefix,
            old_key_expires=old.expires_at.isoformat(),
        )
        config_bump(
            actor=actor,
            reason=f"key {old.prefix} rotated to {issued.api_key.prefix}",
            key_ids=[old.key_id, issued.api_key.key_id],
        )
    return issued


class KeyActionError(Exception):
    """A key action that the rules do not allow; the message is for the user."""


def key_revoke(api_key: ApiKey, *, actor=None) -> ApiKey:
    """Revoke a key; every gateway node rejects it within the config poll interval."""
    with transaction.atomic():
        api_key = ApiKey.objects.select_for_update().get(pk=api_key.pk)
        if api_key.revoked_at is not None:
            return api_key
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
        audit_record(actor=actor, action="key_revoke", target=api_key)
        config_bump(actor=actor, reason=f"key {api_key.prefix} revoked", key_ids=[api_key.key_id])
    return api_key
