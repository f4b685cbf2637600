"""The WebSocket server protocol of the data plane: uvicorn's, with pings relayed.

ASGI has no message for ping and pong frames: a server answers pings itself, so a proxy
behind it could only answer each hop on its own, and a client's ping would never reach the
upstream (nor an upstream's ping the client). Like nginx or Envoy, which pass frames through
untouched, the gateway relays them: this protocol offers the ASGI extension
`gateway.websocket.ping` in the scope; an application that accepts with `"relay_pings": True`
then receives

    {"type": "websocket.ping", "bytes": payload}   the client pinged; nobody answered yet
    {"type": "websocket.pong", "bytes": payload}   the client answered a ping it was sent

and may send the same two messages to write a ping or a pong frame to the client. Without
the flag the protocol behaves as uvicorn's (it answers pings). uvicorn's own keepalive pings
keep working: their pongs are recognised by payload and not passed on.
"""

from __future__ import annotations

from collections import deque

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

EXTENSION = "gateway.websocket.ping"


class _RelayingServerProtocol(ServerProtocol):
    """websockets' server side, which does not answer pings while `relay_pings` is set."""

    relay_pings = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pings: deque[bytes] = deque()  # payloads of pings received, not yet passed on

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.PING and self.relay_pings:
            self.pings.append(bytes(frame.data))
            self.events.append(frame)
            return
        super().recv_frame(frame)


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        plain = self.conn
        self.conn = _RelayingServerProtocol(
            extensions=plain.available_extensions,
            max_size=(plain.max_message_size, plain.max_fragment_size),
            logger=plain.logger,
        )

    def handle_connect(self, event) -> None:
        super().handle_connect(event)
        # The ASGI task is created but has not run yet: it sees the extension.
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = {}

    def _to_app(self, message: dict) -> None:
        if self.close_sent:
            return
        self.queue.put_nowait(message)
        if not self.read_paused:  # the same back pressure as for data messages
            self.read_paused = True
            self.transport.pause_reading()

    def handle_ping(self) -> None:
        if self.conn.relay_pings and self.conn.pings:
            self._to_app({"type": "websocket.ping", "bytes": self.conn.pings.popleft()})
        super().handle_ping()  # writes whatever the protocol has to send (nothing, relayed)

    def handle_pong(self, event: Frame) -> None:
        payload = bytes(event.data)
        if self.pending_ping_payload is not None and payload == self.pending_ping_payload:
            super().handle_pong(event)  # uvicorn's own keepalive
        elif self.conn.relay_pings:
            self._to_app({"type": "websocket.pong", "bytes": payload})

    async def send(self, message) -> None:
        kind = message["type"]
        if kind == "websocket.accept" and message.get("relay_pings"):
            self.conn.relay_pings = True
        elif kind in ("websocket.ping", "websocket.pong"):
            await self.writable.wait()
            if self.disconnected:
                raise ClientDisconnected()
            if not self.handshake_complete or self.close_sent or self.initial_response:
                return  # nothing to ping: not open, or closing
            data = message.get("bytes") or b""
            try:
                if kind == "websocket.ping":
                    self.conn.send_ping(data)
                else:
                    self.conn.send_pong(data)
            except InvalidState:
                raise ClientDisconnected() from None
            self.transport.write(b"".join(self.conn.data_to_send()))
            return
        await super().send(message)
