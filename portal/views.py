"""Portal pages. Views parse and render; writes go through the action modules."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST
from django_ratelimit.decorators import ratelimit

from analytics.exports import csv_response
from analytics.selectors import (
    SERIES_RANGES,
    STEP,
    bucket_start,
    export_rows,
    key_api_dim_ids,
    totals_by,
    totals_by_api,
    usage_series,
)
from gateway.models import Api
from portal import catalog_docs
from portal.consumers import consumer_for_user
from portal.forms import KeyCreateForm
from portal.keys import KeyActionError, key_issue, key_revoke, key_rotate
from portal.models import ApiKey, Plan, Subscription
from portal.selectors import consumer_keys, consumer_subscriptions, public_plans, quota_usage
from portal.subscriptions import SubscriptionError, subscription_cancel, subscription_create


def ratelimited(request: HttpRequest, exception: Exception) -> HttpResponse:
    """django-ratelimit's answer: 429 with a page that says when to retry."""
    response = render(request, "portal/ratelimited.html", {"retry_after": 60}, status=429)
    response["Retry-After"] = "60"
    return response


def home(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("portal:dashboard")
    return render(request, "portal/home.html", {"apis": _published_apis()})


def _published_apis():
    return Api.objects.filter(is_published=True).prefetch_related("plans")


def catalog(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "portal/catalog.html",
        {"apis": _published_apis(), "gateway_url": settings.GATEWAY_PUBLIC_URL},
    )


def _published_api(slug: str) -> Api:
    return get_object_or_404(
        Api.objects.prefetch_related("versions", "plans"), slug=slug, is_published=True
    )


def _version_state(version, now) -> str:
    if version.sunset_at and version.sunset_at <= now:
        return "sunset"
    if version.deprecated_at and version.deprecated_at <= now:
        return "deprecated"
    return "current"


def api_detail(request: HttpRequest, slug: str) -> HttpResponse:
    """One API: its description, base URLs, versions with their status, and its plans."""
    api = _published_api(slug)
    now = timezone.now()
    versions = sorted(api.versions.all(), key=lambda v: (not v.is_default, v.name))
    for v in versions:
        v.state = _version_state(v, now)
        v.base_url = catalog_docs.version_base_url(api, v)
        v.has_docs = bool((v.openapi or api.openapi).strip())
    return render(
        request,
        "portal/api_detail.html",
        {
            "api": api,
            "versions": versions,
            "base_url": catalog_docs.version_base_url(api, None),
            "plans": [p for p in api.plans.all() if p.is_public],
            "has_docs": bool(api.openapi.strip()),
        },
    )


def api_docs(request: HttpRequest, slug: str, version: str | None = None) -> HttpResponse:
    """The OpenAPI document of an API (or one of its versions) in Swagger UI, with "Try it"
    against the gateway when the API allows the portal's origin."""
    api = _published_api(slug)
    chosen = get_object_or_404(api.versions, name=version) if version else None
    if not catalog_docs.document_text(api, chosen).strip():
        raise Http404("This API has no OpenAPI document.")
    spec_url = (
        reverse("portal:api_version_openapi", args=[api.slug, chosen.name])
        if chosen
        else reverse("portal:api_openapi", args=[api.slug])
    )
    return render(
        request,
        "portal/api_docs.html",
        {
            "api": api,
            "version": chosen,
            "state": _version_state(chosen, timezone.now()) if chosen else "current",
            "spec_url": spec_url,
            "base_url": catalog_docs.version_base_url(api, chosen),
            "try_it": api.portal_try_it,
            "version_header": api.version_header if api.version_scheme == "header" else "",
            "version_query": api.version_query if api.version_scheme == "query" else "",
        },
    )


def api_openapi(request: HttpRequest, slug: str, version: str | None = None) -> JsonResponse:
    """The document as JSON, its `servers` set to the gateway URL of that version."""
    api = _published_api(slug)
    chosen = get_object_or_404(api.versions, name=version) if version else None
    try:
        doc = catalog_docs.document_for_portal(api, chosen)
    except catalog_docs.NoDocument:
        raise Http404("This API has no OpenAPI document.") from None
    return JsonResponse(doc, json_dumps_params={"ensure_ascii": False})


def plans(request: HttpRequest) -> HttpResponse:
    subscribed: dict[int, str] = {}
    if request.user.is_authenticated:
        consumer = consumer_for_user(request.user)
        subscribed = {s.plan_id: s.status for s in consumer_subscriptions(consumer)}
    offered = list(public_plans())
    for plan in offered:
        plan.subscription_status = subscribed.get(plan.pk, "")
    return render(request, "portal/plans.html", {"plans": offered})


@login_required
@require_POST
def subscribe(request: HttpRequest, slug: str) -> HttpResponse:
    plan = get_object_or_404(Plan, slug=slug, is_public=True)
    sub = subscription_create(consumer_for_user(request.user), plan=plan, actor=request.user)
    if sub.status == Subscription.Status.PENDING:
        messages.info(request, f"Your subscription to {plan.name} is waiting for approval.")
    else:
        messages.success(request, f"You are subscribed to {plan.name}. Create a key below.")
    return redirect("portal:dashboard")


@login_required
@require_POST
def unsubscribe(request: HttpRequest, pk: int) -> HttpResponse:
    """End one of the user's subscriptions (pending or active): its keys stop working."""
    consumer = consumer_for_user(request.user)
    sub = get_object_or_404(Subscription.objects.select_related("plan"), pk=pk, consumer=consumer)
    try:
        subscription_cancel(sub, actor=request.user)
    except SubscriptionError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(
            request, f"You are unsubscribed from {sub.plan.name}; its keys stop working now."
        )
    return redirect("portal:dashboard")


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    consumer = consumer_for_user(request.user)
    subs = list(consumer_subscriptions(consumer))
    active = Subscription.objects.filter(pk__in=[s.pk for s in subs if s.is_active()])
    form = KeyCreateForm(subscriptions=active.select_related("plan"))
    now = timezone.now()
    keys = list(consumer_keys(consumer))
    for k in keys:
        k.usable = k.is_usable(now)
    return render(
        request,
        "portal/dashboard.html",
        {
            "subscriptions": subs,
            "keys": keys,
            "form": form,
            "has_active": active.exists(),
            "gateway_url": settings.GATEWAY_PUBLIC_URL,
            "apis": _published_apis(),
        },
    )


@login_required
@require_POST
@never_cache
@ratelimit(key="user", rate="30/h", method="POST", block=True)
@ratelimit(key="ip", rate="60/h", method="POST", block=True)
def key_create(request: HttpRequest) -> HttpResponse:
    consumer = consumer_for_user(request.user)
    active = Subscription.objects.filter(consumer=consumer, status=Subscription.Status.ACTIVE)
    form = KeyCreateForm(request.POST, subscriptions=active.select_related("plan"))
    if not form.is_valid():
        messages.error(request, "The key was not created: " + _form_errors(form))
        return redirect("portal:dashboard")
    issued = key_issue(
        form.cleaned_data["subscription"],
        name=form.cleaned_data["name"],
        actor=request.user,
        expires_at=form.cleaned_data["expires_at"],
    )
    return _show_new_key(request, issued)


def _show_new_key(request: HttpRequest, issued, *, rotated: ApiKey | None = None) -> HttpResponse:
    """The one page that shows a key; its views are never_cache: no cache may keep it."""
    return render(
        request,
        "portal/key_created.html",
        {
            "issued": issued,
            "rotated": rotated,
            "gateway_url": settings.GATEWAY_PUBLIC_URL,
            "apis": issued.api_key.subscription.plan.apis.all(),
        },
    )


def _form_errors(form) -> str:
    return "; ".join(
        f"{form.fields[f].label or f}: {' '.join(errs)}" if f != "__all__" else " ".join(errs)
        for f, errs in form.errors.items()
    )


def _own_key(request: HttpRequest, pk: int) -> ApiKey:
    consumer = consumer_for_user(request.user)
    return get_object_or_404(
        ApiKey.objects.select_related("subscription__plan"), pk=pk, subscription__consumer=consumer
    )


@login_required
@require_POST
def key_revoke_view(request: HttpRequest, pk: int) -> HttpResponse:
    api_key = _own_key(request, pk)
    key_revoke(api_key, actor=request.user)
    messages.success(request, f"Key {api_key.prefix}… is revoked.")
    return redirect("portal:dashboard")


ROTATION_GRACE = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}


