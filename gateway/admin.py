from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db import models

from gateway.actions import cache_purge
from gateway.admin_mixins import ConfigChangeAdmin
from gateway.models import (
    Api,
    ApiVersion,
    CachePurge,
    ConfigVersion,
    JwtIssuer,
    Policy,
    Route,
    Target,
    Upstream,
)
from portal.models import RateLimit

OPENAPI_UPLOAD_BYTES = 4 << 20


class OpenApiUploadForm(forms.ModelForm):
    """A model form with an `openapi` text field and a file to fill it from: an uploaded
    document (JSON or YAML, UTF-8) replaces the text, then passes the field's validation."""

    openapi_file = forms.FileField(
        required=False,
        label="Upload an OpenAPI document",
        help_text="JSON or YAML, up to 4 MiB; replaces the text.",
        widget=forms.ClearableFileInput(attrs={"accept": ".json,.yaml,.yml"}),
    )

    def clean(self):
        cleaned = super().clean()
        upload = cleaned.get("openapi_file")
        if upload:
            if upload.size > OPENAPI_UPLOAD_BYTES:
                self.add_error("openapi_file", "The file is larger than 4 MiB.")
                return cleaned
            try:
                cleaned["openapi"] = upload.read().decode("utf-8-sig")
            except UnicodeDecodeError:
                self.add_error("openapi_file", "The file is not UTF-8 text.")
        return cleaned


class TargetInline(admin.TabularInline):
    model = Target
    extra = 0


@admin.register(Upstream)
class UpstreamAdmin(ConfigChangeAdmin):
    list_display = ["name", "scheme", "algorithm", "target_list", "health_path"]
    search_fields = ["name", "description", "targets__host"]
    list_filter = ["algorithm", "scheme"]
    inlines = [TargetInline]
    fieldsets = [
        (None, {"fields": ["name", "description"]}),
        ("Load balancing", {"fields": ["algorithm", "hash_on", "hash_header", "retry_budget"]}),
        ("Timeouts (seconds)", {"fields": ["connect_timeout", "read_timeout"]}),
        (
            "TLS",
            {
                "fields": [
                    "scheme",
                    "tls_verify",
                    "tls_ca_file",
                    "tls_server_name",
                    "tls_client_cert",
                    "tls_client_key",
                ]
            },
        ),
        (
            "Active health checks",
            {
                "fields": [
                    "health_path",
                    "health_interval",
                    "health_timeout",
                    "health_statuses",
                    "healthy_threshold",
                    "unhealthy_threshold",
                ],
                "description": "Each gateway worker probes every target, jittered.",
            },
        ),
        (
            "Passive checks (circuit breaker)",
            {"fields": ["eject_after_failures", "eject_seconds"]},
        ),
    ]

    @admin.display(description="Targets")
    def target_list(self, obj: Upstream) -> str:
        return ", ".join(str(t) for t in obj.targets.all()) or "—"

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("targets")


@admin.register(Target)
class TargetAdmin(ConfigChangeAdmin):
    list_display = ["__str__", "upstream", "weight", "enabled"]
    list_filter = ["enabled", "upstream"]
    search_fields = ["host", "upstream__name"]
    list_editable = ["enabled"]


class RouteInline(admin.TabularInline):
    model = Route
    extra = 0
    fields = ["name", "match", "path", "methods", "version", "priority", "upstream", "enabled"]
    show_change_link = True  # hosts, headers, rewrite, timeouts: on the route's own page


class PolicyInline(admin.StackedInline):
    model = Policy
    extra = 0
    fields = ["kind", "config", "enabled"]
    verbose_name_plural = 'Policies (JSON configuration; README, "Policies")'


class RoutePolicyInline(PolicyInline):
    fk_name = "route"
    verbose_name_plural = "Policies of this route (replacing the API's of the same kind)"


class ApiPolicyInline(PolicyInline):
    fk_name = "api"


class JwtIssuerInline(admin.StackedInline):
    model = JwtIssuer
    extra = 0
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}


class ApiVersionInline(admin.StackedInline):
    model = ApiVersion
    form = OpenApiUploadForm
    extra = 0
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    fields = [
        "name",
        "is_default",
        "upstream",
        "deprecated_at",
        "sunset_at",
        "docs_url",
        "openapi",
        "openapi_file",
    ]


