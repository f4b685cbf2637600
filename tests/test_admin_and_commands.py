"""Django admin pages and actions; management commands."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from gateway.config import config_current_version
from gateway.models import Api, Route, Upstream
from portal.keys import key_digest
from portal.models import ApiKey, Plan, Subscription, User
from tests.conftest import active_key

pytestmark = pytest.mark.django_db

MODELS = [
    "gateway/api",
    "gateway/route",
    "gateway/upstream",
    "gateway/target",
    "gateway/configversion",
    "gateway/cachepurge",
    "portal/plan",
    "portal/apikey",
    "portal/subscription",
    "portal/organization",
    "portal/consumer",
    "portal/user",
    "portal/auditevent",
    "analytics/requestevent",
    "analytics/rollup",
]


@pytest.mark.parametrize("model", MODELS)
def test_admin_changelists_render_with_search(admin_client, developer, catalog, model):
    active_key(developer, catalog.free)
    url = f"/admin/{model}/"
    assert admin_client.get(url).status_code == 200
    assert admin_client.get(url, {"q": "demo"}).status_code == 200


def test_admin_revoke_action_revokes_and_bumps_the_config(admin_client, developer, catalog):
    issued = active_key(developer, catalog.free)
    before = config_current_version()
    resp = admin_client.post(
        reverse("admin:portal_apikey_changelist"),
        {"action": "revoke", "_selected_action": [issued.api_key.pk]},
    )
    assert resp.status_code == 302
    assert ApiKey.objects.get(pk=issued.api_key.pk).revoked_at is not None
    assert config_current_version() == before + 1


def test_admin_approves_pending_subscriptions(admin_client, developer, catalog):
    from portal.consumers import consumer_for_user
    from portal.subscriptions import subscription_create

    sub = subscription_create(consumer_for_user(developer), plan=catalog.pro)
    admin_client.post(
        reverse("admin:portal_subscription_changelist"),
        {"action": "approve", "_selected_action": [sub.pk]},
    )
    assert Subscription.objects.get(pk=sub.pk).status == "active"


def _api_form(catalog, **overrides) -> dict:
    """The API admin form for /demo on the catalog's upstream, with no inline rows."""
    form = {
        "description": "",
        "path_prefix": "/demo",
        "upstream": catalog.upstream.pk,
        "key_header": "X-API-Key",
        "limiter_failure": "open",
        "version_scheme": "none",
        "version_header": "API-Version",
        "version_query": "version",
        "routes-TOTAL_FORMS": "0",
        "routes-INITIAL_FORMS": "0",
        "versions-TOTAL_FORMS": "0",
        "versions-INITIAL_FORMS": "0",
        "jwt_issuers-TOTAL_FORMS": "0",
        "jwt_issuers-INITIAL_FORMS": "0",
        "policies-TOTAL_FORMS": "0",
        "policies-INITIAL_FORMS": "0",
        "auth_methods": "key",
    }
    form.update(overrides)
    return form


def test_admin_edit_of_an_api_bumps_the_config(admin_client, catalog):
    before = config_current_version()
    api = catalog.api
    resp = admin_client.post(
        reverse("admin:gateway_api_change", args=[api.pk]),
        _api_form(catalog, name="Demo renamed", slug=api.slug, is_published="on"),
    )
    assert resp.status_code == 302, resp.content[:2000]
    assert Api.objects.get(pk=api.pk).name == "Demo renamed"
    assert config_current_version() == before + 1


def test_admin_refuses_a_bad_path_prefix_with_a_message(admin_client, catalog):
    resp = admin_client.post(
        reverse("admin:gateway_api_add"),
        {
            "name": "Bad",
            "slug": "bad",
            "path_prefix": "no-slash/",
            "upstream": catalog.upstream.pk,
            "key_header": "X-API-Key",
            "limiter_failure": "open",
            "routes-TOTAL_FORMS": "0",
            "routes-INITIAL_FORMS": "0",
        },
    )
    assert resp.status_code == 200
    assert b"starts with" in resp.content.lower() or b"start with" in resp.content.lower()


