"""Aggregation through the real gateway: parallel calls, one JSON answer, partial failure."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import _wait_stable, active_key, make_user, wait_for_key

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _aggregate_route(live, *, name: str, calls: dict, on_error: str = "fail"):
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Policy, Route

    with transaction.atomic():
        route = Route.objects.create(api=live.api, name=name, path=f"/{name}/{{id}}")
        Policy.objects.create(
            route=route, kind="aggregate", config={"calls": calls, "on_error": on_error}
        )
        config_bump(reason="aggregate route")
    return route


@pytest.fixture
def key(stack, live):
    issued = active_key(make_user("dev@example.com"), live.free)
    wait_for_key(stack, issued.key)
    return {"X-API-Key": issued.key}


def test_three_calls_that_each_wait_for_the_others_succeed_together(stack, live, key):
    """Each upstream endpoint holds its answer until all three requests have arrived, so
    the aggregate answers only if the gateway called them in parallel."""
    calls = {
        n: {"upstream": "echo", "path": f"/_barrier/{n}?key={{id}}&n=3", "timeout": 8}
        for n in ("profile", "orders", "invoices")
    }
    _aggregate_route(live, name="dashboard", calls=calls)
    first = uuid.uuid4().hex
    # The catch-all route answers until every worker has the new one: poll on the shape
    # until it holds on consecutive requests (workers rebuild their snapshots independently).
    _wait_stable(
        stack,
        lambda: "orders" in stack.get(f"/demo/dashboard/{uuid.uuid4().hex}", headers=key).json(),
        timeout=15,
        what="the aggregate route",
    )
    resp = stack.get(f"/demo/dashboard/{first}", headers=key)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"profile", "orders", "invoices"}
    assert body["orders"] == {"name": "orders", "arrived": 3}
    assert resp.headers["x-request-id"]


def test_partial_failure_follows_the_routes_policy(stack, live, key):
    good = {"upstream": "echo", "path": "/users/{id}", "timeout": 5}
    broken = {"upstream": "echo", "path": "/status/503", "timeout": 5}
    slow = {"upstream": "echo", "path": "/delay/3", "timeout": 0.3}
    _aggregate_route(live, name="strict", calls={"user": good, "billing": broken})
    _aggregate_route(live, name="lenient", calls={"user": good, "slow": slow}, on_error="partial")
    _wait_stable(
        stack,
        lambda: all(
            "user" in stack.get(p, headers=key).json()
            or "billing" in stack.get(p, headers=key).json().get("errors", {})
            for p in ("/demo/lenient/7", "/demo/strict/7")
            for _ in range(2)
        ),
        timeout=15,
        what="the aggregate routes",
    )
    lenient = stack.get("/demo/lenient/7", headers=key).json()
    assert lenient["user"]["path"] == "/users/7"
    assert lenient["user"]["headers"]["X-Consumer-Id"]
    assert lenient["errors"]["slow"]["detail"] == "no answer within 0.3 s"
    strict = stack.get("/demo/strict/7", headers=key)
    assert strict.status_code == 502
    problem = strict.json()
    assert problem["type"] == "urn:apigw:problem:bad-gateway"
    assert problem["errors"]["billing"]["status"] == 503
    assert "billing" in problem["detail"]


def test_an_aggregate_naming_an_unknown_upstream_is_refused(live):
    from gateway.models import Policy, Route

    route = Route.objects.create(api=live.api, name="x", path="/x")
    bad = Policy(
        route=route,
        kind="aggregate",
        config={"calls": {"a": {"upstream": "nope", "path": "/a"}}},
    )
    with pytest.raises(Exception) as err:
        bad.full_clean()
    assert "no upstream named 'nope'" in str(err.value)
    on_api = Policy(
        api=live.api, kind="aggregate", config={"calls": {"a": {"upstream": "echo", "path": "/"}}}
    )
    with pytest.raises(Exception, match="configured on a route"):
        on_api.full_clean()
