"""REST resources of the portal app: plans and their rate limits, organizations, members
and consumers (administrators'), subscriptions and API keys (their owners' too)."""

from __future__ import annotations

from datetime import timedelta

from django.db import transaction
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from gateway.config import config_bump
from gateway.restkit import (
    FILTERS,
    ConfigViewSet,
    Conflict,
    EtagMixin,
    EtagUpdateMixin,
    ModelCleanSerializer,
    representation_etag,
)
from portal.consumers import consumer_for_user
from portal.keys import KeyActionError, key_issue, key_revoke, key_rotate
from portal.models import (
    ApiKey,
    Consumer,
    Membership,
    Organization,
    Plan,
    RateLimit,
    Subscription,
)
from portal.rest_auth import AdminResource, OwnResource, StaffOnlyAction
from portal.subscriptions import (
    SubscriptionError,
    subscription_approve,
    subscription_cancel,
    subscription_create,
    subscription_reject,
)

MAX_ROTATION_GRACE = timedelta(days=30)


# --- administrators' resources --------------------------------------------------------------


class RateLimitSerializer(ModelCleanSerializer):
    class Meta:
        model = RateLimit
        fields = "__all__"
        validators: list = []  # clean() sees the null-plan/route duplicates the constraint misses


class PlanSerializer(ModelCleanSerializer):
    rate_limits = serializers.SerializerMethodField()

    class Meta:
        model = Plan
        fields = "__all__"
        read_only_fields = ["created_at"]

    def get_rate_limits(self, plan: Plan) -> list[str]:
        return [str(r) for r in plan.rate_limits.all()]


class OrganizationSerializer(ModelCleanSerializer):
    class Meta:
        model = Organization
        fields = "__all__"


class MembershipSerializer(ModelCleanSerializer):
    class Meta:
        model = Membership
        fields = "__all__"


class ConsumerSerializer(ModelCleanSerializer):
    display_name = serializers.CharField(read_only=True)

    class Meta:
        model = Consumer
        fields = "__all__"
        validators: list = []  # user XOR organization: the model's check constraint


class _Admin(ConfigViewSet):
    permission_classes = [AdminResource]
    filter_backends = FILTERS


class PlanViewSet(_Admin):
    queryset = Plan.objects.prefetch_related("apis", "rate_limits")
    serializer_class = PlanSerializer
    filterset_fields = ["is_public", "requires_approval", "slug", "apis"]
    search_fields = ["name", "slug", "description"]
    ordering_fields = ["id", "name", "slug", "created_at"]


class RateLimitViewSet(_Admin):
    queryset = RateLimit.objects.all()
    serializer_class = RateLimitSerializer
    filterset_fields = ["plan", "route", "scope", "window"]
    ordering_fields = ["id", "limit"]


class OrganizationViewSet(_Admin):
    queryset = Organization.objects.all()
    serializer_class = OrganizationSerializer
    filterset_fields = ["slug"]
    search_fields = ["name", "slug"]
    ordering_fields = ["id", "name", "created_at"]


class MembershipViewSet(_Admin):
    queryset = Membership.objects.all()
    serializer_class = MembershipSerializer
    filterset_fields = ["organization", "user", "role"]
    ordering_fields = ["id", "joined_at"]


class ConsumerViewSet(_Admin):
    queryset = Consumer.objects.select_related("user", "organization")
    serializer_class = ConsumerSerializer
    filterset_fields = ["user", "organization", "external_id"]
    search_fields = ["user__email", "organization__name", "external_id"]
    ordering_fields = ["id", "created_at"]


# --- owners' resources ------------------------------------------------------------------------


def _own_consumers(request):
    """None for staff (everything), else the consumer ids the user may act for."""
    if request.user.is_staff:
        return None
    return [consumer_for_user(request.user).pk]


