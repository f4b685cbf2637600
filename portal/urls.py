from django.urls import path

from portal import views

app_name = "portal"

urlpatterns = [
    path("", views.home, name="home"),
    path("dashboard/", views.dashboard, name="dashboard"),
    path("usage/", views.usage, name="usage"),
    path("usage.json", views.usage_data, name="usage_data"),
    path("usage.csv", views.usage_csv, name="usage_csv"),
    path("apis/", views.catalog, name="catalog"),
    path("apis/<slug:slug>/", views.api_detail, name="api_detail"),
    path("apis/<slug:slug>/docs/", views.api_docs, name="api_docs"),
    path("apis/<slug:slug>/openapi.json", views.api_openapi, name="api_openapi"),
    path("apis/<slug:slug>/v/<slug:version>/docs/", views.api_docs, name="api_version_docs"),
    path(
        "apis/<slug:slug>/v/<slug:version>/openapi.json",
        views.api_openapi,
        name="api_version_openapi",
    ),
    path("plans/", views.plans, name="plans"),
    path("plans/<slug:slug>/subscribe/", views.subscribe, name="subscribe"),
    path("subscriptions/<int:pk>/cancel/", views.unsubscribe, name="unsubscribe"),
    path("keys/new/", views.key_create, name="key_create"),
    path("keys/<int:pk>/revoke/", views.key_revoke_view, name="key_revoke"),
    path("keys/<int:pk>/rotate/", views.key_rotate_view, name="key_rotate"),
    path("keys/<int:pk>/usage/", views.key_usage, name="key_usage"),
    path("keys/<int:pk>/usage.json", views.key_usage_data, name="key_usage_data"),
    path("keys/<int:pk>/usage.csv", views.key_usage_csv, name="key_usage_csv"),
]
