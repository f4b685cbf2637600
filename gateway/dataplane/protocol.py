"""The HTTP/1.1 server protocol of the data plane: uvicorn's httptools protocol with limits.

uvicorn buffers a request head without bound; one client could grow the worker's memory with
a huge header. Here the head is capped: 414 past MAX_URL_BYTES of URL, 431 past
MAX_HEADER_BYTES of head, and malformed requests get a problem+json 400 like every other
gateway error (uvicorn answers them in text/plain).
"""

from __future__ import annotations

import logging
import time
from http import HTTPStatus
from random import getrandbits

import httptools
from django.conf import settings
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.dataplane.problems import problem

log = logging.getLogger("gateway.protocol")

_LIMITS = settings.GATEWAY
MAX_HEADER_BYTES: int = _LIMITS["MAX_HEADER_BYTES"]
MAX_URL_BYTES: int = _LIMITS["MAX_URL_BYTES"]
HEADER_TIMEOUT: float = _LIMITS["HEADER_TIMEOUT"]

_DETAILS = {
    400: ("bad-request", "The request is not valid HTTP/1.1."),
    408: ("request-timeout", f"The request head did not arrive within {HEADER_TIMEOUT:g} s."),
    414: ("uri-too-long", f"The request target is longer than {MAX_URL_BYTES} bytes."),
    431: ("header-too-large", f"The request head is larger than {MAX_HEADER_BYTES} bytes."),
}
_last_warning = 0.0


class _Refused(Exception):
    pass


class GatewayHttpProtocol(HttpToolsProtocol):
    _field_bytes = 0  # header names and values parsed so far in this head
    _read_bytes = 0  # bytes read while this head was incomplete
    _in_head = True
    _refuse = 0
    _head_timer = None  # armed while a head is incomplete (slowloris): 408 when it fires

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # A connection that sends nothing, or a head byte by byte, is closed after
        # HEADER_TIMEOUT: uvicorn itself only times out idle keep-alive connections.
        self._head_timer = self.loop.call_later(HEADER_TIMEOUT, self._head_timed_out)

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self._read_bytes or self._field_bytes or getattr(self, "url", b""):
            self._refuse_request(408)
        else:
            self.transport.close()  # never said a word: nothing to answer

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._field_bytes = 0
        self._read_bytes = 0
        self._in_head = True
        self._refuse = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_URL_BYTES:
            self._refuse = 414
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        # A head that arrived in one read is only seen here, field by field.
        self._field_bytes += len(name) + len(value) + 4
        if self._field_bytes > MAX_HEADER_BYTES:
            self._refuse = 431
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._refuse_request(self._refuse or 400)
            return
        if self._in_head:
            # A head trickling in over several reads: httptools holds the partial field, so
            # count the bytes read and stop at the cap before it grows further.
            self._read_bytes += len(data)
            if self._read_bytes > MAX_HEADER_BYTES + MAX_URL_BYTES:
                self._refuse_request(431)
            elif self._head_timer is None:  # the next request's head, on a kept-alive one
                self._head_timer = self.loop.call_later(HEADER_TIMEOUT, self._head_timed_out)

    def _refuse_request(self, status: int) -> None:
        global _last_warning
        slug, detail = _DETAILS[status]
        request_id = f"{getrandbits(128):032x}"
        body = problem(slug, detail, request_id=request_id).body
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()),
            b"content-type: application/problem+json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: " + request_id.encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
        now = time.monotonic()
        if now - _last_warning >= 1.0:  # never a flood of lines for a flood of bad requests
            _last_warning = now
            log.warning("refused a request head from %s: %d", self.client, status)