def test_createapikey_creates_user_subscribes_and_prints_a_key_once(catalog):
    out = io.StringIO()
    call_command("createapikey", email="Script@Example.com", plan="free", stdout=out)
    key = out.getvalue().strip()
    user = User.objects.get(email="Script@example.com")
    row = ApiKey.objects.get(subscription__consumer__user=user)
    assert row.digest == key_digest(key)
    out2 = io.StringIO()
    call_command("createapikey", email="script@example.com", plan="free", stdout=out2)
    assert out2.getvalue().strip() != key
    assert User.objects.filter(email__iexact="script@example.com").count() == 1
    assert Subscription.objects.filter(consumer__user=user).count() == 1


def test_createapikey_refuses_unknown_plan_and_unapproved_plan(catalog):
    with pytest.raises(CommandError, match="No plan 'gold'"):
        call_command("createapikey", email="a@example.com", plan="gold")
    with pytest.raises(CommandError, match="needs approval"):
        call_command("createapikey", email="a@example.com", plan="pro")
    out = io.StringIO()
    call_command("createapikey", email="a@example.com", plan="pro", approve=True, stdout=out)
    assert out.getvalue().startswith("gw_")


def test_seeddemo_is_idempotent(monkeypatch):
    monkeypatch.setenv("ADMIN_PASSWORD", "a-long-admin-password-1")
    out = io.StringIO()
    call_command("seeddemo", stdout=out)
    assert "a-long-admin-password-1" not in out.getvalue()  # taken from env: not printed
    call_command("seeddemo", stdout=io.StringIO())
    assert Api.objects.count() == 1
    assert Upstream.objects.count() == 1
    assert set(Plan.objects.values_list("slug", flat=True)) == {"free", "pro"}
    assert User.objects.get(username="admin").check_password("a-long-admin-password-1")


def test_seeddemo_prints_a_generated_admin_password_once(monkeypatch):
    monkeypatch.delenv("ADMIN_PASSWORD", raising=False)
    out = io.StringIO()
    call_command("seeddemo", stdout=out)
    assert "Admin account created: admin / " in out.getvalue()
    again = io.StringIO()
    call_command("seeddemo", stdout=again)
    assert "Admin account created" not in again.getvalue()


def _route_form(catalog, **overrides) -> dict:
    form = {
        "api": catalog.api.pk,
        "name": "orders",
        "enabled": "on",
        "match": "prefix",
        "path": "/orders/{id}",
        "methods": "",
        "hosts": "",
        "headers": "",
        "priority": "0",
        "strip_prefix": "on",
        "rewrite": "",
        "retries": "1",
        "rate_limits-TOTAL_FORMS": "0",
        "rate_limits-INITIAL_FORMS": "0",
        "policies-TOTAL_FORMS": "0",
        "policies-INITIAL_FORMS": "0",
    }
    form.update(overrides)
    return form


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"match": "regex", "path": "/(unclosed"}, "path", "Not a valid regular expression"),
        ({"rewrite": "/internal/{sku}"}, "rewrite", "is not captured by the path"),
        ({"headers": "X-Tenant blue"}, "headers", "expected"),
        ({"hosts": "api.example.com:8080"}, "hosts", "is not a host name"),
        ({"methods": "GET,PO ST"}, "methods", "is not an HTTP method"),
    ],
)
def test_admin_refuses_a_route_the_gateway_could_not_compile(
    admin_client, catalog, overrides, field, message
):
    before = config_current_version()
    resp = admin_client.post(reverse("admin:gateway_route_add"), _route_form(catalog, **overrides))
    assert resp.status_code == 200
    errors = resp.context["adminform"].form.errors
    assert message in " ".join(errors[field]), errors
    assert config_current_version() == before


def test_admin_saves_a_templated_route_with_a_rewrite(admin_client, catalog):
    resp = admin_client.post(
        reverse("admin:gateway_route_add"), _route_form(catalog, rewrite="/internal/{id}")
    )
    assert resp.status_code == 302, resp.content[:3000]
    assert Route.objects.filter(path="/orders/{id}", rewrite="/internal/{id}").exists()


