from __future__ import annotations

from django.contrib import admin

from gateway.admin_mixins import ConfigChangeAdmin
from gateway.models import Api, ConfigVersion, Route, Target, Upstream


class TargetInline(admin.TabularInline):
    model = Target
    extra = 0


@admin.register(Upstream)
class UpstreamAdmin(ConfigChangeAdmin):
    list_display = ["name", "algorithm", "target_list", "connect_timeout", "read_timeout"]
    search_fields = ["name", "description", "targets__host"]
    list_filter = ["algorithm"]
    inlines = [TargetInline]

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
    fields = ["name", "path", "methods", "strip_prefix", "upstream", "enabled"]


@admin.register(Api)
class ApiAdmin(ConfigChangeAdmin):
    list_display = ["name", "slug", "path_prefix", "upstream", "is_published", "created_at"]
    list_filter = ["is_published", "upstream"]
    search_fields = ["name", "slug", "path_prefix", "description"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [RouteInline]


@admin.register(Route)
class RouteAdmin(ConfigChangeAdmin):
    list_display = ["name", "api", "path", "methods", "strip_prefix", "upstream", "enabled"]
    list_filter = ["enabled", "api"]
    search_fields = ["name", "path", "api__name"]
    list_select_related = ["api", "upstream"]


@admin.register(ConfigVersion)
class ConfigVersionAdmin(admin.ModelAdmin):
    list_display = ["id", "created_at", "actor", "reason"]
    search_fields = ["reason"]
    list_filter = ["created_at"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
