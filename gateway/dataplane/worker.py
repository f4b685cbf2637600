"""The gunicorn worker class of the data plane: uvicorn (uvloop + httptools).

uvicorn's own `server` and `date` headers are off so that upstream responses pass through
untouched; the gateway dates its own responses.
"""

from uvicorn_worker import UvicornWorker


class GatewayWorker(UvicornWorker):
    CONFIG_KWARGS = {
        **UvicornWorker.CONFIG_KWARGS,
        "server_header": False,
        "date_header": False,
        "lifespan": "on",
    }
