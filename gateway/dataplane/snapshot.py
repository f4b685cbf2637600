"""The immutable, in-memory view of configuration that the data plane serves from.

Built from the database off the hot path (in a single worker thread), swapped atomically by
replacing one attribute when the config version moves. Requests never query the database.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
import re
import ssl
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
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


WINDOW_SECONDS = {"second": 1, "minute": 60, "hour": 3600}


QUOTA_WINDOW_SECONDS = {"day": 86400, "month": 2_592_000}  # a month's w is nominal (30 d)


@dataclass(frozen=True, slots=True)
class LimitRule:
    """One counter a request is checked against: a rate ("rate", GCRA) or a quota."""

    kind: str  # "rate" | "quota"
    subject: str  # counter identity, e.g. "k12:minute:p3" or "sub:7"
    limit: int
    period: str  # "second" | "minute" | "hour" for rates; "day" | "month" for quotas
    tag: str = ""  # Redis Cluster hash tag (see limiter.py)
    burst: int = 0  # rates: requests allowed at once above the even pace
    name: str = ""  # the policy's name in RateLimit-Policy, e.g. "key-minute"
    scope: str = ""  # rates: "key" | "consumer" | "organization" | "client_ip"
    # Derived once here, read by the limiter and the limit headers on every request:
    interval: float = field(default=0.0, init=False, compare=False, repr=False)  # GCRA's T
    tolerance: float = field(default=0.0, init=False, compare=False, repr=False)  # burst * T
    label: bytes = field(default=b"", init=False, compare=False, repr=False)  # its name
    policy: bytes = field(default=b"", init=False, compare=False, repr=False)  # RateLimit-Policy
    limit_text: bytes = field(default=b"", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        derive = object.__setattr__
        if self.kind == "rate":
            window = WINDOW_SECONDS[self.period]
            interval = window / self.limit if self.limit > 0 else float(window)
            derive(self, "interval", interval)
            derive(self, "tolerance", self.burst * interval)
            label = self.name or "rate"
        else:
            window = QUOTA_WINDOW_SECONDS.get(self.period, 86400)
            label = self.name or f"quota-{self.period}"
        derive(self, "label", label.encode())
        derive(self, "policy", f'"{label}";q={self.limit};w={window}'.encode())
        derive(self, "limit_text", b"%d" % self.limit)


@dataclass(frozen=True, slots=True)
class RateTemplate:
    """A rate limit whose counter is known only per request (client IP, route overrides)."""

    scope: str
    window: str
    limit: int
    burst: int
    origin: str  # "p<plan>", "r<route>" or "r<route>p<plan>": separates the counters
    name: str


def rate_template(row, *, origin: str, prefix: str = "") -> RateTemplate:
    """The template of a RateLimit row (`prefix` names route-wide rules apart in headers)."""
    scope = "ip" if row.scope == "client_ip" else row.scope
    return RateTemplate(
        row.scope, row.window, row.limit, row.burst, origin, f"{prefix}{scope}-{row.window}"
    )


def consumer_tag(consumer_id: int) -> str:
    """The Redis Cluster hash tag of a consumer's counters (its rates and quotas)."""
    return f"c{consumer_id}"


def resolve_rate(t: RateTemplate, key: KeyEntry | None, client_ip: str) -> LimitRule:
    """The concrete rule of a template for one request (`key` None: anonymous)."""
    if key is None:
        return counter_rule(t, 0, 0, None, client_ip)
    return counter_rule(t, key.pk, key.consumer_id, key.organization_id, client_ip)