@login_required
@require_POST
@never_cache
@ratelimit(key="user", rate="30/h", method="POST", block=True)
def key_rotate_view(request: HttpRequest, pk: int) -> HttpResponse:
    api_key = _own_key(request, pk)
    grace = ROTATION_GRACE.get(request.POST.get("grace", "24h"))
    if grace is None:
        messages.error(request, "Choose how long the old key keeps working: 1h, 24h or 7d.")
        return redirect("portal:dashboard")
    try:
        issued = key_rotate(api_key, actor=request.user, grace=grace)
    except KeyActionError as exc:
        messages.error(request, str(exc))
        return redirect("portal:dashboard")
    api_key.refresh_from_db()
    return _show_new_key(request, issued, rotated=api_key)


RANGE_LABELS = {
    "60m": "requests per minute, last hour",
    "24h": "requests per hour, last 24 hours",
    "7d": "requests per hour, last 7 days",
    "30d": "requests per day, last 30 days",
}


def _range(request: HttpRequest) -> str:
    chosen = request.GET.get("range", "")
    return chosen if chosen in SERIES_RANGES else ""


def _series(
    request: HttpRequest, default: str, *, dimension: str = "key", **selector
) -> tuple[str, dict]:
    name = _range(request) or default
    granularity, points = SERIES_RANGES[name]
    return name, usage_series(dimension, None, granularity=granularity, points=points, **selector)


