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
        "nav_current": _nav_current(request),
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


# Which navigation link holds the current page: aria-current="page" on the section's own page
# (its link's target), "true" on a page inside it (a run of the runs list).
NAV_SECTIONS = {
    "overview": ("overview", True),
    "run-list": ("runs", True),
    "run-detail": ("runs", False),
    "session-detail": ("runs", False),
    "lease-board": ("leases", True),
    "approval-inbox": ("approvals", True),
    "conflict-queue": ("conflicts", True),
}


def _nav_current(request: HttpRequest) -> dict[str, str]:
    match = request.resolver_match
    if match is None or not match.url_name:
        return {}
    if match.url_name.startswith("tenant-") and "slug" in match.kwargs:
        own_page = match.url_name == "tenant-members"
        return {f"admin:{match.kwargs['slug']}": "page" if own_page else "true"}
    section, own_page = NAV_SECTIONS.get(match.url_name, ("", False))
    return {section: "page" if own_page else "true"} if section else {}