class SubscriptionSerializer(serializers.ModelSerializer):
    plan = serializers.SlugRelatedField(slug_field="slug", queryset=Plan.objects.all())

    class Meta:
        model = Subscription
        fields = ["id", "consumer", "plan", "status", "created_at", "decided_at"]
        read_only_fields = ["status", "created_at", "decided_at"]
        extra_kwargs = {"consumer": {"required": False}}
        validators: list = []  # one open subscription per plan: subscription_create decides


class SubscriptionViewSet(
    EtagMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    viewsets.GenericViewSet,
):
    """Subscriptions to plans. Creating one is active at once, or pending when the plan
    needs approval (administrators approve or reject it); owners may cancel theirs."""

    serializer_class = SubscriptionSerializer
    permission_classes = [OwnResource]
    filter_backends = FILTERS
    filterset_fields = ["status", "plan", "consumer"]
    ordering_fields = ["id", "created_at", "decided_at"]
    ordering = ["id"]

    queryset = Subscription.objects.none()  # for the schema; get_queryset() is the truth

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Subscription.objects.none()
        qs = Subscription.objects.select_related("plan", "consumer")
        own = _own_consumers(self.request)
        return qs if own is None else qs.filter(consumer_id__in=own)

    def create(self, request, *args, **kwargs):
        given = self.get_serializer(data=request.data)
        given.is_valid(raise_exception=True)
        plan: Plan = given.validated_data["plan"]
        consumer = given.validated_data.get("consumer")
        own = _own_consumers(request)
        if consumer is None:
            if own is None:
                raise exceptions.ValidationError({"consumer": ["Name the consumer."]})
            consumer = Consumer.objects.get(pk=own[0])
        elif own is not None and consumer.pk not in own:
            raise exceptions.ValidationError({"consumer": ["Not a consumer you act for."]})
        if own is not None and not plan.is_public:
            raise exceptions.ValidationError({"plan": ["No such plan."]})
        sub = subscription_create(consumer, plan=plan, actor=request.user)
        data = self.represent(sub)
        return Response(
            data, status=status.HTTP_201_CREATED, headers={"ETag": representation_etag(data)}
        )

    def _decide(self, request, fn):
        sub = self.get_object()
        self._check_if_match(request, sub)
        try:
            sub = fn(sub, actor=request.user)
        except SubscriptionError as exc:
            raise Conflict(str(exc)) from None
        data = self.represent(sub)
        return Response(data, headers={"ETag": representation_etag(data)})

    @extend_schema(request=None)
    @action(detail=True, methods=["post"], permission_classes=[OwnResource, StaffOnlyAction])
    def approve(self, request, pk=None):
        return self._decide(request, subscription_approve)

    @extend_schema(request=None)
    @action(detail=True, methods=["post"], permission_classes=[OwnResource, StaffOnlyAction])
    def reject(self, request, pk=None):
        return self._decide(request, subscription_reject)

    @extend_schema(request=None)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        return self._decide(request, subscription_cancel)


class ApiKeySerializer(serializers.ModelSerializer):
    prefix = serializers.CharField(read_only=True)
    plan = serializers.SlugRelatedField(
        source="subscription.plan", slug_field="slug", read_only=True
    )
    consumer = serializers.IntegerField(source="subscription.consumer_id", read_only=True)

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "prefix",
            "subscription",
            "plan",
            "consumer",
            "scopes",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
        ]
        read_only_fields = ["created_at", "revoked_at", "last_used_at", "scopes"]


class ApiKeyUpdateSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiKey
        fields = ["name", "scopes"]


class IssuedKeySerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="The key: shown this once only.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]


class KeyCreateSerializer(serializers.Serializer):
    subscription = serializers.PrimaryKeyRelatedField(queryset=Subscription.objects.all())
    name = serializers.CharField(max_length=100)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)

    def validate_expires_at(self, value):
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("The expiry is in the past.")
        return value


class RotateSerializer(serializers.Serializer):
    grace_seconds = serializers.IntegerField(
        min_value=0,
        max_value=int(MAX_ROTATION_GRACE.total_seconds()),
        default=24 * 3600,
        help_text="How long the old key keeps working.",
    )