def counter_rule(
    t: RateTemplate, key_pk: int, consumer: int, org: int | None, client_ip: str
) -> LimitRule:
    """The rule of template `t` for a key (pk 0: a JWT identity) of a consumer, from an IP.

    Counters share the consumer's hash tag, per-IP ones the address's: on Redis Cluster a
    request with both would span two slots (one Redis or a primary with replicas: fine)."""
    if t.scope == "client_ip" or not consumer:
        who = tag = f"i{client_ip}"
    else:
        tag = consumer_tag(consumer)
        if t.scope == "key":
            who = f"k{key_pk}" if key_pk else f"j{consumer}"  # JWT: per token subject
        elif t.scope == "organization" and org:
            who = f"o{org}"
        else:
            who = tag
    return LimitRule(
        "rate", f"{who}:{t.window}:{t.origin}", t.limit, t.window, tag, t.burst, t.name, t.scope
    )


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """A credential's identity and grants: an API key, or (pk 0) a JWT consumer's
    subscription."""

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
    limits: tuple[LimitRule, ...]  # the plan's rules whose counters do not vary per request
    plan_id: int = 0
    scopes: frozenset[str] = frozenset()
    ip_rates: tuple[RateTemplate, ...] = ()  # the plan's per-client-IP rules
    # Who the upstream is told called (stages/proxy.py), encoded once.
    consumer_headers: tuple[tuple[bytes, bytes], ...] = field(
        default=(), init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "consumer_headers",
            (
                (b"x-consumer-id", b"%d" % self.consumer_id),
                (b"x-consumer-plan", self.plan_slug.encode("latin-1", "replace")),
            ),
        )


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
    auth_methods: str = "key"  # "key" | "jwt" | "any"
    jwt_issuers: tuple = ()  # jwt.ProviderConfig of the API's enabled issuers
    required_scopes: frozenset[str] = frozenset()
    # Rate limits of this route: for everyone, and per plan instead of the plan's rules of
    # the same (scope, window).
    route_rates: tuple[RateTemplate, ...] = ()
    rate_overrides: dict[int, tuple[frozenset[tuple[str, str]], tuple[RateTemplate, ...]]] = field(
        default_factory=dict
    )
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
    # Payload policies by kind ("cors", "request_transform", …), parsed (models.parse_policy).
    policies: dict[str, object] = field(default_factory=dict)
    cache_generation: str = ""  # "<api>.<route>" purge generations, part of every cache key
    aggregate: tuple | None = None  # (partial, ((CallSpec, UpstreamEntry), ...)): no proxy
    websocket: object | None = None  # stages/websocket.WebSocketProxy: takes handshakes
    openapi: object | None = None  # openapi.OpenApiValidator of the entry's API version
    doc_prefix: str = ""  # the public path above what the OpenAPI document describes
    stages: list[Stage] = field(default_factory=list)
    completing: tuple[Stage, ...] = ()  # the stages with an on_complete of their own
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
    identities: dict[str, tuple[KeyEntry, ...]] = field(default_factory=dict)  # JWT subjects


def load_config(version: int, *, keys: bool = True) -> tuple[list, dict[str, KeyEntry]]:
    """Read the APIs (and, unless `keys` is false, the keys) from the database (sync; runs
    off the loop). The gateway reads through load_source()."""
    from gateway.models import Api

    apis = list(
        Api.objects.select_related("upstream")
        .prefetch_related(
            "routes__upstream__targets",
            "routes__rate_limits",
            "routes__policies",
            "policies",
            "upstream__targets",
            "jwt_issuers",
            "versions__upstream__targets",
            "plans",
        )
        .all()
    )
    return apis, load_keys(None) if keys else {}


def load_cache_purges() -> dict[str, float]:
    """Cache keys purged within the longest TTL (a day), with when (sync)."""
    from datetime import timedelta

    from django.utils import timezone

    from gateway.models import CachePurge

    since = timezone.now() - timedelta(days=1)
    out: dict[str, float] = {}
    for key, at in CachePurge.objects.filter(created_at__gte=since).values_list(
        "cache_key", "created_at"
    ):
        out[key] = max(out.get(key, 0.0), at.timestamp())
    return out


def load_upstreams() -> dict[str, object]:
    """Every upstream by name, with its targets (aggregate routes name theirs) (sync)."""
    from gateway.models import Upstream

    return {u.name: u for u in Upstream.objects.prefetch_related("targets")}


