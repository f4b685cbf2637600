"""Business rules of keys, subscriptions and config versions, against the real database."""

from __future__ import annotations

import pytest
from django.db import transaction

from gateway.config import config_bump, config_current_version
from portal.consumers import consumer_for_user
from portal.keys import KeyHasher, key_digest, key_id_of, key_issue, key_parse, key_revoke
from portal.models import ApiKey, AuditEvent, Subscription
from portal.subscriptions import (
    SubscriptionError,
    subscription_approve,
    subscription_cancel,
    subscription_create,
    subscription_reject,
)
from tests.conftest import active_key

pytestmark = pytest.mark.django_db


def test_free_plan_subscription_is_active_at_once(developer, catalog):
    before = config_current_version()
    sub = subscription_create(consumer_for_user(developer), plan=catalog.free, actor=developer)
    assert sub.status == Subscription.Status.ACTIVE
    assert config_current_version() > before
    assert AuditEvent.objects.filter(action="subscription_create").exists()


def test_subscribing_twice_returns_the_open_subscription(developer, catalog):
    consumer = consumer_for_user(developer)
    first = subscription_create(consumer, plan=catalog.free)
    assert subscription_create(consumer, plan=catalog.free) == first
    assert Subscription.objects.filter(consumer=consumer).count() == 1


def test_plan_needing_approval_leaves_subscription_pending_until_approved(developer, catalog):
    sub = subscription_create(consumer_for_user(developer), plan=catalog.pro)
    assert sub.status == Subscription.Status.PENDING
    sub = subscription_approve(sub)
    assert sub.status == Subscription.Status.ACTIVE
    assert sub.decided_at is not None
    with pytest.raises(SubscriptionError):
        subscription_reject(sub)


def test_rejected_and_cancelled_subscriptions(developer, catalog):
    consumer = consumer_for_user(developer)
    rejected = subscription_reject(subscription_create(consumer, plan=catalog.pro))
    assert rejected.status == Subscription.Status.REJECTED
    again = subscription_create(consumer, plan=catalog.pro)  # may ask again after a rejection
    assert again.pk != rejected.pk
    assert subscription_cancel(again).status == Subscription.Status.CANCELLED


def test_issued_key_is_shown_once_and_stored_only_as_a_keyed_hash(developer, catalog):
    sub = subscription_create(consumer_for_user(developer), plan=catalog.free)
    issued = key_issue(sub, name="ci")
    key = issued.key
    assert key.startswith("gw_")
    assert key_parse(key) == issued.api_key.key_id
    row = ApiKey.objects.get(pk=issued.api_key.pk)
    assert row.digest == key_digest(key)
    assert len(row.digest) == 64
    secret = key.split("_", 2)[2]  # the secret itself may contain "_"
    assert len(secret) >= 32  # 24 random bytes = 192 bits
    for field in ApiKey._meta.concrete_fields:
        value = str(getattr(row, field.attname))
        assert key not in value
        assert secret not in value
    assert row.prefix == f"gw_{row.key_id}"


def test_keys_are_unique(developer, catalog):
    sub = subscription_create(consumer_for_user(developer), plan=catalog.free)
    keys = {key_issue(sub, name=f"k{i}").key for i in range(20)}
    assert len(keys) == 20


@pytest.mark.parametrize(
    "raw",
    ["", "gw_", "gw_abc_def", "xx_0123456789ab_secret", "gw_0123456789ab_", "gw_" + "a" * 200],
)
def test_malformed_keys_do_not_parse(raw):
    assert key_parse(raw) is None
    assert key_id_of(raw.encode()) is None


@pytest.mark.parametrize(
    "raw",
    [
        "gw_0123456789ab_s",
        "gw_0123456789ab_with_more_underscores",
        "gw_0123_56789ab_secret",  # an underscore inside the id
        "gw_0123456789abc_secret",  # a 13-character id
        "gw_0123456789\u00e9_secret",
        "gw_0123456789ab_s\u00e9cret",
        "gw_0123456789ab_" + "s" * 112,  # 128 characters: the longest
        "gw_0123456789ab_" + "s" * 113,
    ],
)
def test_the_gateways_bytes_parser_agrees_with_key_parse(raw):
    assert key_id_of(raw.encode()) == key_parse(raw) or not raw.isascii()
    if not raw.isascii():  # never a key (keys are ASCII); its digest matches no stored one
        assert key_parse(raw) is None


@pytest.mark.parametrize("secret", [b"", b"k", b"x" * 64, b"y" * 65, b"z" * 200])
def test_the_gateways_key_hasher_is_key_digest(secret):
    hasher = KeyHasher(secret)
    for raw in ("gw_0123456789ab_secret", "", "x" * 300):
        assert hasher.hexdigest(raw.encode()) == key_digest(raw, secret).encode()


def test_revoking_a_key_bumps_the_config_and_is_idempotent(developer, catalog):
    sub = subscription_create(consumer_for_user(developer), plan=catalog.free)
    issued = key_issue(sub, name="ci")
    before = config_current_version()
    revoked = key_revoke(issued.api_key, actor=developer)
    assert revoked.revoked_at is not None
    assert config_current_version() == before + 1
    key_revoke(issued.api_key)
    assert config_current_version() == before + 1
    from django.utils import timezone

    assert not revoked.is_usable(timezone.now())


def test_config_bump_refuses_to_run_outside_a_transaction(transactional_db):
    with pytest.raises(RuntimeError, match="inside the transaction"):
        config_bump(reason="stray")


def test_config_bump_rolls_back_with_its_transaction(db):
    before = config_current_version()
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        config_bump(reason="doomed")
        1 / 0  # noqa: B018
    assert config_current_version() == before


def test_deleting_a_user_drops_their_keys_with_a_config_bump(developer, catalog):
    issued = active_key(developer, catalog.free)
    before = config_current_version()
    developer.delete()
    assert not ApiKey.objects.filter(pk=issued.api_key.pk).exists()
    assert config_current_version() > before


def test_a_deactivated_users_keys_leave_the_snapshot(developer, catalog):
    from gateway.dataplane.snapshot import load_config

    issued = active_key(developer, catalog.free)
    assert issued.api_key.key_id in load_config(0)[1]
    developer.is_active = False
    developer.save()
    assert issued.api_key.key_id not in load_config(0)[1]


def test_config_versions_are_numbered_in_order_and_kept(db):
    from gateway.models import ConfigVersion

    with transaction.atomic():
        first = config_bump(reason="one")
    with transaction.atomic():
        second = config_bump(reason="two")
    assert second == first + 1
    assert list(ConfigVersion.objects.order_by("version").values_list("reason", flat=True))[
        -2:
    ] == ["one", "two"]


def test_rotation_issues_a_new_key_and_the_old_one_expires_after_the_grace(developer, catalog):
    from datetime import timedelta

    from django.utils import timezone

    from portal.keys import KeyActionError, key_rotate

    old = active_key(developer, catalog.free).api_key
    before = timezone.now()
    new = key_rotate(old, grace=timedelta(hours=1))
    old.refresh_from_db()
    assert new.api_key.subscription_id == old.subscription_id
    assert new.api_key.name == old.name
    assert new.api_key.expires_at is None
    assert before + timedelta(minutes=59) < old.expires_at <= timezone.now() + timedelta(hours=1)
    assert old.is_usable(timezone.now()) and new.api_key.is_usable(timezone.now())
    assert not old.is_usable(timezone.now() + timedelta(hours=2))
    assert AuditEvent.objects.filter(action="key_rotate").exists()
    key_revoke(old)
    with pytest.raises(KeyActionError):
        key_rotate(old)
