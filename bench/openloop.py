"""A small open-loop HTTP load generator: a fixed request rate, latency from the intended time.

wrk is closed-loop (each connection waits for its answer before sending again), so it cannot
hold a fixed rate; wrk2 can, but it is not a Debian package. This client sends request i at
t0 + i / rate whether or not earlier answers have come back (open loop), and measures each
latency from that intended send time, so a slow server (or a late client) is not hidden by
coordinated omission.

It is a Python client: it tops out around 3 000-4 000 rps on one core, so keep the rate far
below that. Its own overhead is in every number it reports; comparing two targets measured the
same way (upstream direct vs through the gateway) cancels most of it.

Times come from time.perf_counter (uvloop's loop clock has a 1 ms resolution); sends are
scheduled with asyncio.sleep, whose ~1 ms timer granularity makes some sends late: that
lateness is reported (send_lag_ms) and is inside the latencies, equally for every target.

Prints one JSON object on stdout. Used by bench/run.py; runnable alone:
    python bench/openloop.py --url http://127.0.0.1:8080/demo/x --rate 500 --duration 10 \
        --header "X-API-Key: KEY"
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import sys
import time

import aiohttp


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def run(args: argparse.Namespace) -> dict:
    headers = {}
    for h in args.header:
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()
    # perf_counter, not loop.time(): uvloop's loop clock has a 1 ms resolution.
    clock = time.perf_counter
    connector = aiohttp.TCPConnector(limit=args.max_inflight, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    n = int(args.rate * args.duration)
    latencies: list[float | None] = [None] * n
    service: list[float | None] = [None] * n
    send_lag: list[float] = [0.0] * n
    statuses: collections.Counter[int] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        # Warm-up, not recorded: open a few keep-alive connections and check the target.
        for _ in range(min(50, n)):
            async with session.get(args.url, headers=headers) as r:
                await r.read()

        async def one(i: int, intended: float) -> None:
            sent = clock()
            send_lag[i] = sent - intended
            try:
                async with session.get(args.url, headers=headers) as r:
                    await r.read()
                    statuses[r.status] += 1
            except Exception as exc:
                errors[type(exc).__name__] += 1
                return
            done = clock()
            latencies[i] = done - intended
            service[i] = done - sent

        inflight: set[asyncio.Task] = set()
        max_inflight_seen = 0
        t0 = clock() + 0.05
        for i in range(n):
            intended = t0 + i / args.rate
            delay = intended - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i, intended))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            max_inflight_seen = max(max_inflight_seen, len(inflight))
        sending_took = clock() - t0
        if inflight:
            _, pending = await asyncio.wait(set(inflight), timeout=args.timeout + 5)
            for task in pending:
                task.cancel()
                errors["unfinished"] += 1
    done = sorted(x * 1000 for x in latencies if x is not None)
    lags = sorted(x * 1000 for x in send_lag)
    svc = sorted(x * 1000 for x in service if x is not None)
    return {
        "url": args.url,
        "rate": args.rate,
        "duration": args.duration,
        "sent": n,
        "completed": len(done),
        "achieved_send_rps": n / sending_took if sending_took > 0 else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": dict(errors),
        "max_inflight": max_inflight_seen,
        "latency_ms": {
            "p50": percentile(done, 50),
            "p90": percentile(done, 90),
            "p99": percentile(done, 99),
            "p999": percentile(done, 99.9),
            "max": done[-1] if done else None,
        },
        # From the actual send instead of the intended one (hides the client's own lateness).
        "service_ms": {"p50": percentile(svc, 50), "p99": percentile(svc, 99)},
        "send_lag_ms": {"p50": percentile(lags, 50), "p99": percentile(lags, 99)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--header", action="append", default=[], help='"Name: value"')
    parser.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    parser.add_argument("--max-inflight", type=int, default=512, help="connection cap")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    started = time.monotonic()
    result = runner(run(args))
    result["wall_s"] = round(time.monotonic() - started, 3)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
