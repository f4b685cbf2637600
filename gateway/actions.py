"""Named writes of the gateway app that admin, REST and commands share."""

from __future__ import annotations

from django.db import transaction
from django.db.models import F

from gateway.config import config_bump
from gateway.models import Api, CachePurge, Route


def cache_purge(
    *, api: Api | None = None, route: Route | None = None, key: str = "", actor=None
) -> int:
    """Make cached answers unreachable on every node: all of an API's or one route's (their
    cache generation is part of each cache key), or the one whose X-Cache-Key is `key`. It
    takes effect with the config version this returns."""
    if sum((api is not None, route is not None, bool(key))) != 1:
        raise ValueError("Purge one API, one route or one cache key.")
    with transaction.atomic():
        if key:
            from django.conf import settings

            CachePurge.objects.create(cache_key=key[:120], actor=_user(actor))
            label = f"key {key}"
            if settings.REDIS_URL:  # shared entries go at once; the snapshot covers workers
                transaction.on_commit(lambda: _delete_redis_entry(key))
        elif api is not None:
            Api.objects.filter(pk=api.pk).update(cache_generation=F("cache_generation") + 1)
            label = f"API {api.slug}"
        else:
            Route.objects.filter(pk=route.pk).update(cache_generation=F("cache_generation") + 1)
            label = f"route {route}"
        from portal.audit import audit_record

        audit_record(actor=actor, action="cache_purge", target=api or route or key)
        return config_bump(actor=actor, reason=f"cache of {label} purged")


def _user(actor):
    return actor if actor is not None and getattr(actor, "is_authenticated", False) else None


def _delete_redis_entry(key: str) -> None:
    import redis
    from django.conf import settings

    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=0.5)
        try:
            client.delete(f"apigw:cache:{key}")
        finally:
            client.close()
    except redis.RedisError:
        pass  # the gateways treat it as purged through the snapshot anyway
