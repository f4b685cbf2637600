"""Actions on subscriptions: subscribe, approve, reject, cancel."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from gateway.config import config_bump
from portal.audit import audit_record
from portal.models import Consumer, Plan, Subscription


class SubscriptionError(Exception):
    """A subscription change that the rules do not allow; the message is for the user."""


def subscription_create(consumer: Consumer, *, plan: Plan, actor=None) -> Subscription:
    """Subscribe `consumer` to `plan`: active at once, or pending if the plan needs approval."""
    with transaction.atomic():
        existing = (
            Subscription.objects.select_for_update()
            .filter(consumer=consumer, plan=plan, status__in=["pending", "active"])
            .first()
        )
        if existing is not None:
            return existing
        status = (
            Subscription.Status.PENDING if plan.requires_approval else Subscription.Status.ACTIVE
        )
        sub = Subscription.objects.create(
            consumer=consumer,
            plan=plan,
            status=status,
            decided_at=None if plan.requires_approval else timezone.now(),
        )
        audit_record(actor=actor, action="subscription_create", target=sub, status=status)
        config_bump(
            actor=actor,
            reason=f"subscription {sub.pk} created ({status})",
            key_ids=_changed_keys(sub, []),
        )
    return sub


def _changed_keys(sub: Subscription, key_ids):
    """The key delta of a subscription change; None (a rebuild) when the consumer also calls
    with JWTs: its token identity lives in the snapshot, not in a key entry."""
    has_identity = Consumer.objects.filter(pk=sub.consumer_id, external_id__isnull=False).exists()
    return None if has_identity else key_ids


def _decide(sub: Subscription, *, status: str, actor, allowed_from: set[str]) -> Subscription:
    with transaction.atomic():
        sub = Subscription.objects.select_for_update().get(pk=sub.pk)
        if sub.status not in allowed_from:
            raise SubscriptionError(f"Subscription is {sub.get_status_display().lower()}.")
        sub.status = status
        sub.decided_at = timezone.now()
        sub.save(update_fields=["status", "decided_at"])
        audit_record(actor=actor, action=f"subscription_{status}", target=sub)
        config_bump(
            actor=actor,
            reason=f"subscription {sub.pk} {status}",
            key_ids=_changed_keys(sub, sub.keys.values_list("key_id", flat=True)),
        )
    return sub


def subscription_approve(sub: Subscription, *, actor=None) -> Subscription:
    """Approve a pending subscription: its keys start working; the subscriber is emailed."""
    sub = _decide(sub, status=Subscription.Status.ACTIVE, actor=actor, allowed_from={"pending"})
    _tell(sub)
    return sub


def subscription_reject(sub: Subscription, *, actor=None) -> Subscription:
    """Reject a pending subscription; the subscriber is emailed."""
    sub = _decide(sub, status=Subscription.Status.REJECTED, actor=actor, allowed_from={"pending"})
    _tell(sub)
    return sub


def _tell(sub: Subscription) -> None:
    from portal.notify import subscription_decided

    # After commit: inside an outer transaction that rolls back, nobody is told anything.
    transaction.on_commit(lambda: subscription_decided(sub))


def subscription_cancel(sub: Subscription, *, actor=None) -> Subscription:
    """End a subscription: its keys stop working."""
    return _decide(
        sub,
        status=Subscription.Status.CANCELLED,
        actor=actor,
        allowed_from={"pending", "active"},
    )
