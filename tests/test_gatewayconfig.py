"""Declarative configuration: `manage.py gatewayconfig export | diff | apply | rollback`."""

from __future__ import annotations

import io
import os
import stat
from datetime import UTC, datetime

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from gateway.config import config_current_version
from tests.conftest import active_key, make_catalog, make_user

pytestmark = pytest.mark.django_db

OPENAPI = (
    "openapi: 3.0.3\n"
    "info: {title: Demo, version: '1'}\n"
    "paths:\n"
    "  /orders/{id}:\n"
    "    get:\n"
    "      parameters: [{name: id, in: path, required: true, schema: {type: integer}}]\n"
    "      responses: {'200': {description: ok}}\n"
)


def gc(*args, stdin: str | None = None) -> str:
    out, err = io.StringIO(), io.StringIO()
    if stdin is not None:
        import sys

        old, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        call_command("gatewayconfig", *args, stdout=out, stderr=err)
    finally:
        if stdin is not None:
            sys.stdin = old
    return out.getvalue() + err.getvalue()


def rich_config():
    """Every kind of object the file holds, with non-default values and a secret."""
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Api, ApiVersion, JwtIssuer, Policy, Route, Target, Upstream
    from portal.models import Plan, RateLimit

    catalog = make_catalog()
    with transaction.atomic():
        billing = Upstream.objects.create(
            name="billing", algorithm="least_connections", health_path="/healthz"
        )
        Target.objects.create(upstream=billing, host="10.0.0.2", port=8443, weight=50)
        Target.objects.create(upstream=billing, host="10.0.0.1", port=8443, enabled=False)
        api = Api.objects.create(
            name="Orders",
            slug="orders",
            path_prefix="/orders",
            upstream=billing,
            version_scheme="header",
            version_header="X-Api-Version",
            openapi=OPENAPI,
            auth_methods="any",
        )
        v1 = ApiVersion.objects.create(
            api=api,
            name="v1",
            deprecated_at=datetime(2027, 1, 1, tzinfo=UTC),
            sunset_at=datetime(2027, 6, 30, 12, 0, tzinfo=UTC),
            docs_url="https://docs.example.com/v1",
        )
        ApiVersion.objects.create(api=api, name="v2", is_default=True, upstream=catalog.upstream)
        JwtIssuer.objects.create(
            api=api,
            issuer="https://id.example.com",
            algorithms="HS256",
            static_jwks={
                "keys": [
                    {
                        "kty": "oct",
                        "kid": "main",
                        "k": "YS0zMi1ieXRlLWxvbmctaG1hYy1zZWNyZXQtdmFsdWUh",
                    }
                ]
            },
            audiences="orders",
        )
        Policy.objects.create(api=api, kind="cors", config={"origins": ["https://app.example"]})
        route = Route.objects.create(
            api=api, name="get-order", path="/{id}", methods="GET", version=v1, priority=5
        )
        Route.objects.create(api=api, name="create", path="/", methods="POST", retries=0)
        Policy.objects.create(
            route=route,
            kind="request_transform",
            config={"headers": {"set": {"X-Upstream-Auth": "Bearer t0ps3cret"}}},
        )
        Policy.objects.create(route=route, kind="cache", config={"ttl": 30})
        gold = Plan.objects.create(name="Gold", slug="gold", quota_limit=5, quota_period="day")
        gold.apis.add(api, catalog.api)
        RateLimit.objects.create(plan=gold, limit=10, window="second", burst=5)
        RateLimit.objects.create(route=route, plan=gold, limit=2, window="second", burst=0)
        RateLimit.objects.create(
            route=route, scope="client_ip", limit=100, window="minute", burst=10
        )
        config_bump(reason="rich config")
    return catalog


def wipe_config():
    from gateway.models import Api, Upstream
    from portal.models import Plan

    Api.objects.all().delete()
    Plan.objects.all().delete()
    Upstream.objects.all().delete()


def export(tmp_path, name="gateway.yaml", *extra) -> tuple[str, str]:
    path = tmp_path / name
    out = gc("export", "-o", str(path), *extra)
    return path.read_text(), out


