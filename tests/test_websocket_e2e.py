"""WebSocket through the real gateway, with the `websockets` library as the client and a
real WebSocket upstream (the demo upstream's echo)."""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import active_key, make_user, set_rate_limit, wait_for_key
from tests.procs import ROOT, Proc, child_env, free_port, port_open, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def ws_route(stack, live):
    """/demo/ws takes WebSocket connections (idle timeout 1 s) to the upstream's echo."""
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Policy, Route

    with transaction.atomic():
        route = Route.objects.create(api=live.api, name="ws", path="/ws")
        Policy.objects.create(route=route, kind="websocket", config={"idle_timeout": 1})
        config_bump(reason="websocket route")
    issued = active_key(make_user("dev@example.com"), live.free)
    wait_for_key(stack, issued.key)
    url = f"ws://127.0.0.1:{stack.gateway_port}/demo/ws/echo"

    async def status_of(headers) -> int:
        try:
            async with connect(url, additional_headers=headers, open_timeout=5):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    wait_until(
        lambda: all(asyncio.run(status_of({"X-API-Key": issued.key})) == 101 for _ in range(4)),
        timeout=15,
        what="the WebSocket route",
    )
    return url, issued, status_of


def test_messages_and_close_codes_are_relayed_both_ways(stack, ws_route):
    url, issued, _ = ws_route

    async def talk():
        async with connect(
            url, additional_headers={"X-API-Key": issued.key}, subprotocols=["chat.v1"]
        ) as ws:
            assert ws.subprotocol == "chat.v1"  # the upstream's choice, passed on
            await ws.send("hello")
            text = await ws.recv()
            await ws.send(b"\x00\x01binary")
            data = await ws.recv()
            await ws.send("headers")
            seen = json.loads(await ws.recv())
            await ws.send("close 4001")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            return text, data, seen, closed.value.rcvd.code

    text, data, seen, code = asyncio.run(talk())
    assert text == "hello"
    assert data == b"\x00\x01binary"
    assert code == 4001  # the upstream's close code reached the client
    assert "x-api-key" not in seen  # the credential is not passed on
    assert seen["x-consumer-id"] == str(issued.api_key.subscription.consumer_id)
    assert seen["x-request-id"]


def test_handshakes_are_authenticated_authorized_and_limited_before_the_upgrade(
    stack, live, ws_route
):
    url, issued, status_of = ws_route
    assert asyncio.run(status_of({})) == 401
    assert asyncio.run(status_of({"X-API-Key": "gw_0000_nope"})) == 401
    set_rate_limit(plan=live.free, limit=1, window="minute", burst=0)
    other = active_key(make_user("other@example.com"), live.free, name="limited")
    wait_for_key(stack, other.key)  # uses up its one request a minute
    assert asyncio.run(status_of({"X-API-Key": other.key})) == 429


def test_an_idle_connection_is_closed_with_1001(stack, ws_route):
    url, issued, _ = ws_route

    async def idle():
        async with connect(url, additional_headers={"X-API-Key": issued.key}) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)  # the idle timeout is 1 s
            return closed.value.rcvd.code

    assert asyncio.run(idle()) == 1001


def test_plain_routes_refuse_websocket_handshakes(stack, ws_route):
    _, issued, _ = ws_route
    other_url = f"ws://127.0.0.1:{stack.gateway_port}/demo/other"

    async def attempt() -> int:
        try:
            async with connect(other_url, additional_headers={"X-API-Key": issued.key}):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(attempt()) == 400


@pytest.fixture
def ping_route(stack, live, tmp_path):
    """/demo/pings goes to an upstream that sees ping and pong frames (tests/ws_ping_upstream)."""
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Policy, Route, Target, Upstream

    port = free_port()
    proc = Proc(
        "ws-ping-upstream",
        [sys.executable, str(ROOT / "tests" / "ws_ping_upstream.py"), "--port", str(port)],
        env=child_env(),
        log_dir=tmp_path,
    )
    try:
        wait_until(lambda: port_open(port), timeout=15, what="the ping upstream")
        with transaction.atomic():
            upstream = Upstream.objects.create(name="pinger", connect_timeout=2)
            Target.objects.create(upstream=upstream, host="127.0.0.1", port=port)
            route = Route.objects.create(
                api=live.api, name="pings", path="/pings", upstream=upstream
            )
            Policy.objects.create(route=route, kind="websocket", config={"idle_timeout": 10})
            config_bump(reason="ping route")
        issued = active_key(make_user("pinger@example.com"), live.free)
        wait_for_key(stack, issued.key)
        url = f"ws://127.0.0.1:{stack.gateway_port}/demo/pings"

        async def echoes() -> bool:
            try:
                async with connect(url, additional_headers={"X-API-Key": issued.key}) as ws:
                    await ws.send("up?")
                    return await asyncio.wait_for(ws.recv(), 5) == "up?"
            except (InvalidStatus, OSError, TimeoutError):
                return False

        wait_until(
            lambda: all(asyncio.run(echoes()) for _ in range(4)), timeout=15, what="the ping route"
        )
        yield url, issued.key
    finally:
        proc.stop()


def test_a_clients_ping_reaches_the_upstream_and_its_pong_comes_back(stack, ping_route):
    url, key = ping_route

    async def talk():
        async with connect(url, additional_headers={"X-API-Key": key}, ping_interval=None) as ws:
            answered = await ws.ping(b"answer-1")
            assert await asyncio.wait_for(ws.recv(), 5) == "pinged:answer-1"
            await asyncio.wait_for(answered, 5)  # the upstream's pong, relayed
            # A ping the upstream leaves unanswered stays unanswered: the gateway does not
            # answer it on its own (its pong would have arrived before the upstream's text).
            unanswered = await ws.ping(b"silent-1")
            assert await asyncio.wait_for(ws.recv(), 5) == "pinged:silent-1"
            await ws.send("after")
            assert await asyncio.wait_for(ws.recv(), 5) == "after"
            return unanswered.done()

    assert asyncio.run(talk()) is False


def test_an_upstreams_ping_reaches_the_client_and_its_pong_goes_back(stack, ping_route):
    url, key = ping_route

    async def talk():
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, headers={"X-API-Key": key}, autoping=False) as ws,
        ):
            await ws.send_str("ping-me")
            for _ in range(5):  # past any keepalive ping of the gateway's own
                msg = await ws.receive(timeout=5)
                if msg.type == aiohttp.WSMsgType.PING and msg.data == b"from-upstream":
                    break
                if msg.type == aiohttp.WSMsgType.PING:
                    await ws.pong(msg.data)
            else:
                raise AssertionError("the upstream's ping did not reach the client")
            await ws.pong(b"from-upstream")  # only the client answers it
            reply = await ws.receive(timeout=5)
            return reply.type, reply.data

    assert asyncio.run(talk()) == (aiohttp.WSMsgType.TEXT, "ponged:from-upstream")
