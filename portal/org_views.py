"""Portal pages of partner organizations. Every page checks membership (404 for anybody
else, so that URL guessing learns nothing); owners-only actions say so."""

from __future__ import annotations

import functools

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST
from django_ratelimit.decorators import ratelimit

from analytics.selectors import SERIES_RANGES, STEP, bucket_start, totals_by, usage_series
from portal.forms import KeyCreateForm
from portal.keys import key_issue, key_revoke
from portal.models import ApiKey, Invitation, Membership, Organization, Plan, Subscription
from portal.orgs import (
    OrgActionError,
    invitation_accept,
    invitation_for,
    member_remove,
    membership,
    org_consumer,
    org_create,
    org_invite,
)
from portal.selectors import quota_usage
from portal.subscriptions import SubscriptionError, subscription_cancel, subscription_create
from portal.views import RANGE_LABELS, _range, _show_new_key


def _member_org(request: HttpRequest, slug: str) -> tuple[Organization, Membership]:
    org = get_object_or_404(Organization, slug=slug)
    mine = membership(request.user, org)
    if mine is None:
        raise Http404("No such organization.")
    return org, mine


def _owners_only(view):
    """An action for owners: the view gets the organization instead of its slug. Other
    members go back to its page with a message; non-members get 404 (`_member_org`)."""

    @functools.wraps(view)
    def wrapped(request: HttpRequest, slug: str, *args, **kwargs) -> HttpResponse:
        org, mine = _member_org(request, slug)
        if mine.role != Membership.Role.OWNER:
            messages.error(request, "Only owners of the organization can do that.")
            return redirect("portal:org", slug=slug)
        return view(request, org, *args, **kwargs)

    return wrapped


@login_required
def orgs(request: HttpRequest) -> HttpResponse:
    """The user's organizations, and a form to create one."""
    if request.method == "POST":
        try:
            org = org_create(request.user, name=request.POST.get("name", ""))
        except OrgActionError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, f"{org.name} is created; you are its owner.")
            return redirect("portal:org", slug=org.slug)
    mine = Membership.objects.filter(user=request.user).select_related("organization")
    return render(request, "portal/orgs.html", {"memberships": mine})


def _org_keys(org: Organization) -> list[ApiKey]:
    return list(
        ApiKey.objects.filter(subscription__consumer__organization=org)
        .select_related("subscription__plan", "created_by")
        .order_by("-created_at")
    )


@login_required
def org(request: HttpRequest, slug: str) -> HttpResponse:
    org, mine = _member_org(request, slug)
    consumer = org_consumer(org)
    owner = mine.role == Membership.Role.OWNER
    subs = list(
        Subscription.objects.filter(consumer=consumer)
        .exclude(status=Subscription.Status.CANCELLED)
        .select_related("plan")
    )
    active = Subscription.objects.filter(consumer=consumer, status=Subscription.Status.ACTIVE)
    keys = _org_keys(org)
    now = timezone.now()
    name = _range(request) or "24h"
    granularity, points = SERIES_RANGES[name]
    key_ids = [k.pk for k in keys]
    usage = usage_series(
        "key", None, granularity=granularity, points=points, dim_ids=key_ids, now=now
    )
    since = bucket_start(now, granularity) - STEP[granularity] * (points - 1)
    per_key = totals_by("key", key_ids, granularity=granularity, since=since)
    by_member: dict[str, int] = {}
    for k in keys:
        k.usable = k.is_usable(now)
        k.requests = per_key.get(k.pk, 0)
        who = k.created_by.email if k.created_by else "(former member)"
        by_member[who] = by_member.get(who, 0) + k.requests
    quotas = [(s, quota_usage(s)) for s in subs if s.is_active()]
    return render(
        request,
        "portal/org.html",
        {
            "org": org,
            "owner": owner,
            "members": org.memberships.select_related("user").order_by("role", "user__email"),
            "invitations": [i for i in org.invitations.all() if i.is_open(now)] if owner else [],
            "subscriptions": subs,
            "plans": Plan.objects.filter(is_public=True).order_by("name") if owner else [],
            "keys": sorted(keys, key=lambda k: -k.requests),
            "by_member": sorted(by_member.items(), key=lambda kv: -kv[1]),
            "member_chart": _chart(sorted(by_member.items(), key=lambda kv: -kv[1])),
            "key_chart": _chart(
                sorted(
                    ((f"{k.name} ({k.prefix}…)", k.requests) for k in keys), key=lambda kv: -kv[1]
                )
            ),
            "form": KeyCreateForm(subscriptions=active.select_related("plan")),
            "has_active": active.exists(),
            "usage": usage,
            "range": name,
            "range_label": RANGE_LABELS[name],
            "ranges": RANGE_LABELS,
            "quotas": [(s, q) for s, q in quotas if q is not None],
            "roles": Membership.Role.choices,
        },
    )


