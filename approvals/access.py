"""Who may do what to the approvals app's objects: one place, called by the services (so the
console, the API and any other caller get the same answer). Raise PermissionDenied (a 403);
an object of another tenant never gets here (it is a 404 before).

Inside a service's transaction each check reads the member's row locked (``FOR NO KEY
UPDATE``): a role change or a removal racing the act either committed before it (and the act
is refused) or waits until the act has committed — never an act by someone whose role was
already taken away."""

from __future__ import annotations

from collections.abc import Sequence

from django.core.exceptions import PermissionDenied

from core.models import Membership, Role, User
from core.selectors import ROLE_GRANTS, get_tenant_for_user


def access_edit_artifact(user: User, tenant_slug: str) -> None:
    """Editing a draft is an operator's (or admin's) act."""
    get_tenant_for_user(user, tenant_slug, role=Role.OPERATOR)


def access_resolve_conflict(user: User, tenant_slug: str) -> None:
    """Resolving a conflict is a reviewer's (or admin's) act."""
    get_tenant_for_user(user, tenant_slug, role=Role.REVIEWER)


def member_role_locked(user: User, tenant_id: int, roles: Sequence[str], act: str) -> None:
    """In the acting transaction: ``user`` holds one of ``roles`` in the tenant, its membership
    row locked until the transaction ends; else PermissionDenied saying why."""
    membership = (
        Membership.objects.select_for_update(no_key=True).filter(user=user, tenant_id=tenant_id).first()
    )
    if membership is None:
        raise PermissionDenied(f"you are no longer a member of this tenant, so you cannot {act}")
    if not any(role in ROLE_GRANTS[membership.role] for role in roles):
        raise PermissionDenied(f"to {act} you need one of the roles: {', '.join(roles)}")