def test_round_trip_through_an_empty_database(tmp_path, monkeypatch):
    rich_config()
    text, out = export(tmp_path, "gateway.yaml", "--secrets-env", str(tmp_path / "s.env"))
    # Secrets are references, their values only in the 0600 env file.
    assert "t0ps3cret" not in text and "YS0zMi1ieXRlLWxvbmctaG1hYy1zZWNyZXQtdmFsdWUh" not in text
    assert "${APIGW_SECRET_" in text and "2 secret(s)" in out
    env_file = tmp_path / "s.env"
    assert stat.S_IMODE(os.stat(env_file).st_mode) == 0o600
    for line in env_file.read_text().splitlines():
        name, _, value = line.partition("=")
        monkeypatch.setenv(name, value)
    assert "openapi: |" in text and "deprecated_at: '2027-01-01T00:00:00Z'" in text

    wipe_config()
    v0 = config_current_version()
    out = gc("apply", "-f", str(tmp_path / "gateway.yaml"))
    assert "+ api orders" in out and "+ route orders/get-order" in out
    assert config_current_version() == v0 + 1  # one version for the whole file
    again, _ = export(tmp_path, "again.yaml")
    assert again == text

    from gateway.models import JwtIssuer, Policy

    assert (
        JwtIssuer.objects.get().static_jwks["keys"][0]["k"]
        == "YS0zMi1ieXRlLWxvbmctaG1hYy1zZWNyZXQtdmFsdWUh"
    )
    transform = Policy.objects.get(kind="request_transform")
    assert transform.config["headers"]["set"]["X-Upstream-Auth"] == "Bearer t0ps3cret"

    # Idempotent: nothing to change, no new version.
    assert gc("apply", "-f", str(tmp_path / "gateway.yaml")).strip() == "No changes."
    assert config_current_version() == v0 + 1


def test_diff_shows_changes_and_changes_nothing(tmp_path):
    rich_config()
    text, _ = export(tmp_path, "gateway.yaml", "--inline-secrets")
    edited = text.replace("weight: 50", "weight: 60").replace("- name: create\n", "- name: made\n")
    (tmp_path / "edited.yaml").write_text(edited)
    v0 = config_current_version()
    out = gc("diff", "-f", str(tmp_path / "edited.yaml"))
    assert "~ target billing/10.0.0.2:8443: weight: 50 → 60" in out
    assert "+ route orders/made" in out and "- route orders/create" in out
    assert config_current_version() == v0
    from gateway.models import Route

    assert Route.objects.filter(name="create").exists()
    with pytest.raises(SystemExit) as exited:
        gc("diff", "-f", str(tmp_path / "edited.yaml"), "--exit-code")
    assert exited.value.code == 2
    # Removing needs --yes when nobody can be asked.
    with pytest.raises(CommandError, match="1 object.s. would be removed"):
        gc("apply", "-f", str(tmp_path / "edited.yaml"))
    assert Route.objects.filter(name="create").exists()
    out = gc("apply", "-f", str(tmp_path / "edited.yaml"), "--yes")
    assert "Applied 3 change(s)" in out
    assert not Route.objects.filter(name="create").exists()
    assert Route.objects.filter(name="made", api__slug="orders").exists()


def test_secrets_never_reach_the_diff(tmp_path):
    rich_config()
    text, _ = export(tmp_path, "gateway.yaml", "--inline-secrets")
    edited = text.replace("Bearer t0ps3cret", "Bearer n3wsecret")
    (tmp_path / "edited.yaml").write_text(edited)
    out = gc("diff", "-f", str(tmp_path / "edited.yaml"))
    assert "~ policy orders/get-order/request_transform" in out
    assert "secret" not in out.replace("~ policy", "").lower().replace("x-upstream-auth", "")


ERRORS = [
    # (edit, the line it is on, what the message says)
    (
        ("port: 8443\n    weight: 50", "port: 8443\n    weight: lots"),
        "targets[1].weight",
        "integer",
    ),
    (("  name: Gold\n", "  name: Gold\n  colour: gold\n"), "plans[1].colour", "unknown field"),
    (("  path: /{id}\n", "  path: /{id\n"), "routes[1].path", ""),
    (("upstream: billing\n", "upstream: nowhere\n"), "apis[1].upstream", "no upstream named"),
    (("- name: get-order\n", "- name: create\n"), "routes[1]", "a second route"),
    (("Bearer t0ps3cret", "Bearer ${NOT_SET_ANYWHERE}"), "Auth", "NOT_SET_ANYWHERE is not set"),
]


