from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods

from core import health, metrics, selectors, services
from core.forms import QuotaForm
from core.http import authenticated_user
from core.models import Role


@require_GET
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_GET
@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    checks = health.readiness()
    failing = sorted(name for name, error in checks.items() if error)
    body = {
        "status": "unavailable" if failing else "ready",
        "failing": failing,
        "checks": {name: error or "ok" for name, error in checks.items()},
    }
    return JsonResponse(body, status=503 if failing else 200)


@require_GET
@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus text. Counters are this process's; gauges are read from the database."""
    body, content_type = metrics.render()
    return HttpResponse(body, content_type=content_type)


@require_GET
@login_required
def overview(request: HttpRequest) -> HttpResponse:
    user = authenticated_user(request)
    return render(request, "core/overview.html", {"memberships": selectors.memberships_for_user(user)})


@require_http_methods(["GET", "POST"])
@login_required
def tenant_quotas(request: HttpRequest, slug: str) -> HttpResponse:
    user = authenticated_user(request)
    tenant = selectors.get_tenant_for_user(user, slug, role=Role.ADMIN)
    quota = selectors.quota_for_tenant(tenant)
    form = QuotaForm(request.POST or None, instance=quota)
    if request.method == "POST" and form.is_valid():
        services.tenant_quota_update(tenant=tenant, actor=user, changes=form.changes())
        messages.success(request, f"Quota of {tenant.slug} saved.")
        return redirect("core:tenant-quotas", slug=tenant.slug)
    return render(
        request, "core/quotas.html", {"tenant": tenant, "form": form}, status=400 if form.errors else 200
    )
