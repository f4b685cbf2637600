"""The gunicorn worker class of the data plane: uvicorn's server (uvloop), our HTTP protocol.

The HTTP/1.1 protocol is the gateway's own (protocol.py: httptools, head limits, one write
per response); uvicorn runs the sockets, lifespan, signals and graceful shutdown.

uvicorn's own `server` and `date` headers are off so that upstream responses pass through
untouched; the gateway dates its own responses. uvicorn's proxy-headers middleware is off: it
would let any loopback client rewrite its address with X-Forwarded-For, and the gateway handles
forwarding headers itself. Its access log is off: every request is already a log event.
Its WebSocket protocol is uvicorn's with pings passed to the application (wsprotocol.py).
"""

from uvicorn_worker import UvicornWorker


class GatewayWorker(UvicornWorker):
    CONFIG_KWARGS = {
        **UvicornWorker.CONFIG_KWARGS,
        "server_header": False,
        "date_header": False,
        "lifespan": "on",
        "proxy_headers": False,
        "access_log": False,
        "http": "gateway.dataplane.protocol:GatewayHttpProtocol",
        "ws": "gateway.dataplane.wsprotocol:GatewayWebSocketProtocol",
    }
