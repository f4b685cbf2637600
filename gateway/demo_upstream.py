"""The demo upstream: answers every path by echoing the request it received, as JSON.

Like httpbin's /anything, so that a user can see what the gateway sent. Extra paths:
`/status/<code>` answers with that status; `/delay/<s>` answers after S seconds;
`/stream?chunks=N&interval=S` sends N chunks S seconds apart (a slow stream, to see streaming
and disconnects); `/_stats` counts streams completed and abandoned by their client;
`/healthz` answers 200; `/_mode?status=503` makes every other path answer 503 and
`/_mode?delay=0.3` answer 0.3 s late (`/_mode?status=0` resets both);
`/bytes/<n>` streams n bytes; `/hold` sends one chunk, then the rest after `/_release`.
Run: `uvicorn gateway.demo_upstream:app --port 9000`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from urllib.parse import parse_qs

MAX_ECHO_BODY = 1 << 20  # larger bodies are counted, not echoed
STATS = {
    "streams_completed": 0,
    "streams_abandoned": 0,
    "stream_chunks_sent": 0,
    "answered": 0,  # requests answered by the echo or by /_mode (tests of retries)
    "requests": {},  # "path?query" -> how many echo requests asked for it (tests of caching)
}
# /_mode: answer every request with this status (0: normally), after this delay (seconds)
MODE: dict[str, float] = {"status": 0, "delay": 0.0}


async def _json(send, status: int, payload: object) -> None:
    out = json.dumps(payload, indent=2).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(out)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": out})


async def _stream(scope, receive, send) -> None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    chunks = min(int(query.get("chunks", ["10"])[0]), 100_000)
    interval = min(float(query.get("interval", ["0.1"])[0]), 10.0)
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    try:
        for i in range(chunks):
            if gone.is_set():
                STATS["streams_abandoned"] += 1
                return
            await send({"type": "http.response.body", "body": b"chunk %d\n" % i, "more_body": True})
            STATS["stream_chunks_sent"] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), interval)
        if gone.is_set():
            STATS["streams_abandoned"] += 1
            return
        await send({"type": "http.response.body", "body": b""})
        STATS["streams_completed"] += 1
    finally:
        watcher.cancel()


async def _bytes(send, size: str) -> None:
    n = min(int(size), 1 << 34) if size.isdigit() else 0
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(n).encode()),
            ],
        }
    )
    chunk = b"\xab" * 65536
    while n > 0:
        part = chunk if n >= len(chunk) else chunk[:n]
        n -= len(part)
        await send({"type": "http.response.body", "body": part, "more_body": n > 0})
    if not size.isdigit() or int(size) == 0:
        await send({"type": "http.response.body", "body": b""})


RELEASE = asyncio.Event()


async def _hold(send) -> None:
    RELEASE.clear()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(RELEASE.wait(), 30)
    await send({"type": "http.response.body", "body": b"rest\n"})


async def _websocket(scope, receive, send) -> None:
    """An echo WebSocket: text and binary messages come back as they went; the text
    "headers" answers the handshake's headers as JSON; "close <code>" closes with it."""
    msg = await receive()
    if msg["type"] != "websocket.connect":
        return
    accept = {"type": "websocket.accept"}
    if scope.get("subprotocols"):
        accept["subprotocol"] = scope["subprotocols"][0]
    await send(accept)
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            return
        text = msg.get("text")
        if text == "headers":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            await send({"type": "websocket.send", "text": json.dumps(headers)})
        elif text is not None and text.startswith("close "):
            await send({"type": "websocket.close", "code": int(text[6:])})
            return
        elif text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": msg.get("bytes") or b""})


BARRIERS: dict[str, tuple[list[int], asyncio.Event]] = {}


async def _barrier(scope, send) -> None:
    params = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    key = params.get("key", [""])[0]
    n = int(params.get("n", ["1"])[0]) if params.get("n", ["1"])[0].isdigit() else 1
    if len(BARRIERS) > 1000:
        BARRIERS.clear()
    count, event = BARRIERS.setdefault(key, ([0], asyncio.Event()))
    count[0] += 1
    if count[0] >= n:
        event.set()
    try:
        await asyncio.wait_for(event.wait(), 5)
    except TimeoutError:
        await _json(send, 504, {"barrier": "timeout", "arrived": count[0]})
        return
    await _json(send, 200, {"name": scope["path"][10:], "arrived": count[0]})


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await _websocket(scope, receive, send)
        return
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":
        await _stream(scope, receive, send)
        return
    if scope["path"] == "/_stats":
        await _json(send, 200, STATS)
        return
    if scope["path"].startswith("/bytes/"):  # /bytes/<n>: n bytes, streamed in 64 KiB chunks
        await _bytes(send, scope["path"][7:])
        return
    if scope["path"] == "/hold":  # one chunk now, the rest after a GET of /_release
        await _hold(send)
        return
    if scope["path"].startswith("/_barrier/"):
        # /_barrier/<name>?key=K&n=N: held until N requests with key K have arrived (5 s at
        # most, then 504): only calls made in parallel all get through.
        await _barrier(scope, send)
        return
    if scope["path"] == "/_release":
        RELEASE.set()
        await _json(send, 200, {"released": True})
        return
    if scope["path"] == "/_mode":  # /_mode?status=503 makes every answer a 503; 0 resets
        params = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        status = params.get("status", ["0"])[0]
        MODE["status"] = int(status) if status.isdigit() and 200 <= int(status) <= 599 else 0
        try:
            MODE["delay"] = min(max(float(params.get("delay", ["0"])[0]), 0.0), 5.0)
        except ValueError:
            MODE["delay"] = 0.0
        await _json(send, 200, MODE)
        return
    STATS["answered"] += 1
    if MODE["delay"] and scope["path"] != "/healthz":
        await asyncio.sleep(MODE["delay"])
    if MODE["status"]:
        await _json(send, MODE["status"], {"mode": MODE["status"]})
        return
    if scope["path"] == "/healthz":
        await _json(send, 200, {"status": "ok"})
        return
    target = scope["path"] + "?" + scope.get("query_string", b"").decode("latin-1")
    if len(STATS["requests"]) < 10_000 or target in STATS["requests"]:  # bounded
        STATS["requests"][target] = STATS["requests"].get(target, 0) + 1
    if scope["path"].startswith("/delay/"):  # like httpbin's /delay/<seconds>: a slow answer
        try:
            delay = min(max(float(scope["path"][7:]), 0.0), 30.0)
        except ValueError:
            delay = 0.0
        await asyncio.sleep(delay)
    body = bytearray()
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        chunk = msg.get("body", b"")
        size += len(chunk)
        if len(body) < MAX_ECHO_BODY:
            body += chunk[: MAX_ECHO_BODY - len(body)]
        if not msg.get("more_body"):
            break
    headers: dict[str, str] = {}
    for k, v in scope["headers"]:
        name = k.decode("latin-1").title()
        value = v.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    query = scope.get("query_string", b"").decode("latin-1")
    try:
        text: str | None = bytes(body).decode()
        encoded = None
    except UnicodeDecodeError:
        text, encoded = None, base64.b64encode(body).decode()
    status = 200
    path = scope["path"]
    parts = path.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "status" and parts[1].isdigit():
        status = min(max(int(parts[1]), 200), 599)
    payload = {
        "method": scope["method"],
        "path": path,
        "raw_path": scope.get("raw_path", b"").decode("latin-1"),
        "query": {k: v if len(v) > 1 else v[0] for k, v in parse_qs(query).items()},
        "headers": headers,
        "body": text,
        "body_base64": encoded,
        "body_size": size,
    }
    await _json(send, status, payload)
