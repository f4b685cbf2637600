"""What the data plane serves: APIs, routes, upstreams and their targets, config versions."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

from gateway import routing

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


class ConfigDocument(models.Model):
    """A whole configuration as a structural config version left it (gateway/declarative.py,
    canonical JSON, secrets included: never shown by the API), shared by every version that
    left the same one."""

    sha256 = models.CharField(max_length=64, unique=True)
    document = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.sha256[:12]


class ConfigVersion(models.Model):
    """The history: one row per config version, with who made it and why."""

    version = models.BigIntegerField(unique=True, null=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    reason = models.CharField(max_length=200)
    # A change of API keys only (issue, revoke, rotate, delete, a subscription decided): the
    # key ids it touched, which gateways reload as a delta. Null: a structural change
    # (APIs, routes, upstreams, plans, …) that rebuilds the whole snapshot.
    key_ids = models.JSONField(null=True, blank=True)
    # Structural versions: the configuration they made, which `gatewayconfig rollback` and
    # admin's "restore" apply again.
    document = models.ForeignKey(
        ConfigDocument, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        ordering = ["-id"]
        permissions = [("restore_configversion", "Can restore an earlier config version")]

    def __str__(self) -> str:
        return f"v{self.version}: {self.reason}"


def validate_status_list(text: str) -> None:
    """'200-399' or '200, 204, 301-302': statuses a health probe counts as healthy."""
    try:
        parse_status_list(text)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None


def parse_status_list(text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"{part!r} is not a status or a range like 200-399.") from None
        if not 100 <= a <= b <= 599:
            raise ValueError(f"{part!r}: statuses are 100-599, low to high.")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError("Name at least one status, e.g. 200-399.")
    return frozenset(out)


def validate_openapi(text: str) -> None:
    """An OpenAPI 3.0/3.1 document the validation stage can compile."""
    if not text.strip():
        return
    from gateway.dataplane.openapi import OpenApiError, compiled_openapi

    try:
        compiled_openapi(text)
    except OpenApiError as exc:
        raise ValidationError(str(exc)) from None


class Upstream(models.Model):
    """A backend service: a named pool of targets that requests are balanced over."""

    class Algorithm(models.TextChoices):
        ROUND_ROBIN = "round_robin", "Round robin (weighted by target weight)"
        LEAST_CONNECTIONS = "least_connections", "Least connections (per weight)"
        CONSISTENT_HASH = "consistent_hash", "Consistent hash"

    class HashOn(models.TextChoices):
        CONSUMER = "consumer", "Consumer"
        CLIENT_IP = "client_ip", "Client IP"
        HEADER = "header", "A request header"

    class Scheme(models.TextChoices):
        HTTP = "http", "http"
        HTTPS = "https", "https"

    name = models.SlugField(unique=True)
    description = models.CharField(max_length=200, blank=True)
    algorithm = models.CharField(
        max_length=20, choices=Algorithm.choices, default=Algorithm.ROUND_ROBIN
    )
    hash_on = models.CharField(
        max_length=10,
        choices=HashOn.choices,
        default=HashOn.CONSUMER,
        help_text="Consistent hash: what keeps a client on one target (falls back to the "
        "client IP when absent).",
    )
    hash_header = models.CharField(
        max_length=100, blank=True, validators=[routing.header_name_validator]
    )
    connect_timeout = models.FloatField(
        default=5.0, validators=[MinValueValidator(0.01), MaxValueValidator(600)]
    )
    read_timeout = models.FloatField(
        default=60.0, validators=[MinValueValidator(0.01), MaxValueValidator(3600)]
    )
    # --- TLS to the targets ---
    scheme = models.CharField(max_length=5, choices=Scheme.choices, default=Scheme.HTTP)
    tls_verify = models.BooleanField(
        default=True, help_text="Verify the target's certificate (https)."
    )
    tls_ca_file = models.CharField(
        max_length=500, blank=True, help_text="CA bundle (PEM path); empty: the system's."
    )
    tls_server_name = models.CharField(
        max_length=255,
        blank=True,
        help_text="SNI and the name the certificate must carry; empty: the target host.",
    )
    tls_client_cert = models.CharField(
        max_length=500, blank=True, help_text="Client certificate (PEM path), for mTLS."
    )
    tls_client_key = models.CharField(
        max_length=500, blank=True, help_text="Its private key (PEM path)."
    )
    # --- active health checks (each gateway worker probes, jittered) ---
    health_path = models.CharField(
        max_length=200,
        blank=True,
        validators=[RegexValidator(r"^/", "Starts with '/'.")],
        help_text="Probe this path on every target; empty: no active checks.",
    )
    health_interval = models.FloatField(
        default=5.0, validators=[MinValueValidator(0.1), MaxValueValidator(3600)]
    )
    health_timeout = models.FloatField(
        default=2.0, validators=[MinValueValidator(0.05), MaxValueValidator(60)]
    )
    health_statuses = models.CharField(
        max_length=100, default="200-399", validators=[validate_status_list]
    )
    healthy_threshold = models.PositiveSmallIntegerField(
        default=2, validators=[MinValueValidator(1)], help_text="Passing probes to come back."
    )
    unhealthy_threshold = models.PositiveSmallIntegerField(
        default=3, validators=[MinValueValidator(1)], help_text="Failing probes to go down."
    )
    # --- passive checks: a circuit breaker per target ---
    eject_after_failures = models.PositiveSmallIntegerField(
        default=5,
        help_text="Consecutive failures (refused, timed out, 502/503/504) that eject a "
        "target; 0: never.",
    )
    eject_seconds = models.FloatField(
        default=10.0,
        validators=[MinValueValidator(0.1), MaxValueValidator(3600)],
        help_text="Cool-down before one trial request (half-open).",
    )
    retry_budget = models.FloatField(
        default=0.2,
        validators=[MinValueValidator(0), MaxValueValidator(1)],
        help_text="Retries in flight may be at most this share of requests in flight "
        "(at least 3), so retries cannot multiply an outage.",
    )

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if (
            self.algorithm == "consistent_hash"
            and self.hash_on == "header"
            and not self.hash_header
        ):
            raise ValidationError({"hash_header": "Name the header to hash on."})
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise ValidationError({"tls_client_key": "A client certificate needs its key."})


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
        validators=[path_prefix_validator],
        help_text="Public prefix on the gateway, e.g. /demo",
    )
    hosts = models.CharField(
        max_length=500,
        blank=True,
        validators=[routing.validate_hosts],
        help_text="Comma-separated host names this API answers on; '*.example.com' matches "
        "every subdomain. Empty: any host.",
    )
    upstream = models.ForeignKey(Upstream, related_name="apis", on_delete=models.PROTECT)

    class VersionScheme(models.TextChoices):
        NONE = "none", "Not versioned"
        PATH = "path", "Path segment after the prefix (/prefix/v2/…)"
        HEADER = "header", "Request header"
        QUERY = "query", "Query parameter"

    version_scheme = models.CharField(
        max_length=6,
        choices=VersionScheme.choices,
        default=VersionScheme.NONE,
        help_text="How a request names the API version; without one it gets the default.",
    )
    version_header = models.CharField(
        max_length=100,
        default="API-Version",
        validators=[routing.header_name_validator],
        help_text="Header naming the version (scheme 'header').",
    )
    version_query = models.CharField(
        max_length=100, default="version", help_text="Query parameter (scheme 'query')."
    )
    is_published = models.BooleanField(default=True, help_text="Listed in the portal catalog.")
    portal_try_it = models.BooleanField(
        default=False,
        help_text='The portal\'s documentation may send real requests here ("Try it"): the '
        "gateway admits the portal's origin (PORTAL_URL) by CORS on this API, with the key "
        "and version headers.",
    )
    key_header = models.CharField(
        max_length=100, default="X-API-Key", help_text="Header that carries the API key."
    )
    key_query_param = models.CharField(
        max_length=100,
        blank=True,
        help_text="Also accept the key in this query parameter (e.g. api_key). Empty: never "
        "(a key in a URL ends up in logs and browser history).",
    )
    forward_credential = models.BooleanField(
        default=False,
        help_text="Pass the key on to the upstream; by default it is removed before proxying.",
    )
    ip_allow = models.TextField(
        blank=True,
        validators=[routing.validate_networks],
        help_text="Only these client networks may call (CIDRs, comma or line separated, "
        "e.g. 10.0.0.0/8). Empty: every address.",
    )
    ip_deny = models.TextField(
        blank=True,
        validators=[routing.validate_networks],
        help_text="These client networks may not call, even when allowed above.",
    )

    class AuthMethods(models.TextChoices):
        KEY = "key", "API keys"
        JWT = "jwt", "JWTs from trusted issuers"
        ANY = "any", "API keys or JWTs"

    auth_methods = models.CharField(
        max_length=3,
        choices=AuthMethods.choices,
        default=AuthMethods.KEY,
        help_text="Which credentials identify the caller (JWT issuers are listed below).",
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
    openapi = models.TextField(
        blank=True,
        validators=[validate_openapi],
        help_text="The API's OpenAPI 3.0/3.1 document (JSON or YAML), for the validate "
        "policy and the portal; a version's own document replaces it.",
    )
    cache_generation = models.PositiveIntegerField(
        default=0, editable=False, help_text="Bumped by a purge: older entries are unreachable."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "API"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        """Two APIs may share a prefix only on hosts that do not overlap."""
        mine = routing.parse_hosts(self.hosts)
        for other in Api.objects.filter(path_prefix=self.path_prefix).exclude(pk=self.pk):
            theirs = routing.parse_hosts(other.hosts)
            if not mine or not theirs or set(mine) & set(theirs):
                raise ValidationError(
                    {
                        "path_prefix": f"API '{other}' already serves {self.path_prefix} "
                        "on these hosts."
                    }
                )


class ApiVersion(models.Model):
    """One version of an API: its own upstream if it has one, deprecation and sunset dates."""

    api = models.ForeignKey(Api, related_name="versions", on_delete=models.CASCADE)
    name = models.SlugField(max_length=40, help_text="As clients send it, e.g. v2 or 2024-06-01.")
    is_default = models.BooleanField(
        default=False, help_text="Serves requests that name no version."
    )
    upstream = models.ForeignKey(
        Upstream,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        help_text="Overrides the API's upstream for this version.",
    )
    description = models.TextField(blank=True)
    deprecated_at = models.DateTimeField(
        null=True, blank=True, help_text="From then on, answers carry a Deprecation header."
    )
    sunset_at = models.DateTimeField(
        null=True, blank=True, help_text="Announced end of life (Sunset header)."
    )
    docs_url = models.URLField(blank=True, help_text="Linked from deprecated answers.")
    openapi = models.TextField(
        blank=True,
        validators=[validate_openapi],
        help_text="This version's OpenAPI document (JSON or YAML); empty: the API's.",
    )

    class Meta:
        ordering = ["api", "name"]
        constraints = [
            models.UniqueConstraint(fields=["api", "name"], name="api_version_unique"),
            models.UniqueConstraint(
                fields=["api"], condition=Q(is_default=True), name="api_version_one_default"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.api.slug} {self.name}" if self.api_id else self.name


class Route(models.Model):
    """A path under an API that the gateway forwards (precedence: README, "Routing")."""

    class Match(models.TextChoices):
        PREFIX = "prefix", "Prefix (the path and everything under it)"
        EXACT = "exact", "Exact path"
        REGEX = "regex", "Regular expression (over the whole rest of the path)"

    api = models.ForeignKey(Api, related_name="routes", on_delete=models.CASCADE)
    name = models.CharField(max_length=100)
    match = models.CharField(max_length=6, choices=Match.choices, default=Match.PREFIX)
    path = models.CharField(
        max_length=500,
        default="/",
        help_text="Under the API's prefix. Prefix and exact paths may hold {name} segments "
        "(/orders/{id}); a regex may name groups ((?P<id>[0-9]+)).",
    )
    methods = models.CharField(
        max_length=100,
        blank=True,
        validators=[routing.validate_methods],
        help_text="Comma-separated, e.g. GET,POST. Empty: any.",
    )
    hosts = models.CharField(
        max_length=500,
        blank=True,
        validators=[routing.validate_hosts],
        help_text="Comma-separated; '*.example.com' for subdomains. Empty: the API's hosts.",
    )
    headers = models.TextField(
        blank=True,
        validators=[routing.validate_header_conditions],
        help_text="One condition a line: 'Name: value' (or 'Name: v1, v2'); 'Name: *' means "
        "present. All must hold.",
    )
    version = models.ForeignKey(
        ApiVersion,
        null=True,
        blank=True,
        related_name="routes",
        on_delete=models.CASCADE,
        help_text="Serve this route for one version only. Empty: every version.",
    )
    priority = models.IntegerField(
        default=0, help_text="Higher first, between routes that are equally specific."
    )
    required_scopes = models.CharField(
        max_length=500,
        blank=True,
        help_text="Space-separated scopes a credential must hold for this route (the JWT "
        "scope/scp claim, or the key's scopes); 403 otherwise.",
    )
    anonymous = models.BooleanField(
        default=False,
        help_text="Public: no credential is asked for and no per-key limit applies. Every "
        "other route requires a key.",
    )
    strip_prefix = models.BooleanField(
        default=True,
        help_text="Remove the API's prefix (and a path version segment) before forwarding.",
    )
    rewrite = models.CharField(
        max_length=500,
        blank=True,
        validators=[RegexValidator(r"^/", "Starts with '/'.")],
        help_text="Upstream path instead, with captured {name}s, e.g. /v1/orders/{id}; the "
        "rest of a prefix match is appended.",
    )
    preserve_host = models.BooleanField(
        default=False, help_text="Send the client's Host upstream instead of the target's."
    )
    connect_timeout = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.01), MaxValueValidator(600)],
        help_text="Seconds; empty: the upstream's.",
    )
    read_timeout = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.01), MaxValueValidator(3600)],
        help_text="Seconds between bytes of the answer; empty: the upstream's.",
    )
    timeout = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.01), MaxValueValidator(86400)],
        help_text="Seconds for the whole exchange; empty: no total limit.",
    )
    retries = models.PositiveSmallIntegerField(
        default=1,
        validators=[MaxValueValidator(10)],
        help_text="Tries on another target after a connection failure, and for idempotent "
        "methods after 502/503/504 or a timeout. A request whose body was streamed is not "
        "retried.",
    )
    max_body_bytes = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="Largest request body (413 beyond); empty: GATEWAY_MAX_BODY_BYTES; 0: none.",
    )
    upstream = models.ForeignKey(
        Upstream,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        help_text="Overrides the API's upstream for this route.",
    )
    enabled = models.BooleanField(default=True)
    cache_generation = models.PositiveIntegerField(default=0, editable=False)

    class Meta:
        ordering = ["api", "path"]

    def __str__(self) -> str:
        return f"{self.api.path_prefix}{self.path}" if self.api_id else self.path

    def method_set(self) -> frozenset[str]:
        """The HTTP methods this route accepts; empty means any (the router also answers a
        HEAD with a GET route when no route takes HEAD itself)."""
        return frozenset(m.strip().upper() for m in self.methods.split(",") if m.strip())

    def clean(self) -> None:
        """Refuse what the gateway could not compile: a bad pattern or rewrite, a version of
        another API."""
        try:
            pattern = routing.compile_path(self.match, self.path)
            if self.rewrite:
                routing.compile_rewrite(self.rewrite, pattern.params)
        except routing.RouteConfigError as exc:
            raise ValidationError({exc.field: exc.message}) from None
        if self.version_id and self.api_id and self.version.api_id != self.api_id:
            raise ValidationError({"version": "A version of another API."})
        if (
            self.api_id
            and Route.objects.filter(api_id=self.api_id, name=self.name)
            .exclude(pk=self.pk)
            .exists()
        ):
            raise ValidationError(
                {"name": "Another route of this API has this name (names identify routes)."}
            )


class JwtIssuer(models.Model):
    """An identity provider whose tokens an API trusts (RFC 7519, RFC 8725 checks)."""

    api = models.ForeignKey(Api, related_name="jwt_issuers", on_delete=models.CASCADE)
    issuer = models.CharField(max_length=500, help_text="The exact `iss` of its tokens.")
    algorithms = models.CharField(
        max_length=100,
        default="RS256",
        help_text="Comma-separated allow-list: RS256, ES256, EdDSA, HS256. 'none' never is.",
    )
    jwks_url = models.URLField(
        max_length=500,
        blank=True,
        help_text="Public keys, fetched in the background and refreshed (an unknown kid "
        "triggers one rate-limited refetch).",
    )
    static_jwks = models.JSONField(
        null=True,
        blank=True,
        help_text='Keys as a JWKS document {"keys": [...]}, e.g. an "oct" key for HS256.',
    )
    audiences = models.CharField(
        max_length=500, blank=True, help_text="Comma-separated; the token's aud must hold one."
    )
    leeway = models.FloatField(
        default=30.0,
        validators=[MinValueValidator(0), MaxValueValidator(600)],
        help_text="Seconds of clock skew allowed for exp, nbf and iat.",
    )
    typ = models.CharField(
        max_length=50, blank=True, help_text="Required JOSE typ header, e.g. at+jwt."
    )
    consumer_claim = models.CharField(
        max_length=100,
        default="sub",
        help_text="The claim whose value is a consumer's external id.",
    )
    enabled = models.BooleanField(default=True)

    class Meta:
        verbose_name = "JWT issuer"
        constraints = [models.UniqueConstraint(fields=["api", "issuer"], name="jwt_issuer_unique")]

    def __str__(self) -> str:
        return self.issuer

    def provider_config(self):
        """This issuer as the data plane's verifier configuration."""
        from gateway.dataplane.jwt import ProviderConfig

        return ProviderConfig(
            issuer=self.issuer,
            algorithms=tuple(a.strip() for a in self.algorithms.split(",") if a.strip()),
            audiences=tuple(a.strip() for a in self.audiences.split(",") if a.strip()),
            leeway=self.leeway,
            typ=self.typ,
            jwks_url=self.jwks_url,
            static_jwks=self.static_jwks,
            consumer_claim=self.consumer_claim,
        )

    def clean(self) -> None:
        """Refuse what the verifier could not use."""
        from gateway.dataplane.jwt import validate_provider

        try:
            validate_provider(self.provider_config())
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


