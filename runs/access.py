"""Who may do what to runs: one place, called by the views and the API handlers before they
act (PermissionDenied is their 403; another tenant's run is a 404 before it gets here). The
services check again at the instant of the write (``core.access.member_role_check``)."""

from __future__ import annotations

from core.models import Role, Tenant, User
from core.selectors import get_tenant_for_user
from runs.models import Run


def access_start_runs(user: User, tenant_slug: str) -> Tenant:
    """Starting runs in a tenant is an operator's (or admin's) act; the tenant."""
    return get_tenant_for_user(user, tenant_slug, role=Role.OPERATOR)


def access_operate_run(user: User, run: Run) -> None:
    """Cancelling, retrying or replaying a run is an operator's (or admin's) act."""
    get_tenant_for_user(user, run.tenant.slug, role=Role.OPERATOR)
