"""Subscribing and unsubscribing in the portal; subscribers are told of decisions by email."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tests.conftest import PASSWORD, make_user

pytestmark = pytest.mark.django_db


def _signed_in(client, email):
    user = make_user(email)
    assert client.login(username=email, password=PASSWORD)
    return user


def test_approval_and_rejection_in_admin_are_emailed(
    admin_client, catalog, mailoutbox, django_capture_on_commit_callbacks
):
    from portal.consumers import consumer_for_user
    from portal.models import Subscription
    from portal.subscriptions import subscription_create

    dev = make_user("dev@example.com")
    other = make_user("other@example.com")
    mine = subscription_create(consumer_for_user(dev), plan=catalog.pro)
    theirs = subscription_create(consumer_for_user(other), plan=catalog.pro)
    assert mine.status == theirs.status == "pending" and not mailoutbox
    url = reverse("admin:portal_subscription_changelist")
    with django_capture_on_commit_callbacks(execute=True):  # sent once committed
        admin_client.post(url, {"action": "approve", "_selected_action": [mine.pk]})
        admin_client.post(url, {"action": "reject", "_selected_action": [theirs.pk]})
    assert Subscription.objects.get(pk=mine.pk).status == "active"
    assert [(m.to, m.subject) for m in mailoutbox] == [
        (["dev@example.com"], "Your subscription to Pro is approved"),
        (["other@example.com"], "Your subscription to Pro was not approved"),
    ]
    assert "/dashboard/" in mailoutbox[0].body


def test_an_organizations_subscription_decision_goes_to_its_owners(
    catalog, mailoutbox, django_capture_on_commit_callbacks
):
    from portal.models import Consumer, Membership, Organization
    from portal.subscriptions import subscription_approve, subscription_create

    org = Organization.objects.create(name="Acme", slug="acme")
    for email, role in (("boss@acme.test", "owner"), ("dev@acme.test", "member")):
        Membership.objects.create(organization=org, user=make_user(email), role=role)
    sub = subscription_create(Consumer.objects.create(organization=org), plan=catalog.pro)
    with django_capture_on_commit_callbacks(execute=True):
        subscription_approve(sub)
    assert [m.to for m in mailoutbox] == [["boss@acme.test"]]


def test_a_developer_unsubscribes_and_the_keys_stop(client, catalog):
    from portal.keys import key_issue
    from portal.models import Subscription
    from portal.subscriptions import subscription_create

    user = _signed_in(client, "dev@example.com")
    from portal.consumers import consumer_for_user

    sub = subscription_create(consumer_for_user(user), plan=catalog.free)
    issued = key_issue(sub, name="k")
    page = client.get("/dashboard/").content.decode()
    assert f'action="/subscriptions/{sub.pk}/cancel/"' in page and "Unsubscribe from Free?" in page
    assert client.get(f"/subscriptions/{sub.pk}/cancel/").status_code == 405
    resp = client.post(f"/subscriptions/{sub.pk}/cancel/", follow=True)
    assert "You are unsubscribed from Free" in resp.content.decode()
    assert Subscription.objects.get(pk=sub.pk).status == "cancelled"
    issued.api_key.refresh_from_db()
    assert not issued.api_key.subscription.is_active()
    # Twice: a clear message, not an error page.
    resp = client.post(f"/subscriptions/{sub.pk}/cancel/", follow=True)
    assert "Subscription is cancelled." in resp.content.decode()


def test_nobody_unsubscribes_someone_else(client, catalog):
    from portal.consumers import consumer_for_user
    from portal.models import Subscription
    from portal.subscriptions import subscription_create

    other = make_user("other@example.com")
    theirs = subscription_create(consumer_for_user(other), plan=catalog.free)
    _signed_in(client, "dev@example.com")
    assert client.post(f"/subscriptions/{theirs.pk}/cancel/").status_code == 404
    assert Subscription.objects.get(pk=theirs.pk).status == "active"
    client.logout()
    resp = client.post(f"/subscriptions/{theirs.pk}/cancel/")
    assert resp.status_code == 302 and "/accounts/login/" in resp["Location"]
