from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin

from gateway.admin_mixins import ConfigChangeAdmin, ConfigChangeMixin
from portal.keys import key_revoke
from portal.models import (
    ApiKey,
    ApiToken,
    AuditEvent,
    Consumer,
    Invitation,
    Membership,
    Organization,
    Plan,
    RateLimit,
    Subscription,
    User,
)
from portal.subscriptions import (
    SubscriptionError,
    subscription_approve,
    subscription_cancel,
    subscription_reject,
)
from portal.tokens import token_issue, token_revoke

admin.site.site_header = "API management"
admin.site.site_title = "API management"


@admin.register(User)
class PortalUserAdmin(ConfigChangeMixin, UserAdmin):
    """Deactivating or deleting a user takes their keys out of the gateway: config bump."""

    list_display = ["username", "email", "is_staff", "is_active", "date_joined", "last_login"]


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Organization)
class OrganizationAdmin(ConfigChangeAdmin):
    list_display = ["name", "slug", "member_count", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]

    @admin.display(description="Members")
    def member_count(self, obj: Organization) -> int:
        return obj.memberships.count()


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    """Invitations sent from the portal (the link's token is not stored, only its hash)."""

    list_display = [
        "email",
        "organization",
        "role",
        "invited_by",
        "created_at",
        "expires_at",
        "accepted_at",
    ]
    list_filter = ["role"]
    search_fields = ["email", "organization__name"]
    readonly_fields = [
        "organization",
        "email",
        "role",
        "invited_by",
        "created_at",
        "expires_at",
        "accepted_at",
        "accepted_by",
    ]
    exclude = ["digest"]

    def has_add_permission(self, request) -> bool:
        return False  # owners invite from the portal, which sends the email


@admin.register(Consumer)
class ConsumerAdmin(ConfigChangeAdmin):
    list_display = ["__str__", "user", "organization", "created_at"]
    search_fields = ["user__email", "user__username", "organization__name"]
    list_select_related = ["user", "organization"]
    autocomplete_fields = ["user", "organization"]


class PlanRateLimitInline(admin.TabularInline):
    model = RateLimit
    fk_name = "plan"
    extra = 0
    fields = ["scope", "limit", "window", "burst", "route"]
    raw_id_fields = ["route"]
    verbose_name_plural = "Rate limits (a route: only there, instead of the plan-wide rule)"


