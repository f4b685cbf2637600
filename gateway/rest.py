"""REST resources of the gateway app: upstreams, targets, APIs and their versions and
OpenAPI documents, routes, policies, JWT issuers, cache purges, config versions."""

from __future__ import annotations

from django.db import transaction
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, parsers, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from gateway import declarative
from gateway.actions import cache_purge
from gateway.config import config_bump
from gateway.models import (
    Api,
    ApiVersion,
    CachePurge,
    ConfigVersion,
    JwtIssuer,
    Policy,
    Route,
    Target,
    Upstream,
    validate_openapi,
)
from gateway.restkit import (
    FILTERS,
    ConfigViewSet,
    Conflict,
    EtagMixin,
    ModelCleanSerializer,
    problem_response,
)
from portal.rest_auth import AdminResource

OPENAPI_MAX_BYTES = 4 << 20


class UpstreamSerializer(ModelCleanSerializer):
    class Meta:
        model = Upstream
        fields = "__all__"


class TargetSerializer(ModelCleanSerializer):
    class Meta:
        model = Target
        fields = "__all__"


class ApiSerializer(ModelCleanSerializer):
    has_openapi = serializers.SerializerMethodField()

    class Meta:
        model = Api
        exclude = ["openapi"]
        read_only_fields = ["cache_generation", "created_at"]

    def get_has_openapi(self, obj: Api) -> bool:
        return bool(obj.openapi.strip())


class ApiVersionSerializer(ModelCleanSerializer):
    has_openapi = serializers.SerializerMethodField()

    class Meta:
        model = ApiVersion
        exclude = ["openapi"]

    def get_has_openapi(self, obj: ApiVersion) -> bool:
        return bool(obj.openapi.strip())


class RouteSerializer(ModelCleanSerializer):
    class Meta:
        model = Route
        fields = "__all__"
        read_only_fields = ["cache_generation"]


class PolicySerializer(ModelCleanSerializer):
    config = serializers.JSONField(required=False)

    class Meta:
        model = Policy
        fields = "__all__"
        validators: list = []  # the model's clean() and constraints decide (api XOR route)


class JwtIssuerSerializer(ModelCleanSerializer):
    static_jwks = serializers.JSONField(required=False, allow_null=True)

    class Meta:
        model = JwtIssuer
        fields = "__all__"


class _AdminConfigViewSet(ConfigViewSet):
    permission_classes = [AdminResource]
    filter_backends = FILTERS


class UpstreamViewSet(_AdminConfigViewSet):
    queryset = Upstream.objects.all()
    serializer_class = UpstreamSerializer
    filterset_fields = ["algorithm", "scheme"]
    search_fields = ["name", "description"]
    ordering_fields = ["id", "name"]


class TargetViewSet(_AdminConfigViewSet):
    queryset = Target.objects.all()
    serializer_class = TargetSerializer
    filterset_fields = ["upstream", "enabled", "host"]
    ordering_fields = ["id", "host", "port", "weight"]


class _DocumentParser(parsers.BaseParser):
    """An OpenAPI document as sent: JSON or YAML text, kept byte for byte."""

    media_type = "*/*"

    def parse(self, stream, media_type=None, parser_context=None) -> str:
        body = stream.read(OPENAPI_MAX_BYTES + 1) if stream is not None else b""
        if len(body) > OPENAPI_MAX_BYTES:
            raise ValidationError({"openapi": ["The document is larger than 4 MiB."]})
        try:
            return body.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ValidationError({"openapi": ["The document is not UTF-8 text."]}) from None