def test_two_apis_may_share_a_prefix_only_on_different_hosts(admin_client, catalog):
    form = _api_form(catalog, name="Demo EU", slug="demo-eu", hosts="")
    resp = admin_client.post(reverse("admin:gateway_api_add"), form)
    assert resp.status_code == 200
    assert "already serves /demo" in str(resp.context["adminform"].form.errors)
    Api.objects.filter(pk=catalog.api.pk).update(hosts="api.example.com")
    resp = admin_client.post(reverse("admin:gateway_api_add"), {**form, "hosts": "eu.example.com"})
    assert resp.status_code == 302


def test_admin_saves_route_rate_limits_and_refuses_a_key_limit_on_an_anonymous_route(
    admin_client, catalog
):
    from portal.models import RateLimit

    form = _route_form(
        catalog,
        **{
            "rate_limits-TOTAL_FORMS": "1",
            "rate_limits-0-plan": str(catalog.free.pk),
            "rate_limits-0-scope": "key",
            "rate_limits-0-limit": "5",
            "rate_limits-0-window": "second",
            "rate_limits-0-burst": "2",
        },
    )
    before = config_current_version()
    resp = admin_client.post(reverse("admin:gateway_route_add"), form)
    assert resp.status_code == 302, resp.content[:3000]
    rule = RateLimit.objects.get(route__name="orders")
    assert (rule.plan, rule.limit, rule.window, rule.burst) == (catalog.free, 5, "second", 2)
    assert config_current_version() == before + 1

    anonymous = _route_form(
        catalog,
        name="public",
        path="/public",
        anonymous="on",
        **{
            "rate_limits-TOTAL_FORMS": "1",
            "rate_limits-0-scope": "key",
            "rate_limits-0-limit": "5",
            "rate_limits-0-window": "second",
            "rate_limits-0-burst": "0",
        },
    )
    resp = admin_client.post(reverse("admin:gateway_route_add"), anonymous)
    assert resp.status_code == 200
    assert b"limit them per client IP" in resp.content
    assert not Route.objects.filter(name="public").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"algorithms": "none"}, "none"),
        ({"algorithms": "RS256"}, "jwks"),
        ({"algorithms": "HS256", "static_jwks": '{"keys": [{"kty": "oct", "k": "c2hvcnQ"}]}'}, ""),
    ],
)
def test_admin_refuses_a_jwt_issuer_the_gateway_could_not_use(
    admin_client, catalog, fields, message
):
    from gateway.models import JwtIssuer

    form = _api_form(
        catalog,
        name="Demo",
        slug=catalog.api.slug,
        auth_methods="jwt",
        **{
            "jwt_issuers-TOTAL_FORMS": "1",
            "jwt_issuers-0-issuer": "https://idp.example.test/",
            "jwt_issuers-0-jwks_url": "",
            "jwt_issuers-0-static_jwks": "null",
            "jwt_issuers-0-audiences": "",
            "jwt_issuers-0-leeway": "30",
            "jwt_issuers-0-typ": "",
            "jwt_issuers-0-consumer_claim": "sub",
            "jwt_issuers-0-enabled": "on",
            **{f"jwt_issuers-0-{k}": v for k, v in fields.items()},
        },
    )
    resp = admin_client.post(reverse("admin:gateway_api_change", args=[catalog.api.pk]), form)
    assert resp.status_code == 200, resp.content[:2000]
    assert b"errornote" in resp.content or b"errorlist" in resp.content
    assert message.encode() in resp.content.lower()
    assert not JwtIssuer.objects.exists()


def test_admin_saves_a_jwt_issuer_with_a_jwks_url(admin_client, catalog):
    from gateway.models import JwtIssuer

    form = _api_form(
        catalog,
        name="Demo",
        slug=catalog.api.slug,
        auth_methods="any",
        **{
            "jwt_issuers-TOTAL_FORMS": "1",
            "jwt_issuers-0-issuer": "https://idp.example.test/",
            "jwt_issuers-0-algorithms": "RS256, ES256",
            "jwt_issuers-0-jwks_url": "https://idp.example.test/jwks.json",
            "jwt_issuers-0-static_jwks": "null",
            "jwt_issuers-0-audiences": "orders",
            "jwt_issuers-0-leeway": "30",
            "jwt_issuers-0-typ": "",
            "jwt_issuers-0-consumer_claim": "sub",
            "jwt_issuers-0-enabled": "on",
        },
    )
    resp = admin_client.post(reverse("admin:gateway_api_change", args=[catalog.api.pk]), form)
    assert resp.status_code == 302, resp.content[:3000]
    issuer = JwtIssuer.objects.get()
    assert issuer.provider_config().algorithms == ("RS256", "ES256")


