"""The immutable, in-memory view of configuration that the data plane serves from.

Built from the database off the hot path (in a single worker thread), swapped atomically by
replacing one attribute when the config version moves. Requests never query the database.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp

from gateway.dataplane.router import Router

if TYPE_CHECKING:
    from gateway.dataplane.pipeline import Handler, Stage

log = logging.getLogger("gateway.snapshot")


@dataclass(frozen=True, slots=True)
class TargetEntry:
    host: str
    port: int
    base_url: str  # "http://host:port"


@dataclass(slots=True)
class UpstreamEntry:
    id: int
    name: str
    targets: tuple[TargetEntry, ...]
    connect_timeout: float
    read_timeout: float
    _cycle: itertools.cycle | None = None
    timeout: aiohttp.ClientTimeout | None = None

    def __post_init__(self) -> None:
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout
        )

    def pick(self) -> TargetEntry | None:
        """Next target in round-robin order (state is per worker)."""
        if not self.targets:
            return None
        if self._cycle is None:
            self._cycle = itertools.cycle(self.targets)
        return next(self._cycle)


@dataclass(frozen=True, slots=True)
class LimitRule:
    """One limit a key is subject to; `kind` is "rate" (per minute) or "quota"."""

    kind: str
    subject: str  # counter identity, e.g. "key:12" or "sub:7"
    limit: int
    period: str  # "minute" for rates; "day" | "month" for quotas
    tag: str = ""  # Redis Cluster hash tag: all of one request's counters share it


@dataclass(frozen=True, slots=True)
class KeyEntry:
    pk: int
    key_id: str
    digest: bytes  # hex digest as bytes, compared in constant time
    expires_at: float | None
    consumer_id: int
    organization_id: int | None
    subscription_id: int
    subscription_status: str
    plan_slug: str
    api_ids: frozenset[int]
    limits: tuple[LimitRule, ...]


@dataclass(slots=True)
class RouteEntry:
    id: int
    api_id: int
    api_slug: str
    api_prefix: str
    prefix: str  # full public prefix, no trailing slash ("/" for the root)
    path: str  # the route's own path, as logged
    methods: frozenset[str]
    strip_prefix: bool
    key_header: bytes  # lower-case
    key_header_label: str  # as configured, for messages
    fail_closed: bool  # refuse (503) rather than admit when the limit store is unreachable
    upstream: UpstreamEntry
    stages: list[Stage] = field(default_factory=list)
    handler: Handler | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    epoch: str
    built_at: float
    build_seconds: float
    router: Router
    keys: dict[str, KeyEntry]


def load_config(version: int) -> tuple[list, dict[str, KeyEntry]]:
    """Read everything the data plane needs from the database (sync; runs off the loop)."""
    from gateway.models import Api
    from portal.models import ApiKey, Plan

    apis = list(
        Api.objects.select_related("upstream")
        .prefetch_related("routes__upstream__targets", "upstream__targets")
        .all()
    )
    plan_apis: dict[int, frozenset[int]] = {
        plan.pk: frozenset(a.pk for a in plan.apis.all())
        for plan in Plan.objects.prefetch_related("apis")
    }
    keys: dict[str, KeyEntry] = {}
    rows = (
        ApiKey.objects.filter(revoked_at__isnull=True)
        # A deactivated user's keys stop working with the account.
        .exclude(subscription__consumer__user__is_active=False)
        .select_related("subscription__plan", "subscription__consumer")
        .iterator(chunk_size=2000)
    )
    for k in rows:
        sub = k.subscription
        plan = sub.plan
        limits: list[LimitRule] = []
        tag = f"s{sub.pk}"
        if plan.rate_limit_per_minute:
            limits.append(
                LimitRule("rate", f"key:{k.pk}", plan.rate_limit_per_minute, "minute", tag)
            )
        if plan.quota_limit:
            limits.append(
                LimitRule("quota", f"sub:{sub.pk}", plan.quota_limit, plan.quota_period, tag)
            )
        keys[k.key_id] = KeyEntry(
            pk=k.pk,
            key_id=k.key_id,
            digest=k.digest.encode(),
            expires_at=k.expires_at.timestamp() if k.expires_at else None,
            consumer_id=sub.consumer_id,
            organization_id=sub.consumer.organization_id,
            subscription_id=sub.pk,
            subscription_status=sub.status,
            plan_slug=plan.slug,
            api_ids=plan_apis.get(plan.pk, frozenset()),
            limits=tuple(limits),
        )
    return apis, keys


def compile_snapshot(
    version: int, apis: list, keys: dict[str, KeyEntry], compile_route, *, epoch: str = ""
) -> Snapshot:
    """Turn model rows into the immutable snapshot; `compile_route` builds a route's stages."""
    started = time.perf_counter()
    upstreams: dict[int, UpstreamEntry] = {}

    def upstream_entry(up) -> UpstreamEntry:
        if up.pk not in upstreams:
            targets = tuple(
                TargetEntry(t.host, t.port, f"http://{t.host}:{t.port}")
                for t in up.targets.all()
                if t.enabled
            )
            upstreams[up.pk] = UpstreamEntry(
                id=up.pk,
                name=up.name,
                targets=targets,
                connect_timeout=up.connect_timeout,
                read_timeout=up.read_timeout,
            )
        return upstreams[up.pk]

    routes: list[RouteEntry] = []
    for api in apis:
        for r in api.routes.all():
            if not r.enabled:
                continue
            prefix = (api.path_prefix.rstrip("/") + r.path).rstrip("/") or "/"
            entry = RouteEntry(
                id=r.pk,
                api_id=api.pk,
                api_slug=api.slug,
                api_prefix=api.path_prefix.rstrip("/"),
                prefix=prefix,
                path=r.path,
                methods=r.method_set(),
                strip_prefix=r.strip_prefix,
                key_header=api.key_header.lower().encode(),
                key_header_label=api.key_header,
                fail_closed=api.limiter_failure == "closed",
                upstream=upstream_entry(r.upstream or api.upstream),
            )
            compile_route(entry, keys)
            routes.append(entry)
    return Snapshot(
        version=version,
        epoch=epoch,
        built_at=time.time(),
        build_seconds=time.perf_counter() - started,
        router=Router(routes),
        keys=keys,
    )
