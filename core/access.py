"""Who may act, judged at the instant of the write: inside the acting transaction the member's
row is read locked (``FOR NO KEY UPDATE``), so a role change or a removal racing the act either
committed before it (and the act is refused) or waits until the act has committed — never an
act by someone whose role was already taken away. Views and API handlers may check earlier
too, for a quick answer; this is the check that holds."""

from __future__ import annotations

from collections.abc import Sequence

from django.core.exceptions import PermissionDenied

from core import rawsql
from core.models import Membership, User
from core.selectors import ROLE_GRANTS


def member_role_check(
    user: User, tenant_id: int, roles: Sequence[str], act: str, *, lock: bool = True
) -> None:
    """``user`` holds one of ``roles`` in the tenant, else PermissionDenied saying why (``act``
    names what needs the role). ``lock``: read the membership row locked until the acting
    transaction ends — the check that holds; without it, a quick answer before acting."""
    # Hand-written (prepared where the thread prepares): every decision and edit asks it.
    locked = rawsql.row_lock_clause(" FOR NO KEY UPDATE") if lock else ""
    membership = rawsql.fetch_rows(
        f"SELECT role FROM {Membership._meta.db_table} WHERE user_id = %s AND tenant_id = %s{locked}",
        [user.pk, tenant_id],
    )
    if not membership:
        raise PermissionDenied("not a member of this tenant")
    if not any(role in ROLE_GRANTS[membership[0][0]] for role in roles):
        raise PermissionDenied(f"{act} needs one of the roles: {', '.join(roles)}")
