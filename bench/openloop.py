"""A small open-loop HTTP load generator: a fixed request rate, latency from the intended time.

wrk is closed-loop (each connection waits for its answer before sending again), so it cannot
hold a fixed rate; wrk2 can, but it is not a Debian package. This client sends request i at
t0 + i / rate whether or not earlier answers have come back (open loop), and measures each
latency from that intended send time, so a slow server (or a late client) is not hidden by
coordinated omission.

It is a Python client on raw asyncio protocols with httptools' parser (no task per request):
against nginx on loopback it held 15,000 rps on one core (p50 0.02 ms), five times what the
aiohttp version it replaced could. Its own overhead is in every number it reports; comparing
two targets measured the same way (upstream direct vs through the gateway) cancels most of it.

Times come from time.perf_counter (uvloop's loop clock has a 1 ms resolution). Between two
sends less than a millisecond apart the client polls (uvloop's timers tick per millisecond,
so a shorter sleep returns at once): it keeps its core busy. It therefore lowers its own
scheduling priority (nice 19 unless --nice says otherwise): the upstream that shares its
core (bench/run.py puts both on the load core) runs as soon as it has work instead of
waiting for the client's time slice to end. At normal priority that wait was the tail: at
8,000 rps against nginx on the same core the direct upstream's p99 was 0.06-2.4 ms, at nice
19 0.03-0.04 ms. Lateness in sending is reported (send_lag_ms) and is inside the latencies.

Prints one JSON object on stdout. Used by bench/run.py; runnable alone:
    python bench/openloop.py --url http://127.0.0.1:8080/demo/x --rate 500 --duration 10 \
        --header "X-API-Key: KEY"
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time
from urllib.parse import urlsplit

import httptools
from benchutil import percentile  # bench/ is on sys.path

# perf_counter, not loop.time(): uvloop's loop clock has a 1 ms resolution.
CLOCK = time.perf_counter


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time (httptools parses answers)."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.current: tuple[int, float] | None = None  # (request index, actual send time)
        self.keep = True

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail("HttpParserError")

    def on_headers_complete(self) -> None:
        self.keep = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        current, self.current = self.current, None
        if current is not None:
            self.client.done(self, current, self.parser.get_status_code())

    def connection_lost(self, exc) -> None:
        self.keep = False
        self._fail("ConnectionLost")

    def _fail(self, kind: str) -> None:
        current, self.current = self.current, None
        if current is not None:
            self.client.failed(self, current, kind)
        if self.transport is not None:
            self.transport.close()

    def send(self, i: int, sent: float, request: bytes) -> None:
        self.current = (i, sent)
        self.transport.write(request)


class _Client:
    """Requests at fixed times over a pool of connections; no task per request."""

    def __init__(self, args: argparse.Namespace, n: int) -> None:
        u = urlsplit(args.url)
        self.host, self.port = u.hostname, u.port or 80
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        head = [f"GET {target} HTTP/1.1", f"Host: {u.netloc}", *args.header, "", ""]
        self.request = "\r\n".join(head).encode("latin-1")
        self.max_conns = args.max_inflight
        self.idle: collections.deque[_Conn] = collections.deque()
        self.conns = 0
        self.opening = 0
        self.waiting: collections.deque[int] = collections.deque()  # no connection free yet
        self.intended: list[float] = [0.0] * n
        self.latencies: list[float | None] = [None] * n
        self.service: list[float | None] = [None] * n
        self.send_lag: list[float] = [0.0] * n
        self.statuses: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.outstanding = 0
        self.all_done = asyncio.get_running_loop().create_future()
        self.sent_all = False
        self.max_inflight_seen = 0

    async def open(self) -> None:
        self.conns += 1
        self.opening += 1
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: _Conn(self), self.host, self.port
            )
        except OSError as exc:
            self.conns -= 1
            self.errors[type(exc).__name__] += 1
            if self.waiting:
                self.failed(None, (self.waiting.popleft(), CLOCK()), type(exc).__name__)
            return
        finally:
            self.opening -= 1
        self.release(conn)

    def submit(self, i: int, intended: float) -> None:
        self.intended[i] = intended
        self.outstanding += 1
        self.max_inflight_seen = max(self.max_inflight_seen, self.outstanding)
        if self.idle:
            self._send(self.idle.pop(), i)
        else:
            self.waiting.append(i)
            if self.conns < self.max_conns:
                asyncio.ensure_future(self.open())

    def _send(self, conn: _Conn, i: int) -> None:
        sent = CLOCK()
        self.send_lag[i] = sent - self.intended[i]
        conn.send(i, sent, self.request)

    def release(self, conn: _Conn) -> None:
        if not conn.keep or conn.transport is None or conn.transport.is_closing():
            self.conns -= 1
            if self.waiting and self.conns < self.max_conns:
                asyncio.ensure_future(self.open())
            return
        if self.waiting:
            self._send(conn, self.waiting.popleft())
        else:
            self.idle.append(conn)

    def done(self, conn: _Conn, current: tuple[int, float], status: int) -> None:
        i, sent = current
        now = CLOCK()
        self.latencies[i] = now - self.intended[i]
        self.service[i] = now - sent
        self.statuses[status] += 1
        self._finished()
        self.release(conn)

    def failed(self, conn: _Conn | None, current: tuple[int, float], kind: str) -> None:
        self.errors[kind] += 1
        self._finished()
        if conn is not None:
            self.release(conn)

    def _finished(self) -> None:
        self.outstanding -= 1
        if self.sent_all and self.outstanding == 0 and not self.all_done.done():
            self.all_done.set_result(None)


async def run(args: argparse.Namespace) -> dict:
    n = int(args.rate * args.duration)
    client = _Client(args, n)
    # Warm-up, not recorded: open a few keep-alive connections and check the target.
    warm = _Client(args, min(50, n))
    for i in range(min(50, n)):
        warm.submit(i, CLOCK())
    warm.sent_all = True
    if warm.outstanding:
        await asyncio.wait_for(warm.all_done, args.timeout + 5)
    client.idle.extend(warm.idle)
    client.conns = len(warm.idle)
    for conn in warm.idle:
        conn.client = client
    t0 = CLOCK() + 0.05
    i = 0
    while i < n:
        now = CLOCK()
        # Everything that is due goes out now; then sleep until the next one is due.
        while i < n and t0 + i / args.rate <= now:
            client.submit(i, t0 + i / args.rate)
            i += 1
        if i < n:
            delay = t0 + i / args.rate - CLOCK()
            # uvloop's timers tick per millisecond: at high rates requests leave in small
            # batches, each a little late; that lateness is measured (send_lag_ms).
            await asyncio.sleep(delay if delay > 0 else 0)
    sending_took = CLOCK() - t0
    client.sent_all = True
    if client.outstanding:
        try:
            await asyncio.wait_for(asyncio.shield(client.all_done), args.timeout + 5)
        except TimeoutError:
            client.errors["unfinished"] += client.outstanding
    done = sorted(x * 1000 for x in client.latencies if x is not None)
    lags = sorted(x * 1000 for x in client.send_lag)
    svc = sorted(x * 1000 for x in client.service if x is not None)
    return {
        "url": args.url,
        "rate": args.rate,
        "duration": args.duration,
        "sent": n,
        "completed": len(done),
        "achieved_send_rps": n / sending_took if sending_took > 0 else None,
        "statuses": {str(k): v for k, v in sorted(client.statuses.items())},
        "errors": dict(client.errors),
        "max_inflight": client.max_inflight_seen,
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
    parser.add_argument(
        "--nice",
        type=int,
        default=19,
        help="niceness to run at (default 19: the client polls between close sends, and "
        "must not delay a server sharing its core)",
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    if args.nice:
        os.nice(args.nice)
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
