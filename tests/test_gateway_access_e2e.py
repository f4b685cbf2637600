"""Who may call: IP allow/deny lists, keys in a query parameter, credential forwarding, and
a 403 that names the plans that would do — through the real gateway."""

from __future__ import annotations

import pytest

from tests.conftest import _wait_stable, active_key, make_user, wait_for_key

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def api(stack, live, slug: str, *, plan=True, **fields):
    """A new API /<slug> on the stack's upstream, in the Free plan unless plan=False."""
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Api, Route

    with transaction.atomic():
        a = Api.objects.create(
            name=slug, slug=slug, path_prefix=f"/{slug}", upstream=live.upstream, **fields
        )
        Route.objects.create(api=a, name="all", path="/")
        if plan:
            live.free.apis.add(a)
        config_bump(reason=f"api {slug}")
    _wait_stable(
        stack,
        lambda: stack.get(f"/{slug}/x").status_code != 404,
        timeout=10,
        what=f"the /{slug} API",
    )
    return a


@pytest.fixture
def key(stack, live):
    issued = active_key(make_user("dev@example.com"), live.free)
    wait_for_key(stack, issued.key)
    return issued.key


def test_ip_allow_and_deny_lists(stack, live, key):
    api(stack, live, "lan", ip_allow="10.0.0.0/8, 192.168.0.0/16")
    api(stack, live, "blocked", ip_deny="127.0.0.0/8")
    api(stack, live, "local", ip_allow="127.0.0.0/8\n::1", ip_deny="127.0.0.2")
    h = {"X-API-Key": key}
    for path in ("/lan/x", "/blocked/x"):
        resp = stack.get(path, headers=h)
        assert resp.status_code == 403, resp.text
        assert resp.json()["type"] == "urn:apigw:problem:forbidden"
        assert "127.0.0.1" in resp.json()["detail"]
    # Checked before the key: a denied address learns nothing about credentials.
    assert stack.get("/lan/x").status_code == 403
    assert stack.get("/local/x", headers=h).status_code == 200


def test_key_in_a_query_parameter_only_where_enabled_and_never_forwarded(stack, live, key):
    api(stack, live, "q", key_query_param="api_key")
    resp = stack.get(f"/q/anything?a=1&api_key={key}&b=2")
    assert resp.status_code == 200, resp.text
    echo = resp.json()
    assert echo["query"] == {"a": "1", "b": "2"}
    assert key not in resp.text
    # The demo API does not take keys in the URL.
    assert stack.get(f"/demo/anything?api_key={key}").status_code == 401
    missing = stack.get("/q/anything")
    assert "api_key query parameter" in missing.json()["detail"]


def test_an_api_may_forward_the_credential(stack, live, key):
    api(stack, live, "fwd", forward_credential=True)
    echo = stack.get("/fwd/anything", headers={"X-API-Key": key}).json()
    assert echo["headers"]["X-Api-Key"] == key


def test_a_plan_without_the_api_is_403_naming_the_plans_that_include_it(stack, live, key):
    from portal.models import Plan

    a = api(stack, live, "premium", plan=False)
    gold = Plan.objects.create(name="Gold", slug="gold")
    gold.apis.add(a)
    hidden = Plan.objects.create(name="Internal", slug="internal", is_public=False)
    hidden.apis.add(a)
    from django.db import transaction

    from gateway.config import config_bump

    with transaction.atomic():
        config_bump(reason="plans")
    _wait_stable(
        stack,
        lambda: "gold" in stack.get("/premium/x", headers={"X-API-Key": key}).text,
        timeout=10,
        what="the new plans",
    )
    body = stack.get("/premium/x", headers={"X-API-Key": key}).json()
    assert body["status"] == 403
    assert body["plans"] == ["gold"]  # not the private one
    assert "Plans that do: 'gold'" in body["detail"]
