"""Actions on consumers: the owners of keys and subscriptions."""

from __future__ import annotations

from portal.models import Consumer, User


def consumer_for_user(user: User) -> Consumer:
    """The user's own consumer, created on first use."""
    consumer, _ = Consumer.objects.get_or_create(user=user)
    return consumer