def load_keys(
    key_ids: set[str] | None, plans_out: dict[int, PlanInfo] | None = None
) -> dict[str, KeyEntry]:
    """The usable keys among `key_ids` (None: all of them), as snapshot entries (sync).

    Rows are read as tuples, not model instances (a snapshot holds up to about a million
    keys: instances would cost four objects a key); plans are few and read once.
    `plans_out` receives the plans read (the on-disk cache rebuilds entries from them).
    """
    from portal.models import ApiKey, Plan

    rows = (
        ApiKey.objects.filter(revoked_at__isnull=True)
        # A deactivated user's keys stop working with the account.
        .exclude(subscription__consumer__user__is_active=False)
    )
    plans = Plan.objects.prefetch_related("apis", "rate_limits")
    if key_ids is not None:
        rows = rows.filter(key_id__in=key_ids)
        plans = plans.filter(subscriptions__keys__key_id__in=key_ids).distinct()
    plan_info = {plan.pk: _plan_info(plan) for plan in plans}
    if plans_out is not None:
        plans_out.update(plan_info)
    columns = (
        "pk",
        "key_id",
        "digest",
        "expires_at",
        "scopes",
        "subscription_id",
        "subscription__status",
        "subscription__consumer_id",
        "subscription__consumer__organization_id",
        "subscription__plan_id",
    )
    rows = rows.values_list(*columns).iterator(chunk_size=5000)
    return _grant_rows(
        ((pk, kid, digest.encode(), exp.timestamp() if exp else None, *rest)
         for pk, kid, digest, exp, *rest in rows),
        plan_info,
    )  # fmt: skip


def _grant_rows(rows, plans: dict[int, PlanInfo]) -> dict[str, KeyEntry]:
    """Key entries from rows (pk, key_id, digest bytes, expires_at timestamp or None,
    scopes, subscription id, its status, consumer, organization, plan id): read from the
    database or from the on-disk cache. A key of a plan not in `plans` (created after the
    plans were read) is left out: the next delta has it."""
    keys: dict[str, KeyEntry] = {}
    shared: dict[int, tuple] = {}  # (limits, ip rules) per subscription: one object each
    for pk, key_id, digest, expires, scopes, sub_id, status, consumer, org, plan_id in rows:
        info = plans.get(plan_id)
        if info is not None:
            keys[key_id] = _grant(
                info,
                pk=pk,
                key_id=key_id,
                digest=digest,
                expires_at=expires,
                scopes=scopes,
                sub_id=sub_id,
                status=status,
                consumer=consumer,
                org=org,
                shared=shared,
            )
    return keys


@dataclass(frozen=True, slots=True)
class PlanInfo:
    pk: int
    slug: str
    api_ids: frozenset[int]
    rates: tuple[RateTemplate, ...]  # plan-wide rules
    quota: int | None
    quota_period: str


def _plan_info(plan) -> PlanInfo:
    rates = tuple(
        rate_template(r, origin=f"p{plan.pk}") for r in plan.rate_limits.all() if not r.route_id
    )
    return PlanInfo(
        plan.pk,
        plan.slug,
        frozenset(a.pk for a in plan.apis.all()),
        rates,
        plan.quota_limit,
        plan.quota_period,
    )


def _grant_identity(
    info: PlanInfo, sub_id: int, status: str, consumer: int, org: int | None, shared: dict
) -> KeyEntry:
    """A JWT consumer's subscription as an entry (pk 0: no key)."""
    return _grant(
        info,
        pk=0,
        key_id="",
        digest=b"",
        expires_at=None,
        scopes="",
        sub_id=sub_id,
        status=status,
        consumer=consumer,
        org=org,
        shared=shared,
    )


