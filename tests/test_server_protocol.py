"""The data plane's HTTP/1.1 server protocol (gateway/dataplane/protocol.py), without gunicorn.

Most tests drive the protocol over a real loopback socket with a small ASGI app; the ones
about how many writes a response takes use a transport that records what it is given.
The limits (400, 408, 414, 431) are tested through the real gateway in test_gateway_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from gateway.dataplane.protocol import GatewayHttpProtocol
from tests.procs import read_chunked


def _config(app, **kw):
    return SimpleNamespace(
        loaded=True,
        loaded_app=app,
        root_path="",
        timeout_keep_alive=kw.get("keepalive", 5),
        limit_concurrency=kw.get("limit"),
        ws_protocol_class=None,
    )


def _state():
    return SimpleNamespace(connections=set(), tasks=set(), total_requests=0)


async def _serve(app, **kw):
    loop = asyncio.get_running_loop()
    config, state = _config(app, **kw), _state()
    server = await loop.create_server(
        lambda: GatewayHttpProtocol(config, state, {}, _loop=loop), "127.0.0.1", 0
    )
    return server, server.sockets[0].getsockname()[1], state


async def _read_response(reader, *, head_only=False) -> tuple[bytes, dict, bytes]:
    """One response: status line, headers (lower-case names), body by length or chunks."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if head_only:
        body = b""
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = await read_chunked(reader)
    else:
        body = b""
    return lines[0].encode(), headers, body


