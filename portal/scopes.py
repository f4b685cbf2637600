"""Which API keys a change to a portal object can alter in the gateways' snapshot.

A key's snapshot entry depends on the key, its subscription (status, plan), the
subscription's consumer (its organization) and the consumer's user (active or not): a change
to one of these reloads just those keys (a delta), as a revocation does. A consumer that also
calls with JWTs has an identity in the snapshot that only a rebuild reloads, so any change
that reaches such a consumer asks for a rebuild (None). Memberships are not read by the
gateway at all. Registered in PortalConfig.ready(); see gateway.config.change_scope.
"""

from __future__ import annotations


def _keys(consumers, **key_filter) -> list[str] | None:
    from portal.models import ApiKey

    if consumers.filter(external_id__isnull=False).exists():
        return None
    return list(ApiKey.objects.filter(**key_filter).values_list("key_id", flat=True))


def key_scope(key) -> list[str]:
    return [key.key_id]


def subscription_scope(sub) -> list[str] | None:
    from portal.models import Consumer

    return _keys(Consumer.objects.filter(pk=sub.consumer_id), subscription=sub.pk)


def consumer_scope(consumer) -> list[str] | None:
    from portal.models import Consumer

    return _keys(Consumer.objects.filter(pk=consumer.pk), subscription__consumer=consumer.pk)


def user_scope(user) -> list[str] | None:
    from portal.models import Consumer

    return _keys(Consumer.objects.filter(user=user.pk), subscription__consumer__user=user.pk)


def organization_scope(org) -> list[str] | None:
    from portal.models import Consumer

    return _keys(
        Consumer.objects.filter(organization=org.pk),
        subscription__consumer__organization=org.pk,
    )


def membership_scope(membership) -> list[str]:
    return []


def register() -> None:
    from django.contrib.auth import get_user_model

    from gateway.config import register_scope
    from portal.models import ApiKey, Consumer, Membership, Organization, Subscription

    register_scope(ApiKey, key_scope)
    register_scope(Subscription, subscription_scope)
    register_scope(Consumer, consumer_scope)
    register_scope(get_user_model(), user_scope)
    register_scope(Organization, organization_scope)
    register_scope(Membership, membership_scope)
