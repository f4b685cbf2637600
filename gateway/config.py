"""Config versions: every change the data plane must see bumps one, in the same transaction."""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models import Max

from gateway.models import ConfigVersion


def config_bump(*, actor=None, reason: str) -> int:
    """Record a new config version inside the caller's transaction; return its number.

    Gateway workers poll the latest version and rebuild their snapshot when it moves, so the
    change becomes visible exactly when (and only if) the caller's transaction commits.
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("config_bump() must run inside the transaction that made the change")
    version = ConfigVersion.objects.create(actor=actor, reason=reason[:200])
    transaction.on_commit(lambda: _publish(version.pk))
    return version.pk


CONFIG_CHANNEL = "apigw:config"


def _publish(version: int) -> None:
    """Tell every gateway worker at once (they also poll, so a lost message only delays)."""
    from django.conf import settings

    if not settings.REDIS_URL:
        return
    import redis

    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=0.5)
        try:
            client.publish(CONFIG_CHANNEL, str(version))
        finally:
            client.close()
    except redis.RedisError as exc:
        logging.getLogger("gateway.config").warning("config publish failed: %s", exc)


def config_current_version() -> int:
    """The newest config version number, 0 before the first change."""
    return ConfigVersion.objects.aggregate(v=Max("id"))["v"] or 0