def parse_policy(kind: str, config):
    """A policy's configuration as its stage uses it; ValueError (naming the field) if bad."""
    from gateway.dataplane.stages import aggregate, cache, cors, transform, validate, websocket

    parsers = {
        "cors": cors.parse_cors,
        "request_transform": transform.parse_request_transform,
        "response_transform": transform.parse_response_transform,
        "cache": cache.parse_cache,
        "aggregate": aggregate.parse_aggregate,
        "websocket": websocket.parse_websocket,
        "validate": validate.parse_validate,
    }
    return parsers[kind](config)


class Policy(models.Model):
    """A payload policy of an API, or of one route (replacing the API's of the same kind).

    The configuration is JSON, validated by the stage that runs it (README, "Policies")."""

    class Kind(models.TextChoices):
        CORS = "cors", "CORS"
        REQUEST_TRANSFORM = "request_transform", "Transform requests"
        RESPONSE_TRANSFORM = "response_transform", "Transform responses"
        CACHE = "cache", "Cache GET and HEAD answers"
        AGGREGATE = "aggregate", "Aggregate several upstream calls (a route's only)"
        WEBSOCKET = "websocket", "Take WebSocket connections"
        VALIDATE = "validate", "Validate requests against the OpenAPI document"

    api = models.ForeignKey(
        Api, null=True, blank=True, related_name="policies", on_delete=models.CASCADE
    )
    route = models.ForeignKey(
        Route, null=True, blank=True, related_name="policies", on_delete=models.CASCADE
    )
    kind = models.CharField(max_length=30, choices=Kind.choices)
    config = models.JSONField(default=dict, blank=True)
    enabled = models.BooleanField(default=True)

    class Meta:
        verbose_name_plural = "policies"
        ordering = ["api", "route", "kind"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(api__isnull=False) & Q(route__isnull=True))
                | (Q(api__isnull=True) & Q(route__isnull=False)),
                name="policy_api_xor_route",
            ),
            models.UniqueConstraint(
                fields=["api", "kind"], condition=Q(api__isnull=False), name="policy_api_kind"
            ),
            models.UniqueConstraint(
                fields=["route", "kind"],
                condition=Q(route__isnull=False),
                name="policy_route_kind",
            ),
        ]

    def __str__(self) -> str:
        return self.get_kind_display()

    def clean(self) -> None:
        """Refuse a configuration the stage could not use, naming the field."""
        if not self.kind:
            return
        if self.kind == self.Kind.AGGREGATE and self.route_id is None and self.api_id:
            raise ValidationError({"kind": "Aggregation is configured on a route."})
        try:
            parsed = {self.kind: parse_policy(self.kind, self.config)}
            # With the saved policies beside it: some combinations are refused (snapshot.py).
            siblings = Policy.objects.filter(api_id=self.api_id, route_id=self.route_id)
            for other in siblings.exclude(pk=self.pk).exclude(kind=self.kind):
                if other.enabled:
                    parsed[other.kind] = parse_policy(other.kind, other.config)
            from gateway.dataplane.snapshot import check_policies

            check_policies(parsed)
            if self.kind == self.Kind.AGGREGATE:
                names = {c.upstream for c in parsed[self.kind].calls}
                known = set(Upstream.objects.filter(name__in=names).values_list("name", flat=True))
                if names - known:
                    raise ValueError(f"calls: no upstream named {sorted(names - known)[0]!r}.")
        except ValueError as exc:
            message = exc.message if isinstance(exc, routing.RouteConfigError) else str(exc)
            raise ValidationError({"config": message}) from None


class CachePurge(models.Model):
    """One cached answer purged by its key (the X-Cache-Key header), on every node: entries
    stored before this moment under that key are misses."""

    cache_key = models.CharField(
        max_length=120, db_index=True, help_text="As answers show it in X-Cache-Key."
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.cache_key
