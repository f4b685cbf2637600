from django.urls import path

from portal import views

app_name = "portal"

urlpatterns = [
    path("", views.home, name="home"),
    path("dashboard/", views.dashboard, name="dashboard"),
    path("apis/", views.catalog, name="catalog"),
    path("plans/", views.plans, name="plans"),
    path("plans/<slug:slug>/subscribe/", views.subscribe, name="subscribe"),
    path("keys/new/", views.key_create, name="key_create"),
    path("keys/<int:pk>/revoke/", views.key_revoke_view, name="key_revoke"),
    path("keys/<int:pk>/rotate/", views.key_rotate_view, name="key_rotate"),
    path("keys/<int:pk>/usage/", views.key_usage, name="key_usage"),
    path("keys/<int:pk>/usage.json", views.key_usage_data, name="key_usage_data"),
    path("keys/<int:pk>/usage.csv", views.key_usage_csv, name="key_usage_csv"),
]