def _grant(
    info: PlanInfo,
    *,
    pk: int,
    key_id: str,
    digest: bytes,
    expires_at: float | None,
    scopes: str,
    sub_id: int,
    status: str,
    consumer: int,
    org: int | None,
    shared: dict[int, tuple],
) -> KeyEntry:
    """A key's (or a JWT identity's) entry: its plan's rules resolved for it."""
    per_key = any(t.scope == "key" for t in info.rates)
    cached = None if per_key else shared.get(sub_id)
    if cached is None:
        limits = tuple(
            counter_rule(t, pk, consumer, org, "") for t in info.rates if t.scope != "client_ip"
        )
        if info.quota:
            tag = consumer_tag(consumer)
            limits += (LimitRule("quota", f"sub:{sub_id}", info.quota, info.quota_period, tag),)
        ip_rates = tuple(t for t in info.rates if t.scope == "client_ip")
        cached = shared[sub_id] = (limits, ip_rates)
    return KeyEntry(
        pk=pk,
        key_id=key_id,
        digest=digest,
        expires_at=expires_at,
        consumer_id=consumer,
        organization_id=org,
        subscription_id=sub_id,
        subscription_status=status,
        plan_slug=info.slug,
        api_ids=info.api_ids,
        limits=cached[0],
        plan_id=info.pk,
        scopes=frozenset(scopes.split()) if scopes else frozenset(),
        ip_rates=cached[1],
    )


def load_identities() -> dict[str, tuple[KeyEntry, ...]]:
    """JWT identities: consumer external id -> an entry per open subscription (sync)."""
    from portal.models import Plan, Subscription

    plan_info = {p.pk: _plan_info(p) for p in Plan.objects.prefetch_related("apis", "rate_limits")}
    out: dict[str, list[KeyEntry]] = {}
    shared: dict[int, tuple] = {}
    rows = (
        Subscription.objects.filter(
            consumer__external_id__isnull=False, status__in=["active", "pending"]
        )
        .exclude(consumer__user__is_active=False)
        .values_list(
            "pk",
            "status",
            "plan_id",
            "consumer_id",
            "consumer__organization_id",
            "consumer__external_id",
        )
        .order_by("pk")
    )
    for sub_id, status, plan_id, consumer, org, external_id in rows:
        entry = _grant_identity(plan_info[plan_id], sub_id, status, consumer, org, shared)
        out.setdefault(external_id, []).append(entry)
    return {k: tuple(v) for k, v in out.items()}


def load_key_changes(
    since: int, until: int
) -> tuple[set[str], dict[str, KeyEntry], dict[int, PlanInfo], bool] | None:
    """The key-only changes since < v <= until: the key ids, their entries now, the plans
    read for them, and whether a structural change lies in between (a rebuild is due as
    well). None when history is missing (only a rebuild can catch up)."""
    from gateway.config import config_changes

    changes = config_changes(since, until)
    if changes is None:
        return None
    changed, structural = changes
    plans: dict[int, PlanInfo] = {}
    return changed, load_keys(changed, plans) if changed else {}, plans, structural


def load_catch_up(since: int) -> tuple[str, int, tuple | None]:
    """(epoch, version) now, and load_key_changes(since, version): what a snapshot read at
    version `since` must apply before it serves."""
    from gateway.config import config_current_stamp

    epoch, version = config_current_stamp()
    if version < since:
        return epoch, version, None
    return epoch, version, load_key_changes(since, version)


@dataclass(slots=True)
class ConfigSource:
    """What a snapshot is compiled from: the rows read at one config version (and what the
    on-disk cache holds). `keys` is the very dict the compiled snapshot serves, so that key
    deltas reach both; `plans` are the plans those entries were granted from."""

    epoch: str
    version: int
    apis: list
    keys: dict[str, KeyEntry]
    identities: dict[str, tuple[KeyEntry, ...]]
    upstreams: dict[str, object]
    cache_purges: dict[str, float]
    plans: dict[int, PlanInfo]


@contextlib.contextmanager
def _read_transaction():
    """One consistent read of the database for a rebuild: PostgreSQL in a REPEATABLE READ,
    READ ONLY transaction; SQLite in a deferred read transaction (WAL: writers go on; the
    settings' IMMEDIATE mode would take the write lock for the whole read)."""
    from django.db import connection, transaction

    if connection.in_atomic_block:  # a caller's transaction (tests): read in it
        yield
    elif connection.vendor == "postgresql":
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield
    elif connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("BEGIN DEFERRED")
        try:
            yield
        finally:
            with contextlib.suppress(Exception), connection.cursor() as cursor:
                cursor.execute("ROLLBACK")
    else:
        yield


