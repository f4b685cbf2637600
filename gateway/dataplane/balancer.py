"""Load balancing, health and circuit breaking, per gateway worker.

A TargetState outlives snapshots (the app keeps one per upstream target and hands the same
object to every snapshot that still has the target), so health, an open circuit, the number
of requests in flight and the round-robin position survive a config change. Nothing here is
shared between workers: each one probes and ejects on what it sees (as Envoy does).

Circuit breaker (passive checks): `eject_after` consecutive failures (connection refused or
reset, timeout, 502/503/504) open the circuit for `eject_seconds`; then one trial request is
let through (half-open): success closes it, failure opens it again.

Active checks (HealthChecker): `unhealthy_threshold` failed probes in a row take a target out,
`healthy_threshold` passing ones bring it back.

Weight 0 takes no new traffic in every algorithm (Kong's semantics: a target being drained).

The retry budget (Envoy's): retries in flight may be at most `retry_budget` × requests in
flight, but never fewer than 3 (Envoy's min_retry_concurrency), so `retry_budget=0` still
allows 3 concurrent retries per worker and upstream; a route's `retries=0` turns retries off.
Its counters live in a RetryBudget per upstream that, like TargetState, outlives snapshots.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import random
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from gateway.dataplane.context import RequestContext

log = logging.getLogger("gateway.health")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RETRY_STATUSES = frozenset({502, 503, 504})
_RING_POINTS = 100  # virtual nodes per 100 of weight on the consistent-hash ring


class TargetState:
    """One upstream target as this worker sees it."""

    __slots__ = (
        "host",
        "port",
        "base_url",
        "scheme",
        "weight",
        "healthy",
        "probes_ok",
        "probes_failed",
        "failures",
        "open_until",
        "trial",
        "active",
        "current",
        "budget",
    )

    def __init__(
        self, host: str, port: int, base_url: str, weight: int, budget: RetryBudget | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.base_url = base_url
        self.scheme = base_url.partition(":")[0]  # "http" | "https"
        self.weight = weight
        self.healthy = True  # by active checks; optimistic until a probe says otherwise
        self.probes_ok = 0
        self.probes_failed = 0
        self.failures = 0  # consecutive passive failures
        self.open_until = 0.0  # circuit open until (monotonic); 0: closed
        self.trial = False  # a half-open trial request is in flight
        self.active = 0  # requests in flight (least connections)
        self.current = 0  # smooth weighted round robin
        self.budget = budget  # its upstream's retry budget (shared by the upstream's targets)

    def __repr__(self) -> str:
        return f"<target {self.host}:{self.port}>"

    def available(self, now: float) -> bool:
        """May a request go here now? (Weighted, healthy, and the circuit closed or ready for
        a trial.)"""
        if not self.healthy or self.weight <= 0:
            return False
        return not self.open_until or (now >= self.open_until and not self.trial)

    @property
    def circuit(self) -> str:
        if not self.open_until:
            return "closed"
        return "half-open" if self.trial or time.monotonic() >= self.open_until else "open"


@dataclass(frozen=True, slots=True)
class HealthConfig:
    path: str
    interval: float
    timeout: float
    statuses: frozenset[int]
    healthy_threshold: int
    unhealthy_threshold: int


def ssl_context(
    *, verify: bool, ca_file: str, client_cert: str, client_key: str
) -> ssl.SSLContext | bool:
    """The TLS settings of an https upstream, for aiohttp's `ssl=` argument."""
    if not verify and not client_cert:
        return False  # aiohttp: no verification
    context = ssl.create_default_context(cafile=ca_file or None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert:
        context.load_cert_chain(client_cert, client_key or None)
    return context


class RetryBudget:
    """An upstream's requests and retries in flight in this worker (see Balancer.may_retry)."""

    __slots__ = ("in_flight", "retries_in_flight")

    def __init__(self) -> None:
        self.in_flight = 0
        self.retries_in_flight = 0


class TargetRegistry:
    """The worker's TargetStates, retry budgets (and TLS contexts), reused by every snapshot
    that keeps them."""

    def __init__(self) -> None:
        self._targets: dict[tuple, TargetState] = {}
        self._budgets: dict[int, RetryBudget] = {}
        self._ssl: dict[tuple, ssl.SSLContext | bool] = {}
        self._seen: set[tuple] = set()
        self._ssl_seen: set[tuple] = set()
        self._ssl_good: dict[tuple, tuple] = {}  # setting -> key of its last loaded context

    def target(self, upstream_id: int, scheme: str, host: str, port: int, weight: int):
        key = (upstream_id, scheme, host, port)
        self._seen.add(key)
        state = self._targets.get(key)
        if state is None:
            netloc = f"[{host}]" if ":" in host else host
            state = self._targets[key] = TargetState(
                host, port, f"{scheme}://{netloc}:{port}", weight, self.budget(upstream_id)
            )
        state.weight = weight
        return state

    def budget(self, upstream_id: int) -> RetryBudget:
        """The upstream's retry budget: one per upstream, kept across snapshots (a Balancer
        built over the upstream's targets takes theirs)."""
        budget = self._budgets.get(upstream_id)
        if budget is None:
            budget = self._budgets[upstream_id] = RetryBudget()
        return budget

    def ssl(self, key: tuple) -> ssl.SSLContext | bool:
        """A TLS context per distinct setting (key: verify, ca file, cert, key, and the files'
        stamps, so that a renewed certificate is loaded), built once."""
        self._ssl_seen.add(key)
        if key not in self._ssl:
            verify, ca_file, client_cert, client_key, _stamps = key
            self._ssl[key] = ssl_context(
                verify=verify, ca_file=ca_file, client_cert=client_cert, client_key=client_key
            )
            self._ssl_good[key[:4]] = key
        return self._ssl[key]

    def last_good_ssl(self, setting: tuple) -> tuple | None:
        """The key of the last context that loaded for this setting (verify and the three
        paths), whatever the files' stamps: what keeps serving while a renewal is half done
        (a new key beside the old certificate) or a file is briefly missing."""
        key = self._ssl_good.get(setting)
        return key if key in self._ssl else None

    def begin_build(self) -> None:
        self._seen = set()
        self._ssl_seen = set()

    def end_build(self) -> None:
        """Forget targets the new snapshot no longer has (their state goes with them)."""
        for key in list(self._targets):
            if key not in self._seen:
                del self._targets[key]
        for key in list(self._ssl):  # contexts of replaced files (or settings) go too
            if key not in self._ssl_seen:
                del self._ssl[key]
        for setting, key in list(self._ssl_good.items()):
            if key not in self._ssl:
                del self._ssl_good[setting]
        kept = {key[0] for key in self._seen}
        for upstream_id in list(self._budgets):
            if upstream_id not in kept:
                del self._budgets[upstream_id]


class Balancer:
    """Chooses a target for each try of a request, and keeps the retry budget."""

    def __init__(
        self,
        targets: tuple[TargetState, ...],
        *,
        algorithm: str = "round_robin",
        hash_on: str = "consumer",
        hash_header: str = "",
        eject_after: int = 5,
        eject_seconds: float = 10.0,
        retry_budget: float = 0.2,
        budget: RetryBudget | None = None,
    ) -> None:
        self.targets = targets
        self.algorithm = algorithm
        self.hash_on = hash_on
        self.hash_header = hash_header.lower().encode()
        self.eject_after = eject_after
        self.eject_seconds = eject_seconds
        self.retry_budget = retry_budget
        # The counters outlive this Balancer (rebuilt with every snapshot): its targets carry
        # their upstream's RetryBudget from the TargetRegistry.
        if budget is None:
            budget = next((t.budget for t in targets if t.budget is not None), None)
        self.budget = budget if budget is not None else RetryBudget()
        self._tie = 0
        self._ring: list[int] = []
        self._ring_targets: list[TargetState] = []
        if algorithm == "consistent_hash":
            points = []
            for t in targets:
                if t.weight <= 0:
                    continue  # weight 0: no traffic, so no place on the ring
                for i in range(max(1, t.weight * _RING_POINTS // 100)):
                    points.append((_hash(f"{t.host}:{t.port}#{i}".encode()), t))
            points.sort(key=lambda p: p[0])
            self._ring = [p[0] for p in points]
            self._ring_targets = [p[1] for p in points]

    # --- choosing ---------------------------------------------------------------------------
    def pick(self, ctx: RequestContext, tried: list[TargetState]) -> TargetState | None:
        """A target for the next try, avoiding those already tried when another is usable."""
        now = time.monotonic()
        targets = self.targets
        if len(targets) == 1:
            t = targets[0]
            chosen = t if t.available(now) else None
        else:
            usable = [t for t in targets if t.available(now) and t not in tried]
            if not usable:
                usable = [t for t in targets if t.available(now)]
            if not usable:
                return None
            if self.algorithm == "least_connections":
                chosen = self._least_connections(usable)
            elif self.algorithm == "consistent_hash":
                chosen = self._by_hash(ctx, usable)
            else:
                chosen = self._round_robin(usable)
        if chosen is not None and chosen.open_until:
            chosen.trial = True  # the one half-open trial
        return chosen

    def _round_robin(self, usable: list[TargetState]) -> TargetState:
        # nginx's smooth weighted round robin: equal weights give plain rotation, unequal
        # ones interleave (5,1,1 → a a b a c a a) instead of bursts.
        total = 0
        best = None
        for t in usable:
            t.current += t.weight
            total += t.weight
            if best is None or t.current > best.current:
                best = t
        best.current -= total
        return best

    def _least_connections(self, usable: list[TargetState]) -> TargetState:
        self._tie += 1
        n = len(usable)
        start = self._tie % n  # rotate among equals so ties spread
        best = None
        best_load = 0.0
        for i in range(n):
            t = usable[(start + i) % n]
            # Usable targets have a weight above 0, but a rebuild (another thread) may set
            # it to 0 since: such a target sorts last.
            weight = t.weight
            load = t.active / weight if weight > 0 else float("inf")
            if best is None or load < best_load:
                best, best_load = t, load
        return best

    def _by_hash(self, ctx: RequestContext, usable: list[TargetState]) -> TargetState:
        value = None
        if self.hash_on == "consumer" and ctx.key is not None:
            value = str(ctx.key.consumer_id).encode()
        elif self.hash_on == "header":
            value = ctx.header(self.hash_header)
        if not value:
            value = ctx.client_ip.encode()
        ring = self._ring
        i = bisect.bisect(ring, _hash(value))
        n = len(ring)
        for step in range(n):  # clockwise to the first usable target
            t = self._ring_targets[(i + step) % n]
            if t in usable:
                return t
        return usable[0]  # (weights changed since the ring was built: not in this snapshot)

    # --- outcomes ------------------------------------------------------------------------
    def succeeded(self, t: TargetState) -> None:
        t.failures = 0
        if t.open_until:
            t.open_until = 0.0
            t.trial = False
            log.info("target %s:%s: circuit closed", t.host, t.port)

    def failed(self, t: TargetState) -> None:
        t.failures += 1
        if t.trial or (self.eject_after and t.failures >= self.eject_after):
            if not t.open_until or t.trial:
                log.warning(
                    "target %s:%s: circuit open for %.1f s after %d failures",
                    t.host,
                    t.port,
                    self.eject_seconds,
                    t.failures,
                )
            t.open_until = time.monotonic() + self.eject_seconds
            t.trial = False

    def abandoned(self, t: TargetState) -> None:
        """A try that ended without a verdict (the client left): free the trial slot."""
        t.trial = False

    def any_available(self) -> bool:
        """Could a try go anywhere now? (The same target included.)"""
        now = time.monotonic()
        return any(t.available(now) for t in self.targets)

    def may_retry(self) -> bool:
        """Within the retry budget? (Retries in flight < max(3, budget × requests in flight):
        3 is Envoy's min_retry_concurrency, so a budget of 0 still allows 3.)"""
        b = self.budget
        return b.retries_in_flight < max(3, self.retry_budget * b.in_flight)

    # The budget's counters, as attributes of the balancer (tests, metrics).
    @property
    def in_flight(self) -> int:
        return self.budget.in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self.budget.in_flight = value

    @property
    def retries_in_flight(self) -> int:
        return self.budget.retries_in_flight

    @retries_in_flight.setter
    def retries_in_flight(self, value: int) -> None:
        self.budget.retries_in_flight = value


def _hash(value: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(value, digest_size=8).digest(), "big")


class HealthChecker:
    """Active probes: one task per upstream with a health path, in each worker, jittered."""

    def __init__(self, session_getter) -> None:
        self._session = session_getter
        self._tasks: dict[tuple, asyncio.Task] = {}

    def sync(self, upstreams) -> None:
        """Run probes for exactly the upstreams of the current snapshot."""
        wanted: dict[tuple, object] = {}
        for up in upstreams:
            if up.health is not None and up.balancer.targets:
                key = (
                    up.id,
                    up.health,
                    up.ssl_key,
                    up.server_hostname,
                    tuple(id(t) for t in up.balancer.targets),
                )
                wanted[key] = up
            else:
                # No active checks (any more): what the last probes said no longer holds.
                for t in up.balancer.targets:
                    t.healthy = True
                    t.probes_ok = t.probes_failed = 0
        for key in list(self._tasks):
            if key not in wanted:
                self._tasks.pop(key).cancel()
        for key, up in wanted.items():
            if key not in self._tasks:
                self._tasks[key] = asyncio.create_task(self._run(up), name=f"health-{up.name}")

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, up) -> None:
        cfg: HealthConfig = up.health
        # Workers and gateways start together: spread their probes over the interval.
        await asyncio.sleep(random.uniform(0, cfg.interval))  # noqa: S311 - jitter, not crypto
        timeout = aiohttp.ClientTimeout(total=cfg.timeout)
        while True:
            await asyncio.gather(
                *(self._probe(up, t, cfg, timeout) for t in up.balancer.targets),
                return_exceptions=True,
            )
            await asyncio.sleep(cfg.interval * random.uniform(0.9, 1.1))  # noqa: S311

    async def _probe(self, up, t: TargetState, cfg: HealthConfig, timeout) -> None:
        ok = False
        with contextlib.suppress(Exception):
            async with self._session().get(
                t.base_url + cfg.path,
                timeout=timeout,
                allow_redirects=False,
                ssl=up.ssl,
                server_hostname=up.server_hostname,
                headers={"User-Agent": "apigw-health"},
            ) as resp:
                await resp.read()
                ok = resp.status in cfg.statuses
        if ok:
            t.probes_ok += 1
            t.probes_failed = 0
            if not t.healthy and t.probes_ok >= cfg.healthy_threshold:
                t.healthy = True
                log.warning("target %s:%s of %s is healthy again", t.host, t.port, up.name)
        else:
            t.probes_failed += 1
            t.probes_ok = 0
            if t.healthy and t.probes_failed >= cfg.unhealthy_threshold:
                t.healthy = False
                log.warning("target %s:%s of %s is unhealthy", t.host, t.port, up.name)
