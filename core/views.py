from __future__ import annotations

import re
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods

from core import connections, health, metrics, selectors, services
from core import overview as core_overview
from core.forms import ConnectionForm, MemberAddForm, QuotaForm, TokenForm
from core.http import HtmxHttpRequest, authenticated_user
from core.models import Connection, Role


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
def overview(request: HtmxHttpRequest) -> HttpResponse:
    """The tenants' live figures and the last hour; htmx refreshes fetch only the fragment."""
    user = authenticated_user(request)
    memberships = list(selectors.memberships_for_user(user))
    sections = core_overview.overview_sections({m.tenant_id: m.tenant.slug for m in memberships})
    template = "core/overview.html#overview" if request.htmx else "core/overview.html"
    return render(request, template, {"memberships": memberships, "sections": sections})


@require_http_methods(["GET", "POST"])
@login_required
def tenant_quotas(request: HttpRequest, slug: str) -> HttpResponse:
    user = authenticated_user(request)
    tenant = selectors.get_tenant_for_user(user, slug, role=Role.ADMIN)
    quota = selectors.quota_for_tenant(tenant)
    form = QuotaForm(request.POST or None, quota=quota, cap_names=services.quota_cap_names())
    if request.method == "POST" and form.is_valid():
        try:
            services.tenant_quota_update(tenant=tenant, actor=user, changes=form.changes())
        except services.QuotaInvalid as invalid:
            for field, message in invalid.fields.items():
                form.add_error(None, f"{field}: {message}")
        else:
            messages.success(request, f"Quota of {tenant.slug} saved; the next admission round applies it.")
            return redirect("core:tenant-quotas", slug=tenant.slug)
    return render(
        request, "core/quotas.html", {"tenant": tenant, "form": form}, status=400 if form.errors else 200
    )


@require_http_methods(["GET", "POST"])
@login_required
def tenant_connections(request: HttpRequest, slug: str) -> HttpResponse:
    """Admins: the tenant's environments and connections; add an environment or a connection,
    make one the default, archive one. Secrets are write-only."""
    user = authenticated_user(request)
    tenant = selectors.get_tenant_for_user(user, slug, role=Role.ADMIN)
    actor = user.get_username()
    environments = connections.environment_names(tenant)
    action = request.POST.get("action", "")
    form = ConnectionForm(request.POST if action == "add_connection" else None, environments=environments)
    error = ""
    if request.method == "POST":
        try:
            if action == "add_environment":
                connections.environment_add(
                    tenant=tenant, name=request.POST.get("name", "").strip(), actor=actor
                )
                messages.success(request, "Environment added.")
                return redirect("core:tenant-connections", slug=tenant.slug)
            if action == "add_connection" and form.is_valid():
                data = form.cleaned_data
                connections.connection_add(
                    tenant=tenant,
                    environment=data["environment"],
                    provider=data["provider"].strip(),
                    name=data["name"].strip(),
                    actor=actor,
                    is_default=data["is_default"],
                    secret=data["secret"] or None,
                    secret_ref=data["secret_ref"].strip() or None,
                    config={"url": data["url"]} if data["url"] else None,
                )
                messages.success(request, f"Connection {data['name']} added.")
                return redirect("core:tenant-connections", slug=tenant.slug)
            if action not in ("add_environment", "add_connection", "make_default", "archive"):
                error = "Unknown action."
            elif action in ("make_default", "archive"):
                chosen = request.POST.get("connection", "")
                target = (
                    Connection.objects.filter(tenant=tenant, pk=int(chosen)).first()
                    if re.fullmatch(r"[0-9]{1,17}", chosen)
                    else None
                )
                if target is None:
                    error = "That connection does not exist (any more)."
                else:
                    changes = {"is_default": True} if action == "make_default" else {"archived": True}
                    connections.connection_update(connection=target, actor=actor, **changes)  # type: ignore[arg-type]
                    messages.success(request, f"Connection {target.name} updated.")
                    return redirect("core:tenant-connections", slug=tenant.slug)
        except connections.ConnectionInvalid as exc:
            error = str(exc)
    rows = Connection.objects.filter(tenant=tenant).order_by("environment", "provider", "-is_default", "name")
    context = {
        "tenant": tenant,
        "environments": environments,
        "connections": rows,
        "form": form,
        "error": error,
    }
    failed = request.method == "POST" and (error or form.errors)
    return render(request, "core/connections.html", context, status=400 if failed else 200)