def _csv_window(name: str) -> tuple[str, datetime, datetime]:
    """What a range's CSV holds: minute rows for the last hour, hour rows otherwise."""
    until = timezone.now()
    granularity, points = SERIES_RANGES[name]
    since = until - STEP[granularity] * points
    return ("m" if granularity == "m" else "h"), since, until


@login_required
def key_usage(request: HttpRequest, pk: int) -> HttpResponse:
    api_key = _own_key(request, pk)
    name, usage = _series(request, "60m", dim_ids=[api_key.pk])
    granularity, since = _api_since(name)
    apis = list(api_key.subscription.plan.apis.order_by("name"))
    per_api = totals_by_api(
        [api_key.pk], [a.pk for a in apis], granularity=granularity, since=since
    )
    for a in apis:
        a.requests = per_api.get(a.pk, 0)
    return render(
        request,
        "portal/key_usage.html",
        {
            "key": api_key,
            "usage": usage,
            "apis": apis,
            "range": name,
            "range_label": RANGE_LABELS[name],
            "ranges": RANGE_LABELS,
            "quota": quota_usage(api_key.subscription),
        },
    )


@login_required
def key_usage_data(request: HttpRequest, pk: int) -> JsonResponse:
    api_key = _own_key(request, pk)
    quota = quota_usage(api_key.subscription)
    _, data = _series(request, "60m", dim_ids=[api_key.pk])
    data["quota"] = (
        {"limit": quota.limit, "used": quota.used, "remaining": quota.remaining} if quota else None
    )
    return JsonResponse(data)


@login_required
@ratelimit(key="user", rate="60/h", block=True)
@ratelimit(key="ip", rate="120/h", block=True)
def key_usage_csv(request: HttpRequest, pk: int) -> HttpResponse:
    """One of the user's keys over a range (default: hourly, 30 days), as a streamed CSV."""
    api_key = _own_key(request, pk)
    granularity, since, until = _csv_window(_range(request) or "30d")
    rows = export_rows(
        granularity=granularity, dimension="key", dim_id=api_key.pk, since=since, until=until
    )
    return csv_response(rows, filename=f"usage-{api_key.prefix}.csv")


def _own_key_ids(request: HttpRequest) -> list[int]:
    consumer = consumer_for_user(request.user)
    return list(ApiKey.objects.filter(subscription__consumer=consumer).values_list("pk", flat=True))


def _consumer_apis(consumer) -> list[Api]:
    return list(
        Api.objects.filter(plans__subscriptions__consumer=consumer).distinct().order_by("name")
    )


