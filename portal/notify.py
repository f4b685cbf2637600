"""Emails the portal sends about subscriptions (after the change has committed)."""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.mail import send_mail

from portal.models import Membership, Subscription

log = logging.getLogger("portal.notify")


def recipients(sub: Subscription) -> list[str]:
    """Who hears about a subscription: its user, or its organization's owners."""
    consumer = sub.consumer
    if consumer.user_id:
        return [consumer.user.email] if consumer.user.email else []
    owners = Membership.objects.filter(
        organization_id=consumer.organization_id, role=Membership.Role.OWNER
    ).select_related("user")
    return sorted({m.user.email for m in owners if m.user.email})


def subscription_decided(sub: Subscription) -> None:
    """Tell the subscriber that an administrator approved or rejected their subscription."""
    to = recipients(sub)
    if not to:
        return
    plan = sub.plan.name
    dashboard = settings.PORTAL_URL.rstrip("/") + "/dashboard/"
    if sub.status == Subscription.Status.ACTIVE:
        subject = f"Your subscription to {plan} is approved"
        body = (
            f"Your subscription to the {plan} plan was approved: its keys work now.\n\n"
            f"Create a key or see your usage on {dashboard}\n"
        )
    else:
        subject = f"Your subscription to {plan} was not approved"
        body = (
            f"Your request for the {plan} plan was not approved.\n\n"
            f"Other plans and your subscriptions are on {dashboard}\n"
        )
    try:
        send_mail(subject, body, None, to)
    except Exception:  # the decision stands; a mail server outage must not undo it
        log.exception("could not send the subscription email for subscription %s", sub.pk)