@admin.register(Plan)
class PlanAdmin(ConfigChangeAdmin):
    list_display = [
        "name",
        "slug",
        "limits",
        "quota_limit",
        "quota_period",
        "requires_approval",
        "is_public",
        "api_list",
    ]
    list_filter = ["requires_approval", "is_public", "quota_period"]
    search_fields = ["name", "slug"]
    filter_horizontal = ["apis"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [PlanRateLimitInline]

    @admin.display(description="Rate limits")
    def limits(self, obj: Plan) -> str:
        return ", ".join(str(r) for r in obj.rate_limits.all() if r.route_id is None) or "—"

    @admin.display(description="APIs")
    def api_list(self, obj: Plan) -> str:
        return ", ".join(a.name for a in obj.apis.all()) or "—"

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("apis", "rate_limits")


def _bulk(modeladmin, request, queryset, action, verb: str) -> None:
    done = 0
    for obj in queryset:
        try:
            action(obj, actor=request.user)
            done += 1
        except SubscriptionError as exc:
            modeladmin.message_user(request, f"{obj}: {exc}", messages.WARNING)
    modeladmin.message_user(request, f"{done} subscription(s) {verb}.", messages.SUCCESS)


@admin.register(Subscription)
class SubscriptionAdmin(ConfigChangeAdmin):
    list_display = ["consumer", "plan", "status", "created_at", "decided_at"]
    list_filter = ["status", "plan"]
    search_fields = ["consumer__user__email", "consumer__organization__name", "plan__name"]
    list_select_related = ["consumer__user", "consumer__organization", "plan"]
    autocomplete_fields = ["consumer"]
    readonly_fields = ["decided_at", "created_at"]
    actions = ["approve", "reject", "cancel"]

    @admin.action(description="Approve selected pending subscriptions")
    def approve(self, request, queryset) -> None:
        _bulk(self, request, queryset, subscription_approve, "approved")

    @admin.action(description="Reject selected pending subscriptions")
    def reject(self, request, queryset) -> None:
        _bulk(self, request, queryset, subscription_reject, "rejected")

    @admin.action(description="Cancel selected subscriptions")
    def cancel(self, request, queryset) -> None:
        _bulk(self, request, queryset, subscription_cancel, "cancelled")


@admin.register(ApiKey)
class ApiKeyAdmin(ConfigChangeAdmin):
    list_display = [
        "name",
        "prefix",
        "owner",
        "plan",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
    ]
    list_filter = ["revoked_at", "subscription__plan", "created_at"]
    search_fields = [
        "name",
        "key_id",
        "subscription__consumer__user__email",
        "subscription__consumer__organization__name",
    ]
    list_select_related = [
        "subscription__plan",
        "subscription__consumer__user",
        "subscription__consumer__organization",
    ]
    readonly_fields = ["key_id", "digest", "created_at", "revoked_at", "last_used_at"]
    fields = [
        "name",
        "subscription",
        "key_id",
        "digest",
        "expires_at",
        "created_at",
        "revoked_at",
        "last_used_at",
    ]
    raw_id_fields = ["subscription"]
    actions = ["revoke"]

    @admin.display(description="Owner")
    def owner(self, obj: ApiKey) -> str:
        return str(obj.subscription.consumer)

    @admin.display(description="Plan")
    def plan(self, obj: ApiKey) -> str:
        return obj.subscription.plan.name

    def has_add_permission(self, request) -> bool:
        # Keys are issued where the secret can be shown once: the portal or `createapikey`.
        return False

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset) -> None:
        n = 0
        for api_key in queryset:
            if api_key.revoked_at is None:
                key_revoke(api_key, actor=request.user)
                n += 1
        self.message_user(request, f"{n} key(s) revoked.", messages.SUCCESS)


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ["at", "actor", "action", "target"]
    list_filter = ["action", "at"]
    search_fields = ["target", "actor__email"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Management API tokens: made here, shown once on the page after saving."""

    list_display = [
        "name",
        "prefix",
        "user",
        "scope",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
    ]
    list_filter = ["scope", "revoked_at", "expires_at"]
    search_fields = ["name", "token_id", "user__email", "user__username"]
    list_select_related = ["user"]
    raw_id_fields = ["user"]
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["user", "name", "scope", "expires_at"]
        return [
            "user",
            "name",
            "prefix",
            "scope",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
        ]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        return ["user", "prefix", "scope", "created_at", "expires_at", "revoked_at", "last_used_at"]

    def save_model(self, request, obj, form, change) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        issued = token_issue(
            obj.user,
            name=obj.name,
            scope=obj.scope,
            expires_at=obj.expires_at,
            actor=request.user,
        )
        obj.pk = issued.token.pk
        request._issued_token = issued  # shown once by response_add

    def response_add(self, request, obj, post_url_continue=None):
        from django.template.response import TemplateResponse

        issued = getattr(request, "_issued_token", None)
        if issued is None:
            return super().response_add(request, obj, post_url_continue)
        response = TemplateResponse(
            request,
            "admin/portal/apitoken/issued.html",
            {
                **self.admin_site.each_context(request),
                "issued": issued,
                "opts": self.opts,
                "title": "API token created",
            },
        )
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset) -> None:
        n = 0
        for token in queryset.filter(revoked_at=None):
            token_revoke(token, actor=request.user)
            n += 1
        self.message_user(request, f"{n} token(s) revoked.", messages.SUCCESS)
