from django.urls import path

from portal import org_views, views

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
    path("orgs/", org_views.orgs, name="orgs"),
    path("orgs/join/<str:token>/", org_views.org_join, name="org_join"),
    path("orgs/<slug:slug>/", org_views.org, name="org"),
    path("orgs/<slug:slug>/usage.json", org_views.org_usage_data, name="org_usage_data"),
    path("orgs/<slug:slug>/invite/", org_views.org_invite_view, name="org_invite"),
    path(
        "orgs/<slug:slug>/members/<int:pk>/remove/",
        org_views.org_member_remove,
        name="org_member_remove",
    ),
    path("orgs/<slug:slug>/subscribe/", org_views.org_subscribe, name="org_subscribe"),
    path(
        "orgs/<slug:slug>/subscriptions/<int:pk>/cancel/",
        org_views.org_unsubscribe,
        name="org_unsubscribe",
    ),
    path("orgs/<slug:slug>/keys/new/", org_views.org_key_create, name="org_key_create"),
    path("orgs/<slug:slug>/keys/<int:pk>/revoke/", org_views.org_key_revoke, name="org_key_revoke"),
    path("keys/<int:pk>/revoke/", views.key_revoke_view, name="key_revoke"),
    path("keys/<int:pk>/rotate/", views.key_rotate_view, name="key_rotate"),
    path("keys/<int:pk>/usage/", views.key_usage, name="key_usage"),
    path("keys/<int:pk>/usage.json", views.key_usage_data, name="key_usage_data"),
    path("keys/<int:pk>/usage.csv", views.key_usage_csv, name="key_usage_csv"),
]
