"""Who may call the management REST API, and what they may do.

Authentication: `Authorization: Bearer gwt_…` (an API token, `portal/tokens.py`), or the
admin's session for the browsable API (with CSRF). Authorization:
- admin resources (APIs, routes, upstreams, plans, consumers, …): staff users, with the
  model permissions admin would need (superusers have all); a read-scoped token may only read;
- own resources (keys, subscriptions, usage): any active user, who sees only their own
  consumer's objects (another's answer 404, like objects that do not exist); staff see all.
"""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from portal.models import ApiToken
from portal.tokens import token_authenticate


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = request.headers.get("Authorization", "")
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        raw = raw.strip()
        if not raw:
            raise exceptions.AuthenticationFailed("The Bearer credential is empty.")
        token = token_authenticate(raw)
        if token is None:
            raise exceptions.AuthenticationFailed("The token is unknown, expired or revoked.")
        return token.user, token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'


def _token_allows(request) -> bool:
    token = request.auth
    read_only = isinstance(token, ApiToken) and token.scope == ApiToken.Scope.READ
    if read_only and request.method not in permissions.SAFE_METHODS:
        raise exceptions.PermissionDenied("This token is read-only (scope read).")
    return True


class AdminResource(permissions.DjangoModelPermissions):
    """Staff only, with admin's model permissions (view for reads)."""

    perms_map = {
        **permissions.DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
    }

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_active and user.is_staff):
            if user and user.is_authenticated:
                raise exceptions.PermissionDenied("This resource is for administrators.")
            return False
        return _token_allows(request) and super().has_permission(request, view)


class OwnResource(permissions.BasePermission):
    """Any signed-in user; the view's queryset limits them to their own objects."""

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_active):
            return False
        return _token_allows(request)


class StaffOnlyAction(permissions.BasePermission):
    """For actions only administrators take (approve, reject)."""

    def has_permission(self, request, view) -> bool:
        if not request.user.is_staff:
            raise exceptions.PermissionDenied("Only administrators can do this.")
        return True


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """The token scheme as the generated OpenAPI schema describes it."""

    target_class = "portal.rest_auth.BearerTokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "gwt_<id>_<secret> (an API token made in admin)",
        }