@require_http_methods(["GET", "POST"])
@login_required
def tenant_members(request: HttpRequest, slug: str) -> HttpResponse:
    """Admins of the tenant: add a member (a new account, or an existing one), change a role,
    remove a member. Each change applies at once and closes the member's open sockets."""
    actor = authenticated_user(request)
    tenant = selectors.get_tenant_for_user(actor, slug, role=Role.ADMIN)
    action = request.POST.get("action", "")
    form = MemberAddForm(request.POST if action == "add" else None)
    error = ""
    if request.method == "POST":
        try:
            if action == "add":
                if form.is_valid():
                    data = form.cleaned_data
                    services.membership_add(tenant=tenant, actor=actor, **data)
                    messages.success(request, f"{data['username']} is now {data['role']} of {tenant.slug}.")
                    return redirect("core:tenant-members", slug=tenant.slug)
            elif action in ("set_role", "remove"):
                member = selectors.member_user(tenant, request.POST.get("username", ""))
                if action == "set_role":
                    role = request.POST.get("role", "")
                    services.membership_set_role(tenant=tenant, actor=actor, user=member, role=role)
                    messages.success(request, f"{member.get_username()} is now {role}.")
                else:
                    services.membership_revoke(tenant=tenant, user=member, actor=actor)
                    messages.success(request, f"{member.get_username()} was removed from {tenant.slug}.")
                return redirect("core:tenant-members", slug=tenant.slug)
            else:
                error = "Unknown action."
        except services.MembershipInvalid as invalid:
            error = str(invalid)
    context = {
        "tenant": tenant,
        "members": selectors.members_of_tenant(tenant),
        "roles": Role.choices,
        "form": form,
        "error": error,
        "me": actor,
    }
    failed = request.method == "POST" and bool(error or form.errors)
    return render(request, "core/members.html", context, status=400 if failed else 200)


@require_GET
@login_required
def tenant_audit(request: HttpRequest, slug: str) -> HttpResponse:
    """The tenant's event log, newest first, filtered by actor, verb and subject prefix."""
    tenant = selectors.get_tenant_for_user(authenticated_user(request), slug, role=Role.ADMIN)
    filters = {name: request.GET.get(name, "").strip()[:200] for name in ("actor", "verb", "subject")}
    before = request.GET.get("before", "")
    events, next_before = selectors.tenant_events(
        tenant,
        actor=filters["actor"],
        verb=filters["verb"],
        subject=filters["subject"],
        before=int(before) if re.fullmatch(r"[0-9]{1,18}", before) else None,
    )
    query = urlencode({name: value for name, value in filters.items() if value})
    context = {
        "tenant": tenant,
        "events": events,
        "filters": filters,
        "next_before": next_before,
        "query": query,
    }
    return render(request, "core/audit.html", context)


@require_http_methods(["GET", "POST"])
@login_required
@never_cache
def account_tokens(request: HttpRequest) -> HttpResponse:
    """The user's API tokens: issue one (its secret is shown on this answer only), revoke one."""
    user = authenticated_user(request)
    action = request.POST.get("action", "")
    form = TokenForm(request.POST if action == "issue" else None)
    secret = ""
    error = ""
    if action == "issue" and form.is_valid():
        try:
            token, secret = services.api_token_create(user=user, **form.cleaned_data)
        except ValueError as refused:
            error = str(refused)
        else:
            messages.success(request, f"Token {token.prefix}… issued. Copy it now: it is never shown again.")
            form = TokenForm()
    elif action == "revoke":
        chosen = request.POST.get("token", "")
        if (
            (chosen.isascii() and chosen.isdigit())
            and len(chosen) < 18
            and services.api_token_revoke(user=user, token_id=int(chosen))
        ):
            messages.success(request, "Token revoked.")
            return redirect("core:account-tokens")
        error = "That token is not yours or is already revoked."
    elif request.method == "POST":
        error = "Unknown action."
    context = {"tokens": selectors.tokens_of_user(user), "form": form, "secret": secret, "error": error}
    failed = request.method == "POST" and bool(error or form.errors)
    return render(request, "core/tokens.html", context, status=400 if failed else 200)
