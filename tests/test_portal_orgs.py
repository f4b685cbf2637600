"""Partner organizations: create, invite by email, join, roles, shared keys and usage,
and nothing of it visible to anybody outside, by URL guessing either."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from analytics.ingest import ingest_batch
from tests.conftest import PASSWORD, log_event, make_user

pytestmark = pytest.mark.django_db
LINK = re.compile(r"https?://\S+/orgs/join/([A-Za-z0-9_-]+)/")


def _signin(client, email):
    client.logout()
    assert client.login(username=email, password=PASSWORD)


@pytest.fixture
def acme(client, catalog, mailoutbox, django_capture_on_commit_callbacks):
    """Acme: boss@ (owner) and dev@ (member, joined through an emailed invitation)."""
    from portal.models import Membership, Organization

    make_user("boss@acme.test")
    make_user("dev@acme.test")
    _signin(client, "boss@acme.test")
    resp = client.post("/orgs/", {"name": "Acme Inc"})
    assert resp.status_code == 302 and resp["Location"] == "/orgs/acme-inc/"
    org = Organization.objects.get(slug="acme-inc")
    with django_capture_on_commit_callbacks(execute=True):
        resp = client.post("/orgs/acme-inc/invite/", {"email": "Dev@Acme.test", "role": "member"})
    assert resp.status_code == 302
    assert [m.to for m in mailoutbox] == [["dev@acme.test"]]
    token = LINK.search(mailoutbox[0].body).group(1)
    _signin(client, "dev@acme.test")
    page = client.get(f"/orgs/join/{token}/")
    assert "join <strong>Acme Inc</strong> as member" in page.content.decode()
    resp = client.post(f"/orgs/join/{token}/")
    assert resp.status_code == 302 and resp["Location"] == "/orgs/acme-inc/"
    assert Membership.objects.get(organization=org, user__email="dev@acme.test").role == "member"
    return org, token


def test_an_invitation_link_works_once_for_its_address(client, acme, catalog):
    from portal.models import Invitation

    org, token = acme
    assert not Invitation.objects.filter(digest__contains=token).exists()  # hashed at rest
    make_user("mallory@evil.test")
    _signin(client, "mallory@evil.test")
    resp = client.post(f"/orgs/join/{token}/", follow=True)  # used already
    assert "not valid any more" in resp.content.decode()
    assert client.get("/orgs/acme-inc/").status_code == 404


def test_an_invitation_is_for_its_address_and_expires(
    client, acme, mailoutbox, django_capture_on_commit_callbacks
):
    from portal.models import Invitation, Membership

    _signin(client, "boss@acme.test")
    with django_capture_on_commit_callbacks(execute=True):
        client.post("/orgs/acme-inc/invite/", {"email": "new@acme.test", "role": "owner"})
    token = LINK.search(mailoutbox[-1].body).group(1)
    make_user("other@acme.test")
    _signin(client, "other@acme.test")
    resp = client.post(f"/orgs/join/{token}/", follow=True)
    assert "sent to another email address" in resp.content.decode()
    assert not Membership.objects.filter(user__email="other@acme.test").exists()
    Invitation.objects.filter(email="new@acme.test").update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    make_user("new@acme.test")
    _signin(client, "new@acme.test")
    assert "not valid any more" in client.get(f"/orgs/join/{token}/").content.decode()
    assert client.post(f"/orgs/join/{token}/").status_code == 200
    assert not Membership.objects.filter(user__email="new@acme.test").exists()


def test_owners_subscribe_and_invite_members_make_keys(client, acme, catalog, mailoutbox):
    from portal.models import ApiKey, Subscription

    org, _ = acme
    sent = len(mailoutbox)
    _signin(client, "dev@acme.test")  # a member
    resp = client.post("/orgs/acme-inc/subscribe/", {"plan": "free"}, follow=True)
    assert "Only owners" in resp.content.decode()
    client.post("/orgs/acme-inc/invite/", {"email": "x@acme.test", "role": "member"})
    assert len(mailoutbox) == sent
    _signin(client, "boss@acme.test")
    client.post("/orgs/acme-inc/subscribe/", {"plan": "free"})
    assert Subscription.objects.get(consumer__organization=org).status == "active"
    _signin(client, "dev@acme.test")
    sub = Subscription.objects.get(consumer__organization=org)
    page = client.post(
        "/orgs/acme-inc/keys/new/", {"name": "ci", "subscription": sub.pk, "expires_at": ""}
    )
    assert page.status_code == 200 and "Your new API key" in page.content.decode()
    dev_key = ApiKey.objects.get(name="ci")
    assert dev_key.created_by.email == "dev@acme.test"
    _signin(client, "boss@acme.test")
    client.post("/orgs/acme-inc/keys/new/", {"name": "prod", "subscription": sub.pk})
    boss_key = ApiKey.objects.get(name="prod")
    # A member revokes only their own keys; owners any.
    _signin(client, "dev@acme.test")
    resp = client.post(f"/orgs/acme-inc/keys/{boss_key.pk}/revoke/", follow=True)
    assert "Only owners, or whoever made the key" in resp.content.decode()
    boss_key.refresh_from_db()
    assert boss_key.revoked_at is None
    client.post(f"/orgs/acme-inc/keys/{dev_key.pk}/revoke/")
    dev_key.refresh_from_db()
    assert dev_key.revoked_at is not None


def test_organization_usage_by_member_and_by_key(client, acme, catalog):
    from portal.keys import key_issue
    from portal.models import Subscription, User
    from portal.orgs import org_consumer
    from portal.subscriptions import subscription_create

    org, _ = acme
    sub = subscription_create(org_consumer(org), plan=catalog.free)
    boss, dev = User.objects.get(email="boss@acme.test"), User.objects.get(email="dev@acme.test")
    a = key_issue(sub, name="a", actor=dev).api_key
    b = key_issue(sub, name="b", actor=dev).api_key
    c = key_issue(sub, name="c", actor=boss).api_key
    ingest_batch(
        [log_event(a.pk, org=org.pk) for _ in range(3)]
        + [log_event(b.pk, org=org.pk) for _ in range(2)]
        + [log_event(c.pk, org=org.pk) for _ in range(4)]
    )
    _signin(client, "dev@acme.test")
    page = client.get("/orgs/acme-inc/")
    assert page.context["usage"]["total"] == 9
    assert page.context["by_member"] == [("dev@acme.test", 5), ("boss@acme.test", 4)]
    assert [(k.name, k.requests) for k in page.context["keys"]] == [("c", 4), ("a", 3), ("b", 2)]
    data = client.get("/orgs/acme-inc/usage.json", {"range": "60m"}).json()
    assert data["total"] == 9 and len(data["labels"]) == 60
    assert Subscription.objects.filter(consumer__organization=org).count() == 1


def test_nothing_of_an_organization_reaches_outsiders(client, acme, catalog):
    from portal.keys import key_issue
    from portal.models import ApiKey, Membership
    from portal.orgs import org_consumer, org_create
    from portal.subscriptions import subscription_create

    org, _ = acme
    sub = subscription_create(org_consumer(org), plan=catalog.free)
    key = key_issue(sub, name="secret-project").api_key
    outsider = make_user("rival@other.test")
    org_create(outsider, name="Rival")  # a member of another organization
    _signin(client, "rival@other.test")
    for url in (
        "/orgs/acme-inc/",
        "/orgs/acme-inc/usage.json",
    ):
        assert client.get(url).status_code == 404, url
    member = Membership.objects.get(organization=org, user__email="dev@acme.test")
    for url, data in (
        ("/orgs/acme-inc/invite/", {"email": "me@other.test"}),
        ("/orgs/acme-inc/subscribe/", {"plan": "free"}),
        (f"/orgs/acme-inc/subscriptions/{sub.pk}/cancel/", {}),
        ("/orgs/acme-inc/keys/new/", {"name": "x", "subscription": sub.pk}),
        (f"/orgs/acme-inc/keys/{key.pk}/revoke/", {}),
        (f"/orgs/acme-inc/members/{member.pk}/remove/", {}),
        (f"/orgs/rival/keys/{key.pk}/revoke/", {}),  # the key through their own org
        (f"/keys/{key.pk}/revoke/", {}),  # or as if it were their own
    ):
        assert client.post(url, data).status_code == 404, url
    assert "secret-project" not in client.get("/orgs/rival/").content.decode()
    assert "secret-project" not in client.get("/usage/").content.decode()
    assert ApiKey.objects.get(pk=key.pk).revoked_at is None
    assert Membership.objects.filter(pk=member.pk).exists()
    assert client.get(f"/keys/{key.pk}/usage/").status_code == 404


def test_the_last_owner_stays_and_members_can_leave(client, acme):
    from portal.models import Membership

    org, _ = acme
    boss = Membership.objects.get(organization=org, role="owner")
    _signin(client, "boss@acme.test")
    resp = client.post(f"/orgs/acme-inc/members/{boss.pk}/remove/", follow=True)
    assert "needs an owner" in resp.content.decode()
    _signin(client, "dev@acme.test")
    dev = Membership.objects.get(organization=org, user__email="dev@acme.test")
    resp = client.post(f"/orgs/acme-inc/members/{boss.pk}/remove/", follow=True)
    assert "Only owners can remove" in resp.content.decode()
    resp = client.post(f"/orgs/acme-inc/members/{dev.pk}/remove/")
    assert resp["Location"] == "/orgs/"
    assert client.get("/orgs/acme-inc/").status_code == 404
