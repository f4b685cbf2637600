"""Prometheus metrics of the data plane, in prometheus-client's multiprocess mode.

Each gunicorn worker writes its samples to memory-mapped files under PROMETHEUS_MULTIPROC_DIR
(set by gunicorn_conf.py before any worker starts), so one scrape of any worker covers them
all. Labels are bounded: API slug and status class, never a key or consumer (cardinality).
"""

from __future__ import annotations

import time
from bisect import bisect_left

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from gateway.dataplane.context import RequestContext
from gateway.dataplane.pipeline import Stage

REQUESTS = Counter(
    "gateway_requests_total", "Requests answered, by API and status class.", ["api", "status"]
)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LATENCY = Histogram(
    "gateway_request_duration_seconds",
    "Time from request to the end of the response, by API.",
    ["api"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors_total",
    "Requests whose upstream failed (unreachable, timed out, aborted), by API and kind.",
    ["api", "kind"],
)
RESPONSE_VALIDATION_FAILURES = Counter(
    "gateway_response_validation_failures_total",
    "Upstream answers that did not match the API's OpenAPI document (report-only), by API.",
    ["api"],
)
LIMITER_STORE_ERRORS = Gauge(
    "gateway_limiter_store_errors",
    "Limiter store (Redis) failures since the worker started; requests were let through.",
    multiprocess_mode="livesum",
)
LOG_BUFFER = Gauge(
    "gateway_log_buffer_events", "Log events waiting to be shipped.", multiprocess_mode="livesum"
)
LOG_DROPPED = Counter(
    "gateway_log_events_dropped",
    "Log events dropped: the buffer was full, or shipping failed at shutdown. A counter, so "
    "a restarted worker's drops are not forgotten.",
)
CONFIG_VERSION = Gauge(
    "gateway_config_version", "Config version of the worker's snapshot.", multiprocess_mode="min"
)
SNAPSHOT_BUILD = Gauge(
    "gateway_snapshot_build_seconds",
    "Time the worker took to compile its current snapshot.",
    multiprocess_mode="max",
)
SNAPSHOT_FAILURES = Counter(
    "gateway_snapshot_build_failures_total",
    "Snapshots that failed to build or compile; the last good one kept serving.",
)
CONFIG_DB_ERRORS = Counter(
    "gateway_config_db_errors_total",
    "Config reads (version checks, key deltas, rebuilds) that failed because the database "
    "could not be read; the last snapshot kept serving and the read is retried at the next "
    "poll. Not a broken configuration (that is gateway_snapshot_build_failures_total).",
)
CONFIG_CHECK_AGE = Gauge(
    "gateway_config_check_age_seconds",
    "Seconds since the worker last read the config version from the database (since it "
    "started, if it never did): how stale its snapshot may be. The maximum over live workers; "
    "alert when it stays above a few poll intervals.",
    multiprocess_mode="livemax",
)
CONFIG_FROM_CACHE = Gauge(
    "gateway_config_from_cache",
    "Workers serving the on-disk cache of the last good configuration (the database could not "
    "be read when they started).",
    multiprocess_mode="livesum",
)
CONFIG_CACHE_WRITE = Gauge(
    "gateway_config_cache_write_seconds",
    "Time the worker took to write the on-disk config cache the last time it wrote it.",
    multiprocess_mode="livemax",
)
UPSTREAM_RETRIES = Counter(
    "gateway_upstream_retries_total", "Tries repeated on another target, by API.", ["api"]
)
TARGET_USABLE = Gauge(
    "gateway_upstream_target_usable",
    "1 if the target takes requests in this worker (healthy by active checks and its "
    "circuit not open), else 0; the minimum over workers.",
    ["upstream", "target"],
    multiprocess_mode="livemin",
)
TARGET_CIRCUIT_OPEN = Gauge(
    "gateway_upstream_target_circuit_open",
    "Workers in which the target's circuit breaker is open or half-open.",
    ["upstream", "target"],
    multiprocess_mode="livesum",
)
_UPSTREAM_KINDS = {"upstream_error", "upstream_timeout", "upstream_aborted", "no_target"}
_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class MetricsStage(Stage):
    """Counts every request in plain dicts; `flush()` adds them to the shared metrics.

    prometheus-client's multiprocess values are memory-mapped and locked: a request count and
    a latency observation cost about 3.5 µs per request. Here a request costs two dict
    updates; the worker flushes every second (and before it answers a scrape, and when it
    stops), so a scrape lags a busy worker by at most a second.
    """

    name = "metrics"

    def __init__(self) -> None:
        self._requests: dict[tuple[str, int], int] = {}
        self._latency: dict[str, list] = {}  # api -> [sum, count in bucket 0, 1, ...]
        self._bounds = (*LATENCY_BUCKETS, float("inf"))

    def on_complete(self, ctx: RequestContext) -> None:
        api = ctx.route.api_slug if ctx.route is not None else ""
        key = (api, ctx.status // 100)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        seconds = ctx.elapsed()
        hist = self._latency.get(api)
        if hist is None:
            hist = self._latency[api] = [0.0] + [0] * len(self._bounds)
        hist[0] += seconds
        hist[bisect_left(self._bounds, seconds) + 1] += 1
        if ctx.error_kind in _UPSTREAM_KINDS:
            UPSTREAM_ERRORS.labels(api, ctx.error_kind).inc()
        if ctx.retries:
            UPSTREAM_RETRIES.labels(api).inc(ctx.retries)

    def flush(self) -> None:
        requests, self._requests = self._requests, {}
        latency, self._latency = self._latency, {}
        for (api, cls), n in requests.items():
            REQUESTS.labels(api, _CLASSES.get(cls, "other")).inc(n)
        for api, hist in latency.items():
            child = LATENCY.labels(api)
            # Histogram.observe one at a time, in bulk: the sum, then each bucket's count
            # (prometheus-client 0.26's child keeps them in _sum and _buckets).
            child._sum.inc(hist[0])
            for value, n in zip(child._buckets, hist[1:], strict=True):
                if n:
                    value.inc(n)


def report_targets(upstreams) -> None:
    """Set the per-target gauges (labels: upstream name and host:port; targets are few)."""
    now = time.monotonic()
    for up in upstreams:
        for t in up.balancer.targets:
            name = f"{t.host}:{t.port}"
            TARGET_USABLE.labels(up.name, name).set(1 if t.available(now) or t.trial else 0)
            TARGET_CIRCUIT_OPEN.labels(up.name, name).set(1 if t.open_until else 0)


def render() -> bytes:
    """The text exposition of every worker's metrics (reads the multiprocess files)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)