def load_source() -> ConfigSource:
    """Everything the data plane needs, read at one config version (sync; off the loop)."""
    from gateway.config import config_current_stamp

    with _read_transaction():
        epoch, version = config_current_stamp()
        apis, _ = load_config(version, keys=False)
        plans: dict[int, PlanInfo] = {}
        keys = load_keys(None, plans)
        return ConfigSource(
            epoch=epoch,
            version=version,
            apis=apis,
            keys=keys,
            identities=load_identities(),
            upstreams=load_upstreams(),
            cache_purges=load_cache_purges(),
            plans=plans,
        )


# --- the on-disk cache of the last good configuration -------------------------------------
# A worker that starts while the database is down serves it (Kong's data planes do the same
# with their config cache). It holds the source rows, not the compiled snapshot (stages hold
# the worker's sessions and limiter): the structure (Django rows with their prefetched
# relations) pickled once per rebuild, and keys as plain tuples (pickling 100,000 KeyEntry
# dataclasses takes 1.5 s; their tuples a tenth of that) re-granted from their plans on load.
CACHE_FORMAT = 1


@functools.cache
def models_fingerprint() -> str:
    """The shape of the models the cache pickles (every model of the gateway and portal
    apps: table and concrete fields): a deploy that changes them makes an older cache
    unusable, refused at once rather than failing later on a missing attribute."""
    import hashlib

    from django.apps import apps

    parts = []
    for label in ("gateway", "portal"):
        for model in sorted(apps.get_app_config(label).get_models(), key=lambda m: m.__name__):
            fields = ",".join(
                f"{f.attname}:{f.get_internal_type()}"
                for f in (*model._meta.concrete_fields, *model._meta.many_to_many)
            )
            parts.append(f"{model._meta.db_table}({fields})")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_path(directory: str) -> Path | None:
    """The cache file of this database under `directory` ("" : no cache). Named after the
    database, so that a gateway pointed at another one never serves this one's config."""
    import hashlib

    from django.db import connection

    if not directory:
        return None
    db = connection.settings_dict
    ident = f"{db['ENGINE']}|{db['NAME']}|{db.get('HOST') or ''}|{db.get('PORT') or ''}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return Path(directory) / f"config-cache-{digest}.pickle"


# Pickled in pieces, each a C call of a few milliseconds at most: a pickle.dumps of 100,000
# key rows at once holds the GIL for ~50 ms, which the event loop waits out (a worker's p99
# at 500 rps went from 4 to 140 ms while keys changed). Between two pieces the loop runs.
CACHE_CHUNK = 2_000  # key rows per piece


def pickle_structure(source: ConfigSource) -> list[bytes]:
    """The structure (APIs with their routes and policies, upstreams, cache purges) as
    pieces: the upstreams and purges, then one piece per API."""
    dumps = pickle.dumps
    out = [dumps((source.upstreams, source.cache_purges), protocol=pickle.HIGHEST_PROTOCOL)]
    out.extend(dumps(api, protocol=pickle.HIGHEST_PROTOCOL) for api in source.apis)
    return out


