"""REST analytics queries: the same selectors the portal's and admin's charts read (rollups
only, never raw events). Owners may read their own keys' usage and quotas; everything else
is for administrators."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import exceptions, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from analytics.models import Rollup
from analytics.selectors import (
    RANGES,
    SERIES_RANGES,
    top,
    top_consumers,
    top_window,
    usage_series,
)
from portal.consumers import consumer_for_user
from portal.models import ApiKey, Subscription
from portal.rest_auth import OwnResource
from portal.selectors import quota_usage

# range -> (granularity, points) for series; the dashboards' ranges plus the last hour.
DIMENSIONS = {c.value for c in Rollup.Dimension}


class UsageQuery(serializers.Serializer):
    dimension = serializers.ChoiceField(choices=sorted(DIMENSIONS), default="key")
    id = serializers.IntegerField(
        required=False, min_value=1, help_text="One API, route, key or organization; none: all."
    )
    range = serializers.ChoiceField(choices=list(SERIES_RANGES), default="24h")


class TopQuery(serializers.Serializer):
    dimension = serializers.ChoiceField(choices=[*sorted(DIMENSIONS), "consumer"], default="api")
    range = serializers.ChoiceField(choices=list(RANGES), default="24h")
    limit = serializers.IntegerField(min_value=1, max_value=100, default=10)


class QuotaQuery(serializers.Serializer):
    subscription = serializers.IntegerField(min_value=1)


_SERIES = inline_serializer(
    "UsageSeries",
    {
        "labels": serializers.ListField(child=serializers.CharField()),
        "series": serializers.DictField(
            child=serializers.ListField(child=serializers.IntegerField())
        ),
        "total": serializers.IntegerField(),
        "gateway_errors": serializers.IntegerField(),
        "error_rate": serializers.FloatField(),
        "latency_ms": serializers.DictField(child=serializers.FloatField(allow_null=True)),
    },
)


class AnalyticsViewSet(viewsets.ViewSet):
    permission_classes = [OwnResource]

    def _staff(self) -> bool:
        return bool(self.request.user.is_staff)

    @extend_schema(parameters=[UsageQuery], responses={200: _SERIES})
    @action(detail=False, methods=["get"])
    def usage(self, request):
        """Requests per bucket by status class, totals, error rate and latency percentiles."""
        query = UsageQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        dimension = query.validated_data["dimension"]
        dim_id = query.validated_data.get("id")
        if not self._staff():
            # Owners: one of their own keys only (another's answers 404 like a missing one).
            if dimension != "key" or dim_id is None:
                raise exceptions.PermissionDenied("Ask for one of your keys: dimension=key&id=….")
            consumer = consumer_for_user(request.user)
            if not ApiKey.objects.filter(pk=dim_id, subscription__consumer=consumer).exists():
                raise exceptions.NotFound("No such key.")
        granularity, points = SERIES_RANGES[query.validated_data["range"]]
        data = usage_series(dimension, dim_id, granularity=granularity, points=points)
        return Response(data)

    @extend_schema(
        parameters=[TopQuery],
        responses={
            200: inline_serializer(
                "TopRow",
                {
                    "id": serializers.IntegerField(allow_null=True),
                    "count": serializers.IntegerField(),
                    "error_rate": serializers.FloatField(),
                    "latency_ms": serializers.DictField(
                        child=serializers.FloatField(allow_null=True)
                    ),
                },
                many=True,
            )
        },
    )
    @action(detail=False, methods=["get"])
    def top(self, request):
        """The APIs, routes, keys, organizations or consumers with the most requests."""
        if not self._staff():
            raise exceptions.PermissionDenied("This resource is for administrators.")
        query = TopQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        granularity, since = top_window(query.validated_data["range"])
        limit = query.validated_data["limit"]
        dimension = query.validated_data["dimension"]
        if dimension == "consumer":
            rows = top_consumers(granularity=granularity, since=since, limit=limit)
            return Response([{"id": r.pop("consumer_id"), **r} for r in rows])
        rows = top(dimension, granularity=granularity, since=since, limit=limit)
        return Response([{"id": r.pop("dim_id"), **r} for r in rows])

    @extend_schema(
        parameters=[QuotaQuery],
        responses={
            200: inline_serializer(
                "QuotaUsage",
                {
                    "limit": serializers.IntegerField(allow_null=True),
                    "used": serializers.IntegerField(),
                    "remaining": serializers.IntegerField(allow_null=True),
                    "period": serializers.CharField(allow_null=True),
                    "resets_at": serializers.DateTimeField(allow_null=True),
                },
            )
        },
    )
    @action(detail=False, methods=["get"])
    def quota(self, request):
        """A subscription's quota: limit, used and remaining in this period."""
        query = QuotaQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        subs = Subscription.objects.select_related("plan")
        if not self._staff():
            subs = subs.filter(consumer=consumer_for_user(request.user))
        sub = subs.filter(pk=query.validated_data["subscription"]).first()
        if sub is None:
            raise exceptions.NotFound("No such subscription.")
        usage = quota_usage(sub)
        if usage is None:
            return Response(
                {"limit": None, "used": 0, "remaining": None, "period": None, "resets_at": None}
            )
        return Response(
            {
                "limit": usage.limit,
                "used": usage.used,
                "remaining": usage.remaining,
                "period": usage.period,
                "resets_at": usage.resets_at,
            }
        )


def register(router) -> None:
    router.register("analytics", AnalyticsViewSet, basename="analytics")
