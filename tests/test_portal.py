"""Portal pages with Django's test client: accounts, subscriptions, keys, usage."""

from __future__ import annotations

import re

import pytest
from django.core import mail
from django.urls import reverse

from portal.consumers import consumer_for_user
from portal.keys import key_digest
from portal.models import ApiKey, Subscription
from tests.conftest import PASSWORD, active_key

pytestmark = pytest.mark.django_db


def test_signup_requires_email_verification_before_sign_in(client, catalog):
    resp = client.post(
        reverse("account_signup"),
        {"email": "new@example.com", "password1": PASSWORD, "password2": PASSWORD},
    )
    assert resp.status_code == 302
    assert client.get(reverse("portal:dashboard")).status_code == 302  # not signed in
    assert len(mail.outbox) == 1
    link = re.search(r"https?://\S+/accounts/confirm-email/\S+/", mail.outbox[0].body).group(0)
    path = link.split("testserver", 1)[-1]
    assert client.get(path).status_code == 200
    resp = client.post(path)
    assert resp.status_code == 302
    assert client.get(reverse("portal:dashboard")).status_code == 200


def test_weak_passwords_are_refused_with_form_errors(client, db):
    resp = client.post(
        reverse("account_signup"),
        {"email": "weak@example.com", "password1": "password123", "password2": "password123"},
    )
    assert resp.status_code == 200
    assert b"too short" in resp.content or b"too common" in resp.content


def test_password_reset_answers_the_same_for_known_and_unknown_emails(client, developer):
    known = client.post(reverse("account_reset_password"), {"email": developer.email})
    unknown = client.post(reverse("account_reset_password"), {"email": "nobody@example.com"})
    assert known.status_code == unknown.status_code == 302
    assert known.url == unknown.url


def test_subscribe_create_key_shown_once_and_stored_hashed(client, developer, catalog):
    client.force_login(developer)
    resp = client.post(reverse("portal:subscribe", args=["free"]))
    assert resp.status_code == 302
    sub = Subscription.objects.get(consumer__user=developer)
    assert sub.status == "active"
    resp = client.post(reverse("portal:key_create"), {"name": "laptop", "subscription": sub.pk})
    assert resp.status_code == 200
    assert "no-store" in resp["Cache-Control"]
    key = re.search(rb'id="new-key">(gw_[^<]+)<', resp.content).group(1).decode()
    row = ApiKey.objects.get(subscription=sub)
    assert row.digest == key_digest(key)
    dashboard = client.get(reverse("portal:dashboard")).content.decode()
    assert row.prefix in dashboard
    assert key not in dashboard


def test_pending_plan_subscription_offers_no_key_creation(client, developer, catalog):
    client.force_login(developer)
    client.post(reverse("portal:subscribe", args=["pro"]))
    sub = Subscription.objects.get(consumer__user=developer)
    assert sub.status == "pending"
    resp = client.post(reverse("portal:key_create"), {"name": "x", "subscription": sub.pk})
    assert resp.status_code == 302
    assert not ApiKey.objects.exists()


def test_expiry_in_the_past_is_a_form_error(client, developer, catalog):
    client.force_login(developer)
    client.post(reverse("portal:subscribe", args=["free"]))
    sub = Subscription.objects.get(consumer__user=developer)
    resp = client.post(
        reverse("portal:key_create"),
        {"name": "x", "subscription": sub.pk, "expires_at": "2001-01-01T00:00"},
        follow=True,
    )
    assert b"must be in the future" in resp.content
    assert not ApiKey.objects.exists()


def test_revoke_own_key(client, developer, catalog):
    issued = active_key(developer, catalog.free)
    client.force_login(developer)
    resp = client.post(reverse("portal:key_revoke", args=[issued.api_key.pk]))
    assert resp.status_code == 302
    assert ApiKey.objects.get(pk=issued.api_key.pk).revoked_at is not None


def test_a_stranger_cannot_see_or_revoke_someone_elses_key(client, developer, stranger, catalog):
    issued = active_key(developer, catalog.free)
    client.force_login(stranger)
    pk = issued.api_key.pk
    assert client.get(reverse("portal:key_usage", args=[pk])).status_code == 404
    assert client.get(reverse("portal:key_usage_data", args=[pk])).status_code == 404
    assert client.post(reverse("portal:key_revoke", args=[pk])).status_code == 404
    assert ApiKey.objects.get(pk=pk).revoked_at is None


def test_usage_page_and_data_show_quota(client, developer, catalog):
    issued = active_key(developer, catalog.free)
    client.force_login(developer)
    page = client.get(reverse("portal:key_usage", args=[issued.api_key.pk]))
    assert page.status_code == 200
    assert b"usage-chart" in page.content
    assert b"No requests yet" in page.content
    data = client.get(reverse("portal:key_usage_data", args=[issued.api_key.pk])).json()
    assert data["total"] == 0
    assert data["quota"] == {"limit": 10_000, "used": 0, "remaining": 10_000}
    assert len(data["labels"]) == 60


def test_forms_require_csrf(developer, catalog):
    from django.test import Client

    csrf_client = Client(enforce_csrf_checks=True)
    csrf_client.force_login(developer)
    assert csrf_client.post(reverse("portal:subscribe", args=["free"])).status_code == 403


def test_key_creation_is_throttled(client, developer, catalog, settings, pinned_ratelimit_window):
    consumer_for_user(developer)
    client.force_login(developer)
    client.post(reverse("portal:subscribe", args=["free"]))
    sub = Subscription.objects.get(consumer__user=developer)
    codes = [
        client.post(
            reverse("portal:key_create"), {"name": f"k{i}", "subscription": sub.pk}
        ).status_code
        for i in range(31)
    ]
    assert codes[:30] == [200] * 30
    assert codes[30] == 429


def test_public_pages_render(client, catalog):
    for name in ("portal:home", "portal:catalog", "portal:plans", "account_login"):
        resp = client.get(reverse(name))
        assert resp.status_code == 200, name
    assert b"Demo" in client.get(reverse("portal:catalog")).content


def test_rotate_shows_the_new_key_once_and_the_old_keys_end(client, developer, catalog):
    issued = active_key(developer, catalog.free)
    client.force_login(developer)
    resp = client.post(reverse("portal:key_rotate", args=[issued.api_key.pk]), {"grace": "1h"})
    assert resp.status_code == 200
    new_key = re.search(rb'id="new-key">(gw_[^<]+)<', resp.content).group(1).decode()
    assert new_key != issued.key
    assert b"keeps working until" in resp.content
    assert ApiKey.objects.filter(subscription__consumer__user=developer).count() == 2
    bad = client.post(reverse("portal:key_rotate", args=[issued.api_key.pk]), {"grace": "1y"})
    assert bad.status_code == 302


def test_a_stranger_cannot_rotate_someone_elses_key(client, developer, stranger, catalog):
    issued = active_key(developer, catalog.free)
    client.force_login(stranger)
    assert client.post(reverse("portal:key_rotate", args=[issued.api_key.pk])).status_code == 404