@admin.register(Api)
class ApiAdmin(ConfigChangeAdmin):
    form = OpenApiUploadForm
    list_display = [
        "name",
        "slug",
        "path_prefix",
        "hosts",
        "version_scheme",
        "upstream",
        "is_published",
    ]
    list_filter = ["is_published", "version_scheme", "upstream"]
    search_fields = ["name", "slug", "path_prefix", "hosts", "description"]
    prepopulated_fields = {"slug": ["name"]}
    fieldsets = [
        (None, {"fields": ["name", "slug", "description", "is_published", "portal_try_it"]}),
        ("Routing", {"fields": ["path_prefix", "hosts", "upstream"]}),
        (
            "Versions",
            {
                "fields": ["version_scheme", "version_header", "version_query"],
                "description": "A request without a version gets the default version.",
            },
        ),
        (
            "Credentials and limits",
            {
                "fields": [
                    "auth_methods",
                    "key_header",
                    "key_query_param",
                    "forward_credential",
                    "limiter_failure",
                ]
            },
        ),
        ("Client addresses", {"fields": ["ip_allow", "ip_deny"]}),
        (
            "OpenAPI document",
            {
                "fields": ["openapi", "openapi_file"],
                "classes": ["collapse"],
                "description": "Used by a validate policy and shown in the portal.",
            },
        ),
    ]
    inlines = [ApiVersionInline, RouteInline, JwtIssuerInline, ApiPolicyInline]
    actions = ["purge_cache"]

    @admin.action(description="Purge the response cache of the selected APIs")
    def purge_cache(self, request, queryset) -> None:
        for api in queryset:
            cache_purge(api=api, actor=request.user)
        self.message_user(request, f"Cache purged for {len(queryset)} API(s).", messages.SUCCESS)


class RouteRateLimitInline(admin.TabularInline):
    model = RateLimit
    fk_name = "route"
    extra = 0
    fields = ["plan", "scope", "limit", "window", "burst"]
    verbose_name_plural = (
        "Rate limits on this route (with a plan: overrides that plan's rule of the same "
        "scope and window; without: for every caller)"
    )


@admin.register(Route)
class RouteAdmin(ConfigChangeAdmin):
    list_display = [
        "name",
        "api",
        "match",
        "path",
        "methods",
        "hosts",
        "version",
        "priority",
        "upstream",
        "enabled",
    ]
    list_filter = ["enabled", "match", "api"]
    search_fields = ["name", "path", "hosts", "api__name"]
    list_select_related = ["api", "upstream", "version"]
    fieldsets = [
        (None, {"fields": ["api", "name", "enabled"]}),
        (
            "Matching",
            {
                "fields": [
                    "match",
                    "path",
                    "methods",
                    "hosts",
                    "headers",
                    "version",
                    "priority",
                    "anonymous",
                    "required_scopes",
                ],
                "description": "Most specific first: host, then path (exact, regex, deepest "
                "prefix; literal segments before {params}), then conditions and methods, "
                "then priority.",
            },
        ),
        (
            "Forwarding",
            {
                "fields": [
                    "upstream",
                    "strip_prefix",
                    "rewrite",
                    "preserve_host",
                    "connect_timeout",
                    "read_timeout",
                    "timeout",
                    "retries",
                    "max_body_bytes",
                ]
            },
        ),
    ]
    inlines = [RouteRateLimitInline, RoutePolicyInline]
    actions = ["purge_cache"]

    @admin.action(description="Purge the response cache of the selected routes")
    def purge_cache(self, request, queryset) -> None:
        for route in queryset:
            cache_purge(route=route, actor=request.user)
        self.message_user(request, f"Cache purged for {len(queryset)} route(s).", messages.SUCCESS)


@admin.register(ConfigVersion)
class ConfigVersionAdmin(admin.ModelAdmin):
    """The history. Restoring a version applies its configuration again, as a new version
    (what `manage.py gatewayconfig rollback N` does)."""

    list_display = ["version", "created_at", "actor", "reason", "restorable"]
    search_fields = ["reason"]
    list_filter = ["created_at"]
    actions = ["restore"]

    @admin.display(boolean=True, description="Restorable")
    def restorable(self, obj) -> bool:
        return obj.document_id is not None

    def has_restore_permission(self, request) -> bool:
        return request.user.has_perm("gateway.restore_configversion")

    @admin.action(
        description="Restore the configuration of the selected version",
        permissions=["restore"],
    )
    def restore(self, request, queryset) -> None:
        from gateway import declarative

        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version.", messages.ERROR)
            return
        version = queryset.get().version
        try:
            outcome = declarative.restore(version, actor=request.user)
        except LookupError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        except declarative.ConfigFileError as exc:
            self.message_user(
                request, "That configuration is refused today: " + exc.render(), messages.ERROR
            )
            return
        if not outcome.changes:
            self.message_user(request, f"Nothing to change: v{version}'s configuration holds.")
            return
        shown = "; ".join(c.render() for c in outcome.changes[:10])
        more = f" (and {len(outcome.changes) - 10} more)" if len(outcome.changes) > 10 else ""
        self.message_user(
            request,
            f"Restored v{version} as config version {outcome.version}: {shown}{more}",
            messages.SUCCESS,
        )

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(CachePurge)
class CachePurgeAdmin(admin.ModelAdmin):
    """Purge one cached answer by the key its X-Cache-Key header shows."""

    list_display = ["cache_key", "created_at", "actor"]
    search_fields = ["cache_key"]
    fields = ["cache_key"]

    def save_model(self, request, obj, form, change) -> None:
        cache_purge(key=obj.cache_key, actor=request.user)
        saved = CachePurge.objects.filter(cache_key=obj.cache_key[:120]).latest("created_at")
        obj.pk, obj.created_at = saved.pk, saved.created_at  # for admin's log and redirect

    def has_change_permission(self, request, obj=None) -> bool:
        return False
