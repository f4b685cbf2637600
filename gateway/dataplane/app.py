"""The data plane: a plain ASGI application (no Django request/response per call).

Django is used only off the hot path, in one worker thread: to read the config version, build
snapshots and persist embedded quota counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import json
import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import formatdate
from random import getrandbits  # reseeded in each forked worker by CPython

import aiohttp

from gateway.dataplane import metrics
from gateway.dataplane.balancer import HealthChecker, TargetRegistry
from gateway.dataplane.context import ClientBodyTimeout, LocalResponse, RequestContext
from gateway.dataplane.jwt import JwksCache, JwtVerifier
from gateway.dataplane.limiter import Limiter, MemoryLimiter, RedisLimiter, redis_client
from gateway.dataplane.logship import EventBuffer, LogShipper, RedisStreamSink, SpoolSink
from gateway.dataplane.metrics import MetricsStage
from gateway.dataplane.networks import Networks, forwarded_for, strip_port
from gateway.dataplane.pipeline import Stage, completes, settle
from gateway.dataplane.problems import problem
from gateway.dataplane.resp import RespClient
from gateway.dataplane.router import MethodNotAllowed, normalize_path
from gateway.dataplane.settings import GatewaySettings, load_settings
from gateway.dataplane.snapshot import (
    ConfigSource,
    KeyEntry,
    RouteEntry,
    Snapshot,
    cache_path,
    compile_snapshot,
    load_catch_up,
    load_key_changes,
    load_keys,
    load_source,
    pickle_structure,
    read_cache,
    tls_file_stamps,
    write_cache,
)
from gateway.dataplane.stages.aggregate import AggregateHandler
from gateway.dataplane.stages.aggregate import Call as AggregateCall
from gateway.dataplane.stages.authenticate import AuthenticateStage, VerifiedKeys
from gateway.dataplane.stages.authorize import AuthorizeStage
from gateway.dataplane.stages.cache import CacheStage, MemoryStore, RedisStore
from gateway.dataplane.stages.cors import CorsStage
from gateway.dataplane.stages.ip_policy import IpPolicyStage
from gateway.dataplane.stages.jwt_auth import JwtAuthenticateStage
from gateway.dataplane.stages.limit import LimitStage
from gateway.dataplane.stages.log import LogStage
from gateway.dataplane.stages.proxy import (
    HOST_VALUE,
    ProxyHandler,
    body_too_large,
    client_body_timeout,
)
from gateway.dataplane.stages.transform import RequestTransformStage
from gateway.dataplane.stages.validate import ValidateStage
from gateway.dataplane.stages.websocket import WebSocketProxy
from gateway.dataplane.stages.websocket import deny as websocket_deny
from gateway.dataplane.upstream import UpstreamPool

log = logging.getLogger("gateway")

# An inbound X-Request-ID is kept when it looks like an id (correlation across hops); anything
# else is replaced. It never becomes the log event's id: clients must not collide events.
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:+=/-]{1,128}$")
# Stages about HTTP payloads: a WebSocket handshake skips them (its messages are relayed).
_NOT_FOR_WEBSOCKET = frozenset({"cors", "validate", "transform_request", "cache"})
RETRY_BROKEN_SECONDS = 30.0  # a snapshot that failed to compile is tried again this often
# Upstream TLS files (CA, client certificate and key) are checked this often: a renewed one
# (cert-manager, certbot, a deploy) is loaded by a rebuild, with no config change. Pooled
# connections keep the handshake they made; new ones use the new files.
TLS_FILES_CHECK_SECONDS = 5.0
# The on-disk config cache is rewritten at most this often (key deltas coalesce): a write of
# 100,000 keys costs ~0.1 s of a helper thread, and slows the event loop while it runs (it
# shares the GIL). A worker that starts without the database may miss the last 5 s of key
# changes, until the database answers.
CACHE_WRITE_INTERVAL = 5.0  # seconds
# sys.setswitchinterval of a gateway worker: when a helper thread (the database thread:
# config polls, quota counters, snapshot builds; the spool writer) runs Python, the event
# loop waits at most this long for the GIL, not CPython's default 5 ms.
SWITCH_INTERVAL = 0.0005  # seconds

_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The IMF-fixdate of now, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]


def _apply_keys(keys: dict[str, KeyEntry], changed: set[str], entries: dict) -> None:
    """A key delta, in place, between two requests (no await): a request sees each key
    before or after its change."""
    for key_id in changed:
        entry = entries.get(key_id)
        if entry is None:
            keys.pop(key_id, None)
        else:
            keys[key_id] = entry


class ThrottledLog:
    """Logs at most one message per interval and counts the ones it held back, so that a
    flood of bad requests cannot flood (and block on) the log."""

    def __init__(self, logger: logging.Logger, *, interval: float) -> None:
        self.logger = logger
        self.interval = interval
        self.suppressed = 0
        self._last = 0.0

    def report(self, message: str, ctx: RequestContext, *, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return
        self._last = now
        if self.suppressed:
            message += f" ({self.suppressed} similar messages suppressed)"
            self.suppressed = 0
        self.logger.error(message, ctx.request_id, exc_info=exc_info)


class GatewayApp:
    def __init__(self, settings: GatewaySettings | None = None) -> None:
        self.settings = settings
        self.snapshot: Snapshot | None = None
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-db")
        # Rebuilds read and compile in their own thread, so that key deltas (the DB thread)
        # keep reaching the serving snapshot while a rebuild of seconds runs; and the config
        # cache is written in a third, so that its pickling never holds up a delta either.
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-build")
        self._cache_exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-cache")
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None  # health checks, JWKS, aggregates
        self._pool: UpstreamPool | None = None  # the proxy's upstream connections
        self._redis = None
        self._resp: RespClient | None = None  # the limiter's
        self._resp_cache: RespClient | None = None  # the response cache's
        self.limiter: Limiter | None = None
        self.buffer: EventBuffer | None = None
        self.shipper: LogShipper | None = None
        self.log_stage: LogStage | None = None
        self._config_changed = asyncio.Event()
        self._errors = ThrottledLog(log, interval=1.0)
        self.metrics_stage = MetricsStage()
        self._ops_port = -1
        self._trusted_proxies = Networks(())
        self._real_ip_header = b"x-forwarded-for"
        self.targets = TargetRegistry()  # per-worker target state, kept across snapshots
        self.verified_keys = VerifiedKeys()  # keys that passed the HMAC check (authenticate)
        # JWKS key sets, kept across snapshots (so a rebuild does not refetch them): config
        # fingerprint -> cache. `_jwks_build` collects those the snapshot being built uses.
        self.jwks: dict[str, JwksCache] = {}
        self._jwks_build: dict[str, JwksCache] = {}
        self._verifiers: dict[int, JwtVerifier] = {}
        self._jwks_starts: set[asyncio.Task] = set()
        self.cache_store: MemoryStore | RedisStore | None = None  # response cache, per worker
        self._cache_purges: dict[str, float] = {}  # purged cache keys of the snapshot built
        self.health = HealthChecker(self._get_session)
        self._drops_reported = 0
        # The config (epoch, version) the serving snapshot's keys are current through; its
        # routes are those of self._source.version (older while a rebuild is due).
        self._seen: tuple[str, int] = ("", -1)
        self._source: ConfigSource | None = None  # what the serving snapshot was compiled from
        self._stale = True  # a structural change (or a start) awaits a rebuild
        self._broken_since: float | None = None  # the last rebuild failed (monotonic time)
        # Versions: the latest read, the latest structural change seen in a delta, the one a
        # build read (set by the build thread), and the one whose build failed to compile.
        self._version_now = -1
        self._structural_version = -1
        self._build_version = -1
        self._broken_version = -1
        self._from_cache = False  # serving the on-disk cache (the database was unreadable)
        self._building = False  # a rebuild is under way (in the build thread)
        self._checked_at = time.time()  # last successful read of the config version
        self._last_warning = 0.0
        self._cache_path = None  # pathlib.Path of the on-disk config cache, set at start-up
        self._cache_pending = False
        self._cache_task: asyncio.Task | None = None
        self._cache_written = 0.0
        # (source id, its structure pickled in pieces): pickled once per rebuild
        self._cache_structure: tuple[tuple, list[bytes]] | None = None
        self._counters_loaded = False
        self._profiler = None
        self._tls_stamps: dict[tuple, tuple] = {}  # upstream TLS files as last checked
        self._tls_changed_at = 0.0  # monotonic time a check last found them changed

    # --- ASGI entry ---------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.handle_http(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(receive, send)
        elif kind == "websocket":
            await self.handle_websocket(scope, receive, send)

    async def lifespan(self, receive, send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("gateway start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- start and stop -----------------------------------------------------------------
    async def startup(self) -> None:
        s = self.settings = self.settings or load_settings()
        sys.setswitchinterval(SWITCH_INTERVAL)
        self._ops_port = s.ops_port
        self._trusted_proxies = Networks(ipaddress.ip_network(n) for n in s.trusted_proxies)
        self._real_ip_header = s.real_ip_header.encode()
        connector = aiohttp.TCPConnector(
            limit=s.upstream_pool_size, limit_per_host=0, ttl_dns_cache=60, keepalive_timeout=60
        )
        self._pool = UpstreamPool(limit=s.upstream_pool_size, keepalive=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # never share cookies between consumers
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self.buffer = EventBuffer(capacity=s.log_buffer_size, batch_size=s.log_batch_size)
        self.log_stage = LogStage(buffer=self.buffer)
        if s.redis_url:
            self._redis = redis_client(s.redis_url, timeout=s.redis_timeout)
            # The limiter's one call per request and the response cache go over the lean
            # pipelined client (84 -> 12 µs of CPU per call), each on its own connection;
            # pub/sub and the log stream use redis-py.
            self._resp = RespClient(s.redis_url, timeout=s.redis_timeout)
            self.limiter = RedisLimiter(self._resp)
            self._resp_cache = RespClient(s.redis_url, timeout=s.redis_timeout)
            self.cache_store = RedisStore(self._resp_cache)
            sink = RedisStreamSink(self._redis, s.log_stream, maxlen=s.log_stream_maxlen)
        else:
            self.limiter = MemoryLimiter()
            self.cache_store = MemoryStore(s.cache_memory_bytes)
            await self._try_load_counters()
            sink = SpoolSink(s.log_spool_dir)
        self.shipper = LogShipper(self.buffer, sink, interval=s.log_flush_interval)
        self._cache_path = cache_path(s.config_cache_dir)
        await self._first_snapshot()
        self._tasks = [
            asyncio.create_task(self.shipper.run(), name="log-shipper"),
            asyncio.create_task(self._watch_config(), name="config-watch"),
        ]
        if isinstance(self.limiter, MemoryLimiter):
            self._tasks.append(asyncio.create_task(self._persist_counters(), name="counters"))
        if self._redis is not None:
            self._tasks.append(asyncio.create_task(self._listen_config(), name="config-listen"))
        self._tasks.append(asyncio.create_task(self._report_gauges(), name="gauges"))
        self._tasks.append(asyncio.create_task(self._watch_tls_files(), name="tls-files"))
        # Everything loaded so far (Django, models, the snapshot) lives as long as the worker:
        # keep it out of the cyclic GC's generations so collections stay short (no long
        # pauses in the latency tail), and collect the young generation less often.
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 20, 50)
        if os.environ.get("GATEWAY_PROFILE_FILE"):
            # bench/run.py --profile: cProfile of the event loop thread, written at shutdown.
            import cProfile

            self._profiler = cProfile.Profile()
            self._profiler.enable()

    async def shutdown(self) -> None:
        if self._profiler is not None:
            self._profiler.disable()
            self._profiler.dump_stats(f"{os.environ['GATEWAY_PROFILE_FILE']}.{os.getpid()}")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.health.stop()
        for task in self._jwks_starts:
            task.cancel()
        for cache in self.jwks.values():
            await cache.close()
        if self.shipper:
            await self.shipper.drain()
            self._set_gauges()  # the drain's losses reach the metric before the worker ends
        if isinstance(self.limiter, MemoryLimiter) and self._counters_loaded:
            try:
                await self._run_db(self._save_counters)
            except Exception as exc:
                log.warning("could not persist quota counters at shutdown: %s", exc)
        if self._session:
            await self._session.close()
        if self._pool is not None:
            await self._pool.close()
        if self._redis is not None:
            await self._redis.aclose()
        for client in (self._resp, self._resp_cache):
            if client is not None:
                await client.close()
        if self._cache_task is not None:
            self._cache_task.cancel()
        self._cache_exec.shutdown(wait=True)  # a write under way finishes (it is atomic)
        self._builder.shutdown(wait=False, cancel_futures=True)
        self._db.shutdown(wait=True)

    # --- configuration --------------------------------------------------------------------
    async def _run_db(self, fn, *args):
        def call():
            from django.db import close_old_connections

            close_old_connections()
            return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._db, call)

    async def _read_config(self, fn, *args):
        """A config read in the DB thread; a database error is counted as one."""
        from gateway.config import is_database_error

        try:
            return await self._run_db(fn, *args)
        except Exception as exc:
            if is_database_error(exc):
                metrics.CONFIG_DB_ERRORS.inc()
            raise

    async def refresh_snapshot(self) -> bool:
        """Bring the snapshot to the current config version; True if it changed.

        Key-only changes are applied to the serving snapshot as deltas, also while a rebuild
        runs (in its own thread). A rebuilt snapshot, read at one version, applies the key
        changes committed since (the change log) before it is swapped in, so a rebuild never
        delays nor loses a revocation. A rebuild that fails to compile keeps the last good
        routes serving, with every key reloaded, and is tried again on the next structural
        change or after RETRY_BROKEN_SECONDS. A database error is not a broken configuration:
        it is counted apart (CONFIG_DB_ERRORS) and the read is retried at the next poll.
        """
        changed = await self._apply_deltas()
        broken = self._broken_since is not None and (
            time.monotonic() - self._broken_since < RETRY_BROKEN_SECONDS
        )
        if broken:
            # A structural change after the version that failed may be its fix (with no
            # snapshot at all, any change: nothing is served meanwhile).
            newer = self._structural_version if self.snapshot is not None else self._version_now
            broken = newer <= self._broken_version
        if not self._stale or broken:
            return changed
        return await self._rebuild() or changed

    async def _apply_deltas(self) -> bool:
        """Read the config version; apply the key-only changes since the last one to the
        serving snapshot; note whether a rebuild is due. True if keys changed."""
        from gateway.config import config_current_stamp

        epoch, version = await self._read_config(config_current_stamp)
        self._checked_at = time.time()
        self._version_now = version
        current = self.snapshot
        seen_epoch, seen = self._seen
        if current is None or epoch != seen_epoch or version < seen:
            self._stale = True  # a first build, or a database that was reset or restored
            return False
        if version == seen:
            return False
        started = time.perf_counter()
        delta = await self._read_config(load_key_changes, seen, version)
        if self.snapshot is not current or self._seen != (seen_epoch, seen):
            return False  # swapped meanwhile (a rebuild finished): the next poll continues
        if delta is None:  # history is missing: only a rebuild catches up
            self._stale = True
            return False
        changed, entries, plans, structural = delta
        _apply_keys(current.keys, changed, entries)
        if self._source is not None:
            self._source.plans.update(plans)
        self._seen = (epoch, version)
        if structural:
            self._stale = True
            self._structural_version = version  # a new structural change: it may be the fix
        elif not self._stale:
            self.snapshot = dataclasses.replace(current, version=version)
        self._cache_later()
        log.info(
            "config v%s: %d keys changed in %.1f ms (delta%s)",
            version,
            len(changed),
            (time.perf_counter() - started) * 1000,
            ", a rebuild is due" if structural else "",
        )
        return True

    async def _rebuild(self) -> bool:
        """Read and compile a new snapshot in the build thread; meanwhile keep applying key
        deltas to the serving one; then catch the new one up and swap it in."""

        loop = asyncio.get_running_loop()
        started = time.monotonic()
        build = loop.run_in_executor(self._builder, self._in_thread, self._build)
        interval = self.settings.config_poll_interval
        self._building = True
        try:
            return await self._finish_rebuild(build, interval, started)
        finally:
            self._building = False

    async def _finish_rebuild(self, build: asyncio.Future, interval: float, started: float) -> bool:
        from gateway.config import is_database_error

        while not build.done():
            changed = asyncio.ensure_future(self._config_changed.wait())
            await asyncio.wait({build, changed}, timeout=interval, return_when="FIRST_COMPLETED")
            changed.cancel()
            if build.done():
                break
            self._config_changed.clear()
            try:
                await self._apply_deltas()
            except Exception as exc:
                self._warn_refresh(exc)
        try:
            snapshot, source = build.result()
        except Exception as exc:
            if is_database_error(exc):
                metrics.CONFIG_DB_ERRORS.inc()
                raise  # not broken: the next poll builds again
            metrics.SNAPSHOT_FAILURES.inc()
            self._broken_since = time.monotonic()
            self._broken_version = self._build_version
            current = self.snapshot
            if current is not None:
                # The structural change may have changed keys too (a plan, a user): a
                # revocation must not wait for someone to fix a route.
                with contextlib.suppress(Exception):
                    fresh = await self._read_config(load_keys, None)
                    # Never empty, not even for the cache thread's copy: add, then drop.
                    gone = current.keys.keys() - fresh.keys()
                    current.keys.update(fresh)
                    for key_id in gone:
                        current.keys.pop(key_id, None)
            raise
        # Catch up: the key changes committed after the version the rebuild read.
        epoch, version, delta = await self._read_config(load_catch_up, source.version)
        if epoch != source.epoch or delta is None:
            self._stale = True  # the database moved under the build: build again
            return False
        changed, entries, plans, structural = delta
        _apply_keys(snapshot.keys, changed, entries)
        source.plans.update(plans)
        if not structural and version != snapshot.version:
            snapshot = dataclasses.replace(snapshot, version=version)
        self.snapshot = snapshot  # one attribute store: requests see old or new, never a mix
        self._source = source
        self.verified_keys.clear()  # its entries are the old snapshot's: let them go
        self._seen = (epoch, version)
        # Another structural change came, or TLS files changed after this build began (it
        # may have read the old ones): build again next poll.
        self._stale = structural or self._tls_changed_at > started
        self._broken_since = None
        if self._from_cache:
            self._from_cache = False
            log.warning("config v%s read from the database: no longer serving the cache", version)
        self.health.sync(snapshot.upstreams)
        await self._sync_jwks()
        self._cache_later()
        log.info(
            "config v%s: %d routes, %d keys, built in %.1f ms (+%d keys caught up)",
            version,
            len(snapshot.router),
            len(snapshot.keys),
            snapshot.build_seconds * 1000,
            len(changed),
        )
        return True

    def _in_thread(self, fn, *args):
        from django.db import close_old_connections

        close_old_connections()
        return fn(*args)

    def _build(self) -> tuple[Snapshot, ConfigSource]:
        """Read at one version, then compile (build thread). A 10,000-route compile must not
        stop the event loop (it only shares the GIL with it). Builds are serial (one thread),
        so the target registry is never compiled into twice at once."""
        source = load_source()
        self._build_version = source.version
        if self.settings.snapshot_build_delay:
            time.sleep(self.settings.snapshot_build_delay)  # testing aid, off by default
        return self._compile(source), source

    def _compile(self, source: ConfigSource) -> Snapshot:
        self._jwks_build = {}
        self._verifiers = {}
        self._cache_purges = source.cache_purges
        return compile_snapshot(
            source.version,
            source.apis,
            source.keys,
            self._compile_route,
            epoch=source.epoch,
            default_max_body=self.settings.max_body_bytes,
            targets=self.targets,
            identities=source.identities,
            upstream_models=source.upstreams,
        )

    def _warn_refresh(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning("config refresh failed, serving the last snapshot: %s", exc)

    # --- the first snapshot, and the on-disk cache of the last good one -------------------
    async def _first_snapshot(self) -> None:
        """Start-up: build from the database; if it cannot be read (or the configuration
        does not compile), serve the cached last good configuration; with neither, start
        anyway and answer 503 until a configuration arrives. A worker never fails its
        start-up over the database: gunicorn would shut the whole node down."""
        from gateway.config import is_database_error

        try:
            await self.refresh_snapshot()
        except Exception as exc:
            if is_database_error(exc):
                log.warning("the database cannot be read at start-up: %s", exc)
            else:
                log.error("the configuration could not be built at start-up", exc_info=True)
        if self.snapshot is not None:
            return
        loaded = None
        if self._cache_path is not None:
            try:
                loaded = await asyncio.get_running_loop().run_in_executor(
                    self._builder, self._load_cache
                )
            except Exception:
                log.exception("the config cache %s cannot be used", self._cache_path)
        if loaded is None:
            log.warning(
                "no configuration (no database, no cache at %s): answering 503 until the "
                "database can be read",
                self._cache_path,
            )
            return
        snapshot, source, stamp = loaded
        self.snapshot = snapshot
        self._source = source
        self._seen = (source.epoch, source.version)
        self._stale = True  # replaced by a rebuild as soon as the database answers
        self._from_cache = True
        self.health.sync(snapshot.upstreams)
        await self._sync_jwks()
        log.warning(
            "SERVING THE CACHED CONFIGURATION v%s (written %.0f s ago, %d routes, %d keys) "
            "from %s: the database cannot be read; polling it",
            source.version,
            time.time() - stamp["written_at"],
            len(snapshot.router),
            len(snapshot.keys),
            self._cache_path,
        )

    def _load_cache(self):
        loaded = read_cache(self._cache_path)
        if loaded is None:
            return None
        source, stamp = loaded
        return self._compile(source), source, stamp

    def _cache_later(self) -> None:
        """Persist the serving configuration soon (coalesced, off the loop)."""
        if self._cache_path is None:
            return
        self._cache_pending = True
        if self._cache_task is None or self._cache_task.done():
            self._cache_task = asyncio.get_running_loop().create_task(
                self._cache_writer(), name="config-cache"
            )

    async def _cache_writer(self) -> None:
        loop = asyncio.get_running_loop()
        while self._cache_pending:
            wait = self._cache_written + CACHE_WRITE_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._cache_pending = False
            snapshot, source = self.snapshot, self._source
            if snapshot is None or source is None or self._from_cache:
                return
            job = (source, snapshot.keys, self._seen)
            try:
                await loop.run_in_executor(self._cache_exec, self._write_cache, *job)
            except Exception:
                log.exception("could not write the config cache %s", self._cache_path)
            self._cache_written = time.monotonic()

    def _write_cache(self, source: ConfigSource, keys: dict, seen: tuple[str, int]) -> None:
        started = time.perf_counter()
        ident = (source.epoch, source.version, id(source))
        if self._cache_structure is None or self._cache_structure[0] != ident:
            self._cache_structure = (ident, pickle_structure(source))
            # The rows were kept for this only: the pieces stand for them from now on (the
            # snapshot compiled from them holds what it needs), and they are half of a
            # worker's memory with 10,000 routes.
            source.apis = []
        wrote = write_cache(
            self._cache_path,
            epoch=seen[0],
            version=seen[1],
            source=source,
            structure=self._cache_structure[1],
            keys=keys.copy(),  # one C call: a delta on the loop cannot interleave
        )
        if wrote:
            took = time.perf_counter() - started
            metrics.CONFIG_CACHE_WRITE.set(took)
            log.debug("config cache v%s written in %.1f ms", seen[1], took * 1000)

    def _compile_route(
        self, route: RouteEntry, keys: dict[str, KeyEntry], identities: dict | None = None
    ) -> None:
        assert self.settings is not None and self.limiter is not None
        # Only the stages a route uses are in its pipeline, in DESIGN.md's order.
        stages: list = []
        policies = route.policies
        if "cors" in policies:  # before anything that could refuse a preflight
            stages.append(CorsStage(policies["cors"]))
        if route.ip_allow or route.ip_deny:
            stages.append(
                IpPolicyStage(allow=route.ip_allow, deny=route.ip_deny, api_slug=route.api_slug)
            )
        if not route.anonymous:  # a public route has no key stages at all
            stages.extend(self._key_stages(route, keys, identities or {}))
        elif route.route_rates:  # per-client-IP limits of a public route
            stages.append(self._limit_stage(route))
        if "validate" in policies:
            stages.append(
                ValidateStage(
                    policies["validate"],
                    validator=route.openapi,
                    doc_prefix=route.doc_prefix,
                    api_slug=route.api_slug,
                )
            )
        request_transform = policies.get("request_transform")
        if request_transform is not None and (request_transform.query or request_transform.json):
            stages.append(RequestTransformStage(request_transform))
        if "cache" in policies:
            stages.append(
                CacheStage(
                    policies["cache"],
                    store=self.cache_store,
                    api_id=route.api_id,
                    route_id=route.id,
                    generation=route.cache_generation,
                    purged=self._cache_purges,
                )
            )
        route.stages = stages
        route.completing = tuple(s for s in stages if completes(s))
        if route.aggregate is not None:
            partial, calls = route.aggregate
            params = route.param_names or tuple(route.regex.groupindex if route.regex else ())
            route.handler = AggregateHandler(
                calls=[AggregateCall(spec, up) for spec, up in calls],
                partial=partial,
                session_getter=self._get_session,
                params=params,
            )
            return
        route.handler = http = ProxyHandler(
            request_headers=request_transform.headers if request_transform else None,
            response=policies.get("response_transform"),
            cors="cors" in policies,
            pool_getter=self._get_pool,
            key_header=route.key_header,
            preserve_host=route.preserve_host,
            forward_credential=route.forward_credential,
            key_query_param=route.key_query_param,
        )
        if "websocket" in policies:
            route.websocket = WebSocketProxy(
                config=policies["websocket"], http=http, session_getter=self._get_session
            )

    def _key_stages(self, route: RouteEntry, keys: dict[str, KeyEntry], identities) -> list:
        s = self.settings
        authenticate: Stage = AuthenticateStage(
            key_header=route.key_header,
            header_label=route.key_header_label,
            keys=keys,
            secret=s.key_hmac_secret,
            query_param=route.key_query_param,
            verified=self.verified_keys,
        )
        if route.auth_methods != "key":
            authenticate = JwtAuthenticateStage(
                verifier=self._verifier(route),
                identities=identities,
                api_id=route.api_id,
                keys=authenticate if route.auth_methods == "any" else None,
            )
        return [
            authenticate,
            AuthorizeStage(
                api_id=route.api_id,
                api_slug=route.api_slug,
                plans=route.plans,
                required_scopes=route.required_scopes,
            ),
            self._limit_stage(route),
        ]

    def _limit_stage(self, route: RouteEntry) -> LimitStage:
        return LimitStage(
            limiter=self.limiter,
            fail_closed=route.fail_closed,
            route_rates=route.route_rates,
            overrides=route.rate_overrides,
        )

    def _verifier(self, route: RouteEntry) -> JwtVerifier:
        """One verifier per API (its token cache is shared by the API's routes)."""
        verifier = self._verifiers.get(route.api_id)
        if verifier is None:
            providers = []
            for config in route.jwt_issuers:
                fingerprint = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
                cache = self.jwks.get(fingerprint) or self._jwks_build.get(fingerprint)
                if cache is None:
                    cache = JwksCache(config, session_factory=self._get_session)
                self._jwks_build[fingerprint] = cache
                providers.append((config, cache))
            verifier = self._verifiers[route.api_id] = JwtVerifier(providers)
        return verifier

    async def _sync_jwks(self) -> None:
        """After a swap: start the key sets the new snapshot brought, stop those it dropped."""
        wanted, self._jwks_build = self._jwks_build, {}
        for fingerprint, cache in wanted.items():
            if fingerprint not in self.jwks:
                # Not awaited: a slow JWKS server must not hold up config changes. A token
                # that comes before the first fetch ends joins it (refetch_for_unknown_kid).
                task = asyncio.create_task(cache.start(), name="jwks-start")
                self._jwks_starts.add(task)
                task.add_done_callback(self._jwks_starts.discard)
        for fingerprint, cache in self.jwks.items():
            if fingerprint not in wanted:
                await cache.close()
        self.jwks = wanted

    def _get_session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    def _get_pool(self) -> UpstreamPool:
        assert self._pool is not None
        return self._pool

    async def _watch_config(self) -> None:
        interval = self.settings.config_poll_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._config_changed.wait(), interval)
            self._config_changed.clear()
            try:
                await self.refresh_snapshot()
            except Exception as exc:  # keep serving the last snapshot
                self._warn_refresh(exc)

    async def _watch_tls_files(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TLS_FILES_CHECK_SECONDS)
            try:
                await self.check_tls_files(loop)
            except Exception as exc:  # never let the watch die
                log.warning("upstream TLS file check failed: %s", exc)

    async def check_tls_files(self, loop=None) -> bool:
        """Rebuild if an upstream's TLS files changed since the serving snapshot loaded them
        (and since the last check: a renewal that failed to load, say a certificate already
        replaced but not yet its key, is retried when the files change again, or after
        RETRY_BROKEN_SECONDS). True if a rebuild was asked for."""
        snapshot = self.snapshot
        if snapshot is None or not any(up.ssl_key for up in snapshot.upstreams):
            return False
        loop = loop or asyncio.get_running_loop()
        now = await loop.run_in_executor(None, tls_file_stamps, snapshot.upstreams)
        if self.snapshot is not snapshot:
            return False  # swapped meanwhile: the next check compares with the new one
        last, self._tls_stamps = self._tls_stamps, now
        changed = [
            key
            for key, stamps in now.items()
            if stamps != key[-1]
            and None not in (st for f, st in zip(key[1:4], stamps, strict=True) if f)
        ]
        fresh = [key for key in changed if last.get(key) != now[key]]
        if not fresh:
            return False
        names = sorted({up.name for up in snapshot.upstreams if up.ssl_key in fresh})
        log.warning("upstream TLS files changed (%s): rebuilding", ", ".join(names))
        # A rebuild under way may have read the files before they changed: it is followed
        # by another (see _finish_rebuild).
        self._tls_changed_at = time.monotonic()
        self._stale = True
        self._broken_since = None  # new files may be what a failed build lacked
        self._config_changed.set()
        return True

    async def _listen_config(self) -> None:
        """With Redis, config bumps arrive by pub/sub: workers converge in milliseconds."""
        from gateway.config import CONFIG_CHANNEL

        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(CONFIG_CHANNEL)
                self._config_changed.set()  # catch up on anything missed while away
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30)
                    if msg is not None:
                        self._config_changed.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: polling still converges; retry later
                log.debug("config subscription lost: %s", exc)
                await asyncio.sleep(1)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # --- operations: metrics, health, readiness ------------------------------------------
    async def _report_gauges(self) -> None:
        while True:
            self._set_gauges()
            await asyncio.sleep(1.0)

    def _set_gauges(self) -> None:
        self.metrics_stage.flush()
        buffer = self.buffer
        if buffer is not None:
            metrics.LOG_BUFFER.set(len(buffer))
            new_drops = buffer.dropped - self._drops_reported
            if new_drops > 0:
                metrics.LOG_DROPPED.inc(new_drops)
                self._drops_reported = buffer.dropped
        metrics.LIMITER_STORE_ERRORS.set(getattr(self.limiter, "store_errors", 0))
        metrics.CONFIG_CHECK_AGE.set(round(time.time() - self._checked_at, 3))
        metrics.CONFIG_FROM_CACHE.set(1 if self._from_cache else 0)
        if self.snapshot is not None:
            metrics.CONFIG_VERSION.set(self.snapshot.version)
            metrics.SNAPSHOT_BUILD.set(self.snapshot.build_seconds)
            metrics.report_targets(self.snapshot.upstreams)

    async def handle_ops(self, scope, send) -> None:
        """The operations listener: never routed, never logged as traffic."""
        path = scope["path"]
        status, ctype = 200, b"application/json"
        if path == "/metrics":
            self._set_gauges()
            body = await asyncio.get_running_loop().run_in_executor(None, metrics.render)
            ctype = b"text/plain; version=0.0.4; charset=utf-8"
        elif path == "/healthz":
            body = b'{"status":"ok"}'
        elif path == "/readyz":
            snap = self.snapshot
            if snap is None:
                status, body = 503, b'{"status":"no configuration loaded"}'
            else:
                body = json.dumps(
                    {
                        "status": "ready",
                        "config_version": snap.version,
                        "config_source": "cache" if self._from_cache else "database",
                        "snapshot_age_seconds": round(time.time() - snap.built_at, 3),
                        "config_check_age_seconds": round(time.time() - self._checked_at, 3),
                        "rebuilding": self._building,
                        "routes": len(snap.router),
                        "keys": len(snap.keys),
                    }
                ).encode()
        else:
            status, body = 404, b'{"status":"not found: /metrics, /healthz, /readyz"}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", ctype),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    # --- embedded quota counters ------------------------------------------------------------
    def _load_counters(self) -> None:
        from portal.models import QuotaCounter

        since = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        rows = QuotaCounter.objects.filter(period_start__gte=since).values_list(
            "subscription_id", "period_start", "used"
        )
        assert isinstance(self.limiter, MemoryLimiter)
        self.limiter.load([(f"sub:{s}", p.timestamp(), u) for s, p, u in rows])

    def _save_counters(self) -> None:
        from portal.models import QuotaCounter, Subscription

        assert isinstance(self.limiter, MemoryLimiter)
        # Quota subjects are "sub:<subscription id>" (snapshot.load_config).
        dirty = [
            (int(subject[4:]), start, used) for subject, start, used in self.limiter.take_dirty()
        ]
        if not dirty:
            return
        existing = set(
            Subscription.objects.filter(pk__in={s for s, _, _ in dirty}).values_list(
                "pk", flat=True
            )
        )
        rows = [
            QuotaCounter(
                subscription_id=sub_id,
                period_start=datetime.fromtimestamp(start, UTC),
                used=used,
            )
            for sub_id, start, used in dirty
            if sub_id in existing
        ]
        QuotaCounter.objects.bulk_create(
            rows,
            update_conflicts=True,
            unique_fields=["subscription", "period_start"],
            update_fields=["used", "updated_at"],
        )

    async def _try_load_counters(self) -> bool:
        """Load the persisted quota counters; without the database, later (until they are
        loaded, none are saved: a save would overwrite them with this worker's counts)."""
        try:
            await self._run_db(self._load_counters)
        except Exception as exc:
            now = time.monotonic()
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning("could not load quota counters (loaded when it can): %s", exc)
            return False
        self._counters_loaded = True
        return True

    async def _persist_counters(self) -> None:
        from gateway.config import is_database_error

        last_warning = 0.0
        while True:
            await asyncio.sleep(self.settings.counter_flush_interval)
            if not self._counters_loaded and not await self._try_load_counters():
                continue
            try:
                await self._run_db(self._save_counters)
            except Exception as exc:
                now = time.monotonic()
                if not is_database_error(exc):
                    log.exception("could not persist quota counters")
                elif now - last_warning > 10:  # the database is away: once in a while
                    last_warning = now
                    log.warning("could not persist quota counters: %s", exc)

    # --- the hot path -----------------------------------------------------------------------
    async def handle_http(self, scope, receive, send) -> None:
        server = scope.get("server")
        if server is not None and server[1] == self._ops_port:
            await self.handle_ops(scope, send)
            return
        ctx = self._new_context(scope, receive, send, scope["method"])
        try:
            response = await self._dispatch(ctx)
            if response is not None and not ctx.client_gone:
                await self._send_local(ctx, response)
        except asyncio.CancelledError:
            if not ctx.client_gone:
                raise  # a real cancellation (shutdown): let it through
            asyncio.current_task().uncancel()  # we cancelled ourselves: the client left
        except ClientBodyTimeout:
            # A stage that reads the body (validation, transformation) waited in vain: the
            # client's fault, 408 as the proxy answers it (or the connection cut, if late).
            ctx.error_kind = "client_body_timeout"
            if not ctx.response_started and not ctx.client_gone:
                await self._send_local(ctx, client_body_timeout(ctx))
        except Exception:
            if ctx.client_gone:
                pass  # the failure is the disconnect itself: no gateway error
            elif ctx.response_started:
                ctx.error_kind = ctx.error_kind or "internal"
                self._errors.report("request %s aborted after the response started", ctx)
            else:
                ctx.error_kind = "internal"
                self._errors.report("request %s failed", ctx, exc_info=True)
                await self._send_local(
                    ctx, problem("internal", "Unexpected error.", request_id=ctx.request_id)
                )
        finally:
            self._complete(ctx)

    async def handle_websocket(self, scope, receive, send) -> None:
        """A WebSocket handshake: the route's stages, then the relay (stages/websocket.py)."""
        ctx = self._new_context(scope, receive, send, "GET")
        try:
            response = await self._dispatch(ctx, websocket=True)
            if response is not None:
                await websocket_deny(ctx, response)
        except asyncio.CancelledError:
            raise
        except Exception:
            ctx.error_kind = ctx.error_kind or "internal"
            self._errors.report("websocket %s failed", ctx, exc_info=True)
            if not ctx.response_started:
                with contextlib.suppress(Exception):
                    await websocket_deny(
                        ctx, problem("internal", "Unexpected error.", request_id=ctx.request_id)
                    )
        finally:
            self._complete(ctx)

    def _complete(self, ctx: RequestContext) -> None:
        """After the client has its answer: the stages' completion hooks, log, metrics."""
        if ctx.client_gone:
            # As nginx logs it: the client closed the connection before the full answer.
            ctx.status = 499
            ctx.error_kind = "client_disconnected"
        elif ctx.status == 0:
            ctx.status = 499
        route = ctx.route
        if route is not None:
            for stage in route.completing:
                stage.on_complete(ctx)
        if self.log_stage is not None:
            self.log_stage.on_complete(ctx)
        self.metrics_stage.on_complete(ctx)

    def _new_context(self, scope, receive, send, method: str) -> RequestContext:
        """The request's context: its ids, the client (behind trusted proxies), Host checks."""
        client = scope.get("client")
        peer = client[0] if client else ""
        event_id = f"{getrandbits(128):032x}"
        ctx = RequestContext(
            scope=scope,
            receive=receive,
            send=send,
            request_id=event_id,
            method=method,
            path=scope["path"],
            client_ip=peer,
            event_id=event_id,
            peer_ip=peer,
        )
        hosts = 0
        for k, v in scope["headers"]:
            if k == b"host":
                # Routing reads one Host, forwarding another, if there are two (RFC 9112
                # §3.2: 400); an odd one could break out of Forwarded's quoted host.
                hosts += 1
                if hosts > 1 or not HOST_VALUE.match(v):
                    ctx.bad_host = True
            elif k == b"x-request-id" and ctx.request_id_generated and _REQUEST_ID.match(v):
                ctx.request_id = v.decode()
                ctx.request_id_generated = False
        if self._trusted_proxies and self._is_trusted(peer):
            ctx.trusted_peer = True
            ctx.client_ip = self._forwarded_client(scope["headers"]) or peer
        return ctx

    async def _dispatch(
        self, ctx: RequestContext, *, websocket: bool = False
    ) -> LocalResponse | None:
        snapshot = self.snapshot
        if snapshot is None:
            return problem("not-ready", "No configuration loaded yet.", request_id=ctx.request_id)
        if ctx.bad_host:
            return problem(
                "bad-request", "Send exactly one valid Host header.", request_id=ctx.request_id
            )
        path = normalize_path(ctx.path)
        if path is None:
            return problem("bad-request", "Malformed request path.", request_id=ctx.request_id)
        ctx.path = path
        scope = ctx.scope
        matched = snapshot.router.match(
            ctx.method, path, scope["headers"], scope.get("query_string", b"")
        )
        if matched is None:
            return problem("not-found", f"No API is served at {path}.", request_id=ctx.request_id)
        if isinstance(matched, MethodNotAllowed) and ctx.method == "OPTIONS":
            # A CORS preflight asks about the method it will send: the route serving that
            # method answers it (its CORS stage comes first), even if it takes no OPTIONS.
            wanted = ctx.header(b"access-control-request-method")
            if wanted is not None and ctx.header(b"origin") is not None:
                again = snapshot.router.match(
                    wanted.decode("latin-1").strip().upper(),
                    path,
                    scope["headers"],
                    scope.get("query_string", b""),
                )
                if isinstance(again, tuple) and "cors" in again[0].policies:
                    matched = again
        if isinstance(matched, MethodNotAllowed):
            return problem(
                "method-not-allowed",
                f"{ctx.method} is not allowed here.",
                request_id=ctx.request_id,
                headers=[(b"allow", ", ".join(sorted(matched.allowed)).encode())],
            )
        route, ctx.path_params = matched
        ctx.route = route
        if route.extra_headers:
            ctx.response_headers.extend(route.extra_headers)
        if route.max_body:
            length = ctx.header(b"content-length")
            if length is not None and length.isdigit() and int(length) > route.max_body:
                ctx.error_kind = "body_too_large"
                return body_too_large(ctx)  # refused before a byte of it is read
        if websocket:
            return await self._dispatch_websocket(ctx, route)
        for stage in route.stages:
            response = stage.on_request(ctx)
            if response is not None:
                if type(response) is not LocalResponse:  # the stage has to wait
                    response = await response
                    if response is None:
                        continue
                return response
        return await route.handler.handle(ctx)

    async def _dispatch_websocket(self, ctx: RequestContext, route) -> LocalResponse | None:
        if route.websocket is None:
            return problem(
                "bad-request",
                "This route does not take WebSocket connections.",
                request_id=ctx.request_id,
            )
        for stage in route.stages:
            if stage.name in _NOT_FOR_WEBSOCKET:
                continue
            response = await settle(stage.on_request(ctx))
            if response is not None:
                return response
        await route.websocket.serve(ctx)
        return None

    # --- who the client is ---------------------------------------------------------------------
    def _is_trusted(self, ip: str) -> bool:
        """Is this peer one of GATEWAY_TRUSTED_PROXIES?"""
        return self._trusted_proxies.lookup(ip) is True

    def _forwarded_client(self, headers) -> str:
        """The client a chain of trusted proxies forwarded for: the rightmost address of
        the real-IP header (X-Forwarded-For, or Forwarded's for=) that is not itself a trusted
        proxy (the ones left of it could be forged). Only that header is read: the other one
        is whatever the client sent, passed on by its proxy."""
        chain: list[str] = []
        wanted = self._real_ip_header
        for k, v in headers:
            if k == wanted:
                if wanted == b"forwarded":
                    chain.extend(forwarded_for(v.decode("latin-1")))
                else:
                    chain.extend(strip_port(p.strip()) for p in v.decode("latin-1").split(","))
        for hop in reversed(chain):
            if not hop:
                continue
            trusted = self._trusted_proxies.lookup(hop)
            if trusted is None:
                return ""  # garbage in the chain: fall back to the peer
            if not trusted:
                return hop
        return chain[0] if chain else ""

    async def _send_local(self, ctx: RequestContext, response: LocalResponse) -> None:
        headers = [
            *response.headers,
            (b"date", http_date()),
            (b"x-request-id", ctx.request_id.encode()),
        ]
        if response.status != 304:  # a 304's length would have to be the 200's (RFC 9110)
            headers.append((b"content-length", str(len(response.body)).encode()))
        # What stages added (CORS, version deprecation, the limits of an admitted request): a
        # browser reads a gateway error only with its CORS headers. A 429's limit headers are
        # its own (the limit stage adds them to ctx only when it admits).
        headers.extend(ctx.response_headers)
        ctx.status = response.status
        ctx.response_started = True
        ctx.bytes_out += len(response.body)
        await ctx.send(
            {"type": "http.response.start", "status": response.status, "headers": headers}
        )
        await ctx.send({"type": "http.response.body", "body": response.body})
