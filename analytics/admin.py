from __future__ import annotations

from django.contrib import admin

from analytics.models import RequestEvent, Rollup


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(RequestEvent)
class RequestEventAdmin(ReadOnlyAdmin):
    list_display = ["time", "method", "route_path", "status", "latency_ms", "api_id", "key_id"]
    list_filter = ["status", "method", "api_id"]
    search_fields = ["event_id"]
    date_hierarchy = "time"


@admin.register(Rollup)
class RollupAdmin(ReadOnlyAdmin):
    list_display = [
        "bucket",
        "granularity",
        "dimension",
        "dim_id",
        "api_id",
        "status_class",
        "count",
        "errors",
        "bytes_out",
    ]
    list_filter = ["granularity", "dimension", "status_class"]
    date_hierarchy = "bucket"