@pytest.mark.parametrize(("edit", "where", "message"), ERRORS)
def test_errors_name_the_file_line_and_field(tmp_path, edit, where, message):
    rich_config()
    text, _ = export(tmp_path, "gateway.yaml", "--inline-secrets")
    old, new = edit
    assert old in text
    broken = text.replace(old, new, 1)
    (tmp_path / "broken.yaml").write_text(broken)
    changed_line = next(
        i
        for i, (a, b) in enumerate(zip(text.splitlines(), broken.splitlines(), strict=True), 1)
        if a != b
    )
    v0 = config_current_version()
    with pytest.raises(CommandError) as err:
        gc("apply", "-f", str(tmp_path / "broken.yaml"), "--yes")
    first = str(err.value).splitlines()[0]
    file_line, _, rest = first.partition(": ")
    assert file_line == f"{tmp_path / 'broken.yaml'}:{changed_line}", first
    assert where in rest and message in rest, first
    assert config_current_version() == v0


def test_a_file_applies_whole_or_not_at_all(tmp_path):
    rich_config()
    text, _ = export(tmp_path, "gateway.yaml", "--inline-secrets")
    # A valid change (weight) and one the snapshot compiler refuses (a cache shared across
    # consumers behind a transformation that injects consumer context).
    broken = (
        text.replace("weight: 50", "weight: 70")
        .replace("Bearer t0ps3cret", "${consumer}")
        .replace("ttl: 30", "ttl: 30\n        share_across_consumers: true")
    )
    (tmp_path / "broken.yaml").write_text(broken)
    v0 = config_current_version()
    with pytest.raises(CommandError, match="share_across_consumers"):
        gc("apply", "-f", str(tmp_path / "broken.yaml"))
    from gateway.models import Target

    assert Target.objects.get(host="10.0.0.2").weight == 50
    assert config_current_version() == v0


def test_a_plan_with_subscriptions_is_not_removed_by_a_file(tmp_path):
    catalog = rich_config()
    active_key(make_user("dev@example.com"), catalog.free)
    text, _ = export(tmp_path, "gateway.yaml", "--inline-secrets")
    start = text.index("- slug: free")
    end = text.index("- slug: gold")
    (tmp_path / "nofree.yaml").write_text(text[:start] + text[end:])
    with pytest.raises(CommandError, match="plan free: is not in the file but cannot be removed"):
        gc("apply", "-f", str(tmp_path / "nofree.yaml"), "--yes")
    from portal.models import Plan

    assert Plan.objects.filter(slug="free").exists()


def test_rollback_restores_a_versions_configuration(tmp_path, admin_client):
    rich_config()
    v1 = config_current_version()
    first, _ = export(tmp_path, "first.yaml", "--inline-secrets")
    (tmp_path / "second.yaml").write_text(
        first.replace("weight: 50", "weight: 90").replace("quota_limit: 5\n", "quota_limit: 6\n")
    )
    gc("apply", "-f", str(tmp_path / "second.yaml"))
    # An admin change with a many-to-many field: its version holds the whole change.
    from django.urls import reverse

    from gateway.models import ConfigVersion
    from portal.models import Plan

    gold = Plan.objects.get(slug="gold")
    resp = admin_client.post(
        reverse("admin:portal_plan_change", args=[gold.pk]),
        {
            "name": "Gold",
            "slug": "gold",
            "description": "",
            "quota_limit": "6",
            "quota_period": "day",
            "is_public": "on",
            "apis": [gold.apis.get(slug="orders").pk],
            "rate_limits-TOTAL_FORMS": "1",
            "rate_limits-INITIAL_FORMS": "1",
            "rate_limits-0-id": gold.rate_limits.get(route=None).pk,
            "rate_limits-0-plan": gold.pk,
            "rate_limits-0-scope": "key",
            "rate_limits-0-window": "second",
            "rate_limits-0-limit": "10",
            "rate_limits-0-burst": "5",
        },
    )
    assert resp.status_code == 302, resp.content[:3000]
    after_admin = config_current_version()
    assert [a.slug for a in gold.apis.all()] == ["orders"]
    text_admin, _ = export(tmp_path, "admin.yaml", "--inline-secrets")

    out = gc("rollback", str(v1), "--yes")
    assert "~ target billing/10.0.0.2:8443: weight: 90 → 50" in out
    restored, _ = export(tmp_path, "restored.yaml", "--inline-secrets")
    assert restored == first
    latest = ConfigVersion.objects.order_by("-version").first()
    assert latest.reason.startswith(f"rollback to v{v1} (gatewayconfig)")
    # And forward again, to the version the admin made.
    gc("rollback", str(after_admin), "--yes")
    assert export(tmp_path, "forward.yaml", "--inline-secrets")[0] == text_admin
    with pytest.raises(CommandError, match="no configuration is stored"):
        gc("rollback", "0")


