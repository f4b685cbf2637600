from __future__ import annotations

from django.contrib import admin

from analytics.models import MinuteRollup, RequestEvent


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


@admin.register(MinuteRollup)
class MinuteRollupAdmin(ReadOnlyAdmin):
    list_display = ["bucket", "api_id", "key_id", "status_class", "count", "bytes_out"]
    list_filter = ["status_class", "api_id"]
    date_hierarchy = "bucket"
