"""Who calls the gateway: users, organizations, consumers, plans, subscriptions, API keys."""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q


class User(AbstractUser):
    """A person: a developer, a partner's member, or an admin."""


class Organization(models.Model):
    """A partner: its members share its keys, subscriptions and usage."""

    name = models.CharField(max_length=100)
    slug = models.SlugField(unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        MEMBER = "member", "Member"

    organization = models.ForeignKey(
        Organization, related_name="memberships", on_delete=models.CASCADE
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, related_name="memberships", on_delete=models.CASCADE
    )
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    joined_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "user"], name="membership_unique")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} ({self.role})"


class Invitation(models.Model):
    """An invitation to join an organization, sent by email as a link. The link's token is
    stored only as a keyed hash; it works once, for the invited address, until it expires."""

    organization = models.ForeignKey(
        Organization, related_name="invitations", on_delete=models.CASCADE
    )
    email = models.EmailField()
    role = models.CharField(
        max_length=10, choices=Membership.Role.choices, default=Membership.Role.MEMBER
    )
    digest = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.email} to {self.organization}"

    def is_open(self, now: datetime) -> bool:
        return self.accepted_at is None and self.expires_at > now


class Consumer(models.Model):
    """What owns keys and subscriptions: exactly one user or one organization."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE
    )
    organization = models.OneToOneField(
        Organization, null=True, blank=True, on_delete=models.CASCADE
    )
    external_id = models.CharField(
        max_length=255,
        null=True,
        blank=True,
        unique=True,
        help_text="The identity claim (e.g. sub) of this consumer's JWTs, for APIs that "
        "accept tokens from a trusted issuer.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(Q(user__isnull=False) & Q(organization__isnull=True))
                | (Q(user__isnull=True) & Q(organization__isnull=False)),
                name="consumer_user_xor_organization",
            )
        ]

    def __str__(self) -> str:
        return self.display_name

    @property
    def display_name(self) -> str:
        """The owner's name as people see it."""
        if self.user_id:
            return self.user.email or self.user.username
        return self.organization.name


class Plan(models.Model):
    """What a subscription grants: which APIs, how fast, how much."""

    class QuotaPeriod(models.TextChoices):
        DAY = "day", "per UTC day"
        MONTH = "month", "per UTC month"

    name = models.CharField(max_length=100)
    slug = models.SlugField(unique=True)
    description = models.TextField(blank=True)
    apis = models.ManyToManyField("gateway.Api", related_name="plans", blank=True)
    quota_limit = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text="Empty: no quota."
    )
    quota_period = models.CharField(
        max_length=10, choices=QuotaPeriod.choices, default=QuotaPeriod.DAY
    )
    requires_approval = models.BooleanField(default=False)
    is_public = models.BooleanField(default=True, help_text="Offered in the portal.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def quota_period_start(self, now: datetime) -> datetime:
        """Start of the UTC calendar day or month that `now` falls in."""
        return quota_period_bounds(self.quota_period, now)[0]


class RateLimit(models.Model):
    """A rate limit: `limit` requests per window, spread evenly, plus up to `burst` at once.

    It is GCRA (nginx's limit_req with burst): one request every window/limit, and up to
    `burst` more ahead of that pace, so any interval of one window admits at most
    limit + burst requests. Where it applies:
    - plan, no route: every request under the plan (counted across its APIs);
    - plan and route: requests under the plan on that route, instead of the plan's rule of
      the same scope and window (a per-route override, with its own counter);
    - route, no plan: every request on that route (on anonymous routes, by client IP only).
    """

    class Scope(models.TextChoices):
        KEY = "key", "Per API key"
        CONSUMER = "consumer", "Per consumer (all of its keys)"
        ORGANIZATION = "organization", "Per organization (its keys; else per consumer)"
        CLIENT_IP = "client_ip", "Per client IP address"

    class Window(models.TextChoices):
        SECOND = "second", "second"
        MINUTE = "minute", "minute"
        HOUR = "hour", "hour"

    plan = models.ForeignKey(
        Plan, null=True, blank=True, related_name="rate_limits", on_delete=models.CASCADE
    )
    route = models.ForeignKey(
        "gateway.Route",
        null=True,
        blank=True,
        related_name="rate_limits",
        on_delete=models.CASCADE,
        help_text="Only on this route (overriding the plan's rule of the same scope and window).",
    )
    scope = models.CharField(max_length=12, choices=Scope.choices, default=Scope.KEY)
    limit = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    window = models.CharField(max_length=6, choices=Window.choices, default=Window.MINUTE)
    burst = models.PositiveIntegerField(
        default=0,
        help_text="Requests allowed at once above the even pace; any one window admits at "
        "most limit + burst.",
    )

    class Meta:
        ordering = ["plan", "route", "scope", "window"]
        constraints = [
            models.CheckConstraint(
                condition=Q(plan__isnull=False) | Q(route__isnull=False),
                name="rate_limit_has_plan_or_route",
            ),
            models.UniqueConstraint(
                fields=["plan", "route", "scope", "window"],
                name="rate_limit_unique",
            ),
        ]

    def __str__(self) -> str:
        burst = f" + {self.burst} burst" if self.burst else ""
        return f"{self.limit}/{self.window}{burst} per {SCOPE_NOUN[self.scope]}"

    def clean(self) -> None:
        # In an admin inline the parent may be unsaved yet: look at the objects, not the ids.
        plan = self.plan if self.plan_id or "plan" in self._state.fields_cache else None
        route = self.route if self.route_id or "route" in self._state.fields_cache else None
        if plan is None and route is None:
            raise ValidationError("A rate limit belongs to a plan, a route, or both.")
        if plan is None and route is not None and route.anonymous and self.scope != "client_ip":
            raise ValidationError(
                {"scope": "Anonymous routes have no key or consumer: limit them per client IP."}
            )
        twins = RateLimit.objects.filter(
            plan_id=self.plan_id, route_id=self.route_id, scope=self.scope, window=self.window
        ).exclude(pk=self.pk)
        if twins.exists():  # the unique constraint does not see rows whose plan or route is null
            raise ValidationError(f"There is a {self.window} limit per {self.scope} here already.")


SCOPE_NOUN = {
    "key": "key",
    "consumer": "consumer",
    "organization": "organization",
    "client_ip": "client IP",
}


def quota_period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the UTC calendar day or month containing `now` (an aware datetime)."""
    from datetime import UTC, timedelta

    now = now.astimezone(UTC)
    if period == Plan.QuotaPeriod.MONTH:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    return start, end


class Subscription(models.Model):
    """A consumer's access to a plan; only an active one authorizes requests."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending approval"
        ACTIVE = "active", "Active"
        REJECTED = "rejected", "Rejected"
        CANCELLED = "cancelled", "Cancelled"

    consumer = models.ForeignKey(Consumer, related_name="subscriptions", on_delete=models.CASCADE)
    plan = models.ForeignKey(Plan, related_name="subscriptions", on_delete=models.PROTECT)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["consumer", "plan"],
                condition=Q(status__in=["pending", "active"]),
                name="one_open_subscription_per_plan",
            )
        ]

    def __str__(self) -> str:
        return f"{self.consumer} → {self.plan} ({self.status})"

    def is_active(self) -> bool:
        """Whether requests under this subscription are authorized."""
        return self.status == self.Status.ACTIVE