def _atomic_write(path: Path, write) -> None:
    """Write a file whole or not at all (temp file, fsync, rename), mode 0600; `write(f)`
    writes its content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _key_row(e: KeyEntry) -> tuple:
    return (
        e.pk,
        e.key_id,
        e.digest,
        e.expires_at,
        " ".join(sorted(e.scopes)),
        e.subscription_id,
        e.subscription_status,
        e.consumer_id,
        e.organization_id,
        e.plan_id,
    )


def _identity_row(ext: str, e: KeyEntry) -> tuple:
    return (
        ext,
        e.subscription_id,
        e.subscription_status,
        e.plan_id,
        e.consumer_id,
        e.organization_id,
    )


def write_cache(
    path: Path,
    *,
    epoch: str,
    version: int,
    source: ConfigSource,
    structure: list[bytes],
    keys: dict[str, KeyEntry],
) -> bool:
    """Persist the configuration (its keys current through `version`); False if the file
    already holds this state or a newer one (a node's workers share the file: one writes).

    The file is a sequence of pickles: a header, the structure's pieces, the plans, then the
    keys and JWT identities as rows, CACHE_CHUNK to a piece."""
    import fcntl

    import django

    stamp = {"epoch": epoch, "version": version, "structure_version": source.version}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        stamp_path = path.with_suffix(".stamp")
        with contextlib.suppress(OSError, ValueError):
            have = json.loads(stamp_path.read_bytes())
            # Never older routes over newer ones (a worker still waiting for its rebuild
            # may have newer keys); at the same routes, only newer keys.
            if have["epoch"] == epoch and (
                source.version < have["structure_version"]
                or (source.version == have["structure_version"] and version <= have["version"])
            ):
                return False
        entries = list(keys.values())
        identities = [(ext, e) for ext, es in source.identities.items() for e in es]
        plans = dict(source.plans)  # one C call: deltas add plans on the loop
        header = {
            "format": CACHE_FORMAT,
            "django": django.__version__,
            "models": models_fingerprint(),
            **stamp,
            "written_at": time.time(),
            "structure": len(structure),
            "keys": len(entries),
            "identities": len(identities),
        }

        def write(f) -> None:
            dump = pickle.dump
            top = pickle.HIGHEST_PROTOCOL
            dump(header, f, protocol=top)
            for piece in structure:
                dump(piece, f, protocol=top)
            dump(plans, f, protocol=top)
            for i in range(0, len(entries), CACHE_CHUNK):
                dump([_key_row(e) for e in entries[i : i + CACHE_CHUNK]], f, protocol=top)
            for i in range(0, len(identities), CACHE_CHUNK):
                rows = [_identity_row(x, e) for x, e in identities[i : i + CACHE_CHUNK]]
                dump(rows, f, protocol=top)

        _atomic_write(path, write)
        _atomic_write(stamp_path, lambda f: f.write(json.dumps(stamp).encode()))
        return True
    finally:
        os.close(lock_fd)


def read_cache(path: Path) -> tuple[ConfigSource, dict] | None:
    """The cached configuration (keys current through its "version") and its stamp; None if
    there is no cache. A cache of another format, Django version or models raises
    ValueError."""
    import django

    try:
        f = path.open("rb")
    except FileNotFoundError:
        return None
    # Our own file, mode 0600 in VAR_DIR (whoever can write there can run code as us anyway:
    # the SQLite database and the secret key live there too).
    with f:
        load = pickle.load
        top = load(f)  # noqa: S301
        if top.get("format") != CACHE_FORMAT or top.get("django") != django.__version__:
            raise ValueError(f"cache format {top.get('format')} / Django {top.get('django')}")
        if top.get("models") != models_fingerprint():
            raise ValueError("cache written by a version of the gateway with other models")
        pieces = [load(f) for _ in range(top["structure"])]  # noqa: S301
        plans: dict[int, PlanInfo] = load(f)  # noqa: S301
        key_rows = [row for _ in range(-(-top["keys"] // CACHE_CHUNK)) for row in load(f)]  # noqa: S301
        identity_rows = [
            row
            for _ in range(-(-top["identities"] // CACHE_CHUNK))
            for row in load(f)  # noqa: S301
        ]
    upstreams, purges = pickle.loads(pieces[0])  # noqa: S301
    apis = [pickle.loads(piece) for piece in pieces[1:]]  # noqa: S301
    keys = _grant_rows(key_rows, plans)
    identities: dict[str, list[KeyEntry]] = {}
    shared = {}
    for ext, sub_id, status, plan_id, consumer, org in identity_rows:
        info = plans.get(plan_id)
        if info is not None:
            entry = _grant_identity(info, sub_id, status, consumer, org, shared)
            identities.setdefault(ext, []).append(entry)
    source = ConfigSource(
        epoch=top["epoch"],
        version=top["version"],
        apis=apis,
        keys=keys,
        identities={k: tuple(v) for k, v in identities.items()},
        upstreams=upstreams,
        cache_purges=purges,
        plans=plans,
    )
    stamp = {k: top[k] for k in ("epoch", "version", "structure_version", "written_at")}
    return source, stamp


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


def compile_policies(api, route) -> dict[str, object]:
    """The enabled policies of a route: the API's, each replaced by the route's own of its
    kind. A bad configuration raises RouteConfigError (the snapshot is refused)."""
    return compile_policy_rows(api.policies.all(), route.policies.all())


TRY_IT_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
TRY_IT_EXPOSE = (
    "x-request-id",
    "ratelimit",
    "ratelimit-policy",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "retry-after",
    "x-cache",
)


def portal_origin() -> str:
    """The portal's origin (scheme://host[:port], as browsers send it), from PORTAL_URL."""
    from urllib.parse import urlsplit

    from django.conf import settings

    parts = urlsplit(settings.PORTAL_URL)
    origin = f"{parts.scheme}://{parts.hostname}".lower()
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return origin + (f":{parts.port}" if parts.port and parts.port != default else "")


def portal_try_it_cors(api, current):
    """The API's CORS policy (or none) widened so that the portal's "Try it" may call it:
    the portal's origin, every method, the key and version headers; no credentials are
    needed (the key is a header the page sets)."""
    import dataclasses

    from gateway.dataplane.stages.cors import CorsConfig

    origin = portal_origin()
    headers = {"content-type", "authorization", api.key_header.lower()}
    if api.version_scheme == "header":
        headers.add(api.version_header.lower())
    if current is None:
        return CorsConfig(
            origins=(origin,),
            methods=TRY_IT_METHODS,
            headers=tuple(sorted(headers)),
            expose_headers=TRY_IT_EXPOSE,
        )
    origins = current.origins
    if origin not in origins and "*" not in origins:
        origins = (*origins, origin)
    methods = tuple(dict.fromkeys((*current.methods, *TRY_IT_METHODS)))
    have = {h.lower() for h in current.headers}
    allowed = current.headers
    if "*" not in have:
        allowed = (*current.headers, *sorted(headers - have))
    expose = current.expose_headers
    if "*" not in expose:
        expose = tuple(dict.fromkeys((*expose, *TRY_IT_EXPOSE)))
    return dataclasses.replace(
        current, origins=origins, methods=methods, headers=allowed, expose_headers=expose
    )


def compile_policy_rows(api_policies, route_policies) -> dict[str, object]:
    """compile_policies() on Policy rows already at hand."""
    from gateway.models import parse_policy

    chosen = {p.kind: p for p in api_policies if p.enabled}
    for p in route_policies:
        if p.enabled:
            chosen[p.kind] = p
        else:
            chosen.pop(p.kind, None)  # a disabled route policy switches the API's off here
    out = {}
    for kind, p in chosen.items():
        try:
            out[kind] = parse_policy(kind, p.config)
        except ValueError as exc:
            raise routing.RouteConfigError("policies", f"{kind}: {exc}") from None
    check_policies(out)
    return out


def check_policies(policies: dict[str, object]) -> None:
    """Refuse combinations no single policy can see: a cache shared across consumers in
    front of a transformation that injects consumer context would serve one consumer's
    answer to another."""
    from gateway.dataplane.stages.transform import injects_consumer

    cache = policies.get("cache")
    if cache is not None and cache.shared:
        for kind in ("request_transform", "response_transform"):
            if injects_consumer(policies.get(kind)):
                raise routing.RouteConfigError(
                    "policies",
                    f"cache: share_across_consumers is not allowed with a {kind} that sets "
                    "consumer context (${consumer}, ${plan}, ${claim.…}).",
                )


def compile_route_entries(
    api, route, upstream_entry, *, default_max_body: int, upstream_models: dict | None = None
) -> list[RouteEntry]:
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
    issuers = tuple(i.provider_config() for i in api.jwt_issuers.all() if i.enabled)
    route_rates: list[RateTemplate] = []
    overrides: dict[int, tuple[set, list]] = {}
    for row in route.rate_limits.all():
        if row.plan_id is None:
            route_rates.append(rate_template(row, origin=f"r{route.pk}", prefix="route-"))
        else:
            slots, templates = overrides.setdefault(row.plan_id, (set(), []))
            slots.add((row.scope, row.window))
            templates.append(rate_template(row, origin=f"r{route.pk}p{row.plan_id}"))
    rate_overrides = {p: (frozenset(sl), tuple(ts)) for p, (sl, ts) in overrides.items()}
    policies = compile_policies(api, route)
    if api.portal_try_it:
        policies["cors"] = portal_try_it_cors(api, policies.get("cors"))
    aggregate = None
    if "aggregate" in policies:
        calls = []
        for spec in policies["aggregate"].calls:
            model = (upstream_models or {}).get(spec.upstream)
            if model is None:
                raise routing.RouteConfigError(
                    "policies", f"aggregate: no upstream named {spec.upstream!r}."
                )
            calls.append((spec, model))
        aggregate = (policies["aggregate"].partial, calls)
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
        openapi = None
        if "validate" in policies:
            text = (version.openapi if version else "") or api.openapi
            if not text.strip():
                raise routing.RouteConfigError(
                    "policies", "validate: the API (or its version) has no OpenAPI document."
                )
            from gateway.dataplane.openapi import OpenApiError, compiled_openapi

            try:
                openapi = compiled_openapi(text)
            except OpenApiError as exc:
                raise routing.RouteConfigError("policies", f"validate: {exc}") from None
        aggregate_calls = None
        if aggregate is not None:
            aggregate_calls = (aggregate[0], tuple((s, upstream_entry(m)) for s, m in aggregate[1]))
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
                auth_methods=api.auth_methods,
                jwt_issuers=issuers,
                required_scopes=frozenset(route.required_scopes.split()),
                route_rates=tuple(route_rates),
                rate_overrides=rate_overrides,
                policies=policies,
                cache_generation=f"{api.cache_generation}.{route.cache_generation}",
                aggregate=aggregate_calls,
                openapi=openapi,
                doc_prefix=api_prefix + "".join("/" + s for s in version_segment),
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
    identities: dict[str, tuple[KeyEntry, ...]] | None = None,
    upstream_models: dict | None = None,
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
                api,
                r,
                upstream_entry,
                default_max_body=default_max_body,
                upstream_models=upstream_models,
            ):
                compile_route(entry, keys, identities or {})
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
        identities=identities or {},
    )


