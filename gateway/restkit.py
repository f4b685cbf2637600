"""Plumbing of the management REST API (`/api/v1/`) that every app's resources share.

- Errors are RFC 9457 problem details, one shape everywhere: `type` (a URN like the
  gateway's), `title`, `status`, `detail`, and for invalid input `errors`, a list of
  `{"pointer": "/field/0/sub", "message": …}` (the gateway's validation errors look the same).
- Writes of what the gateway serves (`ConfigViewSet`) commit together with their config
  version bump, with the actor, as admin's do (`gateway/admin_mixins.py`).
- Every object answers with an `ETag`; a write that sends `If-Match` with a stale one gets
  412 (checked with the row locked), and a GET with a current `If-None-Match` gets 304.
- Serializers run the model's own validation (`full_clean`), so the REST API refuses
  exactly what admin refuses, with the same messages.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import ProtectedError, RestrictedError
from django.http import Http404
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, filters, serializers, status, viewsets
from rest_framework.response import Response
from rest_framework.views import exception_handler

from gateway.config import change_scope, config_bump, config_lock, merge_scopes, stored_scope
from gateway.rest_defaults import FilterBackend, StrictOrderingFilter

log = logging.getLogger("gateway.rest")

PROBLEM_TYPE = "application/problem+json"

# DRF exception class -> (slug, title)
_SLUGS: list[tuple[type[Exception], str, str]] = [
    (exceptions.ValidationError, "validation-failed", "Invalid input"),
    (exceptions.ParseError, "bad-request", "Malformed request"),
    (exceptions.NotAuthenticated, "missing-credential", "Missing credential"),
    (exceptions.AuthenticationFailed, "invalid-credential", "Invalid credential"),
    (exceptions.PermissionDenied, "forbidden", "Forbidden"),
    (exceptions.NotFound, "not-found", "Not found"),
    (exceptions.MethodNotAllowed, "method-not-allowed", "Method not allowed"),
    (exceptions.NotAcceptable, "not-acceptable", "Not acceptable"),
    (exceptions.UnsupportedMediaType, "unsupported-media-type", "Unsupported media type"),
    (exceptions.Throttled, "rate-limited", "Too many requests"),
]


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The change conflicts with the current state."
    default_code = "conflict"


class PreconditionFailed(exceptions.APIException):
    status_code = status.HTTP_412_PRECONDITION_FAILED
    default_detail = "The object changed since it was read (If-Match does not hold)."
    default_code = "precondition_failed"


_SLUGS += [
    (Conflict, "conflict", "Conflict"),
    (PreconditionFailed, "precondition-failed", "Precondition failed"),
]


def problem_response(status_code: int, slug: str, title: str, detail: str, **extra) -> Response:
    doc = {
        "type": f"urn:apigw:problem:{slug}",
        "title": title,
        "status": status_code,
        "detail": detail,
        **extra,
    }
    return Response(doc, status=status_code, content_type=PROBLEM_TYPE)


def error_pointers(detail, prefix: str = "") -> Iterator[dict]:
    """DRF's nested error detail as flat (JSON pointer, message) pairs."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            if key in ("non_field_errors", "__all__"):
                yield from error_pointers(value, prefix)
            else:
                name = str(key).replace("~", "~0").replace("/", "~1")
                yield from error_pointers(value, f"{prefix}/{name}")
    elif isinstance(detail, list):
        if all(not isinstance(v, dict | list) for v in detail):
            for message in detail:
                yield {"pointer": prefix, "message": str(message)}
        else:
            for i, value in enumerate(detail):
                yield from error_pointers(value, f"{prefix}/{i}")
    else:
        yield {"pointer": prefix, "message": str(detail)}


def problem_exception_handler(exc, context) -> Response:
    """DRF's exception handler, answering problem+json for everything, 500s included."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(_django_errors(exc))
    elif isinstance(exc, ProtectedError | RestrictedError):
        names = sorted({str(o) for o in list(exc.args[1])[:5]}) if len(exc.args) > 1 else []
        exc = Conflict(
            "Still in use"
            + (f" by {', '.join(names)}." if names else ".")
            + " Remove or repoint those first."
        )
    elif isinstance(exc, IntegrityError):
        exc = Conflict("The change conflicts with another object (a unique value is taken).")
    response = exception_handler(exc, context)
    if response is None:  # not an API exception: a bug. Logged, answered as a problem.
        log.error("REST API error", exc_info=exc)
        return problem_response(500, "internal", "Internal error", "An unexpected error.")
    slug, title = "error", "Error"
    for cls, s, t in _SLUGS:
        if isinstance(exc, cls):
            slug, title = s, t
            break
    extra = {}
    if isinstance(exc, exceptions.ValidationError):
        extra["errors"] = list(error_pointers(exc.detail))[:100]
        detail = "The request has invalid fields; see errors."
    elif isinstance(exc.detail, dict | list):
        extra["errors"] = list(error_pointers(exc.detail))[:100]
        detail = title
    else:
        detail = str(exc.detail)
    out = problem_response(response.status_code, slug, title, detail, **extra)
    for name in ("WWW-Authenticate", "Retry-After", "Allow"):
        if name in response:
            out[name] = response[name]
    if response.status_code == 401 and "WWW-Authenticate" not in out:
        out["WWW-Authenticate"] = 'Bearer realm="api"'
    return out


def _django_errors(exc: DjangoValidationError):
    if hasattr(exc, "error_dict"):
        return {
            field: [m for e in errors for m in e.messages]
            for field, errors in exc.error_dict.items()
        }
    return {"non_field_errors": exc.messages}


class ModelCleanSerializer(serializers.ModelSerializer):
    """A model serializer that validates with the model's `full_clean()` too."""

    def validate(self, attrs):
        attrs = super().validate(attrs)
        model = self.Meta.model
        m2m = {f.name for f in model._meta.many_to_many}
        plain = {k: v for k, v in attrs.items() if k not in m2m}
        if self.instance is not None:
            candidate = model.objects.get(pk=self.instance.pk)
            for k, v in plain.items():
                setattr(candidate, k, v)
        else:
            candidate = model(**plain)
        try:
            candidate.full_clean(exclude=list(m2m))
        except DjangoValidationError as exc:
            raise exceptions.ValidationError(_django_errors(exc)) from None
        return attrs


