"""Actions on partner organizations: create, invite, join, remove; who may do what.

Owners invite and remove members and subscribe the organization to plans; every member
creates keys under the organization's subscriptions and sees its usage. An organization
always keeps at least one owner. Invitations are links sent by email: the token is random,
stored only as a keyed hash, works once, for the invited address, within INVITATION_DAYS.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.text import slugify

from portal.audit import audit_record
from portal.keys import key_digest
from portal.models import Consumer, Invitation, Membership, Organization, User

INVITATION_DAYS = 7


class OrgActionError(Exception):
    """An organization change the rules do not allow; the message is for the user."""


def membership(user: User, org: Organization) -> Membership | None:
    return Membership.objects.filter(organization=org, user=user).first()


def is_owner(user: User, org: Organization) -> bool:
    return Membership.objects.filter(
        organization=org, user=user, role=Membership.Role.OWNER
    ).exists()


def org_consumer(org: Organization) -> Consumer:
    consumer, _ = Consumer.objects.get_or_create(organization=org)
    return consumer


def org_create(user: User, *, name: str) -> Organization:
    """A new organization with `user` as its owner."""
    name = name.strip()
    if not name:
        raise OrgActionError("Give the organization a name.")
    base = slugify(name)[:40] or "org"
    with transaction.atomic():
        for n in range(1, 100):
            slug = base if n == 1 else f"{base}-{n}"
            if not Organization.objects.filter(slug=slug).exists():
                break
        org = Organization.objects.create(name=name[:100], slug=slug)
        Membership.objects.create(organization=org, user=user, role=Membership.Role.OWNER)
        Consumer.objects.create(organization=org)
        audit_record(actor=user, action="org_create", target=org)
    return org


def _digest(raw: str) -> str:
    return key_digest("invite:" + raw)


@dataclass(frozen=True)
class SentInvitation:
    invitation: Invitation
    link: str  # also in the email; never stored


def org_invite(org: Organization, *, email: str, role: str, actor: User) -> SentInvitation:
    """Invite `email` (owners only). A new invitation to the same address replaces an open
    one; somebody already a member is told so."""
    if not is_owner(actor, org):
        raise OrgActionError("Only owners can invite.")
    email = email.strip().lower()
    if role not in Membership.Role.values:
        raise OrgActionError("Choose owner or member.")
    if Membership.objects.filter(organization=org, user__email__iexact=email).exists():
        raise OrgActionError(f"{email} is already a member.")
    raw = secrets.token_urlsafe(32)
    now = timezone.now()
    with transaction.atomic():
        Invitation.objects.filter(
            organization=org, email__iexact=email, accepted_at__isnull=True
        ).delete()
        invitation = Invitation.objects.create(
            organization=org,
            email=email,
            role=role,
            digest=_digest(raw),
            invited_by=actor,
            expires_at=now + timedelta(days=INVITATION_DAYS),
        )
        audit_record(actor=actor, action="org_invite", target=org, email=email, role=role)
    link = settings.PORTAL_URL.rstrip("/") + f"/orgs/join/{raw}/"
    transaction.on_commit(lambda: _send_invitation(invitation, link))
    return SentInvitation(invitation, link)


def _send_invitation(invitation: Invitation, link: str) -> None:
    org = invitation.organization
    inviter = invitation.invited_by.email if invitation.invited_by else "An owner"
    send_mail(
        f"You are invited to {org.name}",
        f"{inviter} invites you to join {org.name} on the API portal as "
        f"{invitation.get_role_display().lower()}.\n\n"
        f"Accept within {INVITATION_DAYS} days, signed in with this address:\n{link}\n\n"
        "If you did not expect this, ignore this email.\n",
        None,
        [invitation.email],
    )


def invitation_for(raw: str) -> Invitation | None:
    """The open invitation a link's token belongs to (None: unknown, used or expired)."""
    if not raw or len(raw) > 100:
        return None
    found = Invitation.objects.select_related("organization").filter(digest=_digest(raw)).first()
    if found is None or not hmac.compare_digest(found.digest, _digest(raw)):
        return None
    return found if found.is_open(timezone.now()) else None


def invitation_accept(raw: str, user: User) -> Membership:
    """Join with an invitation link, as the signed-in user it was sent to."""
    from allauth.account.models import EmailAddress

    with transaction.atomic():
        invitation = invitation_for(raw)
        if invitation is None:
            raise OrgActionError("This invitation link is not valid any more.")
        invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
        if invitation.accepted_at is not None:
            raise OrgActionError("This invitation link is not valid any more.")
        verified = EmailAddress.objects.filter(
            user=user, email__iexact=invitation.email, verified=True
        ).exists()
        if not verified:
            raise OrgActionError(
                "This invitation was sent to another email address. Sign in with that "
                "address (verified) to accept it."
            )
        try:
            with transaction.atomic():
                member = Membership.objects.create(
                    organization=invitation.organization, user=user, role=invitation.role
                )
        except IntegrityError:
            member = Membership.objects.get(organization=invitation.organization, user=user)
        invitation.accepted_at = timezone.now()
        invitation.accepted_by = user
        invitation.save(update_fields=["accepted_at", "accepted_by"])
        audit_record(actor=user, action="org_join", target=invitation.organization)
    return member


def member_remove(org: Organization, member: Membership, *, actor: User) -> None:
    """Remove a member (owners only; anyone may leave). The last owner cannot go. The keys
    they made stay the organization's."""
    if member.organization_id != org.pk:
        raise OrgActionError("Not a member of this organization.")
    if member.user_id != actor.pk and not is_owner(actor, org):
        raise OrgActionError("Only owners can remove members.")
    with transaction.atomic():
        owners = Membership.objects.select_for_update().filter(
            organization=org, role=Membership.Role.OWNER
        )
        if member.role == Membership.Role.OWNER and owners.count() <= 1:
            raise OrgActionError("An organization needs an owner: make someone else owner first.")
        member.delete()
        audit_record(actor=actor, action="org_remove", target=org, user=member.user.email)
