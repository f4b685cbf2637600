"""Reads that several portal places need."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from portal.models import ApiKey, Consumer, Plan, QuotaCounter, Subscription, quota_period_bounds


def consumer_keys(consumer: Consumer) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(subscription__consumer=consumer).select_related(
        "subscription__plan"
    )


def consumer_subscriptions(consumer: Consumer) -> QuerySet[Subscription]:
    return (
        Subscription.objects.filter(consumer=consumer)
        .exclude(status=Subscription.Status.CANCELLED)
        .select_related("plan")
        .order_by("plan__name")
    )


def public_plans() -> QuerySet[Plan]:
    return Plan.objects.filter(is_public=True).prefetch_related("apis", "rate_limits")


@dataclass(frozen=True)
class QuotaUsage:
    limit: int
    used: int
    period: str
    resets_at: datetime

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def percent(self) -> int:
        return min(100, round(100 * self.used / self.limit)) if self.limit else 0


def quota_usage(subscription: Subscription, *, now: datetime | None = None) -> QuotaUsage | None:
    """Quota used in the current period: from Redis when shared, else the persisted counter."""
    plan = subscription.plan
    if not plan.quota_limit:
        return None
    now = now or timezone.now()
    start, end = quota_period_bounds(plan.quota_period, now)
    used = 0
    if settings.REDIS_URL:
        import redis

        from gateway.dataplane.limiter import quota_counter_name
        from gateway.dataplane.snapshot import consumer_tag

        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=0.5)
        try:
            name = quota_counter_name(
                consumer_tag(subscription.consumer_id),
                f"sub:{subscription.pk}",
                start.timestamp(),
            )
            used = int(client.get(name) or 0)
        except redis.RedisError:
            used = 0
        finally:
            client.close()
    else:
        row = QuotaCounter.objects.filter(subscription=subscription, period_start=start).first()
        used = row.used if row else 0
    return QuotaUsage(limit=plan.quota_limit, used=used, period=plan.quota_period, resets_at=end)
