"""The immutable, in-memory view of configuration that the data plane serves from.

Built from the database off the hot path (in a single worker thread), swapped atomically by
replacing one attribute when the config version moves. Requests never query the database.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import TYPE_CHECKING

import aiohttp

from gateway import routing
from gateway.dataplane.balancer import Balancer, HealthConfig, TargetRegistry, TargetState
from gateway.dataplane.router import VERSION_LIKE, Router

if TYPE_CHECKING:
    from gateway.dataplane.pipeline import Handler, Stage

log = logging.getLogger("gateway.snapshot")


@dataclass(slots=True)
class UpstreamEntry:
    id: int
    name: str
    targets: tuple[TargetState, ...]
    connect_timeout: float
    read_timeout: float
    timeout: aiohttp.ClientTimeout | None = None
    balancer: Balancer | None = None
    health: HealthConfig | None = None  # active checks; None: off
    ssl: ssl.SSLContext | bool = True  # aiohttp's ssl= (True: default verification)
    ssl_key: tuple = ()
    server_hostname: str | None = None  # SNI / certificate name when not the target host

    def __post_init__(self) -> None:
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout
        )
        if self.balancer is None:
            self.balancer = Balancer(self.targets)


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


@dataclass(frozen=True, slots=True)
class VersionCondition:
    """The API version a request names must be `value` (or be absent, for the default).

    kind "header" / "query": named by a header or a query parameter `name`. Kind "path" is
    the default version of a path-versioned API reached without a version segment: it holds
    unless the segment at index `name` looks like a version (an unknown one is a 404).
    """

    kind: str  # "header" | "query" | "path"
    name: str  # lower-case header name, query parameter, or segment index
    value: str
    accepts_missing: bool
    name_bytes: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(self, "name_bytes", self.name.encode("latin-1"))

    def holds(self, request) -> bool:
        if self.kind == "path":
            segments = request.segments
            index = int(self.name)
            return len(segments) <= index or not VERSION_LIKE.match(segments[index])
        if self.kind == "header":
            raw = request.header(self.name_bytes)
            given = raw.decode("latin-1").strip() if raw is not None else None
        else:
            given = request.query_param(self.name)
        if not given:
            return self.accepts_missing
        return given == self.value


@dataclass(slots=True)
class RouteEntry:
    id: int
    api_id: int
    api_slug: str
    path: str  # the route's own path, as logged
    methods: frozenset[str]
    key_header: bytes  # lower-case
    key_header_label: str  # as configured, for messages
    fail_closed: bool  # refuse (503) rather than admit when the limit store is unreachable
    upstream: UpstreamEntry
    # --- matching (router.py) ---
    kind: str = "prefix"  # "prefix" | "exact" | "regex"
    segments: tuple[str | None, ...] = ()  # the whole public path; None: a {param}
    param_names: tuple[str, ...] = ()  # names of the {param} segments, in order
    regex: re.Pattern | None = None  # regex routes: over the path below `segments`
    hosts: tuple[str, ...] = ()
    header_conditions: tuple[tuple[bytes, frozenset[bytes] | None], ...] = ()
    version_condition: VersionCondition | None = None
    priority: int = 0
    anonymous: bool = False  # no authentication, authorization or per-key limit stages
    key_query_param: str = ""  # the API also takes its key from this query parameter
    forward_credential: bool = False  # pass the key upstream (removed by default)
    ip_allow: tuple = ()  # ip_network objects; empty: everyone
    ip_deny: tuple = ()
    plans: tuple[str, ...] = ()  # public plans that include the API (for 403 details)
    unconditional: bool = True  # no header or version condition (set in __post_init__)
    # --- forwarding (stages/proxy.py) ---
    strip: str = ""  # public prefix removed before forwarding ("" keeps the path)
    rewrite: tuple | None = None  # routing.compile_rewrite parts
    preserve_host: bool = False
    timeout: aiohttp.ClientTimeout | None = None  # None: the upstream's
    max_body: int = 0  # bytes; 0: no limit
    retries: int = 1  # further tries on another target (balancer.py says which are safe)
    version: str = ""
    # Added to every answer of this route (Deprecation, Sunset, Link of a deprecated version).
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()
    stages: list[Stage] = field(default_factory=list)
    handler: Handler | None = None

    def __post_init__(self) -> None:
        self.unconditional = not self.header_conditions and self.version_condition is None


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    epoch: str
    built_at: float
    build_seconds: float
    router: Router
    keys: dict[str, KeyEntry]
    upstreams: tuple[UpstreamEntry, ...] = ()


def load_config(version: int) -> tuple[list, dict[str, KeyEntry]]:
    """Read everything the data plane needs from the database (sync; runs off the loop)."""
    from gateway.models import Api

    apis = list(
        Api.objects.select_related("upstream")
        .prefetch_related(
            "routes__upstream__targets",
            "upstream__targets",
            "versions__upstream__targets",
            "plans",
        )
        .all()
    )
    return apis, load_keys(None)


def load_keys(key_ids: set[str] | None) -> dict[str, KeyEntry]:
    """The usable keys among `key_ids` (None: all of them), as snapshot entries (sync).

    Rows are read as tuples, not model instances (a snapshot holds up to about a million
    keys: instances would cost four objects a key); plans are few and read once.
    """
    from portal.models import ApiKey, Plan

    rows = (
        ApiKey.objects.filter(revoked_at__isnull=True)
        # A deactivated user's keys stop working with the account.
        .exclude(subscription__consumer__user__is_active=False)
    )
    plans = Plan.objects.prefetch_related("apis")
    if key_ids is not None:
        rows = rows.filter(key_id__in=key_ids)
        plans = plans.filter(subscriptions__keys__key_id__in=key_ids).distinct()
    plan_info = {
        plan.pk: (
            plan.slug,
            frozenset(a.pk for a in plan.apis.all()),
            plan.rate_limit_per_minute,
            plan.quota_limit,
            plan.quota_period,
        )
        for plan in plans
    }
    keys: dict[str, KeyEntry] = {}
    quota_rules: dict[int, LimitRule] = {}  # one shared rule object per subscription
    columns = (
        "pk",
        "key_id",
        "digest",
        "expires_at",
        "subscription_id",
        "subscription__status",
        "subscription__consumer_id",
        "subscription__consumer__organization_id",
        "subscription__plan_id",
    )
    for pk, key_id, digest, expires, sub_id, status, consumer, org, plan_id in rows.values_list(
        *columns
    ).iterator(chunk_size=5000):
        info = plan_info.get(plan_id)
        if info is None:  # a plan created after the plans were read: the next delta has it
            continue
        slug, api_ids, rate, quota, period = info
        tag = f"s{sub_id}"
        limits: tuple[LimitRule, ...] = ()
        if rate:
            limits = (LimitRule("rate", f"key:{pk}", rate, "minute", tag),)
        if quota:
            rule = quota_rules.get(sub_id)
            if rule is None:
                rule = quota_rules[sub_id] = LimitRule("quota", f"sub:{sub_id}", quota, period, tag)
            limits = (*limits, rule)
        keys[key_id] = KeyEntry(
            pk=pk,
            key_id=key_id,
            digest=digest.encode(),
            expires_at=expires.timestamp() if expires else None,
            consumer_id=consumer,
            organization_id=org,
            subscription_id=sub_id,
            subscription_status=status,
            plan_slug=slug,
            api_ids=api_ids,
            limits=limits,
        )
    return keys


def load_key_delta(since: int, until: int) -> tuple[set[str], dict[str, KeyEntry]] | None:
    """The keys changed between two config versions and their new entries; None when a
    change in between was structural (the snapshot must be rebuilt)."""
    from gateway.config import config_key_changes

    changed = config_key_changes(since, until)
    if changed is None:
        return None
    return changed, load_keys(changed) if changed else {}


def _version_headers(version) -> tuple[tuple[bytes, bytes], ...]:
    """RFC 9745 Deprecation, RFC 8594 Sunset and their Links, for a deprecated version."""
    if version is None or (version.deprecated_at is None and version.sunset_at is None):
        return ()
    out: list[tuple[bytes, bytes]] = []
    if version.deprecated_at is not None:
        out.append((b"deprecation", f"@{int(version.deprecated_at.timestamp())}".encode()))
    if version.sunset_at is not None:
        out.append((b"sunset", formatdate(version.sunset_at.timestamp(), usegmt=True).encode()))
    if version.docs_url:
        rels = [
            r
            for r, at in (("deprecation", version.deprecated_at), ("sunset", version.sunset_at))
            if at
        ]
        for rel in rels:
            out.append((b"link", f'<{version.docs_url}>; rel="{rel}"; type="text/html"'.encode()))
    return tuple(out)


def compile_route_entries(api, route, upstream_entry, *, default_max_body: int) -> list[RouteEntry]:
    """The router entries of one route: one per API version it serves (and, for the default
    version of a path-versioned API, one without the version segment)."""
    pattern = routing.compile_path(route.match, route.path)
    rewrite = routing.compile_rewrite(route.rewrite, pattern.params) if route.rewrite else None
    api_segments = tuple(routing.split_path(api.path_prefix))
    api_prefix = "/" + "/".join(api_segments) if api_segments else ""
    hosts = routing.parse_hosts(route.hosts or api.hosts)
    header_conditions = routing.parse_header_conditions(route.headers)
    ip_allow = routing.parse_networks(api.ip_allow)
    ip_deny = routing.parse_networks(api.ip_deny)
    plans = tuple(sorted(p.slug for p in api.plans.all() if p.is_public))
    max_body = default_max_body if route.max_body_bytes is None else route.max_body_bytes
    scheme = api.version_scheme
    versions = list(api.versions.all()) if scheme != "none" else []
    if route.version_id is not None and scheme != "none":
        versions = [v for v in versions if v.pk == route.version_id]
        if not versions:
            return []
    # (version, extra path segment, version condition)
    variants: list[tuple] = []
    if not versions:
        variants.append((None, (), None))
    for v in versions:
        if scheme == "path":
            variants.append((v, (v.name,), None))
            if v.is_default:
                guard = VersionCondition("path", str(len(api_segments)), "", True)
                variants.append((v, (), guard))
        else:
            name = api.version_header.lower() if scheme == "header" else api.version_query
            variants.append((v, (), VersionCondition(scheme, name, v.name, v.is_default)))
    entries = []
    for version, version_segment, condition in variants:
        up = route.upstream or (version.upstream if version else None) or api.upstream
        base = api_segments + version_segment
        entry_up = upstream_entry(up)
        connect = route.connect_timeout
        read = route.read_timeout
        timeout = None
        if connect is not None or read is not None or route.timeout is not None:
            timeout = aiohttp.ClientTimeout(
                total=route.timeout,
                sock_connect=connect if connect is not None else entry_up.connect_timeout,
                sock_read=read if read is not None else entry_up.read_timeout,
            )
        entries.append(
            RouteEntry(
                id=route.pk,
                api_id=api.pk,
                api_slug=api.slug,
                path=route.path,
                methods=route.method_set(),
                key_header=api.key_header.lower().encode(),
                key_header_label=api.key_header,
                fail_closed=api.limiter_failure == "closed",
                upstream=entry_up,
                kind=pattern.kind,
                segments=base + pattern.segments,
                param_names=pattern.params if pattern.kind != "regex" else (),
                regex=pattern.regex,
                hosts=hosts,
                header_conditions=header_conditions,
                version_condition=condition,
                priority=route.priority,
                anonymous=route.anonymous,
                key_query_param=api.key_query_param,
                forward_credential=api.forward_credential,
                ip_allow=ip_allow,
                ip_deny=ip_deny,
                plans=plans,
                strip=(api_prefix + "".join("/" + s for s in version_segment))
                if route.strip_prefix
                else "",
                rewrite=rewrite,
                preserve_host=route.preserve_host,
                timeout=timeout,
                max_body=max_body,
                retries=route.retries,
                version=version.name if version else "",
                extra_headers=_version_headers(version),
            )
        )
    return entries


def compile_snapshot(
    version: int,
    apis: list,
    keys: dict[str, KeyEntry],
    compile_route,
    *,
    epoch: str = "",
    default_max_body: int = 0,
    targets: TargetRegistry | None = None,
) -> Snapshot:
    """Turn model rows into the immutable snapshot; `compile_route` builds a route's stages.

    A route that cannot be compiled raises RouteConfigError: the whole snapshot is refused
    and the gateway keeps serving the last good one.
    """
    started = time.perf_counter()
    upstreams: dict[int, UpstreamEntry] = {}
    registry = targets or TargetRegistry()
    registry.begin_build()

    def upstream_entry(up) -> UpstreamEntry:
        if up.pk not in upstreams:
            upstreams[up.pk] = compile_upstream(up, registry)
        return upstreams[up.pk]

    routes: list[RouteEntry] = []
    for api in apis:
        for r in api.routes.all():
            if not r.enabled:
                continue
            for entry in compile_route_entries(
                api, r, upstream_entry, default_max_body=default_max_body
            ):
                compile_route(entry, keys)
                routes.append(entry)
    router = Router(routes)
    registry.end_build()
    return Snapshot(
        version=version,
        epoch=epoch,
        built_at=time.time(),
        build_seconds=time.perf_counter() - started,
        router=router,
        keys=keys,
        upstreams=tuple(upstreams.values()),
    )


def compile_upstream(up, registry: TargetRegistry) -> UpstreamEntry:
    """An upstream's entry: its targets' (surviving) states, balancer, health, TLS."""
    from gateway.models import parse_status_list

    targets = tuple(
        registry.target(up.pk, up.scheme, t.host, t.port, t.weight)
        for t in up.targets.all()
        if t.enabled
    )
    health = None
    if up.health_path:
        health = HealthConfig(
            path=up.health_path,
            interval=up.health_interval,
            timeout=up.health_timeout,
            statuses=parse_status_list(up.health_statuses),
            healthy_threshold=up.healthy_threshold,
            unhealthy_threshold=up.unhealthy_threshold,
        )
    tls: ssl.SSLContext | bool = True
    ssl_key: tuple = ()
    if up.scheme == "https":
        files = (up.tls_ca_file, up.tls_client_cert, up.tls_client_key)
        mtimes = tuple(os.stat(f).st_mtime_ns if f else 0 for f in files)
        ssl_key = (up.tls_verify, *files, mtimes)
        tls = registry.ssl(ssl_key)
    return UpstreamEntry(
        id=up.pk,
        name=up.name,
        targets=targets,
        connect_timeout=up.connect_timeout,
        read_timeout=up.read_timeout,
        balancer=Balancer(
            targets,
            algorithm=up.algorithm,
            hash_on=up.hash_on,
            hash_header=up.hash_header,
            eject_after=up.eject_after_failures,
            eject_seconds=up.eject_seconds,
            retry_budget=up.retry_budget,
        ),
        health=health,
        ssl=tls,
        ssl_key=ssl_key,
        server_hostname=up.tls_server_name or None,
    )
