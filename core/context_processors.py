from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest

from core import selectors
from core.models import Role, User


def tenancy(request: HttpRequest) -> dict[str, Any]:
    """The signed-in user's memberships, for the navigation."""
    user = getattr(request, "user", None)
    if not isinstance(user, User):
        return {}
    memberships = list(selectors.memberships_for_user(user))
    return {
        "nav_memberships": memberships,
        "nav_admin_tenants": [m.tenant for m in memberships if m.role == Role.ADMIN],
        "tenant_pages": TENANT_PAGES,
        "nav_pending_approvals": _pending_approvals(user),
    }


def _pending_approvals(user: User) -> int:
    """The nav's inbox badge, from whichever app registered a counter (approvals does)."""
    return sum(counter(user) for counter in NAV_COUNTERS)


# Apps register what the nav counts (AppConfig.ready): core knows nothing of them.
NAV_COUNTERS: list[Callable[[User], int]] = []


# The tenant administration pages, in the order of their tabs.
TENANT_PAGES = [
    ("core:tenant-members", "Members"),
    ("core:tenant-quotas", "Quotas"),
    ("core:tenant-connections", "Connections"),
    ("core:tenant-audit", "Audit log"),
]
