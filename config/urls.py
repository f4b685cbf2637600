from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from analytics import rest as analytics_rest
from gateway import rest as gateway_rest
from gateway.restkit import not_found
from portal import rest as portal_rest

api = DefaultRouter()
for app in (gateway_rest, portal_rest, analytics_rest):
    app.register(api)

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("allauth.urls")),
    path("api/v1/", include(api.urls)),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/<path:rest>", not_found),
    path("", include("portal.urls")),
]