def _chart(pairs) -> dict:
    return {"labels": [p[0] for p in pairs], "values": [p[1] for p in pairs]}


@login_required
def org_usage_data(request: HttpRequest, slug: str) -> JsonResponse:
    org, _ = _member_org(request, slug)
    granularity, points = SERIES_RANGES[_range(request) or "24h"]
    key_ids = [k.pk for k in _org_keys(org)]
    data = usage_series("key", None, granularity=granularity, points=points, dim_ids=key_ids)
    data["quota"] = None
    return JsonResponse(data)


@login_required
@require_POST
@ratelimit(key="user", rate="20/h", method="POST", block=True)
@ratelimit(key="ip", rate="60/h", method="POST", block=True)
@_owners_only
def org_invite_view(request: HttpRequest, org: Organization) -> HttpResponse:
    email = request.POST.get("email", "").strip()
    try:
        validate_email(email)
        org_invite(org, email=email, role=request.POST.get("role", "member"), actor=request.user)
    except ValidationError:
        messages.error(request, "Enter a valid email address.")
    except OrgActionError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"An invitation is on its way to {email.lower()}.")
    return redirect("portal:org", slug=org.slug)


@login_required
@require_POST
def org_member_remove(request: HttpRequest, slug: str, pk: int) -> HttpResponse:
    org, _ = _member_org(request, slug)
    member = get_object_or_404(Membership, pk=pk, organization=org)
    try:
        member_remove(org, member, actor=request.user)
    except OrgActionError as exc:
        messages.error(request, str(exc))
        return redirect("portal:org", slug=slug)
    if member.user_id == request.user.pk:
        messages.success(request, f"You left {org.name}.")
        return redirect("portal:orgs")
    messages.success(request, f"{member.user.email} is no longer a member.")
    return redirect("portal:org", slug=slug)


@login_required
@require_POST
@_owners_only
def org_subscribe(request: HttpRequest, org: Organization) -> HttpResponse:
    plan = get_object_or_404(Plan, slug=request.POST.get("plan", ""), is_public=True)
    sub = subscription_create(org_consumer(org), plan=plan, actor=request.user)
    if sub.status == Subscription.Status.PENDING:
        messages.info(request, f"{org.name}'s subscription to {plan.name} waits for approval.")
    else:
        messages.success(request, f"{org.name} is subscribed to {plan.name}.")
    return redirect("portal:org", slug=org.slug)


@login_required
@require_POST
@_owners_only
def org_unsubscribe(request: HttpRequest, org: Organization, pk: int) -> HttpResponse:
    sub = get_object_or_404(Subscription, pk=pk, consumer__organization=org)
    try:
        subscription_cancel(sub, actor=request.user)
    except SubscriptionError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{org.name} is unsubscribed from {sub.plan.name}.")
    return redirect("portal:org", slug=org.slug)


@login_required
@require_POST
@never_cache
@ratelimit(key="user", rate="30/h", method="POST", block=True)
@ratelimit(key="ip", rate="60/h", method="POST", block=True)
def org_key_create(request: HttpRequest, slug: str) -> HttpResponse:
    org, _ = _member_org(request, slug)
    active = Subscription.objects.filter(
        consumer__organization=org, status=Subscription.Status.ACTIVE
    )
    form = KeyCreateForm(request.POST, subscriptions=active.select_related("plan"))
    if not form.is_valid():
        messages.error(request, "The key was not created; check the name and plan.")
        return redirect("portal:org", slug=slug)
    issued = key_issue(
        form.cleaned_data["subscription"],
        name=form.cleaned_data["name"],
        actor=request.user,
        expires_at=form.cleaned_data["expires_at"],
    )
    return _show_new_key(request, issued)


@login_required
@require_POST
def org_key_revoke(request: HttpRequest, slug: str, pk: int) -> HttpResponse:
    org, mine = _member_org(request, slug)
    api_key = get_object_or_404(ApiKey, pk=pk, subscription__consumer__organization=org)
    if mine.role != Membership.Role.OWNER and api_key.created_by_id != request.user.pk:
        messages.error(request, "Only owners, or whoever made the key, can revoke it.")
        return redirect("portal:org", slug=slug)
    key_revoke(api_key, actor=request.user)
    messages.success(request, f"Key {api_key.prefix}… is revoked.")
    return redirect("portal:org", slug=slug)


@login_required
def org_join(request: HttpRequest, token: str) -> HttpResponse:
    """An invitation link: shows what it is for; POST accepts it."""
    invitation: Invitation | None = invitation_for(token)
    if request.method == "POST":
        try:
            member = invitation_accept(token, request.user)
        except OrgActionError as exc:
            messages.error(request, str(exc))
        else:
            org = member.organization
            messages.success(request, f"You are a member of {org.name}.")
            return redirect("portal:org", slug=org.slug)
    return render(request, "portal/org_join.html", {"invitation": invitation}, status=200)
