"""WebSocket through the real gateway, with the `websockets` library as the client and a
real WebSocket upstream (the demo upstream's echo)."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import active_key, make_user, set_rate_limit, wait_for_key
from tests.procs import wait_until

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