def test_the_plans_page_lists_each_plans_rate_limits(client, catalog):
    resp = client.get(reverse("portal:plans"))
    assert b"1000/minute + 999 burst per key" in resp.content


def test_admin_saves_a_policy_and_refuses_a_bad_one_naming_the_field(admin_client, catalog):
    from gateway.models import Policy

    def post(config: str):
        form = _api_form(
            catalog,
            name="Demo",
            slug=catalog.api.slug,
            **{
                "policies-TOTAL_FORMS": "1",
                "policies-0-kind": "request_transform",
                "policies-0-config": config,
                "policies-0-enabled": "on",
            },
        )
        return admin_client.post(reverse("admin:gateway_api_change", args=[catalog.api.pk]), form)

    before = config_current_version()
    resp = post('{"headers": {"add": {"Bad Name": "x"}}}')
    assert resp.status_code == 200
    assert b"headers.add: &#x27;Bad Name&#x27; is not a header name" in resp.content
    assert not Policy.objects.exists() and config_current_version() == before
    resp = post('{"headers": {"add": {"X-Source": "gateway"}}}')
    assert resp.status_code == 302, resp.content[:2000]
    assert Policy.objects.get().config == {"headers": {"add": {"X-Source": "gateway"}}}
    assert config_current_version() == before + 1


def test_admin_takes_an_openapi_document_as_an_uploaded_file(admin_client, catalog):
    from django.core.files.uploadedfile import SimpleUploadedFile

    doc = (
        "openapi: 3.0.3\n"
        "info: {title: Demo, version: '1'}\n"
        "paths:\n"
        "  /orders/{id}:\n"
        "    get:\n"
        "      parameters: [{name: id, in: path, required: true, schema: {type: integer}}]\n"
        "      responses: {'200': {description: ok}}\n"
    )

    def post(content: bytes, name: str = "orders.yaml", **extra):
        form = _api_form(
            catalog,
            name="Demo",
            slug=catalog.api.slug,
            openapi_file=SimpleUploadedFile(name, content, content_type="application/yaml"),
            **extra,
        )
        return admin_client.post(reverse("admin:gateway_api_change", args=[catalog.api.pk]), form)

    page = admin_client.get(reverse("admin:gateway_api_change", args=[catalog.api.pk]))
    assert b'enctype="multipart/form-data"' in page.content
    assert b'name="openapi_file"' in page.content
    before = config_current_version()
    resp = post(b"openapi: 3.0.3\npaths: [not, a, mapping]\n")
    assert resp.status_code == 200
    assert b"errorlist" in resp.content  # refused on the document's field, nothing saved
    assert Api.objects.get(pk=catalog.api.pk).openapi == ""
    resp = post(b"\xff\xfe not utf-8")
    assert b"The file is not UTF-8 text." in resp.content
    resp = post(doc.encode(), openapi="ignored: the file wins")
    assert resp.status_code == 302, resp.content[:2000]
    assert Api.objects.get(pk=catalog.api.pk).openapi == doc
    assert config_current_version() == before + 1
    # A version's document uploads the same way (the inline form).
    resp = admin_client.post(
        reverse("admin:gateway_api_change", args=[catalog.api.pk]),
        _api_form(
            catalog,
            name="Demo",
            slug=catalog.api.slug,
            openapi=doc,
            version_scheme="path",
            **{
                "versions-TOTAL_FORMS": "1",
                "versions-0-name": "v1",
                "versions-0-is_default": "on",
                "versions-0-openapi_file": SimpleUploadedFile("v1.yaml", doc.encode()),
            },
        ),
    )
    assert resp.status_code == 302, resp.content[:2000]
    assert catalog.api.versions.get().openapi == doc
