"""The management REST API (/api/v1/): tokens, permissions, every resource, problems, ETags."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from gateway.config import config_current_version
from tests.conftest import active_key, make_user

pytestmark = pytest.mark.django_db

PROBLEM = "application/problem+json"


def _client(token: str | None = None) -> APIClient:
    client = APIClient()
    if token:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


@pytest.fixture
def admin_user(db):
    from portal.models import User

    return User.objects.create_superuser("root", "root@example.com", "x" * 20)


@pytest.fixture
def writer(admin_user):
    from portal.tokens import token_issue

    return _client(token_issue(admin_user, name="ci", scope="write").raw)


@pytest.fixture
def reader(admin_user):
    from portal.tokens import token_issue

    return _client(token_issue(admin_user, name="dashboards", scope="read").raw)


def _dev_client(email: str, scope: str = "write"):
    from portal.tokens import token_issue

    user = make_user(email)
    return user, _client(token_issue(user, name="mine", scope=scope).raw)


# --- authentication ------------------------------------------------------------------------


def test_without_a_token_the_api_answers_401_problems(catalog):
    resp = _client().get("/api/v1/apis/")
    assert resp.status_code == 401
    assert resp["Content-Type"] == PROBLEM
    assert resp["WWW-Authenticate"].startswith("Bearer")
    body = resp.json()
    assert body["type"] == "urn:apigw:problem:missing-credential" and body["status"] == 401
    resp = _client("gwt_0123456789ab_nope").get("/api/v1/apis/")
    assert resp.status_code == 401
    assert resp.json()["type"] == "urn:apigw:problem:invalid-credential"


def test_tokens_are_stored_hashed_and_stop_working_when_revoked_or_expired(admin_user, catalog):
    from portal.models import ApiToken
    from portal.tokens import token_issue, token_revoke

    issued = token_issue(admin_user, name="t", scope="read")
    row = ApiToken.objects.get(pk=issued.token.pk)
    # the secret is token_urlsafe, which may itself contain "_": split as the parser does
    token_id, _, secret = issued.raw.removeprefix("gwt_").partition("_")
    assert token_id == row.token_id and len(secret) >= 40
    assert secret not in row.digest and issued.raw not in (row.digest, row.token_id)
    client = _client(issued.raw)
    assert client.get("/api/v1/apis/").status_code == 200
    assert ApiToken.objects.get(pk=row.pk).last_used_at is not None
    assert _client(issued.raw[:-1] + "x").get("/api/v1/apis/").status_code == 401
    ApiToken.objects.filter(pk=row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert client.get("/api/v1/apis/").status_code == 401
    ApiToken.objects.filter(pk=row.pk).update(expires_at=timezone.now() + timedelta(days=1))
    token_revoke(row)
    assert client.get("/api/v1/apis/").status_code == 401


def test_a_read_token_reads_and_cannot_write(reader, catalog):
    assert reader.get("/api/v1/upstreams/").status_code == 200
    resp = reader.post("/api/v1/upstreams/", {"name": "nope"}, format="json")
    assert resp.status_code == 403
    assert "read-only" in resp.json()["detail"]


def test_a_portal_users_token_reaches_only_their_own_keys(catalog):
    dev, dev_client = _dev_client("dev@example.com")
    other = make_user("other@example.com")
    mine = active_key(dev, catalog.free, name="mine")
    theirs = active_key(other, catalog.free, name="theirs")
    for path in ("/api/v1/apis/", "/api/v1/upstreams/", "/api/v1/plans/", "/api/v1/consumers/"):
        assert dev_client.get(path).status_code == 403, path
    listed = dev_client.get("/api/v1/keys/").json()["results"]
    assert [k["id"] for k in listed] == [mine.api_key.pk]
    assert dev_client.get(f"/api/v1/keys/{theirs.api_key.pk}/").status_code == 404
    for action in ("revoke", "rotate"):
        resp = dev_client.post(f"/api/v1/keys/{theirs.api_key.pk}/{action}/")
        assert resp.status_code == 404
    assert dev_client.patch(f"/api/v1/keys/{theirs.api_key.pk}/", {"name": "x"}).status_code == 404
    theirs_sub = theirs.api_key.subscription_id
    resp = dev_client.post(
        "/api/v1/keys/", {"subscription": theirs_sub, "name": "sneaky"}, format="json"
    )
    assert resp.status_code == 400
    assert dev_client.get(f"/api/v1/subscriptions/{theirs_sub}/").status_code == 404
    resp = dev_client.get(f"/api/v1/analytics/usage/?dimension=key&id={theirs.api_key.pk}")
    assert resp.status_code == 404
    resp = dev_client.get(f"/api/v1/analytics/usage/?dimension=key&id={mine.api_key.pk}")
    assert resp.status_code == 200 and resp.json()["total"] == 0
    assert dev_client.get("/api/v1/analytics/top/").status_code == 403
    resp = dev_client.get(f"/api/v1/analytics/quota/?subscription={theirs_sub}")
    assert resp.status_code == 404


# --- keys and subscriptions --------------------------------------------------------------------


def test_keys_are_created_shown_once_rotated_and_revoked(catalog):
    from portal.consumers import consumer_for_user
    from portal.keys import key_digest
    from portal.models import ApiKey
    from portal.subscriptions import subscription_create

    dev, client = _dev_client("dev@example.com")
    sub = subscription_create(consumer_for_user(dev), plan=catalog.free)
    before = config_current_version()
    resp = client.post("/api/v1/keys/", {"subscription": sub.pk, "name": "ci"}, format="json")
    assert resp.status_code == 201, resp.content
    assert resp["Cache-Control"] == "no-store"
    created = resp.json()
    raw = created["key"]
    row = ApiKey.objects.get(pk=created["id"])
    assert row.digest == key_digest(raw) and created["prefix"] == row.prefix
    assert config_current_version() == before + 1
    shown = client.get(f"/api/v1/keys/{row.pk}/").json()
    assert "key" not in shown and raw not in str(client.get("/api/v1/keys/").content)
    resp = client.post(f"/api/v1/keys/{row.pk}/rotate/", {"grace_seconds": 3600}, format="json")
    assert resp.status_code == 201
    assert resp.json()["key"] != raw
    row.refresh_from_db()
    assert timedelta(minutes=59) < row.expires_at - timezone.now() <= timedelta(hours=1)
    resp = client.post(f"/api/v1/keys/{row.pk}/rotate/", {"grace_seconds": -1}, format="json")
    assert resp.status_code == 400
    assert resp.json()["errors"][0]["pointer"] == "/grace_seconds"
    resp = client.post(f"/api/v1/keys/{row.pk}/revoke/")
    assert resp.status_code == 200 and resp.json()["revoked_at"]
    resp = client.post(f"/api/v1/keys/{row.pk}/rotate/")
    assert resp.status_code == 409  # a revoked key cannot be rotated
    # Owners rename their keys; scopes are for administrators.
    assert client.patch(f"/api/v1/keys/{row.pk}/", {"name": "renamed"}).status_code == 200
    assert client.patch(f"/api/v1/keys/{row.pk}/", {"scopes": "orders:write"}).status_code == 403


def test_a_key_needs_an_active_subscription(catalog):
    from portal.consumers import consumer_for_user
    from portal.subscriptions import subscription_create

    dev, client = _dev_client("dev@example.com")
    pending = subscription_create(consumer_for_user(dev), plan=catalog.pro)
    resp = client.post("/api/v1/keys/", {"subscription": pending.pk, "name": "x"}, format="json")
    assert resp.status_code == 400
    assert resp.json()["errors"] == [
        {"pointer": "/subscription", "message": "The subscription is pending approval."}
    ]


def test_subscriptions_pending_approval_are_decided_by_administrators(writer, catalog):
    dev, client = _dev_client("dev@example.com")
    resp = client.post("/api/v1/subscriptions/", {"plan": "pro"}, format="json")
    assert resp.status_code == 201, resp.content
    sub = resp.json()
    assert sub["status"] == "pending"
    assert client.post(f"/api/v1/subscriptions/{sub['id']}/approve/").status_code == 403
    resp = writer.post(f"/api/v1/subscriptions/{sub['id']}/approve/")
    assert resp.status_code == 200 and resp.json()["status"] == "active"
    resp = writer.post(f"/api/v1/subscriptions/{sub['id']}/reject/")
    assert resp.status_code == 409
    assert resp.json()["type"] == "urn:apigw:problem:conflict"
    listed = writer.get("/api/v1/subscriptions/?status=active").json()
    assert [s["id"] for s in listed["results"]] == [sub["id"]]
    resp = client.post(f"/api/v1/subscriptions/{sub['id']}/cancel/")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    resp = client.post("/api/v1/subscriptions/", {"plan": "no-such-plan"}, format="json")
    assert resp.status_code == 400


# --- every admin resource: create, read (ETag), conditional write, list, delete ---------------


def _payloads(catalog) -> dict[str, tuple[dict, dict]]:
    """resource -> (what to create, a change to make)."""
    from portal.models import Organization, User

    org = Organization.objects.create(name="Acme", slug="acme")
    user = User.objects.create_user("member", "member@example.com", "x" * 20)
    return {
        "upstreams": ({"name": "billing", "read_timeout": 5}, {"description": "Billing"}),
        "targets": (
            {"upstream": catalog.upstream.pk, "host": "127.0.0.1", "port": 9001},
            {"weight": 50},
        ),
        "apis": (
            {
                "name": "Orders",
                "slug": "orders",
                "path_prefix": "/orders",
                "upstream": catalog.upstream.pk,
            },
            {"description": "Orders API"},
        ),
        "api-versions": ({"api": catalog.api.pk, "name": "v2"}, {"docs_url": "https://x.test/"}),
        "routes": (
            {"api": catalog.api.pk, "name": "orders", "match": "prefix", "path": "/orders/{id}"},
            {"priority": 5},
        ),
        "policies": (
            {"api": catalog.api.pk, "kind": "cors", "config": {"origins": ["https://a.test"]}},
            {"enabled": False},
        ),
        "jwt-issuers": (
            {
                "api": catalog.api.pk,
                "issuer": "https://idp.test/",
                "jwks_url": "https://idp.test/jwks.json",
            },
            {"leeway": 10},
        ),
        "plans": (
            {"name": "Gold", "slug": "gold", "apis": [catalog.api.pk], "quota_limit": 100},
            {"quota_limit": 200},
        ),
        "rate-limits": (
            {"plan": catalog.pro.pk, "limit": 10, "window": "second"},
            {"burst": 5},
        ),
        "organizations": ({"name": "Globex", "slug": "globex"}, {"name": "Globex Corp"}),
        "memberships": (
            {"organization": org.pk, "user": user.pk, "role": "owner"},
            {"role": "member"},
        ),
        "consumers": ({"organization": org.pk, "external_id": "acme-1"}, {"external_id": "acme-2"}),
    }


RESOURCES = [
    "upstreams",
    "targets",
    "apis",
    "api-versions",
    "routes",
    "policies",
    "jwt-issuers",
    "plans",
    "rate-limits",
    "organizations",
    "memberships",
    "consumers",
]


@pytest.mark.parametrize("resource", RESOURCES)
def test_resource_crud_with_etags_bumps_the_config(writer, catalog, resource):
    create, change = _payloads(catalog)[resource]
    base = f"/api/v1/{resource}/"
    v0 = config_current_version()
    resp = writer.post(base, create, format="json")
    assert resp.status_code == 201, resp.content
    pk = resp.json()["id"]
    assert config_current_version() == v0 + 1
    got = writer.get(f"{base}{pk}/")
    assert got.status_code == 200
    etag = got["ETag"]
    assert writer.get(f"{base}{pk}/", HTTP_IF_NONE_MATCH=etag).status_code == 304
    resp = writer.patch(f"{base}{pk}/", change, format="json", HTTP_IF_MATCH='"stale"')
    assert resp.status_code == 412
    assert resp["Content-Type"] == PROBLEM
    assert config_current_version() == v0 + 1  # nothing written
    resp = writer.patch(f"{base}{pk}/", change, format="json", HTTP_IF_MATCH=etag)
    assert resp.status_code == 200, resp.content
    for field, value in change.items():
        assert resp.json()[field] == value
    assert resp["ETag"] != etag
    assert config_current_version() == v0 + 2
    listed = writer.get(f"{base}?ordering=-id&page_size=1")
    assert listed.status_code == 200
    assert listed.json()["results"][0]["id"] == pk
    resp = writer.delete(f"{base}{pk}/", HTTP_IF_MATCH=etag)  # the old tag: refused
    assert resp.status_code == 412
    assert writer.delete(f"{base}{pk}/").status_code == 204
    assert writer.get(f"{base}{pk}/").status_code == 404
    assert config_current_version() == v0 + 3


def test_invalid_input_is_refused_with_pointers_like_admin_refuses_it(writer, catalog):
    resp = writer.post(
        "/api/v1/routes/",
        {"api": catalog.api.pk, "name": "bad", "match": "regex", "path": "(unclosed"},
        format="json",
    )
    assert resp.status_code == 400
    body = resp.json()
    assert resp["Content-Type"] == PROBLEM
    assert body["type"] == "urn:apigw:problem:validation-failed"
    assert [e["pointer"] for e in body["errors"]] == ["/path"]
    resp = writer.post(
        "/api/v1/policies/",
        {
            "api": catalog.api.pk,
            "kind": "request_transform",
            "config": {"headers": {"add": {"Bad Name": "x"}}},
        },
        format="json",
    )
    assert resp.status_code == 400
    assert resp.json()["errors"] == [
        {"pointer": "/config", "message": "headers.add: 'Bad Name' is not a header name."}
    ]
    resp = writer.post("/api/v1/upstreams/", {"name": "echo"}, format="json")  # taken
    assert resp.status_code == 400 and resp.json()["errors"][0]["pointer"] == "/name"
    resp = writer.post("/api/v1/upstreams/", "{not json", content_type="application/json")
    assert resp.status_code == 400 and resp.json()["type"] == "urn:apigw:problem:bad-request"
    resp = writer.get("/api/v1/apis/?ordering=nope")
    assert resp.status_code == 400 and resp.json()["errors"][0]["pointer"] == "/ordering"
    resp = writer.get("/api/v1/apis/?upstream=not-a-number")
    assert resp.status_code == 400 and resp.json()["errors"][0]["pointer"] == "/upstream"
    assert writer.get("/api/v1/apis/?ordering=-name&is_published=true").status_code == 200


def test_deleting_an_upstream_in_use_is_a_conflict(writer, catalog):
    resp = writer.delete(f"/api/v1/upstreams/{catalog.upstream.pk}/")
    assert resp.status_code == 409
    assert "Demo" in resp.json()["detail"]


def test_an_apis_openapi_document_is_read_and_replaced_as_text(writer, catalog):
    doc = (
        "openapi: 3.0.3\ninfo: {title: Demo, version: '1'}\npaths:\n  /ping:\n    get:\n"
        "      responses: {'200': {description: ok}}\n"
    )
    base = f"/api/v1/apis/{catalog.api.pk}/openapi/"
    assert writer.get(base).status_code == 404
    v0 = config_current_version()
    resp = writer.put(base, doc, content_type="application/yaml")
    assert resp.status_code == 204
    assert config_current_version() == v0 + 1
    got = writer.get(base)
    assert got.status_code == 200 and got.content.decode() == doc
    assert got["Content-Type"].startswith("application/yaml")
    assert writer.get(f"/api/v1/apis/{catalog.api.pk}/").json()["has_openapi"] is True
    resp = writer.put(base, "openapi: 3.0.3\npaths: 7\n", content_type="application/yaml")
    assert resp.status_code == 400 and resp.json()["errors"][0]["pointer"] == "/openapi"
    assert writer.get(base).content.decode() == doc
    assert writer.delete(base).status_code == 204
    assert writer.get(base).status_code == 404


def test_cache_purges_and_config_history(writer, catalog):
    v0 = config_current_version()
    resp = writer.post("/api/v1/cache-purges/", {"api": catalog.api.pk}, format="json")
    assert resp.status_code == 202 and resp.json() == {"config_version": v0 + 1}
    resp = writer.post("/api/v1/cache-purges/", {"cache_key": "abc123"}, format="json")
    assert resp.status_code == 202
    assert writer.get("/api/v1/cache-purges/").json()["results"][0]["cache_key"] == "abc123"
    resp = writer.post("/api/v1/cache-purges/", {}, format="json")
    assert resp.status_code == 400
    history = writer.get("/api/v1/config-versions/").json()["results"]
    assert history[0]["version"] == v0 + 2 and "abc123" in history[0]["reason"]
    assert writer.get(f"/api/v1/config-versions/{v0 + 1}/").json()["version"] == v0 + 1


def test_staff_without_model_permissions_are_refused(catalog):
    from django.contrib.auth.models import Permission

    from portal.models import User
    from portal.tokens import token_issue

    staff = User.objects.create_user("ops", "ops@example.com", "x" * 20, is_staff=True)
    client = _client(token_issue(staff, name="ops", scope="write").raw)
    assert client.get("/api/v1/apis/").status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_api"))
    assert client.get("/api/v1/apis/").status_code == 200
    assert client.post("/api/v1/apis/", {}, format="json").status_code == 403


def test_unknown_paths_schema_and_docs(writer, catalog):
    resp = writer.get("/api/v1/nothing-here/")
    assert resp.status_code == 404 and resp["Content-Type"] == PROBLEM
    resp = writer.post("/api/v1/nothing-here/", {}, format="json")  # not a CSRF page
    assert resp.status_code == 404 and resp["Content-Type"] == PROBLEM
    # Only the writes a resource offers are routed: keys are revoked, not deleted, ...
    key = active_key(make_user("k@example.com"), catalog.free).api_key
    assert writer.delete(f"/api/v1/keys/{key.pk}/").status_code == 405
    assert writer.put(f"/api/v1/subscriptions/{key.subscription_id}/", {}).status_code == 405
    assert writer.post("/api/v1/config-versions/", {}, format="json").status_code == 405
    schema = writer.get("/api/schema/?format=json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for resource in [*RESOURCES, "keys", "subscriptions", "cache-purges", "config-versions"]:
        assert f"/api/v1/{resource}/" in paths, resource
    assert "apiToken" in schema.json()["components"]["securitySchemes"]
    docs = writer.get("/api/docs/")
    assert docs.status_code == 200
    assert b"/static/vendor/swagger-ui/swagger-ui-bundle.js" in docs.content
    assert b"cdn." not in docs.content


def test_admin_makes_a_token_and_shows_it_once(admin_client, admin_user, catalog):
    from django.urls import reverse

    from portal.models import ApiToken

    user = admin_user
    resp = admin_client.post(
        reverse("admin:portal_apitoken_add"),
        {
            "user": user.pk,
            "name": "deploy",
            "scope": "write",
            "expires_at_0": "2099-01-01",
            "expires_at_1": "00:00:00",
        },
    )
    assert resp.status_code == 200, resp.content[:2000]
    assert "no-store" in resp["Cache-Control"]
    token = ApiToken.objects.get(name="deploy")
    raw = resp.content.decode().split('id="api-token"')[1].split('value="')[1].split('"')[0]
    assert raw.startswith(token.prefix + "_")
    assert _client(raw).get("/api/v1/apis/").status_code == 200
    page = admin_client.get(reverse("admin:portal_apitoken_change", args=[token.pk]))
    assert raw not in page.content.decode()