def representation_etag(data) -> str:
    """A strong ETag over an object's JSON representation."""
    body = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'


def _tags(header: str) -> set[str]:
    return {t.strip().removeprefix("W/") for t in header.split(",") if t.strip()}


class EtagMixin:
    """ETag on every object answer, If-None-Match on reads (304). Writes come from the
    mixins below, each only on the viewsets that offer that write (routers map every method
    a viewset has, so a read-only viewset must not inherit `create`)."""

    def represent(self, instance) -> dict:
        """The object as answers show it (and as its ETag covers)."""
        return self.get_serializer(instance).data

    def retrieve(self, request, *args, **kwargs):
        instance = self.get_object()
        data = self.represent(instance)
        etag = representation_etag(data)
        if etag in _tags(request.headers.get("If-None-Match", "")):
            return Response(status=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
        return Response(data, headers={"ETag": etag})

    def _check_if_match(self, request, instance) -> None:
        wanted = request.headers.get("If-Match")
        if not wanted:
            return
        tags = _tags(wanted)
        if "*" in tags:
            return
        if representation_etag(self.represent(instance)) not in tags:
            raise PreconditionFailed()

    def get_queryset(self):
        qs = super().get_queryset()
        if getattr(self, "_lock", False):
            # Lock only the object's own row: joined (nullable) relations cannot be locked.
            own = connection.features.has_select_for_update_of
            qs = qs.select_for_update(of=("self",) if own else ())
        return qs

    def _locked(self, request):
        self._lock = True
        instance = self.get_object()
        self._check_if_match(request, instance)
        return instance


class EtagUpdateMixin:
    """PUT/PATCH under If-Match, the row locked while it is checked and written."""

    def update(self, request, *args, **kwargs):
        partial = kwargs.pop("partial", False)
        with transaction.atomic():
            instance = self._locked(request)
            serializer = self.get_serializer(instance, data=request.data, partial=partial)
            serializer.is_valid(raise_exception=True)
            self.perform_update(serializer)
        data = self.represent(serializer.instance)
        return Response(data, headers={"ETag": representation_etag(data)})


class EtagDestroyMixin:
    """DELETE under If-Match."""

    def destroy(self, request, *args, **kwargs):
        with transaction.atomic():
            instance = self._locked(request)
            self.perform_destroy(instance)
        return Response(status=status.HTTP_204_NO_CONTENT)


class EtagCreateMixin:
    """POST answers carry the new object's ETag."""

    def create(self, request, *args, **kwargs):
        response = super().create(request, *args, **kwargs)
        if isinstance(response.data, dict):
            response["ETag"] = representation_etag(response.data)
        return response


FILTERS = [FilterBackend, filters.SearchFilter, StrictOrderingFilter]


class ConfigViewSet(
    EtagCreateMixin, EtagUpdateMixin, EtagDestroyMixin, EtagMixin, viewsets.ModelViewSet
):
    """CRUD of something the gateway serves: every write bumps the config version."""

    filter_backends = FILTERS
    ordering = ["id"]

    # A key delta when the object's scope says which keys it reaches (before and after the
    # change: gateway.config.register_scope), else a rebuild.
    def perform_create(self, serializer) -> None:
        with transaction.atomic():
            serializer.save()
            self._bump(serializer.instance, "added", set())

    def perform_update(self, serializer) -> None:
        with transaction.atomic():
            before = stored_scope(serializer.instance)
            serializer.save()
            self._bump(serializer.instance, "changed", before)

    def perform_destroy(self, instance) -> None:
        with transaction.atomic():
            label = f"{instance._meta.verbose_name} {instance} deleted"
            config_lock()
            scope = stored_scope(instance)
            instance.delete()
            config_bump(actor=self.request.user, reason=label, key_ids=scope)

    def _bump(self, obj, verb: str, before: set[str] | None) -> None:
        config_lock()  # before reading the keys the change reaches now
        config_bump(
            actor=self.request.user,
            reason=f"{obj._meta.verbose_name} {obj} {verb}",
            key_ids=merge_scopes(before, change_scope(obj)),
        )


@csrf_exempt  # no state changes here: a POST to a wrong path gets 404, not a CSRF page
def not_found(request, exception=None, **kwargs):
    """Django's 404 for paths under /api/ that no resource matches, as a problem."""
    from django.http import JsonResponse

    doc = {
        "type": "urn:apigw:problem:not-found",
        "title": "Not found",
        "status": 404,
        "detail": f"No resource at {request.path}.",
    }
    return JsonResponse(doc, status=404, content_type=PROBLEM_TYPE)