def _chosen_api(request: HttpRequest, apis: list[Api]) -> Api | None:
    slug = request.GET.get("api", "")
    chosen = next((a for a in apis if a.slug == slug), None)
    if slug and chosen is None:
        raise Http404("Not one of your APIs.")
    return chosen


def _api_series(request: HttpRequest, api, key_ids: list[int]) -> dict:
    granularity, points = SERIES_RANGES[_api_range(request, api)]
    selector = _usage_selector(key_ids, api)
    return usage_series(
        selector.pop("dimension"), None, granularity=granularity, points=points, **selector
    )


def _usage_selector(key_ids: list[int], api: Api | None) -> dict:
    """All calls of these keys, or (key × API rollups) only their calls to `api`."""
    if api is None:
        return {"dimension": "key", "dim_ids": key_ids}
    return {"dimension": "kapi", "dim_ids": key_api_dim_ids(key_ids, [api.pk])}


def _since(name: str):
    granularity, points = SERIES_RANGES[name]
    return granularity, bucket_start(timezone.now(), granularity) - STEP[granularity] * (points - 1)


def _api_since(name: str):
    """Key x API rollups have hour and day rows only: the last hour reads two hour rows."""
    if name == "60m":
        return "h", bucket_start(timezone.now(), "h") - timedelta(hours=1)
    return _since(name)


def _api_range(request: HttpRequest, api) -> str:
    """The range of a per-API chart: 60 minutes needs minute rows, which key x API lacks."""
    name = _range(request) or "24h"
    return "24h" if api is not None and name == "60m" else name


@login_required
def usage(request: HttpRequest) -> HttpResponse:
    """All of the user's keys together (or their calls to one API) over a range, each key's
    and each API's share, and every quota."""
    consumer = consumer_for_user(request.user)
    keys = list(consumer_keys(consumer))
    key_ids = [k.pk for k in keys]
    apis = _consumer_apis(consumer)
    api = _chosen_api(request, apis)
    name = _api_range(request, api)
    data = _api_series(request, api, key_ids)
    granularity, since = _since(name)
    per_key = totals_by("key", key_ids, granularity=granularity, since=since)
    for k in keys:
        k.requests = per_key.get(k.pk, 0)
    granularity, since = _api_since(name)
    per_api = totals_by_api(key_ids, [a.pk for a in apis], granularity=granularity, since=since)
    for a in apis:
        a.requests = per_api.get(a.pk, 0)
    quotas = []
    for sub in consumer_subscriptions(consumer):
        if sub.is_active():
            q = quota_usage(sub)
            if q is not None:
                quotas.append((sub, q))
    return render(
        request,
        "portal/usage.html",
        {
            "usage": data,
            "range": name,
            "range_label": RANGE_LABELS[name],
            "ranges": RANGE_LABELS,
            "keys": sorted(keys, key=lambda k: -k.requests),
            "api": api,
            "apis": apis,
            "quotas": quotas,
            "query": f"range={name}" + (f"&api={api.slug}" if api else ""),
        },
    )


@login_required
def usage_data(request: HttpRequest) -> JsonResponse:
    consumer = consumer_for_user(request.user)
    api = _chosen_api(request, _consumer_apis(consumer))
    data = _api_series(request, api, _own_key_ids(request))
    data["quota"] = None
    return JsonResponse(data)


@login_required
@ratelimit(key="user", rate="60/h", block=True)
@ratelimit(key="ip", rate="120/h", block=True)
def usage_csv(request: HttpRequest) -> HttpResponse:
    """Every key of the user over a range (default: hourly, 30 days), as a streamed CSV."""
    consumer = consumer_for_user(request.user)
    api = _chosen_api(request, _consumer_apis(consumer))
    granularity, since, until = _csv_window(_range(request) or "30d")
    if api is not None and granularity == "m":  # key x API has hour rows, not minute rows
        granularity = "h"
    rows = export_rows(
        granularity=granularity,
        since=since,
        until=until,
        **_usage_selector(_own_key_ids(request), api),
    )
    return csv_response(rows, filename=f"usage-{api.slug if api else 'all'}.csv")
