"""Create a user if needed, subscribe them to a plan, and print a new API key once."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from portal.consumers import consumer_for_user
from portal.keys import key_issue
from portal.models import Plan, Subscription, User
from portal.subscriptions import subscription_approve, subscription_create


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser) -> None:
        parser.add_argument("--email", required=True)
        parser.add_argument("--plan", required=True, help="Plan slug")
        parser.add_argument("--name", default="cli")
        parser.add_argument(
            "--approve",
            action="store_true",
            help="Approve the subscription if the plan needs approval.",
        )

    def handle(self, *args, email: str, plan: str, name: str, approve: bool, **opts) -> None:
        try:
            plan_obj = Plan.objects.get(slug=plan)
        except Plan.DoesNotExist:
            slugs = ", ".join(Plan.objects.values_list("slug", flat=True)) or "none"
            raise CommandError(f"No plan '{plan}'. Plans: {slugs}") from None
        email = User.objects.normalize_email(email)
        with transaction.atomic():
            user = User.objects.filter(email__iexact=email).first()
            if user is None:
                user = User.objects.create_user(username=email, email=email)
                user.set_unusable_password()
                user.save()
                _mark_verified(user)
            sub = subscription_create(consumer_for_user(user), plan=plan_obj)
            if sub.status == Subscription.Status.PENDING:
                if not approve:
                    raise CommandError(
                        f"Plan '{plan}' needs approval; pass --approve to approve it now."
                    )
                sub = subscription_approve(sub)
            issued = key_issue(sub, name=name)
        # The key alone on stdout, so that scripts can capture it.
        self.stdout.write(issued.key)


def _mark_verified(user: User) -> None:
    from allauth.account.models import EmailAddress

    EmailAddress.objects.update_or_create(
        user=user, email=user.email, defaults={"verified": True, "primary": True}
    )
