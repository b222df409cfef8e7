from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from approvals.api import router as approvals_router
from approvals.outside_api import router as outside_approvals_router
from core import views
from core.api import api
from core.connections_api import router as connections_router
from core.security import ThrottledLoginView, throttled
from runs.api import router as runs_router
from runs.outside_api import router as outside_router

api.add_router("/", runs_router)
api.add_router("/", outside_router)
api.add_router("/", approvals_router)
api.add_router("/", outside_approvals_router)
api.add_router("/", connections_router)

core_patterns = (
    [
        path("", views.overview, name="overview"),
        path("tenants/<slug:slug>/quotas/", views.tenant_quotas, name="tenant-quotas"),
        path("tenants/<slug:slug>/connections/", views.tenant_connections, name="tenant-connections"),
        path("tenants/<slug:slug>/members/", views.tenant_members, name="tenant-members"),
        path("tenants/<slug:slug>/audit/", views.tenant_audit, name="tenant-audit"),
        path("account/tokens/", views.account_tokens, name="account-tokens"),
    ],
    "core",
)

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics_view, name="metrics"),
    path("accounts/login/", ThrottledLoginView.as_view(), name="login"),
    path("admin/login/", throttled(admin.site.login)),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    path("", include(core_patterns)),
    path("", include("runs.urls")),
    path("", include("approvals.urls")),
]
