"""A WebSocket upstream for tests that sees ping and pong frames (aiohttp, autoping off):

    python tests/ws_ping_upstream.py --port 8766

Any path upgrades. A ping from the peer is announced with a text message `pinged:<payload>`
and answered with a pong, unless its payload starts with `silent` (then nobody answers it
unless someone on the way does). The text `ping-me` makes it ping the peer with the payload
`from-upstream`; the pong that comes back is announced with `ponged:<payload>`. Other text
and binary messages are echoed. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse

from aiohttp import WSMsgType, web


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(autoping=False)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.PING:
            payload = bytes(msg.data)
            if not payload.startswith(b"silent"):
                await ws.pong(payload)
            await ws.send_str("pinged:" + payload.decode(errors="replace"))
        elif msg.type == WSMsgType.PONG:
            await ws.send_str("ponged:" + bytes(msg.data).decode(errors="replace"))
        elif msg.type == WSMsgType.TEXT:
            if msg.data == "ping-me":
                await ws.ping(b"from-upstream")
            else:
                await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/{tail:.*}", websocket)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
