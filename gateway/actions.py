"""Named writes of the gateway app that admin, REST and commands share."""

from __future__ import annotations

from django.db import transaction
from django.db.models import F

from gateway.config import config_bump
from gateway.models import Api, Route


def cache_purge(*, api: Api | None = None, route: Route | None = None, actor=None) -> int:
    """Make every cached answer of an API (or of one route) unreachable on every node: its
    cache generation is part of each cache key, and moves with a config version. Returns
    the config version."""
    if (api is None) == (route is None):
        raise ValueError("Purge one API or one route.")
    with transaction.atomic():
        if api is not None:
            Api.objects.filter(pk=api.pk).update(cache_generation=F("cache_generation") + 1)
            label = f"API {api.slug}"
        else:
            Route.objects.filter(pk=route.pk).update(cache_generation=F("cache_generation") + 1)
            label = f"route {route}"
        from portal.audit import audit_record

        audit_record(actor=actor, action="cache_purge", target=api or route)
        return config_bump(actor=actor, reason=f"cache of {label} purged")