def file_stamp(path: str) -> tuple[int, int, int] | None:
    """What tells a renewed file from the one loaded (modification time, size, inode: a
    renewal by rename keeps neither the inode nor, usually, the time); None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def tls_file_stamps(upstreams) -> dict[tuple, tuple]:
    """{an upstream's TLS setting (ssl_key): its files' stamps now}, for the https upstreams
    of a snapshot (their keys hold the stamps they were loaded at). A file that is missing
    now (a renewal between its delete and its create) reads as None."""
    out: dict[tuple, tuple] = {}
    for up in upstreams:
        if up.ssl_key and up.ssl_key not in out:
            files = up.ssl_key[1:4]
            out[up.ssl_key] = tuple(file_stamp(f) if f else None for f in files)
    return out


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
        stamps = tuple(file_stamp(f) if f else None for f in files)
        ssl_key = (up.tls_verify, *files, stamps)
        try:
            missing = [f for f, stamp in zip(files, stamps, strict=True) if f and not stamp]
            if missing:
                raise FileNotFoundError(f"missing: {', '.join(missing)}")
            tls = registry.ssl(ssl_key)
        except OSError as exc:  # ssl.SSLError too: a key that does not match its certificate
            good = registry.last_good_ssl(ssl_key[:4])
            if good is None:
                raise routing.RouteConfigError(
                    "upstream", f"{up.name}: TLS files cannot be loaded: {exc}"
                ) from None
            # A renewal half done (a new key beside the old certificate): the files that
            # last loaded keep serving; the next change of the files is tried again.
            log.warning(
                "upstream %s: TLS files cannot be loaded (%s): keeping the last good ones",
                up.name,
                exc,
            )
            ssl_key = good
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