def _issued(issued) -> dict:
    data = IssuedKeySerializer(issued.api_key).data
    data["key"] = issued.key
    return data


_NO_STORE = {"Cache-Control": "no-store"}


class ApiKeyViewSet(
    EtagUpdateMixin,
    EtagMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    """API keys. Created (and rotated) keys are in the answer once, never again; lists show
    the prefix. Owners see and act on their own keys only; scopes are set by administrators."""

    permission_classes = [OwnResource]
    filter_backends = FILTERS
    filterset_fields = ["subscription", "subscription__plan"]
    search_fields = ["name", "key_id"]
    ordering_fields = ["id", "created_at", "expires_at", "last_used_at"]
    ordering = ["-id"]
    throttle_scope = "keys"

    def get_throttles(self):
        if self.action in ("create", "rotate"):
            return super().get_throttles()
        return []

    queryset = ApiKey.objects.none()  # for the schema; get_queryset() is the truth

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return ApiKey.objects.none()
        qs = ApiKey.objects.select_related("subscription__plan")
        own = _own_consumers(self.request)
        return qs if own is None else qs.filter(subscription__consumer_id__in=own)

    def get_serializer_class(self):
        if self.action in ("update", "partial_update"):
            return ApiKeyUpdateSerializer
        return ApiKeySerializer

    @extend_schema(request=KeyCreateSerializer, responses={201: IssuedKeySerializer})
    def create(self, request):
        given = KeyCreateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        sub: Subscription = given.validated_data["subscription"]
        own = _own_consumers(request)
        if own is not None and sub.consumer_id not in own:
            raise exceptions.ValidationError({"subscription": ["No such subscription."]})
        if not sub.is_active():
            raise exceptions.ValidationError(
                {"subscription": [f"The subscription is {sub.get_status_display().lower()}."]}
            )
        issued = key_issue(
            sub,
            name=given.validated_data["name"],
            actor=request.user,
            expires_at=given.validated_data.get("expires_at"),
        )
        return Response(_issued(issued), status=status.HTTP_201_CREATED, headers=_NO_STORE)

    def perform_update(self, serializer) -> None:
        if "scopes" in serializer.validated_data and not self.request.user.is_staff:
            raise exceptions.PermissionDenied("Only administrators set a key's scopes.")
        with transaction.atomic():
            api_key = serializer.save()
            config_bump(
                actor=self.request.user,
                reason=f"key {api_key.prefix} changed",
                key_ids=[api_key.key_id],
            )

    def represent(self, instance) -> dict:
        return ApiKeySerializer(instance, context=self.get_serializer_context()).data

    @extend_schema(request=RotateSerializer, responses={201: IssuedKeySerializer})
    @action(detail=True, methods=["post"])
    def rotate(self, request, pk=None):
        api_key = self.get_object()
        self._check_if_match(request, api_key)
        given = RotateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        grace = timedelta(seconds=given.validated_data["grace_seconds"])
        try:
            issued = key_rotate(api_key, actor=request.user, grace=grace)
        except KeyActionError as exc:
            raise Conflict(str(exc)) from None
        return Response(_issued(issued), status=status.HTTP_201_CREATED, headers=_NO_STORE)

    @extend_schema(request=None, responses={200: ApiKeySerializer})
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        api_key = self.get_object()
        self._check_if_match(request, api_key)
        api_key = key_revoke(api_key, actor=request.user)
        data = self.represent(api_key)
        return Response(data, headers={"ETag": representation_etag(data)})


def register(router) -> None:
    router.register("plans", PlanViewSet)
    router.register("rate-limits", RateLimitViewSet)
    router.register("organizations", OrganizationViewSet)
    router.register("memberships", MembershipViewSet)
    router.register("consumers", ConsumerViewSet)
    router.register("subscriptions", SubscriptionViewSet, basename="subscription")
    router.register("keys", ApiKeyViewSet, basename="key")