class _OpenApiDocumentMixin:
    """GET / PUT / DELETE `…/{id}/openapi/`: the object's OpenAPI document as text."""

    @extend_schema(
        methods=["GET"],
        responses={
            (200, "application/yaml"): OpenApiTypes.OBJECT,
            (200, "application/json"): OpenApiTypes.OBJECT,
            404: OpenApiResponse(description="No document"),
        },
    )
    @extend_schema(
        methods=["PUT"],
        request={"application/yaml": OpenApiTypes.STR, "application/json": OpenApiTypes.OBJECT},
        responses={204: None},
    )
    @extend_schema(methods=["DELETE"], responses={204: None})
    @action(
        detail=True,
        methods=["get", "put", "delete"],
        parser_classes=[_DocumentParser],
        url_path="openapi",
    )
    def openapi(self, request, pk=None):
        obj = self.get_object()
        if request.method == "GET":
            text = obj.openapi
            if not text.strip():
                return problem_response(404, "not-found", "Not found", "No OpenAPI document.")
            kind = "application/json" if text.lstrip().startswith("{") else "application/yaml"
            return HttpResponse(text, content_type=f"{kind}; charset=utf-8")
        text = "" if request.method == "DELETE" else request.data
        if request.method == "PUT":
            if not isinstance(text, str) or not text.strip():
                raise ValidationError({"openapi": ["Send the document as the request body."]})
            from django.core.exceptions import ValidationError as DjangoValidationError

            try:
                validate_openapi(text)
            except DjangoValidationError as exc:
                raise ValidationError({"openapi": exc.messages}) from None
        with transaction.atomic():
            type(obj).objects.filter(pk=obj.pk).update(openapi=text)
            verb = "removed" if request.method == "DELETE" else "replaced"
            config_bump(
                actor=request.user,
                reason=f"OpenAPI document of {obj._meta.verbose_name} {obj} {verb}",
            )
        return Response(status=status.HTTP_204_NO_CONTENT)


class ApiViewSet(_OpenApiDocumentMixin, _AdminConfigViewSet):
    queryset = Api.objects.select_related("upstream")
    serializer_class = ApiSerializer
    filterset_fields = ["is_published", "upstream", "version_scheme", "auth_methods", "slug"]
    search_fields = ["name", "slug", "path_prefix", "description"]
    ordering_fields = ["id", "name", "slug", "path_prefix", "created_at"]


class ApiVersionViewSet(_OpenApiDocumentMixin, _AdminConfigViewSet):
    queryset = ApiVersion.objects.select_related("api")
    serializer_class = ApiVersionSerializer
    filterset_fields = ["api", "is_default", "name"]
    ordering_fields = ["id", "name"]


class RouteViewSet(_AdminConfigViewSet):
    queryset = Route.objects.select_related("api")
    serializer_class = RouteSerializer
    filterset_fields = ["api", "enabled", "match", "version", "upstream", "anonymous"]
    search_fields = ["name", "path"]
    ordering_fields = ["id", "name", "path", "priority"]


class PolicyViewSet(_AdminConfigViewSet):
    queryset = Policy.objects.all()
    serializer_class = PolicySerializer
    filterset_fields = ["api", "route", "kind", "enabled"]
    ordering_fields = ["id", "kind"]


class JwtIssuerViewSet(_AdminConfigViewSet):
    queryset = JwtIssuer.objects.all()
    serializer_class = JwtIssuerSerializer
    filterset_fields = ["api", "enabled"]
    ordering_fields = ["id", "issuer"]


class CachePurgeSerializer(serializers.Serializer):
    api = serializers.PrimaryKeyRelatedField(queryset=Api.objects.all(), required=False)
    route = serializers.PrimaryKeyRelatedField(queryset=Route.objects.all(), required=False)
    cache_key = serializers.CharField(required=False, max_length=120)

    def validate(self, attrs):
        if len(attrs) != 1:
            raise serializers.ValidationError("Name exactly one of api, route or cache_key.")
        return attrs


class CachePurgeRecordSerializer(serializers.ModelSerializer):
    class Meta:
        model = CachePurge
        fields = ["id", "cache_key", "created_at", "actor"]


class CachePurgeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Purges: POST one API's, one route's, or one cached answer's (by its X-Cache-Key).
    The list holds the purges by cache key (API and route purges are config versions).
    Purging takes admin's "add cache purge" permission."""

    queryset = CachePurge.objects.all()
    serializer_class = CachePurgeRecordSerializer
    permission_classes = [AdminResource]
    filter_backends = FILTERS
    filterset_fields = ["cache_key"]
    ordering_fields = ["id", "created_at"]

    @extend_schema(
        request=CachePurgeSerializer,
        responses={
            202: inline_serializer("PurgeAccepted", {"config_version": serializers.IntegerField()})
        },
    )
    def create(self, request):
        given = CachePurgeSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        data = given.validated_data
        version = cache_purge(
            api=data.get("api"),
            route=data.get("route"),
            key=data.get("cache_key", ""),
            actor=request.user,
        )
        return Response({"config_version": version}, status=status.HTTP_202_ACCEPTED)


class ConfigVersionSerializer(serializers.ModelSerializer):
    restorable = serializers.SerializerMethodField()

    class Meta:
        model = ConfigVersion
        fields = ["version", "created_at", "actor", "reason", "key_ids", "restorable"]

    def get_restorable(self, obj) -> bool:
        """A structural version that kept its configuration (key changes restore the one
        before them)."""
        return obj.document_id is not None


class RestoreSerializer(serializers.Serializer):
    dry_run = serializers.BooleanField(default=False, help_text="Only show the changes.")


class RestoredSerializer(serializers.Serializer):
    dry_run = serializers.BooleanField()
    config_version = serializers.IntegerField(allow_null=True, help_text="The new version.")
    changes = serializers.ListField(child=serializers.CharField())


class CanRestore(AdminResource):
    perms_map = {**AdminResource.perms_map, "POST": ["%(app_label)s.restore_%(model_name)s"]}


class ConfigVersionViewSet(EtagMixin, viewsets.ReadOnlyModelViewSet):
    """The history of config versions: who changed what, when. A version's configuration
    can be read (as the YAML `gatewayconfig` writes, secrets as references) and restored."""

    queryset = ConfigVersion.objects.exclude(version=None)
    serializer_class = ConfigVersionSerializer
    permission_classes = [AdminResource]
    lookup_field = "version"
    filter_backends = FILTERS
    filterset_fields = ["actor"]
    ordering_fields = ["version", "created_at"]
    ordering = ["-version"]

    @extend_schema(responses={(200, "application/yaml"): OpenApiTypes.OBJECT})
    @action(detail=True, methods=["get"])
    def document(self, request, version=None):
        """The configuration as of this version, as `gatewayconfig export` writes it."""
        self.get_object()
        try:
            _, document = declarative.document_at(int(version))
        except LookupError as exc:
            return problem_response(404, "not-found", "Not found", str(exc))
        text = declarative.dump_yaml(declarative.to_file_document(document)[0])
        return HttpResponse(text, content_type="application/yaml; charset=utf-8")

    @extend_schema(request=RestoreSerializer, responses={200: RestoredSerializer})
    @action(detail=True, methods=["post"], permission_classes=[CanRestore])
    def restore(self, request, version=None):
        """Apply this version's configuration again, as a new version (needs admin's
        "Can restore an earlier config version" permission)."""
        self.get_object()
        given = RestoreSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        dry_run = given.validated_data["dry_run"]
        try:
            outcome = declarative.restore(int(version), actor=request.user, dry_run=dry_run)
        except LookupError as exc:
            raise Conflict(str(exc)) from None
        except declarative.ConfigFileError as exc:
            raise Conflict("Today's database refuses that configuration: " + exc.render()) from None
        return Response(
            {
                "dry_run": dry_run,
                "config_version": outcome.version,
                "changes": [c.render() for c in outcome.changes],
            }
        )


def register(router) -> None:
    router.register("upstreams", UpstreamViewSet)
    router.register("targets", TargetViewSet)
    router.register("apis", ApiViewSet)
    router.register("api-versions", ApiVersionViewSet)
    router.register("routes", RouteViewSet)
    router.register("policies", PolicyViewSet)
    router.register("jwt-issuers", JwtIssuerViewSet)
    router.register("cache-purges", CachePurgeViewSet)
    router.register("config-versions", ConfigVersionViewSet)
