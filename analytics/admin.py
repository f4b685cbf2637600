from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django import forms
from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone

from analytics.exports import csv_response
from analytics.models import RequestEvent, Rollup
from analytics.selectors import (
    RANGES,
    export_rows,
    top,
    top_consumers,
    top_window,
    usage_series,
)
from gateway.models import Api
from portal.models import ApiKey, Consumer


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


class ExportForm(forms.Form):
    granularity = forms.ChoiceField(choices=Rollup.Granularity.choices, initial="h")
    dimension = forms.ChoiceField(choices=Rollup.Dimension.choices, initial="api")
    since = forms.DateTimeField(help_text="UTC, e.g. 2026-11-01 00:00")
    until = forms.DateTimeField(help_text="UTC, exclusive")

    def clean(self):
        data = super().clean()
        since, until = data.get("since"), data.get("until")
        if since and until:
            if until <= since:
                raise forms.ValidationError("'until' must be after 'since'.")
            if until - since > timedelta(days=400):
                raise forms.ValidationError("Export at most 400 days at a time.")
        return data


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
    change_list_template = "admin/analytics/rollup_change_list.html"

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path("dashboard/", view(self.dashboard_view), name="analytics_dashboard"),
            path("export/", view(self.export_view), name="analytics_export"),
            *super().get_urls(),
        ]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        name = request.GET.get("range", "24h")
        if name not in RANGES:
            name = "24h"
        granularity, points = RANGES[name]
        now = timezone.now()
        series = usage_series("api", None, granularity=granularity, points=points, now=now)
        top_granularity, since = top_window(name, now=now)
        apis = {a.pk: a.name for a in Api.objects.all()}
        top_apis = top("api", granularity=top_granularity, since=since)
        for row in top_apis:
            row["name"] = apis.get(row["dim_id"], "(no route matched)")
            row["error_pct"] = round(100 * row["error_rate"], 2)
        top_keys = top("key", granularity=top_granularity, since=since)
        keys = {
            k.pk: k
            for k in ApiKey.objects.filter(pk__in=[r["dim_id"] for r in top_keys]).select_related(
                "subscription__consumer__user", "subscription__consumer__organization"
            )
        }
        for row in top_keys:
            key = keys.get(row["dim_id"])
            row["name"] = f"{key.prefix}… ({key.subscription.consumer})" if key else "(deleted)"
            row["error_pct"] = round(100 * row["error_rate"], 2)
        top_owners = top_consumers(granularity=top_granularity, since=since)
        consumers = Consumer.objects.select_related("user", "organization").in_bulk(
            [r["consumer_id"] for r in top_owners if r["consumer_id"] is not None]
        )
        for row in top_owners:
            consumer = consumers.get(row["consumer_id"])
            row["name"] = str(consumer) if consumer else "(deleted keys)"
            row["error_pct"] = round(100 * row["error_rate"], 2)
        context = {
            **self.admin_site.each_context(request),
            "title": "Traffic",
            "range": name,
            "ranges": list(RANGES),
            "series": series,
            "top_apis": top_apis,
            "top_keys": top_keys,
            "top_consumers": top_owners,
            "top_since": since,
            "total": series["total"],
            "error_rate": round(100 * series["error_rate"], 2),
            "export_form": ExportForm(
                initial={
                    "since": (now - timedelta(days=1)).strftime("%Y-%m-%d %H:00"),
                    "until": now.strftime("%Y-%m-%d %H:00"),
                }
            ),
        }
        return TemplateResponse(request, "admin/analytics/dashboard.html", context)

    def export_view(self, request: HttpRequest) -> HttpResponse:
        form = ExportForm(request.GET)
        if not form.is_valid():
            context = {
                **self.admin_site.each_context(request),
                "title": "Export rollups",
                "export_form": form,
            }
            return TemplateResponse(request, "admin/analytics/export.html", context, status=400)
        d = form.cleaned_data
        since = d["since"].astimezone(UTC)
        until = d["until"].astimezone(UTC)
        rows = export_rows(
            granularity=d["granularity"], dimension=d["dimension"], since=since, until=until
        )
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        return csv_response(rows, filename=f"rollups-{d['dimension']}-{stamp}.csv")
