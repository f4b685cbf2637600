"""Payload policies through the real gateway: CORS and transformations."""

from __future__ import annotations

import json

import pytest
import requests

from tests.conftest import active_key, make_user, wait_for_key
from tests.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PORTAL = "https://portal.example.test"


def _policies(live, *rows) -> None:
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Policy

    with transaction.atomic():
        for row in rows:
            Policy.objects.create(**row)
        config_bump(reason="policies")


@pytest.fixture
def key(stack, live):
    issued = active_key(make_user("dev@example.com"), live.free)
    wait_for_key(stack, issued.key)
    return issued


def _converged(stack, check, what: str) -> None:
    """Each gateway worker loads the config on its own: poll until it holds."""
    wait_until(lambda: all(check() for _ in range(4)), timeout=10, what=what)


def test_cors_preflight_is_answered_before_authentication(stack, live, key):
    from gateway.models import Route

    # A route that takes only POST: its preflight (OPTIONS) is still answered.
    Route.objects.create(api=live.api, name="orders", path="/orders", methods="POST")
    _policies(
        live,
        {
            "api": live.api,
            "kind": "cors",
            "config": {
                "origins": [PORTAL],
                "methods": ["GET", "POST"],
                "headers": ["X-API-Key", "Content-Type"],
                "max_age": 120,
            },
        },
    )
    preflight = {
        "Origin": PORTAL,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, content-type",
    }

    def answered() -> bool:
        r = requests.options(stack.gateway_url + "/demo/orders", headers=preflight, timeout=10)
        return r.status_code == 204

    _converged(stack, answered, "the CORS policy")
    r = requests.options(stack.gateway_url + "/demo/orders", headers=preflight, timeout=10)
    assert r.headers["access-control-allow-origin"] == PORTAL
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-max-age"] == "120"
    evil = requests.options(
        stack.gateway_url + "/demo/orders",
        headers={**preflight, "Origin": "https://evil.test"},
        timeout=10,
    )
    assert evil.status_code == 403
    assert "access-control-allow-origin" not in evil.headers
    # Actual requests: the proxied answer and a gateway error both carry the CORS headers,
    # so the browser lets the page read them.
    ok = stack.get("/demo/x", headers={"Origin": PORTAL, "X-API-Key": key.key})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == PORTAL
    assert "Origin" in ok.headers["vary"]
    refused = stack.get("/demo/x", headers={"Origin": PORTAL})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == PORTAL


def test_request_and_response_transformations(stack, live, key):
    _policies(
        live,
        {
            "api": live.api,
            "kind": "request_transform",
            "config": {
                "headers": {
                    "remove": ["X-Debug"],
                    "set": {"X-Consumer-Name": "${consumer}"},
                    "add": {"X-Source": "gateway"},
                },
                "query": {"remove": ["internal"], "add": {"rid": "${request_id}"}},
                "json": {"remove": ["password"], "set": {"meta.consumer": "${consumer}"}},
            },
        },
        {
            "api": live.api,
            "kind": "response_transform",
            "config": {
                "headers": {"remove": ["X-Upstream-Secret"], "add": {"X-Transformed": "yes"}},
                "json": {"remove": ["headers.X-Api-Key", "raw_path"]},
            },
        },
    )
    headers = {"X-API-Key": key.key, "X-Debug": "1", "Content-Type": "application/json"}
    body = json.dumps({"item": "book", "password": "hunter2"})

    def post() -> requests.Response:
        return requests.post(
            stack.gateway_url + "/demo/orders?internal=1&page=2",
            headers=headers,
            data=body,
            timeout=10,
        )

    _converged(stack, lambda: post().headers.get("x-transformed") == "yes", "the policies")
    resp = post()
    assert resp.status_code == 200
    echo = resp.json()
    consumer = str(key.api_key.subscription.consumer_id)
    assert "raw_path" not in echo  # removed from the answer
    sent = echo["headers"]
    assert "X-Debug" not in sent
    assert sent["X-Source"] == "gateway"
    assert sent["X-Consumer-Name"] == consumer
    assert echo["query"] == {"page": "2", "rid": resp.headers["x-request-id"]}
    assert json.loads(echo["body"]) == {"item": "book", "meta": {"consumer": consumer}}
    assert int(resp.headers["content-length"]) == len(resp.content)
    # Not JSON: streams through untouched.
    plain = requests.post(
        stack.gateway_url + "/demo/orders",
        headers={**headers, "Content-Type": "text/plain"},
        data=body,
        timeout=10,
    )
    assert json.loads(plain.json()["body"]) == {"item": "book", "password": "hunter2"}


def test_a_bad_policy_is_refused_in_admin_with_the_field(admin_client, live):
    from gateway.models import Policy

    policy = Policy(api=live.api, kind="cors", config={"origins": []})
    with pytest.raises(Exception) as err:
        policy.full_clean()
    assert "origins" in str(err.value)
    policy = Policy(api=live.api, kind="request_transform", config={"headers": {"set": []}})
    with pytest.raises(Exception) as err:
        policy.full_clean()
    assert "headers.set" in str(err.value)


def test_a_shared_cache_behind_a_consumer_injecting_transform_is_refused(live):
    from gateway.models import Policy

    Policy.objects.create(
        api=live.api,
        kind="request_transform",
        config={"headers": {"set": {"X-Who": "${consumer}"}}},
    )
    shared = Policy(api=live.api, kind="cache", config={"ttl": 5, "share_across_consumers": True})
    with pytest.raises(Exception) as err:
        shared.full_clean()
    assert "share_across_consumers is not allowed" in str(err.value)
    Policy(api=live.api, kind="cache", config={"ttl": 5}).full_clean()  # per consumer: fine