async def _echo(scope, receive, send):
    """Answers with the method, path, query and the body it read, as JSON."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    if scope["path"].startswith("/slow"):
        await asyncio.sleep(0.1)
    out = json.dumps(
        {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode(),
            "query": scope["query_string"].decode(),
            "body": len(body),
            "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
        }
    ).encode()
    headers = [(b"content-type", b"application/json")]
    if not scope["path"].startswith("/unframed"):
        headers.append((b"content-length", b"%d" % len(out)))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": out})


def test_pipelined_requests_are_answered_in_order_and_scope_is_asgi():
    async def main():
        server, port, state = await _serve(_echo)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # The first is the slowest: the answers must still come in request order.
        writer.write(
            b"GET /slow/a%20b?x=1 HTTP/1.1\r\nHost: h\r\nX-Case: Yes\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        answers = [json.loads((await _read_response(reader))[2]) for _ in range(3)]
        writer.close()
        server.close()
        return answers, state

    answers, state = asyncio.run(main())
    assert [a["path"] for a in answers] == ["/slow/a b", "/b", "/c"]
    assert answers[0]["raw_path"] == "/slow/a%20b" and answers[0]["query"] == "x=1"
    assert ["x-case", "Yes"] in answers[0]["headers"]  # names lower-cased, values as sent
    assert answers[1]["method"] == "POST" and answers[1]["body"] == 3
    assert state.total_requests == 3


def test_a_streamed_request_body_and_100_continue():
    async def main():
        server, port, _ = await _serve(_echo)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"PUT /up HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        for _ in range(50):  # 50 chunks of 100 KiB: more than the buffer's high water
            writer.write(b"19000\r\n" + b"x" * 0x19000 + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        _, _, body = await _read_response(reader)
        writer.close()
        server.close()
        return interim, json.loads(body)

    interim, answer = asyncio.run(main())
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert answer["body"] == 50 * 0x19000


def test_an_unframed_response_is_chunked_and_head_gets_no_body():
    async def main():
        server, port, _ = await _serve(_echo)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /unframed HTTP/1.1\r\nHost: h\r\n\r\n")
        status, headers, body = await _read_response(reader)
        writer.write(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\nGET /y HTTP/1.1\r\nHost: h\r\n\r\n")
        head_status, head_headers, _ = await _read_response(reader, head_only=True)
        assert int(head_headers["content-length"]) > 0  # a length but no body, so ...
        _, _, after = await _read_response(reader)  # ... the next answer follows at once
        writer.close()
        server.close()
        return status, headers, body, head_status, after

    status, headers, body, head_status, after = asyncio.run(main())
    assert status == b"HTTP/1.1 200 OK" and headers["transfer-encoding"] == "chunked"
    assert json.loads(body)["path"] == "/unframed"
    assert head_status == b"HTTP/1.1 200 OK"
    assert json.loads(after)["path"] == "/y"


class _Transport(asyncio.Transport):
    """Records writes; enough of a transport for the protocol."""

    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 5555)}.get(name)

    def write(self, data):
        self.writes.append(bytes(data))

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def _drive(app, request: bytes, *, settle: float = 0.3):
    async def main():
        loop = asyncio.get_running_loop()
        proto = GatewayHttpProtocol(_config(app), _state(), {}, _loop=loop)
        transport = _Transport()
        proto.connection_made(transport)
        proto.data_received(request)
        steps = []
        for _ in range(int(settle / 0.01)):
            await asyncio.sleep(0.01)
            steps.append(len(transport.writes))
        proto.connection_lost(None)
        return transport, steps

    return asyncio.run(main())


def test_a_response_head_and_its_body_leave_in_one_write():
    transport, _ = _drive(_echo, b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"}")


def test_a_head_whose_body_is_late_is_not_held_back():
    async def slow_stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.2)  # an upstream thinking: the client sees the status meanwhile
        await send({"type": "http.response.body", "body": b"late", "more_body": False})

    transport, steps = _drive(slow_stream, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert steps[5] == 1 and transport.writes[0].endswith(b"transfer-encoding: chunked\r\n\r\n")
    assert transport.writes[1] == b"4\r\nlate\r\n0\r\n\r\n"


def test_a_bad_response_header_is_a_500_not_an_injected_header():
    async def bad(scope, receive, send):
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"x", b"a\r\nSet: 1")]}
        )

    transport, _ = _drive(bad, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    out = b"".join(transport.writes)
    assert out.startswith(b"HTTP/1.1 500 ") and b"application/problem+json" in out
    assert b"Set: 1" not in out and transport.closed


def test_every_receive_waiting_sees_the_disconnect():
    seen = []

    async def watchers(scope, receive, send):
        assert (await receive())["more_body"] is False

        async def watch():
            seen.append((await receive())["type"])

        tasks = [asyncio.create_task(watch()) for _ in range(3)]
        await asyncio.sleep(0.05)
        tasks[0].cancel()  # one watcher giving up does not wake the others
        await asyncio.sleep(0.05)
        assert seen == []
        await asyncio.gather(*tasks[1:])

    async def main():
        loop = asyncio.get_running_loop()
        proto = GatewayHttpProtocol(_config(watchers), _state(), {}, _loop=loop)
        proto.connection_made(_Transport())
        proto.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await asyncio.sleep(0.2)
        proto.connection_lost(ConnectionResetError())
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert seen == ["http.disconnect", "http.disconnect"]


def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout():
    async def main():
        server, port, state = await _serve(_echo, keepalive=0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
        await _read_response(reader)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # The sweep runs at least once a second; 5 s of margin for a loaded machine.
        eof = await asyncio.wait_for(reader.read(), 5)
        waited = loop.time() - started
        writer.close()
        server.close()
        return eof, waited

    eof, waited = asyncio.run(main())
    assert eof == b"" and waited >= 0.25


def test_over_the_concurrency_limit_a_request_gets_503_problem():
    async def main():
        gate = asyncio.Event()

        async def held(scope, receive, send):
            await gate.wait()
            await _echo(scope, receive, send)

        server, port, _ = await _serve(held, limit=1)
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n")
        await asyncio.sleep(0.1)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n")
        refused = await _read_response(r2)
        gate.set()
        first = await _read_response(r1)
        for w in (w1, w2):
            w.close()
        server.close()
        return refused, first

    (status, headers, body), first = asyncio.run(main())
    assert status.startswith(b"HTTP/1.1 503 ")
    assert headers["content-type"] == "application/problem+json" and headers["retry-after"]
    assert json.loads(body)["request_id"] == headers["x-request-id"]
    assert json.loads(first[2])["path"] == "/first"
