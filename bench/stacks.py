"""Which HTTP server and which upstream client the data plane should be built on, measured.

Issue 4 asks to choose the worker class and the upstream client by measurement. This bench
serves one minimal reverse proxy (GET, the upstream's answer buffered and passed on, no
policy at all) on every combination of

  server  uvicorn   gunicorn + uvicorn-worker (uvloop, httptools), an ASGI app: what the
                    gateway runs on today
          raw       gunicorn + a worker class of this file: uvloop, an asyncio Protocol
                    with httptools' request parser, the handler called directly (no ASGI)
  client  aiohttp   one aiohttp ClientSession with a keep-alive pool: the gateway's today
          lean      an asyncio Protocol with httptools' response parser over a deque of
                    idle keep-alive connections

against the same nginx upstream (`return 200` with a 1 KB body), in the layout of
`bench/run.py`: the proxy under test alone on core 0 (one worker), the upstream and wrk on
core 1, rounds alternated, medians. It reports rps, latency and CPU µs per request of the
proxy's core, nginx `proxy_pass` beside them for scale.

    .venv/bin/python bench/stacks.py [--rounds 3] [--duration 8]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
UPSTREAM = os.environ.get("STACKS_UPSTREAM", "127.0.0.1:9")
HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"trailer"}


# --- upstream clients -----------------------------------------------------------------------
class AiohttpClient:
    def __init__(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
        )
        self.base = f"http://{UPSTREAM}"

    async def get(self, path: str, headers: list) -> tuple[int, list, bytes]:
        # aiohttp takes str headers (the gateway decodes them the same way, latin-1).
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
        async with self.session.get(self.base + path, headers=headers) as resp:
            body = await resp.read()
            return resp.status, list(resp.raw_headers), body


class _UpstreamConn(asyncio.Protocol):
    """One keep-alive connection: a request out, the response parsed by httptools."""

    def __init__(self, pool: LeanClient) -> None:
        import httptools

        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport = None
        self.waiter: asyncio.Future | None = None
        self.headers: list = []
        self.body: list[bytes] = []
        self.reusable = True

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("upstream closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        waiter.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))

    def send(self, head: bytes) -> asyncio.Future:
        self.headers, self.body = [], []
        self.waiter = self.pool.loop.create_future()
        self.transport.write(head)
        return self.waiter


class LeanClient:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, port = UPSTREAM.rsplit(":", 1)
        self.port = int(port)
        self.idle: collections.deque[_UpstreamConn] = collections.deque()
        self.host_header = UPSTREAM.encode()

    async def get(self, path: str, headers: list) -> tuple[int, list, bytes]:
        lines = [b"GET ", path.encode(), b" HTTP/1.1\r\nhost: ", self.host_header, b"\r\n"]
        for name, value in headers:
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        head = b"".join(lines)
        conn = None
        while self.idle:
            conn = self.idle.pop()
            if conn.reusable and not conn.transport.is_closing():
                break
            conn = None
        if conn is None:
            _, conn = await self.loop.create_connection(
                lambda: _UpstreamConn(self), self.host, self.port
            )
        result = await conn.send(head)
        if conn.reusable:
            self.idle.append(conn)
        else:
            conn.transport.close()
        return result


def make_client(kind: str):
    return AiohttpClient() if kind == "aiohttp" else LeanClient()


def _forward(headers) -> list:
    return [(n, v) for n, v in headers if n.lower() not in HOP and n.lower() != b"host"]


# --- server 1: ASGI under uvicorn -----------------------------------------------------------
class AsgiProxy:
    def __init__(self, client_kind: str) -> None:
        self.client_kind = client_kind
        self.client = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.client = make_client(self.client_kind)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["raw_path"].decode() + (
            "?" + scope["query_string"].decode() if scope["query_string"] else ""
        )
        status, headers, body = await self.client.get(path, _forward(scope["headers"]))
        out = [(n.lower(), v) for n, v in _forward(headers) if n.lower() != b"content-length"]
        out.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})


app = AsgiProxy(os.environ.get("STACKS_CLIENT", "aiohttp"))


# --- server 2: a raw asyncio protocol, as a gunicorn worker ---------------------------------
class _ServerConn(asyncio.Protocol):
    def __init__(self, client) -> None:
        import httptools

        self.client = client
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""
        self.headers: list = []
        self.queue: collections.deque = collections.deque()
        self.busy = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:  # noqa: BLE001 - a malformed request: close, as a proxy would
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        request = (self.url, self.headers, self.parser.should_keep_alive())
        if self.busy:  # pipelined: answered in order
            self.queue.append(request)
        else:
            self.busy = True
            asyncio.get_running_loop().create_task(self.handle(request))

    async def handle(self, request) -> None:
        while request is not None:
            url, headers, keep_alive = request
            try:
                status, up_headers, body = await self.client.get(url.decode(), _forward(headers))
            except Exception:  # noqa: BLE001
                status, up_headers, body = 502, [], b"bad gateway"
            out = [b"HTTP/1.1 %d OK\r\n" % status]
            for name, value in up_headers:
                low = name.lower()
                if low not in HOP and low != b"content-length":
                    out += [name, b": ", value, b"\r\n"]
            out.append(b"content-length: %d\r\n\r\n" % len(body))
            out.append(body)
            if self.transport.is_closing():
                return
            self.transport.write(b"".join(out))
            if not keep_alive:
                self.transport.close()
                return
            request = self.queue.popleft() if self.queue else None
        self.busy = False


try:
    from gunicorn.workers.base import Worker as _GunicornWorker
except ImportError:  # imported by the driver only for its docstring
    _GunicornWorker = object


class RawWorker(_GunicornWorker):
    """gunicorn worker: uvloop, the raw protocol on gunicorn's listening sockets."""

    def init_signals(self) -> None:
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)

    def run(self) -> None:
        import uvloop

        uvloop.run(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(s, stop.set)
        client = make_client(os.environ.get("STACKS_CLIENT", "aiohttp"))
        servers = [
            await loop.create_server(lambda: _ServerConn(client), sock=s.sock, backlog=2048)
            for s in self.sockets
        ]
        while not stop.is_set() and self.alive:
            self.notify()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        for server in servers:
            server.close()


# --- the driver -----------------------------------------------------------------------------
def main() -> int:
    sys.path.insert(0, str(BENCH))
    import run as rb  # bench/run.py: processes, nginx, wrk, CPU accounting

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    tools = rb.ensure_tools()
    server_core, load_core = rb.pick_cores()
    tmp = Path(tempfile.mkdtemp(prefix="apigw-stacks-"))
    procs = rb.Procs(tmp)
    results: dict[str, list] = collections.defaultdict(list)
    try:
        up_port = rb.free_port()
        body = rb.BODY.decode()
        conf = rb.nginx_conf(tmp / "up", rb.UPSTREAM_SERVER, port=up_port, body=body)
        up = rb.start_nginx(procs, tools, "upstream", tmp / "up", conf, load_core)
        rb.wait_http(procs, up, "upstream", f"http://127.0.0.1:{up_port}/")
        targets = {}
        ng_port = rb.free_port()
        conf = rb.nginx_conf(tmp / "px", rb.PROXY_SERVER, port=ng_port, upstream_port=up_port)
        targets["nginx proxy_pass"] = (ng_port, None)
        for server in ("uvicorn", "raw"):
            for client in ("aiohttp", "lean"):
                targets[f"{server} + {client}"] = (rb.free_port(), (server, client))
        for rnd in range(args.rounds):
            names = list(targets)
            names = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in names:
                port, combo = targets[name]
                if combo is None:
                    label = "proxy"
                    proc = rb.start_nginx(procs, tools, label, tmp / "px", conf, server_core)
                else:
                    worker = (
                        "uvicorn_worker.UvicornWorker"
                        if combo[0] == "uvicorn"
                        else "stacks.RawWorker"
                    )
                    env = {
                        **os.environ,
                        "STACKS_UPSTREAM": f"127.0.0.1:{up_port}",
                        "STACKS_CLIENT": combo[1],
                        "PYTHONPATH": str(BENCH),
                    }
                    label = name.replace(" ", "")
                    proc = procs.start(
                        label,
                        [
                            tools["taskset"], "-c", str(server_core),
                            str(Path(sys.executable).parent / "gunicorn"),
                            "-k", worker, "-w", "1", "-b", f"127.0.0.1:{port}",
                            "--no-control-socket", "--keep-alive", "75",
                            "stacks:app",
                        ],
                        env=env,
                    )  # fmt: skip
                rb.wait_http(procs, proc, label, f"http://127.0.0.1:{port}/")
                result = run_wrk(rb, tools, port, load_core, server_core, proc, args)
                results[name].append(result)
                rb.log(f"round {rnd + 1} {name}: {result[0]:,.0f} rps, {result[3]:.0f} µs/req")
                procs.stop(proc)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    nginx_rps = statistics.median(r[0] for r in results["nginx proxy_pass"])
    print(
        f"\n| stack (1 worker, core {server_core}) | rps | p50 ms | p99 ms | CPU µs/req | × nginx |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in results.items():
        rps = statistics.median(r[0] for r in rows)
        p50 = statistics.median(r[1] for r in rows)
        p99 = statistics.median(r[2] for r in rows)
        cpu = statistics.median(r[3] for r in rows)
        print(
            f"| {name} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {cpu:.0f} | {rps / nginx_rps:.3f} |"
        )
    return 0


def run_wrk(
    rb, tools, port, load_core, server_core, proc, args
) -> tuple[float, float, float, float]:
    """(rps, p50 ms, p99 ms, CPU µs per request of the server's process group)."""
    import subprocess

    subprocess.run(  # warm-up: connections, caches
        [tools["taskset"], "-c", str(load_core), tools["wrk"], "-t1", f"-c{args.connections}",
         "-d2s", f"http://127.0.0.1:{port}/"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    before = _group_cpu(proc.pid)
    t0 = time.monotonic()
    out = subprocess.run(
        [tools["taskset"], "-c", str(load_core), tools["wrk"], "-t1", f"-c{args.connections}",
         f"-d{args.duration:g}s", "--latency", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=args.duration + 60, check=False,
    ).stdout  # fmt: skip
    elapsed = time.monotonic() - t0
    cpu = _group_cpu(proc.pid) - before
    w = rb.parse_wrk(out, "stack", 0)
    requests = w.rps * elapsed
    return w.rps, w.p50_ms, w.p99_ms, cpu / requests * 1e6 if requests else 0.0


def _group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) of every process in a process group."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:  # field 5: pgrp
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


if __name__ == "__main__":
    sys.exit(main())