def test_apply_reads_standard_input_and_refuses_non_yaml():
    make_catalog()
    text = gc("export")
    assert gc("diff", "-f", "-", stdin=text).strip() == "No changes."
    with pytest.raises(CommandError, match=r"stdin:\d+: not YAML"):
        gc("diff", "-f", "-", stdin="apis: [\n  - {slug: x\n")
    with pytest.raises(CommandError, match="format must be 'apigw/v1'"):
        gc("diff", "-f", "-", stdin="apis: []\n")


def test_a_version_is_read_and_restored_over_rest_and_in_admin(tmp_path, admin_user, admin_client):
    from django.contrib.auth.models import Permission
    from django.urls import reverse
    from rest_framework.test import APIClient

    from gateway.models import ConfigVersion, Target
    from portal.models import User
    from portal.tokens import token_issue

    def client(user, scope="write"):
        c = APIClient()
        c.credentials(HTTP_AUTHORIZATION=f"Bearer {token_issue(user, name='t', scope=scope).raw}")
        return c

    rich_config()
    v1 = config_current_version()
    text, _ = export(tmp_path, "first.yaml", "--inline-secrets")
    (tmp_path / "second.yaml").write_text(text.replace("weight: 50", "weight: 90"))
    gc("apply", "-f", str(tmp_path / "second.yaml"))
    v2 = config_current_version()

    root = client(admin_user)
    listed = root.get("/api/v1/config-versions/").json()["results"]
    assert listed[0]["version"] == v2 and listed[0]["restorable"] is True
    doc = root.get(f"/api/v1/config-versions/{v1}/document/")
    assert doc.status_code == 200 and doc["Content-Type"].startswith("application/yaml")
    assert "weight: 50" in doc.content.decode() and "t0ps3cret" not in doc.content.decode()

    url = f"/api/v1/config-versions/{v1}/restore/"
    preview = root.post(url, {"dry_run": True}, format="json").json()
    assert preview["config_version"] is None
    assert preview["changes"] == ["~ target billing/10.0.0.2:8443: weight: 90 → 50"]
    assert Target.objects.get(host="10.0.0.2").weight == 90
    assert client(admin_user, "read").post(url, {}, format="json").status_code == 403
    ops = User.objects.create_user("ops", "ops@example.com", "x" * 20, is_staff=True)
    ops.user_permissions.add(Permission.objects.get(codename="view_configversion"))
    assert client(ops).post(url, {}, format="json").status_code == 403
    done = root.post(url, {}, format="json").json()
    assert done["config_version"] == v2 + 1
    assert Target.objects.get(host="10.0.0.2").weight == 50

    # Admin: the same as an action on the history.
    row = ConfigVersion.objects.get(version=v2)
    resp = admin_client.post(
        reverse("admin:gateway_configversion_changelist"),
        {"action": "restore", "_selected_action": [row.pk]},
        follow=True,
    )
    assert f"Restored v{v2} as config version {v2 + 2}" in resp.content.decode()
    assert Target.objects.get(host="10.0.0.2").weight == 90


def test_route_names_are_unique_within_an_api(admin_user):
    from rest_framework.test import APIClient

    from portal.tokens import token_issue

    catalog = make_catalog()
    client = APIClient()
    client.credentials(
        HTTP_AUTHORIZATION=f"Bearer {token_issue(admin_user, name='t', scope='write').raw}"
    )
    body = {"api": catalog.api.pk, "name": "all", "path": "/other"}
    resp = client.post("/api/v1/routes/", body, format="json")
    assert resp.status_code == 400
    assert resp.json()["errors"][0]["pointer"] == "/name"
    body["name"] = "other"
    assert client.post("/api/v1/routes/", body, format="json").status_code == 201
