"""What the data plane serves: APIs, routes, upstreams and their targets, config versions."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

path_prefix_validator = RegexValidator(
    r"^/([A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*)?$",
    "A path that starts with '/', made of segments of letters, digits and . _ ~ -, "
    "with no trailing slash (e.g. /demo or /v1/orders).",
)


class ConfigState(models.Model):
    """The single row holding the current config version.

    Bumping it is an UPDATE of this row, so concurrent bumping transactions are serialised by
    its row lock and commit in version order: a gateway that has read version N sees every
    change of versions <= N. (A max(id) over inserted rows would not: ids are handed out at
    insert but become visible in commit order, so a change could hide behind a later id.)
    """

    version = models.BigIntegerField(default=0)
    # New for every new row: a database restored or reset to an older version number is
    # still seen as a change by the gateways.
    epoch = models.UUIDField(default=uuid.uuid4)

    def __str__(self) -> str:
        return f"config v{self.version}"


class ConfigVersion(models.Model):
    """The history: one row per config version, with who made it and why."""

    version = models.BigIntegerField(unique=True, null=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    reason = models.CharField(max_length=200)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"v{self.version}: {self.reason}"


class Upstream(models.Model):
    """A backend service: a named pool of targets that requests are balanced over."""

    class Algorithm(models.TextChoices):
        ROUND_ROBIN = "round_robin", "Round robin"

    name = models.SlugField(unique=True)
    description = models.CharField(max_length=200, blank=True)
    algorithm = models.CharField(
        max_length=20, choices=Algorithm.choices, default=Algorithm.ROUND_ROBIN
    )
    connect_timeout = models.FloatField(
        default=5.0, validators=[MinValueValidator(0.01), MaxValueValidator(600)]
    )
    read_timeout = models.FloatField(
        default=60.0, validators=[MinValueValidator(0.01), MaxValueValidator(3600)]
    )

    def __str__(self) -> str:
        return self.name


class Target(models.Model):
    """One instance of an upstream service (host:port)."""

    upstream = models.ForeignKey(Upstream, related_name="targets", on_delete=models.CASCADE)
    host = models.CharField(max_length=255)
    port = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(65535)])
    weight = models.PositiveSmallIntegerField(default=100, validators=[MaxValueValidator(1000)])
    enabled = models.BooleanField(default=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["upstream", "host", "port"], name="target_unique")
        ]

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Api(models.Model):
    """A published API: a public path prefix on the gateway in front of an upstream."""

    name = models.CharField(max_length=100)
    slug = models.SlugField(unique=True)
    description = models.TextField(blank=True)
    path_prefix = models.CharField(
        max_length=200,
        unique=True,
        validators=[path_prefix_validator],
        help_text="Public prefix on the gateway, e.g. /demo",
    )
    upstream = models.ForeignKey(Upstream, related_name="apis", on_delete=models.PROTECT)
    is_published = models.BooleanField(default=True, help_text="Listed in the portal catalog.")
    key_header = models.CharField(
        max_length=100, default="X-API-Key", help_text="Header that carries the API key."
    )

    class LimiterFailure(models.TextChoices):
        OPEN = "open", "Let requests through (counted in metrics)"
        CLOSED = "closed", "Refuse with 503 and Retry-After"

    limiter_failure = models.CharField(
        max_length=6,
        choices=LimiterFailure.choices,
        default=LimiterFailure.OPEN,
        help_text="What to do when the shared limit store (Redis) cannot be reached.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "API"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Route(models.Model):
    """A path under an API that the gateway forwards; the longest matching prefix wins."""

    api = models.ForeignKey(Api, related_name="routes", on_delete=models.CASCADE)
    name = models.CharField(max_length=100)
    path = models.CharField(
        max_length=200,
        default="/",
        validators=[RegexValidator(r"^/", "Starts with '/'.")],
        help_text="Prefix under the API's path prefix; '/' matches everything.",
    )
    methods = models.CharField(
        max_length=100, blank=True, help_text="Comma-separated, e.g. GET,POST. Empty: any."
    )
    strip_prefix = models.BooleanField(
        default=True, help_text="Remove the API's path prefix before forwarding."
    )
    upstream = models.ForeignKey(
        Upstream,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        help_text="Overrides the API's upstream for this route.",
    )
    enabled = models.BooleanField(default=True)

    class Meta:
        ordering = ["api", "path"]

    def __str__(self) -> str:
        return f"{self.api.path_prefix}{self.path}" if self.api_id else self.path

    def method_set(self) -> frozenset[str]:
        """The HTTP methods this route accepts; empty means any."""
        return frozenset(m.strip().upper() for m in self.methods.split(",") if m.strip())
