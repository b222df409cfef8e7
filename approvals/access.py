"""Who may do what to the approvals app's objects: one place, called by the services (so the
console, the API and any other caller get the same answer). Raise PermissionDenied (a 403);
an object of another tenant never gets here (it is a 404 before).

The services check again inside their transaction with ``core.access.member_role_check``."""

from __future__ import annotations

from core.models import Role, User
from core.selectors import get_tenant_for_user


def access_edit_artifact(user: User, tenant_slug: str) -> None:
    """Editing a draft is an operator's (or admin's) act."""
    get_tenant_for_user(user, tenant_slug, role=Role.OPERATOR)


def access_resolve_conflict(user: User, tenant_slug: str) -> None:
    """Resolving a conflict is a reviewer's (or admin's) act."""
    get_tenant_for_user(user, tenant_slug, role=Role.REVIEWER)