class ApiKey(models.Model):
    """An API key under a subscription. Only its id and a keyed hash are stored."""

    subscription = models.ForeignKey(Subscription, related_name="keys", on_delete=models.CASCADE)
    name = models.CharField(max_length=100)
    key_id = models.CharField(max_length=32, unique=True, help_text="Public part of the key.")
    digest = models.CharField(max_length=64, help_text="HMAC-SHA256 of the whole key.")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    scopes = models.CharField(
        max_length=500,
        blank=True,
        help_text="Space-separated scopes this key holds, for routes that require scopes.",
    )
    # Who made it: for an organization's key, the member (its usage is broken down by it).
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="created_keys",
    )

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def prefix(self) -> str:
        """What lists show of the key: enough to recognise it, useless to call with."""
        return f"gw_{self.key_id}"

    def is_usable(self, now: datetime) -> bool:
        """Not revoked, not expired."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > now


class QuotaCounter(models.Model):
    """Quota used by a subscription in one period (persisted by the embedded gateway)."""

    subscription = models.ForeignKey(Subscription, on_delete=models.CASCADE)
    period_start = models.DateTimeField()
    used = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["subscription", "period_start"], name="quota_counter_unique"
            )
        ]

    def __str__(self) -> str:
        return (
            f"subscription {self.subscription_id} since {self.period_start:%Y-%m-%d}: {self.used}"
        )


class AuditEvent(models.Model):
    """Who did what to which object; written by the action functions."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    action = models.CharField(max_length=50)
    target = models.CharField(max_length=200)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} {self.action} {self.target}"


def _token_expiry() -> datetime:
    from datetime import timedelta

    from django.utils import timezone

    return timezone.now() + timedelta(days=90)


class ApiToken(models.Model):
    """A token for the management REST API (`Authorization: Bearer gwt_…`). Only its id and
    a keyed hash are stored. A staff user's token reaches every resource its scope allows;
    anyone else's only their own keys, subscriptions and usage."""

    class Scope(models.TextChoices):
        READ = "read", "Read only"
        WRITE = "write", "Read and write"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, related_name="api_tokens", on_delete=models.CASCADE
    )
    name = models.CharField(max_length=100)
    token_id = models.CharField(max_length=32, unique=True, editable=False)
    digest = models.CharField(max_length=64, editable=False)
    scope = models.CharField(max_length=5, choices=Scope.choices, default=Scope.READ)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(default=_token_expiry)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "API token"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def prefix(self) -> str:
        return f"gwt_{self.token_id}"

    def is_usable(self, now: datetime) -> bool:
        return self.revoked_at is None and self.expires_at > now
