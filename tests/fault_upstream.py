"""A raw HTTP/1.1 upstream that misbehaves on purpose, for the proxy's fault tests.

An ASGI server cannot close a connection without answering or send arbitrary hop-by-hop
fields, so this one speaks HTTP/1.1 itself (keep-alive, Content-Length or chunked bodies).
Paths:
  /drop      reads the whole request, then closes the connection without a byte of answer
  /hop       answers 200 with `Connection: keep-alive, X-Hop-Secret` and an X-Hop-Secret field
  /silent    reads the request and never answers (until the gateway gives up and closes)
  /flaky?key=K&fail=N   the first N requests of key K answer 503, later ones 200
  /_log      JSON: {path: [body, ...]} of every request this port received (bodies latin-1)
  anything else: 200 "ok"
Run: python -m tests.fault_upstream PORT [PORT ...]
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from urllib.parse import parse_qs, urlsplit

LOG: dict[int, dict[str, list[str]]] = {}  # per listening port
FLAKY: Counter = Counter()


def _answer(status: int, body: bytes, extra: bytes = b"") -> bytes:
    reason = {200: b"OK", 503: b"Service Unavailable"}.get(status, b"X")
    return b"HTTP/1.1 %d %b\r\ncontent-length: %d\r\n%b\r\n%b" % (
        status,
        reason,
        len(body),
        extra,
        body,
    )


async def _read_body(reader, head: bytes) -> bytes:
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return await reader.readexactly(length) if length else b""
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return body
        body += chunk[:-2]


async def serve(reader, writer) -> None:
    log = LOG.setdefault(writer.get_extra_info("sockname")[1], {})
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode("latin-1")
            parts = urlsplit(target)
            body = await _read_body(reader, head)
            path = parts.path
            if path != "/_log":
                log.setdefault(path, []).append(body.decode("latin-1"))
            if path == "/drop":
                return  # read it all, answer nothing (closed in finally)
            if path == "/silent":
                await reader.read()  # until the gateway closes
                return
            if path == "/_log":
                writer.write(_answer(200, json.dumps(log).encode()))
            elif path == "/hop":
                writer.write(
                    _answer(
                        200,
                        b"ok",
                        b"Connection: keep-alive, X-Hop-Secret\r\nX-Hop-Secret: s3cret\r\n"
                        b"Keep-Alive: timeout=30\r\nX-End-To-End: kept\r\n",
                    )
                )
            elif path == "/flaky":
                query = parse_qs(parts.query)
                key = query.get("key", [""])[0]
                FLAKY[key] += 1
                failing = FLAKY[key] <= int(query.get("fail", ["1"])[0])
                writer.write(_answer(503, b"down") if failing else _answer(200, b"ok"))
            else:
                writer.write(_answer(200, b"ok"))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main(ports: list[int]) -> None:
    servers = [await asyncio.start_server(serve, "127.0.0.1", p) for p in ports]
    print("listening on", ports, flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main([int(p) for p in sys.argv[1:]]))
