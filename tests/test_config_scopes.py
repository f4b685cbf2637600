"""Admin and REST edits of keys, users, consumers, subscriptions and organizations reach the
gateways as key deltas (the keys they can alter, before and after the change); only
structural changes, and changes that reach a consumer calling with JWTs, rebuild."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from gateway.config import config_current_version
from gateway.dataplane.snapshot import load_keys
from gateway.models import ConfigVersion
from portal.consumers import consumer_for_user
from portal.models import Consumer, Membership, Organization, Subscription, User
from tests.conftest import active_key, make_user, wait_for_key
from tests.procs import wait_until

pytestmark = pytest.mark.django_db


def _last_change() -> ConfigVersion:
    return ConfigVersion.objects.get(version=config_current_version())


def _admin_post(client, url: str, **changes):
    """POST the admin change form at `url` as it is filled in, with `changes`."""
    page = client.get(url)
    assert page.status_code == 200
    data: dict[str, object] = {}
    forms = [page.context["adminform"].form]
    for inline in page.context["inline_admin_formsets"]:
        formset = inline.formset
        forms.extend(formset.forms)
        mgmt = formset.management_form
        for name in mgmt.fields:
            data[mgmt.add_prefix(name)] = mgmt[name].value()
    for form in forms:
        for name, field in form.fields.items():
            value = form[name].value()
            if value is None or value is False:
                continue
            key = form.add_prefix(name)
            if type(field).__name__ == "SplitDateTimeField":  # two inputs: date, time
                day, clock = field.widget.decompress(value)
                data[key + "_0"], data[key + "_1"] = day.isoformat(), clock.strftime("%H:%M:%S")
                continue
            if isinstance(value, list | tuple):
                value = [v for v in value if v is not None]
            data[key] = value
    for name, value in changes.items():
        if value is False:
            data.pop(name, None)
        else:
            data[name] = value
    data["_save"] = "Save"
    resp = client.post(url, data)
    assert resp.status_code == 302, resp.context["adminform"].form.errors if resp.context else resp
    return resp


def test_admin_deactivating_a_user_is_a_delta_of_their_keys(admin_client, developer, catalog):
    issued = active_key(developer, catalog.free)
    other = active_key(make_user("other@example.com"), catalog.free)
    url = reverse("admin:portal_user_change", args=[developer.pk])
    _admin_post(admin_client, url, is_active=False)
    change = _last_change()
    assert change.key_ids == [issued.api_key.key_id]
    # What the gateways reload for that delta: the key is no longer usable.
    assert load_keys({issued.api_key.key_id}) == {}
    assert other.api_key.key_id in load_keys({other.api_key.key_id})


def test_a_change_that_reaches_a_consumer_calling_with_jwts_rebuilds(
    admin_client, developer, catalog
):
    active_key(developer, catalog.free)
    consumer = consumer_for_user(developer)
    consumer.external_id = "sub-123"
    consumer.save()
    _admin_post(admin_client, reverse("admin:portal_user_change", args=[developer.pk]))
    assert _last_change().key_ids is None
    # Dropping the external id: its identity (read before the change) goes with a rebuild.
    url = reverse("admin:portal_consumer_change", args=[consumer.pk])
    _admin_post(admin_client, url, external_id="")
    assert Consumer.objects.get(pk=consumer.pk).external_id in ("", None)
    assert _last_change().key_ids is None
    # Without one, a consumer edit is a delta.
    _admin_post(admin_client, url)
    assert _last_change().key_ids is not None


def test_admin_moving_a_subscription_to_another_plan_is_a_delta(admin_client, developer, catalog):
    issued = active_key(developer, catalog.free)
    sub = Subscription.objects.get(pk=issued.api_key.subscription_id)
    url = reverse("admin:portal_subscription_change", args=[sub.pk])
    _admin_post(admin_client, url, plan=catalog.pro.pk)
    assert _last_change().key_ids == [issued.api_key.key_id]
    (entry,) = load_keys({issued.api_key.key_id}).values()
    assert entry.plan_id == catalog.pro.pk


def test_admin_deleting_a_user_names_the_keys_they_had(admin_client, developer, catalog):
    issued = active_key(developer, catalog.free)
    url = reverse("admin:portal_user_delete", args=[developer.pk])
    assert admin_client.post(url, {"post": "yes"}).status_code == 302
    assert not User.objects.filter(pk=developer.pk).exists()
    assert _last_change().key_ids == [issued.api_key.key_id]


def test_admin_organization_edit_with_a_new_member_is_a_delta_of_its_keys(admin_client, catalog):
    from portal.keys import key_issue
    from portal.subscriptions import subscription_create

    org = Organization.objects.create(name="Acme", slug="acme")
    owner = make_user("owner@example.com")
    Membership.objects.create(organization=org, user=owner, role="owner")
    org_consumer = Consumer.objects.create(organization=org)
    org_key = key_issue(subscription_create(org_consumer, plan=catalog.free), name="org")
    solo = active_key(make_user("solo@example.com"), catalog.free)
    newcomer = make_user("new@example.com")
    url = reverse("admin:portal_organization_change", args=[org.pk])
    _admin_post(
        admin_client,
        url,
        name="Acme Inc",
        **{
            "memberships-TOTAL_FORMS": "2",
            "memberships-1-user": newcomer.pk,
            "memberships-1-role": "member",
            "memberships-1-organization": org.pk,
        },
    )
    assert Membership.objects.filter(organization=org, user=newcomer).exists()
    assert _last_change().key_ids == [org_key.api_key.key_id]
    assert solo.api_key.key_id not in _last_change().key_ids


def test_admin_bulk_delete_of_users_names_their_keys(admin_client, catalog):
    a = make_user("a@example.com")
    b = make_user("b@example.com")
    keys = sorted(active_key(u, catalog.free).api_key.key_id for u in (a, b))
    resp = admin_client.post(
        reverse("admin:portal_user_changelist"),
        {"action": "delete_selected", "_selected_action": [a.pk, b.pk], "post": "yes"},
    )
    assert resp.status_code == 302
    assert not User.objects.filter(pk__in=[a.pk, b.pk]).exists()
    assert _last_change().key_ids == keys


def test_a_subscription_moved_away_from_a_jwt_consumer_rebuilds(admin_client, catalog):
    jwt_user = make_user("jwt@example.com")
    issued = active_key(jwt_user, catalog.free)
    Consumer.objects.filter(user=jwt_user).update(external_id="sub-9")
    plain = consumer_for_user(make_user("plain@example.com"))
    sub = Subscription.objects.get(pk=issued.api_key.subscription_id)
    url = reverse("admin:portal_subscription_change", args=[sub.pk])
    _admin_post(admin_client, url, consumer=plain.pk)
    assert Subscription.objects.get(pk=sub.pk).consumer_id == plain.pk
    assert _last_change().key_ids is None  # the JWT consumer's identity lost a subscription


def test_structural_admin_edits_still_rebuild(admin_client, catalog):
    url = reverse("admin:portal_plan_change", args=[catalog.free.pk])
    _admin_post(admin_client, url, description="changed")
    assert _last_change().key_ids is None


def test_rest_edits_of_consumers_and_memberships_are_deltas(catalog):
    from portal.tokens import token_issue

    root = User.objects.create_superuser("root", "root@example.com", "x" * 20)
    client = APIClient()
    client.credentials(
        HTTP_AUTHORIZATION=f"Bearer {token_issue(root, name='ci', scope='write').raw}"
    )
    dev = make_user("dev@example.com")
    issued = active_key(dev, catalog.free)
    consumer = consumer_for_user(dev)
    resp = client.patch(f"/api/v1/consumers/{consumer.pk}/", {"user": dev.pk}, format="json")
    assert resp.status_code == 200, resp.content
    assert _last_change().key_ids == [issued.api_key.key_id]
    org = Organization.objects.create(name="Acme", slug="acme")
    resp = client.post(
        "/api/v1/memberships/",
        {"organization": org.pk, "user": dev.pk, "role": "member"},
        format="json",
    )
    assert resp.status_code == 201, resp.content
    assert _last_change().key_ids == []
    resp = client.patch(f"/api/v1/consumers/{consumer.pk}/", {"external_id": "s-1"}, format="json")
    assert resp.status_code == 200, resp.content
    assert _last_change().key_ids is None
    resp = client.delete(f"/api/v1/consumers/{consumer.pk}/")
    assert resp.status_code == 204, resp.content
    assert _last_change().key_ids is None  # it had an external id: its identity goes too


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_user_deactivated_in_the_admin_is_shut_out_without_a_rebuild(stack, live, client):
    dev = make_user("dev@example.com")
    key = active_key(dev, live.free).key
    wait_for_key(stack, key)
    root = User.objects.create_superuser("root", "root@example.com", "x" * 20)
    client.force_login(root)
    _admin_post(client, reverse("admin:portal_user_change", args=[dev.pk]), is_active=False)
    version = config_current_version()
    wait_until(
        lambda: stack.get("/demo/ping", headers={"X-API-Key": key}).status_code == 401,
        timeout=5,
        what="the deactivated user's key to stop working",
    )
    log = stack.procs["gateway"].output()
    rebuilt = [int(v) for v in re.findall(r"config v(\d+): \d+ routes, \d+ keys, built in", log)]
    assert not [v for v in rebuilt if v >= version], log[-2000:]
    assert re.search(rf"config v{version}: \d+ keys changed", log), log[-2000:]
